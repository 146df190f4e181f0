//! WebSocket settings over real HTTP (contract §5): upsert, read, idempotence,
//! `enabled=false` clearing, validation, concurrency and persistence.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{TestServer, ACCOUNT, KINDS};
use serde_json::json;

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

#[actix_rt::test]
async fn fifty_concurrent_upserts_end_in_one_of_them() {
    let s = TestServer::start_with(|st| st.rate_limit.per_minute = 1000).await;
    s.instance("hot").await;
    let bodies: Vec<_> = (0..50)
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
