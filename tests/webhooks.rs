//! Webhooks (contract §11) against real receivers: HTTP servers inside the
//! test on 127.0.0.1 (allowed through `webhook.allowed_networks`, as an
//! operator would allow a private network). Signatures are checked with the
//! `standardwebhooks` crate, not the gateway's own signing code.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod webhook_receiver;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{event, Reply, TestServer, ACCOUNT};
use eventgate::settings::Settings;
use serde_json::{json, Value};
use webhook_receiver::{eventually, Receiver};

const WAIT: Duration = Duration::from_secs(20);

/// Runs `$body` with `$c` a connection of its own to the server's database
/// at `$url`, of either backend (on SQLite, waiting its turn to write).
macro_rules! on_db {
    ($url:expr, $c:ident => $body:expr) => {{
        use diesel::{Connection, RunQueryDsl};
        let url: &str = $url;
        if url.starts_with("postgres") {
            let $c = &mut diesel::PgConnection::establish(url).unwrap();
            $body
        } else {
            let $c = &mut diesel::SqliteConnection::establish(url).unwrap();
            diesel::sql_query("PRAGMA busy_timeout = 10000")
                .execute($c)
                .unwrap();
            $body
        }
    }};
}

/// A server that may deliver to the tests' receivers on 127.0.0.0/8, with
/// `tweak` made to its settings.
async fn loopback_server(tweak: impl FnOnce(&mut Settings)) -> TestServer {
    TestServer::start_with(|s| {
        allow_loopback(s);
        tweak(s);
    })
    .await
}

/// Lets the server deliver to the tests' receivers on 127.0.0.0/8.
fn allow_loopback(s: &mut Settings) {
    s.webhook.allowed_networks = vec!["127.0.0.0/8".into()];
}

/// A server that may deliver to 127.0.0.0/8, with a short retry schedule.
async fn server_with(schedule: &[u64]) -> TestServer {
    let schedule = schedule.to_vec();
    loopback_server(move |s| {
        s.webhook.retry_schedule_secs = schedule;
        s.webhook.timeout_secs = 3;
    })
    .await
}

async fn server() -> TestServer {
    server_with(&[1, 1]).await
}

async fn set(s: &TestServer, name: &str, body: Value) -> Reply {
    s.call(
        "POST",
        &format!("/api/events/webhook/{name}"),
        Some(ACCOUNT),
        Some(body),
    )
    .await
}

async fn set_ok(s: &TestServer, name: &str, body: Value) -> Value {
    let r = set(s, name, body).await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.body["webhook"].clone()
}

async fn get(s: &TestServer, path: &str) -> Reply {
    s.call("GET", path, Some(ACCOUNT), None).await
}

async fn stats(s: &TestServer, name: &str, label: &str) -> Value {
    let r = get(s, &format!("/api/events/getWebhook/{name}?label={label}")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.body["webhook"]["stats"].clone()
}

async fn failed(s: &TestServer, name: &str, query: &str) -> Reply {
    get(s, &format!("/api/events/webhook/{name}/failed{query}")).await
}

/// Waits until the webhook's stats satisfy `cond`.
async fn wait_stats(
    s: &TestServer,
    name: &str,
    label: &str,
    cond: impl Fn(&Value) -> bool,
) -> Value {
    eventually(WAIT, "webhook stats", || async {
        let st = stats(s, name, label).await;
        cond(&st).then_some(st)
    })
    .await
}

fn assert_invalid(r: &Reply, key: &str) {
    r.assert_error(400, "Invalid request body");
    let details = r.body["error"]["details"].as_str().unwrap_or_default();
    assert!(
        details.contains(key),
        "details {details:?} should name {key}"
    );
}

#[actix_rt::test]
async fn set_get_delete_with_the_contract_literals() {
    let s = server().await;
    let token = s.instance("sales-1").await;
    let r = get(&s, "/api/events/getWebhook/sales-1").await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.body,
        json!({"success": true, "message": "0 Webhooks found", "webhooks": []})
    );

    let r = set(
        &s,
        "sales-1",
        json!({"enabled": true, "url": "https://app.example.com/wh", "extra": 1}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["message"], "Webhook configured successfully");
    let wh = &r.body["webhook"];
    let secret = wh["secret"].as_str().unwrap().to_string();
    assert!(
        secret.starts_with("whsec_") && secret.len() == 50,
        "{secret}"
    );
    assert_eq!(
        *wh,
        json!({"label": "default", "enabled": true, "url": "https://app.example.com/wh",
               "authorization": null, "byEvents": false, "events": [], "mediaBase64": false,
               "ordered": false, "secret": secret})
    );

    // Same label again: whole configuration replaced, secret kept.
    let again = set_ok(&s, "sales-1", json!({"label": "", "enabled": true, "url": "https://b.example/x?y=1",
        "authorization": "Bearer abc", "events": ["call.update", "group.flow", "call.update"], "ordered": true})).await;
    assert_eq!(again["secret"], secret);
    assert_eq!(again["events"], json!(["call.update", "group.flow"]));
    assert_eq!(again["authorization"], "Bearer abc");
    assert_eq!(again["url"], "https://b.example/x?y=1");
    // "" authorization counts as null.
    let cleared = set_ok(
        &s,
        "sales-1",
        json!({"enabled": true, "url": "https://b.example/x", "authorization": ""}),
    )
    .await;
    assert_eq!(cleared["authorization"], Value::Null);
    assert_eq!(cleared["ordered"], false);

    set_ok(&s, "sales-1", json!({"label": "b-2", "enabled": false})).await;
    set_ok(&s, "sales-1", json!({"label": "A.1", "enabled": false})).await;
    // Both routes, both tokens; sorted by label in byte order.
    for path in [
        "/api/events/getWebhook/sales-1",
        "/api/events/webhook/sales-1",
    ] {
        for t in [ACCOUNT, token.as_str()] {
            let r = s.call("GET", path, Some(t), None).await;
            assert_eq!(r.status, 200);
            assert_eq!(r.body["message"], "3 Webhooks found");
            let labels: Vec<&str> = r.body["webhooks"]
                .as_array()
                .unwrap()
                .iter()
                .map(|w| w["label"].as_str().unwrap())
                .collect();
            assert_eq!(labels, ["A.1", "b-2", "default"]);
            let st = &r.body["webhooks"][2]["stats"];
            assert_eq!(
                *st,
                json!({"pending": 0, "failed": 0, "delivered": 0, "lastSuccessAt": null, "lastFailureAt": null, "lastError": null})
            );
        }
    }
    let one = get(&s, "/api/events/getWebhook/sales-1?label=").await;
    assert_eq!(one.body["message"], "Webhook retrieved");
    assert_eq!(one.body["webhook"]["label"], "default");
    for bad in ["nope", "a%20b", &"x".repeat(65)] {
        get(&s, &format!("/api/events/webhook/sales-1?label={bad}"))
            .await
            .assert_error(404, "Webhook not found");
    }
    let r = get(&s, "/api/events/getWebhook/sales-1?label=A.1").await;
    assert_eq!(r.body["webhook"]["url"], Value::Null);

    // Delete: `?label=` or none means default.
    let r = s
        .call(
            "DELETE",
            "/api/events/webhook/sales-1?label=b-2",
            Some(ACCOUNT),
            None,
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.body,
        json!({"success": true, "message": "Webhook deleted", "webhook": {"label": "b-2", "status": "deleted"}})
    );
    let r = s
        .call("DELETE", "/api/events/webhook/sales-1", Some(&token), None)
        .await;
    assert_eq!(r.body["webhook"]["label"], "default");
    s.call(
        "DELETE",
        "/api/events/webhook/sales-1?label=",
        Some(ACCOUNT),
        None,
    )
    .await
    .assert_error(404, "Webhook not found");
    assert_eq!(
        get(&s, "/api/events/getWebhook/sales-1").await.body["message"],
        "1 Webhook found"
    );

    // §2 checks and the methods of the shared path.
    s.call("GET", "/api/events/getWebhook/nope", Some(ACCOUNT), None)
        .await
        .assert_error(404, "Instance not found");
    s.call("GET", "/api/events/getWebhook/sales-1", None, None)
        .await
        .assert_error(
            401,
            "Missing token in header, Authorization header, or query parameter",
        );
    let other = s.instance("other").await;
    s.call("GET", "/api/events/getWebhook/sales-1", Some(&other), None)
        .await
        .assert_error(403, "Instance token does not match this instance");
    let r = s
        .call("PUT", "/api/events/webhook/sales-1", Some(ACCOUNT), None)
        .await;
    r.assert_error(405, "Method not allowed");
    assert_eq!(r.header("allow"), Some("GET, HEAD, POST, DELETE"));
    s.call(
        "GET",
        "/api/events/webhook/sales-1/retry",
        Some(ACCOUNT),
        None,
    )
    .await
    .assert_error(405, "Method not allowed");
    assert!(r.header("x-ratelimit-limit").is_some());
}

#[actix_rt::test]
async fn invalid_bodies_name_their_key() {
    let s = TestServer::start().await;
    s.instance("v").await;
    let long_url = format!("https://a.example/{}", "x".repeat(2048));
    let cases: Vec<(Value, &str)> = vec![
        (json!({}), "enabled"),
        (json!({"enabled": null}), "enabled"),
        (json!({"enabled": "true"}), "enabled"),
        (json!({"enabled": true}), "url"),
        (json!({"enabled": true, "url": null}), "url"),
        (json!({"enabled": true, "url": 5}), "url"),
        (json!({"enabled": true, "url": "ftp://a.example/"}), "url"),
        (json!({"enabled": true, "url": "https://"}), "url"),
        (
            json!({"enabled": true, "url": "https://u:p@a.example/"}),
            "url",
        ),
        (
            json!({"enabled": true, "url": "https://a.example/#frag"}),
            "url",
        ),
        (json!({"enabled": true, "url": long_url}), "url"),
        (json!({"enabled": false, "url": "not a url"}), "url"),
        // Refused IP literals, at set time.
        (
            json!({"enabled": true, "url": "http://127.0.0.1:9/x"}),
            "url",
        ),
        (json!({"enabled": true, "url": "http://10.0.0.5/x"}), "url"),
        (
            json!({"enabled": true, "url": "http://169.254.169.254/latest"}),
            "url",
        ),
        (json!({"enabled": true, "url": "http://100.64.0.1/"}), "url"),
        // Other spellings of IPv4 addresses the URL standard reads (127.0.0.1, 10.0.0.1).
        (json!({"enabled": true, "url": "http://127.1:9/x"}), "url"),
        (
            json!({"enabled": true, "url": "http://2130706433/x"}),
            "url",
        ),
        (
            json!({"enabled": true, "url": "http://0x7f000001/x"}),
            "url",
        ),
        (json!({"enabled": true, "url": "http://10.1/x"}), "url"),
        (json!({"enabled": true, "url": "http://[::1]:80/"}), "url"),
        (
            json!({"enabled": true, "url": "http://[::ffff:192.168.0.1]/"}),
            "url",
        ),
        (
            json!({"enabled": true, "url": "http://[64:ff9b::a00:1]/"}),
            "url",
        ),
        (
            json!({"enabled": true, "url": "http://[2002:a00:1::]/"}),
            "url",
        ),
        (json!({"enabled": true, "url": "http://[fe80::1]/"}), "url"),
        (
            json!({"enabled": true, "url": "https://a.example", "label": "a b"}),
            "label",
        ),
        (
            json!({"enabled": true, "url": "https://a.example", "label": "x".repeat(65)}),
            "label",
        ),
        (
            json!({"enabled": true, "url": "https://a.example", "label": null}),
            "label",
        ),
        (
            json!({"enabled": true, "url": "https://a.example", "label": 3}),
            "label",
        ),
        (
            json!({"enabled": true, "url": "https://a.example", "authorization": 1}),
            "authorization",
        ),
        (
            json!({"enabled": true, "url": "https://a.example", "authorization": "x".repeat(1025)}),
            "authorization",
        ),
        (
            json!({"enabled": true, "url": "https://a.example", "authorization": "a\nb"}),
            "authorization",
        ),
        (
            json!({"enabled": true, "url": "https://a.example", "byEvents": null}),
            "byEvents",
        ),
        (
            json!({"enabled": true, "url": "https://a.example", "events": null}),
            "events",
        ),
        (
            json!({"enabled": true, "url": "https://a.example", "events": "call.update"}),
            "events",
        ),
        (
            json!({"enabled": true, "url": "https://a.example", "events": ["nope"]}),
            "events",
        ),
        (
            json!({"enabled": true, "url": "https://a.example", "mediaBase64": 1}),
            "mediaBase64",
        ),
        (
            json!({"enabled": true, "url": "https://a.example", "ordered": null}),
            "ordered",
        ),
        (
            json!({"enabled": true, "url": "https://a.example", "rotateSecret": "yes"}),
            "rotateSecret",
        ),
    ];
    for (body, key) in cases {
        let r = set(&s, "v", body.clone()).await;
        assert_invalid(&r, key);
    }
    // Not an object, malformed JSON, another content type.
    for raw in [&b"[1]"[..], b"nope", b"{"] {
        let r = s
            .raw(
                "POST",
                "/api/events/webhook/v",
                &[("token", ACCOUNT), ("content-type", "application/json")],
                Some(raw),
            )
            .await;
        r.assert_error(400, "Invalid request body");
    }
    let r = s
        .raw(
            "POST",
            "/api/events/webhook/v",
            &[("token", ACCOUNT), ("content-type", "text/plain")],
            Some(br#"{"enabled":false}"#),
        )
        .await;
    r.assert_error(400, "Invalid request body");
    // No Content-Type at all: not a JSON object as the contract asks.
    let r = s
        .raw(
            "POST",
            "/api/events/webhook/v",
            &[("token", ACCOUNT)],
            Some(br#"{"enabled":false}"#),
        )
        .await;
    r.assert_error(400, "Invalid request body");
    let r = s
        .raw(
            "POST",
            "/api/events/webhook/v",
            &[
                ("token", ACCOUNT),
                ("content-type", "application/json; charset=utf-8"),
            ],
            Some(br#"{"enabled":false}"#),
        )
        .await;
    assert_eq!(r.status, 200);
    // Public addresses and names are fine (names are not resolved at set time).
    set_ok(
        &s,
        "v",
        json!({"label": "n", "enabled": true, "url": "https://hooks.example.com:8443/p?q=1"}),
    )
    .await;
    set_ok(
        &s,
        "v",
        json!({"label": "ip", "enabled": true, "url": "http://[2001:db8::1]:8080/p"}),
    )
    .await;
    set_ok(
        &s,
        "v",
        json!({"label": "lh", "enabled": true, "url": "http://localhost:1/p"}),
    )
    .await;
}

#[actix_rt::test]
async fn at_most_three_enabled_per_instance() {
    let s = server().await;
    s.instance("lim").await;
    for l in ["a", "b", "c"] {
        set_ok(
            &s,
            "lim",
            json!({"label": l, "enabled": true, "url": "https://a.example/"}),
        )
        .await;
    }
    let r = set(
        &s,
        "lim",
        json!({"label": "d", "enabled": true, "url": "https://a.example/"}),
    )
    .await;
    r.assert_error(409, "Maximum of 3 enabled webhooks per instance");
    // A disabled fourth is fine, so is re-setting an enabled one.
    set_ok(&s, "lim", json!({"label": "d", "enabled": false})).await;
    set_ok(
        &s,
        "lim",
        json!({"label": "a", "enabled": true, "url": "https://b.example/"}),
    )
    .await;
    set(
        &s,
        "lim",
        json!({"label": "d", "enabled": true, "url": "https://a.example/"}),
    )
    .await
    .assert_error(409, "Maximum of 3 enabled webhooks per instance");
    set_ok(&s, "lim", json!({"label": "b", "enabled": false})).await;
    set_ok(
        &s,
        "lim",
        json!({"label": "d", "enabled": true, "url": "https://a.example/"}),
    )
    .await;
}

#[actix_rt::test]
async fn disabling_clears_and_rotation_replaces_the_secret() {
    let s = server().await;
    s.instance("rot").await;
    let first = set_ok(&s, "rot", json!({"enabled": true, "url": "https://a.example/", "rotateSecret": true,
        "authorization": "Basic x", "events": ["call.update"], "mediaBase64": true, "byEvents": true, "ordered": true})).await;
    let off = set_ok(&s, "rot", json!({"enabled": false, "url": "https://a.example/", "byEvents": true, "ordered": true, "mediaBase64": true})).await;
    assert_eq!(
        off,
        json!({"label": "default", "enabled": false, "url": null, "authorization": null,
        "byEvents": true, "events": [], "mediaBase64": false, "ordered": true, "secret": first["secret"]})
    );
    let rotated = set_ok(
        &s,
        "rot",
        json!({"enabled": true, "url": "https://a.example/", "rotateSecret": true}),
    )
    .await;
    assert_ne!(rotated["secret"], first["secret"]);
    assert!(rotated["secret"].as_str().unwrap().starts_with("whsec_"));
}

#[actix_rt::test]
async fn delivery_carries_the_envelope_every_header_and_a_verifiable_signature() {
    let s = server().await;
    let rx = Receiver::start();
    let token = s.instance_with("env-1", json!({"name": "env-1"})).await; // no WebSocket settings at all
    let wh = set_ok(
        &s,
        "env-1",
        json!({"enabled": true, "url": rx.url("/hook?k=v"), "authorization": "Bearer s3cret"}),
    )
    .await;
    let data = json!({"n": 1, "text": "héllo", "nested": {"a": [1, 2.5, null]}});
    let r = s.publish("env-1", event("call.update", data.clone())).await;
    assert_eq!(r.status, 202);
    let got = rx.wait_count(1, WAIT).await.remove(0);
    assert_eq!(got.path, "/hook");
    assert_eq!(got.query, "k=v");
    assert_eq!(got.header("content-type"), Some("application/json"));
    assert_eq!(
        got.header("user-agent"),
        Some(concat!("eventgate/", env!("CARGO_PKG_VERSION")))
    );
    assert_eq!(got.header("authorization"), Some("Bearer s3cret"));
    assert_eq!(got.header("eventgate-attempt"), Some("1"));
    let id = got.id();
    let tail = id.strip_prefix("msg_").unwrap();
    assert!(
        (1..=64).contains(&tail.len()) && tail.bytes().all(|b| b.is_ascii_alphanumeric()),
        "{id}"
    );
    let ts: i64 = got.header("webhook-timestamp").unwrap().parse().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!((now - ts).abs() < 60);
    let sig = got.header("webhook-signature").unwrap();
    assert!(sig.starts_with("v1,") && !sig.contains(' '), "{sig}");
    assert_eq!(got.header_count("webhook-signature"), 1);
    // An independent implementation verifies it.
    assert!(
        verifies(wh["secret"].as_str().unwrap(), &got, None),
        "signature verifies"
    );
    assert!(!verifies(
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        &got,
        None
    ));
    assert_eq!(
        got.json(),
        json!({"event": "call.update", "data": data,
               "instanceData": {"baseUrl": format!("http://{}", s.addr), "instance": "env-1", "token": token}})
    );
    let st = wait_stats(&s, "env-1", "default", |st| st["delivered"] == 1).await;
    assert_eq!(st["pending"], 0);
    assert!(st["lastSuccessAt"].as_i64().unwrap() > 0);
    assert!(
        s.metric("eventgate_webhook_deliveries_total{outcome=\"success\"}")
            .await
            >= 1.0
    );
    let text = s
        .raw("GET", "/metrics", &[], None)
        .await
        .body
        .as_str()
        .unwrap()
        .to_string();
    assert!(text.contains("eventgate_webhook_pending "), "pending gauge");
    assert!(
        text.contains("eventgate_webhook_delivery_seconds_count 1"),
        "{text}"
    );
}

/// On PostgreSQL the node reads its clock against the database's at
/// start-up and every 5 s (`eventgate_clock_offset_seconds`: on one
/// machine, well under a second); on SQLite there is nothing to compare
/// and the gauge stays NaN.
#[actix_rt::test]
async fn the_clock_offset_is_read_against_postgresql() {
    let s = server().await;
    if !s.db.is_postgres() {
        assert!(s.metric("eventgate_clock_offset_seconds").await.is_nan());
        return;
    }
    let offset = eventually(WAIT, "the clock read", || {
        let s = &s;
        async move {
            let v = s.metric("eventgate_clock_offset_seconds").await;
            (!v.is_nan()).then_some(v)
        }
    })
    .await;
    assert!(offset.abs() < 1.0, "{offset}");
}

/// Whether `secret` verifies `got` as sent, or with `signature` in place
/// of its `webhook-signature` (the Standard Webhooks library, not ours).
fn verifies(secret: &str, got: &webhook_receiver::Got, signature: Option<&str>) -> bool {
    let mut headers = got.header_map();
    if let Some(sig) = signature {
        headers.insert("webhook-signature", sig.parse().unwrap());
    }
    standardwebhooks::Webhook::new(secret)
        .unwrap()
        .verify(&got.body, &headers)
        .is_ok()
}

#[actix_rt::test]
async fn rotation_signs_with_both_secrets() {
    let s = server().await;
    let rx = Receiver::start();
    s.instance("rot2").await;
    let secret_of = |wh: Value| wh["secret"].as_str().unwrap().to_string();
    let rotated = json!({"enabled": true, "url": rx.url("/"), "rotateSecret": true});
    let old = secret_of(set_ok(&s, "rot2", json!({"enabled": true, "url": rx.url("/")})).await);
    let new = secret_of(set_ok(&s, "rot2", rotated.clone()).await);
    assert_ne!(old, new);
    s.publish("rot2", event("group.flow", json!({}))).await;
    let got = rx.wait_count(1, WAIT).await.remove(0);
    let sig = got.header("webhook-signature").unwrap();
    let parts: Vec<&str> = sig.split(' ').collect();
    assert_eq!(parts.len(), 2, "{sig}");
    assert!(parts.iter().all(|p| p.starts_with("v1,")));
    for secret in [&old, &new] {
        assert!(verifies(secret, &got, None), "both verify");
    }
    // The new secret's signature comes first.
    assert!(verifies(&new, &got, Some(parts[0])), "first is the new one");
    // Rotating again within the 24 hours keeps the two newest.
    let newest = secret_of(set_ok(&s, "rot2", rotated).await);
    s.publish("rot2", event("group.flow", json!({"again": true})))
        .await;
    let again = rx.wait_count(2, WAIT).await.remove(1);
    let sig = again.header("webhook-signature").unwrap();
    let parts: Vec<&str> = sig.split(' ').collect();
    assert_eq!(parts.len(), 2, "{sig}");
    assert!(
        verifies(&newest, &again, Some(parts[0])),
        "first is the newest"
    );
    assert!(verifies(&new, &again, None), "the one before still signs");
    assert!(!verifies(&old, &again, None));
    let new = newest;
    // `rotateSecret` on a label's first store makes one secret.
    let fresh = Receiver::start();
    let first_secret = secret_of(
        set_ok(
            &s,
            "rot2",
            json!({"label": "fresh", "enabled": true, "url": fresh.url("/"), "rotateSecret": true}),
        )
        .await,
    );
    s.publish("rot2", event("group.flow", json!({"fresh": true})))
        .await;
    let got = fresh.wait_count(1, WAIT).await.remove(0);
    let sig = got.header("webhook-signature").unwrap();
    assert!(!sig.contains(' '), "{sig}");
    assert!(verifies(&first_secret, &got, None));
    // 24 hours after the rotation only the new secret signs.
    let day_ago = eventgate::storage::now_millis() - 25 * 3_600_000;
    execute(
        &s.db.url,
        &format!("UPDATE webhooks SET rotated_at = {day_ago}"),
    );
    outlast_read_of_webhook().await;
    s.publish("rot2", event("group.flow", json!({"later": true})))
        .await;
    let later = rx
        .wait_count(4, WAIT)
        .await
        .into_iter()
        .find(|d| String::from_utf8_lossy(&d.body).contains(r#""later":true"#))
        .expect("the later delivery");
    let sig = later.header("webhook-signature").unwrap();
    assert!(!sig.contains(' '), "{sig}");
    assert!(verifies(&new, &later, None));
    assert!(!verifies(&old, &later, None));
}

#[actix_rt::test]
async fn by_events_filters_and_media_base64_per_label() {
    let s = server().await;
    let a = Receiver::start();
    let b = Receiver::start();
    s.instance("multi").await;
    set_ok(
        &s,
        "multi",
        json!({"label": "a", "enabled": true, "url": a.url("/a?x=1"), "byEvents": true,
        "events": ["message.exchange"], "mediaBase64": true}),
    )
    .await;
    set_ok(
        &s,
        "multi",
        json!({"label": "b", "enabled": true, "url": b.url("/b/")}),
    )
    .await;
    set_ok(&s, "multi", json!({"label": "off", "enabled": false})).await;
    let media = json!({"message": {"media": {"base64": "AAAA", "mime": "image/png"}}});
    let r = s
        .publish(
            "multi",
            json!([
                event("message.exchange", media.clone()),
                event("call.update", json!({"c": 1}))
            ]),
        )
        .await;
    assert_eq!(r.body["accepted"], 2);
    let got_b = b.wait_count(2, WAIT).await;
    let got_a = a.wait_count(1, WAIT).await;
    assert_eq!(got_a.len(), 1);
    assert_eq!(got_a[0].path, "/a/message.exchange");
    assert_eq!(got_a[0].query, "x=1");
    assert_eq!(got_a[0].json()["data"], media);
    let by_event: HashMap<String, Value> = got_b
        .iter()
        .map(|g| (g.json()["event"].as_str().unwrap().to_string(), g.json()))
        .collect();
    assert!(got_b.iter().all(|g| g.path == "/b/"));
    assert_eq!(
        by_event["message.exchange"]["data"],
        json!({"message": {"media": {"mime": "image/png"}}})
    );
    assert_eq!(by_event["call.update"]["data"], json!({"c": 1}));
    // Each label has its own id for the same event.
    assert_ne!(
        got_a[0].id(),
        got_b
            .iter()
            .find(|g| g.json()["event"] == "message.exchange")
            .unwrap()
            .id()
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(a.count(), 1, "the filter holds");
}

/// Deliveries of one publish are attempted together (a bundle leased
/// whole): one that fails is retried alone, with its id and the next
/// attempt number, and those that succeeded are not sent again.
#[actix_rt::test]
async fn a_failure_among_one_publish_retries_only_that_delivery() {
    let s = server().await;
    let rx = Receiver::start();
    let failed_once = Arc::new(AtomicBool::new(false));
    rx.answer(move |g, _| {
        if g.json()["data"]["i"] == 1 && !failed_once.swap(true, Ordering::SeqCst) {
            (500, vec![])
        } else {
            (200, vec![])
        }
    });
    s.instance("mixed").await;
    set_ok(&s, "mixed", json!({"enabled": true, "url": rx.url("/m")})).await;
    let events: Vec<Value> = (0..4)
        .map(|i| event("call.update", json!({"i": i})))
        .collect();
    assert_eq!(s.publish("mixed", json!(events)).await.status, 202);
    let st = wait_stats(&s, "mixed", "default", |st| st["delivered"] == 4).await;
    assert_eq!(
        (st["pending"].clone(), st["failed"].clone()),
        (json!(0), json!(0))
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let got = rx.got();
    let mut by_i: HashMap<i64, Vec<(String, u32)>> = HashMap::new();
    for g in &got {
        let i = g.json()["data"]["i"].as_i64().unwrap();
        by_i.entry(i).or_default().push((g.id(), g.attempt()));
    }
    for i in [0, 2, 3] {
        assert_eq!(by_i[&i].len(), 1, "event {i} sent once: {by_i:?}");
        assert_eq!(by_i[&i][0].1, 1);
    }
    let retried = &by_i[&1];
    assert_eq!(
        retried.iter().map(|(_, a)| *a).collect::<Vec<_>>(),
        [1, 2],
        "{by_i:?}"
    );
    assert_eq!(retried[0].0, retried[1].0, "same webhook-id");
    assert_eq!(got.len(), 5);
}

#[actix_rt::test]
async fn retries_keep_the_id_then_dead_letter_then_replay() {
    let s = server().await;
    let rx = Receiver::start();
    rx.answer(|_, _| (500, vec![]));
    s.instance("retry").await;
    set_ok(&s, "retry", json!({"enabled": true, "url": rx.url("/r")})).await;
    s.publish("retry", event("label.update", json!({"l": 1})))
        .await;
    let got = rx.wait_count(3, WAIT).await;
    let ids: Vec<String> = got.iter().map(|g| g.id()).collect();
    assert!(ids.iter().all(|i| *i == ids[0]), "{ids:?}");
    assert_eq!(
        got.iter().map(|g| g.attempt()).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    // Intervals of 1 s ± 20% (and 300 ms for a loaded machine).
    for w in got.windows(2) {
        let gap = w[1].at - w[0].at;
        assert!(gap >= Duration::from_millis(750), "{gap:?}");
        assert!(gap <= Duration::from_millis(1500), "{gap:?}");
    }
    let st = wait_stats(&s, "retry", "default", |st| st["failed"] == 1).await;
    assert_eq!(st["pending"], 0);
    assert_eq!(st["lastError"], "HTTP 500");
    assert!(st["lastFailureAt"].as_i64().is_some());
    let f = failed(&s, "retry", "").await;
    assert_eq!(f.status, 200, "{}", f.body);
    assert_eq!(f.body["message"], "1 failed delivery");
    assert_eq!(f.body["next"], Value::Null);
    let d = &f.body["deliveries"][0];
    assert_eq!(d["id"], ids[0].as_str());
    assert_eq!(d["label"], "default");
    assert_eq!(d["event"], "label.update");
    assert_eq!(d["attempts"], 3);
    assert_eq!(d["lastStatus"], 500);
    assert_eq!(d["lastError"], "HTTP 500");
    assert!(d["createdAt"].as_i64().unwrap() <= d["lastAttemptAt"].as_i64().unwrap());
    assert_eq!(d["envelope"]["data"], json!({"l": 1}));
    assert_eq!(d["envelope"]["instanceData"]["instance"], "retry");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(rx.count(), 3, "no attempt after the last");

    // Replay: same id, from the first attempt, to the current URL.
    let rx2 = Receiver::start();
    set_ok(
        &s,
        "retry",
        json!({"enabled": true, "url": rx2.url("/new")}),
    )
    .await;
    let r = s
        .call(
            "POST",
            "/api/events/webhook/retry/retry",
            Some(ACCOUNT),
            Some(json!({"label": "default"})),
        )
        .await;
    assert_eq!(r.status, 202);
    assert_eq!(
        r.body,
        json!({"success": true, "message": "Deliveries requeued", "requeued": 1})
    );
    let again = rx2.wait_count(1, WAIT).await.remove(0);
    assert_eq!(again.id(), ids[0]);
    assert_eq!(again.attempt(), 1);
    assert_eq!(again.path, "/new");
    let st = wait_stats(&s, "retry", "default", |st| st["delivered"] == 1).await;
    assert_eq!(st["failed"], 0);
    assert_eq!(
        st["lastError"], "HTTP 500",
        "lastError stays after a success"
    );
    assert_eq!(
        failed(&s, "retry", "").await.body["message"],
        "0 failed deliveries"
    );
    assert!(
        s.metric("eventgate_webhook_deliveries_total{outcome=\"dead_letter\"}")
            .await
            >= 1.0
    );
    assert!(
        s.metric("eventgate_webhook_deliveries_total{outcome=\"failure\"}")
            .await
            >= 3.0
    );
}

#[actix_rt::test]
async fn dead_letters_page_and_retry_validates() {
    let s = server_with(&[]).await; // one attempt, no retry
    let rx = Receiver::start();
    rx.answer(|_, _| (400, vec![]));
    s.instance("pg").await;
    set_ok(
        &s,
        "pg",
        json!({"label": "x", "enabled": true, "url": rx.url("/")}),
    )
    .await;
    set_ok(&s, "pg", json!({"label": "y", "enabled": false})).await;
    let events: Vec<Value> = (0..5)
        .map(|i| event("message.status", json!({"i": i})))
        .collect();
    s.publish("pg", json!(events)).await;
    wait_stats(&s, "pg", "x", |st| st["failed"] == 5).await;
    // The events' `i` on a page of dead letters, in its order.
    let data_of = |r: &Reply| -> Vec<i64> {
        r.body["deliveries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["envelope"]["data"]["i"].as_i64().unwrap())
            .collect()
    };
    let mut seen = Vec::new();
    let mut after = String::new();
    loop {
        let r = failed(&s, "pg", &format!("?label=x&limit=2{after}")).await;
        assert_eq!(r.status, 200, "{}", r.body);
        let page = r.body["deliveries"].as_array().unwrap().clone();
        assert_eq!(
            r.body["message"],
            if page.len() == 1 {
                "1 failed delivery".to_string()
            } else {
                format!("{} failed deliveries", page.len())
            }
        );
        seen.extend(data_of(&r));
        match r.body["next"].as_str() {
            Some(n) => {
                assert_eq!(n, page.last().unwrap()["id"].as_str().unwrap());
                after = format!("&after={n}");
            }
            None => break,
        }
    }
    assert_eq!(
        seen,
        [0, 1, 2, 3, 4],
        "oldest first by acceptance, each once"
    );
    let all = failed(&s, "pg", "").await;
    assert_eq!(all.body["message"], "5 failed deliveries");
    assert_eq!(all.body["deliveries"][0]["attempts"], 1);
    assert_eq!(
        failed(&s, "pg", "?label=y").await.body["message"],
        "0 failed deliveries"
    );
    for q in [
        "?limit=0",
        "?limit=1001",
        "?limit=abc",
        "?limit=1.5",
        "?limit=-1",
        "?after=nope",
        "?after=msg_a-b",
    ] {
        failed(&s, "pg", q)
            .await
            .assert_error(400, "Invalid request body");
    }
    failed(&s, "pg", "?label=zzz")
        .await
        .assert_error(404, "Webhook not found");
    // Retry: wrong types, unknown label, unknown ids ignored, an empty body means {}.
    let path = "/api/events/webhook/pg/retry";
    for body in [
        json!({"label": 1}),
        json!({"ids": "x"}),
        json!({"ids": [1]}),
        json!([]),
    ] {
        s.call("POST", path, Some(ACCOUNT), Some(body))
            .await
            .assert_error(400, "Invalid request body");
    }
    s.call("POST", path, Some(ACCOUNT), Some(json!({"label": "zzz"})))
        .await
        .assert_error(404, "Webhook not found");
    let r = s
        .call(
            "POST",
            path,
            Some(ACCOUNT),
            Some(json!({"ids": ["msg_unknown"]})),
        )
        .await;
    assert_eq!(r.body["requeued"], 0);
    // More ids than one statement can bind on SQLite: still ignored, not a 500.
    let many: Vec<String> = (0..40_000).map(|i| format!("msg_{i}")).collect();
    let r = s
        .call("POST", path, Some(ACCOUNT), Some(json!({ "ids": many })))
        .await;
    assert_eq!(
        (r.status, &r.body["requeued"]),
        (202, &json!(0)),
        "{}",
        r.body
    );
    let id_of = |i: usize| {
        all.body["deliveries"][i]["id"]
            .as_str()
            .unwrap()
            .to_string()
    };
    // The second is the cursor of a first page of two.
    let (first, second) = (id_of(0), id_of(1));
    rx.answer(|_, _| (204, vec![]));
    let r = s
        .call(
            "POST",
            path,
            Some(ACCOUNT),
            Some(json!({"ids": [second, "msg_x"]})),
        )
        .await;
    assert_eq!(r.body["requeued"], 1);
    // A cursor whose dead letter was replayed and delivered (gone): the page
    // after it holds exactly the three accepted after it, although all five
    // were accepted in the same millisecond.
    wait_stats(&s, "pg", "x", |st| {
        st["delivered"] == 1 && st["failed"] == 4
    })
    .await;
    let r = failed(&s, "pg", &format!("?label=x&after={second}")).await;
    assert_eq!(data_of(&r), [2, 3, 4], "{}", r.body);
    assert_eq!(r.body["next"], Value::Null);
    let r = failed(&s, "pg", &format!("?label=x&after={first}&limit=1")).await;
    assert_eq!(data_of(&r), [2], "{}", r.body);
    assert_eq!(r.body["next"], r.body["deliveries"][0]["id"]);
    let r = s.raw("POST", path, &[("token", ACCOUNT)], None).await;
    assert_eq!(r.status, 202, "{}", r.body);
    let got = rx.wait_count(10, WAIT).await;
    assert_eq!(got.len(), 10);
    wait_stats(&s, "pg", "x", |st| {
        st["delivered"] == 5 && st["failed"] == 0
    })
    .await;
}

/// A cursor whose dead letter was removed without being put back by
/// `/retry` (its webhook's dead letters past retention, or deleted by hand)
/// resumes at its creation time, kept in the id; an id of another form that
/// no dead letter has is an empty last page.
#[actix_rt::test]
async fn a_cursor_whose_dead_letter_was_removed_resumes_at_its_time() {
    let s = server_with(&[]).await;
    s.instance("old").await;
    set_ok(&s, "old", json!({"label": "x", "enabled": false})).await;
    /// An id of the gateway's form made at `millis`.
    fn id_at(millis: i64, tail: char) -> String {
        let digits = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
        let mut time = [b'0'; 8];
        let mut t = millis;
        for slot in time.iter_mut().rev() {
            *slot = digits[(t % 62) as usize];
            t /= 62;
        }
        format!(
            "msg_{}{}",
            String::from_utf8_lossy(&time),
            tail.to_string().repeat(16)
        )
    }
    // Recent times: older dead letters would be past their retention.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let ids: Vec<String> = [(now - 3_000, 'a'), (now - 2_000, 'b'), (now - 1_000, 'c')]
        .iter()
        .map(|(at, tail)| {
            let id = id_at(*at, *tail);
            execute(
                &s.db.url,
                &format!(
                    "INSERT INTO webhook_deliveries (id, webhook_id, event, data, created_at, \
                     next_attempt_at, attempts, last_error, dead_at) SELECT '{id}', id, \
                     'call.update', '{{\"n\":{at}}}', {at}, {at}, 1, 'HTTP 500', {at} \
                     FROM webhooks WHERE label = 'x'"
                ),
            );
            id
        })
        .collect();
    let page = |r: &Reply| -> Vec<String> {
        assert_eq!(r.status, 200, "{}", r.body);
        r.body["deliveries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["id"].as_str().unwrap().to_string())
            .collect()
    };
    let r = failed(&s, "old", &format!("?after={}", ids[0])).await;
    assert_eq!(page(&r), ids[1..]);
    execute(
        &s.db.url,
        &format!("DELETE FROM webhook_deliveries WHERE id = '{}'", ids[1]),
    );
    let r = failed(&s, "old", &format!("?after={}", ids[1])).await;
    assert_eq!(page(&r), ids[2..], "resumed at the gone one's time");
    let r = failed(&s, "old", "?after=msg_neverstored").await;
    assert_eq!(page(&r), Vec::<String>::new());
    assert_eq!(r.body["next"], Value::Null);
}

#[actix_rt::test]
async fn retry_after_is_honoured_and_410_ends_retries() {
    let s = server_with(&[1, 1, 1, 1, 1]).await;
    let rx = Receiver::start();
    rx.answer(|_, n| match n {
        0 => (503, vec![("Retry-After", "3".to_string())]),
        1 => (
            429,
            vec![("Retry-After", "Wed, 21 Oct 2015 07:28:00 GMT".to_string())],
        ),
        // Not whole seconds as written: another form, ignored.
        2 => (503, vec![("Retry-After", "+30".to_string())]),
        // Over 3600: ignored (honoured, the next attempt would be in an hour).
        3 => (503, vec![("Retry-After", "3601".to_string())]),
        // Only a 429 or a 503 carries it.
        4 => (500, vec![("Retry-After", "3".to_string())]),
        _ => (200, vec![]),
    });
    s.instance("ra").await;
    set_ok(&s, "ra", json!({"enabled": true, "url": rx.url("/")})).await;
    s.publish("ra", event("call.update", json!({}))).await;
    let got = rx.wait_count(6, WAIT).await;
    let gap = |i: usize| got[i].at - got[i - 1].at;
    assert!(
        gap(1) >= Duration::from_millis(2900),
        "Retry-After 3 honoured: {:?}",
        gap(1)
    );
    // Ignored, the retry comes after its interval (1 s ± 20%); honoured, it
    // would wait 3 s (on the 500), 30 s or an hour.
    for (i, what, under) in [
        (2, "an HTTP-date", 5000),
        (3, "a signed number", 5000),
        (4, "more than 3600 s", 5000),
        (5, "Retry-After on a 500", 2500),
    ] {
        assert!(
            gap(i) < Duration::from_millis(under),
            "{what} is ignored: {:?}",
            gap(i)
        );
    }
    assert_eq!(got[5].attempt(), 6);

    let gone = Receiver::start();
    gone.answer(|_, _| (410, vec![]));
    set_ok(
        &s,
        "ra",
        json!({"label": "g", "enabled": true, "url": gone.url("/")}),
    )
    .await;
    set_ok(&s, "ra", json!({"enabled": false})).await;
    s.publish("ra", event("call.update", json!({}))).await;
    let st = wait_stats(&s, "ra", "g", |st| st["failed"] == 1).await;
    assert_eq!(st["lastError"], "HTTP 410");
    let f = failed(&s, "ra", "?label=g").await;
    assert_eq!(f.body["deliveries"][0]["attempts"], 1);
    assert_eq!(f.body["deliveries"][0]["lastStatus"], 410);
    assert_eq!(gone.count(), 1);
}

/// Settings at the edge of what parses: a timeout no clock can add (taken
/// as a day) still delivers, and a retry interval too long for the clock is
/// a retry that never comes due — the delivery waits, it is neither retried
/// at once nor made a dead letter.
#[actix_rt::test]
async fn the_largest_timeout_and_interval_neither_panic_nor_wrap() {
    let s = loopback_server(|s| {
        s.webhook.retry_schedule_secs = vec![u64::MAX];
        s.webhook.timeout_secs = u64::MAX;
    })
    .await;
    let rx = Receiver::start();
    rx.answer(|_, n| if n == 0 { (500, vec![]) } else { (204, vec![]) });
    s.instance("edge").await;
    set_ok(&s, "edge", json!({"enabled": true, "url": rx.url("/")})).await;
    s.publish("edge", event("call.update", json!({}))).await;
    let st = wait_stats(&s, "edge", "default", |st| st["lastError"] == "HTTP 500").await;
    assert_eq!(st["pending"], 1);
    // Long enough for a wrapped due time to have come round.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(rx.count(), 1, "not retried");
    let st = stats(&s, "edge", "default").await;
    assert_eq!(
        (st["pending"].clone(), st["failed"].clone()),
        (json!(1), json!(0))
    );
    s.publish("edge", event("call.update", json!({}))).await;
    let got = rx.wait_count(2, WAIT).await;
    assert_eq!(got[1].attempt(), 1, "a new delivery is attempted");
}

/// Without an encryption key, values are stored as given — also one that
/// looks like a sealed value: it is shown and sent verbatim, never taken
/// for a value that cannot be decrypted.
#[actix_rt::test]
async fn an_authorization_that_looks_sealed_is_sent_verbatim_without_a_key() {
    let s = server().await;
    let rx = Receiver::start();
    s.instance("looks").await;
    let auth = "enc:v1:not-a-sealed-value";
    let wh = set_ok(
        &s,
        "looks",
        json!({"enabled": true, "url": rx.url("/"), "authorization": auth}),
    )
    .await;
    assert_eq!(wh["authorization"], auth);
    assert_eq!(stats_full(&s, "looks").await["authorization"], auth);
    s.publish("looks", event("call.update", json!({}))).await;
    let got = rx.wait_count(1, WAIT).await.remove(0);
    assert_eq!(got.header("authorization"), Some(auth));
}

/// §2 on every webhook endpoint, in its order: token (401: missing, then
/// unknown) → instance (403 for another instance's token, 404 for a name
/// unknown to the account) → body size (413) → body (400).
#[actix_rt::test]
async fn every_webhook_endpoint_checks_token_instance_and_size_in_order() {
    let s = server().await;
    s.instance("mine").await;
    let other = s.instance("theirs").await;
    let big = format!(r#"{{"pad":"{}"}}"#, "a".repeat(1024 * 1024));
    let endpoints: [(&str, &str, bool); 6] = [
        ("POST", "/api/events/webhook/{}", true),
        ("GET", "/api/events/getWebhook/{}", false),
        ("GET", "/api/events/webhook/{}", false),
        ("DELETE", "/api/events/webhook/{}?label=x", false),
        ("GET", "/api/events/webhook/{}/failed", false),
        ("POST", "/api/events/webhook/{}/retry", true),
    ];
    for (method, path, has_body) in endpoints {
        let at = |name: &str| path.replace("{}", name);
        let body = has_body.then_some(&b"{}"[..]);
        let json = ("content-type", "application/json");
        let what = format!("{method} {path}");
        s.raw(method, &at("mine"), &[json], body)
            .await
            .assert_error(
                401,
                "Missing token in header, Authorization header, or query parameter",
            );
        s.raw(
            method,
            &at("mine"),
            &[json, ("token", "not-a-known-token-at-all")],
            body,
        )
        .await
        .assert_error(401, "Invalid token");
        s.raw(method, &at("mine"), &[json, ("token", &other)], body)
            .await
            .assert_error(403, "Instance token does not match this instance");
        // The instance is checked before the body's size.
        let body = has_body.then_some(big.as_bytes()).or(body);
        s.raw(method, &at("nope"), &[json, ("token", ACCOUNT)], body)
            .await
            .assert_error(404, "Instance not found");
        if has_body {
            let r = s
                .raw(method, &at("mine"), &[json, ("token", ACCOUNT)], body)
                .await;
            r.assert_error(413, "Payload too large");
            let r = s
                .raw(method, &at("mine"), &[json, ("token", ACCOUNT)], Some(b"{"))
                .await;
            assert_eq!(r.status, 400, "{what}: {}", r.body);
        }
    }
}

#[actix_rt::test]
async fn disabling_turns_pending_deliveries_into_dead_letters() {
    let s = server_with(&[60]).await;
    let port = common::free_port(); // nobody listens: connection refused
    s.instance("dis").await;
    set_ok(
        &s,
        "dis",
        json!({"enabled": true, "url": format!("http://127.0.0.1:{port}/")}),
    )
    .await;
    s.publish(
        "dis",
        json!([
            event("call.update", json!({"a": 1})),
            event("group.flow", json!({}))
        ]),
    )
    .await;
    let st = wait_stats(&s, "dis", "default", |st| {
        st["pending"] == 2 && st["lastError"] == "connection failed"
    })
    .await;
    assert_eq!(st["failed"], 0);
    // The webhook's lastError comes with the first outcome recorded; the
    // other delivery's may be recorded a moment later.
    let both_tried = "SELECT COUNT(*) AS n FROM webhook_deliveries WHERE attempts = 1";
    eventually(WAIT, "both deliveries attempted once", || async {
        (count(&s.db.url, both_tried) == 2).then_some(())
    })
    .await;
    set_ok(&s, "dis", json!({"enabled": false})).await;
    let f = failed(&s, "dis", "").await;
    assert_eq!(f.body["message"], "2 failed deliveries");
    for d in f.body["deliveries"].as_array().unwrap() {
        assert_eq!(d["lastError"], "webhook disabled");
        assert_eq!(d["attempts"], 1);
    }
    let st = stats(&s, "dis", "default").await;
    assert_eq!(
        (st["pending"].clone(), st["failed"].clone()),
        (json!(0), json!(2))
    );
    assert_eq!(
        s.metric("eventgate_webhook_deliveries_total{outcome=\"dead_letter\"}")
            .await,
        2.0,
        "dead letters of any reason are counted"
    );
    // Dead letters of a disabled webhook stay where they are.
    let r = s
        .call(
            "POST",
            "/api/events/webhook/dis/retry",
            Some(ACCOUNT),
            Some(json!({})),
        )
        .await;
    assert_eq!(r.body["requeued"], 0);
    // A disabled webhook receives nothing: no delivery is even stored.
    s.publish("dis", event("call.update", json!({}))).await;
    assert_eq!(stats(&s, "dis", "default").await["failed"], 2);
    // Deleting removes its dead letters.
    s.call("DELETE", "/api/events/webhook/dis", Some(ACCOUNT), None)
        .await;
    set_ok(&s, "dis", json!({"enabled": false})).await;
    assert_eq!(stats(&s, "dis", "default").await["failed"], 0);
}

#[actix_rt::test]
async fn a_name_resolving_to_loopback_is_refused_at_delivery_unless_allowed() {
    let refusing = TestServer::start_with(|s| s.webhook.retry_schedule_secs = vec![1, 1]).await;
    let rx = Receiver::start();
    refusing.instance("dns").await;
    set_ok(
        &refusing,
        "dns",
        json!({"enabled": true, "url": rx.localhost_url("/x")}),
    )
    .await;
    refusing
        .publish("dns", event("call.update", json!({})))
        .await;
    let st = wait_stats(&refusing, "dns", "default", |st| st["failed"] == 1).await;
    assert_eq!(st["lastError"], "refused address");
    let d = failed(&refusing, "dns", "").await.body["deliveries"][0].clone();
    assert_eq!(d["attempts"], 1);
    assert_eq!(d["lastStatus"], Value::Null);
    assert_eq!(d["lastError"], "refused address");
    assert_eq!(rx.count(), 0);

    let allowing = server().await;
    allowing.instance("dns").await;
    set_ok(
        &allowing,
        "dns",
        json!({"enabled": true, "url": rx.localhost_url("/y")}),
    )
    .await;
    allowing
        .publish("dns", event("call.update", json!({})))
        .await;
    let got = rx.wait_count(1, WAIT).await;
    assert_eq!(got[0].path, "/y");
}

/// Deliveries already queued on the node when the webhook's URL changes
/// start at the new URL: each attempt uses the configuration as it is when
/// the attempt starts (§11), not as it was when the delivery was claimed.
#[actix_rt::test]
async fn queued_deliveries_start_with_the_configuration_of_their_start() {
    let s = loopback_server(|s| {
        s.webhook.timeout_secs = 60;
    })
    .await;
    let old = Receiver::start();
    let new = Receiver::start();
    s.instance("moved").await;
    set_ok(&s, "moved", json!({"enabled": true, "url": old.url("/")})).await;
    // A quick first delivery: the lane takes deliveries in depth after it.
    s.publish("moved", event("call.update", json!({"i": 0})))
        .await;
    old.wait_count(1, WAIT).await;
    old.hold(true);
    let batch: Vec<Value> = (1..=100)
        .map(|i| event("call.update", json!({ "i": i })))
        .collect();
    assert_eq!(s.publish("moved", json!(batch)).await.status, 202);
    // Eight in flight, held; the rest wait on this node or in the database.
    eventually(WAIT, "eight held at the old URL", || async {
        (old.count() == 9).then_some(())
    })
    .await;
    set_ok(&s, "moved", json!({"enabled": true, "url": new.url("/")})).await;
    old.hold(false);
    let got = new.wait_count(92, WAIT).await;
    assert_eq!(got.len(), 92);
    assert_eq!(
        old.count(),
        9,
        "nothing started at the old URL after the change"
    );
}

#[actix_rt::test]
async fn a_slow_receiver_does_not_delay_another_label() {
    // Held attempts must not time out (and make room for more) while the
    // fast label's 20 arrive, however busy the machine.
    let s = loopback_server(|s| {
        s.webhook.timeout_secs = 60;
    })
    .await;
    let slow = Receiver::start();
    let fast = Receiver::start();
    slow.hold(true);
    s.instance("iso").await;
    set_ok(
        &s,
        "iso",
        json!({"label": "slow", "enabled": true, "url": slow.url("/")}),
    )
    .await;
    set_ok(
        &s,
        "iso",
        json!({"label": "fast", "enabled": true, "url": fast.url("/")}),
    )
    .await;
    for i in 0..20 {
        let r = s
            .publish("iso", event("call.update", json!({"i": i})))
            .await;
        assert_eq!(r.status, 202);
    }
    fast.wait_count(20, WAIT).await;
    assert_eq!(
        slow.completed(),
        0,
        "the slow receiver answered nothing yet"
    );
    assert!(
        slow.count() <= 8,
        "at most max_in_flight held by the slow one: {}",
        slow.count()
    );
    slow.hold(false);
    slow.wait_count(20, WAIT).await;
}

/// A receiver that answers fast lets its webhook claim ahead of its
/// attempts; when it turns slow, what was claimed ahead and can no longer be
/// attempted within its lease is given back unattempted. Every delivery
/// still arrives, no two attempts of one delivery overlap, and the attempt
/// numbers a receiver sees run 1, 2, 3… without a gap or a repeat.
#[actix_rt::test]
async fn deliveries_claimed_ahead_of_a_receiver_turning_slow_are_given_back() {
    let s = loopback_server(|s| {
        s.webhook.retry_schedule_secs = vec![1; 20];
        s.webhook.timeout_secs = 1;
        s.webhook.max_in_flight = 2;
    })
    .await;
    let rx = Receiver::start();
    s.instance("ahead").await;
    set_ok(&s, "ahead", json!({"enabled": true, "url": rx.url("/")})).await;
    // Fast answers first: the lane learns to claim ahead.
    let warm: Vec<Value> = (0..4)
        .map(|i| event("call.update", json!({"i": i})))
        .collect();
    s.publish("ahead", json!(warm)).await;
    wait_stats(&s, "ahead", "default", |st| st["delivered"] == 4).await;

    // Now every reply is held past the 1 s timeout, for 14 s: two attempts
    // a second, far fewer than what is claimed ahead can wait for.
    rx.hold(true);
    let slow: Vec<Value> = (4..44)
        .map(|i| event("call.update", json!({"i": i})))
        .collect();
    s.publish("ahead", json!(slow)).await;
    tokio::time::sleep(Duration::from_secs(14)).await;
    rx.hold(false);
    let st = eventually(Duration::from_secs(60), "all 44 delivered", || async {
        let st = stats(&s, "ahead", "default").await;
        (st["delivered"] == 44 && st["pending"] == 0).then_some(st)
    })
    .await;
    assert_eq!(st["failed"], 0, "{st}");

    let got = rx.got();
    let mut attempts: HashMap<String, Vec<u32>> = Default::default();
    for g in &got {
        attempts.entry(g.id()).or_default().push(g.attempt());
    }
    assert_eq!(attempts.len(), 44, "every delivery reached the receiver");
    for (id, mut seen) in attempts {
        let in_order = seen.clone();
        seen.sort_unstable();
        assert_eq!(seen, in_order, "{id}: attempts out of order");
        let want: Vec<u32> = (1..=seen.len() as u32).collect();
        assert_eq!(seen, want, "{id}: attempt numbers with a gap or a repeat");
    }
    // The slow phase did fail attempts (so retries, and deliveries given
    // back from the claimed-ahead queue, were numbered above).
    assert!(
        got.len() > 44,
        "the slow phase made failed attempts: {}",
        got.len()
    );
}

/// New deliveries start in acceptance order whichever way they reach the
/// node's lane: claimed from the database, or handed over by the publish
/// that stored them (when the lane has room and nothing older is due).
/// With one in flight, the receiver sees the start order.
#[actix_rt::test]
async fn deliveries_start_in_acceptance_order_whether_claimed_or_handed_over() {
    let s = loopback_server(|s| {
        s.webhook.max_in_flight = 1;
    })
    .await;
    let rx = Receiver::start();
    s.instance("seq").await;
    set_ok(&s, "seq", json!({"enabled": true, "url": rx.url("/")})).await;
    let (batches, per_batch) = (40, 60);
    for b in 0..batches {
        let events: Vec<Value> = (0..per_batch)
            .map(|k| event("call.update", json!({"i": b * per_batch + k})))
            .collect();
        s.publish("seq", json!(events)).await;
        if b % 10 == 9 {
            // A pause: the lane drains and catches up, so the next
            // publishes are handed over, then overflow into the database.
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    let total = (batches * per_batch) as usize;
    let got = rx.wait_count(total, Duration::from_secs(60)).await;
    let order: Vec<i64> = got
        .iter()
        .map(|g| g.json()["data"]["i"].as_i64().unwrap())
        .collect();
    let want: Vec<i64> = (0..total as i64).collect();
    if let Some(at) = order.iter().zip(&want).position(|(a, b)| a != b) {
        panic!(
            "delivery {at} started out of order: {:?}",
            &order[at.saturating_sub(3)..(at + 3).min(order.len())]
        );
    }
    assert_eq!(order.len(), total);
    assert_eq!(rx.max_in_flight(), 1);
}

/// A dead letter of an `ordered` webhook put back by `/retry` while a
/// later delivery of that webhook is in flight waits for it: one in flight
/// at a time.
#[actix_rt::test]
async fn a_dead_letter_put_back_waits_for_the_ordered_delivery_in_flight() {
    let s = server_with(&[]).await; // one attempt, no retry
    let rx = Receiver::start();
    // Only the first request fails: the replay is attempt 1 again.
    rx.answer(|_, n| (if n == 0 { 500 } else { 200 }, vec![]));
    s.instance("ordr").await;
    set_ok(
        &s,
        "ordr",
        json!({"enabled": true, "url": rx.url("/"), "ordered": true}),
    )
    .await;
    s.publish("ordr", event("call.update", json!({"i": 0})))
        .await;
    wait_stats(&s, "ordr", "default", |st| st["failed"] == 1).await;
    let dead = failed(&s, "ordr", "").await.body["deliveries"][0]["id"].clone();
    // 1 is held by the receiver, in flight, when 0 is put back.
    rx.hold(true);
    s.publish("ordr", event("call.update", json!({"i": 1})))
        .await;
    rx.wait_count(2, WAIT).await;
    let r = s
        .call(
            "POST",
            "/api/events/webhook/ordr/retry",
            Some(ACCOUNT),
            Some(json!({ "ids": [dead] })),
        )
        .await;
    assert_eq!(r.body["requeued"], 1, "{}", r.body);
    // Time for a claim (within 20 ms of a retry coming due on this node).
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(rx.count(), 2, "0 was attempted again while 1 was in flight");
    rx.hold(false);
    let got = rx.wait_count(3, WAIT).await;
    let order: Vec<(i64, u32)> = got
        .iter()
        .map(|g| (g.json()["data"]["i"].as_i64().unwrap(), g.attempt()))
        .collect();
    assert_eq!(order, [(0, 1), (1, 1), (0, 1)]);
    assert_eq!(rx.max_in_flight(), 1);
    wait_stats(&s, "ordr", "default", |st| {
        st["failed"] == 0 && st["pending"] == 0 && st["delivered"] == 2
    })
    .await;
}

/// A webhook set to `ordered` while a delivery of it is in flight starts
/// the next one (here a retry that came due meanwhile) only once that one
/// has ended, and then at once, not when its lease would have ended (25 s
/// here).
#[actix_rt::test]
async fn a_webhook_made_ordered_waits_for_the_delivery_in_flight() {
    let s = loopback_server(|s| {
        s.webhook.retry_schedule_secs = vec![2];
        s.webhook.timeout_secs = 10;
    })
    .await;
    let rx = Receiver::start();
    // Only 0's first attempt fails: it is retried 1.6–2.4 s later.
    rx.answer(|got, _| {
        let first = got.json()["data"]["i"] == 0 && got.attempt() == 1;
        (if first { 500 } else { 200 }, vec![])
    });
    s.instance("mko").await;
    set_ok(&s, "mko", json!({"enabled": true, "url": rx.url("/")})).await;
    s.publish("mko", event("call.update", json!({"i": 0})))
        .await;
    wait_stats(&s, "mko", "default", |st| st["lastFailureAt"].is_i64()).await;
    // 1 is held by the receiver, in flight, when the webhook is made ordered.
    rx.hold(true);
    s.publish("mko", event("call.update", json!({"i": 1})))
        .await;
    rx.wait_count(2, WAIT).await;
    set_ok(
        &s,
        "mko",
        json!({"enabled": true, "url": rx.url("/"), "ordered": true}),
    )
    .await;
    // Past 0's retry time.
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    assert_eq!(rx.count(), 2, "0 was retried beside 1 in flight");
    rx.hold(false);
    let released = std::time::Instant::now();
    let got = rx.wait_count(3, WAIT).await;
    assert!(
        released.elapsed() < Duration::from_secs(8),
        "0 waited {:?} after 1 ended",
        released.elapsed()
    );
    let order: Vec<(i64, u32)> = got
        .iter()
        .map(|g| (g.json()["data"]["i"].as_i64().unwrap(), g.attempt()))
        .collect();
    assert_eq!(order, [(0, 1), (1, 1), (0, 2)]);
    assert_eq!(rx.max_in_flight(), 1);
}

#[actix_rt::test]
async fn ordered_holds_back_later_deliveries_until_the_first_succeeds() {
    let s = server_with(&[1, 1]).await;
    let rx = Receiver::start();
    rx.answer(|got, _| {
        let first = got.json()["data"]["i"] == 0 && got.attempt() == 1;
        (if first { 500 } else { 200 }, vec![])
    });
    s.instance("ord").await;
    set_ok(
        &s,
        "ord",
        json!({"enabled": true, "url": rx.url("/"), "ordered": true}),
    )
    .await;
    let events: Vec<Value> = (0..5)
        .map(|i| event("call.update", json!({"i": i})))
        .collect();
    s.publish("ord", json!(events)).await;
    let got = rx.wait_count(6, WAIT).await;
    let order: Vec<(i64, u32)> = got
        .iter()
        .map(|g| (g.json()["data"]["i"].as_i64().unwrap(), g.attempt()))
        .collect();
    assert_eq!(order, [(0, 1), (0, 2), (1, 1), (2, 1), (3, 1), (4, 1)]);
    assert_eq!(rx.max_in_flight(), 1);
    // Each delivery is claimed once the one before it is recorded, not at
    // the next poll for due deliveries: 20 more arrive within 5 s (one
    // every poll, 500 ms, took 10 s), in order.
    let more: Vec<Value> = (5..25)
        .map(|i| event("call.update", json!({"i": i})))
        .collect();
    s.publish("ord", json!(more)).await;
    let got = rx.wait_count(26, Duration::from_secs(5)).await;
    let order: Vec<i64> = got[6..]
        .iter()
        .map(|g| g.json()["data"]["i"].as_i64().unwrap())
        .collect();
    assert_eq!(order, (5..25).collect::<Vec<i64>>());
    assert_eq!(rx.max_in_flight(), 1);

    // Without `ordered`, a retrying delivery does not hold the later ones back.
    let rx2 = Receiver::start();
    rx2.answer(|got, _| {
        (
            (if got.json()["data"]["i"] == 0 && got.attempt() == 1 {
                500
            } else {
                200
            }),
            vec![],
        )
    });
    s.instance("unord").await;
    set_ok(&s, "unord", json!({"enabled": true, "url": rx2.url("/")})).await;
    let events: Vec<Value> = (0..3)
        .map(|i| event("call.update", json!({"i": i})))
        .collect();
    s.publish("unord", json!(events)).await;
    let got = rx2.wait_count(4, WAIT).await;
    let last = got.last().unwrap();
    assert_eq!(
        (last.json()["data"]["i"].as_i64().unwrap(), last.attempt()),
        (0, 2)
    );
}

#[actix_rt::test]
async fn a_dead_receiver_never_refuses_a_producer_nor_websocket_clients() {
    let s = server_with(&[3600]).await;
    let port = common::free_port();
    s.instance("prod").await;
    set_ok(
        &s,
        "prod",
        json!({"enabled": true, "url": format!("http://127.0.0.1:{port}/")}),
    )
    .await;
    let mut ws = s.connect("prod", "").await;
    for i in 0..50 {
        let batch: Vec<Value> = (0..10)
            .map(|j| event("call.update", json!({"i": i, "j": j})))
            .collect();
        let r = s.publish("prod", json!(batch)).await;
        assert_eq!(r.status, 202, "{}", r.body);
        assert_eq!(r.body["accepted"], 10);
    }
    let first = ws.envelope().await;
    assert_eq!(first["data"], json!({"i": 0, "j": 0}));
    let st = wait_stats(&s, "prod", "default", |st| st["pending"] == 500).await;
    assert_eq!(st["delivered"], 0);
}

#[actix_rt::test]
async fn backlog_bound_makes_dead_letters_and_still_accepts() {
    let s = loopback_server(|s| {
        s.webhook.max_pending = 3;
        s.webhook.retry_schedule_secs = vec![3600];
    })
    .await;
    let port = common::free_port();
    s.instance("bl").await;
    set_ok(
        &s,
        "bl",
        json!({"enabled": true, "url": format!("http://127.0.0.1:{port}/")}),
    )
    .await;
    let events: Vec<Value> = (0..5)
        .map(|i| event("call.update", json!({"i": i})))
        .collect();
    let r = s.publish("bl", json!(events)).await;
    assert_eq!(r.status, 202);
    assert_eq!(r.body["accepted"], 5);
    let st = stats(&s, "bl", "default").await;
    assert_eq!(
        (st["pending"].clone(), st["failed"].clone()),
        (json!(3), json!(2))
    );
    let f = failed(&s, "bl", "").await;
    for d in f.body["deliveries"].as_array().unwrap() {
        assert_eq!(d["lastError"], "backlog full");
        assert_eq!(d["attempts"], 0);
        assert_eq!(d["lastStatus"], Value::Null);
        assert_eq!(d["lastAttemptAt"], Value::Null);
    }
    assert_eq!(f.body["deliveries"][0]["envelope"]["data"]["i"], 3);
}

#[actix_rt::test]
async fn concurrent_publishes_stored_together_keep_the_backlog_bound() {
    let s = loopback_server(|s| {
        s.webhook.max_pending = 10;
        s.webhook.retry_schedule_secs = vec![3600];
    })
    .await;
    let port = common::free_port();
    s.instance("group").await;
    set_ok(
        &s,
        "group",
        json!({"enabled": true, "url": format!("http://127.0.0.1:{port}/")}),
    )
    .await;
    // 40 publishes at once: the intake stores those waiting together in one
    // transaction, counting each webhook's pending deliveries once for all.
    let replies = futures_util::future::join_all(
        (0..40).map(|i| s.publish("group", event("call.update", json!({"i": i})))),
    )
    .await;
    for r in &replies {
        assert_eq!(r.status, 202, "{}", r.body);
        assert_eq!(r.body["accepted"], 1);
    }
    let st = stats(&s, "group", "default").await;
    assert_eq!(
        (st["pending"].clone(), st["failed"].clone()),
        (json!(10), json!(30))
    );
    let f = failed(&s, "group", "?limit=1000").await;
    let dead = f.body["deliveries"].as_array().unwrap();
    assert_eq!(dead.len(), 30);
    assert!(dead.iter().all(|d| d["lastError"] == "backlog full"));
}

/// Runs `sql` (one statement or a batch) on the test's database.
fn run_sql(s: &TestServer, sql: &str) {
    use diesel::connection::SimpleConnection;
    let pool = eventgate::storage::connect(&s.db.url, 1, Duration::from_secs(5)).unwrap();
    let mut conn = pool.get().unwrap();
    match &mut *conn {
        eventgate::storage::DbConn::Sqlite(c) => c.batch_execute(sql).unwrap(),
        eventgate::storage::DbConn::Pg(c) => c.batch_execute(sql).unwrap(),
    }
}

/// Instance creation with a webhook is one write: when the webhook cannot
/// be stored, the instance is not stored either, and the same request
/// succeeds once storage works (§8: "nothing is created").
#[actix_rt::test]
async fn an_instance_whose_webhook_cannot_be_stored_is_not_created() {
    let s = server().await;
    let (refuse, allow) = if s.db.is_postgres() {
        ("CREATE FUNCTION refuse() RETURNS trigger AS $$ BEGIN RAISE EXCEPTION 'refused'; END $$ \
         LANGUAGE plpgsql; \
         CREATE TRIGGER refuse BEFORE INSERT ON webhooks FOR EACH ROW EXECUTE FUNCTION refuse();",
         "DROP TRIGGER refuse ON webhooks")
    } else {
        ("CREATE TRIGGER refuse BEFORE INSERT ON webhooks BEGIN SELECT RAISE(ABORT, 'refused'); END;",
         "DROP TRIGGER refuse")
    };
    run_sql(&s, refuse);
    let body = json!({"name": "whole", "webhookEnabled": true, "webhookURL": "https://a.example/",
        "websocketEnabled": true});
    let r = s
        .call(
            "POST",
            "/api/instance/new",
            Some(ACCOUNT),
            Some(body.clone()),
        )
        .await;
    r.assert_error(500, "Internal server error");
    let list = s
        .call("GET", "/api/instance/list", Some(ACCOUNT), None)
        .await;
    assert_eq!(list.body["instances"], json!([]), "{}", list.body);
    run_sql(&s, allow);
    let r = s
        .call("POST", "/api/instance/new", Some(ACCOUNT), Some(body))
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["instance"]["webhook"]["url"], "https://a.example/");
    assert_eq!(r.body["instance"]["websocket"]["enabled"], true);
    // The new webhook is enabled on this node at once.
    let p = s
        .publish("whole", json!(event("call.update", json!({}))))
        .await;
    assert_eq!(p.status, 202);
    let got = s
        .call("GET", "/api/events/getWebhook/whole", Some(ACCOUNT), None)
        .await;
    assert_eq!(
        got.body["webhooks"][0]["stats"]["pending"], 1,
        "{}",
        got.body
    );
}

#[actix_rt::test]
async fn instance_creation_stores_the_default_webhook_and_list_shows_it() {
    let s = server().await;
    let rx = Receiver::start();
    let r = s
        .call(
            "POST",
            "/api/instance/new",
            Some(ACCOUNT),
            Some(json!({"name": "wi", "webhookEnabled": true,
        "webhookURL": rx.url("/c"), "webhookAuthorization": null, "webhookByEvents": true,
        "webhookEvents": ["group.flow"], "webhookMediaBase64": true})),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let wh = r.body["instance"]["webhook"].clone();
    assert_eq!(wh["label"], "default");
    assert_eq!(wh["url"], rx.url("/c"));
    assert_eq!(wh["byEvents"], true);
    assert_eq!(wh["events"], json!(["group.flow"]));
    assert!(wh["secret"].as_str().unwrap().starts_with("whsec_"));
    assert!(wh.get("stats").is_none());
    assert_eq!(r.body["instance"]["websocket"], Value::Null);
    s.publish(
        "wi",
        json!([
            event("call.update", json!({})),
            event("group.flow", json!({"g": 1}))
        ]),
    )
    .await;
    let got = rx.wait_count(1, WAIT).await;
    assert_eq!(got[0].path, "/c/group.flow");

    let none = s
        .call(
            "POST",
            "/api/instance/new",
            Some(ACCOUNT),
            Some(json!({"name": "wn", "webhookURL": "https://a.example/"})),
        )
        .await;
    assert_eq!(none.status, 201);
    assert_eq!(none.body["instance"]["webhook"], Value::Null);
    for bad in [
        json!({"name": "wb1", "webhookEnabled": true}),
        json!({"name": "wb2", "webhookEnabled": "yes", "webhookURL": "https://a.example/"}),
        json!({"name": "wb3", "webhookURL": "nope"}),
        json!({"name": "wb4", "webhookEnabled": true, "webhookURL": "http://10.0.0.1/"}),
        json!({"name": "wb5", "webhookEnabled": false, "webhookEvents": ["x"]}),
        json!({"name": "wb6", "webhookByEvents": null}),
    ] {
        let r = s
            .call(
                "POST",
                "/api/instance/new",
                Some(ACCOUNT),
                Some(bad.clone()),
            )
            .await;
        r.assert_error(400, "Invalid request body");
    }
    let list = s
        .call("GET", "/api/instance/list", Some(ACCOUNT), None)
        .await;
    let names: Vec<&str> = list.body["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["wi", "wn"],
        "nothing was created for the invalid bodies"
    );
    let wi = &list.body["instances"][0];
    assert_eq!(wi["webhook"]["secret"], wh["secret"]);
    assert!(wi["webhook"].get("stats").is_none());
    assert_eq!(list.body["instances"][1]["webhook"], Value::Null);

    // Deleting the instance deletes its webhooks and deliveries: one
    // pending (its receiver is down) and one dead letter.
    set_ok(
        &s,
        "wi",
        json!({"label": "down", "enabled": true, "url": "http://127.0.0.1:9/"}),
    )
    .await;
    s.publish("wi", event("call.update", json!({}))).await;
    // Rows, and deliveries still in bundles (not yet claimed).
    let of_down = "SELECT (SELECT COUNT(*) FROM webhook_deliveries \
         WHERE webhook_id IN (SELECT id FROM webhooks WHERE label = 'down')) \
         + (SELECT CAST(COALESCE(SUM(count), 0) AS BIGINT) FROM webhook_bundles \
         WHERE webhook_id IN (SELECT id FROM webhooks WHERE label = 'down')) AS n";
    execute(
        &s.db.url,
        "INSERT INTO webhook_deliveries (id, webhook_id, event, data, created_at, next_attempt_at, dead_at) \
         SELECT 'msg_deadletter', id, 'call.update', '{}', 1, 1, 1 FROM webhooks WHERE label = 'down'",
    );
    assert_eq!(
        count(&s.db.url, of_down),
        2,
        "a pending delivery and a dead letter"
    );
    let r = s
        .call("DELETE", "/api/instance/delete/wi", Some(ACCOUNT), None)
        .await;
    assert_eq!(r.status, 200);
    let all = "SELECT (SELECT COUNT(*) FROM webhook_deliveries) \
         + (SELECT COUNT(*) FROM webhook_bundles) AS n";
    assert_eq!(count(&s.db.url, all), 0, "deleted with the instance");
    let r = s
        .call(
            "POST",
            "/api/instance/new",
            Some(ACCOUNT),
            Some(json!({"name": "wi"})),
        )
        .await;
    assert_eq!(r.status, 201);
    assert_eq!(
        get(&s, "/api/events/getWebhook/wi").await.body["message"],
        "0 Webhooks found"
    );
}

#[actix_rt::test]
async fn secrets_are_encrypted_at_rest_and_a_wrong_key_fails_with_cannot_decrypt() {
    use base64::Engine;
    let key = base64::engine::general_purpose::STANDARD.encode([42u8; 32]);
    let s = loopback_server(move |s| {
        s.webhook.retry_schedule_secs = vec![];
        s.webhook.encryption_key = key;
    })
    .await;
    let rx = Receiver::start();
    s.instance("enc").await;
    let wh = set_ok(
        &s,
        "enc",
        json!({"enabled": true, "url": rx.url("/"), "authorization": "Bearer plain"}),
    )
    .await;
    assert_eq!(wh["authorization"], "Bearer plain");
    let secret = wh["secret"].as_str().unwrap().to_string();
    let stored = stored_secrets(&s.db.url);
    assert_eq!(stored.len(), 1);
    let (stored_secret, stored_auth) = &stored[0];
    assert!(
        stored_secret.starts_with("enc:v1:") && !stored_secret.contains(&secret[6..]),
        "{stored_secret}"
    );
    assert!(stored_auth.as_deref().unwrap().starts_with("enc:v1:"));
    s.publish("enc", event("call.update", json!({}))).await;
    let got = rx.wait_count(1, WAIT).await.remove(0);
    assert_eq!(got.header("authorization"), Some("Bearer plain"));
    assert!(verifies(&secret, &got, None));

    // A value sealed with another key: shown as stored, deliveries fail.
    let foreign = "enc:v1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
    overwrite_auth(&s.db.url, foreign);
    outlast_read_of_webhook().await;
    let shown = stats_full(&s, "enc").await;
    assert_eq!(shown["authorization"], foreign);
    s.publish("enc", event("call.update", json!({}))).await;
    let st = wait_stats(&s, "enc", "default", |st| st["failed"] == 1).await;
    assert_eq!(st["lastError"], "cannot decrypt");
    assert_eq!(rx.count(), 1);
}

/// Waits until a node delivering to a webhook reads its row again: a change
/// made in the database, behind the node's back, is used after this.
async fn outlast_read_of_webhook() {
    let fresh = eventgate::webhook::worker::TARGET_FRESH;
    tokio::time::sleep(fresh + Duration::from_millis(300)).await;
}

async fn stats_full(s: &TestServer, name: &str) -> Value {
    get(s, &format!("/api/events/getWebhook/{name}?label=default"))
        .await
        .body["webhook"]
        .clone()
}

#[derive(diesel::QueryableByName)]
struct StoredRow {
    #[diesel(sql_type = diesel::sql_types::Text)]
    secret: String,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
    auth_header: Option<String>,
}

fn stored_secrets(url: &str) -> Vec<(String, Option<String>)> {
    let q = "SELECT secret, auth_header FROM webhooks";
    let rows: Vec<StoredRow> = on_db!(url, c => diesel::sql_query(q).load(c).unwrap());
    rows.into_iter()
        .map(|r| (r.secret, r.auth_header))
        .collect()
}

fn overwrite_auth(url: &str, value: &str) {
    execute(url, &format!("UPDATE webhooks SET auth_header = '{value}'"));
}

#[actix_rt::test]
async fn an_api_only_node_stores_deliveries_that_another_node_delivers() {
    let api = loopback_server(|s| {
        s.webhook.deliver = false;
    })
    .await;
    let rx = Receiver::start();
    api.instance("split").await;
    set_ok(&api, "split", json!({"enabled": true, "url": rx.url("/s")})).await;
    api.publish("split", event("call.update", json!({"k": 1})))
        .await;
    assert_eq!(stats(&api, "split", "default").await["pending"], 1);
    let worker = TestServer::start_on(api.db.shared(), allow_loopback).await;
    let got = rx.wait_count(1, WAIT).await;
    assert_eq!(got[0].json()["data"], json!({"k": 1}));
    wait_stats(&worker, "split", "default", |st| {
        st["delivered"] == 1 && st["pending"] == 0
    })
    .await;
}

/// An API-only node stores deliveries only for webhooks it knows enabled.
/// One enabled on another node whose notice never reached it (here it has
/// no bus at all) is read from storage within its refresh period, so its
/// publishes store deliveries for it from then on.
#[actix_rt::test]
async fn an_api_only_node_reads_the_enabled_webhooks_again() {
    let api = loopback_server(|s| {
        s.webhook.deliver = false;
        s.cluster.refresh_secs = 1;
    })
    .await;
    api.instance("later").await;
    let worker = TestServer::start_on(api.db.shared(), allow_loopback).await;
    let rx = Receiver::start();
    set_ok(
        &worker,
        "later",
        json!({"enabled": true, "url": rx.url("/l")}),
    )
    .await;
    let mut n = 0;
    eventually(WAIT, "a publish on the API node stored a delivery", || {
        n += 1;
        let publish = api.publish("later", event("call.update", json!({"n": n})));
        async {
            publish.await;
            let st = stats(&api, "later", "default").await;
            (st["pending"] != 0 || st["delivered"] != 0).then_some(())
        }
    })
    .await;
    let got = rx.wait_count(1, WAIT).await;
    assert_eq!(got[0].json()["data"], json!({"n": n}));
}

#[actix_rt::test]
async fn an_ip_literal_is_checked_again_when_connecting() {
    // Set where 127.0.0.0/8 was allowed; delivered by a node where it is not.
    let setter = loopback_server(|s| {
        s.webhook.deliver = false;
    })
    .await;
    let rx = Receiver::start();
    setter.instance("lit").await;
    set_ok(
        &setter,
        "lit",
        json!({"enabled": true, "url": rx.url("/l")}),
    )
    .await;
    setter.publish("lit", event("call.update", json!({}))).await;
    let strict = TestServer::start_on(setter.db.shared(), |_| {}).await;
    let st = wait_stats(&strict, "lit", "default", |st| st["failed"] == 1).await;
    assert_eq!(st["lastError"], "refused address");
    let d = failed(&strict, "lit", "").await.body["deliveries"][0].clone();
    assert_eq!(
        (d["attempts"].clone(), d["lastStatus"].clone()),
        (json!(1), Value::Null)
    );
    assert_eq!(rx.count(), 0);
}

/// An address refused only on a retry (the first attempt was made by a
/// node that allowed it): the delivery becomes a dead letter at once,
/// `attempts` counting the attempts made, `lastStatus` null.
#[actix_rt::test]
async fn an_address_refused_on_a_retry_counts_the_attempts_made() {
    let db = common::TestDb::fresh();
    let rx = Receiver::start();
    rx.answer(|_, _| (500, vec![]));
    let env = [
        (
            "EVENTGATE_WEBHOOK_ALLOWED_NETWORKS",
            "127.0.0.0/8".to_string(),
        ),
        ("EVENTGATE_WEBHOOK_RETRY_SCHEDULE_SECS", "3600".to_string()),
    ];
    let mut allowing = common::Process::start(&db, &["serve"], &env);
    let first = allowing.client(&Settings::default());
    first.instance("re").await;
    set_ok(&first, "re", json!({"enabled": true, "url": rx.url("/r")})).await;
    first.publish("re", event("call.update", json!({}))).await;
    wait_stats(&first, "re", "default", |st| st["lastError"] == "HTTP 500").await;
    allowing.signal("KILL");
    allowing.wait_exit(Duration::from_secs(5)).expect("killed");
    // The retry comes due now, on a node that does not allow the address.
    execute(&db.url, "UPDATE webhook_deliveries SET next_attempt_at = 0");
    let strict = TestServer::start_on(db.shared(), |_| {}).await;
    let st = wait_stats(&strict, "re", "default", |st| st["failed"] == 1).await;
    assert_eq!(st["lastError"], "refused address");
    let d = failed(&strict, "re", "").await.body["deliveries"][0].clone();
    assert_eq!(
        (d["attempts"].clone(), d["lastStatus"].clone()),
        (json!(2), Value::Null),
        "{d}"
    );
    assert_eq!(rx.count(), 1, "the second attempt never connected");
}

#[actix_rt::test]
async fn storage_failures_answer_the_contract_500s_and_publish_is_not_acknowledged() {
    let Some(db) = common::require_postgres() else {
        return;
    };
    let s = TestServer::start_on(db, |s| {
        allow_loopback(s);
        s.storage.connect_timeout_secs = 1;
    })
    .await;
    let rx = Receiver::start();
    s.instance("gone").await;
    set_ok(&s, "gone", json!({"enabled": true, "url": rx.url("/")})).await;
    assert_eq!(
        s.publish("gone", event("call.update", json!({})))
            .await
            .status,
        202
    );
    rx.wait_count(1, WAIT).await;
    s.db.take_away();
    set(&s, "gone", json!({"enabled": true, "url": rx.url("/")}))
        .await
        .assert_error(500, "Failed to get instance");
    for path in [
        "/api/events/getWebhook/gone",
        "/api/events/webhook/gone?label=default",
        "/api/events/webhook/gone/failed",
    ] {
        get(&s, path)
            .await
            .assert_error(500, "Failed to get webhook configuration");
    }
    s.call("DELETE", "/api/events/webhook/gone", Some(ACCOUNT), None)
        .await
        .assert_error(500, "Failed to get webhook configuration");
    s.call(
        "POST",
        "/api/events/webhook/gone/retry",
        Some(ACCOUNT),
        Some(json!({})),
    )
    .await
    .assert_error(500, "Failed to get webhook configuration");
    // The deliveries of a publish cannot be stored: no 202.
    s.publish("gone", event("call.update", json!({})))
        .await
        .assert_error(500, "Internal server error");
    // A request without a token is 401 first (§2's order), storage or not.
    for (method, path) in [
        ("GET", "/api/instance/list"),
        ("POST", "/api/instance/new"),
        ("DELETE", "/api/instance/delete/gone"),
        ("GET", "/api/events/getWebsocket/gone"),
        ("POST", "/api/events/websocket/gone"),
        ("GET", "/api/events/getWebhook/gone"),
        ("POST", "/api/events/webhook/gone"),
        ("GET", "/api/events/webhook/gone/failed"),
        ("POST", "/api/events/publish/gone"),
    ] {
        s.call(method, path, None, Some(json!({})))
            .await
            .assert_error(
                401,
                "Missing token in header, Authorization header, or query parameter",
            );
    }
}

#[actix_rt::test]
async fn webhook_endpoints_count_against_the_general_bucket() {
    let s = TestServer::start_with(|s| s.rate_limit.per_minute = 3).await;
    let token = s.instance("rl").await;
    for _ in 0..3 {
        let r = s
            .call("GET", "/api/events/getWebhook/rl", Some(&token), None)
            .await;
        assert_eq!(r.status, 200);
    }
    let r = s
        .call(
            "POST",
            "/api/events/webhook/rl",
            Some(&token),
            Some(json!({"enabled": false})),
        )
        .await;
    r.assert_error(429, "Rate limit exceeded. Try again later.");
    assert_eq!(r.header("x-ratelimit-remaining"), Some("0"));
    assert!(r.header("retry-after").is_some());
}

#[actix_rt::test]
async fn dead_letters_past_retention_are_removed() {
    let s = loopback_server(|s| {
        s.webhook.retry_schedule_secs = vec![];
        s.webhook.dead_letter_hours = 168;
    })
    .await;
    let rx = Receiver::start();
    rx.answer(|_, _| (500, vec![]));
    s.instance("old").await;
    set_ok(&s, "old", json!({"enabled": true, "url": rx.url("/")})).await;
    s.publish(
        "old",
        json!([
            event("call.update", json!({"a": 1})),
            event("call.update", json!({"a": 2}))
        ]),
    )
    .await;
    wait_stats(&s, "old", "default", |st| st["failed"] == 2).await;
    // One of them died 169 hours ago.
    let first = failed(&s, "old", "").await.body["deliveries"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let now = eventgate::storage::now_millis();
    let hours_ago = now - 169 * 3_600_000;
    // Where two letters put back by /retry stood: one 169 hours ago.
    execute(
        &s.db.url,
        &format!(
            "INSERT INTO webhook_requeued (id, seq, at) VALUES \
             ('msg_putbackold', 1, {hours_ago}), ('msg_putbacknew', 2, {now})"
        ),
    );
    execute(
        &s.db.url,
        &format!("UPDATE webhook_deliveries SET dead_at = {hours_ago} WHERE id = '{first}'"),
    );
    let st = wait_stats(&s, "old", "default", |st| st["failed"] == 1).await;
    assert_eq!(st["pending"], 0);
    let left = failed(&s, "old", "").await;
    assert_eq!(left.body["deliveries"][0]["envelope"]["data"]["a"], 2);
    assert_eq!(
        count(
            &s.db.url,
            "SELECT COUNT(*) AS n FROM webhook_requeued WHERE id = 'msg_putbacknew'"
        ),
        1
    );
    assert_eq!(
        count(&s.db.url, "SELECT COUNT(*) AS n FROM webhook_requeued"),
        1,
        "the position kept 169 hours ago is gone with the dead letters of then"
    );
}

#[derive(diesel::QueryableByName)]
struct Count {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}

/// The `n` of a `SELECT COUNT(*) AS n …` on the server's database.
fn count(url: &str, sql: &str) -> i64 {
    let rows: Vec<Count> = on_db!(url, c => diesel::sql_query(sql).load(c).unwrap());
    rows[0].n
}

fn execute(url: &str, sql: &str) {
    on_db!(url, c => diesel::sql_query(sql).execute(c).unwrap());
}

#[actix_rt::test]
async fn redirects_are_not_followed_and_a_slow_reply_is_a_timeout() {
    let s = loopback_server(|s| {
        // Room for the test to release the held receiver between the
        // timed-out attempt and its retry.
        s.webhook.retry_schedule_secs = vec![3];
        s.webhook.timeout_secs = 1;
    })
    .await;
    let target = Receiver::start();
    let redirecting = Receiver::start();
    let location = target.url("/moved");
    redirecting.answer(move |_, _| (307, vec![("Location", location.clone())]));
    s.instance("red").await;
    set_ok(
        &s,
        "red",
        json!({"label": "r", "enabled": true, "url": redirecting.url("/")}),
    )
    .await;
    s.publish("red", event("call.update", json!({}))).await;
    let st = wait_stats(&s, "red", "r", |st| st["failed"] == 1).await;
    assert_eq!(st["lastError"], "HTTP 307");
    assert_eq!(redirecting.count(), 2);
    assert_eq!(target.count(), 0, "the redirect was not followed");

    // A receiver that answers after the timeout: the attempt fails, the next
    // one (same webhook-id) succeeds — the receiver saw it twice.
    set_ok(&s, "red", json!({"label": "r", "enabled": false})).await;
    let slow = Receiver::start();
    slow.hold(true);
    set_ok(
        &s,
        "red",
        json!({"label": "t", "enabled": true, "url": slow.url("/")}),
    )
    .await;
    s.publish("red", event("group.flow", json!({}))).await;
    let st = wait_stats(&s, "red", "t", |st| st["lastError"] == "timeout").await;
    assert_eq!(st["pending"], 1);
    slow.hold(false);
    let got = slow.wait_count(2, WAIT).await;
    assert_eq!(got[0].id(), got[1].id());
    assert_eq!((got[0].attempt(), got[1].attempt()), (1, 2));
    wait_stats(&s, "red", "t", |st| {
        st["delivered"] == 1 && st["pending"] == 0
    })
    .await;
}

#[actix_rt::test]
async fn deliveries_reuse_connections_and_reconnect_after_the_receiver_closes_them() {
    let s = loopback_server(|_| {}).await;
    let rx = Receiver::start();
    s.instance("keep").await;
    set_ok(&s, "keep", json!({"enabled": true, "url": rx.url("/k")})).await;
    for i in 0..40 {
        s.publish("keep", event("call.update", json!({"i": i})))
            .await;
    }
    rx.wait_count(40, WAIT).await;
    let opened = rx.connections();
    assert!(
        (1..=8).contains(&opened),
        "40 deliveries opened {opened} connections (at most the in-flight limit, 8)"
    );

    // The receiver goes away and comes back on the same port: the kept
    // connections are closed, and the next deliveries open new ones at
    // their first attempt.
    let port = rx.addr.port();
    rx.stop().await;
    let back = Receiver::start_on(port);
    for i in 0..5 {
        s.publish("keep", event("call.update", json!({"after": i})))
            .await;
    }
    let got = back.wait_count(5, WAIT).await;
    assert!(
        got.iter().all(|g| g.attempt() == 1),
        "a closed connection cost an attempt"
    );
    let st = wait_stats(&s, "keep", "default", |st| st["delivered"] == 45).await;
    assert_eq!(st["failed"], 0);
}

#[actix_rt::test]
async fn an_https_receiver_is_spoken_to_in_tls_under_its_name() {
    // A listener that records the first bytes a client sends and hangs up:
    // the attempt fails its handshake ("connection failed"), and what it
    // sent is a TLS ClientHello naming the host of the URL.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, first) = std::sync::mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        use std::io::Read;
        for stream in listener.incoming() {
            let mut stream = stream.unwrap();
            let mut buf = vec![0u8; 4096];
            let n = stream.read(&mut buf).unwrap_or(0);
            buf.truncate(n);
            let _ = tx.send(buf);
        }
    });
    let s = loopback_server(|s| {
        s.webhook.retry_schedule_secs = vec![];
    })
    .await;
    s.instance("tls").await;
    let url = format!("https://localhost:{port}/t");
    set_ok(&s, "tls", json!({"enabled": true, "url": url})).await;
    s.publish("tls", event("call.update", json!({}))).await;
    let st = wait_stats(&s, "tls", "default", |st| st["failed"] == 1).await;
    assert_eq!(st["lastError"], "connection failed");
    let hello = first.recv_timeout(WAIT).unwrap();
    assert_eq!(hello.first(), Some(&0x16), "a TLS handshake record");
    assert!(
        hello.windows(9).any(|w| w == b"localhost"),
        "the ClientHello names the host (SNI)"
    );
}

#[derive(diesel::QueryableByName)]
struct Vacuums {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    dead: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    manual: i64,
}

#[actix_rt::test]
async fn the_queue_tables_are_vacuumed_on_postgresql_without_autovacuum() {
    use diesel::connection::SimpleConnection;
    use diesel::RunQueryDsl;
    let Some(db) = common::require_postgres() else {
        return;
    };
    let url = db.url.clone();
    let s = TestServer::start_on(db, allow_loopback).await;
    s.instance("churn").await;
    let port = common::free_port();
    set_ok(
        &s,
        "churn",
        json!({"enabled": true, "url": format!("http://127.0.0.1:{port}/")}),
    )
    .await;
    let pool = eventgate::storage::connect(&url, 1, Duration::from_secs(5)).unwrap();
    let counts = |table: &str| {
        let mut conn = pool.get().unwrap();
        let eventgate::storage::DbConn::Pg(c) = &mut *conn else {
            panic!("a PostgreSQL test database");
        };
        diesel::sql_query(format!(
            "SELECT n_dead_tup AS dead, vacuum_count AS manual FROM pg_stat_user_tables \
             WHERE relname = '{table}'"
        ))
        .get_result::<Vacuums>(c)
        .unwrap()
    };
    let before = [
        counts("webhook_deliveries").manual,
        counts("webhook_bundles").manual,
    ];
    // 30,000 delivery rows and 30,000 bundles stored and deleted (in one
    // transaction each, so no claim sees them), with autovacuum kept away:
    // only the gateway's housekeeping can clear their dead versions.
    {
        let rows = eventgate::storage::connect(&url, 1, Duration::from_secs(5)).unwrap();
        let mut conn = rows.get().unwrap();
        let eventgate::storage::DbConn::Pg(c) = &mut *conn else {
            panic!("a PostgreSQL test database");
        };
        c.batch_execute(
            "ALTER TABLE webhook_deliveries SET (autovacuum_enabled = false); \
             ALTER TABLE webhook_bundles SET (autovacuum_enabled = false); \
             BEGIN; \
             INSERT INTO webhook_deliveries (id, webhook_id, event, data, created_at, attempts, \
             next_attempt_at, lease_until) SELECT 'msg_v' || g, (SELECT MIN(id) FROM webhooks), \
             'call.update', '{}', 0, 0, 4102444800000, 0 FROM generate_series(1, 30000) g; \
             DELETE FROM webhook_deliveries WHERE id LIKE 'msg_v%'; \
             INSERT INTO webhook_bundles (webhook_id, count, deliveries) \
             SELECT (SELECT MIN(id) FROM webhooks), 0, '[]' FROM generate_series(1, 30000); \
             DELETE FROM webhook_bundles; \
             COMMIT;",
        )
        .unwrap();
        // Dropping the pool ends the backend, which reports its counts.
    }
    for (table, before) in ["webhook_deliveries", "webhook_bundles"]
        .into_iter()
        .zip(before)
    {
        let vacuumed = common::eventually(Duration::from_secs(30), async || {
            let now = counts(table);
            (now.manual > before && now.dead < 1_000).then_some(())
        })
        .await;
        let now = counts(table);
        assert!(
            vacuumed.is_some(),
            "{table} not vacuumed: {} manual vacuums (before {before}), {} dead row versions",
            now.manual,
            now.dead
        );
    }
}

#[actix_rt::test]
async fn a_webhook_deleted_or_disabled_while_publishes_are_stored_and_attempts_recorded() {
    let s = server_with(&[3600]).await;
    let port = common::free_port();
    s.instance("race").await;
    let down = json!({"enabled": true, "url": format!("http://127.0.0.1:{port}/")});
    let orphans = "SELECT (SELECT COUNT(*) FROM webhook_deliveries d \
         WHERE NOT EXISTS (SELECT 1 FROM webhooks w WHERE w.id = d.webhook_id)) \
         + (SELECT COUNT(*) FROM webhook_bundles b \
         WHERE NOT EXISTS (SELECT 1 FROM webhooks w WHERE w.id = b.webhook_id)) AS n";
    for round in 0..6 {
        set_ok(&s, "race", down.clone()).await;
        let batch = json!((0..50)
            .map(|i| event("call.update", json!({"i": i})))
            .collect::<Vec<_>>());
        // Four publishers storing deliveries while the webhook is deleted.
        let publishers = futures_util::future::join_all((0..4).map(|_| async {
            let mut statuses = Vec::new();
            for _ in 0..15 {
                statuses.push(s.publish("race", batch.clone()).await.status);
            }
            statuses
        }));
        // Deleted in even rounds, disabled in odd ones, while failed
        // attempts are being recorded.
        let delete = async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            if round % 2 == 0 {
                s.call(
                    "DELETE",
                    "/api/events/webhook/race?label=default",
                    Some(ACCOUNT),
                    None,
                )
                .await
            } else {
                set(&s, "race", json!({"enabled": false})).await
            }
        };
        let (statuses, deleted) = tokio::join!(publishers, delete);
        assert_eq!(deleted.status, 200, "{}", deleted.body);
        assert!(
            statuses.iter().flatten().all(|s| *s == 202),
            "round {round}: every publish accepted: {statuses:?}"
        );
        if round % 2 == 0 {
            assert_eq!(count(&s.db.url, orphans), 0, "round {round}");
        } else {
            // Disabled: what was pending, and what publishes that raced the
            // disable stored after it, ends as dead letters (housekeeping
            // turns the latter within seconds); nothing stays pending for
            // a webhook that is off.
            let pending = async || {
                let n = count(
                    &s.db.url,
                    "SELECT (SELECT COUNT(*) FROM webhook_deliveries WHERE dead_at IS NULL) \
                     + (SELECT COUNT(*) FROM webhook_bundles) AS n",
                );
                (n == 0).then_some(())
            };
            assert!(
                common::eventually(Duration::from_secs(20), pending)
                    .await
                    .is_some(),
                "round {round}: deliveries still pending for a disabled webhook"
            );
        }
    }
}

/// The pending gauge is counted in storage as the node starts, not only
/// after the first housekeeping period.
#[actix_rt::test]
async fn the_pending_gauge_is_right_from_the_start() {
    let s = server_with(&[3600]).await;
    s.instance("gauge").await;
    // Nothing listens there: each delivery fails once and waits an hour.
    set_ok(
        &s,
        "gauge",
        json!({"enabled": true, "url": "http://127.0.0.1:9/closed"}),
    )
    .await;
    let batch: Vec<Value> = (0..3)
        .map(|n| event("call.update", json!({"n": n})))
        .collect();
    assert_eq!(s.publish("gauge", json!(batch)).await.status, 202);
    wait_stats(&s, "gauge", "default", |st| st["pending"] == 3).await;
    // A second node on the same database, starting now.
    let again = TestServer::start_on(s.db.shared(), |st| {
        allow_loopback(st);
        st.webhook.retry_schedule_secs = vec![3600];
    })
    .await;
    eventually(Duration::from_secs(2), "the gauge counted", || async {
        (again.metric("eventgate_webhook_pending").await == 3.0).then_some(())
    })
    .await;
}

/// Two PostgreSQL nodes claiming one `ordered` webhook whose deliveries
/// wait in bundles: a node that waited for its turn to unpack them while
/// the other unpacked (and leased the first) reads the webhook again after
/// the wait, finds a pending row and unpacks nothing, so one delivery is
/// in flight, not two.
#[actix_rt::test]
async fn an_ordered_webhook_unpacked_by_another_node_meanwhile_is_not_unpacked_again() {
    use diesel::{Connection, RunQueryDsl};
    use eventgate::storage::deliveries::{claim, Rooms};
    let Some(db) = common::require_postgres() else {
        return;
    };
    let url = db.url.clone();
    let api = TestServer::start_on(db, |s| {
        allow_loopback(s);
        s.webhook.deliver = false;
    })
    .await;
    api.instance("turns").await;
    let down = format!("http://127.0.0.1:{}/", common::free_port());
    set_ok(
        &api,
        "turns",
        json!({"enabled": true, "url": down, "ordered": true}),
    )
    .await;
    for i in 0..2 {
        api.publish("turns", event("call.update", json!({"i": i})))
            .await;
    }
    let bundles = "SELECT COUNT(*) AS n FROM webhook_bundles";
    assert_eq!(count(&url, bundles), 2, "both publishes bundled");
    let hook = count(&url, "SELECT id AS n FROM webhooks");

    // The other node: its turn to unpack, and the row it unpacked (its
    // first delivery, leased), committed only after this node has begun
    // to wait.
    let (held, wait_for_turn) = std::sync::mpsc::channel();
    let other = {
        let url = url.clone();
        std::thread::spawn(move || {
            let c = &mut diesel::PgConnection::establish(&url).unwrap();
            c.transaction(|c| {
                diesel::sql_query(format!(
                    "SELECT pg_advisory_xact_lock({}, {hook})",
                    0x6567_7570
                ))
                .execute(c)?;
                diesel::sql_query(format!(
                    "INSERT INTO webhook_deliveries (id, webhook_id, event, data, created_at, \
                     attempts, next_attempt_at, lease_until) \
                     VALUES ('msg_other', {hook}, 'call.update', '{{}}', 1, 1, 1, {})",
                    i64::MAX / 2
                ))
                .execute(c)?;
                held.send(()).unwrap();
                std::thread::sleep(Duration::from_millis(500));
                Ok::<_, diesel::result::Error>(())
            })
            .unwrap();
        })
    };
    wait_for_turn.recv().unwrap();
    let mut conn = eventgate::storage::pool::open_one(&url).unwrap();
    let rooms = Rooms {
        known: Default::default(),
        default: 8,
        most: 8,
    };
    let now = eventgate::storage::now_millis();
    let taken = claim(&mut conn, now, now + 60_000, 100, &[], &rooms).unwrap();
    other.join().unwrap();
    assert!(
        taken.rows.is_empty(),
        "a second delivery in flight: {:?}",
        taken.rows.iter().map(|r| &r.id).collect::<Vec<_>>()
    );
    assert_eq!(count(&url, bundles), 2, "nothing unpacked");
}
