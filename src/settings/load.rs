//! Loading the settings tree in layers, remembering where each key's value
//! came from: built-in defaults ← the TOML file ← `EVENTGATE_<SECTION>__<KEY>`
//! ← the contract's short names (§10). Also what `check-config` prints.
//!
//! Owns reading the settings file and the `EVENTGATE_*` variables. Knows no
//! key by name: every key comes from [`KEYS`].

use std::fmt;
use std::path::{Path, PathBuf};

use super::{Mask, Settings, KEYS, MASK};

/// Errors found while loading settings. Each names the key or variable at fault.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// The settings file cannot be read.
    #[error("cannot read settings file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The settings file is not valid TOML, has an unknown key or a value of
    /// the wrong type; the message names the key and its line.
    #[error("settings file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// An environment variable's value does not parse as its key's type.
    #[error("environment variable {var} (setting `{key}`): `{value}` is not valid: {message}")]
    Env {
        var: String,
        key: &'static str,
        value: String,
        message: String,
    },
    /// An `EVENTGATE_<SECTION>__<KEY>` variable that names no key.
    #[error("environment variable {var} names no setting (keys are listed in config/eventgate.toml; `ws.client_buffer` is EVENTGATE_WS__CLIENT_BUFFER)")]
    UnknownEnv { var: String },
    /// A value that parses but cannot work.
    #[error("setting `{key}`{}: {message}", .origin.as_ref().map(|o| format!(" (from {o})")).unwrap_or_default())]
    Invalid {
        key: &'static str,
        /// Where the offending value came from, when it was not the default.
        origin: Option<Source>,
        message: String,
    },
}

/// Where a key's value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The built-in default of the table.
    Default,
    /// The settings file at this path.
    File(PathBuf),
    /// This environment variable.
    Env(String),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Default => f.write_str("default"),
            Source::File(path) => write!(f, "file {}", path.display()),
            Source::Env(var) => f.write_str(var),
        }
    }
}

/// Settings together with where each key's value came from.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The settings in effect.
    pub settings: Settings,
    /// One per [`KEYS`] entry, in the same order.
    sources: Vec<Source>,
}

impl Loaded {
    /// Where the value of `path` (e.g. `ws.client_buffer`) came from.
    pub fn source(&self, path: &str) -> Option<&Source> {
        KEYS.iter()
            .position(|k| k.path == path)
            .and_then(|i| self.sources.get(i))
    }

    /// Loads from the settings file (when given) and this process's
    /// environment; an `EVENTGATE_<SECTION>__<KEY>` variable naming no key
    /// is an error.
    pub fn from_process(file: Option<&Path>) -> Result<Loaded, SettingsError> {
        check_env_names(std::env::vars_os().filter_map(|(name, _)| name.into_string().ok()))?;
        Settings::load_traced(file, &|var| std::env::var(var).ok())
    }

    /// What `check-config` prints: every key with its value (secrets masked)
    /// and, in a comment, where the value came from. The text is TOML that
    /// `Settings::from_toml` reads back.
    pub fn report(&self) -> Result<String, toml::ser::Error> {
        let tree = toml::Table::try_from(self.settings.masked())?;
        let mut out = String::from(
            "# The settings in effect, secrets masked. After each key: where its value\n\
             # came from (default, file PATH, or the environment variable).\n\
             # Order: defaults <- file <- EVENTGATE_<SECTION>__<KEY> <- short names.\n",
        );
        let mut section = "";
        for (key, source) in KEYS.iter().zip(&self.sources) {
            if key.section != section {
                section = key.section;
                out.push_str(&format!("\n[{section}]\n"));
            }
            match tree.get(key.section).and_then(|s| s.get(key.field)) {
                Some(value) => out.push_str(&format!("{} = {value} # {source}\n", key.field)),
                None => out.push_str(&format!("# {} is unset # {source}\n", key.field)),
            }
        }
        Ok(out)
    }
}

/// Refuses `EVENTGATE_*__*` variables among `names` that name no key (a typo
/// would otherwise be ignored). Other `EVENTGATE_*` names are not settings'.
pub fn check_env_names(names: impl IntoIterator<Item = String>) -> Result<(), SettingsError> {
    for var in names {
        if var.starts_with("EVENTGATE_")
            && var.contains("__")
            && !KEYS.iter().any(|k| k.env_var() == var)
        {
            return Err(SettingsError::UnknownEnv { var });
        }
    }
    Ok(())
}

impl Settings {
    /// Loads defaults ← `file` (when given) ← environment, then validates.
    /// `env` returns a variable's value; `std::env::var(..).ok()` in production.
    pub fn load(
        file: Option<&Path>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, SettingsError> {
        Self::load_traced(file, env).map(|loaded| loaded.settings)
    }

    /// [`Settings::load`], remembering where each value came from.
    pub fn load_traced(
        file: Option<&Path>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Loaded, SettingsError> {
        let mut loaded = match file {
            Some(path) => Self::from_file_traced(path)?,
            None => Loaded {
                settings: Settings::default(),
                sources: vec![Source::Default; KEYS.len()],
            },
        };
        loaded.settings.apply_env_traced(env, &mut loaded.sources)?;
        loaded
            .settings
            .validate()
            .map_err(|e| with_origin(e, &loaded))?;
        Ok(loaded)
    }

    /// Reads one TOML file over the defaults; unknown keys are errors.
    pub fn from_file(path: &Path) -> Result<Self, SettingsError> {
        Self::from_file_traced(path).map(|loaded| loaded.settings)
    }

    fn from_file_traced(path: &Path) -> Result<Loaded, SettingsError> {
        let text = std::fs::read_to_string(path).map_err(|source| SettingsError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let parse_error = |message| SettingsError::Parse {
            path: path.to_path_buf(),
            message,
        };
        let settings = Self::from_toml(&text).map_err(parse_error)?;
        let table: toml::Table = toml::from_str(&text).map_err(|e| parse_error(e.to_string()))?;
        let sources = KEYS
            .iter()
            .map(
                |k| match table.get(k.section).and_then(|s| s.get(k.field)) {
                    Some(_) => Source::File(path.to_path_buf()),
                    None => Source::Default,
                },
            )
            .collect();
        Ok(Loaded { settings, sources })
    }

    /// Parses TOML text over the defaults.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim().replace('\n', " "))
    }

    /// Applies every `EVENTGATE_*` variable of the table: for each key its
    /// long name `EVENTGATE_<SECTION>__<KEY>`, then its short name, which
    /// wins. Empty values are ignored.
    pub fn apply_env(&mut self, env: &dyn Fn(&str) -> Option<String>) -> Result<(), SettingsError> {
        let mut sources = vec![Source::Default; KEYS.len()];
        self.apply_env_traced(env, &mut sources)
    }

    pub(super) fn apply_env_traced(
        &mut self,
        env: &dyn Fn(&str) -> Option<String>,
        sources: &mut [Source],
    ) -> Result<(), SettingsError> {
        for (key, source) in KEYS.iter().zip(sources.iter_mut()) {
            for var in key.env_vars() {
                // The contract (§11) gives the empty retry schedule a meaning:
                // one attempt, no retry.
                let keeps_empty = var == "EVENTGATE_WEBHOOK_RETRY_SCHEDULE_SECS";
                let Some(value) = env(&var).filter(|v| keeps_empty || !v.trim().is_empty()) else {
                    continue;
                };
                key.set_from_env(self, &value)
                    .map_err(|message| SettingsError::Env {
                        var: var.clone(),
                        key: key.path,
                        // A secret's value is never printed, even a bad one.
                        value: match key.mask {
                            Mask::None => value.clone(),
                            Mask::Secret | Mask::UrlPassword => MASK.into(),
                        },
                        message,
                    })?;
                *source = Source::Env(var);
            }
        }
        Ok(())
    }
}

/// Adds to a validation error where the offending value came from.
fn with_origin(error: SettingsError, loaded: &Loaded) -> SettingsError {
    match error {
        SettingsError::Invalid {
            key,
            origin: None,
            message,
        } => SettingsError::Invalid {
            key,
            origin: loaded
                .source(key)
                .filter(|s| **s != Source::Default)
                .cloned(),
            message,
        },
        other => other,
    }
}
