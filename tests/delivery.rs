//! Real-time delivery with real WebSocket clients (contract §6, §7, §9):
//! envelopes, filters, mediaBase64, isolation, order, live settings changes,
//! deletion, and publish validation.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{event, eventually, raw_ws_client, server_frames, TestServer, ACCOUNT, KINDS};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

const QUIET: Duration = Duration::from_millis(300);

#[actix_rt::test]
async fn every_event_type_arrives_in_the_exact_envelope() {
    let s = TestServer::start().await;
    let token = s.instance("env").await;
    let mut ws = s.connect("env", "").await;
    for (i, kind) in KINDS.iter().enumerate() {
        let data =
            json!({"seq": i, "nested": {"a": [1, 2.5, "x", null, true]}, "unicode": "héllo ✓"});
        let r = s.publish("env", event(kind, data.clone())).await;
        assert_eq!(r.status, 202);
        assert_eq!(
            r.body,
            json!({"success":true,"message":"Events accepted","accepted":1})
        );
        let got = ws.envelope().await;
        assert_eq!(
            got,
            json!({"event": kind, "data": data,
                   "instanceData": {"baseUrl": format!("http://{}", s.addr), "instance": "env", "token": token}})
        );
    }
}

/// Also: the public base URL's trailing `/` is dropped (README), and the
/// default Origin allowlist (`*`) takes a browser's request, which carries one.
#[actix_rt::test]
async fn instance_token_client_gets_the_instance_token_in_envelopes() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let s =
        TestServer::start_with(|st| st.server.public_base_url = "https://gw.example.com/".into())
            .await;
    let token = s.instance("tok").await;
    let mut request = s
        .ws_url(&format!("/ws/tok?token={token}"))
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("origin", "https://any.example".parse().unwrap());
    let (ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    let mut ws = common::Ws { inner: ws };
    s.wait_clients("tok", Some(1)).await;
    s.publish("tok", event("call.update", json!({}))).await;
    let got = ws.envelope().await;
    assert_eq!(
        got["instanceData"],
        json!({"baseUrl":"https://gw.example.com","instance":"tok","token":token})
    );
}

#[actix_rt::test]
async fn instance_filter_and_client_narrowing() {
    let s = TestServer::start().await;
    s.instance_with("f", json!({"name":"f","websocketEnabled":true,"websocketEvents":["call.update","group.flow","label.update"]})).await;
    let mut all = s.connect("f", "").await;
    let mut narrow = s
        .connect("f", "&events=group.flow,message.status&events=label.update")
        .await;
    s.wait_clients("f", Some(2)).await;
    let batch: Vec<_> = KINDS.iter().map(|k| event(k, json!({"k": k}))).collect();
    assert_eq!(s.publish("f", json!(batch)).await.body["accepted"], 6);
    for kind in ["call.update", "group.flow", "label.update"] {
        assert_eq!(all.envelope().await["event"], kind);
    }
    all.silent(QUIET).await;
    for kind in ["group.flow", "label.update"] {
        assert_eq!(narrow.envelope().await["event"], kind);
    }
    narrow.silent(QUIET).await;
}

#[actix_rt::test]
async fn media_base64_on_and_off() {
    let s = TestServer::start().await;
    s.instance("m").await;
    let mut ws = s.connect("m", "").await;
    let data =
        json!({"message": {"id": "1", "media": {"base64": "QUJD", "mimetype": "image/png"}}});
    let other = json!({"message": {"media": {"base64": "QUJD"}}});
    s.publish(
        "m",
        json!([
            event("message.exchange", data.clone()),
            event("message.status", other.clone())
        ]),
    )
    .await;
    let got = ws.envelope().await;
    assert_eq!(
        got["data"],
        json!({"message": {"id": "1", "media": {"mimetype": "image/png"}}})
    );
    assert_eq!(
        ws.envelope().await["data"],
        other,
        "other types are never altered"
    );
    s.configure("m", json!({"enabled": true, "mediaBase64": true}))
        .await;
    s.publish("m", event("message.exchange", data.clone()))
        .await;
    assert_eq!(ws.envelope().await["data"], data);
}

#[actix_rt::test]
async fn instances_never_see_each_other() {
    let s = TestServer::start().await;
    s.instance("a").await;
    s.instance("b").await;
    let mut wa = s.connect("a", "").await;
    let mut wb = s.connect("b", "").await;
    s.publish("a", event("call.update", json!({"to":"a"})))
        .await;
    s.publish("b", event("call.update", json!({"to":"b"})))
        .await;
    assert_eq!(wa.envelope().await["data"]["to"], "a");
    assert_eq!(wb.envelope().await["data"]["to"], "b");
    wa.silent(QUIET).await;
    wb.silent(QUIET).await;
}

#[actix_rt::test]
async fn several_clients_each_get_every_event_in_order() {
    let s = TestServer::start().await;
    s.instance("o").await;
    let mut clients = Vec::new();
    for _ in 0..5 {
        clients.push(s.connect("o", "").await);
    }
    s.wait_clients("o", Some(5)).await;
    let mut seq = 0;
    for round in 0..20 {
        let batch: Vec<_> = (0..(round % 4 + 1))
            .map(|_| {
                seq += 1;
                event("message.status", json!({"seq": seq}))
            })
            .collect();
        assert_eq!(s.publish("o", json!(batch)).await.status, 202);
    }
    for ws in &mut clients {
        for expected in 1..=seq {
            assert_eq!(ws.envelope().await["data"]["seq"], expected);
        }
        ws.silent(Duration::from_millis(100)).await;
    }
}

/// Whatever the layout of HTTP workers (where sessions run) and instance
/// threads, every client gets every event of its own instance, in order, and
/// closes cleanly.
#[actix_rt::test]
async fn every_thread_layout_delivers() {
    for (workers, arbiters) in [(1, 0), (2, 0), (2, 3)] {
        let s = TestServer::start_with(|st| {
            st.server.workers = workers;
            st.server.instance_arbiters = arbiters;
        })
        .await;
        let names = ["t1", "t2", "t3"];
        let mut clients = Vec::new();
        for name in names {
            s.instance(name).await;
            for _ in 0..3 {
                clients.push((name, s.connect(name, "").await));
            }
        }
        for name in names {
            s.wait_clients(name, Some(3)).await;
            for seq in 1..=5 {
                let body = event("message.status", json!({"to": name, "seq": seq}));
                assert_eq!(s.publish(name, body).await.status, 202);
            }
        }
        for (name, ws) in &mut clients {
            for seq in 1..=5 {
                let got = ws.envelope().await;
                assert_eq!(got["data"]["to"], *name, "layout {workers}/{arbiters}");
                assert_eq!(got["data"]["seq"], seq, "layout {workers}/{arbiters}");
            }
            ws.silent(Duration::from_millis(50)).await;
        }
        for (_, ws) in &mut clients {
            ws.send(Message::Close(Some(CloseFrame {
                code: CloseCode::Normal,
                reason: "bye".into(),
            })))
            .await;
            assert_eq!(ws.closed(Duration::from_secs(5)).await, Some(1000));
        }
        for name in names {
            s.wait_clients(name, Some(0)).await;
        }
    }
}

#[actix_rt::test]
async fn disabling_keeps_open_clients_and_refuses_new_ones() {
    let s = TestServer::start().await;
    s.instance("d").await;
    let mut ws = s.connect("d", "").await;
    s.configure("d", json!({"enabled": false})).await;
    s.publish("d", event("call.update", json!({"n":1}))).await;
    ws.silent(QUIET).await;
    let r = s
        .raw(
            "GET",
            &format!("/ws/d?token={ACCOUNT}"),
            &[
                ("connection", "upgrade"),
                ("upgrade", "websocket"),
                ("sec-websocket-version", "13"),
                ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ],
            None,
        )
        .await;
    r.assert_error(
        400,
        "WebSocket is not enabled for this instance. Configure it first using POST /api/events/websocket/d",
    );
    s.configure("d", json!({"enabled": true, "events": ["call.update"]}))
        .await;
    s.publish(
        "d",
        json!([
            event("group.flow", json!({})),
            event("call.update", json!({"n":2}))
        ]),
    )
    .await;
    let got = ws.envelope().await;
    assert_eq!(
        got["data"]["n"], 2,
        "events flow again under the new settings"
    );
}

#[actix_rt::test]
async fn settings_change_mid_stream_applies_to_the_next_event() {
    let s = TestServer::start().await;
    s.instance("live").await;
    let mut ws = s.connect("live", "").await;
    s.publish("live", event("label.update", json!({"n":1})))
        .await;
    assert_eq!(ws.envelope().await["data"]["n"], 1);
    s.configure("live", json!({"enabled": true, "events": ["call.update"]}))
        .await;
    s.publish(
        "live",
        json!([
            event("label.update", json!({"n":2})),
            event("call.update", json!({"n":3}))
        ]),
    )
    .await;
    assert_eq!(ws.envelope().await["data"]["n"], 3);
    ws.silent(QUIET).await;
}

#[actix_rt::test]
async fn deleting_an_instance_closes_its_sockets_with_4004() {
    let s = TestServer::start().await;
    let token = s.instance("gone").await;
    let mut a = s.connect("gone", "").await;
    let mut b = s.connect("gone", "").await;
    s.wait_clients("gone", Some(2)).await;
    let r = s
        .call("DELETE", "/api/instance/delete/gone", Some(ACCOUNT), None)
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(a.closed(Duration::from_secs(5)).await, Some(4004));
    assert_eq!(b.closed(Duration::from_secs(5)).await, Some(4004));
    let url = s.ws_url(&format!("/ws/gone?token={token}"));
    let err = tokio_tungstenite::connect_async(url).await.unwrap_err();
    assert!(err.to_string().contains("401"), "{err}");
}

#[actix_rt::test]
async fn upgrade_refusals_come_before_the_upgrade() {
    let s = TestServer::start_with(|st| {
        st.ws.allowed_origins = vec!["https://ok.example".into()];
        st.rate_limit.per_minute = 100;
    })
    .await;
    let t1 = s.instance("u1").await;
    s.instance("u2").await;
    s.instance_with("u3", json!({"name":"u3"})).await;
    let upgrade = [
        ("connection", "Upgrade"),
        ("upgrade", "websocket"),
        ("sec-websocket-version", "13"),
        ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ];
    let with = |extra: &[(&'static str, &'static str)]| {
        let mut h = upgrade.to_vec();
        h.extend_from_slice(extra);
        h
    };
    s.raw("GET", "/ws/u1", &upgrade, None).await.assert_error(
        401,
        "Missing token in header, Authorization header, or query parameter",
    );
    s.raw("GET", "/ws/u1?token=nope", &upgrade, None)
        .await
        .assert_error(401, "Invalid token");
    let r = s
        .raw("GET", &format!("/ws/u2?token={t1}"), &upgrade, None)
        .await;
    r.assert_error(403, "Instance token does not match this instance");
    assert_eq!(r.header("x-ratelimit-limit"), Some("100"));
    s.raw("GET", &format!("/ws/nope?token={ACCOUNT}"), &upgrade, None)
        .await
        .assert_error(404, "Instance not found");
    s.raw(
        "GET",
        &format!("/ws/u1?token={ACCOUNT}"),
        &with(&[("origin", "https://evil.example")]),
        None,
    )
    .await
    .assert_error(403, "Origin not allowed");
    s.raw(
        "GET",
        &format!("/ws/u1?token={ACCOUNT}&events=bogus"),
        &upgrade,
        None,
    )
    .await
    .assert_error(400, "Invalid request body");
    s.raw("GET", &format!("/ws/u3?token={ACCOUNT}"), &upgrade, None).await.assert_error(
        400,
        "WebSocket is not enabled for this instance. Configure it first using POST /api/events/websocket/u3",
    );
    s.raw("GET", &format!("/ws/u1?token={ACCOUNT}"), &[], None)
        .await
        .assert_error(400, "WebSocket upgrade expected");
    // Order: Origin is checked before ?events= and settings.
    s.raw(
        "GET",
        &format!("/ws/u3?token={ACCOUNT}&events=bogus"),
        &with(&[("origin", "https://evil.example")]),
        None,
    )
    .await
    .assert_error(403, "Origin not allowed");
    // Allowed origin (any case), and no origin at all, upgrade.
    for origin in ["https://OK.example", ""] {
        let mut req =
            tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
                s.ws_url(&format!("/ws/u1?token={ACCOUNT}")),
            )
            .unwrap();
        if !origin.is_empty() {
            req.headers_mut().insert("origin", origin.parse().unwrap());
        }
        let (_, res) = tokio_tungstenite::connect_async(req).await.unwrap();
        assert_eq!(res.status().as_u16(), 101);
        assert_eq!(
            res.headers().get("x-ratelimit-limit").unwrap(),
            "100",
            "the 101 carries the headers"
        );
    }
}

#[actix_rt::test]
async fn publish_validation_delivers_nothing_of_a_bad_request() {
    let s = TestServer::start().await;
    s.instance("p").await;
    let mut ws = s.connect("p", "").await;
    let good = event("call.update", json!({"ok": true}));
    for bad in [
        json!({"event": "call.nope", "data": {}}),
        json!({"event": "call.update", "data": []}),
        json!({"event": "call.update", "data": "x"}),
        json!({"event": "call.update"}),
        json!({"data": {}}),
        json!([good.clone(), {"event": "bad", "data": {}}]),
        json!([good.clone(), 5]),
        json!(vec![good.clone(); 1001]),
        json!("call.update"),
    ] {
        s.publish("p", bad)
            .await
            .assert_error(400, "Invalid request body");
    }
    let headers = [("token", ACCOUNT), ("content-type", "application/json")];
    for raw in [
        &br#"{"event":"call.update","data":{"n":1e999}}"#[..],
        br#"[{"event":"call.update","data":{}},"#,
    ] {
        s.raw("POST", "/api/events/publish/p", &headers, Some(raw))
            .await
            .assert_error(400, "Invalid request body");
    }
    ws.silent(QUIET).await;
    let r = s.publish("p", json!([])).await;
    assert_eq!(r.status, 202);
    assert_eq!(r.body["accepted"], 0);
    let r = s.publish("p", json!(vec![good.clone(); 1000])).await;
    assert_eq!(r.body["accepted"], 1000);
    for _ in 0..1000 {
        assert_eq!(ws.envelope().await["data"], json!({"ok": true}));
    }
    // Auth before size: 413 only for an authorised caller.
    let big = format!(
        r#"{{"event":"call.update","data":{{"pad":"{}"}}}}"#,
        "x".repeat(16 << 20)
    );
    s.raw(
        "POST",
        "/api/events/publish/p",
        &headers,
        Some(big.as_bytes()),
    )
    .await
    .assert_error(413, "Payload too large");
    s.raw(
        "POST",
        "/api/events/publish/ghost",
        &headers,
        Some(big.as_bytes()),
    )
    .await
    .assert_error(404, "Instance not found");
    // Unconfigured or disabled: accepted and discarded.
    s.instance_with("quiet", json!({"name":"quiet"})).await;
    let r = s.publish("quiet", good).await;
    assert_eq!(r.status, 202);
    assert_eq!(r.body["accepted"], 1);
}

#[actix_rt::test]
async fn connected_clients_are_counted() {
    let s = TestServer::start().await;
    s.instance("c").await;
    let a = s.connect("c", "").await;
    let _b = s.connect("c", "").await;
    s.wait_clients("c", Some(2)).await;
    drop(a);
    s.wait_clients("c", Some(1)).await;
    // The gauge moves as a session stops, just after it left its instance.
    eventually(Duration::from_secs(10), async || {
        (s.metric("eventgate_connected_clients").await == 1.0).then_some(())
    })
    .await
    .expect("the gauge says 1");
}

/// `P` publishers at once, each publishing `requests` batches of `batch`
/// events to `name` and waiting for each 202; publisher `p`'s events carry
/// `{"p": p, "seq": …}` numbered on from `first[p]`.
async fn publish_concurrently<const P: usize>(
    s: &TestServer,
    name: &str,
    first: [u64; P],
    requests: usize,
    batch: usize,
) {
    let publishers = (0..P).map(|p| async move {
        for r in 0..requests {
            let base = first[p] + (r * batch) as u64;
            let events: Vec<_> = (0..batch as u64)
                .map(|i| event("message.status", json!({"p": p, "seq": base + i})))
                .collect();
            assert_eq!(s.publish(name, json!(events)).await.status, 202);
        }
    });
    futures_util::future::join_all(publishers).await;
}

/// Checks that `got` is the next event of its publisher (see
/// [`publish_concurrently`]) and counts it in `seen`.
fn next_in_order<const P: usize>(seen: &mut [u64; P], got: &Value) {
    let p = got["data"]["p"].as_u64().unwrap() as usize;
    assert_eq!(got["data"]["seq"], seen[p], "publisher {p} out of order");
    seen[p] += 1;
}

/// A fan-out to many idle clients on a quiet node writes their sockets
/// directly: every client gets every event once and in order, both while
/// publishes come alone (written directly) and while they come together
/// (a publish arriving sends the rest of a fan-out through the mailboxes,
/// behind what was written). The clients read raw bytes and decode them
/// afterwards.
#[actix_rt::test]
async fn a_wide_fan_out_written_directly_delivers_everything_in_order() {
    use tokio::io::AsyncReadExt;
    const CLIENTS: usize = 300;
    const ALONE: u64 = 20;
    const PUBLISHERS: usize = 4;
    const REQUESTS: usize = 30;
    const BATCH: usize = 5;
    const TOTAL: usize = ALONE as usize + PUBLISHERS * REQUESTS * BATCH;
    let s = TestServer::start_with(|st| st.server.direct_writes = true).await;
    s.instance("wide").await;
    let mut readers = Vec::new();
    for _ in 0..CLIENTS {
        let mut socket = raw_ws_client(s.addr, &format!("/ws/wide?token={ACCOUNT}")).await;
        readers.push(actix_rt::spawn(async move {
            let (mut bytes, mut buf) = (Vec::new(), vec![0u8; 1 << 16]);
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            let texts = |bytes: &[u8]| {
                server_frames(bytes)
                    .into_iter()
                    .filter(|(op, _)| *op == 1)
                    .map(|(_, payload)| serde_json::from_slice::<Value>(&payload).unwrap())
                    .collect::<Vec<_>>()
            };
            // Until every event is here and a quiet moment shows no more.
            loop {
                match tokio::time::timeout(QUIET, socket.read(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => panic!("the server closed a client"),
                    Ok(Ok(n)) => bytes.extend_from_slice(&buf[..n]),
                    Err(_) if texts(&bytes).len() >= TOTAL => break texts(&bytes),
                    Err(_) => assert!(std::time::Instant::now() < deadline, "events missing"),
                }
            }
        }));
    }
    s.wait_clients("wide", Some(CLIENTS as u64)).await;
    // Alone and spaced past the node's 5 ms gate: written directly.
    for seq in 0..ALONE {
        let body = event("message.status", json!({"p": 0, "seq": seq}));
        assert_eq!(s.publish("wide", body).await.status, 202);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let whole = s
        .metric("eventgate_direct_writes_total{written=\"whole\"}")
        .await;
    assert!(
        whole >= (CLIENTS * ALONE as usize / 2) as f64,
        "{whole} direct writes"
    );
    // Then rounds of publishes together: each round's first one, spaced
    // past the gate, starts writing directly, and the others arrive 1 ms
    // later, while it writes (most rounds: the timing is not enforced).
    for round in 0..REQUESTS {
        let publish = |p: usize| {
            let base = (round * BATCH) as u64 + if p == 0 { ALONE } else { 0 };
            let events: Vec<_> = (base..base + BATCH as u64)
                .map(|seq| event("message.status", json!({"p": p, "seq": seq})))
                .collect();
            let s = &s;
            async move { assert_eq!(s.publish("wide", json!(events)).await.status, 202) }
        };
        let others = async {
            tokio::time::sleep(Duration::from_millis(1)).await;
            futures_util::future::join_all((1..PUBLISHERS).map(publish)).await;
        };
        futures_util::future::join(publish(0), others).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for reader in readers {
        let texts = reader.await.unwrap();
        assert_eq!(texts.len(), TOTAL, "lost or extra events");
        let mut seen = [0u64; PUBLISHERS];
        for got in &texts {
            next_in_order(&mut seen, got);
        }
    }
    assert_eq!(
        s.metric("eventgate_clients_evicted_total{reason=\"slow_consumer\"}")
            .await,
        0.0
    );
}

/// While most of an instance's sessions have several batches waiting and
/// their clients take all they are sent, this node is behind: publishers
/// are answered only once the sessions caught up, so at full speed the
/// queues stay short. Nothing is lost, each publisher's events arrive in
/// its order, and no client is evicted. (The clients read raw bytes as
/// fast as they come and decode them afterwards, so that the node, not
/// they, is what falls behind.)
#[actix_rt::test]
async fn publishers_wait_while_the_node_is_behind_and_lose_nothing() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use tokio::io::AsyncReadExt;
    const PUBLISHERS: usize = 8;
    const REQUESTS: usize = 10;
    const BATCH: usize = 20;
    // Through the mailboxes: a fan-out that writes idle sockets itself
    // queues nothing while the clients keep up, so nothing would lag.
    let s = TestServer::start_with(|s| s.server.direct_writes = false).await;
    s.instance("lag").await;
    let mut clients = Vec::new();
    for _ in 0..50 {
        clients.push(raw_ws_client(s.addr, &format!("/ws/lag?token={ACCOUNT}")).await);
    }
    s.wait_clients("lag", Some(50)).await;
    let mut next = [0u64; PUBLISHERS];
    let mut rounds = 0;
    while s.metric("eventgate_publish_lag_total").await == 0.0 {
        assert!(rounds < 20, "the node was never behind with its sessions");
        let first = next;
        let published = Arc::new(AtomicBool::new(false));
        let readers: Vec<_> = clients
            .drain(..)
            .map(|mut socket| {
                let published = published.clone();
                actix_rt::spawn(async move {
                    let (mut bytes, mut buf) = (Vec::new(), vec![0u8; 1 << 16]);
                    // A pause of the server is no end: a reader stops at a
                    // quiet moment after the publishes once it has them all
                    // (or after a minute), and extra ones would show.
                    let deadline = std::time::Instant::now() + Duration::from_secs(60);
                    let complete = |bytes: &[u8]| {
                        let texts = server_frames(bytes)
                            .iter()
                            .filter(|(op, _)| *op == 1)
                            .count();
                        texts >= PUBLISHERS * REQUESTS * BATCH
                            || std::time::Instant::now() > deadline
                    };
                    loop {
                        match tokio::time::timeout(QUIET, socket.read(&mut buf)).await {
                            Ok(Ok(0)) | Ok(Err(_)) => panic!("the server closed a client"),
                            Ok(Ok(n)) => bytes.extend_from_slice(&buf[..n]),
                            Err(_) if published.load(Ordering::Acquire) && complete(&bytes) => {
                                break
                            }
                            Err(_) => {}
                        }
                    }
                    (socket, bytes)
                })
            })
            .collect();
        publish_concurrently(&s, "lag", first, REQUESTS, BATCH).await;
        published.store(true, Ordering::Release);
        for reader in readers {
            let (socket, bytes) = reader.await.unwrap();
            let texts: Vec<Value> = server_frames(&bytes)
                .into_iter()
                .filter(|(opcode, _)| *opcode == 1)
                .map(|(_, payload)| serde_json::from_slice(&payload).unwrap())
                .collect();
            assert_eq!(
                texts.len(),
                PUBLISHERS * REQUESTS * BATCH,
                "lost or extra events"
            );
            let mut seen = first;
            for got in texts {
                next_in_order(&mut seen, &got);
            }
            next = seen;
            clients.push(socket);
        }
        rounds += 1;
    }
    assert!(s.metric("eventgate_publish_waits_total").await >= 1.0);
    assert_eq!(
        s.metric("eventgate_clients_evicted_total{reason=\"slow_consumer\"}")
            .await,
        0.0
    );
}

/// With `limits.publish_lag` publishes already waiting for an instance's
/// fan-out, the next publisher is answered only once its own events are
/// fanned out, whether or not any session lags: here there is none (the
/// instance keeps a history, so its actor handles every publish), and
/// the queue bound is out of reach. Every event is kept, each publisher's
/// in its order.
#[actix_rt::test]
async fn publishers_wait_while_publishes_queue_for_the_fan_out() {
    use common::recovery::{open, resume};
    const PUBLISHERS: usize = 8;
    const REQUESTS: usize = 10;
    const BATCH: usize = 20;
    let s = TestServer::start_with(|st| {
        st.limits.publish_lag = 1;
        st.limits.publish_queue = 1 << 20;
        st.ws.history_size = 1 << 20;
        st.ws.history_bytes = 256 << 20;
    })
    .await;
    s.instance("queue").await;
    let (ws, first) = open(&s, "queue", "&recover=true").await;
    let epoch = first["epoch"].as_str().unwrap().to_string();
    drop(ws);
    s.wait_clients("queue", Some(0)).await;
    let mut next = [0u64; PUBLISHERS];
    let mut rounds = 0;
    while s.metric("eventgate_publish_waits_total").await == 0.0 {
        assert!(rounds < 20, "no publisher ever waited for the fan-out");
        publish_concurrently(&s, "queue", next, REQUESTS, BATCH).await;
        for n in &mut next {
            *n += (REQUESTS * BATCH) as u64;
        }
        rounds += 1;
    }
    assert_eq!(
        s.metric("eventgate_publish_lag_total").await,
        0.0,
        "no session to lag"
    );
    // Everything was kept, in each publisher's order.
    let (mut ws, _) = resume(&s, "queue", &epoch, 0, "").await;
    let mut seen = [0u64; PUBLISHERS];
    for _ in 0..next.iter().sum::<u64>() {
        next_in_order(&mut seen, &ws.envelope().await);
    }
    assert_eq!(seen, next);
}

/// Past `limits.publish_queue` publishes waiting for one instance, the next
/// publisher is answered only once its events are fanned out (backpressure):
/// every publish is still accepted and every event delivered, each
/// publisher's in its order.
#[actix_rt::test]
async fn publishers_past_the_queue_bound_wait_and_lose_nothing() {
    const PUBLISHERS: usize = 8;
    const REQUESTS: usize = 10;
    const BATCH: usize = 50;
    let s = TestServer::start_with(|st| st.limits.publish_queue = 1).await;
    s.instance("q").await;
    let mut clients = Vec::new();
    for _ in 0..10 {
        clients.push(s.connect("q", "").await);
    }
    s.wait_clients("q", Some(10)).await;
    let mut next = [0u64; PUBLISHERS];
    let mut rounds = 0;
    while s.metric("eventgate_publish_waits_total").await == 0.0 {
        assert!(rounds < 20, "no publisher ever waited for the fan-out");
        let first = next;
        publish_concurrently(&s, "q", first, REQUESTS, BATCH).await;
        for ws in &mut clients {
            let mut seen = first;
            for _ in 0..PUBLISHERS * REQUESTS * BATCH {
                next_in_order(&mut seen, &ws.envelope().await);
            }
            next = seen;
        }
        rounds += 1;
    }
    for ws in &mut clients {
        ws.silent(QUIET).await;
    }
    assert_eq!(
        s.metric("eventgate_clients_evicted_total{reason=\"slow_consumer\"}")
            .await,
        0.0
    );
}
