//! Unit tests of the settings table and its loading; the command line's
//! view of it is tested in `tests/configuration.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;

use super::*;

/// Looks variables up in a fixed list, as the process environment would.
fn env_of(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let map: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    move |k: &str| map.get(k).cloned()
}

/// A key's value in `settings`, as TOML.
fn value_of(settings: &Settings, key: &Key) -> toml::Value {
    let tree = toml::Table::try_from(settings).unwrap();
    tree[key.section][key.field].clone()
}

/// An environment value that differs from `default`, and the TOML value it gives.
fn changed(key: &Key, default: &toml::Value) -> (String, toml::Value) {
    use toml::Value as V;
    match default {
        V::Integer(n) => ((n + 1).to_string(), V::Integer(n + 1)),
        V::Float(f) => ((f + 1.5).to_string(), V::Float(f + 1.5)),
        V::Boolean(b) => ((!b).to_string(), V::Boolean(!b)),
        V::String(s) => (format!(" {s}changed "), V::String(format!("{s}changed"))),
        V::Array(_) if !key.ty.contains("String") => {
            ("7, 8".into(), V::Array(vec![V::Integer(7), V::Integer(8)]))
        }
        V::Array(_) => (
            " https://a.example , https://b.example".into(),
            V::Array(vec![
                V::String("https://a.example".into()),
                V::String("https://b.example".into()),
            ]),
        ),
        other => panic!("{}: add a changed value for {other:?} here", key.path),
    }
}

/// Sets each key through `var_of(key)` alone and checks that exactly that
/// key changed, and that its source is that variable.
fn each_key_set_by(var_of: impl Fn(&Key) -> Option<String>) -> usize {
    let defaults = Settings::default();
    let mut checked = 0;
    for key in KEYS {
        let Some(var) = var_of(key) else { continue };
        let (raw, expected) = changed(key, &value_of(&defaults, key));
        let env = env_of(&[(var.as_str(), raw.as_str())]);
        let mut settings = Settings::default();
        let mut sources = vec![Source::Default; KEYS.len()];
        settings.apply_env_traced(&env, &mut sources).unwrap();
        for (other, source) in KEYS.iter().zip(&sources) {
            if other.path == key.path {
                assert_eq!(value_of(&settings, other), expected, "{var}");
                assert_eq!(*source, Source::Env(var.clone()), "{var}");
            } else {
                assert_eq!(
                    value_of(&settings, other),
                    value_of(&defaults, other),
                    "{var} changed {} too",
                    other.path
                );
                assert_eq!(*source, Source::Default, "{var}");
            }
        }
        checked += 1;
    }
    checked
}

#[test]
fn every_key_is_settable_by_its_long_env_name() {
    assert_eq!(each_key_set_by(|k| Some(k.env_var())), KEYS.len());
    assert!(KEYS.len() >= 34, "every key of the tree is in the table");
    let key = KEYS.iter().find(|k| k.path == "ws.client_buffer").unwrap();
    assert_eq!(key.env_var(), "EVENTGATE_WS__CLIENT_BUFFER");
}

#[test]
fn every_short_name_sets_its_key() {
    let short: Vec<_> = KEYS.iter().filter_map(|k| k.alias).collect();
    assert_eq!(each_key_set_by(|k| k.alias.map(String::from)), short.len());
    // The contract's names (§10) that exist in the tree, and the ones the
    // README documents besides them.
    for name in [
        "EVENTGATE_BIND",
        "EVENTGATE_DATABASE_URL",
        "EVENTGATE_PUBLIC_BASE_URL",
        "EVENTGATE_ACCOUNT_TOKEN",
        "EVENTGATE_NATS_URL",
        "EVENTGATE_LOG",
        "EVENTGATE_WS_ALLOWED_ORIGINS",
        "EVENTGATE_WS_PING_INTERVAL_SECS",
        "EVENTGATE_WS_IDLE_TIMEOUT_SECS",
        "EVENTGATE_WS_CLIENT_BUFFER",
        "EVENTGATE_WS_CLIENT_BUFFER_BYTES",
        "EVENTGATE_RATE_LIMIT_PER_MINUTE",
        "EVENTGATE_RATE_LIMIT_INSTANCE_NEW_PER_MINUTE",
        "EVENTGATE_WS_HISTORY_SIZE",
        "EVENTGATE_WS_HISTORY_TTL_SECS",
        "EVENTGATE_WS_HISTORY_BYTES",
        "EVENTGATE_WEBHOOK_TIMEOUT_SECS",
        "EVENTGATE_WEBHOOK_RETRY_SCHEDULE_SECS",
        "EVENTGATE_WEBHOOK_MAX_IN_FLIGHT",
        "EVENTGATE_WEBHOOK_MAX_PENDING",
        "EVENTGATE_WEBHOOK_DEAD_LETTER_HOURS",
        "EVENTGATE_WEBHOOK_ALLOWED_NETWORKS",
        "EVENTGATE_ENCRYPTION_KEY",
        "EVENTGATE_DATA_DIR",
        "EVENTGATE_WORKERS",
        "EVENTGATE_INSTANCE_ARBITERS",
        "EVENTGATE_SHUTDOWN_DRAIN_SECS",
        "EVENTGATE_MAX_CONNECTIONS",
    ] {
        assert!(short.contains(&name), "{name} lost");
    }
}

#[test]
fn env_names_are_unique() {
    let mut seen = std::collections::HashSet::new();
    for key in KEYS {
        for var in key.env_vars() {
            assert!(seen.insert(var.clone()), "{var} names two keys");
        }
        if let Some(alias) = key.alias {
            assert!(
                alias.starts_with("EVENTGATE_") && !alias.contains("__"),
                "{alias}"
            );
        }
    }
    let mut paths = std::collections::HashSet::new();
    assert!(KEYS.iter().all(|k| paths.insert(k.path)));
}

#[test]
fn short_name_beats_long_form_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("eventgate.toml");
    std::fs::write(&file, "[ws]\nclient_buffer = 5\nping_interval_secs = 7\n").unwrap();
    let both = env_of(&[
        ("EVENTGATE_WS__CLIENT_BUFFER", "6"),
        ("EVENTGATE_WS_CLIENT_BUFFER", "7"),
    ]);
    let loaded = Settings::load_traced(Some(&file), &both).unwrap();
    assert_eq!(loaded.settings.ws.client_buffer, 7);
    assert_eq!(
        loaded.source("ws.client_buffer"),
        Some(&Source::Env("EVENTGATE_WS_CLIENT_BUFFER".into()))
    );
    assert_eq!(loaded.settings.ws.ping_interval_secs, 7);
    assert_eq!(
        loaded.source("ws.ping_interval_secs"),
        Some(&Source::File(file.clone()))
    );
    assert_eq!(
        loaded.source("ws.idle_timeout_secs"),
        Some(&Source::Default)
    );
    let long = env_of(&[("EVENTGATE_WS__CLIENT_BUFFER", "6")]);
    let loaded = Settings::load_traced(Some(&file), &long).unwrap();
    assert_eq!(loaded.settings.ws.client_buffer, 6);
    assert_eq!(
        loaded.source("ws.client_buffer"),
        Some(&Source::Env("EVENTGATE_WS__CLIENT_BUFFER".into()))
    );
    let none = env_of(&[]);
    let loaded = Settings::load_traced(Some(&file), &none).unwrap();
    assert_eq!(loaded.settings.ws.client_buffer, 5);
    assert_eq!(loaded.source("ws.client_buffer"), Some(&Source::File(file)));
}

#[test]
fn empty_env_values_are_ignored() {
    let env = env_of(&[
        ("EVENTGATE_BIND", "  "),
        ("EVENTGATE_WS__CLIENT_BUFFER", ""),
    ]);
    let loaded = Settings::load_traced(None, &env).unwrap();
    assert_eq!(loaded.settings, Settings::default());
    assert_eq!(loaded.source("server.bind"), Some(&Source::Default));
}

#[test]
fn bad_env_value_names_the_variable_and_the_key() {
    for var in [
        "EVENTGATE_WS__PING_INTERVAL_SECS",
        "EVENTGATE_WS_PING_INTERVAL_SECS",
    ] {
        let env = env_of(&[(var, "soon")]);
        match Settings::load(None, &env).unwrap_err() {
            SettingsError::Env {
                var: named,
                key,
                value,
                ..
            } => {
                assert_eq!(named, var);
                assert_eq!(key, "ws.ping_interval_secs");
                assert_eq!(value, "soon");
            }
            other => panic!("{other}"),
        }
    }
    let env = env_of(&[("EVENTGATE_LIMITS__PUBLISH_BATCH", "-1")]);
    let err = Settings::load(None, &env).unwrap_err().to_string();
    assert!(err.contains("EVENTGATE_LIMITS__PUBLISH_BATCH"), "{err}");
    assert!(err.contains("limits.publish_batch"), "{err}");
}

#[test]
fn unknown_long_env_name_is_refused() {
    let names = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    match check_env_names(names(&["PATH", "EVENTGATE_WS__CLIENT_BUFER"])).unwrap_err() {
        SettingsError::UnknownEnv { var } => assert_eq!(var, "EVENTGATE_WS__CLIENT_BUFER"),
        other => panic!("{other}"),
    }
    // Other EVENTGATE_* names (the file, the tests' own) are not settings.
    check_env_names(names(&[
        "EVENTGATE_CONFIG",
        "EVENTGATE_TEST_DATABASE_URL",
        "EVENTGATE_WS_CLIENT_BUFFER",
        "EVENTGATE_WS__CLIENT_BUFFER",
    ]))
    .unwrap();
}

#[test]
fn invalid_value_names_where_it_came_from() {
    let env = env_of(&[("EVENTGATE_SERVER__BIND", "nowhere")]);
    match Settings::load(None, &env).unwrap_err() {
        SettingsError::Invalid { key, origin, .. } => {
            assert_eq!(key, "server.bind");
            assert_eq!(origin, Some(Source::Env("EVENTGATE_SERVER__BIND".into())));
        }
        other => panic!("{other}"),
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("eventgate.toml");
    std::fs::write(&file, "[cluster]\nsubject_prefix = \".bad\"\n").unwrap();
    let err = Settings::load(Some(&file), &env_of(&[]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("cluster.subject_prefix"), "{err}");
    assert!(
        err.contains(&format!("from file {}", file.display())),
        "{err}"
    );
}

#[test]
fn report_shows_every_key_its_value_and_source() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("eventgate.toml");
    std::fs::write(&file, "[storage]\npool_size = 3\n").unwrap();
    let env = env_of(&[
        ("EVENTGATE_ACCOUNT_TOKEN", "very-secret"),
        ("EVENTGATE_CLUSTER__NATS_URL", "nats://u:pw@nats:4222"),
    ]);
    let loaded = Settings::load_traced(Some(&file), &env).unwrap();
    let report = loaded.report().unwrap();
    assert!(
        !report.contains("very-secret") && !report.contains(":pw@"),
        "{report}"
    );
    for key in KEYS {
        let line = report
            .lines()
            .find(|l| {
                l.starts_with(&format!("{} = ", key.field))
                    && l.ends_with(&format!("# {}", loaded.source(key.path).unwrap()))
            })
            .map(|_| ());
        assert!(line.is_some(), "{} missing from\n{report}", key.path);
    }
    assert!(report.contains("pool_size = 3 # file "), "{report}");
    assert!(
        report.contains("account_token = \"********\" # EVENTGATE_ACCOUNT_TOKEN"),
        "{report}"
    );
    assert!(
        report.contains("nats_url = \"nats://u:********@nats:4222\" # EVENTGATE_CLUSTER__NATS_URL"),
        "{report}"
    );
    assert!(
        report.contains("bind = \"127.0.0.1:8080\" # default"),
        "{report}"
    );
    let back = Settings::from_toml(&report).unwrap();
    assert_eq!(back, loaded.settings.masked());
}

#[test]
fn shipped_file_lists_every_key_with_its_default() {
    let text = include_str!("../../config/eventgate.toml");
    let table: toml::Table = toml::from_str(text).unwrap();
    let defaults = Settings::default();
    for key in KEYS {
        let listed = table.get(key.section).and_then(|s| s.get(key.field));
        assert_eq!(
            listed,
            Some(&value_of(&defaults, key)),
            "config/eventgate.toml: {} with its default",
            key.path
        );
        if let Some(alias) = key.alias {
            assert!(
                text.contains(alias),
                "config/eventgate.toml does not mention {alias}"
            );
        }
    }
}

#[test]
fn shipped_file_equals_defaults() {
    let text = include_str!("../../config/eventgate.toml");
    assert_eq!(Settings::from_toml(text).unwrap(), Settings::default());
}

#[test]
fn shipped_cluster_example_is_valid() {
    let text = include_str!("../../config/eventgate.cluster.toml");
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

#[test]
fn masks_cluster_url_and_leaves_an_empty_token_empty() {
    let mut s = Settings::default();
    s.cluster.nats_url = "nats://user:pw@nats:4222".into();
    let m = s.masked();
    assert_eq!(m.cluster.nats_url, "nats://user:********@nats:4222");
    assert_eq!(m.auth.account_token, "");
}

#[test]
fn the_mask_is_refused_as_an_account_token() {
    let env = |k: &str| (k == "EVENTGATE_ACCOUNT_TOKEN").then(|| MASK.to_string());
    let err = Settings::load(None, &env).unwrap_err().to_string();
    assert!(
        err.contains("auth.account_token") && err.contains("mask"),
        "{err}"
    );
}
