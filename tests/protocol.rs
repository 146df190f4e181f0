//! WebSocket protocol rules on the real `/ws/:instance` path, with raw
//! frames: bad opcodes and reserved bits (1002), invalid close codes (1002),
//! ping answered with pong (also between fragments), the close handshake,
//! frames sent right behind the handshake, and how refused or odd upgrade
//! requests end their connection.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{server_frames, stalled_client, TestServer, ACCOUNT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A masked client frame (mask 0: the payload goes out as is).
fn frame(first_byte: u8, payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 126);
    let mut out = vec![first_byte, 0x80 | payload.len() as u8, 0, 0, 0, 0];
    out.extend_from_slice(payload);
    out
}

/// Reads server frames until one with `opcode` arrives: its payload.
async fn read_until(stream: &mut TcpStream, opcode: u8) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        if let Some((_, payload)) = server_frames(&buf)
            .into_iter()
            .find(|(op, _)| *op == opcode)
        {
            return Some(payload);
        }
        let mut chunk = [0u8; 1024];
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, stream.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return None,
        }
    }
}

async fn client(s: &TestServer) -> TcpStream {
    stalled_client(s.addr, &format!("/ws/p?token={ACCOUNT}")).await
}

fn close_code(payload: &[u8]) -> u16 {
    u16::from_be_bytes([payload[0], payload[1]])
}

#[actix_rt::test]
async fn protocol_errors_close_with_1002() {
    let s = TestServer::start().await;
    s.instance("p").await;
    for bad in [
        frame(0x83, b"x"),          // reserved data opcode 3
        frame(0x8B, b""),           // reserved control opcode 11
        frame(0xC1, b"x"),          // RSV1 set on a text frame
        frame(0x88, &[0x03, 0xE7]), // close code 999
        frame(0x88, &[0x03]),       // 1-byte close payload
        frame(0x09, b"ping"),       // fragmented control frame
    ] {
        let mut ws = client(&s).await;
        ws.write_all(&bad).await.unwrap();
        let close = read_until(&mut ws, 0x8).await.expect("a close frame");
        assert_eq!(close_code(&close), 1002, "frame {bad:02x?}");
    }
    // A new data frame inside an open fragmented message.
    let mut ws = client(&s).await;
    ws.write_all(&frame(0x01, b"part")).await.unwrap();
    ws.write_all(&frame(0x81, b"new")).await.unwrap();
    let close = read_until(&mut ws, 0x8).await.expect("a close frame");
    assert_eq!(close_code(&close), 1002);
}

/// A connection reset by the client (no close frame, an RST) is counted as
/// lost, not as a protocol error of the client.
#[actix_rt::test]
async fn a_reset_connection_is_counted_as_lost() {
    let s = TestServer::start().await;
    s.instance("p").await;
    let ws = client(&s).await;
    s.wait_clients("p", Some(1)).await;
    let ws = ws.into_std().unwrap();
    socket2::SockRef::from(&ws)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(ws);
    s.wait_clients("p", Some(0)).await;
    let lost = r#"eventgate_client_disconnects_total{reason="connection_lost"}"#;
    assert_eq!(counted(&s, lost).await, Some(1.0));
    let protocol = r#"eventgate_client_disconnects_total{reason="protocol_error"}"#;
    assert_eq!(s.metric(protocol).await, 0.0);
}

/// A client that ends its side with no close frame (a bare EOF) lost its
/// connection (RFC 6455's 1006); one that closes with a close frame ended it
/// normally.
#[actix_rt::test]
async fn an_eof_without_a_close_frame_is_counted_as_lost() {
    let s = TestServer::start().await;
    s.instance("p").await;
    let normal = r#"eventgate_client_disconnects_total{reason="normal"}"#;
    let lost = r#"eventgate_client_disconnects_total{reason="connection_lost"}"#;
    let mut ws = client(&s).await;
    s.wait_clients("p", Some(1)).await;
    ws.write_all(&frame(0x88, &[0x03, 0xE8])).await.unwrap();
    assert_eq!(close_code(&read_until(&mut ws, 0x8).await.unwrap()), 1000);
    assert_eq!(counted(&s, normal).await, Some(1.0));
    s.wait_clients("p", Some(0)).await;

    let mut ws = client(&s).await;
    s.wait_clients("p", Some(1)).await;
    ws.shutdown().await.unwrap();
    assert_eq!(counted(&s, lost).await, Some(1.0));
    assert_eq!(
        s.metric(normal).await,
        1.0,
        "the bare EOF is not a normal close"
    );
}

#[actix_rt::test]
async fn pings_are_answered_even_between_fragments() {
    let s = TestServer::start().await;
    s.instance("p").await;
    let mut ws = client(&s).await;
    ws.write_all(&frame(0x89, b"hello")).await.unwrap();
    assert_eq!(
        read_until(&mut ws, 0xA).await.as_deref(),
        Some(&b"hello"[..])
    );
    ws.write_all(&frame(0x01, b"fir")).await.unwrap();
    ws.write_all(&frame(0x89, b"mid")).await.unwrap();
    assert_eq!(read_until(&mut ws, 0xA).await.as_deref(), Some(&b"mid"[..]));
    ws.write_all(&frame(0x80, b"st")).await.unwrap();
    // The close handshake: a valid code is echoed, then the server closes.
    ws.write_all(&frame(0x88, &[0x0B, 0xB8, b'o', b'k']))
        .await
        .unwrap();
    let close = read_until(&mut ws, 0x8).await.expect("a close frame");
    assert_eq!(close_code(&close), 3000);
    let mut rest = [0u8; 64];
    let eof = tokio::time::timeout(Duration::from_secs(5), ws.read(&mut rest)).await;
    assert!(
        matches!(eof, Ok(Ok(0)) | Ok(Err(_))),
        "the server closed the connection"
    );
}

/// The value of a counter `series` once it is above zero (`None` if it
/// stays at zero for 5 s).
async fn counted(s: &TestServer, series: &str) -> Option<f64> {
    common::eventually(Duration::from_secs(5), async || {
        let seen = s.metric(series).await;
        (seen > 0.0).then_some(seen)
    })
    .await
}

/// Sends `request` on a new connection and reads until the server closes it.
async fn exchange(s: &TestServer, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(s.addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut all = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut all))
        .await
        .expect("the server closes the connection")
        .unwrap();
    String::from_utf8_lossy(&all).into_owned()
}

fn upgrade_request(path: &str, extra: &str) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
    .into_bytes()
}

#[actix_rt::test]
async fn frames_sent_with_the_handshake_are_read() {
    let s = TestServer::start().await;
    s.instance("p").await;
    let mut stream = TcpStream::connect(s.addr).await.unwrap();
    let mut request = upgrade_request(&format!("/ws/p?token={ACCOUNT}"), "");
    request.extend_from_slice(&frame(0x89, b"early"));
    stream.write_all(&request).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"));
    assert_eq!(
        read_until(&mut stream, 0xA).await.as_deref(),
        Some(&b"early"[..])
    );
}

#[actix_rt::test]
async fn refused_upgrades_are_answered_then_closed() {
    let s = TestServer::start().await;
    s.instance("p").await;
    let reply = exchange(
        &s,
        &upgrade_request(&format!("/ws/nope?token={ACCOUNT}"), ""),
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 404"), "{reply}");
    assert!(reply.contains("connection: close"), "{reply}");
    assert!(reply.contains("x-ratelimit-limit"), "{reply}");
    assert!(
        reply.ends_with(r#"{"success":false,"error":{"message":"Instance not found"}}"#),
        "{reply}"
    );
    let reply = exchange(&s, &upgrade_request("/ws/p", "")).await;
    assert!(reply.starts_with("HTTP/1.1 401"), "{reply}");
}

#[actix_rt::test]
async fn a_handshake_with_a_body_is_not_upgraded() {
    let s = TestServer::start().await;
    s.instance("p").await;
    let path = format!("/ws/p?token={ACCOUNT}");
    // A chunked body keeps the request on the HTTP path: not an upgrade.
    let mut stream = TcpStream::connect(s.addr).await.unwrap();
    let request = upgrade_request(&path, "Transfer-Encoding: chunked\r\n");
    stream.write_all(&request).await.unwrap();
    stream.write_all(b"0\r\n\r\n").await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let reply = String::from_utf8_lossy(&buf[..n]);
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    assert!(reply.contains("WebSocket upgrade expected"), "{reply}");
    // An API request that asks for an upgrade is answered without its body
    // (an error, never an acknowledged write) and its connection closed.
    let body = r#"{"event":"call.update","data":{}}"#;
    let request = format!(
        "POST /api/events/publish/p HTTP/1.1\r\nHost: x\r\ntoken: {ACCOUNT}\r\n\
         Upgrade: websocket\r\nConnection: Upgrade\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let reply = exchange(&s, request.as_bytes()).await;
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    assert!(reply.contains("Invalid request body"), "{reply}");
}

#[actix_rt::test]
async fn a_closing_server_ends_the_connection() {
    let s = TestServer::start().await;
    s.instance("p").await;
    let mut ws = client(&s).await;
    s.wait_clients("p", Some(1)).await;
    let r = s
        .call("DELETE", "/api/instance/delete/p", Some(ACCOUNT), None)
        .await;
    assert_eq!(r.status, 200);
    let close = read_until(&mut ws, 0x8).await.expect("a close frame");
    assert_eq!(close_code(&close), 4004);
    // The server shuts its side down without waiting for the client's close frame.
    let mut rest = [0u8; 64];
    let eof = tokio::time::timeout(Duration::from_secs(5), ws.read(&mut rest)).await;
    assert!(matches!(eof, Ok(Ok(0))), "{eof:?}");
}

#[actix_rt::test]
async fn a_close_reason_that_is_not_utf8_closes_with_1007() {
    let s = TestServer::start().await;
    s.instance("p").await;
    // Whole, split byte by byte, and behind a valid ping in the same write.
    let bad = frame(0x88, &[0x03, 0xE8, b'o', 0xFF, 0xFE]);
    let mut behind_ping = frame(0x89, b"hi");
    behind_ping.extend_from_slice(&bad);
    for (how, bytes) in [("whole", bad.clone()), ("behind a ping", behind_ping)] {
        let mut ws = client(&s).await;
        ws.write_all(&bytes).await.unwrap();
        let close = read_until(&mut ws, 0x8).await.expect("a close frame");
        assert_eq!(close_code(&close), 1007, "{how}");
    }
    let mut ws = client(&s).await;
    for b in &bad {
        ws.write_all(std::slice::from_ref(b)).await.unwrap();
        ws.flush().await.unwrap();
    }
    let close = read_until(&mut ws, 0x8).await.expect("a close frame");
    assert_eq!(close_code(&close), 1007, "byte by byte");
    // A valid UTF-8 reason is still the normal close handshake.
    let mut ws = client(&s).await;
    ws.write_all(&frame(0x88, &[0x03, 0xE8, 0xC3, 0xA9]))
        .await
        .unwrap();
    let close = read_until(&mut ws, 0x8).await.expect("a close frame");
    assert_eq!(close_code(&close), 1000);
}
