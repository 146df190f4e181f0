//! The HTTP client of webhook deliveries (contract §11): one `POST` per
//! attempt over HTTP/1.1, with TLS (rustls, the platform's trust store) for
//! `https` receivers. Keep-alive connections are kept per receiver (scheme,
//! host, port) and reused by the next attempt. There are no redirects and
//! no proxies (a proxy would resolve the name instead of us); the attempt
//! timeout covers connecting, the request and the reply. The
//! refused-address rule is applied to the addresses a name resolves to at
//! the moment of connecting, and only a permitted address is connected to.
//!
//! Built on hyper's connection API rather than a full client: a delivery
//! needs none of a general client's layers (redirects, retries, proxies,
//! cookies), and on a busy node they cost more than the request itself.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderMap, HeaderValue, HOST, RETRY_AFTER};
use http::{Method, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::address::AddressPolicy;

/// How long an unused connection to a receiver is kept.
const IDLE: Duration = Duration::from_secs(60);

/// Most unused connections kept per receiver.
const IDLE_PER_RECEIVER: usize = 64;

/// How much of a reply's body is read (and dropped) so its connection can
/// be reused; a longer body closes the connection instead.
const MAX_REPLY_BODY: usize = 64 * 1024;

/// How long reading a reply's body may take at most.
const REPLY_BODY_TIME: Duration = Duration::from_secs(1);

/// Why the client could not be built.
#[derive(Debug, thiserror::Error)]
#[error("webhook HTTP client: {0}")]
pub struct ClientError(String);

/// Why an attempt got no reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendError {
    /// The name resolved only to addresses the rule refuses.
    Refused,
    /// No reply within the attempt timeout.
    Timeout,
    /// No connection could be made (resolution, TCP or TLS).
    Connect,
    /// The connection failed during the exchange.
    Request,
}

/// What a receiver answered.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub retry_after: Option<HeaderValue>,
}

/// Where deliveries to one URL go, worked out once per URL.
#[derive(Debug, Clone)]
pub struct Endpoint {
    receiver: Receiver,
    /// Origin-form request target (path and query).
    target: Uri,
    host_header: HeaderValue,
}

/// One receiver: the pool's key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Receiver {
    tls: bool,
    host: Host,
    port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Host {
    Name(String),
    Ip(IpAddr),
}

impl Endpoint {
    /// Parses an `http`/`https` URL (`None` if it cannot be sent to).
    pub fn parse(text: &str) -> Option<Endpoint> {
        let url = url::Url::parse(text).ok()?;
        let tls = match url.scheme() {
            "http" => false,
            "https" => true,
            _ => return None,
        };
        let host = match url.host()? {
            url::Host::Domain(d) => Host::Name(d.to_string()),
            url::Host::Ipv4(ip) => Host::Ip(IpAddr::V4(ip)),
            url::Host::Ipv6(ip) => Host::Ip(IpAddr::V6(ip)),
        };
        let port = url.port_or_known_default()?;
        let mut target = url.path().to_string();
        if let Some(q) = url.query() {
            target.push('?');
            target.push_str(q);
        }
        let authority = &url[url::Position::BeforeHost..url::Position::AfterPort];
        Some(Endpoint {
            receiver: Receiver { tls, host, port },
            target: target.parse().ok()?,
            host_header: HeaderValue::from_str(authority).ok()?,
        })
    }
}

/// A kept connection and when it was last used.
struct Idle {
    sender: SendRequest<Full<Bytes>>,
    since: Instant,
}

impl Idle {
    /// Whether it may still be used: open, and unused for less than [`IDLE`].
    fn usable(&self) -> bool {
        self.since.elapsed() < IDLE && !self.sender.is_closed()
    }
}

/// The node's one client for deliveries.
pub struct Client {
    tls: TlsConnector,
    timeout: Duration,
    policy: Arc<AddressPolicy>,
    idle: Mutex<HashMap<Receiver, Vec<Idle>>>,
}

impl Client {
    /// A client with the attempt `timeout` and the refused-address `policy`.
    pub fn new(timeout: Duration, policy: Arc<AddressPolicy>) -> Result<Client, ClientError> {
        use rustls_platform_verifier::BuilderVerifierExt;
        // Another part of the process may have installed it already.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let config = rustls::ClientConfig::builder()
            .with_platform_verifier()
            .map_err(|e| ClientError(e.to_string()))?
            .with_no_client_auth();
        Ok(Client {
            tls: TlsConnector::from(Arc::new(config)),
            timeout,
            policy,
            idle: Mutex::default(),
        })
    }

    /// Posts `body` with `headers` to `to`; the reply's status (and its
    /// `Retry-After`), once its body is read.
    pub async fn post(
        &self,
        to: &Endpoint,
        headers: HeaderMap,
        body: Bytes,
    ) -> Result<Reply, SendError> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        tokio::time::timeout_at(deadline, self.exchange(to, headers, body, deadline))
            .await
            .map_err(|_| SendError::Timeout)?
    }

    async fn exchange(
        &self,
        to: &Endpoint,
        mut headers: HeaderMap,
        body: Bytes,
        deadline: tokio::time::Instant,
    ) -> Result<Reply, SendError> {
        headers.insert(HOST, to.host_header.clone());
        let mut req = Request::new(Full::new(body));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = to.target.clone();
        *req.headers_mut() = headers;
        let kept = match self.checkout(&to.receiver) {
            // Ready once its connection has finished the previous exchange.
            Some(mut s) => s.ready().await.is_ok().then_some(s),
            None => None,
        };
        let reused = kept.is_some();
        let mut sender = match kept {
            Some(s) => s,
            None => self.connect(&to.receiver).await?,
        };
        let res = match sender.try_send_request(req).await {
            Ok(res) => res,
            // A kept connection the receiver closed before the request went
            // out: nothing was sent, so it goes out on a new one.
            Err(mut e) if reused => {
                let req = e.take_message().ok_or(SendError::Request)?;
                sender = self.connect(&to.receiver).await?;
                sender
                    .send_request(req)
                    .await
                    .map_err(failed(SendError::Request, "request"))?
            }
            Err(e) => return Err(failed(SendError::Request, "request")(e.into_error())),
        };
        let status = res.status().as_u16();
        let retry_after = res.headers().get(RETRY_AFTER).cloned();
        // Reading the (short) reply to its end lets the connection be
        // reused; a long or slow one closes it instead.
        let read_until = deadline.min(tokio::time::Instant::now() + REPLY_BODY_TIME);
        let mut body = res.into_body();
        let mut read = 0usize;
        let complete = loop {
            match tokio::time::timeout_at(read_until, body.frame()).await {
                Ok(Some(Ok(frame))) => {
                    read += frame.data_ref().map_or(0, Bytes::len);
                    if read > MAX_REPLY_BODY {
                        break false;
                    }
                }
                Ok(None) => break true,
                Ok(Some(Err(_))) | Err(_) => break false,
            }
        };
        if complete {
            self.keep(&to.receiver, sender);
        }
        Ok(Reply {
            status,
            retry_after,
        })
    }

    /// A kept connection to `to` that is still open.
    fn checkout(&self, to: &Receiver) -> Option<SendRequest<Full<Bytes>>> {
        let mut idle = self.idle.lock();
        let kept = idle.get_mut(to)?;
        while let Some(c) = kept.pop() {
            if c.usable() {
                return Some(c.sender);
            }
        }
        None
    }

    fn keep(&self, to: &Receiver, sender: SendRequest<Full<Bytes>>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock();
        let kept = idle.entry(to.clone()).or_default();
        kept.retain(Idle::usable);
        if kept.len() < IDLE_PER_RECEIVER {
            kept.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }

    /// Closes the connections unused for [`IDLE`] (also of receivers no
    /// attempt goes to any more).
    pub fn sweep(&self) {
        let mut idle = self.idle.lock();
        for kept in idle.values_mut() {
            kept.retain(Idle::usable);
        }
        idle.retain(|_, kept| !kept.is_empty());
    }

    /// A new connection to `to`: the name resolved now, the refused
    /// addresses dropped, the rest tried in order.
    async fn connect(&self, to: &Receiver) -> Result<SendRequest<Full<Bytes>>, SendError> {
        let found: Vec<SocketAddr> = match &to.host {
            Host::Ip(ip) => vec![SocketAddr::new(*ip, to.port)],
            Host::Name(name) => tokio::net::lookup_host((name.as_str(), to.port))
                .await
                .map_err(failed(SendError::Connect, "name resolution"))?
                .collect(),
        };
        let permitted: Vec<SocketAddr> = found
            .iter()
            .copied()
            .filter(|a| self.policy.permits(a.ip()))
            .collect();
        if permitted.is_empty() {
            return Err(if found.is_empty() {
                SendError::Connect
            } else {
                SendError::Refused
            });
        }
        // Each address gets its share of the timeout, so one that never
        // answers (an unreachable IPv6 route) leaves time for the next.
        let share = self.timeout / u32::try_from(permitted.len()).unwrap_or(u32::MAX);
        let mut stream = None;
        for addr in permitted {
            match tokio::time::timeout(share, TcpStream::connect(addr)).await {
                Ok(Ok(s)) => {
                    stream = Some(s);
                    break;
                }
                Ok(Err(e)) => log::debug!("webhook connection to {addr} failed: {e}"),
                Err(_) => log::debug!("webhook connection to {addr} timed out"),
            }
        }
        let stream = stream.ok_or(SendError::Connect)?;
        let _ = stream.set_nodelay(true);
        if to.tls {
            let name = match &to.host {
                Host::Name(n) => rustls::pki_types::ServerName::try_from(n.clone())
                    .map_err(failed(SendError::Connect, "TLS server name"))?,
                Host::Ip(ip) => rustls::pki_types::ServerName::IpAddress((*ip).into()),
            };
            let tls = self
                .tls
                .connect(name, stream)
                .await
                .map_err(failed(SendError::Connect, "TLS handshake"))?;
            handshake(tls).await
        } else {
            handshake(stream).await
        }
    }
}

/// Logs why a step failed (the attempt's error names only its kind).
fn failed<E: std::fmt::Display>(
    kind: SendError,
    step: &'static str,
) -> impl FnOnce(E) -> SendError {
    move |e| {
        log::debug!("webhook {step} failed: {e}");
        kind
    }
}

/// Starts HTTP/1.1 on `io`; its connection runs as a task of its own.
async fn handshake<T>(io: T) -> Result<SendRequest<Full<Bytes>>, SendError>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let (sender, conn) = http1::handshake(TokioIo::new(io))
        .await
        .map_err(failed(SendError::Connect, "HTTP handshake"))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            log::debug!("webhook connection ended: {e}");
        }
    });
    Ok(sender)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        let e = Endpoint::parse("https://hooks.example:8443/a/b?x=1").unwrap();
        assert!(e.receiver.tls);
        assert_eq!(e.receiver.port, 8443);
        assert_eq!(e.receiver.host, Host::Name("hooks.example".into()));
        assert_eq!(e.target, "/a/b?x=1");
        assert_eq!(e.host_header, "hooks.example:8443");
        let e = Endpoint::parse("http://[::1]/").unwrap();
        assert_eq!(e.receiver.port, 80);
        assert_eq!(e.receiver.host, Host::Ip("::1".parse().unwrap()));
        assert_eq!(e.host_header, "[::1]");
        let e = Endpoint::parse("http://10.0.0.1:81").unwrap();
        assert_eq!(e.target, "/");
        assert!(Endpoint::parse("ftp://a.example/").is_none());
        assert!(Endpoint::parse("http://").is_none());
    }
}
