//! Crash safety: the real binary is killed with SIGKILL in the middle of a
//! stream of settings upserts and instance creations, restarted on the same
//! database, and every acknowledged write must be there, with nothing
//! half-written — on SQLite and on PostgreSQL. The kill comes once a given
//! number of writes were acknowledged, not after a guessed time.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Process, TestDb, TestServer, ACCOUNT, KINDS};
use eventgate::settings::Settings;
use serde_json::{json, Value};
use tokio::sync::Notify;

/// The settings body that encodes generation `g` (distinct for g in 1..=127).
fn settings_for(g: u32) -> Value {
    let events: Vec<&str> = (0..6)
        .filter(|b| g & (1 << b) != 0)
        .map(|b| KINDS[b])
        .collect();
    json!({"enabled": true, "events": events, "mediaBase64": g & 64 != 0})
}

/// Settings upserts acknowledged (over all writers) before the kill.
const KILL_AFTER_SETTINGS: u32 = 100;
/// Instance creations acknowledged before the kill.
const KILL_AFTER_CREATED: usize = 20;

#[derive(Default)]
struct Acked {
    /// Per instance: the last acknowledged generation and the one in flight.
    settings: HashMap<String, (u32, u32)>,
    /// Instances whose creation was acknowledged, and those attempted.
    created: Vec<String>,
    attempted: Vec<String>,
}

impl Acked {
    fn settings_acked(&self) -> u32 {
        self.settings.values().map(|(a, _)| *a).sum()
    }
}

async fn writer(s: Arc<TestServer>, name: String, acked: Arc<Mutex<Acked>>, progress: Arc<Notify>) {
    for g in 1..=127u32 {
        acked
            .lock()
            .unwrap()
            .settings
            .entry(name.clone())
            .or_default()
            .1 = g;
        let r = send(
            &s,
            &format!("/api/events/websocket/{name}"),
            settings_for(g),
        )
        .await;
        match r {
            Some(200) => {
                acked.lock().unwrap().settings.get_mut(&name).unwrap().0 = g;
                progress.notify_one();
            }
            _ => return,
        }
    }
}

async fn creator(s: Arc<TestServer>, acked: Arc<Mutex<Acked>>, progress: Arc<Notify>) {
    for i in 0..10_000 {
        let name = format!("new-{i}");
        acked.lock().unwrap().attempted.push(name.clone());
        let body =
            json!({"name": name, "websocketEnabled": true, "websocketEvents": ["group.flow"]});
        match send(&s, "/api/instance/new", body).await {
            Some(201) => {
                acked.lock().unwrap().created.push(name);
                progress.notify_one();
            }
            _ => return,
        }
    }
}

/// A POST whose connection may be cut by the crash: `None` when it was.
async fn send(s: &TestServer, path: &str, body: Value) -> Option<u16> {
    let body = serde_json::to_vec(&body).unwrap();
    let headers = [("token", ACCOUNT), ("content-type", "application/json")];
    s.try_request("POST", path, &headers, Some(&body))
        .await
        .ok()
        .map(|(status, _, _)| status)
}

async fn crash_and_check(db: TestDb) {
    let env = [(
        "EVENTGATE_RATE_LIMIT_INSTANCE_NEW_PER_MINUTE",
        "1000000".to_string(),
    )];
    let mut p = Process::start(&db, &["serve"], &env);
    let s = Arc::new(p.client(&Settings::default()));
    let names: Vec<String> = (0..4).map(|i| format!("hot-{i}")).collect();
    for name in &names {
        s.instance(name).await;
    }
    let acked = Arc::new(Mutex::new(Acked::default()));
    let progress = Arc::new(Notify::new());
    let mut tasks = Vec::new();
    for name in &names {
        tasks.push(actix_rt::spawn(writer(
            s.clone(),
            name.clone(),
            acked.clone(),
            progress.clone(),
        )));
    }
    tasks.push(actix_rt::spawn(creator(
        s.clone(),
        acked.clone(),
        progress.clone(),
    )));
    // Pull the plug once enough writes of both kinds were acknowledged.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (settings, created) = {
            let a = acked.lock().unwrap();
            (a.settings_acked(), a.created.len())
        };
        if settings >= KILL_AFTER_SETTINGS && created >= KILL_AFTER_CREATED {
            break;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            tokio::time::timeout(left, progress.notified())
                .await
                .is_ok(),
            "only {settings} settings and {created} creations acknowledged within 60 s"
        );
    }
    p.signal("KILL");
    p.wait_exit(Duration::from_secs(5)).expect("killed");
    for t in tasks {
        let _ = t.await;
    }
    let acked = Arc::try_unwrap(acked).ok().unwrap().into_inner().unwrap();
    let total: u32 = acked.settings_acked();
    assert!(
        total > 0 && !acked.created.is_empty(),
        "the stream was under way when killed"
    );
    assert!(
        acked.settings.values().any(|(done, _)| *done < 127),
        "the kill came before the writers finished"
    );

    let p2 = Process::start(&db, &["serve"], &[]);
    let s2 = p2.client(&Settings::default());
    for (name, (last_acked, in_flight)) in &acked.settings {
        let r = s2
            .call(
                "GET",
                &format!("/api/events/getWebsocket/{name}"),
                Some(ACCOUNT),
                None,
            )
            .await;
        assert_eq!(r.status, 200, "{name}");
        let stored = &r.body["websocket"];
        let ok = *stored == settings_for(*last_acked)
            || *stored == settings_for(*in_flight)
            || (*last_acked == 0 && stored["events"] == json!([]));
        assert!(
            ok,
            "{name}: stored {stored}, acknowledged generation {last_acked}, in flight {in_flight}"
        );
    }
    let r = s2
        .call("GET", "/api/instance/list", Some(ACCOUNT), None)
        .await;
    let listed: HashMap<String, Value> = r.body["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["name"].as_str().unwrap().to_string(),
                i["websocket"].clone(),
            )
        })
        .collect();
    for name in &acked.created {
        assert!(
            listed.contains_key(name),
            "acknowledged instance {name} lost"
        );
    }
    for (name, ws) in &listed {
        if name.starts_with("new-") {
            assert!(acked.attempted.contains(name));
            // Created with its settings in one transaction: never one without the other.
            assert_eq!(
                ws,
                &json!({"enabled": true, "events": ["group.flow"], "mediaBase64": false}),
                "{name}"
            );
        }
    }
}

#[actix_rt::test]
async fn sigkill_during_writes_loses_nothing_acknowledged_on_sqlite() {
    crash_and_check(TestDb::sqlite()).await;
}

#[actix_rt::test]
async fn sigkill_during_writes_loses_nothing_acknowledged_on_postgres() {
    let Some(db) = common::require_postgres() else {
        return;
    };
    crash_and_check(db).await;
}

#[actix_rt::test]
async fn nodes_started_together_on_a_fresh_postgres_database_both_migrate() {
    let Some(db) = common::require_postgres() else {
        return;
    };
    // Each process listens before it migrates, so all three migrate at once.
    let mut nodes: Vec<Process> = (0..3)
        .map(|_| Process::start(&db, &["serve"], &[]))
        .collect();
    for p in &mut nodes {
        let s = p.client(&Settings::default());
        let ready = common::eventually(Duration::from_secs(30), async || {
            match s.try_request("GET", "/readyz", &[], None).await {
                Ok((200, _, _)) => Some(()),
                _ => None,
            }
        })
        .await;
        assert!(
            ready.is_some(),
            "node did not become ready: {:?}\n{}",
            p.child.try_wait(),
            p.stderr()
        );
    }
}
