//! Recovery on reconnect in a cluster (contract §12): nodes on one
//! PostgreSQL database and one NATS server with JetStream share the history,
//! so every node shows the same offsets and epoch and a client recovers on
//! any node, also after the node it was on was killed; a NATS outage turns
//! recovery into `recovered: false` while live delivery goes on.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{event, free_port, Got, Process, TestDb, TestServer, Ws, ACCOUNT, DEFAULT_PG, PG_ENV};
use serde_json::{json, Value};

const REQUIRE: &str = "EVENTGATE_TEST_REQUIRE_SERVICES";

/// Whether the services these tests need are here; prints the skip line
/// (or fails, when they are required) otherwise.
fn services_present() -> bool {
    let required = std::env::var(REQUIRE).is_ok_and(|v| v == "1");
    let pg = std::env::var(PG_ENV)
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| DEFAULT_PG.to_string());
    let pg_up = std::net::TcpStream::connect_timeout(
        &"127.0.0.1:5432".parse().unwrap(),
        Duration::from_secs(1),
    )
    .is_ok();
    let nats_up = Command::new("nats-server")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let missing = if !pg_up {
        Some(format!("no PostgreSQL at {pg}"))
    } else if !nats_up {
        Some("no NATS at nats-server (not installed)".to_string())
    } else {
        None
    };
    match missing {
        None => true,
        Some(what) if required => panic!("{what}"),
        Some(what) => {
            println!("skipped: {what}; set {REQUIRE}=1 to fail instead");
            false
        }
    }
}

/// A nats-server with JetStream of the test's own, on a free port.
struct Nats {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Nats {
    fn start() -> Nats {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let child = Self::spawn(port, dir.path());
        let mut nats = Nats {
            child,
            port,
            _dir: dir,
        };
        nats.wait();
        nats
    }

    /// Starts it again on the same port with empty storage (JetStream lost).
    fn restart_empty(&mut self) {
        self.kill();
        self._dir = tempfile::tempdir().unwrap();
        self.child = Self::spawn(self.port, self._dir.path());
        self.wait();
    }

    /// Starts it again on the same port and storage.
    fn restart(&mut self) {
        self.kill();
        self.child = Self::spawn(self.port, self._dir.path());
        self.wait();
    }

    fn spawn(port: u16, dir: &std::path::Path) -> Child {
        Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    }

    fn wait(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.kill();
    }
}

const SIZE: usize = 1000;

async fn node(db: &TestDb, nats: &Nats) -> TestServer {
    node_keeping(db, nats, SIZE).await
}

async fn node_keeping(db: &TestDb, nats: &Nats, size: usize) -> TestServer {
    let url = nats.url();
    TestServer::start_on(db.shared(), move |s| {
        s.cluster.nats_url = url;
        s.ws.history_size = size;
    })
    .await
}

async fn open(s: &TestServer, name: &str, query: &str) -> (Ws, Value) {
    let url = s.ws_url(&format!("/ws/{name}?token={ACCOUNT}{query}"));
    let (inner, res) = tokio_tungstenite::connect_async(url).await.unwrap();
    assert_eq!(res.status().as_u16(), 101);
    let mut ws = Ws { inner };
    let first = ws.envelope().await;
    assert_eq!(first["event"], "connection.recovery", "{first}");
    (ws, first["data"].clone())
}

async fn resume(s: &TestServer, name: &str, epoch: &str, since: u64) -> (Ws, Value) {
    open(
        s,
        name,
        &format!("&recover=true&epoch={epoch}&since={since}"),
    )
    .await
}

fn n(v: &Value) -> u64 {
    v["data"]["n"]
        .as_u64()
        .unwrap_or_else(|| panic!("no data.n in {v}"))
}

fn offset(v: &Value) -> u64 {
    v["offset"]
        .as_u64()
        .unwrap_or_else(|| panic!("no offset in {v}"))
}

fn ev(n: u64) -> Value {
    event("call.update", json!({"n": n}))
}

async fn read_until(ws: &mut Ws, last: u64) -> Vec<Value> {
    let mut got = Vec::new();
    loop {
        let v = ws.envelope().await;
        let done = v["data"]["n"].as_u64() == Some(last);
        got.push(v);
        if done {
            return got;
        }
    }
}

/// What must be equal on every node: the event, its offset and epoch
/// (`instanceData.baseUrl` is each node's own).
fn positions(frames: &[Value]) -> Vec<(u64, u64, String)> {
    frames
        .iter()
        .map(|v| (n(v), offset(v), v["epoch"].as_str().unwrap().to_string()))
        .collect()
}

fn assert_increasing(frames: &[Value]) {
    for pair in frames.windows(2) {
        assert!(
            offset(&pair[0]) < offset(&pair[1]),
            "{} then {}",
            pair[0],
            pair[1]
        );
    }
}

#[actix_rt::test]
async fn every_node_shows_the_same_offsets_and_a_client_of_a_recovers_on_b() {
    if !services_present() {
        return;
    }
    let nats = Nats::start();
    let db = TestDb::postgres();
    let a = node(&db, &nats).await;
    let b = node(&db, &nats).await;
    a.instance("multi").await;
    let (mut wa, first_a) = open(&a, "multi", "&recover=true").await;
    let (mut wb, first_b) = open(&b, "multi", "&recover=true").await;
    let epoch = first_a["epoch"].as_str().unwrap().to_string();
    assert!(!epoch.is_empty());
    assert_eq!(first_b["epoch"], json!(epoch), "one epoch on every node");
    let mut plain = b.connect("multi", "&events=call.update").await;

    // Published on either node, in one order with one numbering everywhere.
    for i in 1..=10 {
        let node = if i % 2 == 0 { &a } else { &b };
        assert_eq!(node.publish("multi", ev(i)).await.status, 202);
    }
    let got_a = read_until(&mut wa, 10).await;
    let got_b = read_until(&mut wb, 10).await;
    assert_eq!(
        got_a.iter().map(n).collect::<Vec<_>>(),
        (1..=10).collect::<Vec<_>>()
    );
    assert_eq!(
        positions(&got_a),
        positions(&got_b),
        "same offsets and epoch on both nodes"
    );
    assert_increasing(&got_a);
    let since = offset(&got_a[9]);
    for i in 1..=10 {
        let v = plain.envelope().await;
        assert_eq!(n(&v), i);
        assert!(v.get("offset").is_none() && v.get("epoch").is_none(), "{v}");
    }

    // The client of A goes away; events are published on both nodes.
    drop(wa);
    a.wait_clients("multi", Some(0)).await;
    for i in 11..=60 {
        let node = if i % 3 == 0 { &a } else { &b };
        node.publish("multi", ev(i)).await;
    }
    // It reconnects to B while a producer keeps publishing on A.
    let last = 160;
    let producer = async {
        for i in 61..=last {
            assert_eq!(a.publish("multi", ev(i)).await.status, 202);
        }
    };
    let consumer = async {
        let (mut ws, first) = resume(&b, "multi", &epoch, since).await;
        assert_eq!(first["recovered"], true, "{first}");
        assert_eq!(first["epoch"], json!(epoch));
        read_until(&mut ws, last).await
    };
    let ((), got) = tokio::join!(producer, consumer);
    assert_eq!(
        got.iter().map(n).collect::<Vec<_>>(),
        (11..=last).collect::<Vec<_>>(),
        "no gap, no duplicate across the hand-over"
    );
    assert_increasing(&got);
    let all_b = read_until(&mut wb, last).await;
    assert_eq!(
        positions(&all_b),
        positions(&got),
        "the same offsets as B's own client saw live"
    );
    assert!(
        b.metric("eventgate_recoveries_total{recovered=\"true\"}")
            .await
            >= 1.0
    );
}

#[actix_rt::test]
async fn clients_of_a_node_killed_with_sigkill_recover_on_another_node() {
    if !services_present() {
        return;
    }
    let nats = Nats::start();
    let db = TestDb::postgres();
    let b = node(&db, &nats).await;
    b.instance("crash").await;
    let env = [
        ("EVENTGATE_NATS_URL", nats.url()),
        ("EVENTGATE_WS_HISTORY_SIZE", SIZE.to_string()),
    ];
    let mut a_process = Process::start(&db, &["serve"], &env);
    let a = a_process.client(&b.settings);
    // Several clients of A, each at its own position.
    let mut clients = Vec::new();
    let (_, first) = open(&a, "crash", "&recover=true").await;
    let epoch = first["epoch"].as_str().unwrap().to_string();
    for _ in 0..3 {
        clients.push(open(&a, "crash", "&recover=true").await.0);
    }
    for i in 1..=5 {
        b.publish("crash", ev(i)).await;
    }
    let mut positions = Vec::new();
    for (k, ws) in clients.iter_mut().enumerate() {
        // Client k processed events up to k + 1.
        let got = read_until(ws, 5).await;
        positions.push((k as u64 + 1, offset(&got[k])));
    }
    a_process.signal("KILL");
    assert!(a_process.wait_exit(Duration::from_secs(10)).is_some());
    drop(clients);
    for i in 6..=30 {
        b.publish("crash", ev(i)).await;
    }
    for (processed, since) in positions {
        let (mut ws, first) = resume(&b, "crash", &epoch, since).await;
        assert_eq!(first["recovered"], true, "{first}");
        assert_eq!(
            first["epoch"],
            json!(epoch),
            "losing a node keeps the epoch"
        );
        let got = read_until(&mut ws, 30).await;
        assert_eq!(
            got.iter().map(n).collect::<Vec<_>>(),
            (processed + 1..=30).collect::<Vec<_>>()
        );
        assert_increasing(&got);
    }
}

#[actix_rt::test]
async fn a_nats_outage_makes_recovery_false_while_live_delivery_goes_on() {
    if !services_present() {
        return;
    }
    let mut nats = Nats::start();
    let db = TestDb::postgres();
    let a = node(&db, &nats).await;
    a.instance("outage").await;
    let (mut ws, first) = open(&a, "outage", "&recover=true").await;
    let epoch = first["epoch"].as_str().unwrap().to_string();
    a.publish("outage", ev(1)).await;
    let one = ws.envelope().await;
    assert_eq!((n(&one), one["epoch"].as_str()), (1, Some(epoch.as_str())));
    let since = offset(&one);

    nats.kill();
    let deadline = Instant::now() + Duration::from_secs(10);
    while a.raw("GET", "/readyz", &[], None).await.status != 503 {
        assert!(
            Instant::now() < deadline,
            "/readyz never noticed the outage"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Live delivery goes on, numbered locally (another epoch).
    assert_eq!(a.publish("outage", ev(2)).await.status, 202);
    let two = ws.envelope().await;
    assert_eq!(n(&two), 2);
    assert_ne!(two["epoch"], json!(epoch));
    // A client that recovers across the outage learns it cannot.
    let (mut again, first) = resume(&a, "outage", &epoch, since).await;
    assert_eq!(first["recovered"], false);
    a.publish("outage", ev(3)).await;
    assert_eq!(n(&again.envelope().await), 3);
    assert_eq!(n(&ws.envelope().await), 3);

    // NATS back with its storage: the nodes return to the shared epoch, and
    // no event published meanwhile is lost or repeated.
    nats.restart();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut i = 100;
    let mut got = Vec::new();
    loop {
        assert!(
            Instant::now() < deadline,
            "never back to the shared epoch: {got:?}"
        );
        i += 1;
        assert_eq!(a.publish("outage", ev(i)).await.status, 202);
        while let Got::Text(v) = ws.next_within(Duration::from_millis(200)).await {
            got.push(v);
        }
        if got.last().is_some_and(|v| v["epoch"] == json!(epoch)) {
            break;
        }
    }
    while got.last().map(n) != Some(i) {
        match ws.next_within(Duration::from_secs(10)).await {
            Got::Text(v) => got.push(v),
            other => panic!("expected {i}, got {other:?} after {got:?}"),
        }
    }
    assert_eq!(
        got.iter().map(n).collect::<Vec<_>>(),
        (101..=i).collect::<Vec<_>>()
    );
    let back = got.last().unwrap();
    assert!(offset(back) > since);
}

#[actix_rt::test]
async fn deleting_an_instance_clears_the_shared_history() {
    if !services_present() {
        return;
    }
    let nats = Nats::start();
    let db = TestDb::postgres();
    let a = node(&db, &nats).await;
    let b = node(&db, &nats).await;
    a.instance("gone").await;
    let (mut ws, first) = open(&a, "gone", "&recover=true").await;
    let epoch = first["epoch"].as_str().unwrap().to_string();
    a.publish("gone", json!([ev(1), ev(2)])).await;
    let since = offset(&ws.envelope().await);
    let r = b
        .call("DELETE", "/api/instance/delete/gone", Some(ACCOUNT), None)
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(ws.closed(Duration::from_secs(5)).await, Some(4004));
    b.instance("gone").await;
    let (_, first) = resume(&a, "gone", &epoch, since).await;
    assert_eq!(first["recovered"], false);
    assert_ne!(first["epoch"], json!(epoch));
    assert_eq!(first["offset"], 0, "nothing of the old numbering is left");
}

#[actix_rt::test]
async fn the_history_bounds_hold_on_every_node() {
    if !services_present() {
        return;
    }
    let nats = Nats::start();
    let db = TestDb::postgres();
    let a = node_keeping(&db, &nats, 3).await;
    let b = node_keeping(&db, &nats, 3).await;
    a.instance("bounded").await;
    let (mut wa, first) = open(&a, "bounded", "&recover=true").await;
    let epoch = first["epoch"].as_str().unwrap().to_string();
    for i in 1..=5 {
        a.publish("bounded", ev(i)).await;
    }
    let got = read_until(&mut wa, 5).await;
    // B keeps the last three: a client that processed 2 recovers, one that
    // processed 1 cannot.
    let (mut ok, first) = resume(&b, "bounded", &epoch, offset(&got[1])).await;
    assert_eq!(first["recovered"], true, "{first}");
    assert_eq!(
        read_until(&mut ok, 5)
            .await
            .iter()
            .map(n)
            .collect::<Vec<_>>(),
        [3, 4, 5]
    );
    let (_, first) = resume(&b, "bounded", &epoch, offset(&got[0])).await;
    assert_eq!(first["recovered"], false, "{first}");
    assert_eq!(
        b.metric("eventgate_recoveries_total{recovered=\"false\"}")
            .await,
        1.0
    );
}

#[actix_rt::test]
async fn losing_jetstream_changes_the_epoch() {
    if !services_present() {
        return;
    }
    let mut nats = Nats::start();
    let db = TestDb::postgres();
    let a = node(&db, &nats).await;
    a.instance("lost").await;
    let (mut ws, first) = open(&a, "lost", "&recover=true").await;
    let epoch = first["epoch"].as_str().unwrap().to_string();
    a.publish("lost", ev(1)).await;
    let since = offset(&ws.envelope().await);
    drop(ws);
    a.wait_clients("lost", Some(0)).await;
    nats.restart_empty();
    let deadline = Instant::now() + Duration::from_secs(20);
    while a.raw("GET", "/readyz", &[], None).await.status != 200 {
        assert!(Instant::now() < deadline, "NATS never came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (mut again, first) = resume(&a, "lost", &epoch, since).await;
    assert_eq!(first["recovered"], false, "{first}");
    let new_epoch = first["epoch"].as_str().unwrap().to_string();
    assert!(!new_epoch.is_empty() && new_epoch != epoch);
    a.publish("lost", ev(2)).await;
    let v = again.envelope().await;
    assert_eq!((n(&v), v["epoch"].as_str()), (2, Some(new_epoch.as_str())));
}
