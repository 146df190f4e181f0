//! The `stalled` mode: fast clients plus one client that never reads (a raw
//! socket with a small receive buffer, handshaken by hand), at a fixed rate:
//! whether and when the server closes it, what the fast clients lose and how
//! their tail moves, and the server's RSS before, during and after. Owns the
//! stalled client and its watcher; the load itself is `load`'s.

use crate::clients::tcp_connect;
use crate::load::{load_rows, run_load, DuringHook, LoadPlan};
use crate::publish::setup_instances;
use crate::report::{header, Report};
use crate::system::{check_fds, proc_rss_kib, tcp_entry, tcp_state_name, Server};
use crate::target::{now_unix_nanos, Endpoint};
use crate::{BoxResult, Mode, Opts};
use base64::Engine as _;
use serde_json::{json, Value};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Opens a raw TCP socket with a small receive buffer, completes the WebSocket
/// handshake by hand and returns the socket plus bytes read past the headers.
async fn stalled_connect(
    ep: &Endpoint,
    inst: &str,
    rcvbuf: u32,
) -> BoxResult<(TcpStream, Vec<u8>)> {
    let mut s = tcp_connect(
        Some(Ipv4Addr::new(127, 0, 0, 250).into()),
        ep.addr,
        Some(rcvbuf),
    )
    .await?;
    // 16 bytes, base64 = 24 chars; uniqueness is all that matters here.
    let key = base64::engine::general_purpose::STANDARD.encode(now_unix_nanos().to_le_bytes());
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n",
        ep.ws_path(inst),
        ep.host
    );
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| format!("stalled: write handshake: {e}"))?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 512];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let n = tokio::time::timeout_at(deadline, s.read(&mut chunk))
            .await
            .map_err(|_| "stalled: handshake reply timed out".to_string())?
            .map_err(|e| format!("stalled: read handshake: {e}"))?;
        if n == 0 {
            return Err("stalled: server closed during handshake".into());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..pos]).to_string();
            if !head.starts_with("HTTP/1.1 101") {
                return Err(format!(
                    "stalled: handshake refused: {}",
                    head.lines().next().unwrap_or("")
                ));
            }
            let rest = buf[pos + 4..].to_vec();
            return Ok((s, rest));
        }
        if buf.len() > 16 * 1024 {
            return Err("stalled: handshake reply too long".into());
        }
    }
}

/// End of publishing plus drain, given the whole watch span and the passive wait.
fn opts_secs_drain(watch_for: f64, wait: f64) -> f64 {
    watch_for - wait
}

#[derive(Default)]
struct FrameScan {
    buf: Vec<u8>,
    frames: u64,
    close: Option<String>,
}

impl FrameScan {
    /// Scans the next bytes read from the socket.
    fn feed(&mut self, data: &[u8]) {
        if self.close.is_some() {
            return;
        }
        self.buf.extend_from_slice(data);
        let mut pos = 0;
        loop {
            let b = &self.buf[pos..];
            if b.len() < 2 {
                break;
            }
            let opcode = b[0] & 0x0f;
            let masked = b[1] & 0x80 != 0;
            let (len, hl) = match b[1] & 0x7f {
                126 if b.len() >= 4 => (u64::from(u16::from_be_bytes([b[2], b[3]])), 4),
                127 if b.len() >= 10 => {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(&b[2..10]);
                    (u64::from_be_bytes(a), 10)
                }
                126 | 127 => break,
                n => (u64::from(n), 2),
            };
            let hl = hl + if masked { 4 } else { 0 };
            let total = hl as u64 + len;
            if (b.len() as u64) < total {
                break;
            }
            if opcode == 8 {
                let p = &b[hl..total as usize];
                self.close = Some(if p.len() >= 2 {
                    format!(
                        "close frame {} {}",
                        u16::from_be_bytes([p[0], p[1]]),
                        String::from_utf8_lossy(&p[2..])
                    )
                } else {
                    "close frame (no code)".into()
                });
            }
            self.frames += 1;
            pos += total as usize;
            if self.close.is_some() {
                break;
            }
        }
        self.buf.drain(..pos);
    }
}

/// `stalled`: a warm-up without the stalled client, then the load with it.
pub(crate) async fn mode_stalled(
    opts: &Opts,
    ep: Arc<Endpoint>,
    srv: &Server,
) -> BoxResult<Report> {
    let plan = LoadPlan {
        clients: opts.clients.unwrap_or(10).max(1),
        instances: 1,
        rate: Some(opts.rate.unwrap_or(5000.0)),
    };
    check_fds(plan.clients + opts.publishers + 16)?;
    setup_instances(&ep, 1).await?;
    let rss_cold = srv.rss();
    let warmup_secs = opts.warmup_secs.unwrap_or(opts.secs);
    if warmup_secs > 0.0 {
        // A fresh server grows on first use (threads' allocator arenas,
        // buffers reaching their working size): that is not the stalled
        // client's doing, so "before" is taken after the same load without it.
        let warm = Opts {
            secs: warmup_secs,
            ..opts.clone()
        };
        run_load(&warm, &ep, srv, &plan, None).await?;
    }
    let rss0 = srv.rss();
    let (stalled, early) =
        stalled_connect(&ep, &Endpoint::instance_name(0), opts.stall_rcvbuf).await?;
    let local = stalled
        .local_addr()
        .map_err(|e| format!("stalled local addr: {e}"))?;
    // Watch the server side of the stalled connection and the server's RSS
    // from publish start until it is closed or the passive wait is over.
    let pid = srv.pid.clone();
    let server_addr = ep.addr;
    let wait = opts.stall_wait_secs;
    let watch_for = opts.secs + opts.drain_secs + wait;
    let watcher: DuringHook = Box::new(move |t0: Instant| {
        tokio::spawn(async move {
            let mut peak_rss: Option<u64> = None;
            let mut peak_tx = 0u64;
            let mut tx_series: Vec<(f64, u64)> = Vec::new();
            let mut closed_at: Option<f64> = None;
            let mut close_state = String::new();
            let mut last_state;
            loop {
                // Blocking system calls: off the thread of the clients being measured.
                let pid = pid.clone();
                let (rss, entry) = tokio::task::spawn_blocking(move || {
                    let rss = pid.as_deref().and_then(|p| proc_rss_kib(p).ok());
                    (rss, tcp_entry(server_addr, local))
                })
                .await
                .unwrap_or((None, None));
                if let Some(v) = rss {
                    peak_rss = Some(peak_rss.map_or(v, |x| x.max(v)));
                }
                match entry {
                    Some((st, tx, _)) => {
                        peak_tx = peak_tx.max(tx);
                        tx_series.push((t0.elapsed().as_secs_f64(), tx));
                        last_state = tcp_state_name(st).to_string();
                        if st != 1 && closed_at.is_none() {
                            closed_at = Some(t0.elapsed().as_secs_f64());
                            close_state = last_state.clone();
                        }
                    }
                    None => {
                        last_state = "gone".into();
                        if closed_at.is_none() {
                            closed_at = Some(t0.elapsed().as_secs_f64());
                            close_state = "gone (reset)".into();
                        }
                    }
                }
                let el = t0.elapsed().as_secs_f64();
                if el >= watch_for
                    || closed_at
                        .is_some_and(|c| el > c + 0.5 && el > opts_secs_drain(watch_for, wait))
                {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            json!({
                "peak_rss_kib": peak_rss,
                "server_side_peak_tx_queue": peak_tx,
                // first time the server's kernel send queue reached 90 % of its peak
                "server_send_queue_full_at_secs": tx_series
                    .iter()
                    .find(|(_, tx)| peak_tx > 0 && *tx * 10 >= peak_tx * 9)
                    .map(|(t, _)| *t),
                "server_closed_at_secs": closed_at,
                "server_side_state_at_close": close_state,
                "server_side_last_state": last_state,
            })
        })
    });
    let (lr, watch_value) = run_load(opts, &ep, srv, &plan, Some(watcher)).await?;
    let rss_end = srv.rss();
    // Now read the stalled socket to EOF (or error) within stall_wait_secs.
    let mut scan = FrameScan::default();
    scan.feed(&early);
    let mut s = stalled;
    let mut drained = early.len() as u64;
    let mut buf = vec![0u8; 64 * 1024];
    let t_read = Instant::now();
    let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(wait);
    let outcome = loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => break "still open (no EOF within wait)".to_string(),
            Ok(Ok(0)) => break "EOF".to_string(),
            Ok(Ok(n)) => {
                drained += n as u64;
                scan.feed(&buf[..n]);
            }
            Ok(Err(e)) => break format!("error: {e}"),
        }
    };
    let read_secs = t_read.elapsed().as_secs_f64();
    drop(s);
    tokio::time::sleep(Duration::from_secs_f64(opts.settle_secs)).await;
    let rss_after = srv.rss();
    let mut r = Report::new();
    header(&mut r, opts, Mode::Stalled);
    load_rows(&mut r, opts, &plan, &lr);
    let wv = watch_value.unwrap_or(Value::Null);
    let closed_at = wv.get("server_closed_at_secs").and_then(Value::as_f64);
    r.text(
        "stalled_closed_by_server",
        if closed_at.is_some() { "yes" } else { "no" },
    );
    r.opt_num("stalled_server_closed_at_secs", closed_at, 2);
    r.text(
        "stalled_server_side_state_at_close",
        wv.get("server_side_state_at_close")
            .and_then(Value::as_str)
            .filter(|v| !v.is_empty())
            .unwrap_or("-"),
    );
    r.int(
        "stalled_server_side_peak_tx_queue",
        wv.get("server_side_peak_tx_queue")
            .and_then(Value::as_u64)
            .unwrap_or(0),
    );
    let full_at = wv
        .get("server_send_queue_full_at_secs")
        .and_then(Value::as_f64);
    r.opt_num("stalled_send_queue_full_at_secs", full_at, 2);
    r.opt_num(
        "stalled_closed_after_full_secs",
        closed_at.zip(full_at).map(|(c, f)| c - f),
        2,
    );
    r.text("stalled_read_outcome", &outcome);
    r.num("stalled_read_secs", read_secs, 2);
    r.int("stalled_bytes_drained", drained);
    r.int("stalled_frames_seen", scan.frames);
    r.text(
        "stalled_close_frame",
        scan.close.as_deref().unwrap_or("none"),
    );
    r.num("warmup_secs", warmup_secs, 1);
    r.opt_num(
        "server_rss_cold_mib",
        rss_cold.map(|v| v as f64 / 1024.0),
        1,
    );
    r.opt_num("server_rss_before_mib", rss0.map(|v| v as f64 / 1024.0), 1);
    r.opt_num(
        "server_rss_peak_during_mib",
        wv.get("peak_rss_kib")
            .and_then(Value::as_u64)
            .map(|v| v as f64 / 1024.0),
        1,
    );
    r.opt_num("server_rss_end_mib", rss_end.map(|v| v as f64 / 1024.0), 1);
    r.num("settle_secs", opts.settle_secs, 1);
    r.opt_num(
        "server_rss_after_mib",
        rss_after.map(|v| v as f64 / 1024.0),
        1,
    );
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::FrameScan;

    #[test]
    fn frames_are_counted_across_reads_until_the_close_frame() {
        let mut bytes = vec![0x81, 3, b'a', b'b', b'c'];
        bytes.extend_from_slice(&[0x81, 126, 0, 200]);
        bytes.extend_from_slice(&[b'x'; 200]);
        bytes.extend_from_slice(&[0x88, 4, 0x0f, 0xa8, b'o', b'k']);
        let mut scan = FrameScan::default();
        for chunk in bytes.chunks(7) {
            scan.feed(chunk);
        }
        assert_eq!(scan.frames, 3);
        assert_eq!(scan.close.as_deref(), Some("close frame 4008 ok"));
    }
}
