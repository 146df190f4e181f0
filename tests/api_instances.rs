//! Instances over real HTTP: creation, listing, deletion, and every error row
//! of contract §2, §3 and §8.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{TestServer, ACCOUNT};
use serde_json::json;

#[actix_rt::test]
async fn create_list_delete() {
    let s = TestServer::start().await;
    let r = s
        .call(
            "POST",
            "/api/instance/new",
            Some(ACCOUNT),
            Some(json!({"name":"sales-1","websocketEnabled":true,"websocketEvents":["call.update","call.update"],"websocketMediaBase64":true})),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["success"], true);
    assert_eq!(r.body["message"], "Instance created");
    assert_eq!(r.body["instance"]["name"], "sales-1");
    let token = r.body["instance"]["token"].as_str().unwrap().to_string();
    assert!(token.len() >= 32, "at least 128 bits");
    assert_eq!(
        r.body["instance"]["websocket"],
        json!({"enabled":true,"events":["call.update"],"mediaBase64":true})
    );

    let r = s
        .call(
            "POST",
            "/api/instance/new",
            Some(ACCOUNT),
            Some(json!({"name":"b","websocketEvents":["group.flow"]})),
        )
        .await;
    assert_eq!(r.status, 201);
    assert_eq!(
        r.body["instance"]["websocket"],
        json!(null),
        "no websocketEnabled → none stored"
    );

    let r = s
        .call("GET", "/api/instance/list", Some(ACCOUNT), None)
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["message"], "2 Instances found");
    let list = r.body["instances"].as_array().unwrap();
    assert_eq!(list[0]["name"], "sales-1", "creation order");
    assert_eq!(list[1]["name"], "b");
    assert_eq!(list[0]["token"], json!(token));
    assert_eq!(list[0]["connectedClients"], 0);
    assert_eq!(list[1]["websocket"], json!(null));

    // A TokenInstance sees only its own instance, without the token key.
    let r = s
        .call("GET", "/api/instance/list", Some(&token), None)
        .await;
    assert_eq!(r.body["message"], "1 Instance found");
    let own = &r.body["instances"][0];
    assert_eq!(own["name"], "sales-1");
    assert!(own.get("token").is_none());

    let r = s
        .call("DELETE", "/api/instance/delete/b", Some(ACCOUNT), None)
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.body,
        json!({"success":true,"message":"Instance deleted","instance":{"status":"deleted"}})
    );
    let r = s
        .call(
            "DELETE",
            "/api/instance/delete/sales-1",
            Some(ACCOUNT),
            None,
        )
        .await;
    assert_eq!(r.status, 200);
    let r = s
        .call("GET", "/api/instance/list", Some(ACCOUNT), None)
        .await;
    assert_eq!(r.body["message"], "0 Instances found");
    // The deleted instance's token stops working at once.
    s.call("GET", "/api/instance/list", Some(&token), None)
        .await
        .assert_error(401, "Invalid token");
}

#[actix_rt::test]
async fn creation_errors() {
    let s = TestServer::start().await;
    let token = s.instance("dup").await;
    s.call(
        "POST",
        "/api/instance/new",
        Some(ACCOUNT),
        Some(json!({"name":"dup"})),
    )
    .await
    .assert_error(409, "Instance already exists");
    let custom = "c".repeat(40);
    let r = s
        .call(
            "POST",
            "/api/instance/new",
            Some(ACCOUNT),
            Some(json!({"name":"c1","token":custom})),
        )
        .await;
    assert_eq!(r.status, 201);
    assert_eq!(r.body["instance"]["token"], json!(custom));
    s.call(
        "POST",
        "/api/instance/new",
        Some(ACCOUNT),
        Some(json!({"name":"c2","token":custom})),
    )
    .await
    .assert_error(409, "Token already in use");
    s.call(
        "POST",
        "/api/instance/new",
        Some(ACCOUNT),
        Some(json!({"name":"c3","token":ACCOUNT})),
    )
    .await
    .assert_error(409, "Token already in use");
    for bad in [
        json!({}),
        json!({"name": ""}),
        json!({"name": "-x"}),
        json!({"name": "a b"}),
        json!({"name": "x".repeat(65)}),
        json!({"name": 7}),
        json!({"name": "ok", "token": "short"}),
        json!({"name": "ok", "token": format!("{} x", "a".repeat(40))}),
        json!({"name": "ok", "websocketEnabled": "yes"}),
        json!({"name": "ok", "websocketEnabled": null}),
        json!({"name": "ok", "websocketEvents": ["message.nope"]}),
        json!({"name": "ok", "websocketMediaBase64": 1}),
        json!(["ok"]),
    ] {
        s.call(
            "POST",
            "/api/instance/new",
            Some(ACCOUNT),
            Some(bad.clone()),
        )
        .await
        .assert_error(400, "Invalid request body");
    }
    // Malformed JSON and a wrong content type.
    s.raw(
        "POST",
        "/api/instance/new",
        &[("token", ACCOUNT), ("content-type", "application/json")],
        Some(b"{"),
    )
    .await
    .assert_error(400, "Invalid request body");
    s.raw(
        "POST",
        "/api/instance/new",
        &[("token", ACCOUNT), ("content-type", "text/plain")],
        Some(br#"{"name":"ok"}"#),
    )
    .await
    .assert_error(400, "Invalid request body");
    // A TokenInstance may not create, delete or publish.
    s.call(
        "POST",
        "/api/instance/new",
        Some(&token),
        Some(json!({"name":"z"})),
    )
    .await
    .assert_error(401, "Invalid token");
    s.call("DELETE", "/api/instance/delete/dup", Some(&token), None)
        .await
        .assert_error(401, "Invalid token");
    s.call(
        "POST",
        "/api/events/publish/dup",
        Some(&token),
        Some(json!({"event":"call.update","data":{}})),
    )
    .await
    .assert_error(401, "Invalid token");
    s.call("DELETE", "/api/instance/delete/ghost", Some(ACCOUNT), None)
        .await
        .assert_error(404, "Instance not found");
}

#[actix_rt::test]
async fn body_over_one_mib_is_413_after_auth() {
    let s = TestServer::start().await;
    let big = format!(r#"{{"name":"x","pad":"{}"}}"#, "a".repeat(1024 * 1024));
    s.raw(
        "POST",
        "/api/instance/new",
        &[("token", ACCOUNT), ("content-type", "application/json")],
        Some(big.as_bytes()),
    )
    .await
    .assert_error(413, "Payload too large");
    // Token is checked before size.
    s.raw(
        "POST",
        "/api/instance/new",
        &[("content-type", "application/json")],
        Some(big.as_bytes()),
    )
    .await
    .assert_error(
        401,
        "Missing token in header, Authorization header, or query parameter",
    );
}

#[actix_rt::test]
async fn instances_are_per_account() {
    let s = TestServer::start().await;
    s.instance("shared-name").await;
    let other = "second-account-token-abcdefabcdef0123";
    s.add_account(other);
    let r = s
        .call(
            "POST",
            "/api/instance/new",
            Some(other),
            Some(json!({"name":"shared-name"})),
        )
        .await;
    assert_eq!(r.status, 201, "names are unique per account only");
    let r = s.call("GET", "/api/instance/list", Some(other), None).await;
    assert_eq!(r.body["message"], "1 Instance found");
    s.call(
        "DELETE",
        "/api/instance/delete/shared-name",
        Some(other),
        None,
    )
    .await;
    let r = s
        .call("GET", "/api/instance/list", Some(ACCOUNT), None)
        .await;
    assert_eq!(
        r.body["message"], "1 Instance found",
        "the other account's instance is untouched"
    );
}
