//! The soak's webhook receivers: one HTTP server on 127.0.0.1 per
//! persistent instance, each in a mode the soak sets — answering at once,
//! slowly (within the gateway's timeout), with 500, past the timeout, or not
//! listening at all — and recording which events arrived, how often, and
//! whether media base64 was stripped as the webhook asked.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use tokio::net::TcpListener;

use crate::BoxResult;

/// How a receiver answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Mode {
    Normal = 0,
    /// Answers 200 after 1.5 s (inside the gateway's 3 s timeout).
    Slow = 1,
    /// Answers 500.
    Fail500 = 2,
    /// Answers after 5 s, past the timeout.
    Timeout = 3,
    /// Closes every connection at once without answering (as if down).
    Down = 4,
}

impl Mode {
    fn from_u8(v: u8) -> Mode {
        match v {
            1 => Mode::Slow,
            2 => Mode::Fail500,
            3 => Mode::Timeout,
            4 => Mode::Down,
            _ => Mode::Normal,
        }
    }
}

/// One event as it arrived.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Arrival {
    pub(crate) count: u32,
    /// Whether the body still had `data.message.media.base64`.
    pub(crate) media: bool,
}

struct Receiver {
    addr: SocketAddr,
    mode: AtomicU8,
    /// Arrivals by instance, then by sequence number.
    seen: Mutex<HashMap<String, HashMap<u64, Arrival>>>,
    requests: AtomicU64,
}

/// Every receiver of the soak.
pub(crate) struct Receivers {
    all: Vec<Arc<Receiver>>,
}

impl Receivers {
    /// Starts `n` receivers on free loopback ports.
    pub(crate) async fn start(n: usize) -> BoxResult<Receivers> {
        let mut all = Vec::with_capacity(n);
        for _ in 0..n {
            let listener = TcpListener::bind("127.0.0.1:0")
                .await
                .map_err(|e| format!("receiver: {e}"))?;
            let addr = listener
                .local_addr()
                .map_err(|e| format!("receiver: {e}"))?;
            let rx = Arc::new(Receiver {
                addr,
                mode: AtomicU8::new(Mode::Normal as u8),
                seen: Mutex::new(HashMap::new()),
                requests: AtomicU64::new(0),
            });
            tokio::spawn(serve(listener, rx.clone()));
            all.push(rx);
        }
        Ok(Receivers { all })
    }

    /// The URL of receiver `i` for `instance`'s webhook.
    pub(crate) fn url(&self, i: usize, instance: &str) -> String {
        let addr = self
            .all
            .get(i % self.all.len().max(1))
            .map(|r| r.addr.to_string())
            .unwrap_or_default();
        format!("http://{addr}/hook/{instance}")
    }

    pub(crate) fn set(&self, i: usize, mode: Mode) {
        if let Some(r) = self.all.get(i) {
            r.mode.store(mode as u8, Ordering::Release);
        }
    }

    pub(crate) fn set_all(&self, mode: Mode) {
        for r in &self.all {
            r.mode.store(mode as u8, Ordering::Release);
        }
    }

    /// What arrived for `instance`, by sequence number.
    pub(crate) fn seen(&self, instance: &str) -> HashMap<u64, Arrival> {
        let mut out = HashMap::new();
        for r in &self.all {
            if let Some(m) = r.seen.lock().get(instance) {
                out.extend(m.iter().map(|(k, v)| (*k, *v)));
            }
        }
        out
    }

    /// Requests received by all receivers so far.
    pub(crate) fn requests(&self) -> u64 {
        self.all
            .iter()
            .map(|r| r.requests.load(Ordering::Relaxed))
            .sum()
    }
}

async fn serve(listener: TcpListener, rx: Arc<Receiver>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        if Mode::from_u8(rx.mode.load(Ordering::Acquire)) == Mode::Down {
            drop(stream);
            continue;
        }
        let rx = rx.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(req, rx.clone()));
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn handle(
    req: Request<hyper::body::Incoming>,
    rx: Arc<Receiver>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => Bytes::new(),
    };
    rx.requests.fetch_add(1, Ordering::Relaxed);
    let status = match Mode::from_u8(rx.mode.load(Ordering::Acquire)) {
        Mode::Normal => 200,
        Mode::Slow => {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            200
        }
        Mode::Fail500 => 500,
        Mode::Timeout => {
            tokio::time::sleep(Duration::from_secs(5)).await;
            200
        }
        // Down between accept and request: answer nothing useful.
        Mode::Down => 503,
    };
    if status == 200 {
        record(&rx, &body);
    }
    let mut res = Response::new(Full::new(Bytes::new()));
    *res.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::OK);
    Ok(res)
}

/// Counts an envelope that was answered with success (a timed-out answer
/// counts too: the gateway retries it, and that is a duplicate by design).
fn record(rx: &Receiver, body: &[u8]) {
    let Ok(envelope) = serde_json::from_slice::<serde_json::Value>(body) else {
        return;
    };
    let data = &envelope["data"];
    let (Some(instance), Some(seq)) = (data["i"].as_str(), data["seq"].as_u64()) else {
        return;
    };
    let media = !data["message"]["media"]["base64"].is_null();
    let mut seen = rx.seen.lock();
    let arrival = seen
        .entry(instance.to_string())
        .or_default()
        .entry(seq)
        .or_default();
    arrival.count += 1;
    arrival.media |= media;
}
