//! The floor target (`eventgate-bench floor`): the least work a fan-out
//! server can do, served with blocking std sockets and threads, to show what
//! this machine and this tool allow at all. Owns that server; it is not a
//! gateway (a client that stops reading blocks it).

use crate::BoxResult;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

/// Clients of the floor server, by instance name.
type FloorClients = Arc<std::sync::Mutex<HashMap<String, Vec<std::net::TcpStream>>>>;

/// Serves the peers' protocol (`GET /ws/{instance}`, `POST /publish/{instance}`,
/// no auth) with nothing but the system calls fan-out cannot avoid: each
/// publish becomes one prebuilt text frame, written with one blocking `write`
/// per client, in a loop on the publisher connection's thread. No actor, no
/// queue, no timer, no read of what clients send. It is the floor the load
/// tool can measure on this machine, not a gateway: a client that stops
/// reading blocks it (use it for `fanout` and `latency`, not `stalled`).
pub(crate) fn serve_floor(addr: SocketAddr) -> BoxResult<()> {
    let listener = std::net::TcpListener::bind(addr).map_err(|e| format!("bind {addr}: {e}"))?;
    let clients = FloorClients::default();
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let _ = conn.set_nodelay(true);
        let mut reader = std::io::BufReader::new(conn);
        let Some((path, headers)) = floor_read_head(&mut reader) else {
            continue;
        };
        if let Some(inst) = path.strip_prefix("/ws/") {
            let Some(key) = headers.get("sec-websocket-key") else {
                continue;
            };
            let accept =
                tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
            let mut conn = reader.into_inner();
            let reply = format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
            );
            if std::io::Write::write_all(&mut conn, reply.as_bytes()).is_ok() {
                if let Ok(mut map) = clients.lock() {
                    map.entry(inst.to_string()).or_default().push(conn);
                }
            }
        } else if path.starts_with("/publish/") {
            let clients = clients.clone();
            std::thread::spawn(move || floor_publisher(reader, path, headers, clients));
        }
    }
    Ok(())
}

/// Reads one request head: the path and the lower-cased headers.
fn floor_read_head(
    reader: &mut std::io::BufReader<std::net::TcpStream>,
) -> Option<(String, HashMap<String, String>)> {
    use std::io::BufRead;
    let mut line = String::new();
    if reader.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let path = line.split_whitespace().nth(1)?.to_string();
    let mut headers = HashMap::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let l = line.trim_end();
        if l.is_empty() {
            return Some((path, headers));
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
}

/// One keep-alive publisher connection: reply 202, then write the event's
/// frame to every client of the instance.
fn floor_publisher(
    mut reader: std::io::BufReader<std::net::TcpStream>,
    mut path: String,
    mut headers: HashMap<String, String>,
    clients: FloorClients,
) {
    use std::io::{Read, Write};
    loop {
        let len: usize = headers
            .get("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0u8; len];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let reply = b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n";
        if reader.get_mut().write_all(reply).is_err() {
            return;
        }
        let mut frame = Vec::with_capacity(len + 10);
        frame.push(0x81);
        match u16::try_from(len) {
            Ok(n) if n < 126 => frame.push(n as u8),
            Ok(n) => {
                frame.push(126);
                frame.extend_from_slice(&n.to_be_bytes());
            }
            Err(_) => {
                frame.push(127);
                frame.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        frame.extend_from_slice(&body);
        let inst = path.trim_start_matches("/publish/");
        if let Ok(mut map) = clients.lock() {
            if let Some(list) = map.get_mut(inst) {
                list.retain_mut(|c| c.write_all(&frame).is_ok());
            }
        }
        match floor_read_head(&mut reader) {
            Some((p, h)) => (path, headers) = (p, h),
            None => return,
        }
    }
}
