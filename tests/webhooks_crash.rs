//! Webhook durability with the real binary: SIGKILL during a stream of
//! publishes while the receiver is down, then a restart with the receiver
//! up — every acknowledged event arrives at least once (SQLite and
//! PostgreSQL); and two nodes on PostgreSQL, one killed with deliveries in
//! flight, the other delivers them; a configuration change made on one node
//! is in force on the other.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod webhook_receiver;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{event, free_port, Process, TestDb, TestServer, ACCOUNT};
use eventgate::settings::Settings;
use serde_json::{json, Value};
use webhook_receiver::{eventually, Receiver};

fn env(extra: &[(&'static str, String)]) -> Vec<(&'static str, String)> {
    let mut v = vec![
        (
            "EVENTGATE_WEBHOOK_ALLOWED_NETWORKS",
            "127.0.0.0/8".to_string(),
        ),
        (
            "EVENTGATE_WEBHOOK_RETRY_SCHEDULE_SECS",
            vec!["1"; 100].join(","),
        ),
        ("EVENTGATE_WEBHOOK_TIMEOUT_SECS", "2".to_string()),
    ];
    v.extend_from_slice(extra);
    v
}

fn env_refs(v: &[(&'static str, String)]) -> Vec<(&'static str, String)> {
    v.to_vec()
}

/// Publishes batches of 5 events with ids `<task>-<n>` until the server is
/// gone; returns the ids whose publish was acknowledged with 202.
async fn producer(s: Arc<TestServer>, task: usize, acked: Arc<Mutex<Vec<String>>>) {
    for n in 0..100_000 {
        let ids: Vec<String> = (0..5).map(|k| format!("{task}-{n}-{k}")).collect();
        let batch: Vec<Value> = ids
            .iter()
            .map(|id| event("message.exchange", json!({"id": id})))
            .collect();
        let body = serde_json::to_vec(&batch).unwrap();
        let headers = [("token", ACCOUNT), ("content-type", "application/json")];
        match s
            .try_request("POST", "/api/events/publish/crash", &headers, Some(&body))
            .await
        {
            Ok((202, _, _)) => acked.lock().unwrap().extend(ids),
            _ => return,
        }
    }
}

fn received_ids(rx: &Receiver) -> Vec<String> {
    rx.got()
        .iter()
        .map(|g| g.json()["data"]["id"].as_str().unwrap().to_string())
        .collect()
}

async fn crash_and_check(db: TestDb) {
    let port = free_port(); // the receiver is down until after the restart
    let env = env(&[]);
    let mut p = Process::start(&db, &["serve"], &env_refs(&env));
    let s = Arc::new(p.client(&Settings::default()));
    s.instance_with("crash", json!({"name": "crash"})).await;
    let r = s
        .call(
            "POST",
            "/api/events/webhook/crash",
            Some(ACCOUNT),
            Some(json!({"enabled": true, "url": format!("http://127.0.0.1:{port}/in")})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let acked = Arc::new(Mutex::new(Vec::new()));
    let tasks: Vec<_> = (0..4)
        .map(|t| actix_rt::spawn(producer(s.clone(), t, acked.clone())))
        .collect();
    // Let the stream run, then pull the plug.
    eventually(Duration::from_secs(20), "acknowledged publishes", || {
        let n = acked.lock().unwrap().len();
        async move { (n >= 200).then_some(()) }
    })
    .await;
    p.signal("KILL");
    p.wait_exit(Duration::from_secs(5)).expect("killed");
    for t in tasks {
        let _ = t.await;
    }
    let acked: Vec<String> = acked.lock().unwrap().clone();
    assert!(!acked.is_empty());

    let rx = Receiver::start_on(port);
    let p2 = Process::start(&db, &["serve"], &env_refs(&env));
    let want: HashSet<String> = acked.iter().cloned().collect();
    let got = rx
        .wait_for(Duration::from_secs(90), "every acknowledged event", |_| {
            let have: HashSet<String> = received_ids(&rx).into_iter().collect();
            want.is_subset(&have)
        })
        .await;
    let mut counts: HashMap<String, usize> = HashMap::new();
    for id in received_ids(&rx) {
        *counts.entry(id).or_default() += 1;
    }
    let duplicates = counts.values().filter(|n| **n > 1).count();
    println!(
        "acknowledged {} events; received {} requests for {} distinct events ({} duplicated)",
        acked.len(),
        got.len(),
        counts.len(),
        duplicates
    );
    // The retried ones kept their webhook-id: ids per event are stable.
    let mut ids_by_event: HashMap<String, HashSet<String>> = HashMap::new();
    for g in rx.got() {
        ids_by_event
            .entry(g.json()["data"]["id"].as_str().unwrap().to_string())
            .or_default()
            .insert(g.id());
    }
    assert!(
        ids_by_event.values().all(|ids| ids.len() == 1),
        "one webhook-id per delivery"
    );
    drop(p2);
}

#[actix_rt::test]
async fn sigkill_while_the_receiver_is_down_loses_no_acknowledged_event_on_sqlite() {
    crash_and_check(TestDb::sqlite()).await;
}

#[actix_rt::test]
async fn sigkill_while_the_receiver_is_down_loses_no_acknowledged_event_on_postgres() {
    let Some(db) = common::require_postgres() else {
        return;
    };
    crash_and_check(db).await;
}

#[actix_rt::test]
async fn another_node_delivers_what_a_killed_node_held_in_flight() {
    let Some(db) = common::require_postgres() else {
        return;
    };
    let rx = Receiver::start();
    rx.hold(true); // node A's attempts hang
    let env = env(&[]);
    let mut a = Process::start(&db, &["serve"], &env_refs(&env));
    let sa = a.client(&Settings::default());
    sa.instance_with("two", json!({"name": "two"})).await;
    let r = sa
        .call(
            "POST",
            "/api/events/webhook/two",
            Some(ACCOUNT),
            Some(json!({"enabled": true, "url": rx.url("/two")})),
        )
        .await;
    assert_eq!(r.status, 200);
    let events: Vec<Value> = (0..6)
        .map(|i| event("call.update", json!({"i": i})))
        .collect();
    assert_eq!(sa.publish("two", json!(events)).await.status, 202);
    rx.wait_count(6, Duration::from_secs(20)).await; // all six in flight on A
    a.signal("KILL");
    a.wait_exit(Duration::from_secs(5)).expect("killed");
    rx.hold(false);
    let b = Process::start(&db, &["serve"], &env_refs(&env));
    let sb = b.client(&Settings::default());
    // B takes them over once A's leases lapse (timeout + margin), and they succeed.
    let st = eventually(Duration::from_secs(60), "B delivers", || async {
        let r = sb
            .call(
                "GET",
                "/api/events/getWebhook/two?label=default",
                Some(ACCOUNT),
                None,
            )
            .await;
        let st = r.body["webhook"]["stats"].clone();
        (st["delivered"] == 6).then_some(st)
    })
    .await;
    assert_eq!(st["pending"], 0);
    let got = rx.got();
    let delivered: HashSet<i64> = got
        .iter()
        .skip(6)
        .map(|g| g.json()["data"]["i"].as_i64().unwrap())
        .collect();
    assert_eq!(delivered, (0..6).collect::<HashSet<_>>());
    assert!(
        got.iter().skip(6).all(|g| g.attempt() == 2),
        "the killed node's attempt counted"
    );
    for i in 0..6 {
        let ids: HashSet<String> = got
            .iter()
            .filter(|g| g.json()["data"]["i"] == i)
            .map(|g| g.id())
            .collect();
        assert_eq!(ids.len(), 1, "same webhook-id on the other node");
    }
}

/// The `default` webhook's stats of instance `x`.
async fn wh_stats(s: &TestServer) -> Value {
    let r = s
        .call(
            "GET",
            "/api/events/getWebhook/x?label=default",
            Some(ACCOUNT),
            None,
        )
        .await;
    r.body["webhook"]["stats"].clone()
}

/// Waits until the node answers `/readyz` with 200.
async fn ready(s: &TestServer) {
    eventually(Duration::from_secs(20), "readiness", || async {
        matches!(
            s.try_request("GET", "/readyz", &[], None).await,
            Ok((200, _, _))
        )
        .then_some(())
    })
    .await;
}

#[actix_rt::test]
async fn a_webhook_set_on_one_node_takes_effect_on_the_other() {
    let Some(db) = common::require_postgres() else {
        return;
    };
    let Some(nats) = common::NatsServer::start() else {
        return;
    };
    let rx = Receiver::start();
    let env = env(&[(
        "EVENTGATE_NATS_URL",
        format!("nats://127.0.0.1:{}", nats.port),
    )]);
    let a = Process::start(&db, &["serve"], &env_refs(&env));
    let sa = a.client(&Settings::default());
    ready(&sa).await; // migrated before the second node starts
    let b = Process::start(&db, &["serve"], &env_refs(&env));
    let sb = b.client(&Settings::default());
    ready(&sb).await;
    sa.instance_with("x", json!({"name": "x"})).await;
    // Both nodes have read the (empty) webhook map; now set it on A only.
    let r = sa
        .call(
            "POST",
            "/api/events/webhook/x",
            Some(ACCOUNT),
            Some(json!({"enabled": true, "url": rx.url("/x")})),
        )
        .await;
    assert_eq!(r.status, 200);
    let mut n = 0;
    eventually(Duration::from_secs(10), "a publish on B delivered", || {
        n += 1;
        let sb = &sb;
        let rx = &rx;
        async move {
            assert_eq!(
                sb.publish("x", event("group.flow", json!({"n": n})))
                    .await
                    .status,
                202
            );
            (rx.count() > 0).then_some(())
        }
    })
    .await;
    // Disabling on A stops B from storing deliveries.
    sa.call(
        "POST",
        "/api/events/webhook/x",
        Some(ACCOUNT),
        Some(json!({"enabled": false})),
    )
    .await;
    eventually(
        Duration::from_secs(10),
        "B knows it is disabled",
        || async {
            let before = wh_stats(&sb).await["failed"].clone();
            sb.publish("x", event("group.flow", json!({}))).await;
            let after = wh_stats(&sb).await;
            // Nothing stored for the disabled webhook: neither pending nor a new dead letter.
            (after["pending"] == 0 && after["failed"] == before).then_some(())
        },
    )
    .await;
}
