//! WebSocket protocol rules on the real `/ws/:instance` path, with raw
//! frames: bad opcodes and reserved bits (1002), invalid close codes (1002),
//! ping answered with pong (also between fragments), and the close handshake.
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
