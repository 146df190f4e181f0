//! The test harness: a real eventgate on `127.0.0.1:0` with a fresh database
//! per test (a temporary SQLite file, or a new PostgreSQL database when
//! `EVENTGATE_TEST_DATABASE_URL` names a server), plus HTTP and WebSocket
//! helpers and a stalled raw-TCP client.
//!
//! Tests that need a server of their own kind ask for it here:
//! [`require_postgres`] and [`require_nats`] (or [`NatsServer::start`] for a
//! NATS the test may kill) return `None` after printing one line
//! `skipped: no PostgreSQL at <url>; set EVENTGATE_TEST_REQUIRE_SERVICES=1 to fail instead`
//! when the server is unreachable, and panic instead when
//! `EVENTGATE_TEST_REQUIRE_SERVICES=1` (CI sets it). Waiting is done by
//! polling a condition with a deadline ([`eventually`]), never by sleeping.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod recovery;

use std::fmt::Display;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use diesel::{Connection, RunQueryDsl};
use eventgate::settings::Settings;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// The six event types, in the contract's order.
pub const KINDS: [&str; 6] = [
    "message.exchange",
    "message.status",
    "call.update",
    "group.flow",
    "instance.state",
    "label.update",
];

/// The TokenAccount every test server provisions.
pub const ACCOUNT: &str = "test-account-token-0123456789abcdef";

/// The PostgreSQL server tests use instead of SQLite, when set.
pub const PG_ENV: &str = "EVENTGATE_TEST_DATABASE_URL";

/// The machine's PostgreSQL, for tests that always need one.
pub const DEFAULT_PG: &str = "postgres://postgres@127.0.0.1:5432/test";

/// Set to `1`, a test whose PostgreSQL or NATS is unreachable fails instead of skipping.
pub const REQUIRE_ENV: &str = "EVENTGATE_TEST_REQUIRE_SERVICES";

/// The NATS server cluster tests use (default: the machine's, [`DEFAULT_NATS`]).
pub const NATS_ENV: &str = "EVENTGATE_TEST_NATS_URL";

/// The machine's NATS.
pub const DEFAULT_NATS: &str = "nats://127.0.0.1:4222";

/// The `nats-server` binary tests that stop their own NATS run (default:
/// `nats-server` on `PATH`, then `/usr/sbin/nats-server`).
pub const NATS_SERVER_ENV: &str = "EVENTGATE_TEST_NATS_SERVER";

/// How long a probe of PostgreSQL or NATS may take before the server counts
/// as unreachable (libpq's `connect_timeout` takes whole seconds, at least 2).
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// How often [`eventually`] looks again.
pub const POLL_EVERY: Duration = Duration::from_millis(20);

/// What a test waits for a condition at most before it fails.
pub const DEADLINE: Duration = Duration::from_secs(10);

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Whether `EVENTGATE_TEST_REQUIRE_SERVICES` asks for failures instead of skips.
pub fn services_required() -> bool {
    std::env::var(REQUIRE_ENV)
        .map(|v| !matches!(v.trim(), "" | "0" | "false"))
        .unwrap_or(false)
}

/// A URL with its password (if any) masked, for messages.
pub fn masked(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_string();
    };
    let rest = &url[scheme_end..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => match rest[..at].find(':') {
            Some(colon) => format!(
                "{}{}:********{}",
                &url[..scheme_end],
                &rest[..colon],
                &rest[at..]
            ),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

/// A server the test needs is unreachable: print the skip line and let the
/// test return, or fail with `EVENTGATE_TEST_REQUIRE_SERVICES=1` or when
/// `named_by` (the variable that named this server explicitly) is given.
fn unavailable(service: &str, url: &str, why: &dyn Display, named_by: Option<&str>) {
    let url = masked(url);
    if services_required() {
        panic!("no {service} at {url}: {why} ({REQUIRE_ENV} is set, so this fails)");
    }
    if let Some(var) = named_by {
        panic!("no {service} at {url}: {why} ({var} is set, so this fails)");
    }
    // Straight to the process's stderr: libtest captures `println!` and
    // `eprintln!` of passing tests, and this line must be seen.
    let line = format!("skipped: no {service} at {url}; set {REQUIRE_ENV}=1 to fail instead\n");
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// The PostgreSQL server that tests needing one use: `EVENTGATE_TEST_DATABASE_URL`,
/// or the machine's ([`DEFAULT_PG`]).
pub fn postgres_url() -> String {
    std::env::var(PG_ENV)
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| DEFAULT_PG.to_string())
}

/// A fresh PostgreSQL database for a test that needs one whatever the
/// environment says (a server it can take away, a database several nodes
/// share). `None`, after the skip line, when PostgreSQL is unreachable;
/// a failure instead with `EVENTGATE_TEST_REQUIRE_SERVICES=1` or with
/// `EVENTGATE_TEST_DATABASE_URL` set.
pub fn require_postgres() -> Option<TestDb> {
    let url = postgres_url();
    let explicit = std::env::var(PG_ENV).is_ok_and(|u| !u.is_empty());
    match TestDb::try_postgres_on(&url) {
        Ok(db) => Some(db),
        Err(e) => {
            unavailable("PostgreSQL", &url, &e, explicit.then_some(PG_ENV));
            None
        }
    }
}

/// The NATS server for a test that needs one (`EVENTGATE_TEST_NATS_URL`, or
/// the machine's [`DEFAULT_NATS`]): its URL once it answered with its `INFO`
/// line within [`PROBE_TIMEOUT`]; `None`, after the skip line, when it did
/// not (a failure instead when `EVENTGATE_TEST_NATS_URL` named it).
pub fn require_nats() -> Option<String> {
    let url = std::env::var(NATS_ENV)
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| DEFAULT_NATS.to_string());
    let explicit = std::env::var(NATS_ENV).is_ok_and(|u| !u.is_empty());
    match probe_nats(&url) {
        Ok(()) => Some(url),
        Err(e) => {
            unavailable("NATS", &url, &e, explicit.then_some(NATS_ENV));
            None
        }
    }
}

/// Connects to a NATS URL and reads the server's greeting.
fn probe_nats(url: &str) -> Result<(), String> {
    use std::net::ToSocketAddrs;
    let hostport = url
        .split("://")
        .nth(1)
        .unwrap_or(url)
        .rsplit('@')
        .next()
        .unwrap_or_default()
        .trim_end_matches('/');
    let hostport = if hostport.contains(':') {
        hostport.to_string()
    } else {
        format!("{hostport}:4222")
    };
    let addr = hostport
        .to_socket_addrs()
        .map_err(|e| format!("{hostport}: {e}"))?
        .next()
        .ok_or_else(|| format!("{hostport}: no address"))?;
    let mut stream =
        std::net::TcpStream::connect_timeout(&addr, PROBE_TIMEOUT).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(PROBE_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let mut greeting = [0u8; 5];
    stream
        .read_exact(&mut greeting)
        .map_err(|e| format!("no greeting: {e}"))?;
    if &greeting != b"INFO " {
        return Err(format!(
            "not a NATS server (it said {:?})",
            String::from_utf8_lossy(&greeting)
        ));
    }
    Ok(())
}

/// A subject prefix no other test uses, so that tests sharing one NATS
/// server do not hear each other.
pub fn unique_subject_prefix() -> String {
    format!(
        "egtest{}x{}x{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        rand_suffix()
    )
}

/// A nats-server of the test's own on a free port, for tests that stop it
/// or read its monitoring endpoint.
pub struct NatsServer {
    child: std::process::Child,
    pub port: u16,
    /// Its HTTP monitoring port (`/connz`).
    monitor: u16,
}

impl NatsServer {
    /// Starts one on a free port; `None`, after the skip line, when
    /// `nats-server` cannot be run here (a failure instead when
    /// `EVENTGATE_TEST_NATS_SERVER` named the binary).
    pub fn start() -> Option<NatsServer> {
        Self::start_on(free_port())
    }

    /// Starts one on `port` (again, after [`NatsServer::kill`]).
    pub fn start_on(port: u16) -> Option<NatsServer> {
        let url = format!("nats://127.0.0.1:{port}");
        let named_by = std::env::var(NATS_SERVER_ENV)
            .is_ok_and(|b| !b.is_empty())
            .then_some(NATS_SERVER_ENV);
        let binary = std::env::var(NATS_SERVER_ENV)
            .ok()
            .filter(|b| !b.is_empty())
            .or_else(|| {
                let on_path = std::env::var_os("PATH").is_some_and(|path| {
                    std::env::split_paths(&path).any(|d| d.join("nats-server").is_file())
                });
                (!on_path && std::path::Path::new("/usr/sbin/nats-server").is_file())
                    .then(|| "/usr/sbin/nats-server".to_string())
            })
            .unwrap_or_else(|| "nats-server".to_string());
        let monitor = free_port();
        let child = match std::process::Command::new(&binary)
            .args(["-a", "127.0.0.1", "-p", &port.to_string()])
            .args(["-m", &monitor.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
        {
            Ok(child) => child,
            Err(e) => {
                unavailable("NATS", &url, &format!("{binary}: {e}"), named_by);
                return None;
            }
        };
        let mut server = NatsServer {
            child,
            port,
            monitor,
        };
        let listening = eventually_blocking(DEADLINE, || {
            if let Ok(Some(status)) = server.child.try_wait() {
                return Some(Err(format!("{binary} exited with {status}")));
            }
            probe_nats(&url).ok().map(Ok)
        });
        match listening {
            Some(Ok(())) => Some(server),
            Some(Err(why)) => {
                unavailable("NATS", &url, &why, named_by);
                None
            }
            None => {
                server.kill();
                unavailable("NATS", &url, &"did not listen within 10 s", named_by);
                None
            }
        }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The server's `/connz?subs=1`: its client connections, with their
    /// message counts and subscriptions.
    pub fn connz(&self) -> Value {
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", self.monitor))
            .expect("the NATS monitoring port accepts");
        stream
            .write_all(b"GET /connz?subs=1 HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .expect("request sent");
        let mut reply = String::new();
        stream.read_to_string(&mut reply).expect("reply read");
        let body = reply.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        serde_json::from_str(body).unwrap_or_else(|e| panic!("/connz is not JSON ({e}): {reply}"))
    }

    /// Stops the server (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `check` every [`POLL_EVERY`] until it yields `Some`; `None` when
/// `within` passed first (the caller fails the test with what it waited for).
pub async fn eventually<T>(
    within: Duration,
    mut check: impl AsyncFnMut() -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        // Paces the polling; the condition, not this pause, is what is waited for.
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// [`eventually`] for blocking code: `None` when `within` passed first.
pub fn eventually_blocking<T>(within: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        // Paces the polling; the condition, not this pause, is what is waited for.
        std::thread::sleep(POLL_EVERY);
    }
}

/// A database that lives as long as the test.
pub struct TestDb {
    pub url: String,
    _dir: Option<tempfile::TempDir>,
    pg_admin: Option<(String, String)>,
}

impl TestDb {
    /// A fresh database: a temporary SQLite file, or a new PostgreSQL database
    /// when `EVENTGATE_TEST_DATABASE_URL` is set (then an unreachable
    /// PostgreSQL fails the test: that run is meant to be on PostgreSQL).
    pub fn fresh() -> TestDb {
        match std::env::var(PG_ENV).ok().filter(|u| !u.is_empty()) {
            Some(admin_url) => Self::try_postgres_on(&admin_url).unwrap_or_else(|e| {
                panic!(
                    "{PG_ENV}={} is set, but no database could be made there: {e}",
                    masked(&admin_url)
                )
            }),
            None => Self::sqlite(),
        }
    }

    /// A new database on the PostgreSQL server of `admin_url` (a database
    /// URL the test may `CREATE DATABASE` with).
    pub fn try_postgres_on(admin_url: &str) -> Result<TestDb, String> {
        let name = format!(
            "eg_{}_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            rand_suffix()
        );
        let mut admin = admin_connection(admin_url)?;
        diesel::sql_query(format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .map_err(|e| format!("CREATE DATABASE {name}: {e}"))?;
        let scheme_end = admin_url
            .find("://")
            .ok_or_else(|| format!("{PG_ENV} must be a URL"))?
            + 3;
        let slash = admin_url[scheme_end..]
            .find('/')
            .map(|i| i + scheme_end)
            .ok_or_else(|| format!("{PG_ENV} must end with /<database>"))?;
        // The test process itself holds pools of several servers: without TLS,
        // no OpenSSL state is in use by pool threads when the process exits.
        let url = format!("{}/{}?sslmode=disable", &admin_url[..slash], name);
        Ok(TestDb {
            url,
            _dir: None,
            pg_admin: Some((admin_url.to_string(), name)),
        })
    }

    /// A fresh SQLite file in a temporary directory.
    pub fn sqlite() -> TestDb {
        let dir = tempfile::tempdir().unwrap();
        let url = dir
            .path()
            .join("eventgate.sqlite3")
            .to_string_lossy()
            .into_owned();
        TestDb {
            url,
            _dir: Some(dir),
            pg_admin: None,
        }
    }

    /// Drops the PostgreSQL database under a running server (connections are cut).
    pub fn take_away(&self) {
        self.on_the_database("DROP DATABASE IF EXISTS {} WITH (FORCE)");
    }

    /// Creates the dropped PostgreSQL database again, empty (no tables).
    pub fn recreate_empty(&self) {
        self.on_the_database("CREATE DATABASE {}");
    }

    /// Runs `statement` (`{}` standing for the database's name) on the
    /// PostgreSQL server's admin connection; nothing on SQLite.
    fn on_the_database(&self, statement: &str) {
        if let Some((admin_url, name)) = &self.pg_admin {
            let mut admin = admin_connection(admin_url).unwrap();
            diesel::sql_query(statement.replace("{}", name))
                .execute(&mut admin)
                .unwrap();
        }
    }

    /// Another handle on an existing database (for a second node); dropping
    /// it leaves the database alone.
    pub fn shared(&self) -> TestDb {
        TestDb {
            url: self.url.clone(),
            _dir: None,
            pg_admin: None,
        }
    }

    pub fn is_postgres(&self) -> bool {
        self.pg_admin.is_some()
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some((admin_url, name)) = &self.pg_admin {
            if let Ok(mut admin) = admin_connection(admin_url) {
                let _ = diesel::sql_query(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .execute(&mut admin);
            }
        }
    }
}

/// A connection to the server of `admin_url` that gives up after
/// [`PROBE_TIMEOUT`] rather than hanging on an unanswering host.
fn admin_connection(admin_url: &str) -> Result<diesel::PgConnection, String> {
    let sep = if admin_url.contains('?') { '&' } else { '?' };
    let url = format!(
        "{admin_url}{sep}connect_timeout={}",
        PROBE_TIMEOUT.as_secs().max(2)
    );
    diesel::PgConnection::establish(&url).map_err(|e| e.to_string().trim().to_string())
}

fn rand_suffix() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(
        std::time::SystemTime::now()
            .elapsed()
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0),
    );
    h.finish() as u32
}

/// Settings for a test server: contract defaults (but a high general rate
/// limit), the test account, the given database.
pub fn test_settings(db: &TestDb) -> Settings {
    let mut s = Settings::default();
    s.server.bind = "127.0.0.1:0".into();
    s.storage.database_url = db.url.clone();
    s.auth.account_token = ACCOUNT.into();
    s.server.shutdown_drain_secs = 2;
    // Helpers poll the API; tests of the limits set them back explicitly.
    s.rate_limit.per_minute = 100_000;
    s
}

/// A running in-process server.
pub struct TestServer {
    pub addr: SocketAddr,
    pub db: TestDb,
    pub settings: Settings,
}

impl TestServer {
    /// Starts a server with default test settings.
    pub async fn start() -> TestServer {
        Self::start_with(|_| {}).await
    }

    /// Starts a server after `tweak` adjusts its settings.
    pub async fn start_with(tweak: impl FnOnce(&mut Settings)) -> TestServer {
        Self::start_on(TestDb::fresh(), tweak).await
    }

    /// Starts a server on an existing database.
    pub async fn start_on(db: TestDb, tweak: impl FnOnce(&mut Settings)) -> TestServer {
        // The server's log (warnings and up, or `EVENTGATE_LOG`), shown with
        // a failing test's output: the error behind a 500 is logged there.
        let _ = env_logger::Builder::from_env(
            env_logger::Env::new().filter_or("EVENTGATE_LOG", "warn"),
        )
        .is_test(true)
        .try_init();
        let mut settings = test_settings(&db);
        tweak(&mut settings);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let s = settings.clone();
        actix_rt::spawn(async move {
            if let Err(e) = eventgate::run(s, listener).await {
                panic!("server failed: {e}");
            }
        });
        let server = TestServer { addr, db, settings };
        eventually(DEADLINE, async || {
            matches!(
                server.try_request("GET", "/readyz", &[], None).await,
                Ok((200, _, _))
            )
            .then_some(())
        })
        .await
        .expect("server did not become ready");
        server
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    pub async fn try_request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Result<(u16, Vec<(String, String)>, Value), String> {
        let client = awc::Client::builder()
            .timeout(Duration::from_secs(20))
            .finish();
        let method = awc::http::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = client.request(method, self.url(path));
        for (k, v) in headers {
            req = req.insert_header((*k, *v));
        }
        let mut res = match body {
            Some(b) => req.send_body(b.to_vec()).await,
            None => req.send().await,
        }
        .map_err(|e| e.to_string())?;
        let status = res.status().as_u16();
        let headers = res
            .headers()
            .iter()
            .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
            .collect();
        let bytes = res
            .body()
            .limit(64 << 20)
            .await
            .map_err(|e| e.to_string())?;
        let value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        Ok((status, headers, value))
    }

    /// Any request; returns status, headers and the body (JSON, or a JSON string of the text).
    pub async fn raw(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Reply {
        let (status, headers, body) = self.try_request(method, path, headers, body).await.unwrap();
        Reply {
            status,
            headers,
            body,
        }
    }

    /// A request with a `token` header (when given) and a JSON body (when given).
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Reply {
        let mut headers = vec![("content-type", "application/json")];
        if let Some(t) = token {
            headers.push(("token", t));
        }
        let body = body.map(|b| serde_json::to_vec(&b).unwrap());
        self.raw(method, path, &headers, body.as_deref()).await
    }

    /// Provisions another account with `token`, offline as an operator would.
    pub fn add_account(&self, token: &str) {
        let pool = eventgate::storage::connect(&self.db.url, 1, Duration::from_secs(5)).unwrap();
        let mut conn = pool.get().unwrap();
        eventgate::storage::accounts::ensure(
            &mut conn,
            "other",
            &eventgate::auth::token_hash(token),
        )
        .unwrap();
    }

    /// Creates an instance with WebSocket enabled (all events); returns its TokenInstance.
    pub async fn instance(&self, name: &str) -> String {
        self.instance_with(name, json!({"name": name, "websocketEnabled": true}))
            .await
    }

    /// Creates an instance from a full body; returns its TokenInstance.
    pub async fn instance_with(&self, name: &str, body: Value) -> String {
        self.create_as(ACCOUNT, name, body).await
    }

    /// Creates an instance with WebSocket enabled under another account
    /// (see [`TestServer::add_account`]); returns its TokenInstance.
    pub async fn instance_of(&self, account: &str, name: &str) -> String {
        self.create_as(
            account,
            name,
            json!({"name": name, "websocketEnabled": true}),
        )
        .await
    }

    async fn create_as(&self, account: &str, name: &str, body: Value) -> String {
        let r = self
            .call("POST", "/api/instance/new", Some(account), Some(body))
            .await;
        assert_eq!(r.status, 201, "creating {name}: {:?}", r.body);
        r.body["instance"]["token"].as_str().unwrap().to_string()
    }

    /// Sets an instance's WebSocket settings (asserting 200).
    pub async fn configure(&self, name: &str, settings: Value) -> Value {
        let r = self
            .call(
                "POST",
                &format!("/api/events/websocket/{name}"),
                Some(ACCOUNT),
                Some(settings),
            )
            .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        r.body["websocket"].clone()
    }

    /// Publishes a body (one event or an array) with the account token.
    pub async fn publish(&self, name: &str, body: Value) -> Reply {
        self.call(
            "POST",
            &format!("/api/events/publish/{name}"),
            Some(ACCOUNT),
            Some(body),
        )
        .await
    }

    /// Opens a WebSocket to the instance with the account token and `query`
    /// appended, and returns once this session has joined: the instance's
    /// connected count on this node rose by one from what it was before.
    /// (A client that left just before must have been counted out first:
    /// see [`TestServer::wait_clients`].)
    pub async fn connect(&self, name: &str, query: &str) -> Ws {
        let before = self.clients(name).await;
        let url = self.ws_url(&format!("/ws/{name}?token={ACCOUNT}{query}"));
        let (ws, res) = tokio_tungstenite::connect_async(url).await.unwrap();
        assert_eq!(res.status().as_u16(), 101);
        let ws = Ws { inner: ws };
        let mut now = before;
        let joined = eventually(DEADLINE, async || {
            now = self.clients(name).await;
            (now > before).then_some(())
        })
        .await;
        assert!(
            joined.is_some(),
            "instance {name}: the connected count never rose from {before} to {} (now {now})",
            before + 1
        );
        ws
    }

    /// The instance's connected clients on this node (`connectedClients` of
    /// `/api/instance/list`; 0 while it is not listed).
    pub async fn clients(&self, name: &str) -> u64 {
        let r = self
            .call("GET", "/api/instance/list", Some(ACCOUNT), None)
            .await;
        assert_eq!(r.status, 200, "listing instances: {}", r.body);
        r.body["instances"]
            .as_array()
            .and_then(|a| a.iter().find(|i| i["name"] == name))
            .map_or(0, |item| item["connectedClients"].as_u64().unwrap_or(0))
    }

    /// Waits until the instance has at least one client (or exactly `n`) on this node.
    pub async fn wait_clients(&self, name: &str, n: Option<u64>) {
        let mut last = 0;
        let reached = eventually(DEADLINE, async || {
            last = self.clients(name).await;
            n.map_or(last > 0, |n| last == n).then_some(())
        })
        .await;
        assert!(
            reached.is_some(),
            "instance {name} never reached {n:?} clients (last seen: {last})"
        );
    }

    /// The value of a metric line (`name{labels}` exactly as rendered), 0 when absent.
    pub async fn metric(&self, series: &str) -> f64 {
        let r = self.raw("GET", "/metrics", &[], None).await;
        let text = r.body.as_str().unwrap_or("").to_string();
        text.lines()
            .find_map(|l| {
                l.strip_prefix(series)
                    .and_then(|rest| rest.strip_prefix(' '))
            })
            .map(|v| v.trim().parse().unwrap())
            .unwrap_or(0.0)
    }
}

/// An HTTP reply.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Value,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Asserts the contract's error envelope with this status and message.
    pub fn assert_error(&self, status: u16, message: &str) {
        assert_eq!(self.status, status, "body: {}", self.body);
        assert_eq!(self.body["success"], json!(false), "body: {}", self.body);
        assert_eq!(
            self.body["error"]["message"],
            json!(message),
            "body: {}",
            self.body
        );
        let keys: Vec<_> = self.body.as_object().unwrap().keys().cloned().collect();
        assert_eq!(
            keys,
            vec!["success", "error"],
            "nothing else at the top level"
        );
    }
}

/// A WebSocket client.
pub struct Ws {
    pub inner: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

/// What the next frame was.
#[derive(Debug, PartialEq)]
pub enum Got {
    Text(Value),
    Closed(Option<u16>),
    Nothing,
}

impl Ws {
    /// The next text frame or close within `wait` (pings are answered and skipped).
    pub async fn next_within(&mut self, wait: Duration) -> Got {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match tokio::time::timeout(left, self.inner.next()).await {
                Err(_) => return Got::Nothing,
                Ok(None) => return Got::Closed(None),
                Ok(Some(Err(_))) => return Got::Closed(None),
                Ok(Some(Ok(Message::Text(t)))) => {
                    return Got::Text(serde_json::from_str(&t).unwrap())
                }
                Ok(Some(Ok(Message::Close(frame)))) => {
                    return Got::Closed(frame.map(|f| u16::from(f.code)))
                }
                Ok(Some(Ok(_))) => continue,
            }
        }
    }

    /// The next envelope (panics on anything else within 5 s).
    pub async fn envelope(&mut self) -> Value {
        self.envelope_within(Duration::from_secs(5)).await
    }

    /// The next text frame, which must come within `wait`.
    pub async fn envelope_within(&mut self, wait: Duration) -> Value {
        match self.next_within(wait).await {
            Got::Text(v) => v,
            other => panic!("expected an envelope within {wait:?}, got {other:?}"),
        }
    }

    /// Asserts nothing arrives within `wait`.
    pub async fn silent(&mut self, wait: Duration) {
        let got = self.next_within(wait).await;
        assert_eq!(got, Got::Nothing);
    }

    /// Waits for a close and returns its code.
    pub async fn closed(&mut self, wait: Duration) -> Option<u16> {
        loop {
            match self.next_within(wait).await {
                Got::Closed(code) => return code,
                Got::Text(_) => continue,
                Got::Nothing => panic!("no close within {wait:?}"),
            }
        }
    }

    pub async fn send(&mut self, msg: Message) {
        self.inner.send(msg).await.unwrap();
    }
}

/// The code the contract names, for readable asserts.
pub fn code(c: CloseCode) -> u16 {
    u16::from(c)
}

/// A raw TCP client that completes the WebSocket handshake and then never
/// reads again (small receive buffer), to play a stalled consumer.
pub async fn stalled_client(addr: SocketAddr, path: &str) -> tokio::net::TcpStream {
    upgraded_socket(addr, path, Some(4096)).await
}

/// A raw TCP client past the WebSocket handshake, reading at whatever pace
/// the test does (its frames: [`server_frames`]).
pub async fn raw_ws_client(addr: SocketAddr, path: &str) -> tokio::net::TcpStream {
    upgraded_socket(addr, path, None).await
}

async fn upgraded_socket(
    addr: SocketAddr,
    path: &str,
    recv_buffer: Option<u32>,
) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    if let Some(bytes) = recv_buffer {
        socket.set_recv_buffer_size(bytes).unwrap();
    }
    let mut stream = socket.connect(addr).await.unwrap();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    stream
}

/// Server → client frames (unmasked) in a byte stream: (opcode, payload).
pub fn server_frames(mut bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    while bytes.len() >= 2 {
        let opcode = bytes[0] & 0x0f;
        let (len, head) = match bytes[1] & 0x7f {
            126 if bytes.len() >= 4 => (u16::from_be_bytes([bytes[2], bytes[3]]) as usize, 4),
            127 if bytes.len() >= 10 => (
                u64::from_be_bytes(bytes[2..10].try_into().unwrap()) as usize,
                10,
            ),
            n if n < 126 => (n as usize, 2),
            _ => break,
        };
        if bytes.len() < head + len {
            break;
        }
        out.push((opcode, bytes[head..head + len].to_vec()));
        bytes = &bytes[head + len..];
    }
    out
}

/// An event body for publishing.
pub fn event(kind: &str, data: Value) -> Value {
    json!({"event": kind, "data": data})
}

/// The real `eventgate` binary, started as an operator would.
pub struct Process {
    pub child: std::process::Child,
    pub addr: SocketAddr,
    pub stderr_path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Process {
    /// Starts `eventgate <args>` with `env` (plus a free port and the test
    /// account) and waits until `/healthz` answers.
    pub fn start(db: &TestDb, args: &[&str], env: &[(&str, String)]) -> Process {
        let dir = tempfile::tempdir().unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let stderr_path = dir.path().join("stderr.log");
        let stderr = std::fs::File::create(&stderr_path).unwrap();
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_eventgate"));
        cmd.args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("EVENTGATE_BIND", addr.to_string())
            .env("EVENTGATE_DATABASE_URL", &db.url)
            .env("EVENTGATE_ACCOUNT_TOKEN", ACCOUNT)
            .env("EVENTGATE_RATE_LIMIT_PER_MINUTE", "100000")
            .stdout(std::process::Stdio::null())
            .stderr(stderr);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().unwrap();
        let mut p = Process {
            child,
            addr,
            stderr_path,
            _dir: dir,
        };
        let listening = eventually_blocking(DEADLINE, || {
            if let Ok(Some(status)) = p.child.try_wait() {
                panic!("eventgate exited with {status}: {}", p.stderr());
            }
            std::net::TcpStream::connect(addr).ok().map(|_| ())
        });
        if listening.is_none() {
            let _ = p.child.kill();
            panic!("eventgate did not listen: {}", p.stderr());
        }
        p
    }

    /// What the process wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Sends a signal by name (TERM, INT, HUP, KILL).
    pub fn signal(&self, name: &str) {
        let status = std::process::Command::new("kill")
            .args([format!("-{name}"), self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits up to `wait` for the process to exit.
    pub fn wait_exit(&mut self, wait: Duration) -> Option<std::process::ExitStatus> {
        eventually_blocking(wait, || self.child.try_wait().ok().flatten())
    }

    /// A `TestServer` view for the HTTP and WebSocket helpers (no database of its own).
    pub fn client(&self, settings: &Settings) -> TestServer {
        TestServer {
            addr: self.addr,
            db: TestDb {
                url: String::new(),
                _dir: None,
                pg_admin: None,
            },
            settings: settings.clone(),
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
