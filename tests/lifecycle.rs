//! The service under systemd, with the real binary (contract §10):
//! readiness, watchdog and stopping through a real `NOTIFY_SOCKET`, SIGTERM
//! drain (1001, 503 for new upgrades, exit 0), SIGHUP reload, `/readyz`,
//! `/metrics`, the command line, and settings errors.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use common::{event, eventually, Process, TestDb, TestServer, ACCOUNT};
use eventgate::settings::Settings;
use serde_json::json;

fn read_notifications(sock: &UnixDatagram, until: &str, wait: Duration) -> Vec<String> {
    let deadline = Instant::now() + wait;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    while Instant::now() < deadline {
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).to_string();
            let done = msg.lines().any(|l| l == until);
            seen.push(msg);
            if done {
                return seen;
            }
        }
    }
    panic!("no {until} within {wait:?}; saw {seen:?}");
}

#[actix_rt::test]
async fn notify_socket_sees_ready_watchdog_and_stopping() {
    let db = TestDb::fresh();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    let mut p = Process::start(
        &db,
        &["serve"],
        &[
            ("NOTIFY_SOCKET", path.to_string_lossy().into_owned()),
            ("WATCHDOG_USEC", "400000".into()),
        ],
    );
    let ready = read_notifications(&sock, "READY=1", Duration::from_secs(10));
    let all = ready.join("\n");
    assert!(
        all.contains(&format!("STATUS=listening on {}", p.addr)),
        "{all}"
    );
    // READY=1 came only once the listener answers and migrations ran.
    let s = p.client(&Settings::default());
    assert_eq!(s.raw("GET", "/readyz", &[], None).await.status, 200);
    read_notifications(&sock, "WATCHDOG=1", Duration::from_secs(5));
    let later = read_notifications(&sock, "WATCHDOG=1", Duration::from_secs(5));
    assert!(later.join("\n").contains("clients connected"));
    p.signal("TERM");
    read_notifications(&sock, "STOPPING=1", Duration::from_secs(5));
    let status = p.wait_exit(Duration::from_secs(10)).expect("exited");
    assert!(status.success(), "{status}");
}

/// `NOTIFY_SOCKET` may name a socket in Linux's abstract namespace (`@…`,
/// sd_notify(3)): readiness and stopping reach it too.
#[actix_rt::test]
async fn an_abstract_notify_socket_sees_ready_and_stopping() {
    use std::os::linux::net::SocketAddrExt;
    let db = TestDb::fresh();
    let name = format!(
        "eventgate-test-notify-{}-{}",
        std::process::id(),
        common::free_port()
    );
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let sock = UnixDatagram::bind_addr(&addr).unwrap();
    let mut p = Process::start(&db, &["serve"], &[("NOTIFY_SOCKET", format!("@{name}"))]);
    read_notifications(&sock, "READY=1", Duration::from_secs(10));
    p.signal("TERM");
    read_notifications(&sock, "STOPPING=1", Duration::from_secs(5));
    let status = p.wait_exit(Duration::from_secs(10)).expect("exited");
    assert!(status.success(), "{status}");
}

/// The drain waits for requests being handled, not for idle keep-alive
/// connections: a publish whose body is still arriving gets its 202, a new
/// request gets 503 (the probes are still answered), then the process exits
/// long before the drain time, although a client keeps an idle connection
/// open.
#[actix_rt::test]
async fn sigterm_finishes_requests_in_flight_and_does_not_wait_for_idle_connections() {
    use std::io::{Read, Write};
    let db = TestDb::fresh();
    let mut p = Process::start(
        &db,
        &["serve"],
        &[("EVENTGATE_SHUTDOWN_DRAIN_SECS", "30".into())],
    );
    let s = p.client(&Settings::default());
    s.instance("idle").await;
    // An idle keep-alive connection, after one request.
    let mut idle = std::net::TcpStream::connect(s.addr).unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let mut buf = [0u8; 512];
    assert!(idle.read(&mut buf).unwrap() > 0);
    // A publish whose body is half sent.
    let body = serde_json::to_vec(&event("call.update", json!({"n": 1}))).unwrap();
    let (first, rest) = body.split_at(body.len() / 2);
    let mut slow = std::net::TcpStream::connect(s.addr).unwrap();
    write!(
        slow,
        "POST /api/events/publish/idle HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {ACCOUNT}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    slow.write_all(first).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    p.signal("TERM");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let ask = |stream: &mut std::net::TcpStream, path: &str| {
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {ACCOUNT}\r\n\r\n"
        )
        .unwrap();
        let mut buf = [0u8; 2048];
        let n = stream.read(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let refused = ask(&mut idle, "/api/instance/list");
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    assert!(refused.contains("Server is shutting down"), "{refused}");
    let probe = ask(&mut idle, "/readyz");
    assert!(
        probe.starts_with("HTTP/1.1 503") && probe.contains("shutting down"),
        "{probe}"
    );
    let alive = ask(&mut idle, "/healthz");
    assert!(alive.starts_with("HTTP/1.1 200"), "{alive}");
    slow.write_all(rest).unwrap();
    let mut reply = String::new();
    let mut chunk = [0u8; 1024];
    while !reply.contains("Events accepted") {
        let n = slow.read(&mut chunk).unwrap();
        assert!(n > 0, "closed before the reply: {reply}");
        reply.push_str(&String::from_utf8_lossy(&chunk[..n]));
    }
    assert!(reply.starts_with("HTTP/1.1 202"), "{reply}");
    let status = p.wait_exit(Duration::from_secs(20)).expect("exited");
    assert!(status.success(), "{status}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "an idle connection held the drain for {:?}",
        started.elapsed()
    );
    drop(idle);
}

#[actix_rt::test]
async fn sigterm_closes_clients_with_1001_refuses_upgrades_and_exits_zero() {
    let db = TestDb::fresh();
    let mut p = Process::start(
        &db,
        &["serve"],
        &[("EVENTGATE_SHUTDOWN_DRAIN_SECS", "5".into())],
    );
    let s = p.client(&Settings::default());
    s.instance("drain").await;
    let mut a = s.connect("drain", "").await;
    let mut b = s.connect("drain", "").await;
    s.wait_clients("drain", Some(2)).await;
    let started = Instant::now();
    p.signal("TERM");
    assert_eq!(a.closed(Duration::from_secs(5)).await, Some(1001));
    // Still draining: a new upgrade gets 503 in the envelope.
    let upgrade = [
        ("connection", "Upgrade"),
        ("upgrade", "websocket"),
        ("sec-websocket-version", "13"),
        ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ];
    let r = s
        .raw("GET", &format!("/ws/drain?token={ACCOUNT}"), &upgrade, None)
        .await;
    r.assert_error(503, "Server is shutting down");
    // Refused by its route, and counted as such.
    assert_eq!(
        s.metric("eventgate_ws_upgrades_total{result=\"shutting_down\"}")
            .await,
        1.0
    );
    assert_eq!(b.closed(Duration::from_secs(5)).await, Some(1001));
    let status = p.wait_exit(Duration::from_secs(10)).expect("exited");
    assert!(status.success(), "{status}");
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "within the drain time"
    );
}

#[actix_rt::test]
async fn sighup_raises_and_lowers_the_log_filter() {
    let db = TestDb::fresh();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("eventgate.toml");
    std::fs::write(&config, "[log]\nlevel = \"info\"\n").unwrap();
    let p = Process::start(&db, &["--config", config.to_str().unwrap(), "serve"], &[]);
    let s = p.client(&Settings::default());
    s.instance("loud").await;
    let session_lines = |p: &Process| {
        p.stderr()
            .lines()
            .filter(|l| l.contains("DEBUG") && l.contains("connected"))
            .count()
    };
    let _quiet = s.connect("loud", "").await;
    s.wait_clients("loud", Some(1)).await;
    assert_eq!(session_lines(&p), 0, "info lets no debug line through");
    // Raised, for one target: a new session says so at debug.
    std::fs::write(
        &config,
        "[log]\nlevel = \"info,eventgate::ws::session=debug\"\n",
    )
    .unwrap();
    p.signal("HUP");
    let raised = eventually(common::DEADLINE, async || {
        p.stderr()
            .contains("reload: log filter is now info,eventgate::ws::session=debug")
            .then_some(())
    })
    .await;
    assert!(raised.is_some(), "{}", p.stderr());
    let _heard = s.connect("loud", "").await;
    let seen = eventually(common::DEADLINE, async || {
        (session_lines(&p) == 1).then_some(())
    })
    .await;
    assert!(seen.is_some(), "{}", p.stderr());
    // Lowered again: nothing more.
    std::fs::write(&config, "[log]\nlevel = \"warn\"\n").unwrap();
    p.signal("HUP");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let _again = s.connect("loud", "").await;
    s.wait_clients("loud", Some(3)).await;
    assert_eq!(session_lines(&p), 1, "{}", p.stderr());
}

#[actix_rt::test]
async fn sighup_changes_the_origin_allowlist_without_dropping_clients() {
    let db = TestDb::fresh();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("eventgate.toml");
    std::fs::write(&config, "[ws]\nallowed_origins = [\"https://a.example\"]\n").unwrap();
    let p = Process::start(&db, &["--config", config.to_str().unwrap(), "serve"], &[]);
    let s = p.client(&Settings::default());
    s.instance("hup").await;
    let connect = |origin: &'static str| {
        let url = s.ws_url(&format!("/ws/hup?token={ACCOUNT}"));
        async move {
            let mut req =
                tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url)
                    .unwrap();
            req.headers_mut().insert("origin", origin.parse().unwrap());
            tokio_tungstenite::connect_async(req).await
        }
    };
    let (ws, _) = connect("https://a.example").await.unwrap();
    let mut first = common::Ws { inner: ws };
    // Its session has joined before anything is published to it.
    s.wait_clients("hup", Some(1)).await;
    assert!(connect("https://b.example").await.is_err());
    std::fs::write(&config, "[ws]\nallowed_origins = [\"https://b.example\"]\n").unwrap();
    p.signal("HUP");
    let switched = common::eventually(common::DEADLINE, async || {
        connect("https://b.example").await.ok().map(|_| ())
    })
    .await;
    assert!(switched.is_some(), "b.example allowed after SIGHUP");
    let err = connect("https://a.example").await.unwrap_err();
    assert!(err.to_string().contains("403"), "{err}");
    // The client connected under the old list is still there.
    s.publish("hup", event("call.update", json!({"n": 1})))
        .await;
    assert_eq!(first.envelope().await["data"]["n"], 1);
    assert!(p
        .stderr()
        .contains("allowed origins are now https://b.example"));
}

#[actix_rt::test]
async fn readyz_says_when_the_sqlite_file_is_deleted_under_the_node() {
    let s = TestServer::start_on(TestDb::sqlite(), |_| {}).await;
    s.instance("file").await;
    assert_eq!(s.raw("GET", "/readyz", &[], None).await.status, 200);
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", s.db.url));
    }
    let r = s.raw("GET", "/readyz", &[], None).await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.body["error"]["details"], "storage file is gone");
    assert_eq!(s.raw("GET", "/healthz", &[], None).await.status, 200);
}

#[actix_rt::test]
async fn readyz_and_storage_errors_when_postgres_goes_away() {
    let Some(db) = common::require_postgres() else {
        return;
    };
    let s = TestServer::start_on(db, |_| {}).await;
    s.instance("pg").await;
    let mut ws = s.connect("pg", "").await;
    assert_eq!(s.raw("GET", "/readyz", &[], None).await.status, 200);
    s.publish("pg", event("call.update", json!({"n": 1}))).await;
    assert_eq!(ws.envelope().await["data"]["n"], 1);
    s.db.take_away();
    let r = s.raw("GET", "/readyz", &[], None).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.body["success"], false);
    assert_eq!(s.raw("GET", "/healthz", &[], None).await.status, 200);
    s.call(
        "POST",
        "/api/events/websocket/pg",
        Some(ACCOUNT),
        Some(json!({"enabled": true})),
    )
    .await
    .assert_error(500, "Failed to get instance");
    s.call("GET", "/api/events/getWebsocket/pg", Some(ACCOUNT), None)
        .await
        .assert_error(500, "Failed to get websocket configuration");
    s.call("GET", "/api/instance/list", Some(ACCOUNT), None)
        .await
        .assert_error(500, "Internal server error");
    // Delivery to connected clients goes on from memory: the producer's
    // authorisation is remembered.
    let r = s.publish("pg", event("call.update", json!({"n": 2}))).await;
    assert_eq!(r.status, 202);
    assert_eq!(ws.envelope().await["data"]["n"], 2);
    // A database created again empty answers, but is not the gateway's:
    // not ready, and saying why once it is reached.
    s.db.recreate_empty();
    let lost = eventually(Duration::from_secs(10), async || {
        let r = s.raw("GET", "/readyz", &[], None).await;
        assert_eq!(r.status, 503);
        (r.body["error"]["details"] == "storage has lost its tables").then_some(())
    })
    .await;
    assert!(lost.is_some(), "/readyz never said the tables are gone");
}

/// Parses Prometheus text strictly enough to catch a malformed exposition.
fn parse_prometheus(text: &str) -> Vec<(String, f64)> {
    let mut samples = Vec::new();
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            assert!(
                rest.starts_with("HELP ") || rest.starts_with("TYPE "),
                "{line}"
            );
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line}"));
        let name_end = series.find('{').unwrap_or(series.len());
        let name = &series[..name_end];
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "{line}"
        );
        if name_end < series.len() {
            assert!(series.ends_with('}'), "{line}");
        }
        samples.push((
            series.to_string(),
            value.parse::<f64>().unwrap_or_else(|_| panic!("{line}")),
        ));
    }
    samples
}

#[actix_rt::test]
async fn metrics_parse_and_move() {
    let s = TestServer::start_with(|st| {
        st.ws.tcp_user_timeout_secs = 10;
        st.ws.client_buffer = 4;
    })
    .await;
    s.instance("m").await;
    let mut ws = s.connect("m", "").await;
    let _stalled = common::stalled_client(s.addr, &format!("/ws/m?token={ACCOUNT}")).await;
    s.wait_clients("m", Some(2)).await;
    let r = s.raw("GET", "/metrics", &[], None).await;
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").unwrap().starts_with("text/plain"));
    assert!(r.header("x-ratelimit-limit").is_none());
    let before = parse_prometheus(r.body.as_str().unwrap());
    for name in [
        "eventgate_connected_clients",
        "eventgate_events_published_total",
        "eventgate_events_delivered_total",
    ] {
        assert!(before.iter().any(|(n, _)| n == name), "{name} missing");
    }
    // The gauge moves as a session starts, just after it joined its instance.
    eventually(Duration::from_secs(10), async || {
        (s.metric("eventgate_connected_clients").await == 2.0).then_some(())
    })
    .await
    .expect("the gauge says 2");
    let pad = "x".repeat(64 * 1024);
    // The reading client keeps up; the stalled one falls behind and is evicted.
    for i in 0..200 {
        s.publish("m", event("call.update", json!({"i": i, "pad": pad})))
            .await;
        assert_eq!(ws.envelope().await["data"]["i"], i);
    }
    assert_eq!(s.metric("eventgate_events_published_total").await, 200.0);
    assert!(s.metric("eventgate_events_delivered_total").await >= 200.0);
    // The stalled session may find itself behind only after the reader is
    // done: poll for the eviction, then check it was the one.
    let evicted = "eventgate_clients_evicted_total{reason=\"slow_consumer\"}";
    let seen = common::eventually(common::DEADLINE, async || {
        (s.metric(evicted).await >= 1.0).then_some(())
    })
    .await;
    assert!(seen.is_some(), "the stalled client was not evicted");
    assert_eq!(s.metric(evicted).await, 1.0);
    assert_eq!(
        s.metric("eventgate_ws_upgrades_total{result=\"accepted\"}")
            .await,
        2.0
    );
    let text = s
        .raw("GET", "/metrics", &[], None)
        .await
        .body
        .as_str()
        .unwrap()
        .to_string();
    let samples = parse_prometheus(&text);
    assert!(samples.iter().any(|(n, v)| n.starts_with(
        "eventgate_http_requests_total{route=\"/api/events/publish/{instance}\",status=\"202\"}"
    ) && *v == 200.0));
    assert!(samples
        .iter()
        .any(|(n, _)| n.starts_with("eventgate_fanout_seconds_bucket")));
    assert!(samples.iter().any(|(n, v)| n
        .starts_with("eventgate_instance_connected_clients{instance=\"m#")
        && *v == 1.0));
}

fn run_cli(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_eventgate"))
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_config_masks_secrets() {
    let secret = "super-secret-account-token-value-123";
    let (code, out, _) = run_cli(
        &["check-config"],
        &[
            ("EVENTGATE_ACCOUNT_TOKEN", secret),
            (
                "EVENTGATE_DATABASE_URL",
                "postgres://app:hunter2@db.example:5432/eg",
            ),
        ],
    );
    assert_eq!(code, 0);
    assert!(!out.contains(secret) && !out.contains("hunter2"), "{out}");
    assert!(out.contains("account_token = \"********\""), "{out}");
    assert!(
        out.contains("postgres://app:********@db.example:5432/eg"),
        "{out}"
    );
    let parsed = Settings::from_toml(&out).unwrap();
    assert_eq!(parsed.server.bind, "127.0.0.1:8080");
}

#[test]
fn settings_errors_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "[ws]\nping_interval = 5\n").unwrap();
    let (code, _, err) = run_cli(&["--config", file.to_str().unwrap(), "check-config"], &[]);
    assert_eq!(code, 2);
    assert!(err.contains("ping_interval"), "{err}");
    std::fs::write(&file, "[rate_limit]\nper_minute = \"lots\"\n").unwrap();
    let (code, _, err) = run_cli(&["--config", file.to_str().unwrap(), "check-config"], &[]);
    assert_eq!(code, 2);
    assert!(err.contains("per_minute"), "{err}");
    let (code, _, err) = run_cli(&["check-config"], &[("EVENTGATE_WS_CLIENT_BUFFER", "-1")]);
    assert_eq!(code, 2);
    assert!(err.contains("EVENTGATE_WS_CLIENT_BUFFER"), "{err}");
    let (code, _, err) = run_cli(&["check-config"], &[("EVENTGATE_BIND", "nowhere")]);
    assert_eq!(code, 2);
    assert!(err.contains("server.bind"), "{err}");
}

#[test]
fn down_database_fails_start_up_fast_with_the_real_error() {
    let started = Instant::now();
    let port = common::free_port();
    let (code, _, err) = run_cli(
        &["serve"],
        &[
            (
                "EVENTGATE_DATABASE_URL",
                &format!("postgres://postgres@127.0.0.1:{port}/none"),
            ),
            ("EVENTGATE_BIND", "127.0.0.1:0"),
        ],
    );
    assert_ne!(code, 0);
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(
        err.contains("Connection refused") || err.contains("connection"),
        "{err}"
    );
    // The real error: libpq's own words, naming the host and port it tried
    // and why it failed, reach the operator (not a generic "failed to start").
    let cause =
        format!("connection to server at \"127.0.0.1\", port {port} failed: Connection refused");
    assert!(
        err.contains(&cause),
        "stderr does not name the cause `{cause}`:\n{err}"
    );
}

#[test]
fn account_and_instance_commands() {
    let db = TestDb::fresh();
    let env = [("EVENTGATE_DATABASE_URL", db.url.as_str())];
    let (code, out, _) = run_cli(&["account", "create", "ops"], &env);
    assert_eq!(code, 0);
    let token = out.lines().last().unwrap().trim().to_string();
    assert_eq!(token.len(), 64);
    let (code, out, _) = run_cli(&["account", "list"], &env);
    assert_eq!(code, 0);
    assert!(out.contains("\tops"), "{out}");
    let id = out
        .lines()
        .next()
        .unwrap()
        .split('\t')
        .next()
        .unwrap()
        .to_string();
    let (code, out, _) = run_cli(&["instance", "create", "--account", &id, "line-1"], &env);
    assert_eq!(code, 0, "{out}");
    let (_, out, _) = run_cli(&["instance", "list"], &env);
    assert!(out.contains("line-1\tunconfigured"), "{out}");
    let (code, _, _) = run_cli(&["instance", "delete", "--account", &id, "line-1"], &env);
    assert_eq!(code, 0);
    let (code, _, _) = run_cli(&["instance", "delete", "--account", &id, "line-1"], &env);
    assert_ne!(code, 0);
    // An unknown account and an empty account name are named as such.
    let (code, _, err) = run_cli(&["instance", "create", "--account", "999", "x"], &env);
    assert_eq!(code, 1);
    assert!(
        err.contains("no account 999 (see `eventgate account list`)"),
        "{err}"
    );
    assert_eq!(err.matches("no account 999").count(), 1, "said once: {err}");
    let (code, _, err) = run_cli(&["account", "create", " "], &env);
    assert_eq!(code, 1);
    assert!(err.contains("an account name must not be empty"), "{err}");
    let (code, out, _) = run_cli(&["--help"], &[]);
    assert_eq!(code, 0);
    for word in ["serve", "migrate", "check-config", "account", "instance"] {
        assert!(out.contains(word), "{out}");
    }
    let (code, out, _) = run_cli(&["--version"], &[]);
    assert_eq!(code, 0);
    assert!(out.starts_with("eventgate "));
}

#[actix_rt::test]
async fn offline_deletion_reaches_a_running_node() {
    let s = TestServer::start_with(|st| st.cluster.refresh_secs = 1).await;
    s.instance("offline").await;
    let mut ws = s.connect("offline", "").await;
    {
        let pool = eventgate::storage::connect(&s.db.url, 1, Duration::from_secs(5)).unwrap();
        let mut conn = pool.get().unwrap();
        let gone = eventgate::storage::instances::delete(
            &mut conn,
            eventgate::domain::AccountId(1),
            "offline",
        )
        .unwrap();
        assert!(gone.is_some());
    }
    assert_eq!(ws.closed(Duration::from_secs(5)).await, Some(4004));
}

#[test]
fn journal_lines_have_no_timestamp_and_migrate_runs() {
    let db = TestDb::fresh();
    let env = [
        ("EVENTGATE_DATABASE_URL", db.url.as_str()),
        ("EVENTGATE_LOG", "info"),
    ];
    let (code, out, _) = run_cli(&["migrate"], &env);
    assert_eq!(code, 0);
    assert!(out.contains("migrations applied"));
    // An error line (bad port) under the journal and outside it.
    let mut journal = env.to_vec();
    journal.push(("JOURNAL_STREAM", "8:12345"));
    journal.push((
        "EVENTGATE_DATABASE_URL",
        "postgres://postgres@127.0.0.1:1/none",
    ));
    let (_, _, err) = run_cli(&["serve"], &journal);
    let line = err
        .lines()
        .find(|l| l.contains("ERROR"))
        .expect("an error line");
    assert!(line.starts_with("[ERROR"), "{line}");
    let mut plain = env.to_vec();
    plain.push((
        "EVENTGATE_DATABASE_URL",
        "postgres://postgres@127.0.0.1:1/none",
    ));
    let (_, _, err) = run_cli(&["serve"], &plain);
    let line = err
        .lines()
        .find(|l| l.contains("ERROR"))
        .expect("an error line");
    assert!(
        line.starts_with("[20"),
        "timestamped outside the journal: {line}"
    );
}

/// Starts the binary with a notify socket; returns the process and the socket.
fn start_notified(db: &TestDb) -> (Process, UnixDatagram, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    let p = Process::start(
        db,
        &["serve"],
        &[("NOTIFY_SOCKET", path.to_string_lossy().into_owned())],
    );
    (p, sock, dir)
}

fn kill_now(p: &Process, signal: libc::c_int) {
    let pid = libc::pid_t::try_from(p.child.id()).unwrap();
    // SAFETY: kill(2) on our own child's pid has no memory effects.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::kill(pid, signal) };
    assert_eq!(rc, 0);
}

#[actix_rt::test]
async fn a_stop_right_after_start_is_a_drain() {
    // As soon as the port accepts (before READY=1: migrations still run),
    // and right when READY=1 arrives: both must drain and exit 0.
    for (round, signal) in [libc::SIGTERM, libc::SIGINT, libc::SIGTERM]
        .into_iter()
        .enumerate()
    {
        let db = TestDb::fresh();
        let (mut p, sock, _dir) = start_notified(&db);
        if round == 2 {
            read_notifications(&sock, "READY=1", Duration::from_secs(10));
        }
        kill_now(&p, signal);
        let seen = read_notifications(&sock, "STOPPING=1", Duration::from_secs(10)).join("\n");
        assert!(seen.contains("STOPPING=1"), "round {round}: {seen}");
        let status = p.wait_exit(Duration::from_secs(10)).expect("exited");
        assert_eq!(
            status.code(),
            Some(0),
            "round {round}: {status}; {}",
            p.stderr()
        );
    }
}

#[actix_rt::test]
async fn the_nats_password_is_never_logged_even_at_debug() {
    let db = TestDb::sqlite();
    let env = [
        (
            "EVENTGATE_NATS_URL",
            "nats://user:s3cret-pw@127.0.0.1:1".to_string(),
        ),
        ("EVENTGATE_LOG", "debug".to_string()),
    ];
    let p = Process::start(&db, &["serve"], &env);
    let masked = eventually(common::DEADLINE, async || {
        p.stderr()
            .contains("nats://user:********@127.0.0.1:1")
            .then_some(())
    })
    .await;
    assert!(masked.is_some(), "{}", p.stderr());
    // Connection attempts go on meanwhile (nothing listens there).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let log = p.stderr();
    assert!(log.contains("DEBUG"), "{log}");
    assert!(!log.contains("s3cret-pw"), "{log}");
}
