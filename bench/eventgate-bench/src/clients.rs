//! The WebSocket clients of a run (tokio-tungstenite), one task each: connect
//! from spread source addresses, read until told to stop, and count what
//! arrives — events, duplicates, order per publisher, latency publish →
//! receipt — then the aggregate over all clients. Owns the receive-side
//! accounting; must not publish.

use crate::latency::Latencies;
use crate::target::{now_unix_nanos, Endpoint, Target};
use crate::{BoxResult, Opts};
use futures_util::StreamExt;
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// A client's connection.
type Ws = WebSocketStream<TcpStream>;

/// The published data, as every target delivers it (eventgate: in `data`).
#[derive(Deserialize)]
struct Ev {
    /// Per-instance sequence number.
    seq: u64,
    /// Publisher number (order is checked per publisher).
    #[serde(default)]
    p: usize,
    /// Publish time, Unix nanoseconds.
    ts: u64,
}

/// eventgate's event envelope.
#[derive(Deserialize)]
struct Envelope {
    data: Ev,
}

/// Source address of client `i`: 127.0.0.2, .3, … one per `per_addr`
/// clients, so that many clients do not run out of ephemeral ports.
fn source_addr(i: usize, per_addr: usize) -> IpAddr {
    let k = (i / per_addr.max(1)) as u32;
    // 127.0.0.2 + k, staying inside 127.0.0.0/8
    let base = u32::from(Ipv4Addr::new(127, 0, 0, 2));
    IpAddr::V4(Ipv4Addr::from((base + k) & 0x00ff_ffff | 0x7f00_0000))
}

/// Connects a TCP socket to `dst` from `src`, with `rcvbuf` as SO_RCVBUF.
pub(crate) async fn tcp_connect(
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
        bind_port_at_connect(&sock).map_err(|e| format!("IP_BIND_ADDRESS_NO_PORT: {e}"))?;
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

/// Has the kernel choose a bound socket's source port at `connect`, by the
/// whole address pair, instead of at `bind` (`IP_BIND_ADDRESS_NO_PORT`).
/// Without it, `bind(ip, 0)` must find a port of `ip` that no socket holds,
/// TIME_WAIT ones included: after a few waves of tens of thousands of
/// connections (a reconnect storm's rounds) that search blocked the tool's
/// only thread for seconds, and a whole storm waited with it.
fn bind_port_at_connect(sock: &TcpSocket) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let one: libc::c_int = 1;
    // SAFETY: the descriptor belongs to `sock`, alive for the call; the
    // option value points to a live c_int and its size is passed with it.
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Connects client `idx` to an instance's WebSocket.
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
/// What one client saw.
pub(crate) struct ClientStats {
    /// Instance it is a client of.
    pub(crate) instance: usize,
    /// Whether it connected.
    pub(crate) connected: bool,
    /// Why it could not.
    pub(crate) connect_error: Option<String>,
    /// Frames received.
    pub(crate) frames: u64,
    /// Events received (a gorilla frame may hold several).
    pub(crate) events: u64,
    /// Distinct events received.
    pub(crate) unique: u64,
    /// Events received again.
    pub(crate) dups: u64,
    /// Events older than one received before from the same publisher.
    pub(crate) order_violations: u64,
    /// Frames or lines that were not an event.
    pub(crate) parse_errors: u64,
    /// Set when the server ended the connection before we stopped.
    pub(crate) closed_by_server: Option<String>,
    /// When the last frame arrived.
    pub(crate) last_recv: Option<Instant>,
    /// Publish → receipt latency.
    pub(crate) hist: Latencies,
    /// Bit set of the seqs received.
    pub(crate) seen: Vec<u64>,
    /// Last seq received per publisher.
    pub(crate) last_by_pub: Vec<u64>,
    /// `(seq, latency µs)` of every event received, kept when the run
    /// tracks events (see `load::TRACK_EVENTS_MAX`).
    pub(crate) arrivals: Option<Vec<(u64, u32)>>,
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

/// What a client task is given.
struct ClientCtx {
    ep: Arc<Endpoint>,
    connect_gate: Arc<Semaphore>,
    connected_tx: mpsc::UnboundedSender<BoxResult<()>>,
    stop: watch::Receiver<bool>,
    received: Arc<AtomicU64>,
    per_addr: usize,
    track_events: bool,
}

/// One client: connect (3 tries), then count what arrives until `stop`.
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
pub(crate) async fn spawn_clients(
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
/// What all clients of a run saw.
pub(crate) struct Aggregate {
    /// Events received over all clients.
    pub(crate) deliveries: u64,
    /// Distinct ones.
    pub(crate) unique: u64,
    /// Duplicates.
    pub(crate) dups: u64,
    /// Order violations.
    pub(crate) order: u64,
    /// Frames that were not events.
    pub(crate) parse_errors: u64,
    /// Acknowledged publishes a client did not receive.
    pub(crate) lost: u64,
    /// Acknowledged publishes × the instance's clients.
    pub(crate) expected: u64,
    /// Frames received.
    pub(crate) frames: u64,
    /// Clients the server closed.
    pub(crate) disconnected: u64,
    /// How, counted.
    pub(crate) disconnect_reasons: BTreeMap<String, u64>,
    /// When the last frame of any client arrived.
    pub(crate) last_recv: Option<Instant>,
    /// Publish → receipt latency.
    pub(crate) hist: Latencies,
    /// Per event: latency of its first and of its last receipt.
    pub(crate) per_event: Option<(Latencies, Latencies)>,
}

/// Adds up the clients' counts; `published_ok` is acknowledged publishes per instance.
pub(crate) fn aggregate(stats: &[ClientStats], published_ok: &[u64]) -> Aggregate {
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
        hist: Latencies::default(),
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
        let (mut first, mut last) = (Latencies::default(), Latencies::default());
        for (f, l) in spread.values() {
            first.record(u64::from(*f));
            last.record(u64::from(*l));
        }
        a.per_event = Some((first, last));
    }
    a
}

#[cfg(test)]
mod tests {
    use super::{ClientStats, Target};
    use crate::target::now_unix_nanos;

    fn event(seq: u64, p: usize) -> String {
        format!(
            "{{\"seq\":{seq},\"p\":{p},\"ts\":{},\"pad\":\"x\"}}",
            now_unix_nanos()
        )
    }

    #[test]
    fn gorilla_frames_carry_several_events_and_others_one() {
        let mut st = ClientStats::default();
        st.on_text(
            Target::Gorilla,
            &format!("{}\n{}\n", event(0, 0), event(1, 0)),
        );
        assert_eq!(
            (st.frames, st.events, st.unique, st.parse_errors),
            (1, 2, 2, 0)
        );
        let mut st = ClientStats::default();
        st.on_text(Target::Uws, &format!("{}\n{}", event(0, 0), event(1, 0)));
        assert_eq!((st.frames, st.events, st.parse_errors), (1, 0, 1));
        let mut st = ClientStats::default();
        let enveloped = format!(
            "{{\"event\":\"message.exchange\",\"data\":{}}}",
            event(3, 1)
        );
        st.on_text(Target::Eventgate, &enveloped);
        assert_eq!((st.events, st.unique), (1, 1));
    }

    #[test]
    fn duplicates_and_order_are_counted_per_publisher() {
        let mut st = ClientStats::default();
        // seq is per instance, shared by the publishers.
        for (seq, p) in [(0, 0), (2, 0), (1, 0), (3, 1), (3, 1), (4, 1)] {
            st.on_text(Target::Node, &event(seq, p));
        }
        // seq 1 arrives after seq 2 of the same publisher; seq 3 twice.
        assert_eq!(
            (st.events, st.unique, st.dups, st.order_violations),
            (6, 5, 1, 1)
        );
        assert!(st.hist.quantile(1.0) < 10_000_000, "latency in µs");
    }
}
