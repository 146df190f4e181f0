//! Publishing: keep-alive HTTP/1.1 connections (hyper's client connection,
//! one per publisher, one request in flight on each) that post events at a
//! fixed rate or as fast as replies come, and the creation of eventgate's
//! bench instances. Owns the publish counters (acknowledged per instance,
//! errors); must not look at what clients receive.

use crate::target::{now_unix_nanos, Endpoint, Target};
use crate::BoxResult;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE, HOST};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde_json::json;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

/// One keep-alive HTTP/1.1 connection to the target, opened on first use
/// and again after the server closed it.
pub(crate) struct HttpConn {
    addr: SocketAddr,
    /// Host, content type and the target's auth, sent with every request.
    headers: HeaderMap,
    sender: Option<SendRequest<Full<Bytes>>>,
}

/// Status and body of a reply.
pub(crate) struct HttpReply {
    pub(crate) status: u16,
    pub(crate) body: Bytes,
}

impl HttpConn {
    pub(crate) fn new(ep: &Endpoint) -> BoxResult<HttpConn> {
        let value =
            |v: &str| HeaderValue::from_str(v).map_err(|e| format!("header value {v:?}: {e}"));
        let mut headers = HeaderMap::new();
        headers.insert(HOST, value(&ep.host)?);
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        for (k, v) in ep.auth_headers() {
            headers.insert(HeaderName::from_static(k), value(&v)?);
        }
        Ok(HttpConn {
            addr: ep.addr,
            headers,
            sender: None,
        })
    }

    async fn connect(&self) -> BoxResult<SendRequest<Full<Bytes>>> {
        let s = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(self.addr))
            .await
            .map_err(|_| format!("connect to {} timed out", self.addr))?
            .map_err(|e| format!("connect to {}: {e}", self.addr))?;
        let _ = s.set_nodelay(true);
        let (sender, conn) = http1::handshake(TokioIo::new(s))
            .await
            .map_err(|e| format!("HTTP/1.1 to {}: {e}", self.addr))?;
        // The connection's I/O runs beside the publisher; it ends when the
        // sender is dropped or the server closes.
        tokio::spawn(conn);
        Ok(sender)
    }

    /// Sends one request and reads the whole reply. A reused connection that
    /// the server closed (idle keep-alive) is retried once on a fresh one.
    pub(crate) async fn request(
        &mut self,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> BoxResult<HttpReply> {
        for attempt in 0..2 {
            let reused = self.sender.is_some();
            let sender = match self.sender.as_mut() {
                Some(s) => s,
                None => self.sender.insert(self.connect().await?),
            };
            let mut req = Request::new(Full::new(body.clone()));
            *req.method_mut() = method.clone();
            *req.uri_mut() = path.parse().map_err(|e| format!("path {path:?}: {e}"))?;
            *req.headers_mut() = self.headers.clone();
            let exchange = async {
                sender.ready().await?;
                let reply = sender.send_request(req).await?;
                let status = reply.status().as_u16();
                let body = reply.into_body().collect().await?.to_bytes();
                Ok::<_, hyper::Error>(HttpReply { status, body })
            };
            match tokio::time::timeout(Duration::from_secs(30), exchange).await {
                Ok(Ok(reply)) => return Ok(reply),
                Ok(Err(e)) => {
                    self.sender = None;
                    let closed = e.is_closed() || e.is_canceled() || e.is_incomplete_message();
                    if !(reused && closed && attempt == 0) {
                        return Err(format!("{method} {path}: {e}"));
                    }
                }
                Err(_) => {
                    self.sender = None;
                    return Err(format!("{method} {path}: no reply within 30 s"));
                }
            }
        }
        Err(format!("{method} {path}: connection closed"))
    }
}

// ---------------------------------------------------------------------------
// Publishers
// ---------------------------------------------------------------------------

/// What the publishers of one run share.
pub(crate) struct PubShared {
    /// The target.
    ep: Arc<Endpoint>,
    /// Instances published to, round robin.
    instances: usize,
    /// Next event number over all instances (picks the instance).
    next: AtomicU64,
    /// Next seq per instance.
    seq: Vec<AtomicU64>,
    /// Publishes acknowledged (2xx) per instance.
    pub(crate) ok: Vec<AtomicU64>,
    /// Publishes refused or failed.
    pub(crate) errors: AtomicU64,
    /// The first of those errors.
    pub(crate) first_error: std::sync::Mutex<Option<String>>,
    /// Approximate size of a publish body.
    event_bytes: usize,
}

impl PubShared {
    /// Shares the publishers' state for a run over `instances`.
    pub(crate) fn new(ep: Arc<Endpoint>, instances: usize, event_bytes: usize) -> PubShared {
        PubShared {
            ep,
            instances,
            next: AtomicU64::new(0),
            seq: (0..instances).map(|_| AtomicU64::new(0)).collect(),
            ok: (0..instances).map(|_| AtomicU64::new(0)).collect(),
            errors: AtomicU64::new(0),
            first_error: std::sync::Mutex::new(None),
            event_bytes,
        }
    }

    fn note_error(&self, e: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut g) = self.first_error.lock() {
            if g.is_none() {
                *g = Some(e);
            }
        }
    }
}

/// Publisher `p`: until `until`, one publish at a time on its own
/// connection, every `interval` (from `offset`) or as fast as replies come.
pub(crate) async fn publisher(
    p: usize,
    sh: Arc<PubShared>,
    until: Instant,
    interval: Option<Duration>,
    offset: Duration,
) {
    let mut conn = match HttpConn::new(&sh.ep) {
        Ok(c) => c,
        Err(e) => return sh.note_error(format!("publish: {e}")),
    };
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
        match conn.request(Method::POST, &paths[inst], body.into()).await {
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
pub(crate) async fn setup_instances(ep: &Endpoint, n: usize) -> BoxResult<()> {
    if ep.target != Target::Eventgate {
        return Ok(());
    }
    let mut conn = HttpConn::new(ep)?;
    for i in 0..n {
        let name = Endpoint::instance_name(i);
        let body = json!({"name": name, "websocketEnabled": true}).to_string();
        let r = conn
            .request(Method::POST, "/api/instance/new", body.into())
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
