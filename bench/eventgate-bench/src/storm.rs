//! The `storm` mode (eventgate only): a reconnect storm. `--clients` clients
//! of `--instances` instances, all opted in to recovery, drop at once while
//! `--storm-events` events are published, then reconnect together — first
//! as plain reconnects (no `since`: they only join), then, after the same
//! drop again, recovering from their last offset. It reports the time until
//! every client has joined (plain) or has its whole replay (recovery), the
//! server's CPU seconds for each, and loss and duplicates of the replay
//! (which must be 0/0). With `--client-urls` naming two nodes, each client
//! reconnects to the other node. Owns that sequence; must not change how
//! the other modes count.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use hyper::Method;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::sync::{watch, Semaphore};
use tokio_tungstenite::tungstenite::Message;

use crate::clients::tcp_connect;
use crate::latency::Latencies;
use crate::publish::{setup_instances, HttpConn};
use crate::report::{header, Report};
use crate::system::{check_fds, Server};
use crate::target::{connected_clients, Endpoint};
use crate::{BoxResult, Mode, Opts};

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// How long any phase may take before the storm gives up.
const PHASE_LIMIT: Duration = Duration::from_secs(180);

/// One client between storms: where it is and what it saw last.
struct Client {
    index: usize,
    instance: String,
    epoch: String,
    offset: u64,
}

/// What one client's reconnect came to.
#[derive(Default)]
struct Outcome {
    joined: bool,
    recovered: Option<bool>,
    replayed: u64,
    duplicates: u64,
    out_of_order: u64,
    done_after: Option<Duration>,
}

/// `storm`: see the module comment.
pub(crate) async fn mode_storm(opts: &Opts, ep: Arc<Endpoint>, srv: &Server) -> BoxResult<Report> {
    if ep.target != crate::target::Target::Eventgate {
        return Err("storm needs --target eventgate (recovery is eventgate's)".into());
    }
    let n = opts.clients.unwrap_or(10_000).max(1);
    let instances = opts.instances.unwrap_or(1).max(1);
    let events = opts.storm_events.max(1);
    check_fds(n + 64)?;
    setup_instances(&ep, instances).await?;
    let mut clients: Vec<Client> = (0..n)
        .map(|index| Client {
            index,
            instance: Endpoint::instance_name(index % instances),
            epoch: String::new(),
            offset: 0,
        })
        .collect();
    let mut publisher = HttpConn::new(&ep)?;
    let mut r = Report::new();
    header(&mut r, opts, Mode::Storm);
    r.int("clients", n as u64);
    r.int("instances", instances as u64);
    r.int("storm_events", events as u64);
    for (round, recover) in [("plain", false), ("recovery", true)] {
        // Connect everyone (they learn the epoch and offset), then drop them all.
        let warm = 10usize.div_ceil(instances) * instances;
        connect_and_drop(opts, &ep, &mut clients, &mut publisher, instances, warm).await?;
        wait_disconnected(&ep).await?;
        publish(&mut publisher, &ep, instances, events).await?;
        let cpu0 = srv.cpu();
        let t0 = Instant::now();
        let outcomes = reconnect_all(
            opts,
            &ep,
            &clients,
            recover,
            events.div_ceil(instances) as u64,
        )
        .await?;
        // When each client was done, and how those times spread: a few
        // stragglers read differently from a storm slow throughout.
        let mut done = Latencies::default();
        for d in outcomes.iter().filter_map(|o| o.done_after) {
            done.record(d.as_micros() as u64);
        }
        let secs = done.max() as f64 / 1e6;
        r.num(
            &format!("{round}_p50_secs"),
            done.quantile(0.5) as f64 / 1e6,
            3,
        );
        r.num(
            &format!("{round}_p99_secs"),
            done.quantile(0.99) as f64 / 1e6,
            3,
        );
        let cpu = cpu0.zip(srv.cpu()).map(|(a, b)| b - a);
        let joined = outcomes.iter().filter(|o| o.joined).count();
        r.num(&format!("{round}_secs"), secs, 3);
        r.opt_num(&format!("{round}_server_cpu_secs"), cpu, 3);
        r.int(&format!("{round}_joined"), joined as u64);
        r.num(&format!("{round}_wall_secs"), t0.elapsed().as_secs_f64(), 3);
        if recover {
            let expected = events.div_ceil(instances) as u64;
            let lost: u64 = outcomes
                .iter()
                .map(|o| expected.saturating_sub(o.replayed))
                .sum();
            r.int(
                "recovery_recovered_true",
                outcomes
                    .iter()
                    .filter(|o| o.recovered == Some(true))
                    .count() as u64,
            );
            r.int(
                "recovery_recovered_false",
                outcomes
                    .iter()
                    .filter(|o| o.recovered == Some(false))
                    .count() as u64,
            );
            r.int("recovery_lost", lost);
            r.int(
                "recovery_duplicates",
                outcomes.iter().map(|o| o.duplicates).sum(),
            );
            r.int(
                "recovery_out_of_order",
                outcomes.iter().map(|o| o.out_of_order).sum(),
            );
        }
    }
    Ok(r)
}

/// Connects every client, opted in to recovery; once all have joined,
/// publishes `warm` events and waits until every client has them, then
/// drops every connection at once, keeping each client's epoch and offset.
async fn connect_and_drop(
    opts: &Opts,
    ep: &Endpoint,
    clients: &mut [Client],
    publisher: &mut HttpConn,
    instances: usize,
    warm: usize,
) -> BoxResult<()> {
    let gate = Arc::new(Semaphore::new(opts.connect_concurrency.max(1)));
    let joined = Arc::new(AtomicUsize::new(0));
    let received = Arc::new(AtomicUsize::new(0));
    let (drop_tx, drop_rx) = watch::channel(false);
    let mut tasks = Vec::with_capacity(clients.len());
    for c in clients.iter() {
        let url = join_url(ep, c, false, None);
        let (gate, src, host) = (
            gate.clone(),
            source(opts, c.index),
            host_of(ep, c.index, false),
        );
        let (joined, received, mut drop_rx) = (joined.clone(), received.clone(), drop_rx.clone());
        tasks.push(tokio::spawn(async move {
            let permit = gate.acquire_owned().await.map_err(|e| e.to_string())?;
            let mut ws = open(src, host, &url).await?;
            let first = first_frame(&mut ws).await?;
            drop(permit);
            joined.fetch_add(1, Ordering::AcqRel);
            let epoch = first["data"]["epoch"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let mut offset = first["data"]["offset"].as_u64().unwrap_or(0);
            loop {
                tokio::select! {
                    _ = drop_rx.changed() => break,
                    msg = ws.next() => match msg {
                        Some(Ok(Message::Text(text))) => {
                            if let Some(o) = offset_of(&text) {
                                offset = o;
                                received.fetch_add(1, Ordering::AcqRel);
                            }
                        }
                        Some(Ok(_)) => {}
                        _ => return Err("closed before the storm".to_string()),
                    },
                }
            }
            // Dropped without a close frame, as a network change would.
            drop(ws);
            Ok::<_, String>((epoch, offset))
        }));
    }
    let n = clients.len();
    let deadline = Instant::now() + PHASE_LIMIT;
    while joined.load(Ordering::Acquire) < n
        && Instant::now() < deadline
        && !tasks.iter().any(|t| t.is_finished())
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    publish(publisher, ep, instances, warm).await?;
    let want = n * (warm / instances);
    while received.load(Ordering::Acquire) < want
        && Instant::now() < deadline
        && !tasks.iter().any(|t| t.is_finished())
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = drop_tx.send(true);
    for (c, t) in clients.iter_mut().zip(tasks) {
        let (epoch, offset) = t.await.map_err(|e| e.to_string())??;
        c.epoch = epoch;
        c.offset = offset;
    }
    Ok(())
}

/// Reconnects everyone at once; a recovering client is done when its replay
/// of `expect` events is in, a plain one when it has joined.
async fn reconnect_all(
    opts: &Opts,
    ep: &Endpoint,
    clients: &[Client],
    recover: bool,
    expect: u64,
) -> BoxResult<Vec<Outcome>> {
    let gate = Arc::new(Semaphore::new(opts.connect_concurrency.max(1)));
    let t0 = Instant::now();
    let mut tasks = Vec::with_capacity(clients.len());
    for c in clients {
        let since = recover.then_some(c.offset);
        let url = join_url(ep, c, true, since.map(|s| (c.epoch.clone(), s)));
        let (gate, src, host) = (
            gate.clone(),
            source(opts, c.index),
            host_of(ep, c.index, true),
        );
        let mut after = c.offset;
        tasks.push(tokio::spawn(async move {
            let mut out = Outcome::default();
            let _permit = gate.acquire_owned().await.map_err(|e| e.to_string())?;
            let mut ws = open(src, host, &url).await?;
            let first = first_frame(&mut ws).await?;
            out.joined = true;
            drop(_permit);
            if !recover {
                out.done_after = Some(t0.elapsed());
                return Ok::<_, String>(out);
            }
            out.recovered = first["data"]["recovered"].as_bool();
            let mut seen = HashSet::new();
            while out.replayed < expect {
                let Ok(Some(Ok(msg))) =
                    tokio::time::timeout(Duration::from_secs(10), ws.next()).await
                else {
                    break;
                };
                let Message::Text(text) = msg else { continue };
                let Some(offset) = offset_of(&text) else {
                    continue;
                };
                if !seen.insert(offset) {
                    out.duplicates += 1;
                    continue;
                }
                if offset <= after {
                    out.out_of_order += 1;
                }
                after = offset;
                out.replayed += 1;
            }
            out.done_after = Some(t0.elapsed());
            Ok(out)
        }));
    }
    let mut outcomes = Vec::with_capacity(tasks.len());
    for t in tasks {
        match tokio::time::timeout(PHASE_LIMIT, t).await {
            Ok(Ok(Ok(o))) => outcomes.push(o),
            Ok(Ok(Err(e))) => return Err(format!("reconnect: {e}")),
            Ok(Err(e)) => return Err(format!("reconnect: {e}")),
            Err(_) => return Err("reconnect storm did not finish in time".into()),
        }
    }
    Ok(outcomes)
}

/// An envelope's top-level `offset`, read without parsing the document:
/// the tool shares the machine's cores with the server it measures, and a
/// million replayed frames parsed (even into a one-field struct, which
/// still scans every byte) cost the tool about as much CPU as the server
/// spends sending them. eventgate writes `"offset"` and `"epoch"` as an
/// envelope's last two keys; any other shape is parsed in full.
fn offset_of(text: &str) -> Option<u64> {
    stamped_tail(text).or_else(|| {
        #[derive(serde::Deserialize)]
        struct Stamped {
            offset: Option<u64>,
        }
        serde_json::from_str::<Stamped>(text).ok()?.offset
    })
}

/// The offset of an envelope ending `,"offset":<n>,"epoch":"<epoch>"}`
/// (an epoch has no quote or backslash in it).
fn stamped_tail(text: &str) -> Option<u64> {
    let body = text.strip_suffix("\"}")?;
    let (head, epoch) = body.rsplit_once(",\"epoch\":\"")?;
    if epoch.contains(['"', '\\']) {
        return None;
    }
    let (_, digits) = head.rsplit_once(",\"offset\":")?;
    digits.parse().ok()
}

fn join_url(ep: &Endpoint, c: &Client, other_node: bool, since: Option<(String, u64)>) -> String {
    let (_, host) = host_of(ep, c.index, other_node);
    let mut url = format!("ws://{host}{}&recover=true", ep.ws_path(&c.instance));
    if let Some((epoch, since)) = since {
        url.push_str(&format!("&epoch={epoch}&since={since}"));
    }
    url
}

fn host_of(ep: &Endpoint, index: usize, other_node: bool) -> (std::net::SocketAddr, String) {
    let n = ep.client_hosts.len().max(1);
    let i = if other_node { index + 1 } else { index } % n;
    ep.client_hosts
        .get(i)
        .cloned()
        .unwrap_or((ep.addr, ep.host.clone()))
}

fn source(opts: &Opts, index: usize) -> Option<std::net::IpAddr> {
    let k = (index / opts.clients_per_addr.max(1)) as u32;
    Some(std::net::IpAddr::V4(std::net::Ipv4Addr::from(
        u32::from(std::net::Ipv4Addr::new(127, 0, 0, 2)) + k,
    )))
}

async fn open(
    src: Option<std::net::IpAddr>,
    (addr, _): (std::net::SocketAddr, String),
    url: &str,
) -> BoxResult<Ws> {
    let stream = tcp_connect(src, addr, None).await?;
    let (ws, _) = tokio::time::timeout(
        Duration::from_secs(30),
        tokio_tungstenite::client_async(url, stream),
    )
    .await
    .map_err(|_| "handshake timed out".to_string())?
    .map_err(|e| format!("handshake: {e}"))?;
    Ok(ws)
}

async fn first_frame(ws: &mut Ws) -> BoxResult<Value> {
    loop {
        match tokio::time::timeout(Duration::from_secs(30), ws.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => {
                let v: Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
                if v["event"] == "connection.recovery" {
                    return Ok(v);
                }
                return Err(format!("first frame is not connection.recovery: {text}"));
            }
            Ok(Some(Ok(_))) => continue,
            other => return Err(format!("no first frame: {other:?}")),
        }
    }
}

/// Publishes `events` spread over the instances, 10 per request.
async fn publish(
    conn: &mut HttpConn,
    ep: &Endpoint,
    instances: usize,
    events: usize,
) -> BoxResult<()> {
    let per = events.div_ceil(instances);
    for i in 0..instances {
        let name = Endpoint::instance_name(i);
        let mut left = per;
        while left > 0 {
            let n = left.min(10);
            left -= n;
            let items: Vec<Value> = (0..n)
                .map(|k| json!({"event": "message.status", "data": {"k": k}}))
                .collect();
            let reply = conn
                .request(
                    Method::POST,
                    &ep.publish_path(&name),
                    Bytes::from(Value::Array(items).to_string()),
                )
                .await?;
            if reply.status != 202 {
                return Err(format!("publish: HTTP {}", reply.status));
            }
        }
    }
    Ok(())
}

/// Waits until every node's `/metrics` shows none of the dropped clients
/// (a node still closing them would slow the storm that follows).
async fn wait_disconnected(ep: &Endpoint) -> BoxResult<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    for (addr, host) in &ep.client_hosts {
        let node = Endpoint {
            addr: *addr,
            host: host.clone(),
            ..ep.clone()
        };
        let mut conn = HttpConn::new(&node)?;
        while Instant::now() < deadline {
            if let Ok(reply) = conn.request(Method::GET, "/metrics", Bytes::new()).await {
                if connected_clients(&String::from_utf8_lossy(&reply.body)) == Some(0) {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::offset_of;

    #[test]
    fn offsets_are_read_from_the_tail_or_the_whole_envelope() {
        let tail = r#"{"event":"x","data":{"offset":1},"offset":42,"epoch":"e-1"}"#;
        assert_eq!(offset_of(tail), Some(42));
        let reordered = r#"{"offset":7,"event":"x","epoch":"e"}"#;
        assert_eq!(offset_of(reordered), Some(7));
        assert_eq!(offset_of(r#"{"event":"x","data":{"offset":1}}"#), None);
    }
}
