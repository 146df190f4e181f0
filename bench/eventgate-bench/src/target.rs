//! The servers measured and how to talk to each: the URL of a target, its
//! WebSocket and publish paths, its auth and the body of a publish. Owns the
//! protocol differences between eventgate and the peers; must not hold any
//! measuring state.

use crate::{BoxResult, Opts};
use clap::ValueEnum;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::time::{SystemTime, UNIX_EPOCH};

/// Which server protocol the tool speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum Target {
    /// eventgate: token auth, instances created by the tool, enveloped events.
    Eventgate,
    /// gorilla-hub: may join several events into one frame, newline-separated.
    Gorilla,
    /// node-ws: one event per frame.
    Node,
    /// uws-hub (uWebSockets.js topic pub/sub): one event per frame.
    Uws,
    /// `eventgate-bench floor`: the peers' protocol, one event per frame.
    Floor,
}

impl Target {
    /// The name in reports (`target` of the JSON line).
    pub(crate) fn name(self) -> &'static str {
        match self {
            Target::Eventgate => "eventgate",
            Target::Gorilla => "gorilla",
            Target::Node => "node",
            Target::Uws => "uws",
            Target::Floor => "floor",
        }
    }
}

// ---------------------------------------------------------------------------
// Endpoint: how to talk to each target
// ---------------------------------------------------------------------------

/// One server under test, as parsed from the command line.
#[derive(Debug, Clone)]
pub(crate) struct Endpoint {
    /// Its protocol.
    pub(crate) target: Target,
    /// Where publishes (and the stalled client) go.
    pub(crate) addr: SocketAddr,
    /// Host header for `addr`.
    pub(crate) host: String,
    /// eventgate's account token.
    pub(crate) token: Option<String>,
    /// Where clients connect: (address, host header), round-robin by client.
    pub(crate) client_hosts: Vec<(SocketAddr, String)>,
}

/// Parses `http://127.x.y.z:port[/…]` into an address and a host header.
pub(crate) fn parse_loopback_url(url: &str) -> BoxResult<(SocketAddr, String)> {
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
    /// The target named by `--target`, `--url`, `--token` and `--client-urls`.
    pub(crate) fn parse(opts: &Opts) -> BoxResult<Endpoint> {
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

    /// The name of the `i`-th instance a run uses.
    pub(crate) fn instance_name(i: usize) -> String {
        format!("bench-{i}")
    }

    /// Path (and query) of the WebSocket upgrade for an instance.
    pub(crate) fn ws_path(&self, inst: &str) -> String {
        match (&self.target, &self.token) {
            (Target::Eventgate, Some(t)) => format!("/ws/{inst}?token={}", pct_encode(t)),
            _ => format!("/ws/{inst}"),
        }
    }

    /// Path a publish to an instance is posted to.
    pub(crate) fn publish_path(&self, inst: &str) -> String {
        match self.target {
            Target::Eventgate => format!("/api/events/publish/{inst}"),
            _ => format!("/publish/{inst}"),
        }
    }

    /// Headers (lower-case names) that authenticate an HTTP request.
    pub(crate) fn auth_headers(&self) -> Vec<(&'static str, String)> {
        match (&self.target, &self.token) {
            (Target::Eventgate, Some(t)) => vec![("token", t.clone())],
            _ => Vec::new(),
        }
    }

    /// Builds one publish body of about `size` bytes carrying seq/p/ts.
    pub(crate) fn publish_body(
        &self,
        seq: u64,
        publisher: usize,
        ts: u128,
        size: usize,
    ) -> Vec<u8> {
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

/// Percent-encodes everything but RFC 3986 unreserved characters.
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

/// Wall-clock time in nanoseconds since the Unix epoch (carried in events).
pub(crate) fn now_unix_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// eventgate's `eventgate_connected_clients` from a `/metrics` text.
pub(crate) fn connected_clients(metrics: &str) -> Option<u64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("eventgate_connected_clients "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
}

#[cfg(test)]
mod tests {
    use super::{parse_loopback_url, pct_encode, Endpoint, Target};
    use std::net::SocketAddr;

    fn endpoint(target: Target) -> Endpoint {
        let addr: SocketAddr = "127.0.0.1:8090".parse().unwrap();
        Endpoint {
            target,
            addr,
            host: "127.0.0.1:8090".into(),
            token: Some("t k".into()),
            client_hosts: vec![(addr, "127.0.0.1:8090".into())],
        }
    }

    #[test]
    fn only_loopback_urls_are_targets() {
        let (addr, host) = parse_loopback_url("http://127.0.0.9:8084/x").unwrap();
        assert_eq!(
            (addr.to_string(), host.as_str()),
            ("127.0.0.9:8084".into(), "127.0.0.9:8084")
        );
        assert!(parse_loopback_url("http://10.0.0.1:80")
            .unwrap_err()
            .contains("non-loopback"));
        assert!(parse_loopback_url("https://127.0.0.1:80").is_err());
        assert!(parse_loopback_url("http://localhost:80").is_err());
    }

    #[test]
    fn eventgate_and_the_peers_get_their_own_paths_and_bodies() {
        let eg = endpoint(Target::Eventgate);
        assert_eq!(eg.ws_path("bench-0"), "/ws/bench-0?token=t%20k");
        assert_eq!(eg.publish_path("bench-0"), "/api/events/publish/bench-0");
        assert_eq!(eg.auth_headers(), vec![("token", "t k".to_string())]);
        let body = eg.publish_body(7, 2, 99, 200);
        assert_eq!(body.len(), 200);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["event"], "message.exchange");
        assert_eq!(
            (
                v["data"]["seq"].as_u64(),
                v["data"]["p"].as_u64(),
                v["data"]["ts"].as_u64()
            ),
            (Some(7), Some(2), Some(99))
        );

        let uws = endpoint(Target::Uws);
        assert_eq!(uws.ws_path("bench-0"), "/ws/bench-0");
        assert_eq!(uws.publish_path("bench-0"), "/publish/bench-0");
        assert!(uws.auth_headers().is_empty());
        let v: serde_json::Value = serde_json::from_slice(&uws.publish_body(1, 0, 5, 200)).unwrap();
        assert_eq!(v["seq"], 1);
        assert_eq!(Target::Uws.name(), "uws");
        assert_eq!(pct_encode("a/b~"), "a%2Fb~");
    }
}
