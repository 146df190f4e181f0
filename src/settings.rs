//! The settings tree: built-in defaults, overridden by an optional TOML file,
//! overridden by `EVENTGATE_*` environment variables (contract §10).
//!
//! Owns loading and validation only. Nothing here opens sockets or files other
//! than the settings file itself; every other module receives a `Settings`
//! (or a part of it) from `main`/`run`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Errors found while loading settings. Each names the key or variable at fault.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("cannot read settings file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("settings file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("environment variable {var}: {message}")]
    Env { var: &'static str, message: String },
    #[error("setting `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
}

/// The whole settings tree. Every field has a default; see `config/eventgate.toml`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    pub server: ServerSettings,
    pub storage: StorageSettings,
    pub auth: AuthSettings,
    pub log: LogSettings,
    pub ws: WsSettings,
    pub rate_limit: RateLimitSettings,
    pub limits: LimitSettings,
    pub cluster: ClusterSettings,
}

/// HTTP listener and process-wide behaviour.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSettings {
    /// Listen address (`EVENTGATE_BIND`).
    pub bind: String,
    /// `instanceData.baseUrl` in envelopes (`EVENTGATE_PUBLIC_BASE_URL`); empty = `http://<bind>`.
    pub public_base_url: String,
    /// Directory holding the default SQLite file.
    pub data_dir: PathBuf,
    /// HTTP worker threads (each a single-threaded runtime).
    pub workers: usize,
    /// Threads that instance actors are spread over; 0 = each instance's
    /// actor runs on the HTTP worker thread that first needs it.
    pub instance_arbiters: usize,
    /// Seconds a graceful shutdown may take before the process exits anyway.
    pub shutdown_drain_secs: u64,
    /// Seconds an idle HTTP keep-alive connection is kept open.
    pub keep_alive_secs: u64,
    /// Seconds a client has to send its complete request head.
    pub client_request_timeout_secs: u64,
}

/// Where data is stored.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StorageSettings {
    /// A SQLite path or `sqlite://` URL, or `postgres://…` (`EVENTGATE_DATABASE_URL`).
    /// Empty = `<data_dir>/eventgate.sqlite3`.
    pub database_url: String,
    /// Maximum pooled connections (SQLite uses at most 4 whatever is set).
    pub pool_size: u32,
    /// Seconds to wait for a database connection before failing.
    pub connect_timeout_secs: u64,
}

/// Accounts provisioned at start-up.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSettings {
    /// Ensures an account with this TokenAccount exists (`EVENTGATE_ACCOUNT_TOKEN`). Secret.
    pub account_token: String,
}

/// Logging.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    /// Filter in `RUST_LOG` syntax (`EVENTGATE_LOG`; `RUST_LOG` wins when set).
    pub level: String,
}

/// WebSocket sessions.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WsSettings {
    /// Browser Origin allowlist; `*` allows all (`EVENTGATE_WS_ALLOWED_ORIGINS`, comma-separated).
    pub allowed_origins: Vec<String>,
    /// Seconds between server pings (`EVENTGATE_WS_PING_INTERVAL_SECS`).
    pub ping_interval_secs: u64,
    /// Seconds of client silence before closing with 4001 (`EVENTGATE_WS_IDLE_TIMEOUT_SECS`).
    pub idle_timeout_secs: u64,
    /// Messages queued per client before it is a slow consumer (`EVENTGATE_WS_CLIENT_BUFFER`).
    pub client_buffer: usize,
    /// Bytes of frames queued per client before it is a slow consumer (`EVENTGATE_WS_CLIENT_BUFFER_BYTES`).
    pub client_buffer_bytes: usize,
    /// Largest client message, fragments counted together; larger closes with 1009.
    pub max_message_bytes: usize,
    /// Seconds sent data may stay unacknowledged before the kernel drops the socket (`TCP_USER_TIMEOUT`).
    pub tcp_user_timeout_secs: u64,
    /// Recovery on reconnect (contract §12): events kept per instance; 0 = no history (`EVENTGATE_WS_HISTORY_SIZE`).
    pub history_size: usize,
    /// Seconds an event stays in the history (`EVENTGATE_WS_HISTORY_TTL_SECS`).
    pub history_ttl_secs: u64,
    /// Bytes of envelopes (as published, media kept) one instance's history holds (`EVENTGATE_WS_HISTORY_BYTES`).
    pub history_bytes: usize,
}

/// Fixed-window request limits (contract §4). Zero disables a bucket.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitSettings {
    /// Every `/api/*` request and `/ws` upgrade, per token or IP (`EVENTGATE_RATE_LIMIT_PER_MINUTE`).
    pub per_minute: u32,
    /// `POST /api/instance/new`, its own bucket (`EVENTGATE_RATE_LIMIT_INSTANCE_NEW_PER_MINUTE`).
    pub instance_new_per_minute: u32,
    /// `POST /api/events/publish/:instance`; 0 = not limited (the default).
    pub publish_per_minute: u32,
    /// `/ws` upgrade attempts per client IP, whatever the token; 0 = not limited.
    pub upgrades_per_ip_per_minute: u32,
}

/// Sizes of what clients may send.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitSettings {
    /// Largest request body on every endpoint but publish, in bytes.
    pub body_bytes: usize,
    /// Largest publish body, in bytes.
    pub publish_body_bytes: usize,
    /// Most events in one publish request.
    pub publish_batch: usize,
    /// Publish requests waiting for one instance's fan-out past which the
    /// next publisher is answered only once its events are fanned out.
    pub publish_queue: usize,
    /// WebSocket clients on this node; 0 = unlimited (503 over it).
    pub max_connections: usize,
    /// WebSocket clients of one account on this node; 0 = unlimited (429 over it).
    pub max_connections_per_account: usize,
    /// WebSocket clients of one instance on this node; 0 = unlimited (429 over it).
    pub max_connections_per_instance: usize,
}

/// Several nodes sharing PostgreSQL and NATS.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterSettings {
    /// NATS server URL; set = cluster mode (`EVENTGATE_NATS_URL`).
    pub nats_url: String,
    /// Prefix of every NATS subject this cluster uses.
    pub subject_prefix: String,
    /// Seconds between re-reads of running instances' settings from the
    /// database (a safety net behind NATS invalidation and offline changes).
    pub refresh_secs: u64,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            bind: "127.0.0.1:8080".into(),
            public_base_url: String::new(),
            data_dir: PathBuf::from("data"),
            workers: 1,
            instance_arbiters: 2,
            shutdown_drain_secs: 10,
            keep_alive_secs: 30,
            client_request_timeout_secs: 5,
        }
    }
}

impl Default for StorageSettings {
    fn default() -> Self {
        Self {
            database_url: String::new(),
            pool_size: 8,
            connect_timeout_secs: 5,
        }
    }
}

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            level: "info".into(),
        }
    }
}

impl Default for WsSettings {
    fn default() -> Self {
        Self {
            allowed_origins: vec!["*".into()],
            ping_interval_secs: 20,
            idle_timeout_secs: 60,
            client_buffer: 256,
            client_buffer_bytes: 4 * 1024 * 1024,
            max_message_bytes: 64 * 1024,
            tcp_user_timeout_secs: 10,
            history_size: 0,
            history_ttl_secs: 300,
            history_bytes: 4 * 1024 * 1024,
        }
    }
}

impl Default for RateLimitSettings {
    fn default() -> Self {
        Self {
            per_minute: 100,
            instance_new_per_minute: 20,
            publish_per_minute: 0,
            upgrades_per_ip_per_minute: 0,
        }
    }
}

impl Default for LimitSettings {
    fn default() -> Self {
        Self {
            body_bytes: 1024 * 1024,
            publish_body_bytes: 16 * 1024 * 1024,
            publish_batch: 1000,
            publish_queue: 1024,
            max_connections: 0,
            max_connections_per_account: 0,
            max_connections_per_instance: 0,
        }
    }
}

impl Default for ClusterSettings {
    fn default() -> Self {
        Self {
            nats_url: String::new(),
            subject_prefix: "eventgate".into(),
            refresh_secs: 30,
        }
    }
}

/// Parses an environment value into `T`, naming the variable on failure.
fn parse_env<T: std::str::FromStr>(var: &'static str, value: &str) -> Result<T, SettingsError>
where
    T::Err: std::fmt::Display,
{
    value
        .trim()
        .parse()
        .map_err(|e: T::Err| SettingsError::Env {
            var,
            message: format!("`{value}` is not valid: {e}"),
        })
}

impl Settings {
    /// Loads defaults ← `file` (when given) ← environment, then validates.
    /// `env` returns a variable's value; `std::env::var(..).ok()` in production.
    pub fn load(
        file: Option<&Path>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, SettingsError> {
        let mut settings = match file {
            Some(path) => Self::from_file(path)?,
            None => Self::default(),
        };
        settings.apply_env(env)?;
        settings.validate()?;
        Ok(settings)
    }

    /// Reads one TOML file over the defaults; unknown keys are errors.
    pub fn from_file(path: &Path) -> Result<Self, SettingsError> {
        let text = std::fs::read_to_string(path).map_err(|source| SettingsError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(&text).map_err(|message| SettingsError::Parse {
            path: path.to_path_buf(),
            message,
        })
    }

    /// Parses TOML text over the defaults.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim().replace('\n', " "))
    }

    /// Applies the `EVENTGATE_*` variables of contract §10 (and the few more listed in the README).
    pub fn apply_env(&mut self, env: &dyn Fn(&str) -> Option<String>) -> Result<(), SettingsError> {
        let get = |var: &str| env(var).filter(|v| !v.trim().is_empty());
        if let Some(v) = get("EVENTGATE_BIND") {
            self.server.bind = v.trim().to_string();
        }
        if let Some(v) = get("EVENTGATE_DATABASE_URL") {
            self.storage.database_url = v.trim().to_string();
        }
        if let Some(v) = get("EVENTGATE_DATA_DIR") {
            self.server.data_dir = PathBuf::from(v.trim());
        }
        if let Some(v) = get("EVENTGATE_PUBLIC_BASE_URL") {
            self.server.public_base_url = v.trim().to_string();
        }
        if let Some(v) = get("EVENTGATE_ACCOUNT_TOKEN") {
            self.auth.account_token = v.trim().to_string();
        }
        if let Some(v) = get("EVENTGATE_NATS_URL") {
            self.cluster.nats_url = v.trim().to_string();
        }
        if let Some(v) = get("EVENTGATE_LOG") {
            self.log.level = v.trim().to_string();
        }
        if let Some(v) = get("EVENTGATE_WS_ALLOWED_ORIGINS") {
            self.ws.allowed_origins = split_list(&v);
        }
        macro_rules! numeric {
            ($($var:literal => $field:expr),* $(,)?) => {$(
                if let Some(v) = get($var) {
                    $field = parse_env($var, &v)?;
                }
            )*};
        }
        numeric! {
            "EVENTGATE_WORKERS" => self.server.workers,
            "EVENTGATE_INSTANCE_ARBITERS" => self.server.instance_arbiters,
            "EVENTGATE_SHUTDOWN_DRAIN_SECS" => self.server.shutdown_drain_secs,
            "EVENTGATE_WS_PING_INTERVAL_SECS" => self.ws.ping_interval_secs,
            "EVENTGATE_WS_IDLE_TIMEOUT_SECS" => self.ws.idle_timeout_secs,
            "EVENTGATE_WS_CLIENT_BUFFER" => self.ws.client_buffer,
            "EVENTGATE_WS_CLIENT_BUFFER_BYTES" => self.ws.client_buffer_bytes,
            "EVENTGATE_WS_HISTORY_SIZE" => self.ws.history_size,
            "EVENTGATE_WS_HISTORY_TTL_SECS" => self.ws.history_ttl_secs,
            "EVENTGATE_WS_HISTORY_BYTES" => self.ws.history_bytes,
            "EVENTGATE_RATE_LIMIT_PER_MINUTE" => self.rate_limit.per_minute,
            "EVENTGATE_RATE_LIMIT_INSTANCE_NEW_PER_MINUTE" => self.rate_limit.instance_new_per_minute,
            "EVENTGATE_MAX_CONNECTIONS" => self.limits.max_connections,
        }
        Ok(())
    }

    /// Checks values that parse but cannot work, naming the key.
    pub fn validate(&self) -> Result<(), SettingsError> {
        fn invalid(key: &'static str, message: impl Into<String>) -> SettingsError {
            SettingsError::Invalid {
                key,
                message: message.into(),
            }
        }
        if self.server.bind.parse::<SocketAddr>().is_err() {
            return Err(invalid(
                "server.bind",
                format!("`{}` is not an address:port", self.server.bind),
            ));
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
        if self.limits.body_bytes < 1024 || self.limits.publish_body_bytes < 1024 {
            return Err(invalid("limits.body_bytes", "must be at least 1024"));
        }
        if self.log.level.trim().is_empty() {
            return Err(invalid("log.level", "must not be empty"));
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
        Ok(())
    }

    /// The listen address (validated).
    pub fn bind_addr(&self) -> Result<SocketAddr, SettingsError> {
        self.server
            .bind
            .parse()
            .map_err(|_| SettingsError::Invalid {
                key: "server.bind",
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

    /// A copy safe to print: secrets and URL passwords replaced by `********`.
    pub fn masked(&self) -> Settings {
        let mut copy = self.clone();
        if !copy.auth.account_token.is_empty() {
            copy.auth.account_token = MASK.into();
        }
        copy.storage.database_url = mask_url_password(&copy.storage.database_url);
        copy.cluster.nats_url = mask_url_password(&copy.cluster.nats_url);
        copy
    }
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

/// Splits a comma-separated list, trimming and dropping empty items.
pub fn split_list(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_file_equals_defaults() {
        let text = include_str!("../config/eventgate.toml");
        assert_eq!(Settings::from_toml(text).unwrap(), Settings::default());
    }

    #[test]
    fn shipped_cluster_example_is_valid() {
        let text = include_str!("../config/eventgate.cluster.toml");
        let s = Settings::from_toml(text).unwrap();
        s.validate().unwrap();
        assert_eq!(s.cluster.nats_url, "nats://nats.internal:4222");
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Settings::from_toml("[ws]\nping_interval = 3\n").unwrap_err();
        assert!(err.contains("ping_interval"), "{err}");
    }

    #[test]
    fn invalid_value_is_named() {
        let err = Settings::from_toml("[ws]\nclient_buffer = \"many\"\n").unwrap_err();
        assert!(err.contains("client_buffer"), "{err}");
        let mut s = Settings::default();
        s.ws.idle_timeout_secs = 5;
        s.ws.ping_interval_secs = 10;
        assert!(s
            .validate()
            .unwrap_err()
            .to_string()
            .contains("ws.idle_timeout_secs"));
    }

    #[test]
    fn env_overrides_and_names_bad_variable() {
        let env = |k: &str| match k {
            "EVENTGATE_WS_CLIENT_BUFFER" => Some("12".to_string()),
            "EVENTGATE_WS_ALLOWED_ORIGINS" => Some("https://a.example, https://b.example".into()),
            _ => None,
        };
        let s = Settings::load(None, &env).unwrap();
        assert_eq!(s.ws.client_buffer, 12);
        assert_eq!(
            s.ws.allowed_origins,
            vec!["https://a.example", "https://b.example"]
        );
        let bad = |k: &str| (k == "EVENTGATE_WS_PING_INTERVAL_SECS").then(|| "soon".to_string());
        let err = Settings::load(None, &bad).unwrap_err().to_string();
        assert!(err.contains("EVENTGATE_WS_PING_INTERVAL_SECS"), "{err}");
    }

    #[test]
    fn masks_secrets() {
        let mut s = Settings::default();
        s.auth.account_token = "secret-token-value".into();
        s.storage.database_url = "postgres://user:pw@db/x".into();
        let m = s.masked();
        assert_eq!(m.auth.account_token, MASK);
        assert_eq!(m.storage.database_url, "postgres://user:********@db/x");
    }
}
