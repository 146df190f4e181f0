//! The machinery behind the one settings table in `settings.rs`: the
//! `settings_table!` macro that turns it into the section structs, their
//! `Default`s, `Settings::masked` and [`KEYS`](super::KEYS), plus what one
//! row of the table is ([`Key`]) and how an environment value becomes a
//! field's value ([`FromEnv`]).
//!
//! Owns no keys or values: those are the table's. Must not read files or the
//! environment (that is `load`).

use std::path::PathBuf;

use super::{mask_url_password, Settings, MASK};

/// How a key's value is shown when settings are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mask {
    /// Shown as it is.
    None,
    /// A secret: shown as [`MASK`] when set.
    Secret,
    /// A URL that may carry a password: the password is shown as [`MASK`].
    UrlPassword,
}

/// One key of the settings tree, as the table declares it.
#[derive(Debug, Clone, Copy)]
pub struct Key {
    /// The section (TOML table), e.g. `ws`.
    pub section: &'static str,
    /// The field inside the section, e.g. `client_buffer`.
    pub field: &'static str,
    /// `section.field`, e.g. `ws.client_buffer`.
    pub path: &'static str,
    /// The contract's short environment name (§10), e.g.
    /// `EVENTGATE_WS_CLIENT_BUFFER`; it wins over the long one.
    pub alias: Option<&'static str>,
    /// How `check-config` shows the value.
    pub mask: Mask,
    /// The field's type as the table writes it, e.g. `Vec<String>`.
    pub ty: &'static str,
    /// Parses an environment value into this key of a `Settings`.
    pub(crate) set: fn(&mut Settings, &str) -> Result<(), String>,
}

impl Key {
    /// The long environment name every key has: `EVENTGATE_<SECTION>__<FIELD>`.
    pub fn env_var(&self) -> String {
        format!(
            "EVENTGATE_{}__{}",
            self.section.to_ascii_uppercase(),
            self.field.to_ascii_uppercase()
        )
    }

    /// The environment names that set this key, weakest first: the long
    /// name, then the short name when the key has one.
    pub fn env_vars(&self) -> Vec<String> {
        let mut vars = vec![self.env_var()];
        vars.extend(self.alias.map(String::from));
        vars
    }

    /// Sets this key of `settings` from an environment value.
    pub fn set_from_env(&self, settings: &mut Settings, raw: &str) -> Result<(), String> {
        (self.set)(settings, raw)
    }
}

/// A type a key may have: how it is read from an environment variable.
/// Values are trimmed; lists are comma-separated (an empty value is the
/// empty list; an empty item is an error).
pub trait FromEnv: Sized {
    /// Parses one environment value.
    fn from_env(raw: &str) -> Result<Self, String>;
}

macro_rules! from_env_by_parse {
    ($($t:ty),* $(,)?) => {$(
        impl FromEnv for $t {
            fn from_env(raw: &str) -> Result<Self, String> {
                raw.trim().parse().map_err(|e: <$t as std::str::FromStr>::Err| e.to_string())
            }
        }
    )*};
}

from_env_by_parse!(bool, u16, u32, u64, usize, i32, i64, f64);

impl FromEnv for String {
    fn from_env(raw: &str) -> Result<Self, String> {
        Ok(raw.trim().to_string())
    }
}

impl FromEnv for PathBuf {
    fn from_env(raw: &str) -> Result<Self, String> {
        Ok(PathBuf::from(raw.trim()))
    }
}

impl<T: FromEnv> FromEnv for Vec<T> {
    fn from_env(raw: &str) -> Result<Self, String> {
        super::split_list(raw)?
            .iter()
            .map(|item| T::from_env(item))
            .collect()
    }
}

/// A type a key marked `mask Secret` or `mask UrlPassword` may have.
pub trait Maskable {
    /// Hides what `how` says to hide.
    fn mask(&mut self, how: Mask);
}

impl Maskable for String {
    fn mask(&mut self, how: Mask) {
        match how {
            Mask::None => {}
            Mask::Secret if self.is_empty() => {}
            Mask::Secret => *self = MASK.into(),
            Mask::UrlPassword => *self = mask_url_password(self),
        }
    }
}

/// Turns the settings table into the section structs (each field with its
/// doc comment, `deny_unknown_fields`), their `Default`s, `Settings`,
/// `Settings::masked` and [`KEYS`](super::KEYS). See the top of
/// `settings.rs` for the table's syntax.
macro_rules! settings_table {
    (
        $(
            $(#[doc = $sdoc:literal])+
            [$section:ident] $Section:ident {
                $(
                    $(#[doc = $doc:literal])+
                    $field:ident: $ty:ty = $default:expr
                    $(, env $alias:literal)?
                    $(, mask $mask:ident)?
                    ;
                )+
            }
        )+
    ) => {
        /// The whole settings tree, one field per section (TOML table).
        /// Every key has a default; see `config/eventgate.toml`.
        #[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
        #[serde(deny_unknown_fields, default)]
        pub struct Settings {
            $(
                $(#[doc = $sdoc])+
                pub $section: $Section,
            )+
        }

        $(
            $(#[doc = $sdoc])+
            #[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
            #[serde(deny_unknown_fields, default)]
            pub struct $Section {
                $(
                    $(#[doc = $doc])+
                    pub $field: $ty,
                )+
            }

            impl Default for $Section {
                fn default() -> Self {
                    Self {
                        $($field: $default,)+
                    }
                }
            }
        )+

        /// Every key of the settings tree, in the table's order.
        pub static KEYS: &[Key] = &[
            $($(
                Key {
                    section: stringify!($section),
                    field: stringify!($field),
                    path: concat!(stringify!($section), ".", stringify!($field)),
                    alias: settings_table!(@alias $($alias)?),
                    mask: settings_table!(@mask $($mask)?),
                    ty: stringify!($ty),
                    set: |settings: &mut Settings, raw: &str| {
                        settings.$section.$field = <$ty as FromEnv>::from_env(raw)?;
                        Ok(())
                    },
                },
            )+)+
        ];

        impl Settings {
            /// A copy safe to print: keys marked `mask` in the table are
            /// hidden (secrets and URL passwords replaced by `********`).
            pub fn masked(&self) -> Settings {
                let mut copy = self.clone();
                $($($(
                    Maskable::mask(&mut copy.$section.$field, Mask::$mask);
                )?)+)+
                copy
            }
        }
    };
    (@alias) => { None };
    (@alias $alias:literal) => { Some($alias) };
    (@mask) => { Mask::None };
    (@mask $mask:ident) => { Mask::$mask };
}

pub(crate) use settings_table;
