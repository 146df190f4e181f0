//! The `webhook` mode (eventgate only): durable delivery to an HTTP receiver,
//! against what one request per delivery can do on this machine at all.
//! It runs, in one invocation, with its own fast receiver (hyper, 200 at
//! once, on 127.0.0.1):
//! 1. `raw`: the tool's own keep-alive POSTs straight to the receiver for
//!    `--secs` (`--publishers` connections): the raw rate and its p99;
//! 2. `sustained`: publishes (batches of 100) as fast as possible for
//!    `--secs` to an instance with one enabled webhook, then waits for every
//!    delivery: deliveries/s from the first acceptance to the last receipt,
//!    lost (accepted, never received) and duplicates;
//! 3. `fixed`: the same at 20% of the sustained rate: p50/p99 acceptance →
//!    receipt, from when a batch was sent (its 100th delivery waits for the
//!    99 before it); then `fixed_single`: the same rate of events spread
//!    evenly, one per publish, each timed from when it was sent;
//! 4. `publish`: events accepted/s (batches of 100) with one enabled webhook
//!    and with none;
//! 5. `backlog`: the receiver is down (refuses connections, and answers
//!    503 and closes on those already open) while `--backlog` events queue
//!    (server RSS sampled), then comes back: drain time and rate (attempts
//!    that failed come back on the server's retry schedule);
//! 6. `kills` (with `--restart-cmd`): publishes while the command SIGKILLs
//!    and restarts the server `--kills` times; every acknowledged event must
//!    arrive (duplicates reported).
//!
//! Start the server with `EVENTGATE_WEBHOOK_ALLOWED_NETWORKS=127.0.0.0/8`.
//! Owns that sequence; must not change how the other modes count.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1 as server_http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response};
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio::net::TcpListener;

use crate::latency::Latencies;
use crate::publish::HttpConn;
use crate::report::{header, Report};
use crate::system::Server;
use crate::target::{now_unix_nanos, Endpoint, Target};
use crate::{BoxResult, Mode, Opts};

/// Events per publish request.
const BATCH: usize = 100;

/// How long deliveries may take to arrive after publishing stops.
const DRAIN_LIMIT: Duration = Duration::from_secs(300);

/// The receiver's books.
#[derive(Default)]
struct Books {
    /// Arrivals by (run tag, seq).
    seen: HashMap<(u64, u64), u32>,
    latency: Latencies,
    first: Option<Instant>,
    last: Option<Instant>,
}

struct Receiver {
    addr: std::net::SocketAddr,
    /// Refuses connections (closes them unanswered) while set.
    down: AtomicBool,
    requests: AtomicU64,
    books: Mutex<Books>,
}

impl Receiver {
    async fn start() -> BoxResult<Arc<Receiver>> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| format!("receiver: {e}"))?;
        let rx = Arc::new(Receiver {
            addr: listener
                .local_addr()
                .map_err(|e| format!("receiver: {e}"))?,
            down: AtomicBool::new(false),
            requests: AtomicU64::new(0),
            books: Mutex::new(Books::default()),
        });
        let serving = rx.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                if serving.down.load(Ordering::Acquire) {
                    drop(stream);
                    continue;
                }
                let _ = stream.set_nodelay(true);
                let rx = serving.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| handle(req, rx.clone()));
                    let _ = server_http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(rx)
    }

    /// Unique arrivals of run `tag`, and how many were repeats.
    fn counts(&self, tag: u64) -> (u64, u64) {
        let b = self.books.lock();
        let mine = b.seen.iter().filter(|((t, _), _)| *t == tag);
        let (mut unique, mut dup) = (0, 0);
        for (_, n) in mine {
            unique += 1;
            dup += u64::from(n.saturating_sub(1));
        }
        (unique, dup)
    }

    fn reset_timing(&self) {
        let mut b = self.books.lock();
        b.latency = Latencies::default();
        b.first = None;
        b.last = None;
    }
}

async fn handle(
    req: Request<hyper::body::Incoming>,
    rx: Arc<Receiver>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if rx.down.load(Ordering::Acquire) {
        // Down: a request on a connection opened before fails too, and the
        // connection is closed (new ones are refused at accept).
        let mut res = Response::new(Full::new(Bytes::new()));
        *res.status_mut() = hyper::StatusCode::SERVICE_UNAVAILABLE;
        res.headers_mut().insert(
            hyper::header::CONNECTION,
            hyper::header::HeaderValue::from_static("close"),
        );
        return Ok(res);
    }
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    rx.requests.fetch_add(1, Ordering::Relaxed);
    if let Ok(v) = serde_json::from_slice::<Value>(&body) {
        let data = &v["data"];
        if let (Some(tag), Some(seq), Some(ts)) = (
            data["tag"].as_u64(),
            data["seq"].as_u64(),
            data["ts"].as_u64(),
        ) {
            let now = Instant::now();
            let lat = (now_unix_nanos() as u64).saturating_sub(ts) / 1000;
            let mut b = rx.books.lock();
            *b.seen.entry((tag, seq)).or_default() += 1;
            b.latency.record(lat);
            b.first.get_or_insert(now);
            b.last = Some(now);
        }
    }
    Ok(Response::new(Full::new(Bytes::new())))
}

/// `webhook`: see the module comment.
pub(crate) async fn mode_webhook(
    opts: &Opts,
    ep: Arc<Endpoint>,
    srv: &Server,
) -> BoxResult<Report> {
    if ep.target != Target::Eventgate {
        return Err("webhook needs --target eventgate".into());
    }
    let rx = Receiver::start().await?;
    let mut r = Report::new();
    header(&mut r, opts, Mode::Webhook);
    let secs = Duration::from_secs_f64(opts.secs);
    // 1. raw
    let (raw_rate, raw_lat) = raw_posts(rx.addr, opts.publishers.max(1), secs).await?;
    r.num("raw_posts_per_sec", raw_rate, 0);
    r.num("raw_p99_ms", raw_lat.quantile(0.99) as f64 / 1000.0, 3);
    r.num("raw_p50_ms", raw_lat.quantile(0.50) as f64 / 1000.0, 3);
    // Instances: bench-0 with a webhook, bench-1 without.
    let mut conn = HttpConn::new(&ep)?;
    for (name, hook) in [("bench-0", true), ("bench-1", false)] {
        let body = json!({"name": name});
        let _ = conn
            .request(
                Method::POST,
                "/api/instance/new",
                Bytes::from(body.to_string()),
            )
            .await?;
        if hook {
            let url = format!("http://{}/hook", rx.addr);
            let reply = conn
                .request(
                    Method::POST,
                    "/api/events/webhook/bench-0",
                    Bytes::from(json!({"enabled": true, "url": url}).to_string()),
                )
                .await?;
            if reply.status != 200 {
                return Err(format!(
                    "webhook set: HTTP {} {}",
                    reply.status,
                    String::from_utf8_lossy(&reply.body)
                ));
            }
        }
    }
    // 2. sustained
    rx.reset_timing();
    let tag = 1;
    let (accepted, _) = publish_for(&ep, opts.publishers.max(1), "bench-0", tag, secs, None).await;
    // Deliveries past the backlog bound became dead letters at once: counted
    // apart from losses (the bench lifts the bound; this says if it was hit).
    let dead = dead_letters(&mut conn, "bench-0").await?;
    let drained = drain(&rx, tag, accepted.saturating_sub(dead)).await;
    let (unique, dup) = rx.counts(tag);
    let span = {
        let b = rx.books.lock();
        b.first
            .zip(b.last)
            .map(|(a, z)| z.duration_since(a).as_secs_f64())
    };
    let sustained = span
        .filter(|s| *s > 0.0)
        .map(|s| unique as f64 / s)
        .unwrap_or(0.0);
    r.int("sustained_accepted", accepted);
    r.num("sustained_deliveries_per_sec", sustained, 0);
    r.num("sustained_ratio_to_raw", sustained / raw_rate.max(1.0), 3);
    r.int("sustained_dead_letters", dead);
    r.int("sustained_lost", accepted.saturating_sub(unique + dead));
    r.int("sustained_duplicates", dup);
    r.num("sustained_drain_secs", drained.as_secs_f64(), 2);
    // 3. fixed at 20%
    rx.reset_timing();
    let tag = 2;
    let rate = (sustained * 0.2).max(10.0);
    let (accepted, _) = publish_for(&ep, 1, "bench-0", tag, secs, Some(rate)).await;
    drain(&rx, tag, accepted).await;
    let fixed_p99 = rx.books.lock().latency.quantile(0.99) as f64 / 1000.0;
    r.num("fixed_rate_events_per_sec", rate, 0);
    r.num("fixed_p99_ms", fixed_p99, 3);
    r.num(
        "fixed_p99_ratio_to_raw",
        fixed_p99 / (raw_lat.quantile(0.99) as f64 / 1000.0).max(0.001),
        2,
    );
    r.num(
        "fixed_p50_ms",
        rx.books.lock().latency.quantile(0.50) as f64 / 1000.0,
        3,
    );
    r.int("fixed_lost", accepted.saturating_sub(rx.counts(tag).0));
    rx.reset_timing();
    let tag = 6;
    let accepted = publish_singles(&ep, "bench-0", tag, secs, rate).await;
    drain(&rx, tag, accepted).await;
    let (p50, p99) = {
        let b = rx.books.lock();
        (b.latency.quantile(0.50), b.latency.quantile(0.99))
    };
    r.num("fixed_single_p50_ms", p50 as f64 / 1000.0, 3);
    r.num("fixed_single_p99_ms", p99 as f64 / 1000.0, 3);
    r.num(
        "fixed_single_p99_ratio_to_raw",
        p99 as f64 / (raw_lat.quantile(0.99) as f64).max(1.0),
        2,
    );
    r.int(
        "fixed_single_lost",
        accepted.saturating_sub(rx.counts(tag).0),
    );
    // 4. publish rate with and without a webhook
    let (with, with_secs) =
        publish_for(&ep, opts.publishers.max(1), "bench-0", 3, secs, None).await;
    let (without, without_secs) =
        publish_for(&ep, opts.publishers.max(1), "bench-1", 4, secs, None).await;
    let with_rate = with as f64 / with_secs.max(0.001);
    let without_rate = without as f64 / without_secs.max(0.001);
    r.num("publish_with_webhook_events_per_sec", with_rate, 0);
    r.num("publish_without_webhook_events_per_sec", without_rate, 0);
    r.num("publish_ratio", with_rate / without_rate.max(1.0), 3);
    drain(&rx, 3, with).await;
    // 5. backlog
    let backlog = opts.backlog.max(BATCH as u64);
    rx.down.store(true, Ordering::Release);
    let rss_before = srv.rss();
    let tag = 5;
    let mut rss_max = rss_before.unwrap_or(0);
    let mut queued = 0u64;
    let mut seq = 0u64;
    while queued < backlog {
        let reply = conn
            .request(
                Method::POST,
                "/api/events/publish/bench-0",
                batch_body(tag, &mut seq),
            )
            .await?;
        if reply.status == 202 {
            queued += BATCH as u64;
        }
        if queued % 10_000 == 0 {
            rss_max = rss_max.max(srv.rss().unwrap_or(0));
        }
    }
    let rss_queued = srv.rss();
    rx.reset_timing();
    rx.down.store(false, Ordering::Release);
    let t0 = Instant::now();
    let drained = drain(&rx, tag, queued).await;
    let (unique, _) = rx.counts(tag);
    r.int("backlog_events", queued);
    r.opt_num(
        "backlog_rss_before_mib",
        rss_before.map(|v| v as f64 / 1024.0),
        1,
    );
    r.opt_num(
        "backlog_rss_queued_mib",
        rss_queued.map(|v| v as f64 / 1024.0),
        1,
    );
    r.num("backlog_rss_max_mib", rss_max as f64 / 1024.0, 1);
    r.num("backlog_drain_secs", drained.as_secs_f64(), 2);
    r.num(
        "backlog_drain_per_sec",
        unique as f64 / t0.elapsed().as_secs_f64().max(0.001),
        0,
    );
    r.int("backlog_lost", queued.saturating_sub(unique));
    // 6. kills
    if let Some(cmd) = &opts.restart_cmd {
        let tag = 6;
        let stop = Arc::new(AtomicBool::new(false));
        let publishing = {
            let (ep, stop) = (ep.clone(), stop.clone());
            tokio::spawn(async move { publish_until(&ep, "bench-0", tag, &stop).await })
        };
        for _ in 0..opts.kills {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let status = tokio::process::Command::new("sh")
                .arg("-c")
                .arg(cmd)
                .status()
                .await;
            if !matches!(status, Ok(s) if s.success()) {
                return Err(format!("--restart-cmd failed: {status:?}"));
            }
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        stop.store(true, Ordering::Release);
        let acked = publishing.await.map_err(|e| e.to_string())?;
        drain(&rx, tag, acked).await;
        let (unique, dup) = rx.counts(tag);
        r.int("kills", u64::from(opts.kills));
        r.int("kills_acknowledged", acked);
        r.int("kills_lost", acked.saturating_sub(unique));
        r.int("kills_duplicates", dup);
    }
    Ok(r)
}

/// A publish body of `BATCH` events of run `tag`, numbered from `seq`.
fn batch_body(tag: u64, seq: &mut u64) -> Bytes {
    let ts = now_unix_nanos();
    let items: Vec<Value> = (0..BATCH)
        .map(|_| {
            *seq += 1;
            json!({"event": "message.status", "data": {"tag": tag, "seq": *seq, "ts": ts as u64}})
        })
        .collect();
    Bytes::from(Value::Array(items).to_string())
}

/// Publishes batches to `instance` for `secs` (at `rate` events/s when
/// given) from `publishers` connections: events accepted and seconds taken.
async fn publish_for(
    ep: &Arc<Endpoint>,
    publishers: usize,
    instance: &str,
    tag: u64,
    secs: Duration,
    rate: Option<f64>,
) -> (u64, f64) {
    let t0 = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..publishers {
        let (ep, next, instance) = (ep.clone(), next.clone(), instance.to_string());
        tasks.push(tokio::spawn(async move {
            let Ok(mut conn) = HttpConn::new(&ep) else {
                return 0u64;
            };
            let mut accepted = 0u64;
            let path = format!("/api/events/publish/{instance}");
            while t0.elapsed() < secs {
                let first = next.fetch_add(BATCH as u64, Ordering::AcqRel);
                let mut seq = first;
                if let Ok(reply) = conn
                    .request(Method::POST, &path, batch_body(tag, &mut seq))
                    .await
                {
                    if reply.status == 202 {
                        accepted += BATCH as u64;
                    }
                }
                if let Some(rate) = rate {
                    let due = Duration::from_secs_f64((first + BATCH as u64) as f64 / rate);
                    if let Some(wait) = due.checked_sub(t0.elapsed()) {
                        tokio::time::sleep(wait).await;
                    }
                }
            }
            accepted
        }));
    }
    let mut accepted = 0;
    for t in tasks {
        accepted += t.await.unwrap_or(0);
    }
    (accepted, t0.elapsed().as_secs_f64())
}

/// Connections [`publish_singles`] spreads its publishes over: enough that
/// a publish waiting for its commit does not delay the next one due.
const SINGLE_PUBLISHERS: usize = 16;

/// Publishes events of run `tag` one per request at `rate` events/s, evenly
/// spaced, for `secs`, each stamped when it is sent: events accepted.
async fn publish_singles(
    ep: &Arc<Endpoint>,
    instance: &str,
    tag: u64,
    secs: Duration,
    rate: f64,
) -> u64 {
    let t0 = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..SINGLE_PUBLISHERS {
        let (ep, next, path) = (
            ep.clone(),
            next.clone(),
            format!("/api/events/publish/{instance}"),
        );
        tasks.push(tokio::spawn(async move {
            let Ok(mut conn) = HttpConn::new(&ep) else {
                return 0u64;
            };
            let mut accepted = 0u64;
            loop {
                let i = next.fetch_add(1, Ordering::AcqRel);
                let due = Duration::from_secs_f64(i as f64 / rate);
                if due >= secs {
                    return accepted;
                }
                if let Some(wait) = due.checked_sub(t0.elapsed()) {
                    tokio::time::sleep(wait).await;
                }
                let body = json!([{"event": "message.status",
                    "data": {"tag": tag, "seq": i + 1, "ts": now_unix_nanos() as u64}}]);
                if let Ok(reply) = conn
                    .request(Method::POST, &path, Bytes::from(body.to_string()))
                    .await
                {
                    if reply.status == 202 {
                        accepted += 1;
                    }
                }
            }
        }));
    }
    let mut accepted = 0;
    for t in tasks {
        accepted += t.await.unwrap_or(0);
    }
    accepted
}

/// Publishes until `stop`, surviving a server that goes away: events acknowledged.
async fn publish_until(ep: &Arc<Endpoint>, instance: &str, tag: u64, stop: &AtomicBool) -> u64 {
    let mut accepted = 0u64;
    let mut seq = 0u64;
    let path = format!("/api/events/publish/{instance}");
    while !stop.load(Ordering::Acquire) {
        let Ok(mut conn) = HttpConn::new(ep) else {
            return accepted;
        };
        while !stop.load(Ordering::Acquire) {
            match conn
                .request(Method::POST, &path, batch_body(tag, &mut seq))
                .await
            {
                Ok(reply) if reply.status == 202 => accepted += BATCH as u64,
                Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    break;
                }
            }
        }
    }
    accepted
}

/// The dead letters of `instance`'s default webhook (its stats' `failed`).
async fn dead_letters(conn: &mut HttpConn, instance: &str) -> BoxResult<u64> {
    let reply = conn
        .request(
            Method::GET,
            &format!("/api/events/getWebhook/{instance}?label=default"),
            Bytes::new(),
        )
        .await?;
    let body: serde_json::Value =
        serde_json::from_slice(&reply.body).map_err(|e| format!("webhook stats: {e}"))?;
    body["webhook"]["stats"]["failed"]
        .as_u64()
        .ok_or_else(|| format!("webhook stats: HTTP {} without stats.failed", reply.status))
}

/// Waits until `expected` unique events of `tag` arrived: how long it took.
async fn drain(rx: &Receiver, tag: u64, expected: u64) -> Duration {
    let t0 = Instant::now();
    while rx.counts(tag).0 < expected && t0.elapsed() < DRAIN_LIMIT {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    t0.elapsed()
}

/// The tool's own POSTs to the receiver: requests/s and their latency.
async fn raw_posts(
    addr: std::net::SocketAddr,
    conns: usize,
    secs: Duration,
) -> BoxResult<(f64, Latencies)> {
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..conns {
        tasks.push(tokio::spawn(async move {
            let mut lat = Latencies::default();
            let mut n = 0u64;
            let Ok(stream) = tokio::net::TcpStream::connect(addr).await else {
                return (0, lat);
            };
            let _ = stream.set_nodelay(true);
            let Ok((mut sender, conn)) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
            else {
                return (0, lat);
            };
            tokio::spawn(conn);
            let body = Bytes::from(
                json!({"event": "message.status", "data": {"pad": "x".repeat(200)}}).to_string(),
            );
            while t0.elapsed() < secs {
                let mut req = Request::new(Full::new(body.clone()));
                *req.method_mut() = Method::POST;
                *req.uri_mut() = hyper::Uri::from_static("/hook");
                req.headers_mut().insert(
                    hyper::header::HOST,
                    hyper::header::HeaderValue::from_static("127.0.0.1"),
                );
                req.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static("application/json"),
                );
                let start = Instant::now();
                if sender.ready().await.is_err() {
                    break;
                }
                match sender.send_request(req).await {
                    Ok(res) => {
                        let _ = res.into_body().collect().await;
                        lat.record(start.elapsed().as_micros() as u64);
                        n += 1;
                    }
                    Err(_) => break,
                }
            }
            (n, lat)
        }));
    }
    let mut total = 0;
    let mut all = Latencies::default();
    for t in tasks {
        let (n, lat) = t.await.map_err(|e| e.to_string())?;
        total += n;
        all.merge(&lat);
    }
    Ok((total as f64 / t0.elapsed().as_secs_f64(), all))
}
