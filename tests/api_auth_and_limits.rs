//! Authentication sources and precedence (contract §2), the error envelope,
//! 404/405 (§3) and rate limits (§4), over real HTTP.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{TestServer, ACCOUNT};
use serde_json::json;

const MISSING: &str = "Missing token in header, Authorization header, or query parameter";

#[actix_rt::test]
async fn token_sources_and_precedence() {
    let s = TestServer::start().await;
    let list = "/api/instance/list";
    assert_eq!(
        s.raw("GET", list, &[("token", ACCOUNT)], None).await.status,
        200
    );
    let bearer = format!("bEaReR {ACCOUNT}");
    assert_eq!(
        s.raw("GET", list, &[("authorization", &bearer)], None)
            .await
            .status,
        200
    );
    assert_eq!(
        s.raw("GET", &format!("{list}?token={ACCOUNT}"), &[], None)
            .await
            .status,
        200
    );
    s.raw("GET", list, &[], None)
        .await
        .assert_error(401, MISSING);
    s.raw("GET", list, &[("token", "")], None)
        .await
        .assert_error(401, MISSING);
    s.raw(
        "GET",
        list,
        &[("authorization", &format!("Basic {ACCOUNT}"))],
        None,
    )
    .await
    .assert_error(401, MISSING);
    s.raw("GET", &format!("{list}?token="), &[], None)
        .await
        .assert_error(401, MISSING);
    s.raw("GET", list, &[("token", "wrong")], None)
        .await
        .assert_error(401, "Invalid token");
    // The first present source wins: a bad header is not rescued by a good query.
    s.raw(
        "GET",
        &format!("{list}?token={ACCOUNT}"),
        &[("token", "wrong")],
        None,
    )
    .await
    .assert_error(401, "Invalid token");
    s.raw(
        "GET",
        list,
        &[("token", "wrong"), ("authorization", &bearer)],
        None,
    )
    .await
    .assert_error(401, "Invalid token");
    // An empty header is skipped, and so is another Authorization scheme.
    let r = s
        .raw(
            "GET",
            &format!("{list}?token={ACCOUNT}"),
            &[("token", ""), ("authorization", "Basic x")],
            None,
        )
        .await;
    assert_eq!(r.status, 200);
}

#[actix_rt::test]
async fn unknown_paths_and_wrong_methods() {
    let s = TestServer::start().await;
    s.raw("GET", "/nope", &[], None)
        .await
        .assert_error(404, "Not found");
    s.raw("GET", "/api/nope", &[("token", ACCOUNT)], None)
        .await
        .assert_error(404, "Not found");
    let r = s
        .raw(
            "GET",
            "/api/events/websocket/x",
            &[("token", ACCOUNT)],
            None,
        )
        .await;
    r.assert_error(405, "Method not allowed");
    assert_eq!(r.header("allow"), Some("POST"));
    let r = s
        .raw("POST", "/api/instance/list", &[("token", ACCOUNT)], None)
        .await;
    r.assert_error(405, "Method not allowed");
    assert_eq!(r.header("allow"), Some("GET, HEAD"));
    let r = s
        .raw("GET", "/api/instance/delete/x", &[("token", ACCOUNT)], None)
        .await;
    assert_eq!(r.header("allow"), Some("DELETE"));
    let r = s.raw("POST", "/ws/x", &[("token", ACCOUNT)], None).await;
    r.assert_error(405, "Method not allowed");
}

#[actix_rt::test]
async fn rate_limit_headers_and_429() {
    let s = TestServer::start_with(|st| st.rate_limit.per_minute = 100).await;
    let other = s.instance("other").await;
    let path = "/api/instance/list";
    let mut last_reset = 0;
    for i in 0..100u32 {
        let r = s.raw("GET", path, &[("token", ACCOUNT)], None).await;
        assert_eq!(r.status, 200, "request {i}");
        assert_eq!(r.header("x-ratelimit-limit"), Some("100"));
        let remaining: u32 = r.header("x-ratelimit-remaining").unwrap().parse().unwrap();
        assert_eq!(remaining, 99 - i);
        last_reset = r
            .header("x-ratelimit-reset")
            .unwrap()
            .parse::<u64>()
            .unwrap();
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        last_reset > now && last_reset <= now + 61,
        "reset {last_reset} vs now {now}"
    );
    let r = s.raw("GET", path, &[("token", ACCOUNT)], None).await;
    r.assert_error(429, "Rate limit exceeded. Try again later.");
    assert_eq!(r.header("x-ratelimit-remaining"), Some("0"));
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry));
    // The same token in the query string is the same key.
    s.raw("GET", &format!("{path}?token={ACCOUNT}"), &[], None)
        .await
        .assert_error(429, "Rate limit exceeded. Try again later.");
    // Another token is unaffected.
    let r = s.raw("GET", path, &[("token", &other)], None).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-ratelimit-remaining"), Some("99"));
    // Unlimited endpoints carry no headers.
    let r = s.raw("GET", "/healthz", &[], None).await;
    assert_eq!(r.status, 200);
    assert!(r.header("x-ratelimit-limit").is_none());
    // Publish shows the 100/min bucket without consuming it.
    let r = s
        .raw(
            "POST",
            "/api/events/publish/other",
            &[("token", &other)],
            Some(b"{}"),
        )
        .await;
    assert_eq!(r.header("x-ratelimit-remaining"), Some("99"));
}

#[actix_rt::test]
async fn instance_creation_has_its_own_bucket() {
    let s = TestServer::start_with(|st| {
        st.rate_limit.instance_new_per_minute = 3;
        st.rate_limit.per_minute = 100;
    })
    .await;
    for i in 0..3 {
        let r = s
            .call(
                "POST",
                "/api/instance/new",
                Some(ACCOUNT),
                Some(json!({"name": format!("n{i}")})),
            )
            .await;
        assert_eq!(r.status, 201);
        assert_eq!(r.header("x-ratelimit-limit"), Some("3"));
    }
    let r = s
        .call(
            "POST",
            "/api/instance/new",
            Some(ACCOUNT),
            Some(json!({"name":"n9"})),
        )
        .await;
    r.assert_error(429, "Rate limit exceeded. Try again later.");
    assert!(r.header("retry-after").is_some());
    // The same route spelled with percent-escapes is the same bucket.
    let r = s
        .call(
            "POST",
            "/api/instance/%6Eew",
            Some(ACCOUNT),
            Some(json!({"name":"n9"})),
        )
        .await;
    r.assert_error(429, "Rate limit exceeded. Try again later.");
    // The general bucket was not consumed by creations.
    let r = s
        .call("GET", "/api/instance/list", Some(ACCOUNT), None)
        .await;
    assert_eq!(r.header("x-ratelimit-remaining"), Some("99"));
    assert_eq!(r.body["message"], "3 Instances found");
}

#[actix_rt::test]
async fn requests_without_token_are_limited_per_ip() {
    let s = TestServer::start_with(|st| st.rate_limit.per_minute = 2).await;
    for _ in 0..2 {
        s.raw("GET", "/api/instance/list", &[], None)
            .await
            .assert_error(401, MISSING);
    }
    let r = s.raw("GET", "/api/instance/list", &[], None).await;
    r.assert_error(429, "Rate limit exceeded. Try again later.");
}

#[actix_rt::test]
async fn publish_is_never_refused_by_an_exhausted_general_bucket() {
    let s = TestServer::start_with(|st| st.rate_limit.per_minute = 3).await;
    s.instance("pub-1").await;
    // A dashboard polls with the account token until its bucket is empty.
    loop {
        let r = s
            .call("GET", "/api/instance/list", Some(ACCOUNT), None)
            .await;
        if r.status == 429 {
            break;
        }
        assert_eq!(r.status, 200);
    }
    for _ in 0..5 {
        let r = s
            .publish("pub-1", json!({"event":"message.exchange","data":{"n":1}}))
            .await;
        assert_eq!(r.status, 202, "{:?}", r.body);
        assert_eq!(r.body["accepted"], 1);
        assert_eq!(r.header("x-ratelimit-limit"), Some("3"));
        assert_eq!(r.header("x-ratelimit-remaining"), Some("0"));
        assert!(r.header("retry-after").is_none());
    }
    // The general bucket still refuses other requests.
    s.call("GET", "/api/instance/list", Some(ACCOUNT), None)
        .await
        .assert_error(429, "Rate limit exceeded. Try again later.");
}

#[actix_rt::test]
async fn head_answers_wherever_get_does() {
    let s = TestServer::start().await;
    let token = s.instance("head-1").await;
    let paths = [
        "/healthz".to_string(),
        "/readyz".to_string(),
        "/metrics".to_string(),
        "/openapi.yaml".to_string(),
        "/api/instance/list".to_string(),
        "/api/events/getWebsocket/head-1".to_string(),
    ];
    for path in &paths {
        let get = s.raw("GET", path, &[("token", ACCOUNT)], None).await;
        let head = s.raw("HEAD", path, &[("token", ACCOUNT)], None).await;
        assert_eq!(head.status, get.status, "HEAD {path}");
        assert_eq!(head.status, 200, "HEAD {path}");
        assert_eq!(
            head.body,
            serde_json::Value::String(String::new()),
            "HEAD {path} has no body"
        );
        assert_eq!(
            head.header("content-type"),
            get.header("content-type"),
            "{path}"
        );
        assert_eq!(
            head.header("x-ratelimit-limit"),
            get.header("x-ratelimit-limit"),
            "{path}"
        );
    }
    // Errors answer HEAD the way they answer GET (no body).
    let head = s
        .raw(
            "HEAD",
            "/api/events/getWebsocket/head-1",
            &[("token", "nope")],
            None,
        )
        .await;
    assert_eq!(head.status, 401);
    let head = s
        .raw(
            "HEAD",
            "/api/events/getWebsocket/head-1",
            &[("token", &token)],
            None,
        )
        .await;
    assert_eq!(head.status, 200);
    // A POST-only route still refuses HEAD, and a GET route lists HEAD as allowed.
    let r = s
        .raw("HEAD", "/api/instance/new", &[("token", ACCOUNT)], None)
        .await;
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("POST"));
    let r = s
        .raw("POST", "/api/instance/list", &[("token", ACCOUNT)], None)
        .await;
    r.assert_error(405, "Method not allowed");
    assert_eq!(r.header("allow"), Some("GET, HEAD"));
}

/// Publishing shows the general bucket without consuming it, however its
/// path is spelled; a path under publish that is no route (404) counts.
#[actix_rt::test]
async fn publish_spelled_with_escapes_consumes_nothing_and_non_routes_count() {
    let s = TestServer::start_with(|st| st.rate_limit.per_minute = 100).await;
    s.instance("q1").await;
    let body = json!({"event": "call.update", "data": {}});
    let r = s
        .call(
            "POST",
            "/api/events/%70ublish/q1",
            Some(ACCOUNT),
            Some(body.clone()),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    let before = r.header("x-ratelimit-remaining").map(str::to_string);
    let r = s
        .call(
            "POST",
            "/api/events/publish/q1",
            Some(ACCOUNT),
            Some(body.clone()),
        )
        .await;
    assert_eq!(
        r.header("x-ratelimit-remaining").map(str::to_string),
        before
    );
    let r = s
        .call(
            "POST",
            "/api/events/publish/q1/x",
            Some(ACCOUNT),
            Some(body),
        )
        .await;
    r.assert_error(404, "Not found");
    let after = s
        .call("GET", "/api/instance/list", Some(ACCOUNT), None)
        .await;
    let remaining = |v: Option<String>| v.and_then(|v| v.parse::<u64>().ok()).unwrap();
    assert_eq!(
        remaining(after.header("x-ratelimit-remaining").map(str::to_string)),
        remaining(before) - 2,
        "the 404 and the list counted"
    );
}

/// A `token` header whose value is not visible ASCII is present: it is an
/// unknown token (401 `Invalid token`), and the sources after it are not
/// consulted, a valid `Authorization: Bearer` included.
#[actix_rt::test]
async fn a_token_header_outside_ascii_is_present_and_invalid() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = TestServer::start().await;
    let addr = s.addr;
    let exchange = |extra: String| async move {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut request = b"GET /api/instance/list HTTP/1.1\r\nHost: x\r\nConnection: close\r\ntoken: t\xc3\xb6k\xc3\xa9n\r\n".to_vec();
        request.extend_from_slice(extra.as_bytes());
        request.extend_from_slice(b"\r\n");
        stream.write_all(&request).await.unwrap();
        let mut all = Vec::new();
        stream.read_to_end(&mut all).await.unwrap();
        String::from_utf8_lossy(&all).into_owned()
    };
    for extra in [
        String::new(),
        format!("Authorization: Bearer {ACCOUNT}\r\n"),
    ] {
        let reply = exchange(extra).await;
        assert!(reply.starts_with("HTTP/1.1 401"), "{reply}");
        assert!(reply.contains("Invalid token"), "{reply}");
    }
}
