//! Settings through the real binary (contract §10): every key of the table
//! settable by `EVENTGATE_<SECTION>__<KEY>`, the short names winning over
//! the long names and the file, `check-config` showing each key's value and
//! source, bad or unknown variables named, and SIGHUP reloading the file
//! while the environment keeps winning.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::path::Path;

use common::{Process, TestDb, ACCOUNT};
use eventgate::settings::{mask_url_password, Key, Mask, Settings, KEYS, MASK};
use toml::Value;

/// Runs `eventgate <args>` with exactly `env`; returns (status, stdout, stderr).
fn run_cli(args: &[&str], env: &[(String, String)]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_eventgate"))
        .args(args)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn owned(env: &[(&str, &str)]) -> Vec<(String, String)> {
    env.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A key's default, as TOML.
fn default_of(key: &Key) -> Value {
    let tree = toml::Table::try_from(Settings::default()).unwrap();
    tree[key.section][key.field].clone()
}

/// A valid value for `key` that differs from its default, distinct for each
/// `round`: (the environment text, the TOML value `check-config` shows).
fn sample(key: &Key, round: i64) -> (String, Value) {
    let text = |s: String| (s.clone(), Value::String(s));
    // Keys whose values are checked (addresses, URLs, ...) get their own
    // samples; the others are derived from the default below.
    let special = match key.path {
        "server.bind" => Some(text(format!("127.0.0.1:{}", 9000 + round))),
        "server.public_base_url" => Some(text(format!("https://gw{round}.example"))),
        "storage.database_url" => Some(text(format!("postgres://eg:hunter{round}@db.example/eg"))),
        "auth.account_token" => Some(text(format!("secret-token-{round}"))),
        "cluster.nats_url" => Some(text(format!("nats://nats{round}.example:4222"))),
        "webhook.allowed_networks" => {
            let items = [
                format!("10.{round}.0.0/16"),
                format!("192.168.{round}.0/24"),
            ];
            Some((
                items.join(","),
                Value::Array(items.into_iter().map(Value::String).collect()),
            ))
        }
        "webhook.encryption_key" => {
            use base64::Engine;
            let key = base64::engine::general_purpose::STANDARD.encode([round as u8; 32]);
            Some(text(key))
        }
        "ws.allowed_origins" => {
            let items = [
                format!("https://a{round}.example"),
                format!("https://b{round}.example"),
            ];
            Some((
                items.join(","),
                Value::Array(items.into_iter().map(Value::String).collect()),
            ))
        }
        _ => None,
    };
    let (raw, value) = match (special, default_of(key)) {
        (Some(sample), _) => sample,
        (None, Value::Integer(n)) => ((n + round).to_string(), Value::Integer(n + round)),
        (None, Value::Boolean(b)) => ((!b).to_string(), Value::Boolean(!b)),
        (None, Value::String(s)) => text(format!("{s}value{round}")),
        (None, Value::Array(_)) if key.ty.contains("String") => {
            let items = [format!("a{round}"), format!("b{round}")];
            (
                items.join(","),
                Value::Array(items.into_iter().map(Value::String).collect()),
            )
        }
        (None, Value::Array(_)) => (
            format!("{round}, {}", round + 1),
            Value::Array(vec![Value::Integer(round), Value::Integer(round + 1)]),
        ),
        (None, other) => panic!("{}: add a valid sample for {other:?} here", key.path),
    };
    let shown = match (key.mask, value) {
        (Mask::Secret, _) => Value::String(MASK.into()),
        (Mask::UrlPassword, Value::String(url)) => Value::String(mask_url_password(&url)),
        (_, value) => value,
    };
    (raw, shown)
}

/// Each key's printed value and source comment, by `section.field`.
fn parse_report(out: &str) -> HashMap<String, (Value, String)> {
    let tree: toml::Table = toml::from_str(out).unwrap();
    let mut section = String::new();
    let mut found = HashMap::new();
    for line in out.lines() {
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_string();
        } else if let Some((field, rest)) = line.split_once(" = ") {
            let (_, source) = rest.rsplit_once(" # ").unwrap_or_else(|| panic!("{line}"));
            let value = tree[section.as_str()][field].clone();
            found.insert(format!("{section}.{field}"), (value, source.to_string()));
        }
    }
    found
}

#[test]
fn every_key_is_settable_by_its_long_name_and_check_config_says_so() {
    let env: Vec<(String, String)> = KEYS.iter().map(|k| (k.env_var(), sample(k, 1).0)).collect();
    let (code, out, err) = run_cli(&["check-config"], &env);
    assert_eq!(code, 0, "{err}");
    assert!(
        !out.contains("hunter1") && !out.contains("secret-token-1"),
        "{out}"
    );
    let report = parse_report(&out);
    assert_eq!(report.len(), KEYS.len(), "{out}");
    for key in KEYS {
        let (value, source) = &report[key.path];
        assert_eq!(value, &sample(key, 1).1, "{}", key.path);
        assert_eq!(source, &key.env_var(), "{}", key.path);
    }
    Settings::from_toml(&out).unwrap();
}

#[test]
fn short_names_beat_the_long_names_and_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("eventgate.toml");
    let short: Vec<&Key> = KEYS.iter().filter(|k| k.alias.is_some()).collect();
    assert!(short.len() >= 18);
    // The file sets every key that has a short name (round 1), the long
    // names round 2, the short names round 3.
    let mut text = String::new();
    let mut section = "";
    for key in &short {
        if key.section != section {
            section = key.section;
            text.push_str(&format!("[{section}]\n"));
        }
        let (_, value) = sample(key, 1);
        let value = match key.mask {
            // The file holds the real value, not what check-config shows.
            Mask::None => value,
            _ => Value::String(sample(key, 1).0),
        };
        text.push_str(&format!("{} = {value}\n", key.field));
    }
    std::fs::write(&file, &text).unwrap();
    let path = file.to_str().unwrap();
    let mut env: Vec<(String, String)> = short
        .iter()
        .map(|k| (k.env_var(), sample(k, 2).0))
        .collect();
    let (code, out, err) = run_cli(&["--config", path, "check-config"], &env);
    assert_eq!(code, 0, "{err}");
    let report = parse_report(&out);
    for key in &short {
        assert_eq!(
            report[key.path],
            (sample(key, 2).1, key.env_var()),
            "{}",
            key.path
        );
    }
    env.extend(
        short
            .iter()
            .map(|k| (k.alias.unwrap().to_string(), sample(k, 3).0)),
    );
    let (code, out, err) = run_cli(&["--config", path, "check-config"], &env);
    assert_eq!(code, 0, "{err}");
    let report = parse_report(&out);
    for key in &short {
        let alias = key.alias.unwrap().to_string();
        assert_eq!(report[key.path], (sample(key, 3).1, alias), "{}", key.path);
    }
    // Without the environment, the file's values, with the file as source.
    let (code, out, err) = run_cli(&["--config", path, "check-config"], &[]);
    assert_eq!(code, 0, "{err}");
    let report = parse_report(&out);
    let from_file = format!("file {path}");
    for key in KEYS {
        let source = &report[key.path].1;
        if key.alias.is_some() {
            assert_eq!(report[key.path], (sample(key, 1).1, from_file.clone()));
        } else {
            assert_eq!(source, "default", "{}", key.path);
        }
    }
}

#[test]
fn bad_and_unknown_variables_are_named() {
    let (code, _, err) = run_cli(
        &["check-config"],
        &owned(&[("EVENTGATE_RATE_LIMIT__PUBLISH_PER_MINUTE", "lots")]),
    );
    assert_eq!(code, 2);
    assert!(
        err.contains("EVENTGATE_RATE_LIMIT__PUBLISH_PER_MINUTE"),
        "{err}"
    );
    assert!(err.contains("rate_limit.publish_per_minute"), "{err}");
    assert!(err.contains("`lots`"), "{err}");
    let (code, _, err) = run_cli(
        &["check-config"],
        &owned(&[("EVENTGATE_RATE_LIMIT_PER_MINUTE", "-5")]),
    );
    assert_eq!(code, 2);
    assert!(err.contains("EVENTGATE_RATE_LIMIT_PER_MINUTE"), "{err}");
    let (code, _, err) = run_cli(
        &["check-config"],
        &owned(&[("EVENTGATE_WS__CLIENT_BUFER", "5")]),
    );
    assert_eq!(code, 2);
    assert!(
        err.contains("EVENTGATE_WS__CLIENT_BUFER names no setting"),
        "{err}"
    );
    // A value that parses but cannot work names the key and where it came from.
    let (code, _, err) = run_cli(
        &["check-config"],
        &owned(&[("EVENTGATE_WS__IDLE_TIMEOUT_SECS", "5")]),
    );
    assert_eq!(code, 2);
    assert!(
        err.contains("ws.idle_timeout_secs` (from EVENTGATE_WS__IDLE_TIMEOUT_SECS)"),
        "{err}"
    );
    // More events per publish than a shared-history message can number.
    let (code, _, err) = run_cli(
        &["check-config"],
        &owned(&[("EVENTGATE_LIMITS__PUBLISH_BATCH", "1048577")]),
    );
    assert_eq!(code, 2);
    assert!(err.contains("limits.publish_batch"), "{err}");
    assert!(err.contains("must be at most 1048576"), "{err}");
    let (code, _, err) = run_cli(
        &["check-config"],
        &owned(&[("EVENTGATE_LIMITS__PUBLISH_BATCH", "1048576")]),
    );
    assert_eq!(code, 0, "{err}");
    // A log filter env_logger would only warn about and drop.
    for (filter, code) in [
        ("info,=garbage[[", 2),
        ("loud", 0),
        ("verbose=info", 0),
        ("eventgate=louder", 2),
        ("warn, eventgate=debug, actix_web::middleware=off", 0),
        ("debug/needle", 0),
    ] {
        let (got, _, err) = run_cli(&["check-config"], &owned(&[("EVENTGATE_LOG", filter)]));
        assert_eq!(got, code, "{filter}: {err}");
        if code == 2 {
            assert!(err.contains("log.level"), "{err}");
        }
    }
    // A database URL of another scheme is named, not taken for a file name
    // (and its password is not printed).
    for bad in [
        "mysql://app:s3cret@db.example/app",
        "sqlite:/var/lib/x.db",
        "postgres:db",
    ] {
        let (code, _, err) = run_cli(
            &["check-config"],
            &owned(&[("EVENTGATE_DATABASE_URL", bad)]),
        );
        assert_eq!(code, 2, "{bad}: {err}");
        assert!(err.contains("storage.database_url"), "{err}");
        assert!(
            err.contains("must be a file path, sqlite://PATH or postgres://"),
            "{err}"
        );
        assert!(!err.contains("s3cret"), "{err}");
    }
    for good in [
        "/var/lib/eventgate/x.sqlite3",
        "data/x.sqlite3",
        "sqlite:///var/lib/x.db",
        "postgres://u@h/db",
        "postgresql://u@h/db",
    ] {
        let (code, _, err) = run_cli(
            &["check-config"],
            &owned(&[("EVENTGATE_DATABASE_URL", good)]),
        );
        assert_eq!(code, 0, "{good}: {err}");
    }
}

/// Polls the process's stderr until it contains `text`.
fn wait_for_log(p: &Process, text: &str) {
    let seen =
        common::eventually_blocking(common::DEADLINE, || p.stderr().contains(text).then_some(()));
    assert!(seen.is_some(), "no `{text}` in\n{}", p.stderr());
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

#[actix_rt::test]
async fn sighup_rereads_the_file_and_the_environment_still_wins() {
    let db = TestDb::fresh();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("eventgate.toml");
    write(
        &config,
        "[ws]\nallowed_origins = [\"https://file.example\"]\n",
    );
    let p = Process::start(
        &db,
        &["--config", config.to_str().unwrap(), "serve"],
        &[(
            "EVENTGATE_WS_ALLOWED_ORIGINS",
            "https://env.example".to_string(),
        )],
    );
    let s = p.client(&Settings::default());
    s.instance("hup").await;
    // "accepted", or the reason the upgrade was refused.
    let status = |origin: &'static str| {
        let url = s.ws_url(&format!("/ws/hup?token={ACCOUNT}"));
        async move {
            let mut req =
                tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url)
                    .unwrap();
            req.headers_mut().insert("origin", origin.parse().unwrap());
            match tokio_tungstenite::connect_async(req).await {
                Ok(_) => "accepted".to_string(),
                Err(e) => e.to_string(),
            }
        }
    };
    assert_eq!(status("https://env.example").await, "accepted");
    assert!(status("https://file.example").await.contains("403"));
    // The reloaded file changes what only it sets; the short name still
    // wins for the origins.
    write(
        &config,
        "[ws]\nallowed_origins = [\"https://file.example\"]\n\
         [rate_limit]\npublish_per_minute = 7\n",
    );
    p.signal("HUP");
    wait_for_log(&p, "publish 7/min");
    assert_eq!(status("https://env.example").await, "accepted");
    assert!(status("https://file.example").await.contains("403"));
    // A bad file on reload keeps the running settings.
    write(&config, "[rate_limit]\npublish_per_minute = \"many\"\n");
    p.signal("HUP");
    wait_for_log(&p, "reload failed, settings unchanged");
    assert!(p.stderr().contains("publish_per_minute"), "{}", p.stderr());
    assert_eq!(status("https://env.example").await, "accepted");
}

/// An account token that is an instance's TokenInstance would take that
/// token from the instance: the gateway refuses to start with it, saying why.
#[test]
fn an_account_token_that_is_an_instance_token_is_refused_at_start() {
    let db = TestDb::sqlite();
    let instance_token = "0123456789abcdef0123456789abcdef-instance";
    let base = [
        ("EVENTGATE_DATABASE_URL", db.url.as_str()),
        ("EVENTGATE_ACCOUNT_TOKEN", ACCOUNT),
    ];
    let (code, out, err) = run_cli(
        &["instance", "create", "--account", "1", "held"],
        &owned(&base),
    );
    assert_eq!(code, 0, "{out}{err}");
    // Give the instance a known token, as a custom token at creation would.
    {
        use diesel::connection::SimpleConnection;
        let mut conn = eventgate::storage::pool::open_one(&db.url).unwrap();
        let eventgate::storage::DbConn::Sqlite(c) = &mut conn else {
            panic!("a SQLite test database");
        };
        let hash = eventgate::auth::token_hash(instance_token);
        c.batch_execute(&format!(
            "UPDATE instances SET token = '{instance_token}', token_hash = '{hash}' WHERE name = 'held'"
        ))
        .unwrap();
    }
    let env = owned(&[
        ("EVENTGATE_DATABASE_URL", db.url.as_str()),
        ("EVENTGATE_ACCOUNT_TOKEN", instance_token),
    ]);
    for args in [&["migrate"][..], &["account", "list"][..]] {
        let (code, _, err) = run_cli(args, &env);
        assert_eq!(code, 1, "{args:?}: {err}");
        assert!(
            err.contains("EVENTGATE_ACCOUNT_TOKEN is the TokenInstance of instance `held`"),
            "{err}"
        );
    }
    let (code, out, _) = run_cli(&["account", "list"], &owned(&base));
    assert_eq!(code, 0);
    assert_eq!(out.lines().count(), 1, "no second account was made: {out}");
}

#[test]
fn an_empty_eventgate_config_is_ignored_like_every_empty_variable() {
    let (code, out, err) = run_cli(
        &["check-config"],
        &owned(&[("EVENTGATE_CONFIG", ""), ("EVENTGATE_BIND", "127.0.0.1:9")]),
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("bind = \"127.0.0.1:9\""), "{out}");
    // A named file is still read, and one that is missing is an error.
    let (code, _, err) = run_cli(
        &["check-config"],
        &owned(&[("EVENTGATE_CONFIG", "/nonexistent/eventgate.toml")]),
    );
    assert_ne!(code, 0);
    assert!(err.contains("/nonexistent/eventgate.toml"), "{err}");
}
