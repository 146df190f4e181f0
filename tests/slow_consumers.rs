//! Clients that misbehave (contract §6): a stalled reader is evicted with
//! 4008 and dropped while fast clients get everything; a silent client is
//! closed with 4001; oversize, fragmented-oversize and invalid UTF-8 client
//! messages close with 1009 and 1007.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::{event, server_frames, stalled_client, TestServer, Ws, ACCOUNT};
use serde_json::json;
use tokio::io::AsyncReadExt;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

/// Reads a raw socket until EOF or a reset, returning what arrived, or
/// `None` when it is still open after `wait`.
async fn read_until_gone(stream: &mut tokio::net::TcpStream, wait: Duration) -> Option<Vec<u8>> {
    let deadline = Instant::now() + wait;
    let mut all = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(all),
            Ok(Ok(n)) => all.extend_from_slice(&buf[..n]),
        }
    }
}

/// Client bounds (64 messages, 1 MiB) reached within a few MiB of
/// publishing; TCP_USER_TIMEOUT long enough that a loaded machine reaches
/// them before the kernel gives up on a stalled socket.
fn small_client_bounds(st: &mut eventgate::settings::Settings) {
    st.ws.tcp_user_timeout_secs = 10;
    st.ws.client_buffer = 64;
    st.ws.client_buffer_bytes = 1024 * 1024;
}

/// Publishes events `0..total` to `instance` one by one, each padded to
/// 32 KiB; every one is accepted.
async fn publish_padded(s: &TestServer, instance: &str, total: u64) {
    let pad = "p".repeat(32 * 1024);
    for seq in 0..total {
        let r = s
            .publish(
                instance,
                event("message.status", json!({"seq": seq, "pad": pad})),
            )
            .await;
        assert_eq!(r.status, 202);
    }
}

#[actix_rt::test]
async fn stalled_client_is_evicted_while_fast_clients_get_everything() {
    let s = TestServer::start_with(small_client_bounds).await;
    s.instance("busy").await;
    let mut fast: Vec<Ws> = Vec::new();
    for _ in 0..10 {
        fast.push(s.connect("busy", "").await);
    }
    let mut stalled = stalled_client(s.addr, &format!("/ws/busy?token={ACCOUNT}")).await;
    s.wait_clients("busy", Some(11)).await;

    // Readers drain the fast clients concurrently while the producer publishes.
    let total = 300;
    let readers: Vec<_> = fast
        .into_iter()
        .map(|mut ws| {
            actix_rt::spawn(async move {
                for seq in 0..total {
                    let got = ws.envelope().await;
                    assert_eq!(got["data"]["seq"], seq, "in order, nothing lost");
                }
                ws
            })
        })
        .collect();
    // 300 × 32 KiB: more than the kernel's socket buffers and the client's bounds.
    publish_padded(&s, "busy", total).await;
    let mut still_open = Vec::new();
    for r in readers {
        still_open.push(r.await.unwrap());
    }
    // The stalled session may notice it is behind just after the fast
    // readers are done: poll for the eviction, then check it was the one.
    let series = "eventgate_clients_evicted_total{reason=\"slow_consumer\"}";
    let evicted = common::eventually(common::DEADLINE, async || {
        (s.metric(series).await >= 1.0).then_some(())
    })
    .await;
    if evicted.is_none() {
        let text = s.raw("GET", "/metrics", &[], None).await.body;
        let text = text.as_str().unwrap_or("").to_string();
        let ends: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("eventgate_client_disconnects_total"))
            .collect();
        panic!("the stalled client was not evicted; disconnects: {ends:?}");
    }
    assert_eq!(s.metric(series).await, 1.0);
    s.wait_clients("busy", Some(10)).await;
    // The stalled socket is gone within seconds although it never read.
    let started = Instant::now();
    let got = read_until_gone(&mut stalled, Duration::from_secs(20)).await;
    assert!(
        got.is_some(),
        "the stalled socket was still open after 20 s"
    );
    assert!(started.elapsed() < Duration::from_secs(20));
}

#[actix_rt::test]
async fn byte_bound_evicts_before_the_message_bound() {
    // As above: TCP_USER_TIMEOUT must not end the socket before the bound does.
    let s = TestServer::start_with(|st| {
        st.ws.tcp_user_timeout_secs = 10;
        st.ws.client_buffer_bytes = 256 * 1024;
    })
    .await;
    s.instance("bytes").await;
    let _stalled = stalled_client(s.addr, &format!("/ws/bytes?token={ACCOUNT}")).await;
    s.wait_clients("bytes", Some(1)).await;
    let pad = "b".repeat(60 * 1024);
    // 200 messages: under the 256-message bound, far over 256 KiB plus socket buffers.
    for seq in 0..200 {
        s.publish(
            "bytes",
            event("message.exchange", json!({"seq": seq, "pad": pad})),
        )
        .await;
    }
    let evicted = common::eventually(common::DEADLINE, async || {
        (s.metric("eventgate_clients_evicted_total{reason=\"slow_consumer\"}")
            .await
            == 1.0)
            .then_some(())
    })
    .await;
    assert!(
        evicted.is_some(),
        "the byte bound did not evict the stalled client"
    );
    s.wait_clients("bytes", Some(0)).await;
}

/// However many of an instance's clients stall, its producer is not held
/// back: a session whose socket is full is the client's lag, not the
/// node's, so the instance does not stay behind (see `instance::inbox`).
/// It may count as behind for a moment, before the sessions' writers have
/// run and met the full sockets (a writer that has not run yet is the
/// node's lag); were full sockets counted, the publishes would wait for
/// ever, and none would evict: `publish_padded` fails on the first reply
/// that is not a 202, and the test client's requests time out after 20 s.
#[actix_rt::test]
async fn clients_that_all_stall_never_hold_their_producer_back() {
    let s = TestServer::start_with(small_client_bounds).await;
    s.instance("stuck").await;
    let mut stalled = Vec::new();
    for _ in 0..3 {
        stalled.push(stalled_client(s.addr, &format!("/ws/stuck?token={ACCOUNT}")).await);
    }
    s.wait_clients("stuck", Some(3)).await;
    // 300 × 32 KiB: more than the kernel's socket buffers and the clients' bounds.
    publish_padded(&s, "stuck", 300).await;
    // They were behind their bounds, not the node: evicted, all three.
    let series = "eventgate_clients_evicted_total{reason=\"slow_consumer\"}";
    let evicted = common::eventually(common::DEADLINE, async || {
        (s.metric(series).await >= 3.0).then_some(())
    })
    .await;
    assert!(
        evicted.is_some(),
        "the stalled clients were not all evicted"
    );
}

#[actix_rt::test]
async fn silent_client_is_closed_with_4001() {
    let s = TestServer::start_with(|st| {
        st.ws.ping_interval_secs = 1;
        st.ws.idle_timeout_secs = 2;
    })
    .await;
    s.instance("hb").await;
    // A raw client that never answers pings (it reads nothing until the end).
    let mut silent = stalled_client(s.addr, &format!("/ws/hb?token={ACCOUNT}")).await;
    // A well-behaved client answers pings and stays.
    let mut good = s.connect("hb", "").await;
    s.wait_clients("hb", Some(2)).await;
    // The good client keeps reading (so it answers pings) past the idle timeout.
    good.silent(Duration::from_secs(4)).await;
    let bytes = read_until_gone(&mut silent, Duration::from_secs(10))
        .await
        .expect("closed");
    let frames = server_frames(&bytes);
    assert!(frames.iter().any(|(op, _)| *op == 0x9), "pings were sent");
    let close = frames
        .iter()
        .find(|(op, _)| *op == 0x8)
        .expect("a close frame");
    assert_eq!(u16::from_be_bytes([close.1[0], close.1[1]]), 4001);
    s.publish("hb", event("call.update", json!({}))).await;
    assert_eq!(good.envelope().await["event"], "call.update");
    assert_eq!(
        s.metric("eventgate_clients_evicted_total{reason=\"heartbeat\"}")
            .await,
        1.0
    );
}

/// Each client is pinged once per ping interval, whichever second of it
/// its turn falls in (the instance tells a slice of its sessions each
/// second), and closed with 4001 at its first turn past the idle timeout.
#[actix_rt::test]
async fn every_client_is_pinged_once_per_interval_until_its_idle_timeout() {
    let s = TestServer::start_with(|st| {
        st.ws.ping_interval_secs = 2;
        st.ws.idle_timeout_secs = 5;
    })
    .await;
    s.instance("beat").await;
    let mut silent = Vec::new();
    for _ in 0..6 {
        silent.push(stalled_client(s.addr, &format!("/ws/beat?token={ACCOUNT}")).await);
    }
    s.wait_clients("beat", Some(6)).await;
    let reads = silent
        .iter_mut()
        .map(|c| read_until_gone(c, Duration::from_secs(15)));
    for (i, bytes) in futures_util::future::join_all(reads)
        .await
        .into_iter()
        .enumerate()
    {
        let frames = server_frames(&bytes.expect("closed"));
        let pings = frames.iter().filter(|(op, _)| *op == 0x9).count();
        // Turns 2 s apart: the first within 2 s of joining, the last before
        // 5 s of silence have passed; one a second would be 4 or more.
        assert!((2..=3).contains(&pings), "client {i}: {pings} pings");
        let close = frames
            .iter()
            .find(|(op, _)| *op == 0x8)
            .expect("a close frame");
        assert_eq!(
            u16::from_be_bytes([close.1[0], close.1[1]]),
            4001,
            "client {i}"
        );
    }
}

/// A client whose connection is busy writing (it stopped reading, so its
/// socket is full) cannot be pinged on its socket by the instance: its
/// session is told to take its turn instead, and the ping is queued behind
/// what waits for the socket. Without that, such a client would get no ping
/// until it caught up.
#[actix_rt::test]
async fn a_client_whose_connection_is_writing_is_pinged_through_its_session() {
    let s = TestServer::start_with(|st| {
        st.ws.ping_interval_secs = 1;
        st.ws.idle_timeout_secs = 60;
        st.ws.tcp_user_timeout_secs = 60;
        st.ws.client_buffer = 4096;
        st.ws.client_buffer_bytes = 64 << 20;
    })
    .await;
    s.instance("busy").await;
    let mut paused = stalled_client(s.addr, &format!("/ws/busy?token={ACCOUNT}")).await;
    s.wait_clients("busy", Some(1)).await;
    // 8 MiB: more than loopback's send buffer (4 MiB at most) and the
    // client's 4 KiB take, so the connection's writer holds the rest while
    // the client does not read.
    let pad = "p".repeat(32 * 1024);
    for seq in 0..256 {
        let body = event("message.status", json!({"seq": seq, "pad": pad}));
        assert_eq!(s.publish("busy", body).await.status, 202);
    }
    // Three heartbeat turns while the writer is busy, then a marker.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let marker = event("call.update", json!({"marker": true}));
    assert_eq!(s.publish("busy", marker).await.status, 202);
    let mut bytes = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    let deadline = Instant::now() + Duration::from_secs(60);
    let has_marker = |p: &[u8]| p.windows(6).any(|w| w == b"marker");
    let mut seen = false;
    let before_marker = loop {
        // Parsed only once the marker's bytes are in (8 MiB, read 64 KiB at a time).
        if seen {
            let frames = server_frames(&bytes);
            if let Some(at) = frames.iter().position(|(op, p)| *op == 1 && has_marker(p)) {
                break frames[..at].to_vec();
            }
        }
        assert!(Instant::now() < deadline, "the marker did not arrive");
        let n = tokio::time::timeout(Duration::from_secs(10), paused.read(&mut buf))
            .await
            .expect("frames keep coming")
            .unwrap();
        assert!(n > 0, "closed before the marker");
        let from = bytes.len().saturating_sub(5);
        bytes.extend_from_slice(&buf[..n]);
        seen = seen || has_marker(&bytes[from..]);
    };
    let texts = before_marker.iter().filter(|(op, _)| *op == 1).count();
    assert_eq!(texts, 256, "every event before the marker");
    let pings = before_marker.iter().filter(|(op, _)| *op == 0x9).count();
    assert!(pings >= 2, "{pings} pings while the connection was writing");
}

#[actix_rt::test]
async fn oversize_and_invalid_client_messages() {
    let s = TestServer::start().await;
    s.instance("big").await;
    // Small frames are ignored.
    let mut ws = s.connect("big", "").await;
    ws.send(Message::Text("hello".into())).await;
    ws.send(Message::Binary(vec![1, 2, 3])).await;
    s.publish("big", event("call.update", json!({}))).await;
    assert_eq!(ws.envelope().await["event"], "call.update");
    // One 65 KiB frame.
    ws.send(Message::Text("x".repeat(65 * 1024))).await;
    assert_eq!(ws.closed(Duration::from_secs(5)).await, Some(1009));
    // Counted out before the next connect counts itself in.
    s.wait_clients("big", Some(0)).await;
    // Fragments that add up past 64 KiB.
    let mut ws = s.connect("big", "").await;
    let part = vec![b'y'; 40 * 1024];
    ws.send(Message::Frame(Frame::message(
        part.clone(),
        OpCode::Data(Data::Text),
        false,
    )))
    .await;
    let _ = ws
        .inner
        .send(Message::Frame(Frame::message(
            part,
            OpCode::Data(Data::Continue),
            true,
        )))
        .await;
    assert_eq!(ws.closed(Duration::from_secs(5)).await, Some(1009));
    // Counted out before the next connect counts itself in.
    s.wait_clients("big", Some(0)).await;
    // Invalid UTF-8 in a text message, whole and fragmented.
    let mut ws = s.connect("big", "").await;
    ws.send(Message::Frame(Frame::message(
        vec![0xff, 0xfe],
        OpCode::Data(Data::Text),
        true,
    )))
    .await;
    assert_eq!(ws.closed(Duration::from_secs(5)).await, Some(1007));
    // Counted out before the next connect counts itself in.
    s.wait_clients("big", Some(0)).await;
    let mut ws = s.connect("big", "").await;
    ws.send(Message::Frame(Frame::message(
        vec![b'a', 0xc3],
        OpCode::Data(Data::Text),
        false,
    )))
    .await;
    let _ = ws
        .inner
        .send(Message::Frame(Frame::message(
            vec![0x28],
            OpCode::Data(Data::Continue),
            true,
        )))
        .await;
    assert_eq!(ws.closed(Duration::from_secs(5)).await, Some(1007));
}

/// A data frame whose header declares more than 64 KiB is refused at its
/// header (1009), however little of it follows: the server does not hold
/// the bytes of a frame it will refuse while waiting for the rest.
#[actix_rt::test]
async fn a_frame_declaring_more_than_the_limit_is_closed_at_its_header() {
    use tokio::io::AsyncWriteExt;
    let s = TestServer::start().await;
    s.instance("huge").await;
    for declared in [65_537u64, 1 << 30, 1 << 40] {
        let mut raw = common::raw_ws_client(s.addr, &format!("/ws/huge?token={ACCOUNT}")).await;
        let mut header = vec![0x82, 0x80 | 127];
        header.extend_from_slice(&declared.to_be_bytes());
        header.extend_from_slice(&[1, 2, 3, 4]);
        raw.write_all(&header).await.unwrap();
        // Some of the payload, never all of it.
        raw.write_all(&[0u8; 4096]).await.unwrap();
        let bytes = read_until_gone(&mut raw, Duration::from_secs(5))
            .await
            .unwrap_or_else(|| panic!("still open 5 s after a header declaring {declared}"));
        let closes: Vec<Vec<u8>> = server_frames(&bytes)
            .into_iter()
            .filter(|(op, _)| *op == 0x8)
            .map(|(_, payload)| payload)
            .collect();
        assert_eq!(closes.len(), 1, "{declared}: {bytes:?}");
        assert_eq!(
            u16::from_be_bytes([closes[0][0], closes[0][1]]),
            1009,
            "{declared}"
        );
        s.wait_clients("huge", Some(0)).await;
    }
    // A frame of exactly 64 KiB is taken (and ignored).
    let mut ws = s.connect("huge", "").await;
    ws.send(Message::Binary(vec![0; 64 * 1024])).await;
    s.publish("huge", event("call.update", json!({}))).await;
    assert_eq!(ws.envelope().await["event"], "call.update");
}

#[actix_rt::test]
async fn client_close_is_answered() {
    let s = TestServer::start().await;
    s.instance("bye").await;
    let mut ws = s.connect("bye", "").await;
    ws.inner
        .close(Some(CloseFrame {
            code: tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode::Normal,
            reason: "".into(),
        }))
        .await
        .unwrap();
    assert_eq!(ws.closed(Duration::from_secs(5)).await, Some(1000));
    s.wait_clients("bye", Some(0)).await;
}

use futures_util::SinkExt;

#[actix_rt::test]
async fn one_batch_larger_than_the_byte_bound_reaches_a_client_that_keeps_up() {
    let s = TestServer::start_with(|st| st.ws.client_buffer_bytes = 64 * 1024).await;
    s.instance("wide").await;
    let mut ws = s.connect("wide", "").await;
    let pad = "w".repeat(20 * 1024);
    let batch: Vec<_> = (0..10)
        .map(|i| event("message.exchange", json!({"i": i, "pad": pad})))
        .collect();
    assert_eq!(s.publish("wide", json!(batch)).await.status, 202);
    for i in 0..10 {
        assert_eq!(ws.envelope().await["data"]["i"], i);
    }
    assert_eq!(
        s.metric("eventgate_clients_evicted_total{reason=\"slow_consumer\"}")
            .await,
        0.0
    );
}

/// With `direct_writes`, a client that stops reading for a while and then
/// reads everything: the fan-out writes its socket itself while it takes
/// frames; the write that fills it is taken in part, and its rest and what
/// follows go through the session. Every event arrives whole, once and in
/// order, on a client whose bounds hold what it fell behind by; a fast
/// client beside it is unaffected. First one publisher (each publish alone
/// and spaced, so written directly) until a write was taken in part, then
/// four at once while the session's writer holds the rest.
#[actix_rt::test]
async fn a_client_that_pauses_gets_every_frame_whole_and_in_order() {
    const PUBLISHERS: usize = 4;
    const EACH: u64 = 50;
    let s = TestServer::start_with(|st| {
        st.server.direct_writes = true;
        st.ws.tcp_user_timeout_secs = 30;
        st.ws.client_buffer = 4096;
        st.ws.client_buffer_bytes = 64 << 20;
    })
    .await;
    s.instance("pause").await;
    let mut fast = s.connect("pause", "").await;
    let mut paused = stalled_client(s.addr, &format!("/ws/pause?token={ACCOUNT}")).await;
    s.wait_clients("pause", Some(2)).await;
    let pad = "p".repeat(32 * 1024);
    let publish = |p: usize, seq: u64| {
        let body = event("message.status", json!({"p": p, "seq": seq, "pad": pad}));
        let s = &s;
        async move { assert_eq!(s.publish("pause", body).await.status, 202) }
    };
    let partly = "eventgate_direct_writes_total{written=\"partly\"}";
    // Publisher PUBLISHERS, alone, until the socket is full: the node writes
    // directly only to an instance whose fan-outs are spaced (5 ms), so
    // these are 20 ms apart (the spacing is the condition, not a wait).
    let mut first = 0;
    while s.metric(partly).await < 1.0 {
        assert!(first < 300, "no write was taken in part");
        publish(PUBLISHERS, first).await;
        first += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        s.metric("eventgate_direct_writes_total{written=\"whole\"}")
            .await
            >= 1.0
    );
    let publishers = (0..PUBLISHERS).map(|p| async move {
        for seq in 0..EACH {
            publish(p, seq).await;
        }
    });
    futures_util::future::join_all(publishers).await;
    let total = first as usize + PUBLISHERS * EACH as usize;
    // Each publisher's events arrive in its order, none missing or repeated.
    let in_order = |events: &[serde_json::Value]| {
        let mut next = [0u64; PUBLISHERS + 1];
        for v in events {
            let p = v["data"]["p"].as_u64().unwrap() as usize;
            assert_eq!(v["data"]["seq"], next[p], "publisher {p}");
            next[p] += 1;
        }
        assert_eq!(events.len(), total);
    };
    let mut got = Vec::new();
    for _ in 0..total {
        got.push(fast.envelope().await);
    }
    in_order(&got);
    // Now the paused client reads: every text frame whole (a JSON envelope).
    let mut bytes = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    let deadline = Instant::now() + Duration::from_secs(30);
    let texts = loop {
        let texts: Vec<_> = server_frames(&bytes)
            .into_iter()
            .filter(|(op, _)| *op == 1)
            .collect();
        if texts.len() >= total {
            break texts
                .iter()
                .map(|(_, payload)| serde_json::from_slice(payload).unwrap())
                .collect::<Vec<serde_json::Value>>();
        }
        assert!(Instant::now() < deadline, "{} frames arrived", texts.len());
        let n = tokio::time::timeout(Duration::from_secs(10), paused.read(&mut buf))
            .await
            .expect("frames keep coming")
            .unwrap();
        assert!(n > 0, "closed after {} frames", texts.len());
        bytes.extend_from_slice(&buf[..n]);
    };
    in_order(&texts);
    assert_eq!(
        s.metric("eventgate_clients_evicted_total{reason=\"slow_consumer\"}")
            .await,
        0.0
    );
}
