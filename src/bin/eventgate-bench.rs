//! `eventgate-bench`: the load benchmark for WebSocket fan-out gateways.
//!
//! This file owns the whole tool (it is meant to live verbatim as
//! `src/bin/eventgate-bench.rs` of another crate): command line, the
//! per-target protocol adapters (eventgate, gorilla-hub, node-ws), the
//! hand-written keep-alive HTTP/1.1 publisher, the WebSocket client tasks and
//! their loss/duplicate/order/latency accounting, the hand-made "stalled"
//! WebSocket client, the `/proc` samplers for server CPU and RSS, and the
//! human and JSON reports.
//!
//! Modes: `fanout` (max rate or `--rate`), `latency` (fixed rate), `idle`
//! (many idle connections, RSS per connection) and `stalled` (fast clients
//! plus one client that never reads); `floor` serves the floor target, the
//! least work a fan-out server can do, to measure what the machine and this
//! tool allow at all. Traffic only ever goes to 127.0.0.0/8.

use clap::{Parser, Subcommand, ValueEnum};
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

const HELP_HINT: &str = "\
Targets:
  gorilla / node: GET /ws/{instance}, POST /publish/{instance}, no auth.
  floor:          the same protocol, served by `eventgate-bench floor --url URL`:
                  one blocking write per client per event and nothing else, the
                  least any gateway can do (fanout/latency only).
  eventgate:      needs --token (the server's EVENTGATE_ACCOUNT_TOKEN); instances
                  bench-<i> are created with POST /api/instance/new.
  For eventgate, start the server with the rate limits raised, e.g.
    EVENTGATE_RATE_LIMIT_PER_MINUTE=100000000 \\
    EVENTGATE_RATE_LIMIT_INSTANCE_NEW_PER_MINUTE=100000000
  otherwise /ws upgrades and instance creation are throttled (429).

Published data: {\"seq\":N,\"p\":PUBLISHER,\"ts\":UNIX_NANOS,\"pad\":\"xxx..\"},
padded so the request body is about --event-bytes. seq is per instance; each
publisher waits for the reply before its next request, so order is checked
per (client, publisher). Loss = events acknowledged (2xx) but not received.

Output: a human table on stdout; with --json the table goes to stderr and
stdout gets exactly one JSON line.

Examples:
  eventgate-bench fanout  --target gorilla --url http://127.0.0.1:8081 --clients 1000 --instances 1 --server-pid PID
  eventgate-bench latency --target node --url http://127.0.0.1:8082 --rate 50 --clients 1000 --server-pid PID
  eventgate-bench idle    --target eventgate --token T --url http://127.0.0.1:8080 --clients 19000 --server-pid PID
  eventgate-bench stalled --target gorilla --url http://127.0.0.1:8081 --rate 5000 --server-pid PID";

type BoxResult<T> = Result<T, String>;
type Ws = WebSocketStream<TcpStream>;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Target {
    Eventgate,
    Gorilla,
    Node,
    /// `eventgate-bench floor`: the peers' protocol, one event per frame.
    Floor,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Eventgate => "eventgate",
            Target::Gorilla => "gorilla",
            Target::Node => "node",
            Target::Floor => "floor",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Subcommand)]
enum Mode {
    /// C clients over I instances; publish as fast as possible (or at --rate) for --secs.
    Fanout,
    /// Like fanout at a fixed --rate (default 50 events/s); for latency percentiles.
    Latency,
    /// Open --clients idle connections (default 19000) and report server RSS per connection.
    Idle,
    /// --clients fast clients (default 10) plus one client that never reads, at --rate (default 5000).
    Stalled,
    /// Serve on --url as the floor target: the least work a fan-out server
    /// can do (see `serve_floor`); runs until killed.
    Floor,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Fanout => "fanout",
            Mode::Latency => "latency",
            Mode::Idle => "idle",
            Mode::Stalled => "stalled",
            Mode::Floor => "floor",
        }
    }
}

#[derive(Parser, Debug)]
#[command(
    name = "eventgate-bench",
    version,
    about = "Load benchmark for eventgate and reference WebSocket fan-out gateways (loopback only)",
    after_help = HELP_HINT
)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
    #[command(flatten)]
    opts: Opts,
}

#[derive(clap::Args, Debug, Clone)]
struct Opts {
    /// Which server protocol to speak.
    #[arg(long, global = true, value_enum, default_value = "gorilla")]
    target: Target,
    /// Base URL of the server; must be on 127.0.0.0/8.
    #[arg(long, global = true, default_value = "http://127.0.0.1:8081")]
    url: String,
    /// eventgate account token (the server's EVENTGATE_ACCOUNT_TOKEN).
    #[arg(long, global = true)]
    token: Option<String>,
    /// WebSocket clients [fanout/latency: 1000, idle: 19000, stalled: 10 fast ones].
    #[arg(long, global = true)]
    clients: Option<usize>,
    /// Instances the clients are spread over (round robin) [1].
    #[arg(long, global = true)]
    instances: Option<usize>,
    /// Publishing duration in seconds.
    #[arg(long, global = true, default_value_t = 10.0)]
    secs: f64,
    /// Concurrent keep-alive publisher connections.
    #[arg(long, global = true, default_value_t = 4)]
    publishers: usize,
    /// Total publish rate in events/s [fanout: unlimited, latency: 50, stalled: 5000].
    #[arg(long, global = true)]
    rate: Option<f64>,
    /// Approximate size of the published request body in bytes.
    #[arg(long, global = true, default_value_t = 200)]
    event_bytes: usize,
    /// Seconds to wait after publishing for deliveries still in flight.
    #[arg(long, global = true, default_value_t = 2.0)]
    drain_secs: f64,
    /// Server process id: report its CPU seconds and RSS from /proc.
    #[arg(long, global = true)]
    server_pid: Option<u32>,
    /// Tokio worker threads of the bench (the server shares the cores).
    #[arg(long, global = true, default_value_t = 1)]
    threads: usize,
    /// Print one JSON line on stdout (the human table goes to stderr).
    #[arg(long, global = true)]
    json: bool,
    /// Free-form label copied into the report (e.g. the scenario name).
    #[arg(long, global = true)]
    label: Option<String>,
    /// Clients per source address; sources are 127.0.0.2, 127.0.0.3, ...
    #[arg(long, global = true, default_value_t = 1000)]
    clients_per_addr: usize,
    /// WebSocket handshakes in flight at once while connecting.
    #[arg(long, global = true, default_value_t = 200)]
    connect_concurrency: usize,
    /// Seconds to wait before connecting clients gives up.
    #[arg(long, global = true, default_value_t = 120.0)]
    connect_timeout_secs: f64,
    /// idle: seconds to hold the connections before sampling RSS.
    #[arg(long, global = true, default_value_t = 3.0)]
    hold_secs: f64,
    /// stalled: SO_RCVBUF of the stalled socket in bytes.
    #[arg(long, global = true, default_value_t = 4096)]
    stall_rcvbuf: u32,
    /// Where clients connect, comma-separated (default: --url): clients are
    /// spread over these round-robin, e.g. two nodes of one cluster while
    /// --url (the publisher's) names one of them.
    #[arg(long, global = true)]
    client_urls: Option<String>,
    /// stalled: seconds to wait (after the drain) for the server to close the stalled socket,
    /// and again for reading it to EOF.
    #[arg(long, global = true, default_value_t = 10.0)]
    stall_wait_secs: f64,
    /// stalled: seconds of the same load without the stalled client first,
    /// so that the RSS compared before and after is the warm server's [--secs].
    #[arg(long, global = true)]
    warmup_secs: Option<f64>,
    /// stalled, idle: seconds after every client is gone before the RSS
    /// "after" is read (a server may give freed memory back periodically).
    #[arg(long, global = true, default_value_t = 6.0)]
    settle_secs: f64,
}

// ---------------------------------------------------------------------------
// Endpoint: how to talk to each target
// ---------------------------------------------------------------------------

#[derive(Debug)]
struct Endpoint {
    target: Target,
    addr: SocketAddr,
    host: String,
    token: Option<String>,
    /// Where clients connect: (address, host header), round-robin by client.
    client_hosts: Vec<(SocketAddr, String)>,
}

/// Parses `http://127.x.y.z:port[/…]` into an address and a host header.
fn parse_loopback_url(url: &str) -> BoxResult<(SocketAddr, String)> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("URLs must start with http:// (got {url})"))?;
    let hostport = rest.split('/').next().unwrap_or(rest);
    let addr: SocketAddr = hostport
        .parse()
        .map_err(|e| format!("URL host must be IPv4:port, got {hostport:?}: {e}"))?;
    match addr.ip() {
        IpAddr::V4(v4) if v4.octets()[0] == 127 => Ok((addr, hostport.to_string())),
        other => Err(format!("refusing non-loopback target {other}")),
    }
}

impl Endpoint {
    fn parse(opts: &Opts) -> BoxResult<Endpoint> {
        let (addr, hostport) = parse_loopback_url(&opts.url)?;
        if opts.target == Target::Eventgate && opts.token.as_deref().unwrap_or("").is_empty() {
            return Err("--target eventgate needs --token <account token>".into());
        }
        let client_hosts = match &opts.client_urls {
            Some(list) => list
                .split(',')
                .map(str::trim)
                .filter(|u| !u.is_empty())
                .map(parse_loopback_url)
                .collect::<BoxResult<Vec<_>>>()?,
            None => vec![(addr, hostport.clone())],
        };
        if client_hosts.is_empty() {
            return Err("--client-urls names no URL".into());
        }
        Ok(Endpoint {
            target: opts.target,
            addr,
            host: hostport,
            token: opts.token.clone(),
            client_hosts,
        })
    }

    fn instance_name(i: usize) -> String {
        format!("bench-{i}")
    }

    fn ws_path(&self, inst: &str) -> String {
        match (&self.target, &self.token) {
            (Target::Eventgate, Some(t)) => format!("/ws/{inst}?token={}", pct_encode(t)),
            _ => format!("/ws/{inst}"),
        }
    }

    fn publish_path(&self, inst: &str) -> String {
        match self.target {
            Target::Eventgate => format!("/api/events/publish/{inst}"),
            _ => format!("/publish/{inst}"),
        }
    }

    fn auth_headers(&self) -> Vec<(String, String)> {
        match (&self.target, &self.token) {
            (Target::Eventgate, Some(t)) => vec![("token".into(), t.clone())],
            _ => Vec::new(),
        }
    }

    /// Builds one publish body of about `size` bytes carrying seq/p/ts.
    fn publish_body(&self, seq: u64, publisher: usize, ts: u128, size: usize) -> Vec<u8> {
        let (pre, post) = match self.target {
            Target::Eventgate => ("{\"event\":\"message.exchange\",\"data\":", "}"),
            _ => ("", ""),
        };
        let head = format!("{pre}{{\"seq\":{seq},\"p\":{publisher},\"ts\":{ts},\"pad\":\"");
        let tail = format!("\"}}{post}");
        let pad = size.saturating_sub(head.len() + tail.len());
        let mut body = Vec::with_capacity(head.len() + pad + tail.len());
        body.extend_from_slice(head.as_bytes());
        body.resize(body.len() + pad, b'x');
        body.extend_from_slice(tail.as_bytes());
        body
    }
}

fn pct_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

fn now_unix_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------
// Minimal keep-alive HTTP/1.1 client
// ---------------------------------------------------------------------------

struct HttpConn {
    addr: SocketAddr,
    host: String,
    conn: Option<BufReader<TcpStream>>,
}

struct HttpReply {
    status: u16,
    body: Vec<u8>,
}

impl HttpConn {
    fn new(ep: &Endpoint) -> HttpConn {
        HttpConn {
            addr: ep.addr,
            host: ep.host.clone(),
            conn: None,
        }
    }

    async fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(String, String)],
        body: &[u8],
    ) -> BoxResult<HttpReply> {
        let mut req = Vec::with_capacity(256 + body.len());
        let _ = write!(
            ByteWriter(&mut req),
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
            self.host,
            body.len()
        );
        for (k, v) in headers {
            let _ = write!(ByteWriter(&mut req), "{k}: {v}\r\n");
        }
        req.extend_from_slice(b"\r\n");
        req.extend_from_slice(body);
        // One retry on a fresh connection if a reused one was closed by the server.
        for attempt in 0..2 {
            let reused = self.conn.is_some();
            if self.conn.is_none() {
                let s =
                    tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(self.addr))
                        .await
                        .map_err(|_| format!("connect to {} timed out", self.addr))?
                        .map_err(|e| format!("connect to {}: {e}", self.addr))?;
                let _ = s.set_nodelay(true);
                self.conn = Some(BufReader::with_capacity(16 * 1024, s));
            }
            let Some(conn) = self.conn.as_mut() else {
                return Err("no connection".into());
            };
            let res = tokio::time::timeout(Duration::from_secs(30), exchange(conn, &req)).await;
            match res {
                Ok(Ok((reply, keep))) => {
                    if !keep {
                        self.conn = None;
                    }
                    return Ok(reply);
                }
                Ok(Err((e, nothing_read))) => {
                    self.conn = None;
                    if !(reused && nothing_read && attempt == 0) {
                        return Err(e);
                    }
                }
                Err(_) => {
                    self.conn = None;
                    return Err(format!("{method} {path}: no reply within 30 s"));
                }
            }
        }
        Err(format!("{method} {path}: connection closed"))
    }
}

struct ByteWriter<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for ByteWriter<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

/// Writes one request and reads its reply. Err carries whether no reply byte was read.
async fn exchange(
    conn: &mut BufReader<TcpStream>,
    req: &[u8],
) -> Result<(HttpReply, bool), (String, bool)> {
    conn.get_mut()
        .write_all(req)
        .await
        .map_err(|e| (format!("write: {e}"), true))?;
    let mut line = Vec::with_capacity(128);
    let n = conn
        .read_until(b'\n', &mut line)
        .await
        .map_err(|e| (format!("read status: {e}"), true))?;
    if n == 0 {
        return Err(("connection closed before the reply".into(), true));
    }
    let status_line = String::from_utf8_lossy(&line).trim_end().to_string();
    let mut parts = status_line.split_whitespace();
    let version = parts.next().unwrap_or("");
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| (format!("bad status line {status_line:?}"), false))?;
    let mut keep = version != "HTTP/1.0";
    let mut content_length: Option<usize> = None;
    let mut chunked = false;
    loop {
        line.clear();
        let n = conn
            .read_until(b'\n', &mut line)
            .await
            .map_err(|e| (format!("read header: {e}"), false))?;
        if n == 0 {
            return Err(("connection closed in headers".into(), false));
        }
        let h = String::from_utf8_lossy(&line);
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            let k = k.trim().to_ascii_lowercase();
            let v = v.trim();
            match k.as_str() {
                "content-length" => content_length = v.parse().ok(),
                "transfer-encoding" => chunked = v.to_ascii_lowercase().contains("chunked"),
                "connection" => {
                    let v = v.to_ascii_lowercase();
                    if v.contains("close") {
                        keep = false;
                    } else if v.contains("keep-alive") {
                        keep = true;
                    }
                }
                _ => {}
            }
        }
    }
    let mut body = Vec::new();
    if status == 204 || status == 304 || (100..200).contains(&status) {
        // no body
    } else if chunked {
        loop {
            line.clear();
            conn.read_until(b'\n', &mut line)
                .await
                .map_err(|e| (format!("read chunk size: {e}"), false))?;
            let s = String::from_utf8_lossy(&line);
            let size_str = s.trim().split(';').next().unwrap_or("").to_string();
            let size = usize::from_str_radix(&size_str, 16)
                .map_err(|_| (format!("bad chunk size {size_str:?}"), false))?;
            if size == 0 {
                // trailers until the empty line
                loop {
                    line.clear();
                    let n = conn
                        .read_until(b'\n', &mut line)
                        .await
                        .map_err(|e| (format!("read trailer: {e}"), false))?;
                    if n == 0 || line == b"\r\n" || line == b"\n" {
                        break;
                    }
                }
                break;
            }
            let start = body.len();
            body.resize(start + size, 0);
            conn.read_exact(&mut body[start..])
                .await
                .map_err(|e| (format!("read chunk: {e}"), false))?;
            let mut crlf = [0u8; 2];
            conn.read_exact(&mut crlf)
                .await
                .map_err(|e| (format!("read chunk end: {e}"), false))?;
        }
    } else if let Some(len) = content_length {
        body.resize(len, 0);
        conn.read_exact(&mut body)
            .await
            .map_err(|e| (format!("read body: {e}"), false))?;
    } else {
        // Body delimited by close.
        conn.read_to_end(&mut body)
            .await
            .map_err(|e| (format!("read body: {e}"), false))?;
        keep = false;
    }
    Ok((HttpReply { status, body }, keep))
}

// ---------------------------------------------------------------------------
// Latency histogram (log-linear, < 0.4 % bucket error), values in microseconds
// ---------------------------------------------------------------------------

const HIST_BITS: u32 = 8;
const HIST_SUB: u64 = 1 << HIST_BITS;
const HIST_HALF: u64 = HIST_SUB / 2;
const HIST_MAX_EXP: u32 = 44;
const HIST_LEN: usize =
    (HIST_SUB + (HIST_MAX_EXP as u64 - HIST_BITS as u64 + 1) * HIST_HALF) as usize;

#[derive(Default, Clone)]
struct Hist {
    counts: Vec<u64>,
    total: u64,
    max: u64,
    sum: u128,
}

impl Hist {
    fn index(v: u64) -> usize {
        if v < HIST_SUB {
            return v as usize;
        }
        let e = (63 - v.leading_zeros()).min(HIST_MAX_EXP);
        let shift = e + 1 - HIST_BITS;
        let top = (v >> shift).min(HIST_SUB - 1);
        (HIST_SUB + u64::from(e - HIST_BITS) * HIST_HALF + (top - HIST_HALF)) as usize
    }

    /// Representative (middle) value of a bucket.
    fn value_of(idx: usize) -> u64 {
        let idx = idx as u64;
        if idx < HIST_SUB {
            return idx;
        }
        let k = idx - HIST_SUB;
        let e = k / HIST_HALF + u64::from(HIST_BITS);
        let top = k % HIST_HALF + HIST_HALF;
        let shift = e + 1 - u64::from(HIST_BITS);
        (top << shift) + ((1u64 << shift) >> 1)
    }

    fn record(&mut self, v: u64) {
        if self.counts.is_empty() {
            self.counts = vec![0; HIST_LEN];
        }
        let i = Self::index(v).min(HIST_LEN - 1);
        self.counts[i] += 1;
        self.total += 1;
        self.sum += u128::from(v);
        self.max = self.max.max(v);
    }

    fn merge(&mut self, o: &Hist) {
        if o.counts.is_empty() {
            return;
        }
        if self.counts.is_empty() {
            self.counts = vec![0; HIST_LEN];
        }
        for (a, b) in self.counts.iter_mut().zip(o.counts.iter()) {
            *a += *b;
        }
        self.total += o.total;
        self.sum += o.sum;
        self.max = self.max.max(o.max);
    }

    fn quantile(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let want = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= want {
                return Self::value_of(i).min(self.max);
            }
        }
        self.max
    }
}

// ---------------------------------------------------------------------------
// /proc samplers
// ---------------------------------------------------------------------------

fn clk_tck() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|v| *v > 0.0)
        .unwrap_or(100.0)
}

/// utime+stime of a process in seconds.
fn proc_cpu_secs(pid: &str, tck: f64) -> BoxResult<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| format!("read /proc/{pid}/stat: {e}"))?;
    let after = stat
        .rfind(')')
        .map(|i| &stat[i + 1..])
        .ok_or("malformed stat")?;
    let f: Vec<&str> = after.split_whitespace().collect();
    // after ')' : state(0) ppid(1) ... utime is field 14 overall -> index 11 here
    let ut: f64 = f.get(11).and_then(|s| s.parse().ok()).ok_or("no utime")?;
    let st: f64 = f.get(12).and_then(|s| s.parse().ok()).ok_or("no stime")?;
    Ok((ut + st) / tck)
}

/// VmRSS of a process in KiB.
fn proc_rss_kib(pid: &str) -> BoxResult<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("read /proc/{pid}/status: {e}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("no VmRSS in /proc/{pid}/status"))
}

struct Server {
    pid: Option<String>,
    tck: f64,
}

impl Server {
    fn cpu(&self) -> Option<f64> {
        self.pid
            .as_deref()
            .and_then(|p| proc_cpu_secs(p, self.tck).ok())
    }
    fn rss(&self) -> Option<u64> {
        self.pid.as_deref().and_then(|p| proc_rss_kib(p).ok())
    }
}

/// Reads the open-files limit and raises the soft limit to the hard one (via prlimit(1)).
fn raise_nofile() -> (u64, u64) {
    fn read() -> Option<(u64, u64)> {
        let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
        let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
        let f: Vec<&str> = line.split_whitespace().collect();
        let p = |s: &str| {
            if s == "unlimited" {
                Some(u64::MAX)
            } else {
                s.parse().ok()
            }
        };
        Some((p(f.get(3)?)?, p(f.get(4)?)?))
    }
    let Some((soft, hard)) = read() else {
        return (1024, 1024);
    };
    if soft < hard {
        let h = if hard == u64::MAX {
            "unlimited".to_string()
        } else {
            hard.to_string()
        };
        let _ = std::process::Command::new("prlimit")
            .arg(format!("--pid={}", std::process::id()))
            .arg(format!("--nofile={h}:{h}"))
            .output();
    }
    read().unwrap_or((soft, hard))
}

/// Busy CPU seconds of the whole machine (all cores) from /proc/stat.
fn machine_busy_secs(tck: f64) -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let idle = v.get(3)? + v.get(4).copied().unwrap_or(0.0);
    let total: f64 = v.iter().take(8).sum();
    Some((total - idle) / tck)
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------
// WebSocket clients
// ---------------------------------------------------------------------------

#[derive(Deserialize)]
struct Ev {
    seq: u64,
    #[serde(default)]
    p: usize,
    ts: u64,
}

#[derive(Deserialize)]
struct Envelope {
    data: Ev,
}

fn source_addr(i: usize, per_addr: usize) -> IpAddr {
    let k = (i / per_addr.max(1)) as u32;
    // 127.0.0.2 + k, staying inside 127.0.0.0/8
    let base = u32::from(Ipv4Addr::new(127, 0, 0, 2));
    IpAddr::V4(Ipv4Addr::from((base + k) & 0x00ff_ffff | 0x7f00_0000))
}

async fn tcp_connect(
    src: Option<IpAddr>,
    dst: SocketAddr,
    rcvbuf: Option<u32>,
) -> BoxResult<TcpStream> {
    let sock = TcpSocket::new_v4().map_err(|e| format!("socket: {e}"))?;
    if let Some(sz) = rcvbuf {
        sock.set_recv_buffer_size(sz)
            .map_err(|e| format!("SO_RCVBUF: {e}"))?;
    }
    if let Some(ip) = src {
        sock.bind(SocketAddr::new(ip, 0))
            .map_err(|e| format!("bind {ip}: {e}"))?;
    }
    let s = tokio::time::timeout(Duration::from_secs(10), sock.connect(dst))
        .await
        .map_err(|_| format!("connect {dst}: timed out"))?
        .map_err(|e| format!("connect {dst}: {e}"))?;
    let _ = s.set_nodelay(true);
    Ok(s)
}

async fn ws_connect(ep: &Endpoint, idx: usize, src: Option<IpAddr>, inst: &str) -> BoxResult<Ws> {
    let (addr, host) = &ep.client_hosts[idx % ep.client_hosts.len()];
    let stream = tcp_connect(src, *addr, None).await?;
    let url = format!("ws://{}{}", host, ep.ws_path(inst));
    let fut = tokio_tungstenite::client_async(url, stream);
    match tokio::time::timeout(Duration::from_secs(15), fut).await {
        Err(_) => Err(format!("WebSocket handshake /ws/{inst}: timed out")),
        Ok(Err(tokio_tungstenite::tungstenite::Error::Http(resp))) => {
            let body = resp
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            Err(format!(
                "WebSocket handshake /ws/{inst}: HTTP {} {body}",
                resp.status()
            ))
        }
        Ok(Err(e)) => Err(format!("WebSocket handshake /ws/{inst}: {e}")),
        Ok(Ok((ws, _))) => Ok(ws),
    }
}

#[derive(Default)]
struct ClientStats {
    instance: usize,
    connected: bool,
    connect_error: Option<String>,
    frames: u64,
    events: u64,
    unique: u64,
    dups: u64,
    order_violations: u64,
    parse_errors: u64,
    /// Set when the server ended the connection before we stopped.
    closed_by_server: Option<String>,
    last_recv: Option<Instant>,
    hist: Hist,
    seen: Vec<u64>,
    last_by_pub: Vec<u64>,
    /// `(seq, latency µs)` of every event received, kept when the run
    /// tracks events (see [`TRACK_EVENTS_MAX`]).
    arrivals: Option<Vec<(u64, u32)>>,
}

impl ClientStats {
    fn on_event(&mut self, ev: &Ev, now_ns: u128) {
        self.events += 1;
        let word = (ev.seq / 64) as usize;
        let bit = 1u64 << (ev.seq % 64);
        if word >= self.seen.len() {
            self.seen.resize(word + 1 + word / 2, 0);
        }
        if self.seen[word] & bit != 0 {
            self.dups += 1;
        } else {
            self.seen[word] |= bit;
            self.unique += 1;
            if ev.p >= self.last_by_pub.len() {
                self.last_by_pub.resize(ev.p + 1, u64::MAX);
            }
            let last = &mut self.last_by_pub[ev.p];
            if *last != u64::MAX && ev.seq < *last {
                self.order_violations += 1;
            } else {
                *last = ev.seq;
            }
        }
        let lat_us =
            u64::try_from(now_ns.saturating_sub(u128::from(ev.ts)) / 1000).unwrap_or(u64::MAX);
        self.hist.record(lat_us);
        if let Some(a) = self.arrivals.as_mut() {
            a.push((ev.seq, u32::try_from(lat_us).unwrap_or(u32::MAX)));
        }
    }

    fn on_text(&mut self, target: Target, text: &str) {
        let now_ns = now_unix_nanos();
        self.frames += 1;
        self.last_recv = Some(Instant::now());
        let one = |s: &str, me: &mut ClientStats| {
            let parsed = match target {
                Target::Eventgate => serde_json::from_str::<Envelope>(s).map(|e| e.data),
                _ => serde_json::from_str::<Ev>(s),
            };
            match parsed {
                Ok(ev) => me.on_event(&ev, now_ns),
                Err(_) => me.parse_errors += 1,
            }
        };
        if target == Target::Gorilla {
            for line in text.split('\n').filter(|l| !l.is_empty()) {
                one(line, self);
            }
        } else {
            one(text, self);
        }
    }
}

struct ClientCtx {
    ep: Arc<Endpoint>,
    connect_gate: Arc<Semaphore>,
    connected_tx: mpsc::UnboundedSender<BoxResult<()>>,
    stop: watch::Receiver<bool>,
    received: Arc<AtomicU64>,
    per_addr: usize,
    track_events: bool,
}

async fn run_client(idx: usize, instance: usize, ctx: ClientCtx) -> ClientStats {
    let mut st = ClientStats {
        instance,
        arrivals: ctx.track_events.then(Vec::new),
        ..Default::default()
    };
    let inst = Endpoint::instance_name(instance);
    let src = Some(source_addr(idx, ctx.per_addr));
    let mut ws = {
        let _permit = ctx.connect_gate.acquire().await;
        let mut last_err = String::new();
        let mut got = None;
        for attempt in 0..3 {
            match ws_connect(&ctx.ep, idx, src, &inst).await {
                Ok(ws) => {
                    got = Some(ws);
                    break;
                }
                Err(e) => {
                    last_err = e;
                    tokio::time::sleep(Duration::from_millis(200 * (attempt + 1))).await;
                }
            }
        }
        match got {
            Some(ws) => ws,
            None => {
                st.connect_error = Some(last_err.clone());
                let _ = ctx.connected_tx.send(Err(last_err));
                return st;
            }
        }
    };
    st.connected = true;
    let _ = ctx.connected_tx.send(Ok(()));
    let mut stop = ctx.stop;
    let target = ctx.ep.target;
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            msg = ws.next() => match msg {
                Some(Ok(Message::Text(t))) => {
                    let before = st.events;
                    st.on_text(target, &t);
                    ctx.received.fetch_add(st.events - before, Ordering::Relaxed);
                }
                Some(Ok(Message::Binary(b))) => {
                    let before = st.events;
                    st.on_text(target, &String::from_utf8_lossy(&b));
                    ctx.received.fetch_add(st.events - before, Ordering::Relaxed);
                }
                Some(Ok(Message::Close(frame))) => {
                    st.closed_by_server = Some(match frame {
                        Some(f) => format!("close {} {}", u16::from(f.code), f.reason),
                        None => "close (no code)".into(),
                    });
                    break;
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    st.closed_by_server = Some(format!("error: {e}"));
                    break;
                }
                None => {
                    st.closed_by_server = Some("EOF".into());
                    break;
                }
            }
        }
    }
    st.seen = Vec::new();
    drop(ws);
    st
}

/// Spawns `n` clients spread round robin over `instances` and waits until all
/// are connected (or failed). Returns the handles and the number connected.
async fn spawn_clients(
    opts: &Opts,
    ep: &Arc<Endpoint>,
    n: usize,
    instances: usize,
    stop: &watch::Receiver<bool>,
    received: &Arc<AtomicU64>,
    track_events: bool,
) -> BoxResult<(
    Vec<tokio::task::JoinHandle<ClientStats>>,
    usize,
    Vec<String>,
    f64,
)> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let gate = Arc::new(Semaphore::new(opts.connect_concurrency.max(1)));
    let t0 = Instant::now();
    let mut handles = Vec::with_capacity(n);
    for i in 0..n {
        let ctx = ClientCtx {
            ep: ep.clone(),
            connect_gate: gate.clone(),
            connected_tx: tx.clone(),
            stop: stop.clone(),
            received: received.clone(),
            per_addr: opts.clients_per_addr,
            track_events,
        };
        handles.push(tokio::spawn(run_client(i, i % instances.max(1), ctx)));
    }
    drop(tx);
    let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(opts.connect_timeout_secs);
    let mut ok = 0;
    let mut errors: BTreeMap<String, usize> = BTreeMap::new();
    let mut done = 0;
    while done < n {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(Ok(()))) => ok += 1,
            Ok(Some(Err(e))) => *errors.entry(e).or_default() += 1,
            Ok(None) => break,
            Err(_) => {
                *errors
                    .entry(format!(
                        "still connecting after {} s",
                        opts.connect_timeout_secs
                    ))
                    .or_default() += n - done;
                break;
            }
        }
        done += 1;
    }
    let errs = errors
        .into_iter()
        .map(|(e, c)| format!("{c}x {e}"))
        .collect();
    Ok((handles, ok, errs, t0.elapsed().as_secs_f64()))
}

// ---------------------------------------------------------------------------
// Publishers
// ---------------------------------------------------------------------------

struct PubShared {
    ep: Arc<Endpoint>,
    instances: usize,
    next: AtomicU64,
    seq: Vec<AtomicU64>,
    ok: Vec<AtomicU64>,
    errors: AtomicU64,
    first_error: std::sync::Mutex<Option<String>>,
    event_bytes: usize,
}

impl PubShared {
    fn note_error(&self, e: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut g) = self.first_error.lock() {
            if g.is_none() {
                *g = Some(e);
            }
        }
    }
}

async fn publisher(
    p: usize,
    sh: Arc<PubShared>,
    until: Instant,
    interval: Option<Duration>,
    offset: Duration,
) {
    let mut conn = HttpConn::new(&sh.ep);
    let headers = sh.ep.auth_headers();
    let paths: Vec<String> = (0..sh.instances)
        .map(|i| sh.ep.publish_path(&Endpoint::instance_name(i)))
        .collect();
    let start = tokio::time::Instant::now() + offset;
    let mut k: u32 = 0;
    loop {
        if let Some(iv) = interval {
            let at = start + iv * k;
            k = k.saturating_add(1);
            tokio::time::sleep_until(at).await;
        }
        if Instant::now() >= until {
            break;
        }
        let g = sh.next.fetch_add(1, Ordering::Relaxed);
        let inst = (g % sh.instances as u64) as usize;
        let seq = sh.seq[inst].fetch_add(1, Ordering::Relaxed);
        let body = sh.ep.publish_body(seq, p, now_unix_nanos(), sh.event_bytes);
        match conn.request("POST", &paths[inst], &headers, &body).await {
            Ok(r) if (200..300).contains(&r.status) => {
                sh.ok[inst].fetch_add(1, Ordering::Relaxed);
            }
            Ok(r) => {
                sh.note_error(format!(
                    "publish: HTTP {} {}",
                    r.status,
                    String::from_utf8_lossy(&r.body)
                ));
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(e) => {
                sh.note_error(format!("publish: {e}"));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// Creates instances bench-0..n on eventgate (201, or 409 when it exists).
async fn setup_instances(ep: &Endpoint, n: usize) -> BoxResult<()> {
    if ep.target != Target::Eventgate {
        return Ok(());
    }
    let mut conn = HttpConn::new(ep);
    let headers = ep.auth_headers();
    for i in 0..n {
        let name = Endpoint::instance_name(i);
        let body = json!({"name": name, "websocketEnabled": true}).to_string();
        let r = conn
            .request("POST", "/api/instance/new", &headers, body.as_bytes())
            .await?;
        match r.status {
            201 => {}
            409 if String::from_utf8_lossy(&r.body).contains("Instance already exists") => {}
            s => {
                return Err(format!(
                    "POST /api/instance/new {name}: HTTP {s} {}",
                    String::from_utf8_lossy(&r.body)
                ))
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------

struct Report {
    rows: Vec<(String, String)>,
    json: serde_json::Map<String, Value>,
}

impl Report {
    fn new() -> Report {
        Report {
            rows: Vec::new(),
            json: serde_json::Map::new(),
        }
    }
    fn put(&mut self, key: &str, v: Value, human: impl Into<String>) {
        self.rows.push((key.to_string(), human.into()));
        self.json.insert(key.to_string(), v);
    }
    fn num(&mut self, key: &str, v: f64, decimals: usize) {
        let v = if v.is_finite() { v } else { 0.0 };
        self.put(
            key,
            json!((v * 10f64.powi(decimals as i32)).round() / 10f64.powi(decimals as i32)),
            format!("{v:.decimals$}"),
        );
    }
    fn int(&mut self, key: &str, v: u64) {
        self.put(key, json!(v), v.to_string());
    }
    fn opt_num(&mut self, key: &str, v: Option<f64>, decimals: usize) {
        match v {
            Some(v) => self.num(key, v, decimals),
            None => self.put(key, Value::Null, "-"),
        }
    }
    fn text(&mut self, key: &str, v: &str) {
        self.put(key, json!(v), v);
    }
    fn emit(&self, as_json: bool) {
        let w = self.rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        let mut table = String::new();
        for (k, v) in &self.rows {
            let _ = writeln!(table, "  {k:<w$}  {v}");
        }
        if as_json {
            eprint!("{table}");
            println!("{}", Value::Object(self.json.clone()));
        } else {
            print!("{table}");
        }
    }
}

fn header(r: &mut Report, opts: &Opts, mode: Mode) {
    r.text("mode", mode.name());
    r.text("target", opts.target.name());
    if let Some(l) = &opts.label {
        r.text("label", l);
    }
    r.text("url", &opts.url);
}

fn latency_rows(r: &mut Report, h: &Hist) {
    let ms = |v: u64| v as f64 / 1000.0;
    r.num("latency_p50_ms", ms(h.quantile(0.50)), 3);
    r.num("latency_p90_ms", ms(h.quantile(0.90)), 3);
    r.num("latency_p99_ms", ms(h.quantile(0.99)), 3);
    r.num("latency_p999_ms", ms(h.quantile(0.999)), 3);
    r.num("latency_max_ms", ms(h.max), 3);
    let mean = if h.total > 0 {
        h.sum as f64 / h.total as f64 / 1000.0
    } else {
        0.0
    };
    r.num("latency_mean_ms", mean, 3);
}

// ---------------------------------------------------------------------------
// Modes
// ---------------------------------------------------------------------------

struct Aggregate {
    deliveries: u64,
    unique: u64,
    dups: u64,
    order: u64,
    parse_errors: u64,
    lost: u64,
    expected: u64,
    frames: u64,
    disconnected: u64,
    disconnect_reasons: BTreeMap<String, u64>,
    last_recv: Option<Instant>,
    hist: Hist,
    /// Per event: latency of its first and of its last receipt.
    per_event: Option<(Hist, Hist)>,
}

fn aggregate(stats: &[ClientStats], published_ok: &[u64]) -> Aggregate {
    let mut a = Aggregate {
        deliveries: 0,
        unique: 0,
        dups: 0,
        order: 0,
        parse_errors: 0,
        lost: 0,
        expected: 0,
        frames: 0,
        disconnected: 0,
        disconnect_reasons: BTreeMap::new(),
        last_recv: None,
        hist: Hist::default(),
        per_event: None,
    };
    // (instance, seq) → (first, last) latency over the instance's clients.
    let mut spread: HashMap<(usize, u64), (u32, u32)> = HashMap::new();
    for s in stats.iter().filter(|s| s.connected) {
        for &(seq, lat) in s.arrivals.iter().flatten() {
            let e = spread.entry((s.instance, seq)).or_insert((lat, lat));
            e.0 = e.0.min(lat);
            e.1 = e.1.max(lat);
        }
        let exp = published_ok.get(s.instance).copied().unwrap_or(0);
        a.expected += exp;
        a.lost += exp.saturating_sub(s.unique);
        a.deliveries += s.events;
        a.unique += s.unique;
        a.dups += s.dups;
        a.order += s.order_violations;
        a.parse_errors += s.parse_errors;
        a.frames += s.frames;
        if let Some(r) = &s.closed_by_server {
            a.disconnected += 1;
            let key: String = r.chars().take(80).collect();
            *a.disconnect_reasons.entry(key).or_default() += 1;
        }
        a.last_recv = match (a.last_recv, s.last_recv) {
            (Some(x), Some(y)) => Some(x.max(y)),
            (x, y) => x.or(y),
        };
        a.hist.merge(&s.hist);
    }
    if !spread.is_empty() {
        let (mut first, mut last) = (Hist::default(), Hist::default());
        for (f, l) in spread.values() {
            first.record(u64::from(*f));
            last.record(u64::from(*l));
        }
        a.per_event = Some((first, last));
    }
    a
}

struct RunOut {
    report: Report,
}

/// Shared by fanout, latency and stalled: connect, publish, drain, account.
struct LoadPlan {
    clients: usize,
    instances: usize,
    rate: Option<f64>,
}

/// Most deliveries a run keeps one by one for the per-event figures
/// (16 bytes each); runs expecting more report only the overall latency.
const TRACK_EVENTS_MAX: f64 = 5e6;

impl LoadPlan {
    /// Whether clients keep every arrival: at a fixed rate, when the
    /// expected deliveries fit [`TRACK_EVENTS_MAX`].
    fn tracks_events(&self, secs: f64) -> bool {
        let per_instance = (self.clients as f64 / self.instances.max(1) as f64).ceil();
        self.rate
            .is_some_and(|r| r * secs * per_instance <= TRACK_EVENTS_MAX)
    }
}

struct LoadResult {
    agg: Aggregate,
    published: u64,
    publish_errors: u64,
    first_error: Option<String>,
    publish_secs: f64,
    recv_window_secs: f64,
    cpu_secs: Option<f64>,
    bench_cpu_secs: Option<f64>,
    machine_cpu_secs: Option<f64>,
    measured_secs: f64,
    connected: usize,
    connect_errors: Vec<String>,
    connect_secs: f64,
}

/// Hooks that let `stalled` run code while the load is running.
type DuringHook = Box<dyn FnOnce(Instant) -> tokio::task::JoinHandle<Value> + Send>;

async fn run_load(
    opts: &Opts,
    ep: &Arc<Endpoint>,
    srv: &Server,
    plan: &LoadPlan,
    pre_publish: Option<DuringHook>,
) -> BoxResult<(LoadResult, Option<Value>)> {
    setup_instances(ep, plan.instances).await?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let received = Arc::new(AtomicU64::new(0));
    let (handles, connected, connect_errors, connect_secs) = spawn_clients(
        opts,
        ep,
        plan.clients,
        plan.instances,
        &stop_rx,
        &received,
        plan.tracks_events(opts.secs),
    )
    .await?;
    if connected == 0 {
        let _ = stop_tx.send(true);
        return Err(format!(
            "no client could connect: {}",
            connect_errors.join("; ")
        ));
    }
    // Let the server finish registering the new subscribers.
    tokio::time::sleep(Duration::from_millis(500)).await;
    received.store(0, Ordering::Relaxed);

    let sh = Arc::new(PubShared {
        ep: ep.clone(),
        instances: plan.instances,
        next: AtomicU64::new(0),
        seq: (0..plan.instances).map(|_| AtomicU64::new(0)).collect(),
        ok: (0..plan.instances).map(|_| AtomicU64::new(0)).collect(),
        errors: AtomicU64::new(0),
        first_error: std::sync::Mutex::new(None),
        event_bytes: opts.event_bytes,
    });
    let pubs = opts.publishers.max(1);
    let interval = match plan.rate {
        Some(r) if r > 0.0 => Some(Duration::from_secs_f64(pubs as f64 / r)),
        _ => None,
    };
    let cpu0 = srv.cpu();
    let bench_tck = srv.tck;
    let me = std::process::id().to_string();
    let bcpu0 = proc_cpu_secs(&me, bench_tck).ok();
    let mcpu0 = machine_busy_secs(bench_tck);
    let t0 = Instant::now();
    let hook = pre_publish.map(|h| h(t0));
    let until = t0 + Duration::from_secs_f64(opts.secs);
    let mut ph = Vec::new();
    for p in 0..pubs {
        let offset = interval
            .map(|iv| iv * p as u32 / pubs as u32)
            .unwrap_or_default();
        ph.push(tokio::spawn(publisher(
            p,
            sh.clone(),
            until,
            interval,
            offset,
        )));
    }
    for h in ph {
        let _ = h.await;
    }
    let publish_secs = t0.elapsed().as_secs_f64();
    let published_ok: Vec<u64> = sh.ok.iter().map(|a| a.load(Ordering::Relaxed)).collect();
    let mut per_inst_clients = vec![0u64; plan.instances];
    for i in 0..plan.clients {
        per_inst_clients[i % plan.instances.max(1)] += 1;
    }
    // Early end of the drain once every expected delivery arrived (only
    // computable when every client connected).
    let expected_all: u64 = if connected == plan.clients {
        published_ok
            .iter()
            .zip(per_inst_clients.iter())
            .map(|(p, c)| p * c)
            .sum()
    } else {
        u64::MAX
    };
    let drain_until = Instant::now() + Duration::from_secs_f64(opts.drain_secs);
    while Instant::now() < drain_until {
        if received.load(Ordering::Relaxed) >= expected_all {
            tokio::time::sleep(Duration::from_millis(100)).await;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cpu1 = srv.cpu();
    let bcpu1 = proc_cpu_secs(&me, bench_tck).ok();
    let mcpu1 = machine_busy_secs(bench_tck);
    let measured_secs = t0.elapsed().as_secs_f64();
    let hook_value = match hook {
        Some(h) => h.await.ok(),
        None => None,
    };
    let _ = stop_tx.send(true);
    let mut stats = Vec::with_capacity(handles.len());
    for h in handles {
        match h.await {
            Ok(s) => stats.push(s),
            Err(e) => return Err(format!("client task failed: {e}")),
        }
    }
    let agg = aggregate(&stats, &published_ok);
    let recv_window_secs = agg
        .last_recv
        .map(|l| l.saturating_duration_since(t0).as_secs_f64())
        .unwrap_or(publish_secs)
        .max(1e-3);
    let first_error = sh.first_error.lock().ok().and_then(|g| g.clone());
    Ok((
        LoadResult {
            published: published_ok.iter().sum(),
            publish_errors: sh.errors.load(Ordering::Relaxed),
            first_error,
            publish_secs,
            recv_window_secs,
            cpu_secs: cpu0.zip(cpu1).map(|(a, b)| b - a),
            bench_cpu_secs: bcpu0.zip(bcpu1).map(|(a, b)| b - a),
            machine_cpu_secs: mcpu0.zip(mcpu1).map(|(a, b)| b - a),
            measured_secs,
            agg,
            connected,
            connect_errors,
            connect_secs,
        },
        hook_value,
    ))
}

fn load_rows(r: &mut Report, opts: &Opts, plan: &LoadPlan, lr: &LoadResult) {
    r.int("clients", plan.clients as u64);
    r.int("instances", plan.instances as u64);
    r.int("publishers", opts.publishers.max(1) as u64);
    match plan.rate {
        Some(x) => r.num("rate_target", x, 1),
        None => r.put("rate_target", Value::Null, "max"),
    }
    r.int("event_bytes", opts.event_bytes as u64);
    r.num("secs", opts.secs, 1);
    r.int("threads", opts.threads.max(1) as u64);
    r.int("clients_connected", lr.connected as u64);
    r.num("connect_secs", lr.connect_secs, 2);
    if !lr.connect_errors.is_empty() {
        r.text("connect_errors", &lr.connect_errors.join("; "));
    }
    r.num("publish_secs", lr.publish_secs, 2);
    r.int("published", lr.published);
    r.num(
        "published_per_sec",
        lr.published as f64 / lr.publish_secs.max(1e-3),
        1,
    );
    r.int("publish_errors", lr.publish_errors);
    if let Some(e) = &lr.first_error {
        r.text("publish_first_error", e);
    }
    let a = &lr.agg;
    r.int("deliveries", a.deliveries);
    r.int("expected_deliveries", a.expected);
    r.int("lost", a.lost);
    r.num(
        "lost_pct",
        if a.expected > 0 {
            a.lost as f64 * 100.0 / a.expected as f64
        } else {
            0.0
        },
        3,
    );
    r.int("duplicated", a.dups);
    r.int("order_violations", a.order);
    r.int("parse_errors", a.parse_errors);
    r.int("frames", a.frames);
    r.num(
        "deliveries_per_sec",
        a.deliveries as f64 / lr.recv_window_secs,
        0,
    );
    r.num("recv_window_secs", lr.recv_window_secs, 2);
    r.int("clients_dropped_by_server", a.disconnected);
    if !a.disconnect_reasons.is_empty() {
        let s: Vec<String> = a
            .disconnect_reasons
            .iter()
            .map(|(k, v)| format!("{v}x {k}"))
            .collect();
        r.text("drop_reasons", &s.join("; "));
    }
    latency_rows(r, &a.hist);
    if let Some((first, last)) = &a.per_event {
        // Where one event's latency goes: reaching its first client, then
        // every other (one write per client on the server).
        let ms = |v: u64| v as f64 / 1000.0;
        r.num("event_first_p50_ms", ms(first.quantile(0.50)), 3);
        r.num("event_first_p99_ms", ms(first.quantile(0.99)), 3);
        r.num("event_last_p50_ms", ms(last.quantile(0.50)), 3);
        r.num("event_last_p99_ms", ms(last.quantile(0.99)), 3);
    }
    r.opt_num("server_cpu_secs", lr.cpu_secs, 3);
    r.opt_num(
        "server_cpu_us_per_delivery",
        lr.cpu_secs
            .filter(|_| a.deliveries > 0)
            .map(|c| c * 1e6 / a.deliveries as f64),
        3,
    );
    r.opt_num(
        "server_cpu_pct",
        lr.cpu_secs.map(|c| c * 100.0 / lr.measured_secs),
        1,
    );
    r.opt_num("bench_cpu_secs", lr.bench_cpu_secs, 3);
    r.opt_num(
        "bench_cpu_pct",
        lr.bench_cpu_secs.map(|c| c * 100.0 / lr.measured_secs),
        1,
    );
    // CPU used by everything else on the machine while measuring: if this is
    // not near 0, another workload disturbed the run.
    let other = lr.machine_cpu_secs.map(|m| {
        (m - lr.cpu_secs.unwrap_or(0.0) - lr.bench_cpu_secs.unwrap_or(0.0)).max(0.0) * 100.0
            / lr.measured_secs
    });
    r.opt_num("other_cpu_pct", other.filter(|_| lr.cpu_secs.is_some()), 1);
}

async fn mode_load(opts: &Opts, mode: Mode, ep: Arc<Endpoint>, srv: &Server) -> BoxResult<RunOut> {
    let plan = LoadPlan {
        clients: opts.clients.unwrap_or(1000).max(1),
        instances: opts.instances.unwrap_or(1).max(1),
        rate: match mode {
            Mode::Latency => Some(opts.rate.unwrap_or(50.0)),
            _ => opts.rate,
        },
    };
    check_fds(plan.clients + opts.publishers + 16)?;
    let rss0 = srv.rss();
    let (lr, _) = run_load(opts, &ep, srv, &plan, None).await?;
    let rss1 = srv.rss();
    let mut r = Report::new();
    header(&mut r, opts, mode);
    load_rows(&mut r, opts, &plan, &lr);
    r.opt_num("server_rss_before_mib", rss0.map(|v| v as f64 / 1024.0), 1);
    r.opt_num("server_rss_after_mib", rss1.map(|v| v as f64 / 1024.0), 1);
    Ok(RunOut { report: r })
}

fn check_fds(needed: usize) -> BoxResult<()> {
    let (soft, hard) = raise_nofile();
    let have = soft.saturating_sub(open_fds() as u64);
    if (needed as u64) > have {
        return Err(format!(
            "need about {needed} file descriptors but only {have} are free (RLIMIT_NOFILE soft {soft}, hard {hard}); \
             lower --clients or raise the limit (ulimit -n)"
        ));
    }
    Ok(())
}

async fn mode_idle(opts: &Opts, ep: Arc<Endpoint>, srv: &Server) -> BoxResult<RunOut> {
    let clients = opts.clients.unwrap_or(19000).max(1);
    let instances = opts.instances.unwrap_or(1).max(1);
    check_fds(clients + 16)?;
    setup_instances(&ep, instances).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss0 = srv.rss();
    let cpu0 = srv.cpu();
    let (stop_tx, stop_rx) = watch::channel(false);
    let received = Arc::new(AtomicU64::new(0));
    let (handles, connected, errors, secs) =
        spawn_clients(opts, &ep, clients, instances, &stop_rx, &received, false).await?;
    tokio::time::sleep(Duration::from_secs_f64(opts.hold_secs)).await;
    let rss1 = srv.rss();
    let cpu1 = srv.cpu();
    let _ = stop_tx.send(true);
    let mut dropped = 0u64;
    let mut reasons: BTreeMap<String, u64> = BTreeMap::new();
    for h in handles {
        if let Ok(s) = h.await {
            if s.connected {
                if let Some(reason) = s.closed_by_server {
                    dropped += 1;
                    *reasons
                        .entry(reason.chars().take(80).collect())
                        .or_default() += 1;
                }
            }
        }
    }
    // Give the server time to release the sockets, then sample once more.
    tokio::time::sleep(Duration::from_secs_f64(opts.settle_secs)).await;
    let rss2 = srv.rss();
    let mut r = Report::new();
    header(&mut r, opts, Mode::Idle);
    r.int("clients", clients as u64);
    r.int("instances", instances as u64);
    r.int(
        "source_addrs",
        clients.div_ceil(opts.clients_per_addr.max(1)) as u64,
    );
    r.int("clients_connected", connected as u64);
    if !errors.is_empty() {
        r.text("connect_errors", &errors.join("; "));
    }
    r.num("connect_secs", secs, 2);
    r.int("clients_dropped_during_hold", dropped);
    if !reasons.is_empty() {
        let s: Vec<String> = reasons.iter().map(|(k, v)| format!("{v}x {k}")).collect();
        r.text("drop_reasons", &s.join("; "));
    }
    r.opt_num("server_rss_before_mib", rss0.map(|v| v as f64 / 1024.0), 1);
    r.opt_num(
        "server_rss_connected_mib",
        rss1.map(|v| v as f64 / 1024.0),
        1,
    );
    r.opt_num(
        "server_rss_after_close_mib",
        rss2.map(|v| v as f64 / 1024.0),
        1,
    );
    r.opt_num(
        "server_rss_per_conn_kib",
        rss0.zip(rss1)
            .filter(|_| connected > 0)
            .map(|(a, b)| (b as f64 - a as f64) / connected as f64),
        2,
    );
    r.opt_num(
        "server_cpu_secs_connecting",
        cpu0.zip(cpu1).map(|(a, b)| b - a),
        3,
    );
    Ok(RunOut { report: r })
}

// ---------------------------------------------------------------------------
// stalled mode
// ---------------------------------------------------------------------------

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
    let key = {
        // 16 bytes, base64 = 24 chars; uniqueness is all that matters here.
        let n = now_unix_nanos();
        let raw: Vec<u8> = (0..16)
            .map(|i| ((n >> (i * 5)) as u8) ^ (i as u8 * 37))
            .collect();
        base64(&raw)
    };
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

fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in data.chunks(3) {
        let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// End of publishing plus drain, given the whole watch span and the passive wait.
fn opts_secs_drain(watch_for: f64, wait: f64) -> f64 {
    watch_for - wait
}

/// The kernel's view of the TCP socket with this local and remote address:
/// (state, send queue, receive queue), or None when there is no such socket.
fn tcp_entry(local: SocketAddr, remote: SocketAddr) -> Option<(u8, u64, u64)> {
    use std::io::{Read, Write};
    // A sock_diag request for this one socket is a hash lookup in the kernel.
    // Reading /proc/net/tcp instead walks every socket bucket of the machine,
    // ~7 ms of kernel time per read: done every 100 ms it alone doubled the
    // p99 of the fast clients being measured.
    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const NLM_F_REQUEST: u16 = 1;
    const HEADER: usize = 16;
    let (SocketAddr::V4(l), SocketAddr::V4(r)) = (local, remote) else {
        return None;
    };
    let ip = |a: &std::net::SocketAddrV4| {
        let mut b = [0u8; 16];
        b[..4].copy_from_slice(&a.ip().octets());
        b
    };
    let mut req = Vec::with_capacity(72);
    req.extend_from_slice(&72u32.to_ne_bytes()); // nlmsghdr: length
    req.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    req.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    req.extend_from_slice(&[0u8; 8]); // sequence, port id
                                      // inet_diag_req_v2: family, protocol, extensions, pad, states (all)
    req.extend_from_slice(&[libc::AF_INET as u8, libc::IPPROTO_TCP as u8, 0, 0]);
    req.extend_from_slice(&u32::MAX.to_ne_bytes());
    // inet_diag_sockid: ports and addresses (network order), interface, no cookie
    req.extend_from_slice(&l.port().to_be_bytes());
    req.extend_from_slice(&r.port().to_be_bytes());
    req.extend_from_slice(&ip(&l));
    req.extend_from_slice(&ip(&r));
    req.extend_from_slice(&0u32.to_ne_bytes());
    req.extend_from_slice(&[0xff; 8]);
    let sock = socket2::Socket::new(
        socket2::Domain::from(libc::AF_NETLINK),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::from(libc::NETLINK_SOCK_DIAG)),
    )
    .ok()?;
    // Unaddressed netlink messages go to the kernel.
    if (&sock).write(&req).ok()? != req.len() {
        return None;
    }
    let mut buf = [0u8; 512];
    let n = (&sock).read(&mut buf).ok()?;
    // The answer is an inet_diag_msg (or an error: no such socket).
    let msg = buf.get(HEADER..n)?;
    if u16::from_ne_bytes([buf[4], buf[5]]) != SOCK_DIAG_BY_FAMILY || msg.len() < 64 {
        return None;
    }
    // Once the connection is gone the lookup falls back to the listener:
    // only a socket with the asked-for remote port is this one.
    if msg[6..8] != r.port().to_be_bytes() {
        return None;
    }
    let word = |at: usize| u32::from_ne_bytes([msg[at], msg[at + 1], msg[at + 2], msg[at + 3]]);
    // state at 1; after the 48-byte sockid (from 4): expires, rqueue, wqueue
    Some((msg[1], u64::from(word(60)), u64::from(word(56))))
}

fn tcp_state_name(s: u8) -> &'static str {
    match s {
        1 => "ESTABLISHED",
        2 => "SYN_SENT",
        3 => "SYN_RECV",
        4 => "FIN_WAIT1",
        5 => "FIN_WAIT2",
        6 => "TIME_WAIT",
        7 => "CLOSE",
        8 => "CLOSE_WAIT",
        9 => "LAST_ACK",
        10 => "LISTEN",
        11 => "CLOSING",
        _ => "?",
    }
}

/// Scans server-to-client WebSocket frames; returns the close code if a close frame is seen.
#[derive(Default)]
struct FrameScan {
    buf: Vec<u8>,
    frames: u64,
    close: Option<String>,
}

impl FrameScan {
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

async fn mode_stalled(opts: &Opts, ep: Arc<Endpoint>, srv: &Server) -> BoxResult<RunOut> {
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
    Ok(RunOut { report: r })
}

// ---------------------------------------------------------------------------
// The floor target: the least work a fan-out server can do
// ---------------------------------------------------------------------------

/// Clients of the floor server, by instance name.
type FloorClients = Arc<std::sync::Mutex<HashMap<String, Vec<std::net::TcpStream>>>>;

/// Serves the peers' protocol (`GET /ws/{instance}`, `POST /publish/{instance}`,
/// no auth) with nothing but the system calls fan-out cannot avoid: each
/// publish becomes one prebuilt text frame, written with one blocking `write`
/// per client, in a loop on the publisher connection's thread. No actor, no
/// queue, no timer, no read of what clients send. It is the floor the load
/// tool can measure on this machine, not a gateway: a client that stops
/// reading blocks it (use it for `fanout` and `latency`, not `stalled`).
fn serve_floor(addr: SocketAddr) -> BoxResult<()> {
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

// ---------------------------------------------------------------------------
// main
// ---------------------------------------------------------------------------

async fn run(cli: Cli) -> BoxResult<()> {
    let opts = cli.opts;
    let ep = Arc::new(Endpoint::parse(&opts)?);
    let srv = Server {
        pid: opts.server_pid.map(|p| p.to_string()),
        tck: clk_tck(),
    };
    if let Some(pid) = &srv.pid {
        proc_cpu_secs(pid, srv.tck).map_err(|e| format!("--server-pid {pid}: {e}"))?;
    }
    let out = match cli.mode {
        Mode::Fanout | Mode::Latency => mode_load(&opts, cli.mode, ep, &srv).await?,
        Mode::Idle => mode_idle(&opts, ep, &srv).await?,
        Mode::Stalled => mode_stalled(&opts, ep, &srv).await?,
        Mode::Floor => return Err("floor runs without the async runtime".into()),
    };
    out.report.emit(opts.json);
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    if cli.mode == Mode::Floor {
        let res = parse_loopback_url(&cli.opts.url).and_then(|(addr, _)| serve_floor(addr));
        if let Err(e) = res {
            eprintln!("eventgate-bench floor: {e}");
            std::process::exit(1);
        }
        return;
    }
    let threads = cli.opts.threads.max(1);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("eventgate-bench: cannot start the runtime: {e}");
            std::process::exit(2);
        }
    };
    let res = rt.block_on(run(cli));
    rt.shutdown_timeout(Duration::from_secs(1));
    if let Err(e) = res {
        eprintln!("eventgate-bench: {e}");
        std::process::exit(1);
    }
}
