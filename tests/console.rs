//! The console (contract §13) over real HTTP: `GET`/`HEAD /console` with the
//! exact Content-Security-Policy and the 100/min bucket's headers, assets
//! under `/console/` served unlimited, the favicon, and no reference to any
//! other origin in anything the console serves.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{TestServer, ACCOUNT};

const CSP: &str = "default-src 'self'; connect-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'";

const ASSETS: [(&str, &str); 5] = [
    ("/console/app.js", "text/javascript"),
    ("/console/client.js", "text/javascript"),
    ("/console/style.css", "text/css"),
    ("/console/favicon.png", "image/png"),
    ("/favicon.ico", "image/x-icon"),
];

fn content_type(reply: &common::Reply) -> &str {
    reply
        .header("content-type")
        .unwrap_or_default()
        .split(';')
        .next()
        .unwrap_or_default()
}

#[actix_rt::test]
async fn page_has_the_csp_and_the_rate_limit_headers() {
    let s = TestServer::start_with(|settings| settings.rate_limit.per_minute = 100).await;
    let get = s.raw("GET", "/console", &[], None).await;
    assert_eq!(get.status, 200);
    assert_eq!(content_type(&get), "text/html");
    assert_eq!(get.header("content-security-policy"), Some(CSP));
    assert_eq!(get.header("x-ratelimit-limit"), Some("100"));
    assert_eq!(get.header("x-ratelimit-remaining"), Some("99"));
    let reset: u64 = get.header("x-ratelimit-reset").unwrap().parse().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(reset > now && reset <= now + 61, "reset {reset}, now {now}");
    let html = get.body.as_str().unwrap();
    assert!(html.contains("Paste a TokenAccount or TokenInstance"));
    assert!(html.contains("<label for=\"token\">"));

    let head = s.raw("HEAD", "/console", &[], None).await;
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-security-policy"), Some(CSP));
    assert_eq!(content_type(&head), "text/html");
    assert_eq!(head.header("x-ratelimit-remaining"), Some("98"));
    assert_eq!(head.body.as_str(), Some(""), "HEAD has no body");
    assert_eq!(
        head.header("content-length"),
        get.header("content-length"),
        "HEAD tells the length of GET"
    );

    s.raw("POST", "/console", &[], None)
        .await
        .assert_error(405, "Method not allowed");
    // `/console/` leads to the page (the client follows the redirect).
    let slash = s.raw("GET", "/console/", &[], None).await;
    assert_eq!(slash.status, 200);
    assert_eq!(slash.header("content-security-policy"), Some(CSP));
    assert!(slash.body.as_str().unwrap().contains("eventgate console"));
}

#[actix_rt::test]
async fn assets_are_served_and_not_limited() {
    let s = TestServer::start_with(|settings| settings.rate_limit.per_minute = 2).await;
    for _ in 0..2 {
        assert_eq!(s.raw("GET", "/console", &[], None).await.status, 200);
    }
    let limited = s.raw("GET", "/console", &[], None).await;
    limited.assert_error(429, "Rate limit exceeded. Try again later.");
    assert_eq!(limited.header("x-ratelimit-remaining"), Some("0"));
    assert!(
        limited
            .header("retry-after")
            .unwrap()
            .parse::<u64>()
            .unwrap()
            >= 1
    );
    // Per token when one is sent: a token has its own window.
    let with_token = s.raw("GET", "/console", &[("token", ACCOUNT)], None).await;
    assert_eq!(with_token.status, 200);
    assert_eq!(with_token.header("x-ratelimit-remaining"), Some("1"));
    // The assets still load, several times over, and carry no X-RateLimit-*.
    for _ in 0..3 {
        for (path, kind) in ASSETS {
            for method in ["GET", "HEAD"] {
                let reply = s.raw(method, path, &[], None).await;
                assert_eq!(reply.status, 200, "{method} {path}");
                assert_eq!(content_type(&reply), kind, "{path}");
                assert_eq!(reply.header("content-security-policy"), Some(CSP), "{path}");
                assert_eq!(reply.header("x-content-type-options"), Some("nosniff"));
                for name in [
                    "x-ratelimit-limit",
                    "x-ratelimit-remaining",
                    "x-ratelimit-reset",
                ] {
                    assert!(reply.header(name).is_none(), "{path} carries {name}");
                }
            }
        }
    }
    let app = s.raw("GET", "/console/app.js", &[], None).await;
    assert!(app.body.as_str().unwrap().contains("from './client.js'"));
    let client = s.raw("GET", "/console/client.js", &[], None).await;
    assert_eq!(
        client.body.as_str().unwrap(),
        include_str!("../clients/js/index.js"),
        "the console runs the published client"
    );
    s.raw("GET", "/console/nope.js", &[], None)
        .await
        .assert_error(404, "Not found");
    s.raw("GET", "/console/%2e%2e/Cargo.toml", &[], None)
        .await
        .assert_error(404, "Not found");
}

/// Everything a URL of another origin could hide behind: a scheme with `//`,
/// a protocol-relative `//host`, in markup and style `url()`/`@import`, and
/// any `src`/`href` that is not one of the console's own paths.
fn external_references(text: &str, script: bool) -> Vec<String> {
    let lower = text.to_ascii_lowercase();
    let mut found = Vec::new();
    let mut needles = vec![
        "http://", "https://", "ws://", "wss://", "ftp://", "\"//", "'//", "(//", "=//", "`//",
        "srcset",
    ];
    if !script {
        needles.extend(["url(", "@import"]);
    }
    for needle in needles {
        if let Some(at) = lower.find(needle) {
            let end = (at + 60).min(lower.len());
            found.push(lower[at..end].to_string());
        }
    }
    for attr in ["src=\"", "href=\"", "action=\""] {
        for (at, _) in lower.match_indices(attr) {
            let value = &lower[at + attr.len()..];
            let value = &value[..value.find('"').unwrap_or(value.len())];
            if !value.starts_with("/console/") {
                found.push(format!("{attr}{value}"));
            }
        }
    }
    found
}

#[actix_rt::test]
async fn nothing_served_references_another_origin() {
    let s = TestServer::start().await;
    let mut checked = 0;
    for asset in eventgate::console::all() {
        let reply = s.raw("GET", asset.path, &[], None).await;
        assert_eq!(reply.status, 200, "{}", asset.path);
        assert_eq!(
            reply.header("content-length"),
            Some(asset.body.len().to_string().as_str()),
            "{} is served as compiled in",
            asset.path
        );
        if let Ok(text) = std::str::from_utf8(asset.body) {
            let bad = external_references(text, asset.content_type.starts_with("text/javascript"));
            assert!(bad.is_empty(), "{} references {bad:?}", asset.path);
            checked += 1;
        }
    }
    assert_eq!(checked, 4, "page, app.js, client.js and style.css checked");
    // The check itself finds what it is for.
    assert!(!external_references("<script src=\"https://cdn.example/x.js\">", false).is_empty());
    assert!(!external_references("a { background: url(/x.png) }", false).is_empty());
    assert!(!external_references("<link href=\"//fonts.example/css\">", false).is_empty());
    assert!(!external_references("fetch('wss://elsewhere.example/')", true).is_empty());
    assert!(external_references("<link href=\"/console/style.css\">", false).is_empty());
}
