//! The `eventgate` binary: parses the command line, loads settings, sets up
//! logging and runs the chosen command. The work is in the library.

#![deny(unsafe_code)]

use clap::Parser;
use eventgate::cli::{AccountCommand, Cli, Command, InstanceCommand};
use eventgate::domain::{AccountId, InstanceName};
use eventgate::settings::{Loaded, Settings, SettingsError};
use eventgate::storage::StorageError;
use eventgate::{auth, lifecycle, storage, StartError};

/// Why a command failed; printed on stderr (and logged) before exit status 1.
#[derive(Debug, thiserror::Error)]
enum CommandError {
    #[error(transparent)]
    Settings(#[from] SettingsError),
    #[error(transparent)]
    Start(#[from] StartError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Create(#[from] storage::instances::CreateError),
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("cannot show the settings: {0}")]
    Render(#[from] toml::ser::Error),
    #[error("instance names are 1-64 of A-Z a-z 0-9 _ . - starting with a letter or digit")]
    BadInstanceName,
    #[error("no instance {name} in account {account}")]
    NoSuchInstance { name: String, account: i64 },
    #[error("no account {0} (see `eventgate account list`)")]
    NoSuchAccount(i64),
    #[error("an account name must not be empty")]
    EmptyAccountName,
}

fn main() {
    exit_now(run_command());
}

/// Ends the process with `code` once everything is written, without the C
/// library's exit handlers: libpq's OpenSSL registers one that frees its
/// state while connection-pool threads may still be closing TLS connections,
/// which can crash a process that had shut down cleanly.
#[allow(unsafe_code)] // The binary's one unsafe call.
fn exit_now(code: u8) -> ! {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: `_exit` only ends the process; every buffer we own was flushed above.
    unsafe { libc::_exit(i32::from(code)) }
}

fn run_command() -> u8 {
    let cli = Cli::parse();
    let config = cli.config_path();
    let loaded = match Loaded::from_process(config.as_deref()) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("eventgate: {e}");
            return 2;
        }
    };
    let settings = loaded.settings.clone();
    eventgate::logging::init(&settings.log.level);
    let command = cli.command.unwrap_or(Command::Serve);
    // The gateway's failures go to its log too (the journal); a command's
    // only to the terminal, once.
    let serving = matches!(command, Command::Serve);
    let outcome = match command {
        Command::Serve => serve(settings, config),
        Command::Migrate => eventgate::open_connection(&settings)
            .map(|_| println!("migrations applied"))
            .map_err(CommandError::from),
        Command::CheckConfig => loaded
            .report()
            .map(|text| print!("{text}"))
            .map_err(CommandError::from),
        Command::Account(cmd) => account(&settings, cmd),
        Command::Instance(cmd) => instance(&settings, cmd),
    };
    match outcome {
        Ok(()) => 0,
        Err(e) => {
            if serving {
                log::error!("{e}");
            }
            eprintln!("eventgate: {e}");
            1
        }
    }
}

/// Runs the gateway. Signal handlers are installed first, then the port is
/// bound: a SIGTERM at any moment of the start is a drain, never a kill.
fn serve(settings: Settings, config: Option<std::path::PathBuf>) -> Result<(), CommandError> {
    let addr = settings.bind_addr()?;
    actix_web::rt::System::new().block_on(async move {
        let signals = lifecycle::Signals::install().map_err(CommandError::Signals)?;
        let listener = std::net::TcpListener::bind(addr).map_err(|source| CommandError::Bind {
            addr: settings.server.bind.clone(),
            source,
        })?;
        eventgate::serve(settings, listener, config, signals).await?;
        Ok(())
    })
}

/// One connection is all a command needs.
fn connection(settings: &Settings) -> Result<storage::DbConn, CommandError> {
    Ok(eventgate::open_connection(settings)?)
}

fn account(settings: &Settings, cmd: AccountCommand) -> Result<(), CommandError> {
    let mut conn = connection(settings)?;
    match cmd {
        AccountCommand::Create { name } => {
            if name.trim().is_empty() {
                return Err(CommandError::EmptyAccountName);
            }
            let token = auth::generate_token();
            let id = storage::accounts::create(&mut conn, &name, &auth::token_hash(&token))?;
            println!(
                "account {} created (id {}). Its TokenAccount, shown only now:",
                name, id.0
            );
            println!("{token}");
        }
        AccountCommand::List => {
            for row in storage::accounts::list(&mut conn)? {
                println!("{}\t{}", row.id.0, row.name);
            }
        }
    }
    Ok(())
}

fn instance(settings: &Settings, cmd: InstanceCommand) -> Result<(), CommandError> {
    let mut conn = connection(settings)?;
    match cmd {
        InstanceCommand::Create { account, name } => {
            let name = InstanceName::parse(&name).ok_or(CommandError::BadInstanceName)?;
            if !storage::accounts::list(&mut conn)?
                .iter()
                .any(|a| a.id.0 == account)
            {
                return Err(CommandError::NoSuchAccount(account));
            }
            let token = auth::generate_token();
            let (rec, _) = storage::instances::create(
                &mut conn,
                AccountId(account),
                &name,
                &token,
                &auth::token_hash(&token),
                None,
                None,
            )?;
            println!(
                "instance {} created in account {account}. Its TokenInstance:",
                rec.name
            );
            println!("{}", rec.token);
        }
        InstanceCommand::List { account } => {
            let rows = match account {
                Some(a) => storage::instances::list(&mut conn, AccountId(a)),
                None => storage::instances::list_all(&mut conn),
            }?;
            for rec in rows {
                let ws = match &rec.config {
                    Some(c) if c.config.enabled => "enabled",
                    Some(_) => "disabled",
                    None => "unconfigured",
                };
                println!("{}\t{}\t{}", rec.account.0, rec.name, ws);
            }
        }
        InstanceCommand::Delete { account, name } => {
            match storage::instances::delete(&mut conn, AccountId(account), &name)? {
                Some(rec) => println!("instance {} deleted", rec.name),
                None => return Err(CommandError::NoSuchInstance { name, account }),
            }
        }
    }
    Ok(())
}
