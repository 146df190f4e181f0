//! The settings tree, declared once in the table below: each key's type,
//! built-in default, doc comment, environment names and masking. Layers:
//! built-in defaults ← an optional TOML file (`--config PATH` or
//! `EVENTGATE_CONFIG`) ← `EVENTGATE_<SECTION>__<KEY>` ← the contract's short
//! names (§10, e.g. `EVENTGATE_WS_CLIENT_BUFFER`), which win over the long
//! form of the same key. Empty environment values are ignored.
//!
//! Owns the keys, their defaults, loading and validation. Nothing here opens
//! sockets or files other than the settings file itself; every other module
//! receives a `Settings` (or a part of it) from `main`/`run`.
//!
//! # Adding a key
//!
//! One row in its section of the table below; the doc comment is required
//! (the macro refuses a row without one). A whole new section is a block
//! like the others, `[name] NameSettings { rows }`, and becomes
//! `settings.name`:
//!
//! ```text
//!     /// Durable delivery to HTTP receivers (contract §11).
//!     [webhook] WebhookSettings {
//!         /// Seconds a receiver has to answer.
//!         timeout_secs: u64 = 10, env "EVENTGATE_WEBHOOK_TIMEOUT_SECS";
//!         /// Seconds between attempts.
//!         retry_schedule_secs: Vec<u64> = vec![5, 300], env "EVENTGATE_WEBHOOK_RETRY_SCHEDULE_SECS";
//!         /// Key of secrets at rest; empty = none.
//!         encryption_key: String = String::new(), env "EVENTGATE_ENCRYPTION_KEY", mask Secret;
//!     }
//! ```
//!
//! - `name: Type = default;` is the field `settings.<section>.<name>` and its
//!   built-in default (any expression). The type implements [`FromEnv`]:
//!   `String`, `PathBuf`, `bool`, integers, `f64`, or a `Vec` of those
//!   (comma-separated in the environment). "None" is `""` or `0`, as for the
//!   other keys (TOML has no null), not an `Option`.
//! - With nothing more, the key is read from the file, settable as
//!   `EVENTGATE_<SECTION>__<NAME>` (`EVENTGATE_WEBHOOK__TIMEOUT_SECS`), and
//!   shown by `check-config` with its source.
//! - `, env "EVENTGATE_…"` adds the contract's short name; it wins over the
//!   long name. Only for names the contract (§10) lists.
//! - `, mask Secret` hides a secret in `check-config` (`********`),
//!   `, mask UrlPassword` the password of a URL. `env` comes before `mask`.
//! - Then add the key with its default and a comment (with `Env:` and the
//!   short name, if any) to `config/eventgate.toml`; the unit test
//!   `shipped_file_lists_every_key_with_its_default` fails until it is there.
//!   A check of the value that can fail goes in [`Settings::validate`]; such a
//!   key also needs a valid sample in `sample()` of `tests/configuration.rs`.

mod load;
mod table;

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use load::{check_env_names, Loaded, SettingsError, Source};
use table::settings_table;
pub use table::{FromEnv, Key, Mask, Maskable};

settings_table! {
    /// HTTP listener and process-wide behaviour.
    [server] ServerSettings {
        /// Listen address.
        bind: String = "127.0.0.1:8080".into(), env "EVENTGATE_BIND";
        /// `instanceData.baseUrl` in envelopes; empty = `http://<bind>`.
        public_base_url: String = String::new(), env "EVENTGATE_PUBLIC_BASE_URL";
        /// Directory holding the default SQLite file.
        data_dir: PathBuf = PathBuf::from("data"), env "EVENTGATE_DATA_DIR";
        /// HTTP worker threads (each a single-threaded runtime).
        workers: usize = 1, env "EVENTGATE_WORKERS";
        /// Threads that instance actors are spread over; 0 = each instance's
        /// actor runs on the HTTP worker thread that first needs it.
        instance_arbiters: usize = 2, env "EVENTGATE_INSTANCE_ARBITERS";
        /// Whether an instance's fan-out writes a session's frames to its
        /// socket itself while nothing of that session's waits to be written
        /// and the node is quiet (less CPU per delivery at low and moderate
        /// rates; BENCHMARKS.md, "Direct writes"); false = always through
        /// the session's mailbox.
        direct_writes: bool = true, env "EVENTGATE_DIRECT_WRITES";
        /// Seconds a graceful shutdown may take before the process exits anyway.
        shutdown_drain_secs: u64 = 10, env "EVENTGATE_SHUTDOWN_DRAIN_SECS";
        /// Seconds an idle HTTP keep-alive connection is kept open.
        keep_alive_secs: u64 = 30;
        /// Seconds a client has to send its complete request head.
        client_request_timeout_secs: u64 = 5;
    }

    /// Where data is stored.
    [storage] StorageSettings {
        /// A SQLite path or `sqlite://` URL, or `postgres://…`.
        /// Empty = `<data_dir>/eventgate.sqlite3`.
        database_url: String = String::new(), env "EVENTGATE_DATABASE_URL", mask UrlPassword;
        /// Maximum pooled connections (SQLite uses at most 4 whatever is set).
        pool_size: u32 = 8;
        /// Seconds to wait for a database connection before failing.
        connect_timeout_secs: u64 = 5;
    }

    /// Accounts provisioned at start-up.
    [auth] AuthSettings {
        /// Ensures an account with this TokenAccount exists. Secret.
        account_token: String = String::new(), env "EVENTGATE_ACCOUNT_TOKEN", mask Secret;
    }

    /// Logging.
    [log] LogSettings {
        /// Filter in `RUST_LOG` syntax (`RUST_LOG` wins when set).
        level: String = "info".into(), env "EVENTGATE_LOG";
    }

    /// WebSocket sessions.
    [ws] WsSettings {
        /// Browser Origin allowlist; `*` allows all (comma-separated in the environment).
        allowed_origins: Vec<String> = vec!["*".into()], env "EVENTGATE_WS_ALLOWED_ORIGINS";
        /// Seconds between server pings.
        ping_interval_secs: u64 = 20, env "EVENTGATE_WS_PING_INTERVAL_SECS";
        /// Seconds of client silence before closing with 4001.
        idle_timeout_secs: u64 = 60, env "EVENTGATE_WS_IDLE_TIMEOUT_SECS";
        /// Messages queued per client before it is a slow consumer.
        client_buffer: usize = 256, env "EVENTGATE_WS_CLIENT_BUFFER";
        /// Bytes of frames queued per client before it is a slow consumer.
        client_buffer_bytes: usize = 4 * 1024 * 1024, env "EVENTGATE_WS_CLIENT_BUFFER_BYTES";
        /// Largest client message, fragments counted together; larger closes with 1009.
        max_message_bytes: usize = 64 * 1024;
        /// Seconds sent data may stay unacknowledged before the kernel drops the socket (`TCP_USER_TIMEOUT`).
        tcp_user_timeout_secs: u64 = 10;
        /// Recovery on reconnect (contract §12): events kept per instance; 0 = no history.
        history_size: usize = 0, env "EVENTGATE_WS_HISTORY_SIZE";
        /// Seconds an event stays in the history.
        history_ttl_secs: u64 = 300, env "EVENTGATE_WS_HISTORY_TTL_SECS";
        /// Bytes of envelopes (as published, media kept) one instance's history holds.
        history_bytes: usize = 4 * 1024 * 1024, env "EVENTGATE_WS_HISTORY_BYTES";
    }

    /// Fixed-window request limits (contract §4). Zero disables a bucket.
    [rate_limit] RateLimitSettings {
        /// Every `/api/*` request and `/ws` upgrade, per token or IP.
        per_minute: u32 = 100, env "EVENTGATE_RATE_LIMIT_PER_MINUTE";
        /// `POST /api/instance/new`, its own bucket.
        instance_new_per_minute: u32 = 20, env "EVENTGATE_RATE_LIMIT_INSTANCE_NEW_PER_MINUTE";
        /// `POST /api/events/publish/:instance`; 0 = not limited (the default).
        publish_per_minute: u32 = 0;
        /// `/ws` upgrade attempts per client IP, whatever the token; 0 = not limited.
        upgrades_per_ip_per_minute: u32 = 0;
    }

    /// Sizes of what clients may send.
    [limits] LimitSettings {
        /// Largest request body on every endpoint but publish, in bytes.
        body_bytes: usize = 1024 * 1024;
        /// Largest publish body, in bytes.
        publish_body_bytes: usize = 16 * 1024 * 1024;
        /// Most events in one publish request (at most 1048576: a publish's
        /// events are numbered in 20 bits of their shared-history offsets).
        publish_batch: usize = 1000;
        /// Publish requests waiting for one instance's fan-out from which the
        /// next publisher is answered only once its events are fanned out
        /// (with `publish_lag` below it, this bound applies to events from
        /// other nodes, or when `publish_lag` is 0).
        publish_queue: usize = 1024;
        /// Publishes a session may have waiting (less those waiting for the
        /// instance's fan-out, at least one), while its client takes all
        /// it is sent, before this node counts as behind with it; when most
        /// of an instance's sessions are, its publishers wait for them. Also
        /// the publishes waiting for an instance's fan-out from which the
        /// next local publisher waits for its own. 0 = never.
        publish_lag: usize = 6;
        /// WebSocket clients on this node; 0 = unlimited (503 over it).
        max_connections: usize = 0, env "EVENTGATE_MAX_CONNECTIONS";
        /// WebSocket clients of one account on this node; 0 = unlimited (429 over it).
        max_connections_per_account: usize = 0;
        /// WebSocket clients of one instance on this node; 0 = unlimited (429 over it).
        max_connections_per_instance: usize = 0;
    }

    /// Several nodes sharing PostgreSQL and NATS.
    [cluster] ClusterSettings {
        /// NATS server URL; set = cluster mode.
        nats_url: String = String::new(), env "EVENTGATE_NATS_URL", mask UrlPassword;
        /// Prefix of every NATS subject this cluster uses.
        subject_prefix: String = "eventgate".into();
        /// Seconds between re-reads of running instances' settings from the
        /// database (a safety net behind NATS invalidation and offline changes).
        refresh_secs: u64 = 30;
    }

    /// Durable delivery to HTTP receivers (contract §11).
    [webhook] WebhookSettings {
        /// Seconds an attempt may take: connecting, sending, status and headers.
        timeout_secs: u64 = 10, env "EVENTGATE_WEBHOOK_TIMEOUT_SECS";
        /// Seconds between attempts: one retry after each (empty = one attempt, no retry).
        retry_schedule_secs: Vec<u64> = vec![5, 300, 1800, 7200, 18000, 36000, 36000], env "EVENTGATE_WEBHOOK_RETRY_SCHEDULE_SECS";
        /// Deliveries of one webhook in flight at once on this node.
        max_in_flight: usize = 8, env "EVENTGATE_WEBHOOK_MAX_IN_FLIGHT";
        /// Pending deliveries per webhook past which new ones become dead letters `backlog full`.
        max_pending: u64 = 100_000, env "EVENTGATE_WEBHOOK_MAX_PENDING";
        /// Hours dead letters are kept.
        dead_letter_hours: u64 = 168, env "EVENTGATE_WEBHOOK_DEAD_LETTER_HOURS";
        /// CIDRs deliveries may connect to despite the refused-address rule (comma-separated in the environment).
        allowed_networks: Vec<String> = Vec::new(), env "EVENTGATE_WEBHOOK_ALLOWED_NETWORKS";
        /// Base64 of 32 bytes; set = secrets and `authorization` stored encrypted. Secret.
        encryption_key: String = String::new(), env "EVENTGATE_ENCRYPTION_KEY", mask Secret;
        /// Whether this node runs delivery workers; false = it only stores
        /// deliveries, which other nodes deliver (an API-only node).
        deliver: bool = true;
    }
}

impl Settings {
    /// Checks values that parse but cannot work, naming the key.
    pub fn validate(&self) -> Result<(), SettingsError> {
        fn invalid(key: &'static str, message: impl Into<String>) -> SettingsError {
            SettingsError::Invalid {
                key,
                origin: None,
                message: message.into(),
            }
        }
        if self.server.bind.parse::<SocketAddr>().is_err() {
            return Err(invalid(
                "server.bind",
                format!("`{}` is not an address:port", self.server.bind),
            ));
        }
        if let Some(message) = database_url_problem(&self.storage.database_url) {
            return Err(invalid("storage.database_url", message));
        }
        let base = &self.server.public_base_url;
        if !(base.is_empty() || base.starts_with("http://") || base.starts_with("https://")) {
            return Err(invalid(
                "server.public_base_url",
                "must start with http:// or https://",
            ));
        }
        let positive: [(&'static str, u64); 12] = [
            ("server.workers", self.server.workers as u64),
            ("storage.pool_size", u64::from(self.storage.pool_size)),
            (
                "storage.connect_timeout_secs",
                self.storage.connect_timeout_secs,
            ),
            ("ws.ping_interval_secs", self.ws.ping_interval_secs),
            ("ws.client_buffer", self.ws.client_buffer as u64),
            ("ws.client_buffer_bytes", self.ws.client_buffer_bytes as u64),
            ("ws.max_message_bytes", self.ws.max_message_bytes as u64),
            ("ws.history_ttl_secs", self.ws.history_ttl_secs),
            ("ws.history_bytes", self.ws.history_bytes as u64),
            ("limits.publish_batch", self.limits.publish_batch as u64),
            ("limits.publish_queue", self.limits.publish_queue as u64),
            ("cluster.refresh_secs", self.cluster.refresh_secs),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(invalid(key, "must be greater than 0"));
            }
        }
        // A publish's events are numbered within its shared-history message
        // in the low bits of their offsets.
        let most_events = 1usize << crate::instance::shared_history::OFFSET_BITS;
        if self.limits.publish_batch > most_events {
            return Err(invalid(
                "limits.publish_batch",
                format!("must be at most {most_events}"),
            ));
        }
        if self.ws.idle_timeout_secs <= self.ws.ping_interval_secs {
            return Err(invalid(
                "ws.idle_timeout_secs",
                "must be greater than ws.ping_interval_secs",
            ));
        }
        if self.ws.allowed_origins.is_empty() {
            return Err(invalid(
                "ws.allowed_origins",
                "must list at least one origin (or \"*\")",
            ));
        }
        if self.limits.body_bytes < 1024 {
            return Err(invalid("limits.body_bytes", "must be at least 1024"));
        }
        if self.limits.publish_body_bytes < 1024 {
            return Err(invalid(
                "limits.publish_body_bytes",
                "must be at least 1024",
            ));
        }
        if self.auth.account_token == MASK {
            return Err(invalid(
                "auth.account_token",
                "is the mask `check-config` prints in place of a secret, not a token: put the real one back",
            ));
        }
        if self.log.level.trim().is_empty() {
            return Err(invalid("log.level", "must not be empty"));
        }
        if let Some(message) = log_filter_problem(&self.log.level) {
            return Err(invalid("log.level", message));
        }
        let url = &self.cluster.nats_url;
        if !url.is_empty() && !url.starts_with("nats://") {
            return Err(invalid("cluster.nats_url", "must start with nats://"));
        }
        let prefix = &self.cluster.subject_prefix;
        if prefix.is_empty()
            || !prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
            || prefix.starts_with('.')
            || prefix.ends_with('.')
        {
            return Err(invalid(
                "cluster.subject_prefix",
                "must be a NATS subject token: A-Z a-z 0-9 _ - . (not at the ends)",
            ));
        }
        crate::webhook::validate_settings(&self.webhook)
            .map_err(|(key, message)| invalid(key, message))?;
        Ok(())
    }

    /// The listen address (validated).
    pub fn bind_addr(&self) -> Result<SocketAddr, SettingsError> {
        self.server
            .bind
            .parse()
            .map_err(|_| SettingsError::Invalid {
                key: "server.bind",
                origin: None,
                message: format!("`{}` is not an address:port", self.server.bind),
            })
    }

    /// The database URL in effect: the configured one, or the default SQLite file.
    pub fn database_url(&self) -> String {
        if self.storage.database_url.is_empty() {
            self.server
                .data_dir
                .join("eventgate.sqlite3")
                .to_string_lossy()
                .into_owned()
        } else {
            self.storage.database_url.clone()
        }
    }
}

/// Why a log filter (`level`, `target=level`, `target`, comma-separated,
/// as env_logger reads them; a `/regex` after them is env_logger's) would
/// not do what it says: env_logger only warns and drops what it cannot read.
fn log_filter_problem(filter: &str) -> Option<String> {
    let is_target = |t: &str| {
        !t.is_empty()
            && t.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':' || c == '-')
    };
    let is_level = |l: &str| l.parse::<log::LevelFilter>().is_ok();
    let directives = filter.split('/').next().unwrap_or_default();
    directives
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .find(|d| match d.split_once('=') {
            Some((target, level)) => !is_target(target.trim()) || !is_level(level.trim()),
            None => !is_level(d) && !is_target(d),
        })
        .map(|d| format!("`{d}` is not a level (off, error, warn, info, debug, trace), a target or target=level"))
}

/// Why a database URL cannot be used: a scheme other than `sqlite://`,
/// `postgres://` or `postgresql://` (it would otherwise be taken for a
/// SQLite file named after the whole text), or one of those without `//`.
fn database_url_problem(url: &str) -> Option<String> {
    const KNOWN: [&str; 3] = ["sqlite://", "postgres://", "postgresql://"];
    const HELP: &str = "must be a file path, sqlite://PATH or postgres://…";
    if KNOWN.iter().any(|k| url.starts_with(k)) {
        return None;
    }
    let scheme_like = url.split_once(':').is_some_and(|(scheme, _)| {
        scheme
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic())
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+.-".contains(c))
    });
    // `sqlite:/path`, `postgres:db`: a known scheme without its `//`.
    let named = KNOWN
        .iter()
        .any(|k| url.starts_with(k.trim_end_matches('/')));
    (scheme_like && (url.contains("://") || named))
        .then(|| format!("`{}`: {HELP}", mask_url_password(url)))
}

/// What replaces a secret when settings are printed.
pub const MASK: &str = "********";

/// Replaces the password (and a lone user token) of `scheme://user:pass@host` with the mask.
pub fn mask_url_password(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let rest = &url[scheme_end + 3..];
    let Some(at) = rest.find('@') else {
        return url.to_string();
    };
    let userinfo = &rest[..at];
    let masked = match userinfo.find(':') {
        Some(colon) => format!("{}:{MASK}", &userinfo[..colon]),
        None => MASK.to_string(),
    };
    format!("{}://{}@{}", &url[..scheme_end], masked, &rest[at + 1..])
}

/// Splits a comma-separated list, trimming its items; an empty (or blank)
/// value is the empty list, and an empty item in a list (`5,,5`, `5,`) is
/// an error, not an item dropped.
pub fn split_list(value: &str) -> Result<Vec<String>, String> {
    if value.trim().is_empty() {
        return Ok(Vec::new());
    }
    value
        .split(',')
        .map(str::trim)
        .map(|item| {
            if item.is_empty() {
                Err("a comma-separated list with an empty item".to_string())
            } else {
                Ok(item.to_string())
            }
        })
        .collect()
}

#[cfg(test)]
mod tests;
