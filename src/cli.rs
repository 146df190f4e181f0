//! The command line: `serve`, `migrate`, `check-config`, and offline account
//! and instance management against the configured database.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// eventgate: a real-time event gateway for WhatsApp-style instances.
///
/// Producers publish events with POST /api/events/publish/:instance;
/// WebSocket clients receive them on GET /ws/:instance. Settings come from
/// built-in defaults, then the TOML file (--config or EVENTGATE_CONFIG), then
/// EVENTGATE_* environment variables: EVENTGATE_WS__CLIENT_BUFFER sets
/// ws.client_buffer, and so for every key; short names such as EVENTGATE_BIND
/// win over those.
#[derive(Debug, Parser)]
#[command(name = "eventgate", version, about, long_about)]
pub struct Cli {
    /// Settings file (TOML; else EVENTGATE_CONFIG, ignored when empty, as
    /// every empty variable is). Every key is documented in
    /// config/eventgate.toml.
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Option<Command>,
}

impl Cli {
    /// The settings file: `--config`, else a non-empty `EVENTGATE_CONFIG`.
    pub fn config_path(&self) -> Option<PathBuf> {
        self.config.clone().or_else(|| {
            std::env::var_os("EVENTGATE_CONFIG")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        })
    }
}

/// What to do; `serve` when omitted.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway (the default).
    Serve,
    /// Apply pending database migrations and exit.
    Migrate,
    /// Validate the settings and print every key with its value (secrets
    /// masked) and where the value came from (default, file, variable).
    CheckConfig,
    /// Manage accounts (TokenAccount holders).
    #[command(subcommand)]
    Account(AccountCommand),
    /// Manage instances offline.
    #[command(subcommand)]
    Instance(InstanceCommand),
}

/// `eventgate account …`
#[derive(Debug, Subcommand)]
pub enum AccountCommand {
    /// Create an account; prints its new TokenAccount alone on the last line.
    Create {
        /// A name for people; need not be unique.
        name: String,
    },
    /// List accounts (tokens are stored hashed and cannot be shown).
    List,
}

/// `eventgate instance …`
#[derive(Debug, Subcommand)]
pub enum InstanceCommand {
    /// Create an instance in an account; prints its TokenInstance on the last line.
    Create {
        /// The account's id (see `eventgate account list`).
        #[arg(long)]
        account: i64,
        /// Instance name: 1-64 of A-Z a-z 0-9 _ . - starting with a letter or digit.
        name: String,
    },
    /// List instances (of one account with --account).
    List {
        #[arg(long)]
        account: Option<i64>,
    },
    /// Delete an instance of an account (its settings go with it).
    Delete {
        #[arg(long)]
        account: i64,
        name: String,
    },
}
