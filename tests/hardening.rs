//! Resource limits and hostile clients: connection limits per instance,
//! account and node; upgrade attempts per IP; idle keep-alive and slow
//! request heads; an instance token confined to its instance; tokens never
//! logged.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::{event, Process, TestDb, TestServer, ACCOUNT};
use eventgate::settings::Settings;
use serde_json::json;

const UPGRADE: [(&str, &str); 4] = [
    ("connection", "Upgrade"),
    ("upgrade", "websocket"),
    ("sec-websocket-version", "13"),
    ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
];

/// An upgrade that must be refused: its status and error envelope.
async fn refused(s: &TestServer, name: &str, token: &str) -> (u16, serde_json::Value) {
    let url = s.ws_url(&format!("/ws/{name}?token={token}"));
    match tokio_tungstenite::connect_async(url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(res)) => {
            let body = res.body().clone().unwrap_or_default();
            (
                res.status().as_u16(),
                serde_json::from_slice(&body).unwrap(),
            )
        }
        other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
    }
}

async fn try_connect(s: &TestServer, name: &str, token: &str) -> Result<common::Ws, String> {
    let url = s.ws_url(&format!("/ws/{name}?token={token}"));
    tokio_tungstenite::connect_async(url)
        .await
        .map(|(ws, _)| common::Ws { inner: ws })
        .map_err(|e| e.to_string())
}

#[actix_rt::test]
async fn connection_limits_per_instance_account_and_node() {
    let s = TestServer::start_with(|st| {
        st.limits.max_connections_per_instance = 2;
        st.limits.max_connections_per_account = 3;
        st.limits.max_connections = 4;
    })
    .await;
    s.instance("a").await;
    s.instance("b").await;
    let a1 = s.connect("a", "").await;
    let _a2 = s.connect("a", "").await;
    let (status, body) = refused(&s, "a", ACCOUNT).await;
    assert_eq!(status, 429);
    assert_eq!(body["error"]["message"], "Too many connections");
    assert!(body["error"]["details"]
        .as_str()
        .unwrap()
        .contains("per instance"));
    let _b1 = s.connect("b", "").await;
    let (status, body) = refused(&s, "b", ACCOUNT).await;
    assert_eq!(status, 429);
    assert_eq!(body["error"]["message"], "Too many connections");
    assert!(body["error"]["details"]
        .as_str()
        .unwrap()
        .contains("per account"));
    // Another account fills the node.
    let other = "other-account-token-0123456789abcdef";
    s.add_account(other);
    s.instance_of(other, "c").await;
    let _c1 = try_connect(&s, "c", other).await.unwrap();
    let (status, body) = refused(&s, "c", other).await;
    assert_eq!(status, 503);
    assert_eq!(
        body,
        json!({"success": false, "error": {"message": "Server at capacity"}})
    );
    // A slot comes back when its client leaves.
    drop(a1);
    s.wait_clients("a", Some(1)).await;
    let again = common::eventually(common::DEADLINE, async || {
        try_connect(&s, "c", other).await.ok()
    })
    .await;
    assert!(again.is_some(), "the freed slot is usable");
    assert!(
        s.metric("eventgate_ws_upgrades_total{result=\"connection_limit\"}")
            .await
            >= 2.0
    );
}

#[actix_rt::test]
async fn upgrade_attempts_are_limited_per_ip() {
    let s = TestServer::start_with(|st| st.rate_limit.upgrades_per_ip_per_minute = 3).await;
    let t = s.instance("ip").await;
    for token in [ACCOUNT, &t, ACCOUNT] {
        assert!(try_connect(&s, "ip", token).await.is_ok());
    }
    // A fourth attempt from the same address, even with another token, is refused.
    let r = s
        .raw("GET", &format!("/ws/ip?token={t}"), &UPGRADE, None)
        .await;
    r.assert_error(429, "Rate limit exceeded. Try again later.");
    assert_eq!(r.header("x-ratelimit-limit"), Some("3"));
    assert!(r.header("retry-after").is_some());
    // The REST API is not affected by the upgrade bucket.
    assert_eq!(
        s.call("GET", "/api/instance/list", Some(ACCOUNT), None)
            .await
            .status,
        200
    );
}

/// Reads from a raw socket until the server closes it; returns how long that took.
fn time_until_closed(mut stream: std::net::TcpStream, limit: Duration) -> Option<Duration> {
    stream
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    while started.elapsed() < limit {
        match stream.read(&mut buf) {
            Ok(0) => return Some(started.elapsed()),
            Ok(_) => {}
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return Some(started.elapsed()),
        }
    }
    None
}

#[actix_rt::test]
async fn slow_request_heads_and_idle_keep_alive_time_out() {
    let s = TestServer::start_with(|st| {
        st.server.client_request_timeout_secs = 1;
        st.server.keep_alive_secs = 1;
    })
    .await;
    let addr = s.addr;
    let (slow, idle) = tokio::task::spawn_blocking(move || {
        // Slow loris: a request head that never ends.
        let mut slow = std::net::TcpStream::connect(addr).unwrap();
        slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            .unwrap();
        let slow = time_until_closed(slow, Duration::from_secs(10));
        // Keep-alive: one request answered, then silence.
        let mut idle = std::net::TcpStream::connect(addr).unwrap();
        idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let idle = time_until_closed(idle, Duration::from_secs(10));
        (slow, idle)
    })
    .await
    .unwrap();
    let slow = slow.expect("the slow request head was not cut off");
    assert!(slow < Duration::from_secs(5), "{slow:?}");
    let idle = idle.expect("the idle keep-alive connection was not closed");
    assert!(idle < Duration::from_secs(5), "{idle:?}");
}

#[actix_rt::test]
async fn an_instance_token_stays_within_its_instance() {
    let s = TestServer::start().await;
    let mine = s.instance("mine").await;
    s.instance("theirs").await;
    let other = "foreign-account-token-0123456789abcdef";
    s.add_account(other);
    let foreign_token = s.instance_of(other, "foreign").await;
    let forbidden = "Instance token does not match this instance";
    for name in ["theirs", "foreign", "nope"] {
        s.call(
            "GET",
            &format!("/api/events/getWebsocket/{name}"),
            Some(&mine),
            None,
        )
        .await
        .assert_error(403, forbidden);
        s.call(
            "POST",
            &format!("/api/events/websocket/{name}"),
            Some(&mine),
            Some(json!({"enabled": false})),
        )
        .await
        .assert_error(403, forbidden);
        s.raw("GET", &format!("/ws/{name}?token={mine}"), &UPGRADE, None)
            .await
            .assert_error(403, forbidden);
        s.call(
            "POST",
            &format!("/api/events/publish/{name}"),
            Some(&mine),
            Some(event("call.update", json!({}))),
        )
        .await
        .assert_error(401, "Invalid token");
        s.call(
            "DELETE",
            &format!("/api/instance/delete/{name}"),
            Some(&mine),
            None,
        )
        .await
        .assert_error(401, "Invalid token");
    }
    // Listing shows only its own instance, without tokens.
    let r = s.call("GET", "/api/instance/list", Some(&mine), None).await;
    assert_eq!(r.body["instances"].as_array().unwrap().len(), 1);
    assert!(!r.body.to_string().contains(&foreign_token));
    // An account token reaches only its own account's instances.
    s.call(
        "GET",
        "/api/events/getWebsocket/foreign",
        Some(ACCOUNT),
        None,
    )
    .await
    .assert_error(404, "Instance not found");
    s.call(
        "POST",
        "/api/events/publish/foreign",
        Some(ACCOUNT),
        Some(event("call.update", json!({}))),
    )
    .await
    .assert_error(404, "Instance not found");
    s.call(
        "DELETE",
        "/api/instance/delete/foreign",
        Some(ACCOUNT),
        None,
    )
    .await
    .assert_error(404, "Instance not found");
    let r = s
        .call(
            "GET",
            "/api/events/getWebsocket/theirs",
            Some(&foreign_token),
            None,
        )
        .await;
    r.assert_error(403, forbidden);
    // Nothing changed for the others.
    let r = s
        .call(
            "GET",
            "/api/events/getWebsocket/theirs",
            Some(ACCOUNT),
            None,
        )
        .await;
    assert_eq!(r.body["websocket"]["enabled"], true);
}

#[actix_rt::test]
async fn no_token_appears_in_any_log_line() {
    let db = TestDb::fresh();
    let p = Process::start(&db, &["serve"], &[("RUST_LOG", "trace".into())]);
    let s = p.client(&Settings::default());
    let custom = "custom-instance-token-abcdefghijklmnopqrstuvwxyz";
    let r = s
        .call(
            "POST",
            "/api/instance/new",
            Some(ACCOUNT),
            Some(json!({"name":"logme","token":custom,"websocketEnabled":true})),
        )
        .await;
    assert_eq!(r.status, 201);
    let generated = s.instance("logme2").await;
    // Every way of presenting a token, good and bad, REST and WebSocket.
    let bad = "wrong-token-that-must-not-be-logged-0123456789";
    for token in [ACCOUNT, custom, generated.as_str(), bad] {
        s.raw("GET", "/api/instance/list", &[("token", token)], None)
            .await;
        s.raw(
            "GET",
            "/api/instance/list",
            &[("authorization", &format!("Bearer {token}"))],
            None,
        )
        .await;
        s.raw(
            "GET",
            &format!("/api/instance/list?token={token}"),
            &[],
            None,
        )
        .await;
        s.raw("GET", &format!("/ws/logme?token={token}"), &UPGRADE, None)
            .await;
        s.call(
            "POST",
            "/api/events/publish/logme",
            Some(token),
            Some(event("call.update", json!({"secret": "payload"}))),
        )
        .await;
    }
    let mut ws = s.connect("logme", "").await;
    s.publish(
        "logme",
        event(
            "message.exchange",
            json!({"text": "payload-text-never-logged"}),
        ),
    )
    .await;
    ws.envelope().await;
    drop(ws);
    s.wait_clients("logme", Some(0)).await;
    s.call("DELETE", "/api/instance/delete/logme", Some(ACCOUNT), None)
        .await;
    // The deletion's own line is the last this test causes: once it is in
    // the log, everything before it is too.
    let logged = common::eventually(common::DEADLINE, async || {
        p.stderr().contains("instance=logme deleted").then_some(())
    })
    .await;
    assert!(logged.is_some(), "the deletion was logged");
    let log = p.stderr();
    assert!(log.lines().count() > 10, "trace logging produced output");
    for secret in [
        ACCOUNT,
        custom,
        generated.as_str(),
        bad,
        "payload-text-never-logged",
    ] {
        assert!(!log.contains(secret), "a secret appeared in the log");
    }
    assert!(
        log.contains("instance=logme"),
        "lines carry instance context"
    );
}
