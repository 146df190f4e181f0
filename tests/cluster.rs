//! Several nodes on one PostgreSQL database and a NATS server (issue: scale
//! out): events published on any node reach clients on every node once each;
//! settings changes and deletions apply everywhere; a NATS outage keeps
//! local delivery going, turns `/readyz` to 503, and heals by itself; a
//! change made during the outage applies everywhere when NATS returns; a
//! late notice of an older version changes nothing.
//!
//! Needs PostgreSQL (the shared database) and NATS: the machine's (each test
//! on subjects of its own), or for the outage a `nats-server` the test starts
//! and kills. Without them each test prints its skip line and returns.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod webhook_receiver;

use std::time::{Duration, Instant};

use common::{
    event, eventually, require_nats, require_postgres, unique_subject_prefix, Got, NatsServer,
    TestDb, TestServer, Ws, ACCOUNT, DEADLINE,
};
use serde_json::{json, Value};
use webhook_receiver::Receiver;

/// A node on the shared database and the given NATS, with the test's own
/// subject prefix (tests sharing one NATS server do not hear each other).
async fn node(
    db: &TestDb,
    nats: &str,
    prefix: &str,
    tweak: impl FnOnce(&mut eventgate::settings::Settings),
) -> TestServer {
    let url = nats.to_string();
    let prefix = prefix.to_string();
    TestServer::start_on(db.shared(), move |s| {
        s.cluster.nats_url = url;
        s.cluster.subject_prefix = prefix;
        tweak(s);
    })
    .await
}

/// Publishes markers on `publisher` until every client has seen one, then
/// one last marker that each client reads up to: afterwards every node
/// follows the instance and no marker is still on its way.
async fn until_following(publisher: &TestServer, name: &str, clients: &mut [&mut Ws]) {
    let deadline = Instant::now() + DEADLINE;
    let mut seen = vec![false; clients.len()];
    let mut n = 0;
    while seen.iter().any(|s| !s) {
        assert!(Instant::now() < deadline, "nodes never followed {name}");
        n += 1;
        publisher
            .publish(name, event("instance.state", json!({"marker": n})))
            .await;
        // Paces the markers while the nodes subscribe (a read, not a sleep:
        // it ends early when something arrives).
        for (i, ws) in clients.iter_mut().enumerate() {
            while let Got::Text(_) = ws.next_within(Duration::from_millis(100)).await {
                seen[i] = true;
            }
        }
    }
    // Everything one publisher sends reaches a node in order: once a client
    // has the last marker, it has every earlier one it will ever get.
    publisher
        .publish(name, event("instance.state", json!({"marker": "last"})))
        .await;
    for ws in clients.iter_mut() {
        while ws.envelope().await["data"]["marker"] != "last" {}
    }
}

/// Publishes pairs `[dropped, kept]` (tagged `probe`) on `publisher` until
/// `ws` gets a pair's `kept` event without its `dropped` one: the node of
/// `ws` has applied settings that exclude `dropped`. Returns how many pairs
/// were published.
async fn until_applied(
    publisher: &TestServer,
    name: &str,
    ws: &mut Ws,
    dropped: &str,
    kept: &str,
) -> u64 {
    let deadline = Instant::now() + DEADLINE;
    let mut probe = 0u64;
    loop {
        assert!(
            Instant::now() < deadline,
            "settings without {dropped} never applied on {name}'s node"
        );
        probe += 1;
        publisher
            .publish(
                name,
                json!([
                    event(dropped, json!({"probe": probe})),
                    event(kept, json!({"probe": probe}))
                ]),
            )
            .await;
        // The pair arrives in order, and `kept` always does: reading up to
        // it leaves nothing of this pair behind.
        let mut dropped_seen = false;
        loop {
            let got = ws.envelope().await;
            assert_eq!(got["data"]["probe"], probe, "{got}");
            if got["event"] == kept {
                break;
            }
            assert_eq!(got["event"], dropped, "{got}");
            dropped_seen = true;
        }
        if !dropped_seen {
            return probe;
        }
    }
}

async fn expect_sequence(ws: &mut Ws, count: u64) {
    for seq in 0..count {
        let got: Value = ws.envelope().await;
        assert_eq!(got["data"]["seq"], seq);
    }
    // Once each: no duplicate within a bounded window (a negative check).
    ws.silent(Duration::from_millis(300)).await;
}

#[actix_rt::test]
async fn publish_on_one_node_reaches_clients_on_every_node_once() {
    let Some(db) = require_postgres() else {
        return;
    };
    let Some(nats) = require_nats() else {
        return;
    };
    let prefix = unique_subject_prefix();
    let a = node(&db, &nats, &prefix, |_| {}).await;
    let b = node(&db, &nats, &prefix, |_| {}).await;
    let c = node(&db, &nats, &prefix, |_| {}).await;
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
    // Publishing on B reaches A too, with A's own base URL in the envelope
    // (once A's subscription is known to have reached NATS).
    until_following(&b, "multi", &mut [&mut wa]).await;
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
    let Some(db) = require_postgres() else {
        return;
    };
    let Some(nats) = require_nats() else {
        return;
    };
    let prefix = unique_subject_prefix();
    let a = node(&db, &nats, &prefix, |_| {}).await;
    let b = node(&db, &nats, &prefix, |_| {}).await;
    let token = a.instance("shared").await;
    let mut wa = a.connect("shared", "").await;
    let mut wb = b.connect("shared", "").await;
    until_following(&a, "shared", &mut [&mut wa, &mut wb]).await;

    // A settings change on B applies to A's clients (through the bus).
    b.configure(
        "shared",
        json!({"enabled": true, "events": ["call.update"]}),
    )
    .await;
    let probes = until_applied(&a, "shared", &mut wa, "label.update", "call.update").await;
    // B applied it before answering: its client got only the probes' call.update.
    for probe in 1..=probes {
        let got = wb.envelope().await;
        assert_eq!(got["event"], "call.update", "{got}");
        assert_eq!(got["data"]["probe"], probe, "{got}");
    }
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
    // Nothing else (the label.update) within a bounded window.
    wa.silent(Duration::from_millis(300)).await;

    // Disabling on B refuses new upgrades on A (A had the instance remembered).
    b.configure("shared", json!({"enabled": false})).await;
    let url = a.ws_url(&format!("/ws/shared?token={ACCOUNT}"));
    // Upgrades A still accepts before the change reaches it are dropped.
    let err = eventually(DEADLINE, async || {
        tokio_tungstenite::connect_async(url.as_str()).await.err()
    })
    .await
    .expect("A never refused upgrades after B disabled the instance");
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

/// NATS sends a node nothing it sent itself (`no_echo`): publishing to an
/// instance the node follows makes it send the events once and receive
/// nothing back.
#[actix_rt::test]
async fn a_node_is_not_sent_its_own_events_back() {
    let Some(db) = require_postgres() else {
        return;
    };
    // A NATS of the test's own, to read the node's message counts from it.
    let Some(nats) = NatsServer::start() else {
        return;
    };
    let prefix = unique_subject_prefix();
    let a = node(&db, &nats.url(), &prefix, |_| {}).await;
    a.instance("echo").await;
    let mut wa = a.connect("echo", "").await;
    // (in_msgs, out_msgs) of the node's connection, once it follows the instance.
    let counts = || {
        let connz = nats.connz();
        let conns = connz["connections"].as_array().cloned().unwrap_or_default();
        let node: Vec<&Value> = conns
            .iter()
            .filter(|c| {
                c["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("eventgate-"))
            })
            .collect();
        assert_eq!(node.len(), 1, "one node connection expected: {connz}");
        let follows = node[0]["subscriptions_list"]
            .as_array()
            .is_some_and(|subs| {
                subs.iter()
                    .any(|s| s.as_str().is_some_and(|s| s.contains(".ev.")))
            });
        (
            follows,
            node[0]["in_msgs"].as_u64().unwrap(),
            node[0]["out_msgs"].as_u64().unwrap(),
        )
    };
    let followed = eventually(DEADLINE, async || counts().0.then_some(())).await;
    assert!(followed.is_some(), "the node never followed the instance");
    let (_, sent_before, got_before) = counts();
    for n in 0..5 {
        a.publish("echo", event("call.update", json!({"n": n})))
            .await;
        assert_eq!(wa.envelope().await["data"]["n"], n);
    }
    // The node hands its events to NATS apart from delivering them here.
    let sent = eventually(DEADLINE, async || {
        let (_, sent, _) = counts();
        (sent >= sent_before + 5).then_some(sent)
    })
    .await;
    assert!(sent.is_some(), "the node did not send its events");
    // A bounded wait for anything still on its way back.
    wa.silent(Duration::from_millis(300)).await;
    let (_, _, got) = counts();
    assert_eq!(got, got_before, "NATS sent the node messages back");
}

#[actix_rt::test]
async fn nats_outage_keeps_local_delivery_and_heals() {
    let Some(db) = require_postgres() else {
        return;
    };
    // A NATS of the test's own: it is stopped and started again.
    let Some(mut nats) = NatsServer::start() else {
        return;
    };
    let port = nats.port;
    let prefix = unique_subject_prefix();
    let a = node(&db, &nats.url(), &prefix, |_| {}).await;
    let b = node(&db, &nats.url(), &prefix, |_| {}).await;
    a.instance("outage").await;
    let mut wa = a.connect("outage", "").await;
    let mut wb = b.connect("outage", "").await;
    until_following(&a, "outage", &mut [&mut wa, &mut wb]).await;

    nats.kill();
    let r = eventually(DEADLINE, async || {
        let r = a.raw("GET", "/readyz", &[], None).await;
        (r.status == 503).then_some(r)
    })
    .await
    .expect("/readyz never turned 503");
    assert_eq!(r.body["error"]["details"], "NATS unreachable");
    // Local clients still get local publishes, at once.
    let started = Instant::now();
    let r = a
        .publish("outage", event("call.update", json!({"local": true})))
        .await;
    assert_eq!(r.status, 202);
    assert_eq!(wa.envelope().await["data"]["local"], true);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "publishing did not block"
    );
    // Nothing crosses while NATS is down (a bounded negative check).
    wb.silent(Duration::from_millis(300)).await;
    assert!(
        a.metric("eventgate_bus_errors_total{kind=\"disconnected\"}")
            .await
            >= 1.0
    );

    // NATS comes back on the same port: the nodes reconnect by themselves.
    let _nats = NatsServer::start_on(port).expect("nats-server ran a moment ago");
    let ready = eventually(Duration::from_secs(20), async || {
        (a.raw("GET", "/readyz", &[], None).await.status == 200
            && b.raw("GET", "/readyz", &[], None).await.status == 200)
            .then_some(())
    })
    .await;
    assert!(ready.is_some(), "never ready again");
    until_following(&a, "outage", &mut [&mut wa, &mut wb]).await;
    a.publish("outage", event("call.update", json!({"seq": 0})))
        .await;
    expect_sequence(&mut wb, 1).await;
}

#[actix_rt::test]
async fn a_change_made_while_nats_is_down_reaches_every_node_when_it_returns() {
    let Some(db) = require_postgres() else {
        return;
    };
    let Some(mut nats) = NatsServer::start() else {
        return;
    };
    let port = nats.port;
    let prefix = unique_subject_prefix();
    // No periodic refresh within the test: only NATS's return can carry it.
    let slow = |s: &mut eventgate::settings::Settings| s.cluster.refresh_secs = 3600;
    let a = node(&db, &nats.url(), &prefix, slow).await;
    let b = node(&db, &nats.url(), &prefix, slow).await;
    a.instance("missed").await;
    let mut wa = a.connect("missed", "").await;
    let mut wb = b.connect("missed", "").await;
    until_following(&a, "missed", &mut [&mut wa, &mut wb]).await;

    nats.kill();
    eventually(DEADLINE, async || {
        (a.raw("GET", "/readyz", &[], None).await.status == 503).then_some(())
    })
    .await
    .expect("/readyz never turned 503");
    // Stored on A, its notice cannot cross.
    a.configure(
        "missed",
        json!({"enabled": true, "events": ["call.update"]}),
    )
    .await;
    // B still filters by the old settings (a local publish there).
    b.publish(
        "missed",
        json!([
            event("label.update", json!({"n": 0})),
            event("call.update", json!({"n": 1}))
        ]),
    )
    .await;
    assert_eq!(wb.envelope().await["event"], "label.update");
    assert_eq!(wb.envelope().await["event"], "call.update");

    let _nats = NatsServer::start_on(port).expect("nats-server ran a moment ago");
    let ready = eventually(Duration::from_secs(20), async || {
        (a.raw("GET", "/readyz", &[], None).await.status == 200
            && b.raw("GET", "/readyz", &[], None).await.status == 200)
            .then_some(())
    })
    .await;
    assert!(ready.is_some(), "never ready again");
    // B re-reads storage when NATS returns, long before its periodic refresh.
    until_applied(&b, "missed", &mut wb, "label.update", "call.update").await;
}

#[actix_rt::test]
async fn storage_refresh_is_a_safety_net_behind_nats() {
    let Some(db) = require_postgres() else {
        return;
    };
    let Some(nats) = require_nats() else {
        return;
    };
    let prefix = unique_subject_prefix();
    let a = node(&db, &nats, &prefix, |s| s.cluster.refresh_secs = 1).await;
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
    // The refresh loop (every second here) picks it up: probe until it has.
    until_applied(&a, "net", &mut ws, "call.update", "group.flow").await;
    a.publish(
        "net",
        json!([
            event("call.update", json!({})),
            event("group.flow", json!({"n": 1}))
        ]),
    )
    .await;
    assert_eq!(ws.envelope().await["data"]["n"], 1);
    // Nothing else (the call.update) within a bounded window.
    ws.silent(Duration::from_millis(300)).await;
}

#[actix_rt::test]
async fn a_stale_settings_notice_never_overrides_newer_settings() {
    let Some(nats) = require_nats() else {
        return;
    };
    let prefix = unique_subject_prefix();
    let db = TestDb::fresh();
    let a = node(&db, &nats, &prefix, |_| {}).await;
    a.instance("stale").await;
    a.instance("other").await;
    let mut ws = a.connect("stale", "").await;
    let mut other = a.connect("other", "").await;
    a.configure("stale", json!({"enabled": true, "events": ["call.update"]}))
        .await;
    a.configure("stale", json!({"enabled": true, "events": ["group.flow"]}))
        .await;
    let (id, other_id, version) = {
        let pool = eventgate::storage::connect(&db.url, 1, Duration::from_secs(5)).unwrap();
        let mut conn = pool.get().unwrap();
        let account = eventgate::domain::AccountId(1);
        let find = |conn: &mut _, name| {
            eventgate::storage::instances::find(conn, account, name)
                .unwrap()
                .unwrap()
                .id
        };
        let id = find(&mut conn, "stale");
        let other_id = find(&mut conn, "other");
        let stored = eventgate::storage::ws_settings::get(&mut conn, id)
            .unwrap()
            .unwrap();
        assert_eq!(
            stored.config.events,
            vec![eventgate::domain::EventKind::GroupFlow]
        );
        (id, other_id, stored.version)
    };
    // Another node's notice of the older version arrives late, followed by a
    // deletion notice of `other`: once `other` is closed, the stale notice
    // has been handed to the instance's actor too (one subscription, in order).
    let client = async_nats::connect(nats.as_str()).await.unwrap();
    // Encoded as nodes encode them, so the test follows the wire format.
    let stale = eventgate::instance::Change::Settings {
        instance: id,
        settings: Some(eventgate::domain::VersionedConfig {
            config: eventgate::domain::WsConfig::normalized(
                true,
                vec![eventgate::domain::EventKind::CallUpdate],
                false,
            ),
            version: version - 1,
        }),
    };
    // A notice without settings ("none stored") is older than any version too.
    let none = eventgate::instance::Change::Settings {
        instance: id,
        settings: None,
    };
    let deleted = eventgate::instance::Change::Deleted { instance: other_id };
    for notice in [stale, none, deleted] {
        client
            .publish(
                format!("{prefix}.ctl"),
                serde_json::to_vec(&notice).unwrap().into(),
            )
            .await
            .unwrap();
    }
    client.flush().await.unwrap();
    assert_eq!(other.closed(Duration::from_secs(5)).await, Some(4004));
    // The newest version still rules this node's clients.
    a.publish(
        "stale",
        json!([
            event("call.update", json!({"n": 0})),
            event("group.flow", json!({"n": 1}))
        ]),
    )
    .await;
    let got = ws.envelope().await;
    assert_eq!(got["event"], "group.flow", "{got}");
    assert_eq!(got["data"]["n"], 1);
    ws.silent(Duration::from_millis(300)).await;
}

/// While NATS is down a node cannot hear of webhook changes made on another
/// node: its publishes read the instance's enabled webhooks from storage, so
/// a webhook enabled elsewhere gets the deliveries of every 202 and one
/// disabled elsewhere gets none.
#[actix_rt::test]
async fn while_nats_is_down_publishes_follow_the_webhooks_in_storage() {
    let Some(db) = require_postgres() else {
        return;
    };
    let Some(mut nats) = NatsServer::start() else {
        return;
    };
    let prefix = unique_subject_prefix();
    let tweak = |s: &mut eventgate::settings::Settings| {
        // No periodic refresh within the test: only storage can tell.
        s.cluster.refresh_secs = 3600;
        s.webhook.allowed_networks = vec!["127.0.0.0/8".into()];
    };
    let a = node(&db, &nats.url(), &prefix, tweak).await;
    let b = node(&db, &nats.url(), &prefix, tweak).await;
    a.instance("hooks").await;
    let rx = Receiver::start();
    set(
        &a,
        json!({"label": "d", "enabled": true, "url": rx.url("/d")}),
    )
    .await;
    a.publish("hooks", event("call.update", json!({"n": 1})))
        .await;
    rx.wait_count(1, DEADLINE).await;

    nats.kill();
    eventually(DEADLINE, async || {
        (a.raw("GET", "/readyz", &[], None).await.status == 503
            && b.raw("GET", "/readyz", &[], None).await.status == 503)
            .then_some(())
    })
    .await
    .expect("/readyz never turned 503");
    // Changed on B; the notices cannot cross.
    set(&b, json!({"label": "d", "enabled": false})).await;
    set(
        &b,
        json!({"label": "e", "enabled": true, "url": rx.url("/e")}),
    )
    .await;
    let r = a
        .publish("hooks", event("call.update", json!({"n": 2})))
        .await;
    assert_eq!(r.status, 202);
    let got = rx.wait_count(2, DEADLINE).await;
    assert_eq!(got[1].path, "/e");
    assert_eq!(got[1].json()["data"], json!({"n": 2}));
    let failed = a
        .call(
            "GET",
            "/api/events/webhook/hooks/failed?label=d",
            Some(ACCOUNT),
            None,
        )
        .await;
    assert_eq!(failed.body["deliveries"], json!([]), "{}", failed.body);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(rx.count(), 2);
}

async fn set(s: &TestServer, body: Value) {
    let r = s
        .call(
            "POST",
            "/api/events/webhook/hooks",
            Some(ACCOUNT),
            Some(body),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
}
