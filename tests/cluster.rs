//! Several nodes on one PostgreSQL database and a NATS server (issue: scale
//! out): events published on any node reach clients on every node once each;
//! settings changes and deletions apply everywhere; a NATS outage keeps
//! local delivery going, turns `/readyz` to 503, and heals by itself.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{event, free_port, Got, TestDb, TestServer, Ws, ACCOUNT};
use serde_json::{json, Value};

/// A nats-server of the test's own, on a free port.
struct Nats {
    child: Child,
    port: u16,
}

impl Nats {
    fn start_on(port: u16) -> Nats {
        let child = Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server (Debian package nats-server) must be installed");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Nats { child, port }
    }

    fn start() -> Nats {
        Self::start_on(free_port())
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

async fn node(
    db: &TestDb,
    nats: &str,
    tweak: impl FnOnce(&mut eventgate::settings::Settings),
) -> TestServer {
    let url = nats.to_string();
    TestServer::start_on(db.shared(), move |s| {
        s.cluster.nats_url = url;
        tweak(s);
    })
    .await
}

/// Publishes markers on `publisher` until every client has seen one, then
/// drains them: afterwards every node follows the instance.
async fn until_following(publisher: &TestServer, name: &str, clients: &mut [&mut Ws]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = vec![false; clients.len()];
    let mut n = 0;
    while seen.iter().any(|s| !s) {
        assert!(Instant::now() < deadline, "nodes never followed {name}");
        n += 1;
        publisher
            .publish(name, event("instance.state", json!({"marker": n})))
            .await;
        for (i, ws) in clients.iter_mut().enumerate() {
            while let Got::Text(_) = ws.next_within(Duration::from_millis(100)).await {
                seen[i] = true;
            }
        }
    }
    // Drain stragglers.
    for ws in clients.iter_mut() {
        while let Got::Text(_) = ws.next_within(Duration::from_millis(300)).await {}
    }
}

async fn expect_sequence(ws: &mut Ws, count: u64) {
    for seq in 0..count {
        let got: Value = ws.envelope().await;
        assert_eq!(got["data"]["seq"], seq);
    }
    ws.silent(Duration::from_millis(300)).await;
}

#[actix_rt::test]
async fn publish_on_one_node_reaches_clients_on_every_node_once() {
    let nats = Nats::start();
    let db = TestDb::postgres();
    let a = node(&db, &nats.url(), |_| {}).await;
    let b = node(&db, &nats.url(), |_| {}).await;
    let c = node(&db, &nats.url(), |_| {}).await;
    a.instance("multi").await;
    let mut wa = a.connect("multi", "").await;
    let mut wb = b.connect("multi", "").await;
    let mut wc = c.connect("multi", "").await;
    until_following(&a, "multi", &mut [&mut wa, &mut wb, &mut wc]).await;
    for seq in 0..20 {
        a.publish("multi", event("message.status", json!({"seq": seq})))
            .await;
    }
    expect_sequence(&mut wa, 20).await;
    expect_sequence(&mut wb, 20).await;
    expect_sequence(&mut wc, 20).await;
    // Publishing on B reaches A too, with A's own base URL in the envelope.
    b.publish("multi", event("call.update", json!({"from": "b"})))
        .await;
    let got = wa.envelope().await;
    assert_eq!(got["data"]["from"], "b");
    assert_eq!(got["instanceData"]["baseUrl"], format!("http://{}", a.addr));
    // connectedClients counts the answering node only.
    let r = a
        .call("GET", "/api/instance/list", Some(ACCOUNT), None)
        .await;
    assert_eq!(r.body["instances"][0]["connectedClients"], 1);
}

#[actix_rt::test]
async fn settings_disable_and_deletion_apply_on_every_node() {
    let nats = Nats::start();
    let db = TestDb::postgres();
    let a = node(&db, &nats.url(), |_| {}).await;
    let b = node(&db, &nats.url(), |_| {}).await;
    let token = a.instance("shared").await;
    let mut wa = a.connect("shared", "").await;
    let mut wb = b.connect("shared", "").await;
    until_following(&a, "shared", &mut [&mut wa, &mut wb]).await;

    // A settings change on B applies to A's clients within a second.
    b.configure(
        "shared",
        json!({"enabled": true, "events": ["call.update"]}),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    a.publish(
        "shared",
        json!([
            event("label.update", json!({})),
            event("call.update", json!({"n": 1}))
        ]),
    )
    .await;
    assert_eq!(wa.envelope().await["data"]["n"], 1);
    assert_eq!(wb.envelope().await["data"]["n"], 1);
    wa.silent(Duration::from_millis(300)).await;

    // Disabling on B refuses new upgrades on A (A had the instance remembered).
    b.configure("shared", json!({"enabled": false})).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let err = tokio_tungstenite::connect_async(a.ws_url(&format!("/ws/shared?token={ACCOUNT}")))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("400"), "{err}");
    b.configure("shared", json!({"enabled": true})).await;

    // Deleting on A closes B's sockets with 4004, and the token stops working on B.
    let _ = tokio_tungstenite::connect_async(b.ws_url(&format!("/ws/shared?token={token}"))).await;
    let r = a
        .call("DELETE", "/api/instance/delete/shared", Some(ACCOUNT), None)
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(wb.closed(Duration::from_secs(5)).await, Some(4004));
    assert_eq!(wa.closed(Duration::from_secs(5)).await, Some(4004));
    let err = tokio_tungstenite::connect_async(b.ws_url(&format!("/ws/shared?token={token}")))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("401"), "{err}");
}

#[actix_rt::test]
async fn nats_outage_keeps_local_delivery_and_heals() {
    let mut nats = Nats::start();
    let port = nats.port;
    let db = TestDb::postgres();
    let a = node(&db, &nats.url(), |_| {}).await;
    let b = node(&db, &nats.url(), |_| {}).await;
    a.instance("outage").await;
    let mut wa = a.connect("outage", "").await;
    let mut wb = b.connect("outage", "").await;
    until_following(&a, "outage", &mut [&mut wa, &mut wb]).await;

    nats.kill();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = a.raw("GET", "/readyz", &[], None).await;
        if r.status == 503 {
            assert_eq!(r.body["error"]["details"], "NATS unreachable");
            break;
        }
        assert!(Instant::now() < deadline, "/readyz never turned 503");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Local clients still get local publishes, at once.
    let started = Instant::now();
    let r = a
        .publish("outage", event("call.update", json!({"local": true})))
        .await;
    assert_eq!(r.status, 202);
    assert_eq!(wa.envelope().await["data"]["local"], true);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "publishing did not block"
    );
    wb.silent(Duration::from_millis(300)).await;
    assert!(
        a.metric("eventgate_bus_errors_total{kind=\"disconnected\"}")
            .await
            >= 1.0
    );

    // NATS comes back on the same port: the nodes reconnect by themselves.
    let _nats = Nats::start_on(port);
    let deadline = Instant::now() + Duration::from_secs(20);
    while a.raw("GET", "/readyz", &[], None).await.status != 200
        || b.raw("GET", "/readyz", &[], None).await.status != 200
    {
        assert!(Instant::now() < deadline, "never ready again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    until_following(&a, "outage", &mut [&mut wa, &mut wb]).await;
    a.publish("outage", event("call.update", json!({"seq": 0})))
        .await;
    expect_sequence(&mut wb, 1).await;
}

#[actix_rt::test]
async fn storage_refresh_is_a_safety_net_behind_nats() {
    let nats = Nats::start();
    let db = TestDb::postgres();
    let a = node(&db, &nats.url(), |s| s.cluster.refresh_secs = 1).await;
    a.instance("net").await;
    let mut ws = a.connect("net", "").await;
    // A change written straight to the database, with no notice on the bus.
    {
        let pool = eventgate::storage::connect(&db.url, 1, Duration::from_secs(5)).unwrap();
        let mut conn = pool.get().unwrap();
        let rec =
            eventgate::storage::instances::find(&mut conn, eventgate::domain::AccountId(1), "net")
                .unwrap()
                .unwrap();
        let config = eventgate::domain::WsConfig::normalized(
            true,
            vec![eventgate::domain::EventKind::GroupFlow],
            false,
        );
        eventgate::storage::ws_settings::upsert(&mut conn, rec.id, &config).unwrap();
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    a.publish(
        "net",
        json!([
            event("call.update", json!({})),
            event("group.flow", json!({"n": 1}))
        ]),
    )
    .await;
    assert_eq!(ws.envelope().await["data"]["n"], 1);
    ws.silent(Duration::from_millis(300)).await;
}
