//! Helpers of the recovery tests (contract §12), on one node and in a
//! cluster: opening a recovering client, reconnecting from a position, and
//! reading events by their `data.n` and `offset`.

use serde_json::{json, Value};

use super::{event, TestServer, Ws, ACCOUNT};

/// Opens `/ws/<name>?token=..<query>` and returns the socket with its first
/// frame, which must be exactly a `connection.recovery`.
pub async fn open(s: &TestServer, name: &str, query: &str) -> (Ws, Value) {
    let url = s.ws_url(&format!("/ws/{name}?token={ACCOUNT}{query}"));
    let (inner, res) = tokio_tungstenite::connect_async(url).await.unwrap();
    assert_eq!(res.status().as_u16(), 101);
    let mut ws = Ws { inner };
    let first = ws.envelope().await;
    assert_recovery_frame(&first);
    (ws, first["data"].clone())
}

/// Asserts the exact shape of the first frame.
pub fn assert_recovery_frame(v: &Value) {
    let keys: Vec<_> = v.as_object().unwrap().keys().cloned().collect();
    assert_eq!(keys.len(), 2, "{v}");
    assert_eq!(v["event"], "connection.recovery", "{v}");
    let data = v["data"].as_object().unwrap();
    let mut keys: Vec<_> = data.keys().cloned().collect();
    keys.sort();
    assert_eq!(keys, ["epoch", "offset", "recovered"], "{v}");
    assert!(data["recovered"].is_boolean() && data["epoch"].is_string() && data["offset"].is_u64());
}

/// Reconnects from `(epoch, since)`, with `extra` query parameters.
pub async fn resume(
    s: &TestServer,
    name: &str,
    epoch: &str,
    since: u64,
    extra: &str,
) -> (Ws, Value) {
    open(
        s,
        name,
        &format!("&recover=true&epoch={epoch}&since={since}{extra}"),
    )
    .await
}

/// The test's own counter in an event's `data`.
pub fn n(v: &Value) -> u64 {
    v["data"]["n"]
        .as_u64()
        .unwrap_or_else(|| panic!("no data.n in {v}"))
}

pub fn offset(v: &Value) -> u64 {
    v["offset"]
        .as_u64()
        .unwrap_or_else(|| panic!("no offset in {v}"))
}

/// A `call.update` carrying `n`.
pub fn ev(n: u64) -> Value {
    event("call.update", json!({"n": n}))
}

/// Reads envelopes until the one with `data.n == last`.
pub async fn read_until(ws: &mut Ws, last: u64) -> Vec<Value> {
    let mut got = Vec::new();
    loop {
        let v = ws.envelope().await;
        let done = v["data"]["n"].as_u64() == Some(last);
        got.push(v);
        if done {
            return got;
        }
    }
}

pub fn assert_increasing(frames: &[Value]) {
    for pair in frames.windows(2) {
        assert!(
            offset(&pair[0]) < offset(&pair[1]),
            "{} then {}",
            pair[0],
            pair[1]
        );
    }
}
