//! A real webhook receiver for the tests: an HTTP server on 127.0.0.1 that
//! records every request (path, headers, body, time) and answers as the test
//! tells it (status, headers, holding the reply until released).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use parking_lot::Mutex;
use serde_json::Value;

/// One request the receiver got.
#[derive(Debug, Clone)]
pub struct Got {
    pub path: String,
    pub query: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub at: Instant,
}

impl Got {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// How many headers of that name arrived.
    pub fn header_count(&self, name: &str) -> usize {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .count()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }

    pub fn id(&self) -> String {
        self.header("webhook-id").unwrap().to_string()
    }

    pub fn attempt(&self) -> u32 {
        self.header("eventgate-attempt").unwrap().parse().unwrap()
    }

    /// The headers as the `http` crate's map (for the Standard Webhooks verifier).
    pub fn header_map(&self) -> reqwest::header::HeaderMap {
        let mut map = reqwest::header::HeaderMap::new();
        for (k, v) in &self.headers {
            map.append(
                reqwest::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                reqwest::header::HeaderValue::from_str(v).unwrap(),
            );
        }
        map
    }
}

/// What the receiver answers: status and extra headers, for the n-th request (0-based).
pub type Answer = Arc<dyn Fn(&Got, usize) -> (u16, Vec<(&'static str, String)>) + Send + Sync>;

struct Inner {
    got: Mutex<Vec<Got>>,
    answer: Mutex<Answer>,
    /// While set, replies are held (the request is recorded at once).
    hold: Mutex<bool>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    completed: AtomicUsize,
    /// TCP connections accepted.
    connections: AtomicUsize,
}

/// A running receiver.
#[derive(Clone)]
pub struct Receiver {
    pub addr: SocketAddr,
    inner: Arc<Inner>,
    handle: Arc<Mutex<Option<actix_web::dev::ServerHandle>>>,
}

async fn handle(req: HttpRequest, body: web::Bytes, inner: web::Data<Inner>) -> HttpResponse {
    let got = Got {
        path: req.path().to_string(),
        query: req.query_string().to_string(),
        headers: req
            .headers()
            .iter()
            .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
            .collect(),
        body: body.to_vec(),
        at: Instant::now(),
    };
    let n = {
        let mut all = inner.got.lock();
        all.push(got.clone());
        all.len() - 1
    };
    let now = inner.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    inner.max_in_flight.fetch_max(now, Ordering::SeqCst);
    while *inner.hold.lock() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let answer = inner.answer.lock().clone();
    let (status, headers) = answer(&got, n);
    inner.in_flight.fetch_sub(1, Ordering::SeqCst);
    inner.completed.fetch_add(1, Ordering::SeqCst);
    let mut res = HttpResponse::build(actix_web::http::StatusCode::from_u16(status).unwrap());
    for (k, v) in headers {
        res.insert_header((k, v));
    }
    res.body("ok")
}

impl Receiver {
    /// A receiver answering 200 to everything, on a free port.
    pub fn start() -> Receiver {
        Self::start_on(0)
    }

    /// A receiver on `port` (0 = any free one).
    pub fn start_on(port: u16) -> Receiver {
        let inner = Arc::new(Inner {
            got: Mutex::new(Vec::new()),
            answer: Mutex::new(Arc::new(|_, _| (200, Vec::new()))),
            hold: Mutex::new(false),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            completed: AtomicUsize::new(0),
            connections: AtomicUsize::new(0),
        });
        let listener = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
        let addr = listener.local_addr().unwrap();
        let data = web::Data::from(inner.clone());
        let accepted = inner.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            actix_rt::System::new().block_on(async move {
                let server = HttpServer::new(move || {
                    App::new()
                        .app_data(data.clone())
                        .default_service(web::to(handle))
                })
                .on_connect(move |_, _| {
                    accepted.connections.fetch_add(1, Ordering::SeqCst);
                })
                .workers(2)
                .disable_signals()
                .shutdown_timeout(0)
                .listen(listener)
                .unwrap()
                .run();
                tx.send(server.handle()).unwrap();
                let _ = server.await;
            });
        });
        let handle = rx.recv().unwrap();
        Receiver {
            addr,
            inner,
            handle: Arc::new(Mutex::new(Some(handle))),
        }
    }

    /// Stops listening (connections are refused afterwards).
    pub async fn stop(&self) {
        let handle = self.handle.lock().take();
        if let Some(h) = handle {
            h.stop(false).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// The URL through the name `localhost` (resolved by the gateway).
    pub fn localhost_url(&self, path: &str) -> String {
        format!("http://localhost:{}{}", self.addr.port(), path)
    }

    pub fn answer(
        &self,
        f: impl Fn(&Got, usize) -> (u16, Vec<(&'static str, String)>) + Send + Sync + 'static,
    ) {
        *self.inner.answer.lock() = Arc::new(f);
    }

    pub fn hold(&self, on: bool) {
        *self.inner.hold.lock() = on;
    }

    pub fn got(&self) -> Vec<Got> {
        self.inner.got.lock().clone()
    }

    pub fn count(&self) -> usize {
        self.inner.got.lock().len()
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.inner.connections.load(Ordering::SeqCst)
    }

    pub fn max_in_flight(&self) -> usize {
        self.inner.max_in_flight.load(Ordering::SeqCst)
    }

    pub fn completed(&self) -> usize {
        self.inner.completed.load(Ordering::SeqCst)
    }

    /// Waits until `cond` holds for what was received, or fails after `wait`.
    pub async fn wait_for(
        &self,
        wait: Duration,
        what: &str,
        cond: impl Fn(&[Got]) -> bool,
    ) -> Vec<Got> {
        let deadline = Instant::now() + wait;
        loop {
            let got = self.got();
            if cond(&got) {
                return got;
            }
            if Instant::now() > deadline {
                panic!(
                    "receiver never saw {what}; got {} requests: {:?}",
                    got.len(),
                    got.iter()
                        .map(|g| (&g.path, String::from_utf8_lossy(&g.body)))
                        .collect::<Vec<_>>()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits for at least `n` requests.
    pub async fn wait_count(&self, n: usize, wait: Duration) -> Vec<Got> {
        self.wait_for(wait, &format!("{n} requests"), |g| g.len() >= n)
            .await
    }
}

/// Polls `f` until it returns `Some` ([`super::common::eventually`]), or
/// fails after `wait` naming `what`.
pub async fn eventually<T, F, Fut>(wait: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    super::common::eventually(wait, async || f().await)
        .await
        .unwrap_or_else(|| panic!("timed out waiting for {what}"))
}
