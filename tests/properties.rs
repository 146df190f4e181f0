//! Property and fuzz tests of everything that parses client input: publish
//! bodies, settings bodies, instance bodies, query strings, tokens, instance
//! names and settings files. Nothing may panic; whatever is accepted must
//! satisfy the contract's rules; and the real server answers hostile bodies
//! with the envelope, never a 5xx.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{TestServer, ACCOUNT};
use eventgate::auth::{is_valid_custom_token, query_values};
use eventgate::domain::{EventKind, InstanceName};
use eventgate::events::{envelope, instance_data_json, parse_publish};
use eventgate::http::connect::parse_narrowing;
use eventgate::http::instances::parse_new_instance;
use eventgate::http::websocket::parse_settings;
use eventgate::settings::Settings;
use proptest::prelude::*;
use serde_json::{json, Value};

/// Arbitrary JSON, nested, with odd strings and extreme numbers.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        ".*".prop_map(Value::String),
        prop::sample::select(
            EventKind::ALL
                .iter()
                .map(|k| k.as_str())
                .collect::<Vec<_>>()
        )
        .prop_map(|s| Value::String(s.to_string())),
    ];
    leaf.prop_recursive(6, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    Just("event".to_string()),
                    Just("data".to_string()),
                    Just("enabled".to_string()),
                    Just("events".to_string()),
                    Just("mediaBase64".to_string()),
                    Just("name".to_string()),
                    ".*"
                ],
                inner,
                0..6
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, .. ProptestConfig::default() })]

    #[test]
    fn parsers_never_panic_on_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = parse_publish(&bytes, 1000);
        let _ = parse_settings(&bytes);
        let _ = parse_new_instance(&bytes);
        let text = String::from_utf8_lossy(&bytes);
        let _ = parse_narrowing(&text);
        let _ = query_values(&text, "token");
        let _ = InstanceName::parse(&text);
        let _ = is_valid_custom_token(&text);
        let _ = Settings::from_toml(&text);
    }

    #[test]
    fn accepted_publishes_follow_the_contract(value in any_json()) {
        let bytes = serde_json::to_vec(&value).unwrap();
        if let Ok(events) = parse_publish(&bytes, 1000) {
            let items: Vec<&Value> = match &value {
                Value::Array(items) => items.iter().collect(),
                one => vec![one],
            };
            prop_assert_eq!(items.len(), events.len());
            for (item, ev) in items.iter().zip(&events) {
                prop_assert_eq!(item["event"].as_str(), Some(ev.kind.as_str()));
                prop_assert_eq!(&item["data"], &Value::Object(ev.data.clone()));
                // The envelope is valid JSON carrying the data unchanged.
                let text = envelope(ev, &instance_data_json("http://h", "i", "t"), true);
                let parsed: Value = serde_json::from_str(&text).unwrap();
                prop_assert_eq!(&parsed["data"], &item["data"]);
            }
        }
    }

    #[test]
    fn accepted_settings_follow_the_contract(value in any_json()) {
        let bytes = serde_json::to_vec(&value).unwrap();
        if let Ok(config) = parse_settings(&bytes) {
            prop_assert_eq!(value["enabled"].as_bool(), Some(config.enabled));
            if !config.enabled {
                prop_assert!(config.events.is_empty() && !config.media_base64);
            }
            let mut seen = std::collections::HashSet::new();
            prop_assert!(config.events.iter().all(|k| seen.insert(*k)), "no duplicates");
        }
    }

    #[test]
    fn instance_names_accepted_match_the_rule(name in "\\PC{0,70}") {
        let ok = InstanceName::parse(&name).is_some();
        let rule = !name.is_empty()
            && name.len() <= 64
            && name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
            && name.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
        prop_assert_eq!(ok, rule);
    }

    #[test]
    fn narrowing_accepts_exactly_known_names(names in prop::collection::vec("[a-z.]{0,16}", 0..5)) {
        let query = format!("events={}", names.join(","));
        let known = names.iter().all(|n| n.is_empty() || EventKind::parse(n).is_some());
        prop_assert_eq!(parse_narrowing(&query).is_ok(), known);
    }
}

/// Numbers reach clients as the same values: floats whose shortest spelling
/// a fast (not correctly rounded) parser would move by one unit in the last
/// place come back equal, bit for bit.
#[test]
fn floats_keep_their_exact_value() {
    for x in [
        8.076542890983282e-17_f64,
        0.1,
        2.2250738585072014e-308,
        5e-324,
        1.7976931348623157e308,
        -123456.789e-30,
    ] {
        let body = format!(r#"{{"event":"call.update","data":{{"x":{x:?}}}}}"#);
        let events = parse_publish(body.as_bytes(), 10).unwrap();
        let text = envelope(&events[0], &instance_data_json("http://h", "i", "t"), true);
        let parsed: Value = serde_json::from_str(&text).unwrap();
        let back = parsed["data"]["x"].as_f64().unwrap();
        assert_eq!(back.to_bits(), x.to_bits(), "{x:?} came back as {back:?}");
    }
}

/// Integers within 64 bits arrive digit for digit; numbers outside what a
/// double holds are read as JavaScript reads them (README).
#[test]
fn integers_keep_their_digits_and_others_read_as_doubles() {
    let body =
        br#"{"event":"call.update","data":{"max":18446744073709551615,"min":-9223372036854775808,
        "big":123456789012345678901234567890,"tiny":1e-400}}"#;
    let events = parse_publish(body, 10).unwrap();
    let text = envelope(&events[0], &instance_data_json("http://h", "i", "t"), true);
    assert!(text.contains(r#""max":18446744073709551615"#), "{text}");
    assert!(text.contains(r#""min":-9223372036854775808"#), "{text}");
    assert!(text.contains(r#""big":1.2345678901234568e+29"#), "{text}");
    assert!(text.contains(r#""tiny":0.0"#), "{text}");
}

#[test]
fn deep_nesting_and_huge_batches_are_refused_cleanly() {
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    assert!(parse_publish(deep.as_bytes(), 1000).is_err());
    let deep_obj = format!(
        r#"{{"event":"call.update","data":{}1{}}}"#,
        r#"{"a":"#.repeat(5_000),
        "}".repeat(5_000)
    );
    assert!(parse_publish(deep_obj.as_bytes(), 1000).is_err());
    let many = serde_json::to_vec(&vec![json!({"event":"call.update","data":{}}); 1001]).unwrap();
    assert!(parse_publish(&many, 1000).unwrap_err().contains("1000"));
    // Duplicate keys: the last one wins, as in every JSON parser clients use.
    let dup = parse_publish(
        br#"{"event":"nope","event":"call.update","data":{"a":1,"a":2}}"#,
        10,
    )
    .unwrap();
    assert_eq!(dup[0].data["a"], 2);
}

#[actix_rt::test]
async fn hostile_bodies_over_http_get_the_envelope() {
    let s = TestServer::start().await;
    s.instance("h").await;
    let headers = [("token", ACCOUNT), ("content-type", "application/json")];
    let deep = format!("{}{}", "[".repeat(200_000), "]".repeat(200_000));
    let odd = serde_json::to_vec(
        &json!({"event": "call.update", "data": {"\u{202e}\u{0}\u{fffd}": "\u{1F600}"}}),
    )
    .unwrap();
    for (path, body) in [
        ("/api/events/publish/h", deep.as_bytes()),
        ("/api/events/websocket/h", deep.as_bytes()),
        ("/api/instance/new", deep.as_bytes()),
        (
            "/api/events/publish/h",
            br#"{"event":"call.update","data":{"n":-1e400}}"#,
        ),
        (
            "/api/events/publish/h",
            br#"{"event":"call.update","data":{"s":"\ud800"}}"#,
        ),
        ("/api/events/publish/h", b"\xff\xfe{}"),
        ("/api/instance/new", "{\"name\":\"caf\u{e9}\"}".as_bytes()),
        ("/api/instance/new", br#"{"name":"a\u0000b"}"#),
    ] {
        let r = s.raw("POST", path, &headers, Some(body)).await;
        r.assert_error(400, "Invalid request body");
    }
    let r = s
        .raw("POST", "/api/events/publish/h", &headers, Some(&odd))
        .await;
    assert_eq!(
        r.status, 202,
        "odd but valid Unicode is data like any other"
    );
    // Odd paths and query strings.
    for path in [
        "/api/events/getWebsocket/%FF%FE",
        "/api/events/getWebsocket/..%2F..%2Fetc",
        "/api/events/getWebsocket/a%00b",
        "/api/instance/list?token=%zz",
    ] {
        let r = s.raw("GET", path, &[("token", ACCOUNT)], None).await;
        assert!(r.status < 500, "{path}: {}", r.status);
        assert_eq!(
            r.body["success"],
            json!(r.status < 300),
            "{path}: {}",
            r.body
        );
    }
    // A token with odd bytes is just an unknown token.
    let r = s
        .raw("GET", "/api/instance/list", &[("token", "\t x ~%00")], None)
        .await;
    r.assert_error(401, "Invalid token");
    let r = s
        .raw("GET", "/api/instance/list?token=%00%FF%FE", &[], None)
        .await;
    r.assert_error(401, "Invalid token");
}
