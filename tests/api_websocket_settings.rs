//! WebSocket settings over real HTTP (contract §5): upsert, read, idempotence,
//! `enabled=false` clearing, validation, concurrency and persistence.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{event, TestServer, Ws, ACCOUNT, KINDS};
use serde_json::{json, Value};

#[actix_rt::test]
async fn set_and_get() {
    let s = TestServer::start().await;
    s.instance_with("i1", json!({"name":"i1"})).await;
    s.call("GET", "/api/events/getWebsocket/i1", Some(ACCOUNT), None)
        .await
        .assert_error(404, "WebSocket not configured for this instance");
    let body = json!({"enabled":true,"events":["message.exchange","message.status","message.exchange"],"mediaBase64":true,"extra":1});
    let r = s
        .call(
            "POST",
            "/api/events/websocket/i1",
            Some(ACCOUNT),
            Some(body.clone()),
        )
        .await;
    assert_eq!(r.status, 200);
    let expected = json!({"success":true,"message":"WebSocket configured successfully",
        "websocket":{"enabled":true,"events":["message.exchange","message.status"],"mediaBase64":true}});
    assert_eq!(r.body, expected);
    // Idempotent.
    let again = s
        .call(
            "POST",
            "/api/events/websocket/i1",
            Some(ACCOUNT),
            Some(body),
        )
        .await;
    assert_eq!(again.body, expected);
    let r = s
        .call("GET", "/api/events/getWebsocket/i1", Some(ACCOUNT), None)
        .await;
    assert_eq!(
        r.body,
        json!({"success":true,"message":"WebSocket configuration retrieved",
            "websocket":{"enabled":true,"events":["message.exchange","message.status"],"mediaBase64":true}})
    );
    // Defaults for omitted keys.
    let r = s.configure("i1", json!({"enabled":true})).await;
    assert_eq!(r, json!({"enabled":true,"events":[],"mediaBase64":false}));
    // enabled=false clears events and mediaBase64, the row stays.
    let r = s
        .configure(
            "i1",
            json!({"enabled":false,"events":["call.update"],"mediaBase64":true}),
        )
        .await;
    assert_eq!(r, json!({"enabled":false,"events":[],"mediaBase64":false}));
    let r = s
        .call("GET", "/api/events/getWebsocket/i1", Some(ACCOUNT), None)
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.body["websocket"],
        json!({"enabled":false,"events":[],"mediaBase64":false})
    );
}

#[actix_rt::test]
async fn instance_token_on_own_and_other_instances() {
    let s = TestServer::start().await;
    let t1 = s.instance("one").await;
    s.instance("two").await;
    let r = s
        .call(
            "POST",
            "/api/events/websocket/one",
            Some(&t1),
            Some(json!({"enabled":true})),
        )
        .await;
    assert_eq!(
        r.status, 200,
        "a TokenInstance may configure its own instance"
    );
    let r = s
        .call("GET", "/api/events/getWebsocket/one", Some(&t1), None)
        .await;
    assert_eq!(r.status, 200);
    for path in ["/api/events/websocket/two", "/api/events/websocket/ghost"] {
        s.call("POST", path, Some(&t1), Some(json!({"enabled":true})))
            .await
            .assert_error(403, "Instance token does not match this instance");
    }
    s.call("GET", "/api/events/getWebsocket/two", Some(&t1), None)
        .await
        .assert_error(403, "Instance token does not match this instance");
    s.call(
        "POST",
        "/api/events/websocket/ghost",
        Some(ACCOUNT),
        Some(json!({"enabled":true})),
    )
    .await
    .assert_error(404, "Instance not found");
    s.call("GET", "/api/events/getWebsocket/ghost", Some(ACCOUNT), None)
        .await
        .assert_error(404, "Instance not found");
}

#[actix_rt::test]
async fn invalid_bodies() {
    let s = TestServer::start().await;
    s.instance("v").await;
    for bad in [
        json!({}),
        json!({"enabled":"true"}),
        json!({"enabled":null}),
        json!({"enabled":1}),
        json!({"enabled":true,"events":null}),
        json!({"enabled":true,"events":"message.exchange"}),
        json!({"enabled":true,"events":["message.exchange","unknown.event"]}),
        json!({"enabled":true,"events":[["call.update"]]}),
        json!({"enabled":true,"mediaBase64":null}),
        json!({"enabled":true,"mediaBase64":"false"}),
        json!({"enabled":false,"events":["bad"]}),
        json!([{"enabled":true}]),
        json!("enabled"),
    ] {
        s.call(
            "POST",
            "/api/events/websocket/v",
            Some(ACCOUNT),
            Some(bad.clone()),
        )
        .await
        .assert_error(400, "Invalid request body");
    }
    let headers = [("token", ACCOUNT), ("content-type", "application/json")];
    for raw in [&b"{"[..], b"", b"not json", b"{\"enabled\":tru}"] {
        s.raw("POST", "/api/events/websocket/v", &headers, Some(raw))
            .await
            .assert_error(400, "Invalid request body");
    }
    for ct in ["text/plain", "application/x-www-form-urlencoded"] {
        s.raw(
            "POST",
            "/api/events/websocket/v",
            &[("token", ACCOUNT), ("content-type", ct)],
            Some(br#"{"enabled":true}"#),
        )
        .await
        .assert_error(400, "Invalid request body");
    }
    s.raw(
        "POST",
        "/api/events/websocket/v",
        &[("token", ACCOUNT)],
        Some(br#"{"enabled":true}"#),
    )
    .await
    .assert_error(400, "Invalid request body");
    let r = s
        .raw(
            "POST",
            "/api/events/websocket/v",
            &[
                ("token", ACCOUNT),
                ("content-type", "application/json; charset=utf-8"),
            ],
            Some(br#"{"enabled":true}"#),
        )
        .await;
    assert_eq!(r.status, 200, "charset parameter allowed");
    let big = format!(r#"{{"enabled":true,"pad":"{}"}}"#, "x".repeat(1 << 20));
    s.raw(
        "POST",
        "/api/events/websocket/v",
        &headers,
        Some(big.as_bytes()),
    )
    .await
    .assert_error(413, "Payload too large");
    // Nothing of the refused writes landed.
    let r = s
        .call("GET", "/api/events/getWebsocket/v", Some(ACCOUNT), None)
        .await;
    assert_eq!(
        r.body["websocket"],
        json!({"enabled":true,"events":[],"mediaBase64":false})
    );
}

/// The stored settings of an instance of the test account, read from the
/// database: (version, settings as the API shows them).
fn stored_row(s: &TestServer, name: &str) -> (i64, Value) {
    let pool = eventgate::storage::connect(&s.db.url, 1, Duration::from_secs(5)).unwrap();
    let mut conn = pool.get().unwrap();
    let rec = eventgate::storage::instances::find(&mut conn, eventgate::domain::AccountId(1), name)
        .unwrap()
        .unwrap();
    let row = eventgate::storage::ws_settings::get(&mut conn, rec.id)
        .unwrap()
        .unwrap();
    (row.version, serde_json::to_value(&row.config).unwrap())
}

/// Publishes one event of each kind (each with a media payload) and asserts
/// that a connected client gets exactly what `config` lets through: the
/// settings its node's instance actor holds are `config`.
async fn assert_live(s: &TestServer, name: &str, ws: &mut Ws, config: &Value, round: usize) {
    let batch: Vec<Value> = KINDS
        .iter()
        .map(|k| {
            event(
                k,
                json!({"round": round, "message": {"media": {"base64": "QUJD"}}}),
            )
        })
        .collect();
    assert_eq!(s.publish(name, Value::Array(batch)).await.status, 202);
    if config["enabled"] == true {
        for kind in KINDS
            .iter()
            .filter(|k| config["events"].as_array().unwrap().contains(&json!(k)))
        {
            let got = ws.envelope().await;
            assert_eq!(got["event"], *kind, "live settings are {config}: {got}");
            assert_eq!(got["data"]["round"], round, "{got}");
            let base64 = &got["data"]["message"]["media"]["base64"];
            let kept = *kind != "message.exchange" || config["mediaBase64"] == true;
            assert_eq!(
                base64.is_string(),
                kept,
                "live settings are {config}: {got}"
            );
        }
    }
    // Nothing the settings exclude, within a bounded window (a negative check).
    ws.silent(Duration::from_millis(300)).await;
}

#[actix_rt::test]
async fn fifty_concurrent_upserts_end_in_one_of_them() {
    let s = TestServer::start_with(|st| {
        st.rate_limit.per_minute = 1000;
        // Many upserts in flight at once: their notices race to the actor.
        st.storage.pool_size = 16;
    })
    .await;
    s.instance("hot").await;
    // A client connected throughout sees what the node's actor holds.
    let mut ws = s.connect("hot", "").await;
    // Several rounds, so that replies and settings notices overtake each other.
    for round in 0..8 {
        let (version_before, _) = stored_row(&s, "hot");
        let bodies: Vec<_> = (0..50)
            .map(|i| i + 50 * round)
            .map(
                |i| json!({"enabled": i % 7 != 0, "events": [KINDS[i % 6]], "mediaBase64": i % 2 == 0}),
            )
            .collect();
        let replies = futures_util::future::join_all(bodies.iter().map(|b| {
            s.call(
                "POST",
                "/api/events/websocket/hot",
                Some(ACCOUNT),
                Some(b.clone()),
            )
        }))
        .await;
        let mut acknowledged = Vec::new();
        for r in &replies {
            assert_eq!(r.status, 200, "{}", r.body);
            acknowledged.push(r.body["websocket"].clone());
        }
        let stored = s
            .call("GET", "/api/events/getWebsocket/hot", Some(ACCOUNT), None)
            .await
            .body["websocket"]
            .clone();
        assert!(
            acknowledged.contains(&stored),
            "final state {stored} is one of the writes"
        );
        let possible: Vec<_> = bodies
            .iter()
            .map(|b| {
                let enabled = b["enabled"].as_bool().unwrap();
                if enabled {
                    json!({"enabled":true,"events":b["events"],"mediaBase64":b["mediaBase64"]})
                } else {
                    json!({"enabled":false,"events":[],"mediaBase64":false})
                }
            })
            .collect();
        assert!(possible.contains(&stored));
        // Newest version wins: every acknowledged upsert made a version of its
        // own, the row holds the newest, the API answers with it, and the
        // instance's actor (told by fifty handlers in any order) holds it too.
        let (version, newest) = stored_row(&s, "hot");
        assert_eq!(
            version,
            version_before + 50,
            "round {round}: one version per acknowledged upsert"
        );
        assert_eq!(
            stored, newest,
            "round {round}: the API shows the newest version"
        );
        assert_live(&s, "hot", &mut ws, &newest, round).await;
    }
}

#[actix_rt::test]
async fn settings_survive_a_restart_on_the_same_database() {
    let first = TestServer::start().await;
    let token = first.instance("keep").await;
    first
        .configure(
            "keep",
            json!({"enabled":true,"events":["label.update"],"mediaBase64":true}),
        )
        .await;
    let db = first.db;
    // A second server process on the same database (the first one's pool is left behind).
    let second = TestServer::start_on(db, |_| {}).await;
    let r = second
        .call("GET", "/api/events/getWebsocket/keep", Some(&token), None)
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.body["websocket"],
        json!({"enabled":true,"events":["label.update"],"mediaBase64":true})
    );
    let r = second
        .call("GET", "/api/instance/list", Some(ACCOUNT), None)
        .await;
    assert_eq!(r.body["instances"][0]["token"], json!(token));
}
