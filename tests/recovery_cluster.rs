//! Recovery on reconnect in a cluster (contract §12): nodes on one
//! PostgreSQL database and one NATS server with JetStream share the history,
//! so every node shows the same offsets and epoch and a client recovers on
//! any node, also after the node it was on was killed, or at once on a node
//! that has not heard of its `since` yet; a NATS outage turns
//! recovery into `recovered: false` while live delivery goes on, and a node
//! cut off while JetStream lost the history never answers from the lost
//! epoch and delivers what the new one holds; a node whose first load is
//! slower than a join waits delivers what was accepted after it admitted it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{Shutdown, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::recovery::{assert_increasing, ev, n, offset, open, read_until, resume};
use common::{
    eventually, free_port, require_nats, require_postgres, services_required,
    unique_subject_prefix, Got, Process, TestDb, TestServer, ACCOUNT, REQUIRE_ENV,
};
use futures_util::StreamExt;
use serde_json::{json, Value};

/// A nats-server with JetStream of the test's own, on a free port.
struct Nats {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Nats {
    /// `None`, after the skip line, when `nats-server` cannot run here.
    fn start() -> Option<Nats> {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let child = match Self::try_spawn(port, dir.path()) {
            Ok(child) => child,
            Err(e) => {
                let line = format!("no NATS at nats://127.0.0.1:{port}: nats-server: {e}");
                assert!(!services_required(), "{line} ({REQUIRE_ENV} is set)");
                eprintln!("skipped: no NATS at nats://127.0.0.1:{port}; set {REQUIRE_ENV}=1 to fail instead");
                return None;
            }
        };
        let mut nats = Nats {
            child,
            port,
            _dir: dir,
        };
        nats.wait();
        Some(nats)
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
        Self::try_spawn(port, dir).unwrap()
    }

    fn try_spawn(port: u16, dir: &std::path::Path) -> std::io::Result<Child> {
        let binary = if std::path::Path::new("/usr/sbin/nats-server").is_file() {
            "/usr/sbin/nats-server"
        } else {
            "nats-server"
        };
        Command::new(binary)
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
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

/// A NATS with JetStream for a test: the machine's (shared, so each test
/// has its own subject prefix, hence its own stream) or one of its own.
struct Cluster {
    url: String,
    prefix: String,
}

impl Cluster {
    fn shared(url: String) -> Cluster {
        Cluster {
            url,
            prefix: unique_subject_prefix(),
        }
    }

    fn own(nats: &Nats) -> Cluster {
        Cluster {
            url: nats.url(),
            prefix: "eventgate".into(),
        }
    }

    async fn node(&self, db: &TestDb) -> TestServer {
        self.node_keeping(db, SIZE).await
    }

    /// A node that reaches this NATS at `url` (a relay in front of it).
    async fn node_via(&self, db: &TestDb, url: String) -> TestServer {
        self.node_at(db, url, SIZE).await
    }

    async fn node_keeping(&self, db: &TestDb, size: usize) -> TestServer {
        self.node_at(db, self.url.clone(), size).await
    }

    async fn node_at(&self, db: &TestDb, url: String, size: usize) -> TestServer {
        let prefix = self.prefix.clone();
        TestServer::start_on(db.shared(), move |s| {
            s.cluster.nats_url = url;
            s.cluster.subject_prefix = prefix;
            s.ws.history_size = size;
        })
        .await
    }

    /// Removes the test's stream from a shared server.
    async fn clean_up(&self) {
        let client = async_nats::connect(self.url.as_str()).await.unwrap();
        let js = async_nats::jetstream::new(client);
        let _ = js.delete_stream(format!("{}_HISTORY", self.prefix)).await;
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

#[actix_rt::test]
async fn every_node_shows_the_same_offsets_and_a_client_of_a_recovers_on_b() {
    let Some(db) = require_postgres() else {
        return;
    };
    let Some(url) = require_nats() else {
        return;
    };
    let cluster = Cluster::shared(url);
    let a = cluster.node(&db).await;
    let b = cluster.node(&db).await;
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
        let (mut ws, first) = resume(&b, "multi", &epoch, since, "").await;
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
    cluster.clean_up().await;
}

#[actix_rt::test]
async fn clients_of_a_node_killed_with_sigkill_recover_on_another_node() {
    let Some(db) = require_postgres() else {
        return;
    };
    let Some(url) = require_nats() else {
        return;
    };
    let cluster = Cluster::shared(url);
    let b = cluster.node(&db).await;
    b.instance("crash").await;
    let env = [
        ("EVENTGATE_NATS_URL", cluster.url.clone()),
        ("EVENTGATE_CLUSTER__SUBJECT_PREFIX", cluster.prefix.clone()),
        ("EVENTGATE_WS_HISTORY_SIZE", SIZE.to_string()),
    ];
    let mut a_process = Process::start(&db, &["serve"], &env);
    let a = a_process.client(&b.settings);
    // Several clients of A, each at its own position.
    let mut clients = Vec::new();
    // A process listens before it has reached JetStream: a client that came
    // that early would be numbered locally. A shows B's epoch once it has.
    let (_, first) = open(&b, "crash", "&recover=true").await;
    let epoch = first["epoch"].as_str().unwrap().to_string();
    eventually(Duration::from_secs(20), async || {
        let (_, first) = open(&a, "crash", "&recover=true").await;
        (first["epoch"] == epoch.as_str()).then_some(())
    })
    .await
    .expect("A never showed the shared epoch");
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
        let (mut ws, first) = resume(&b, "crash", &epoch, since, "").await;
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
    cluster.clean_up().await;
}

#[actix_rt::test]
async fn a_nats_outage_makes_recovery_false_while_live_delivery_goes_on() {
    let Some(db) = require_postgres() else {
        return;
    };
    let Some(mut nats) = Nats::start() else {
        return;
    };
    let cluster = Cluster::own(&nats);
    let a = cluster.node(&db).await;
    a.instance("outage").await;
    let (mut ws, first) = open(&a, "outage", "&recover=true").await;
    let epoch = first["epoch"].as_str().unwrap().to_string();
    a.publish("outage", ev(1)).await;
    let one = ws.envelope().await;
    assert_eq!((n(&one), one["epoch"].as_str()), (1, Some(epoch.as_str())));
    let since = offset(&one);

    nats.kill();
    wait_ready(&a, 503).await;
    // Live delivery goes on, numbered locally (another epoch).
    assert_eq!(a.publish("outage", ev(2)).await.status, 202);
    let two = ws.envelope().await;
    assert_eq!(n(&two), 2);
    assert_ne!(two["epoch"], json!(epoch));
    // A client that recovers across the outage learns it cannot.
    let (mut again, first) = resume(&a, "outage", &epoch, since, "").await;
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
    let Some(db) = require_postgres() else {
        return;
    };
    let Some(url) = require_nats() else {
        return;
    };
    let cluster = Cluster::shared(url);
    let a = cluster.node(&db).await;
    let b = cluster.node(&db).await;
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
    let (_, first) = resume(&a, "gone", &epoch, since, "").await;
    assert_eq!(first["recovered"], false);
    assert_ne!(first["epoch"], json!(epoch));
    assert_eq!(first["offset"], 0, "nothing of the old numbering is left");
    cluster.clean_up().await;
}

#[actix_rt::test]
async fn the_history_bounds_hold_on_every_node() {
    let Some(db) = require_postgres() else {
        return;
    };
    let Some(url) = require_nats() else {
        return;
    };
    let cluster = Cluster::shared(url);
    let a = cluster.node_keeping(&db, 3).await;
    let b = cluster.node_keeping(&db, 3).await;
    a.instance("bounded").await;
    let (mut wa, first) = open(&a, "bounded", "&recover=true").await;
    let epoch = first["epoch"].as_str().unwrap().to_string();
    for i in 1..=5 {
        a.publish("bounded", ev(i)).await;
    }
    let got = read_until(&mut wa, 5).await;
    // B keeps the last three: a client that processed 2 recovers, one that
    // processed 1 cannot.
    let (mut ok, first) = resume(&b, "bounded", &epoch, offset(&got[1]), "").await;
    assert_eq!(first["recovered"], true, "{first}");
    assert_eq!(
        read_until(&mut ok, 5)
            .await
            .iter()
            .map(n)
            .collect::<Vec<_>>(),
        [3, 4, 5]
    );
    let (_, first) = resume(&b, "bounded", &epoch, offset(&got[0]), "").await;
    assert_eq!(first["recovered"], false, "{first}");
    assert_eq!(
        b.metric("eventgate_recoveries_total{recovered=\"false\"}")
            .await,
        1.0
    );
    cluster.clean_up().await;
}

#[actix_rt::test]
async fn losing_jetstream_changes_the_epoch() {
    let Some(db) = require_postgres() else {
        return;
    };
    let Some(mut nats) = Nats::start() else {
        return;
    };
    let cluster = Cluster::own(&nats);
    let a = cluster.node(&db).await;
    a.instance("lost").await;
    let (mut ws, first) = open(&a, "lost", "&recover=true").await;
    let epoch = first["epoch"].as_str().unwrap().to_string();
    a.publish("lost", ev(1)).await;
    let since = offset(&ws.envelope().await);
    drop(ws);
    a.wait_clients("lost", Some(0)).await;
    nats.restart_empty();
    wait_ready(&a, 200).await;
    // Ready again does not yet mean the node's follower has looked at the
    // new JetStream: a recovery waits until it has, and is never answered
    // from the lost epoch.
    let (mut again, first) = resume(&a, "lost", &epoch, since, "").await;
    assert_eq!(first["recovered"], false, "{first}");
    let new_epoch = first["epoch"].as_str().unwrap().to_string();
    assert!(!new_epoch.is_empty() && new_epoch != epoch);
    a.publish("lost", ev(2)).await;
    let v = again.envelope().await;
    assert_eq!((n(&v), v["epoch"].as_str()), (2, Some(new_epoch.as_str())));
}

/// A node cut off from NATS while JetStream loses the history, as another
/// node accepts events into the new one: a client of the cut-off node that
/// recovers meanwhile learns it cannot (the node cannot know what the epoch
/// holds), and once the node is back its clients get what the new history
/// holds live, in the new epoch, instead of its mirror loading it unseen.
#[actix_rt::test]
async fn a_node_cut_off_while_jetstream_lost_the_history_delivers_what_the_new_one_holds() {
    let Some(db) = require_postgres() else {
        return;
    };
    let Some(mut nats) = Nats::start() else {
        return;
    };
    let relay = Relay::start(nats.port);
    let cluster = Cluster::own(&nats);
    let a = cluster.node_via(&db, relay.url()).await;
    let b = cluster.node(&db).await;
    b.instance("cut").await;
    let (mut ws, first) = open(&a, "cut", "&recover=true").await;
    let epoch = first["epoch"].as_str().unwrap().to_string();
    assert_eq!(b.publish("cut", ev(1)).await.status, 202);
    let one = ws.envelope().await;
    assert_eq!((n(&one), one["epoch"].as_str()), (1, Some(epoch.as_str())));
    let since = offset(&one);

    relay.cut();
    wait_ready(&a, 503).await;
    let (_, first) = resume(&a, "cut", &epoch, since, "").await;
    assert_eq!(first["recovered"], false, "{first}");
    nats.restart_empty();
    wait_ready(&b, 200).await;
    let (mut wb, _) = open(&b, "cut", "&recover=true").await;
    for i in 2..=3 {
        assert_eq!(b.publish("cut", ev(i)).await.status, 202);
    }
    let on_b = read_until(&mut wb, 3).await;
    let new_epoch = on_b[0]["epoch"].as_str().unwrap().to_string();
    assert_ne!(new_epoch, epoch);

    relay.restore();
    let mut got = Vec::new();
    while got.len() < 2 {
        got.push(ws.envelope_within(Duration::from_secs(20)).await);
    }
    assert_eq!(positions(&got), positions(&on_b), "live, in the new epoch");
    let (_, first) = resume(&a, "cut", &epoch, since, "").await;
    assert_eq!(first["recovered"], false, "{first}");
    assert_eq!(first["epoch"], json!(new_epoch));
}

/// A client that saw events on one node and reconnects at once to a node
/// that has not heard of them yet (its NATS connection is late) waits there
/// for them: they are in the shared history, so it is told `recovered:
/// true` and gets what followed its `since`. A `since` above anything the
/// epoch holds is still `recovered: false`.
#[actix_rt::test]
async fn a_recovery_on_a_node_not_yet_as_far_as_its_since_waits_for_it() {
    let Some(RelayedPair {
        a,
        b,
        relay,
        _nats,
        _db,
    }) = relayed_pair("late").await
    else {
        return;
    };
    // B follows the instance's history while it has a client; then it hears
    // NATS a second late.
    let (_wb, on_b) = open(&b, "late", "&recover=true").await;
    relay.delay(Duration::from_secs(1));
    let (mut wa, first) = open(&a, "late", "&recover=true").await;
    let epoch = first["epoch"].as_str().unwrap().to_string();
    assert_eq!(on_b["epoch"], first["epoch"]);
    for i in 1..=2 {
        assert_eq!(a.publish("late", ev(i)).await.status, 202);
    }
    let on_a = read_until(&mut wa, 2).await;
    let (one, two) = (offset(&on_a[0]), offset(&on_a[1]));

    let (mut wr, recovery) = resume(&b, "late", &epoch, one, "").await;
    assert_eq!(recovery["recovered"], true, "{recovery}");
    assert!(recovery["offset"].as_u64().unwrap() >= one, "{recovery}");
    // Replayed, or live if B's mirror had only reached `one`.
    let next = wr.envelope().await;
    assert_eq!((n(&next), offset(&next)), (2, two), "{next}");
    assert_eq!(a.publish("late", ev(3)).await.status, 202);
    assert_eq!(n(&wr.envelope().await), 3, "then live");

    let (_, beyond) = resume(&b, "late", &epoch, two + (1 << 40), "").await;
    assert_eq!(beyond["recovered"], false, "{beyond}");
}

/// A join that waited for its `since` leaves nothing behind: when NATS
/// drops after it was answered, the node does not fall back to numbering
/// locally when that join's wait would have ended, so once NATS is back a
/// position from before the drop still recovers there.
#[actix_rt::test]
async fn a_join_that_waited_for_its_since_does_not_make_a_later_drop_number_locally() {
    let Some(RelayedPair {
        a,
        b,
        relay,
        _nats,
        _db,
    }) = relayed_pair("blip").await
    else {
        return;
    };
    let (_wb, _) = open(&b, "blip", "&recover=true").await;
    let (mut wa, first) = open(&a, "blip", "&recover=true").await;
    let epoch = first["epoch"].as_str().unwrap().to_string();
    assert_eq!(a.publish("blip", ev(1)).await.status, 202);
    let one = offset(&read_until(&mut wa, 1).await[0]);

    relay.delay(Duration::from_secs(1));
    assert_eq!(a.publish("blip", ev(2)).await.status, 202);
    let two = offset(&read_until(&mut wa, 2).await[0]);
    let (_wr, waited) = resume(&b, "blip", &epoch, two, "").await;
    let answered = Instant::now();
    assert_eq!(waited["recovered"], true, "{waited}");
    // B's NATS connection drops before that join's wait (3 s from before
    // its answer) would have ended, and comes back after.
    relay.cut();
    wait_ready(&b, 503).await;
    tokio::time::sleep(
        (answered + Duration::from_millis(3200)).saturating_duration_since(Instant::now()),
    )
    .await;
    relay.delay(Duration::ZERO);
    relay.restore();
    wait_ready(&b, 200).await;
    let (_, again) = resume(&b, "blip", &epoch, one, "").await;
    assert_eq!(again["recovered"], true, "{again}");
    assert_eq!(again["epoch"], json!(epoch));
}

/// A node whose first load of an instance's history takes longer than a
/// join may wait numbers locally and admits the join; what the load then
/// brings that was accepted after that is delivered to it live, and what
/// was accepted before is not (it is history).
#[actix_rt::test]
async fn a_client_admitted_while_the_history_still_loads_gets_what_was_accepted_since() {
    let Some(RelayedPair {
        a,
        b,
        relay,
        _nats,
        _db,
    }) = relayed_pair("slowload").await
    else {
        return;
    };
    let (mut wa, first) = open(&a, "slowload", "&recover=true").await;
    assert_eq!(a.publish("slowload", ev(1)).await.status, 202);
    assert_eq!(n(&wa.envelope().await), 1);

    // B hears NATS 2.5 s late: its load takes longer than a join waits
    // (3 s), and what is published now is in it.
    relay.delay(Duration::from_millis(2500));
    let url = b.ws_url(&format!("/ws/slowload?token={ACCOUNT}"));
    let (inner, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let mut plain = common::Ws { inner };
    // Its join reaches B's instance (and waits there, not counted as a
    // client) right behind the upgrade: well before event 2 is accepted.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(a.publish("slowload", ev(2)).await.status, 202);
    assert_eq!(n(&wa.envelope().await), 2);
    let (mut wb, on_b) = open(&b, "slowload", "&recover=true").await;
    assert_ne!(on_b["epoch"], first["epoch"], "B numbered locally: {on_b}");
    assert_eq!(a.publish("slowload", ev(3)).await.status, 202);
    assert_eq!(n(&wa.envelope().await), 3);
    // The plain client arrived before 2 was accepted: it gets 2 and 3, not
    // 1; so does the other, admitted with it.
    for ws in [&mut plain, &mut wb] {
        for expected in [2, 3] {
            let v = ws.envelope_within(Duration::from_secs(20)).await;
            assert_eq!(n(&v), expected, "{v}");
        }
    }
    relay.delay(Duration::ZERO);
    assert_eq!(a.publish("slowload", ev(4)).await.status, 202);
    assert_eq!(n(&plain.envelope().await), 4);
    assert_eq!(n(&wb.envelope().await), 4);
}

/// A node that numbered locally because its first load of an instance's
/// history was slow, and then follows the shared history again while that
/// load goes on, holds a recovering client until the load has ended, however
/// long past the 3 s a join waits: numbering locally once more would drop
/// what was loaded. The client then recovers in the shared epoch.
#[actix_rt::test]
async fn a_recovery_during_the_rest_of_a_slow_load_waits_for_its_end() {
    let Some(RelayedPair {
        a,
        b,
        relay,
        _nats,
        _db,
    }) = relayed_pair("rest").await
    else {
        return;
    };
    // 300 events of about 2 KB in the history: a load of about 700 KB.
    let (mut wa, first) = open(&a, "rest", "&recover=true").await;
    let epoch = first["epoch"].as_str().unwrap().to_string();
    let filler = "x".repeat(2000);
    for i in 1..=300 {
        let e = common::event("call.update", json!({"n": i, "filler": filler}));
        assert_eq!(a.publish("rest", e).await.status, 202);
    }
    let on_a = read_until(&mut wa, 300).await;
    let since = offset(&on_a[298]);
    assert_eq!(n(&on_a[298]), 299);

    // B's first load stops after about a third: a plain client's join
    // waits 3 s, then B numbers locally and admits it.
    relay.pass_only(250_000);
    let url = b.ws_url(&format!("/ws/rest?token={ACCOUNT}"));
    let (_plain, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let (_local, on_b) = open(&b, "rest", "&recover=true").await;
    assert_ne!(on_b["epoch"], json!(epoch), "B numbered locally: {on_b}");
    // More of the load: B follows the shared history again, still loading.
    relay.pass_more(120_000);
    tokio::time::sleep(Duration::from_secs(1)).await;
    // A client that saw 299 on A comes to B: it waits past 3 s, until the
    // load has ended, and recovers what came after 299.
    let url = b.ws_url(&format!(
        "/ws/rest?token={ACCOUNT}&recover=true&epoch={epoch}&since={since}"
    ));
    let (inner, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let mut wr = common::Ws { inner };
    let released = AtomicBool::new(false);
    let release = async {
        tokio::time::sleep(Duration::from_millis(3600)).await;
        released.store(true, Ordering::SeqCst);
        relay.pass_all();
    };
    let answer = async {
        let recovery = wr.envelope_within(Duration::from_secs(20)).await;
        (recovery, released.load(Ordering::SeqCst))
    };
    let ((recovery, after_release), ()) = tokio::join!(answer, release);
    // Answered once the rest of the load came (not before: the load was
    // still going on when its 3 s were up).
    assert!(
        after_release,
        "answered before the rest of the load: {recovery}"
    );
    common::recovery::assert_recovery_frame(&recovery);
    assert_eq!(recovery["data"]["recovered"], true, "{recovery}");
    assert_eq!(recovery["data"]["epoch"], json!(epoch), "{recovery}");
    let replayed = wr.envelope().await;
    assert_eq!((n(&replayed), offset(&replayed)), (300, offset(&on_a[299])));
}

/// Two nodes on a NATS of the test's own, B reaching it through a relay the
/// test can slow down or cut, with instance `name` created on A.
struct RelayedPair {
    a: TestServer,
    b: TestServer,
    relay: Relay,
    _nats: Nats,
    _db: TestDb,
}

/// `None`, after the skip line, without PostgreSQL or NATS.
async fn relayed_pair(name: &str) -> Option<RelayedPair> {
    let db = require_postgres()?;
    let nats = Nats::start()?;
    let relay = Relay::start(nats.port);
    let cluster = Cluster::own(&nats);
    let a = cluster.node(&db).await;
    let b = cluster.node_via(&db, relay.url()).await;
    a.instance(name).await;
    Some(RelayedPair {
        a,
        b,
        relay,
        _nats: nats,
        _db: db,
    })
}

/// Waits until `/readyz` of `s` answers `status`.
async fn wait_ready(s: &TestServer, status: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while s.raw("GET", "/readyz", &[], None).await.status != status {
        assert!(Instant::now() < deadline, "/readyz never answered {status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A TCP relay in front of NATS that a test can cut: the connections
/// through it drop, and new ones are refused until it is restored. It may
/// also hold what NATS sends back for a while (a node that hears late).
struct Relay {
    port: u16,
    open: Arc<AtomicBool>,
    streams: Arc<Mutex<Vec<TcpStream>>>,
    /// How long what NATS sends is held, in ms (see [`Relay::delay`]).
    delay: Arc<AtomicU64>,
    /// How many more bytes of what NATS sends pass (`u64::MAX`: all; see
    /// [`Relay::pass_only`]).
    budget: Arc<AtomicU64>,
}

impl Relay {
    fn start(to: u16) -> Relay {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let open = Arc::new(AtomicBool::new(true));
        let streams = Arc::new(Mutex::new(Vec::new()));
        let delay = Arc::new(AtomicU64::new(0));
        let budget = Arc::new(AtomicU64::new(u64::MAX));
        let (is_open, held, late, passing) =
            (open.clone(), streams.clone(), delay.clone(), budget.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                // Dropped at once while cut: the connection is refused.
                let Ok(client) = client else { continue };
                if !is_open.load(Ordering::SeqCst) {
                    continue;
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", to)) else {
                    continue;
                };
                let mut held = held.lock().unwrap();
                held.push(client.try_clone().unwrap());
                held.push(server.try_clone().unwrap());
                let ways = [
                    (
                        client.try_clone().unwrap(),
                        server.try_clone().unwrap(),
                        Arc::new(AtomicU64::new(0)),
                        Arc::new(AtomicU64::new(u64::MAX)),
                    ),
                    (server, client, late.clone(), passing.clone()),
                ];
                for (from, into, delay, budget) in ways {
                    std::thread::spawn(move || copy_late(from, into, &delay, &budget));
                }
            }
        });
        Relay {
            port,
            open,
            streams,
            delay,
            budget,
        }
    }

    /// From now on, only `bytes` more of what NATS sends pass; the rest is
    /// held (in order) until [`Relay::pass_more`] or [`Relay::pass_all`].
    fn pass_only(&self, bytes: u64) {
        self.budget.store(bytes, Ordering::SeqCst);
    }

    fn pass_more(&self, bytes: u64) {
        self.budget.fetch_add(bytes, Ordering::SeqCst);
    }

    fn pass_all(&self) {
        self.budget.store(u64::MAX, Ordering::SeqCst);
    }

    /// From now on, each chunk NATS sends passes `delay` after it came.
    fn delay(&self, delay: Duration) {
        let ms = u64::try_from(delay.as_millis()).unwrap();
        self.delay.store(ms, Ordering::SeqCst);
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        for stream in self.streams.lock().unwrap().drain(..) {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }

    fn restore(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

/// Copies `from` into `into`, each chunk `delay` ms (as it is when the chunk
/// is read) after it was read and within what `budget` lets pass, and
/// shuts both ways of `into` when `from` ends.
fn copy_late(mut from: TcpStream, mut into: TcpStream, delay: &AtomicU64, budget: &Arc<AtomicU64>) {
    use std::io::{Read, Write};
    let (tx, rx) = std::sync::mpsc::channel::<(Instant, Vec<u8>)>();
    let budget = budget.clone();
    let writer = std::thread::spawn(move || {
        for (due, chunk) in rx {
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let mut rest = chunk.as_slice();
            while !rest.is_empty() {
                let n = take_budget(&budget, rest.len());
                if n == 0 {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
                if into.write_all(&rest[..n]).is_err() {
                    let _ = into.shutdown(Shutdown::Both);
                    return;
                }
                rest = &rest[n..];
            }
        }
        let _ = into.shutdown(Shutdown::Both);
    });
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(read) = from.read(&mut buf) {
        let due = Instant::now() + Duration::from_millis(delay.load(Ordering::SeqCst));
        if read == 0 || tx.send((due, buf[..read].to_vec())).is_err() {
            break;
        }
    }
    drop(tx);
    let _ = writer.join();
}

/// Takes up to `want` bytes from `budget` (`u64::MAX`: no limit): how many.
fn take_budget(budget: &AtomicU64, want: usize) -> usize {
    let want = want as u64;
    let before = budget
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| {
            (left != u64::MAX).then(|| left - left.min(want))
        })
        .unwrap_or_else(|left| left);
    before.min(want) as usize
}

/// Appends `payload` to instance `id`'s history subject as a node would
/// (after the subject's last message), with `headers` besides the chain's;
/// returns JetStream's acknowledgement.
async fn append_to_history(
    js: &async_nats::jetstream::Context,
    prefix: &str,
    id: &str,
    payload: &Value,
    headers: &[(&str, &str)],
) -> async_nats::jetstream::publish::PublishAck {
    let subject = format!("{prefix}.hist.{id}");
    let stream = js.get_stream(format!("{prefix}_HISTORY")).await.unwrap();
    let prev = stream
        .get_last_raw_message_by_subject(&subject)
        .await
        .unwrap()
        .sequence
        .to_string();
    let mut h = async_nats::HeaderMap::new();
    h.insert("Eventgate-Prev", prev.as_str());
    h.insert("Nats-Expected-Last-Subject-Sequence", prev.as_str());
    for (k, v) in headers {
        h.insert(*k, *v);
    }
    let payload = serde_json::to_vec(payload).unwrap();
    js.publish_with_headers(subject, h, payload.into())
        .await
        .unwrap()
        .await
        .unwrap()
}

/// Two nodes on `url`'s NATS, instance `name` created on A and a client of
/// B, opted in to recovery, that received A's first event: the cluster, A,
/// B, B's client and the instance's id (the end of its epoch,
/// `<stream creation>-<instance id>`).
async fn a_client_of_b(
    db: &TestDb,
    url: &str,
    name: &str,
) -> (Cluster, TestServer, TestServer, common::Ws, String) {
    let cluster = Cluster::shared(url.to_string());
    let a = cluster.node(db).await;
    let b = cluster.node(db).await;
    a.instance(name).await;
    let (mut wb, first) = open(&b, name, "&recover=true").await;
    let epoch = first["epoch"].as_str().unwrap();
    let id = epoch.rsplit('-').next().unwrap().to_string();
    assert_eq!(a.publish(name, ev(1)).await.status, 202);
    assert_eq!(n(&wb.envelope().await), 1);
    (cluster, a, b, wb, id)
}

/// A publish whose JetStream acknowledgement never came (a timeout, NATS
/// restarting) takes the plain way, carrying its message id; if JetStream
/// kept it after all, the followers keep it without delivering it again.
/// Also what the retry of such a publish relies on: JetStream answers a
/// message id it already kept with the first sequence, whatever the
/// expected last sequence says.
#[actix_rt::test]
async fn a_publish_kept_after_its_events_went_the_plain_way_is_not_delivered_twice() {
    let Some(db) = require_postgres() else {
        return;
    };
    let Some(url) = require_nats() else {
        return;
    };
    let (cluster, a, _b, mut wb, id) = a_client_of_b(&db, &url, "twice").await;

    // Node "elsewhere" could not get an answer from JetStream for ev(2):
    // its events cross the plain way, with the message id.
    let client = async_nats::connect(url.as_str()).await.unwrap();
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Eventgate-Node", "elsewhere");
    headers.insert("Eventgate-History-Id", "elsewhere-7");
    client
        .publish_with_headers(
            format!("{}.ev.{id}", cluster.prefix),
            headers,
            serde_json::to_vec(&json!([ev(2)])).unwrap().into(),
        )
        .await
        .unwrap();
    client.flush().await.unwrap();
    let plain = wb.envelope().await;
    assert_eq!(n(&plain), 2, "{plain}");

    // JetStream had kept it: it reaches the followers too.
    let js = async_nats::jetstream::new(client);
    let kept = [("Nats-Msg-Id", "elsewhere-7")];
    let ack = append_to_history(&js, &cluster.prefix, &id, &json!([ev(2)]), &kept).await;
    assert!(!ack.duplicate);
    // A retry with the same id is answered with the first sequence, though
    // its expected last sequence (the new last message's) differs now.
    let again = append_to_history(&js, &cluster.prefix, &id, &json!([ev(2)]), &kept).await;
    assert!(again.duplicate);
    assert_eq!(again.sequence, ack.sequence);

    // The next event follows at once; ev(2) does not come again.
    assert_eq!(a.publish("twice", ev(3)).await.status, 202);
    let next = wb.envelope().await;
    assert_eq!(n(&next), 3, "ev(2) delivered twice: {next}");
    cluster.clean_up().await;
}

/// Events reach a node's clients filtered as they were accepted: a node
/// whose follower is behind does not apply a settings change made after
/// their 202 to them.
#[actix_rt::test]
async fn events_are_filtered_by_the_settings_they_were_accepted_under() {
    let Some(db) = require_postgres() else {
        return;
    };
    let Some(url) = require_nats() else {
        return;
    };
    let (cluster, a, b, mut wb, id) = a_client_of_b(&db, &url, "late").await;

    // B now keeps only message.exchange ...
    let r = b
        .call(
            "POST",
            "/api/events/websocket/late",
            Some(ACCOUNT),
            Some(json!({"enabled": true, "events": ["message.exchange"]})),
        )
        .await;
    assert_eq!(r.status, 200);
    // ... when a call.update accepted under "all events" reaches its follower.
    let client = async_nats::connect(url.as_str()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    append_to_history(
        &js,
        &cluster.prefix,
        &id,
        &json!([ev(2)]),
        &[("Eventgate-Filter", "0/0")],
    )
    .await;
    let exchange = json!({"event": "message.exchange", "data": {"n": 3}});
    assert_eq!(a.publish("late", exchange).await.status, 202);
    let got = wb.envelope().await;
    assert_eq!(
        (got["event"].as_str(), n(&got)),
        (Some("call.update"), 2),
        "the late event was filtered by the newer settings: {got}"
    );
    let got = wb.envelope().await;
    assert_eq!(
        (got["event"].as_str(), n(&got)),
        (Some("message.exchange"), 3)
    );
    // Accepted after the change (on B, which made it), a call.update is
    // filtered out.
    assert_eq!(b.publish("late", ev(4)).await.status, 202);
    let exchange = json!({"event": "message.exchange", "data": {"n": 5}});
    assert_eq!(b.publish("late", exchange).await.status, 202);
    assert_eq!(n(&wb.envelope().await), 5);
    cluster.clean_up().await;
}

/// A node goes on following an instance's shared history for a while after
/// its last client of it left, so a client back after a short drop finds the
/// mirror loaded. Seen from JetStream: B's consumer of the subject keeps
/// taking what A publishes after B's client has gone (a consumer whose
/// follower stopped has no interest left, and JetStream delivers it
/// nothing more), and the client recovers on B.
#[actix_rt::test]
async fn a_node_keeps_following_an_instance_for_a_while_after_its_last_client_left() {
    let Some(db) = require_postgres() else {
        return;
    };
    let Some(url) = require_nats() else {
        return;
    };
    let cluster = Cluster::shared(url.clone());
    let a = cluster.node(&db).await;
    let b = cluster.node(&db).await;
    a.instance("linger").await;
    let (mut wb, first) = open(&b, "linger", "&recover=true").await;
    let epoch = first["epoch"].as_str().unwrap().to_string();
    let id = epoch.rsplit('-').next().unwrap().to_string();
    assert_eq!(a.publish("linger", ev(1)).await.status, 202);
    let since = offset(&wb.envelope().await);
    drop(wb);
    b.wait_clients("linger", Some(0)).await;
    // Time for a stopped follower's unsubscription to reach NATS.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for i in 2..=4 {
        assert_eq!(a.publish("linger", ev(i)).await.status, 202);
    }

    let js = async_nats::jetstream::new(async_nats::connect(url.as_str()).await.unwrap());
    let subject = format!("{}.hist.{id}", cluster.prefix);
    let stream = js
        .get_stream(format!("{}_HISTORY", cluster.prefix))
        .await
        .unwrap();
    let last = stream
        .get_last_raw_message_by_subject(&subject)
        .await
        .unwrap()
        .sequence;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut consumers = stream.consumers();
        let mut delivered = Vec::new();
        while let Some(info) = consumers.next().await {
            let info = info.unwrap();
            if info.config.filter_subject == subject {
                delivered.push(info.delivered.stream_sequence);
            }
        }
        if delivered.contains(&last) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no consumer of {subject} took message {last}: {delivered:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let (mut again, first) = resume(&b, "linger", &epoch, since, "").await;
    assert_eq!(first["recovered"], true, "{first}");
    let got = read_until(&mut again, 4).await;
    assert_eq!(got.iter().map(n).collect::<Vec<_>>(), [2, 3, 4]);
    cluster.clean_up().await;
}

/// Nodes publishing to one instance at once retry on each other's sequence
/// until their publish is kept: every event is in the shared history under
/// the one epoch, and a recovery from before the first replays all of them.
#[actix_rt::test]
async fn concurrent_publishers_on_every_node_keep_every_event_in_the_shared_history() {
    let Some(db) = require_postgres() else {
        return;
    };
    let Some(url) = require_nats() else {
        return;
    };
    const PUBLISHERS: u64 = 8;
    const EACH: u64 = 150;
    let total = PUBLISHERS * EACH;
    let cluster = Cluster::shared(url);
    let a = cluster.node_keeping(&db, 5_000).await;
    let b = cluster.node_keeping(&db, 5_000).await;
    a.instance("busy").await;
    let (mut wa, first) = open(&a, "busy", "&recover=true").await;
    let epoch = first["epoch"].as_str().unwrap().to_string();
    let since = first["offset"].as_u64().unwrap();
    let (mut wb, _) = open(&b, "busy", "&recover=true").await;
    // Half the publishers on each node, each one publish at a time.
    let publishers = (0..PUBLISHERS).map(|k| {
        let node = if k % 2 == 0 { &a } else { &b };
        async move {
            for i in 1..=EACH {
                let r = node.publish("busy", ev(k * EACH + i)).await;
                assert_eq!(r.status, 202);
            }
        }
    });
    futures_util::future::join_all(publishers).await;
    let got_a = read_count(&mut wa, total).await;
    let got_b = read_count(&mut wb, total).await;
    for v in got_a.iter().chain(&got_b) {
        assert_eq!(
            v["epoch"],
            json!(epoch),
            "every event in the shared history: {v}"
        );
    }
    assert_eq!(positions(&got_a), positions(&got_b));
    assert_increasing(&got_a);
    let (mut late, first) = resume(&b, "busy", &epoch, since, "").await;
    assert_eq!(first["recovered"], true, "{first}");
    let replayed = read_count(&mut late, total).await;
    assert_eq!(positions(&replayed), positions(&got_a));
    let mut ns: Vec<u64> = replayed.iter().map(n).collect();
    ns.sort_unstable();
    assert_eq!(ns, (1..=total).collect::<Vec<_>>());
    cluster.clean_up().await;
}

/// The next `count` envelopes.
async fn read_count(ws: &mut common::Ws, count: u64) -> Vec<Value> {
    let mut got = Vec::new();
    for _ in 0..count {
        got.push(ws.envelope().await);
    }
    got
}

/// Events a node cut off from NATS delivered the plain way are in no node's
/// history: once it is back it appends a gap marker, and from then on every
/// node answers `recovered: false` for positions from before the gap (before
/// it, the other nodes could not know).
#[actix_rt::test]
async fn events_a_cut_off_node_delivered_outside_the_history_make_recovery_false_everywhere() {
    let Some(db) = require_postgres() else {
        return;
    };
    let Some(nats) = Nats::start() else {
        return;
    };
    let relay = Relay::start(nats.port);
    let cluster = Cluster::own(&nats);
    let a = cluster.node_via(&db, relay.url()).await;
    let b = cluster.node(&db).await;
    b.instance("gap").await;
    let (mut wa, first) = open(&a, "gap", "&recover=true").await;
    let epoch = first["epoch"].as_str().unwrap().to_string();
    let (mut wb, _) = open(&b, "gap", "&recover=true").await;
    assert_eq!(b.publish("gap", ev(1)).await.status, 202);
    let since = offset(&read_until(&mut wb, 1).await[0]);
    read_until(&mut wa, 1).await;

    relay.cut();
    wait_ready(&a, 503).await;
    // On A only, outside the shared history; on B, in it.
    assert_eq!(a.publish("gap", ev(2)).await.status, 202);
    assert_eq!(b.publish("gap", ev(3)).await.status, 202);
    read_until(&mut wb, 3).await;
    relay.restore();
    wait_ready(&a, 200).await;
    let answered_false = eventually(Duration::from_secs(20), async || {
        let (_, first) = resume(&b, "gap", &epoch, since, "").await;
        (first["recovered"] == json!(false)).then_some(first)
    })
    .await;
    let first =
        answered_false.expect("B never learnt of the events A delivered outside the history");
    assert_eq!(first["epoch"], json!(epoch), "the same shared epoch");
    // A position after the marker recovers, on both nodes (A once its
    // follower is back on the shared epoch).
    let latest = first["offset"].as_u64().unwrap();
    assert_eq!(b.publish("gap", ev(4)).await.status, 202);
    for node in [&a, &b] {
        let resumed = eventually(Duration::from_secs(10), async || {
            let (ws, first) = resume(node, "gap", &epoch, latest, "").await;
            (first["recovered"] == json!(true)).then_some(ws)
        })
        .await;
        let mut ws = resumed.expect("a position after the marker never recovered");
        assert_eq!(n(&read_until(&mut ws, 4).await[0]), 4);
    }
}
