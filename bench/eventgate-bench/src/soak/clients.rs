//! The soak's WebSocket clients: a pool of `--soak-clients` that come and
//! go at `--churn` per second, each on a random node and instance, some
//! with their own `?events=` narrowing, every one opted in to recovery (its
//! `connection.recovery` first frame says it joined), and a third of the
//! reconnects recovering from their last offset. Each session's life and
//! what it received go to the ledger. Also the ephemeral-instance round.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use rand::Rng;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

use super::ledger::Session;
use super::{Inst, Soak, KINDS, TOKEN};
use crate::BoxResult;

static NEXT_CHAIN: AtomicU64 = AtomicU64::new(1);

/// Where a client was when it left, for a recovering reconnect.
#[derive(Clone)]
struct Position {
    chain: u64,
    epoch: String,
    offset: u64,
}

/// Keeps `--soak-clients` clients connected until the run ends.
pub(crate) async fn run_pool(soak: Arc<Soak>, instances: Vec<Inst>) {
    let mut tasks = Vec::new();
    for i in 0..soak.args.soak_clients {
        let (soak, instances) = (soak.clone(), instances.clone());
        tasks.push(tokio::spawn(async move {
            // Spread the first connections over the first seconds.
            tokio::time::sleep(Duration::from_millis((i as u64 * 20) % 3000)).await;
            client_loop(soak, instances).await;
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

async fn client_loop(soak: Arc<Soak>, instances: Vec<Inst>) {
    let mean_life = soak.args.soak_clients as f64 / soak.args.churn.max(0.01);
    let mut position: Option<(String, Position)> = None;
    while soak.running() {
        let (instance, resume) = match position.take() {
            Some((name, pos)) if rand::thread_rng().gen_bool(0.33) => (name, Some(pos)),
            _ => {
                let i = rand::thread_rng().gen_range(0..instances.len().max(1));
                (
                    instances.get(i).map(|x| x.name.clone()).unwrap_or_default(),
                    None,
                )
            }
        };
        // Exponential lifetime, at least a second.
        let u: f64 = rand::thread_rng().gen_range(0.0001..1.0);
        let remaining = soak.args.minutes * 60.0 - soak.now();
        let life = (-u.ln() * mean_life).max(1.0).min(remaining.max(0.5));
        let node = rand::thread_rng().gen_range(0..soak.cluster.len());
        let narrowing = rand::thread_rng().gen_bool(0.25).then(|| {
            let mut kinds: Vec<usize> = (0..6).collect();
            let start = rand::thread_rng().gen_range(0..6);
            kinds.rotate_left(start);
            kinds.truncate(3);
            kinds
        });
        match session(
            &soak,
            node,
            &instance,
            narrowing,
            resume,
            Duration::from_secs_f64(life),
        )
        .await
        {
            Ok(pos) => position = pos.map(|p| (instance, p)),
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

/// One session: connect, receive until `life` passes (or the server closes),
/// close, and record it. Returns where it stopped.
async fn session(
    soak: &Soak,
    node: usize,
    instance: &str,
    narrowing: Option<Vec<usize>>,
    resume: Option<Position>,
    life: Duration,
) -> BoxResult<Option<Position>> {
    let mut url = format!(
        "{}/ws/{instance}?token={TOKEN}&recover=true",
        soak.cluster.ws_base(node)
    );
    if let Some(kinds) = &narrowing {
        let names: Vec<&str> = kinds.iter().map(|k| KINDS[*k]).collect();
        url.push_str(&format!("&events={}", names.join(",")));
    }
    if let Some(p) = &resume {
        url.push_str(&format!("&epoch={}&since={}", p.epoch, p.offset));
    }
    let (mut ws, _) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async(url.as_str()),
    )
    .await
    .map_err(|_| "connect timed out".to_string())?
    .map_err(|e| format!("connect: {e}"))?;
    let chain = resume
        .as_ref()
        .map(|p| p.chain)
        .unwrap_or_else(|| NEXT_CHAIN.fetch_add(1, Ordering::Relaxed));
    let mut record = Session {
        instance: instance.to_string(),
        node,
        chain,
        narrowing,
        t_join: f64::INFINITY,
        resumed_from: resume.as_ref().map(|p| (p.epoch.clone(), p.offset)),
        ..Session::default()
    };
    let mut pos = Position {
        chain,
        epoch: String::new(),
        offset: 0,
    };
    let deadline = Instant::now() + life;
    let mut asked_to_close = false;
    // Envelopes up to this offset are the recovery's replay.
    let mut replay_up_to = 0u64;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() && !asked_to_close {
            asked_to_close = true;
            record.t_leave = soak.now();
            let _ = ws
                .send(Message::Close(Some(CloseFrame {
                    code: CloseCode::Normal,
                    reason: "bye".into(),
                })))
                .await;
        }
        let wait = if asked_to_close {
            Duration::from_secs(3)
        } else {
            left
        };
        match tokio::time::timeout(wait, ws.next()).await {
            Err(_) if asked_to_close => break,
            Err(_) => continue,
            Ok(None) | Ok(Some(Err(_))) => {
                if !asked_to_close {
                    record.t_leave = soak.now();
                    record.closed_by_server = Some(None);
                }
                break;
            }
            Ok(Some(Ok(Message::Close(frame)))) => {
                if !asked_to_close {
                    record.t_leave = soak.now();
                    record.closed_by_server = Some(frame.map(|f| u16::from(f.code)));
                }
                break;
            }
            Ok(Some(Ok(Message::Text(text)))) => {
                if asked_to_close {
                    continue;
                }
                let Ok(v) = serde_json::from_str::<Value>(&text) else {
                    continue;
                };
                if v["event"] == "connection.recovery" {
                    record.t_join = soak.now();
                    if resume.is_some() {
                        record.recovered = v["data"]["recovered"].as_bool();
                        if record.recovered == Some(true) {
                            replay_up_to = v["data"]["offset"].as_u64().unwrap_or(0);
                        }
                    }
                    pos.epoch = v["data"]["epoch"].as_str().unwrap_or_default().to_string();
                    pos.offset = v["data"]["offset"].as_u64().unwrap_or(0);
                    continue;
                }
                let data = &v["data"];
                let (Some(seq), Some(ts)) = (data["seq"].as_u64(), data["ts"].as_u64()) else {
                    continue;
                };
                let media = !data["message"]["media"]["base64"].is_null();
                record.received.push((seq, media, soak.now() as f32));
                let offset = v["offset"].as_u64();
                // The position is the last envelope's (epoch, offset).
                if let (Some(offset), Some(epoch)) = (offset, v["epoch"].as_str()) {
                    if epoch != pos.epoch {
                        record.epoch_changes += 1;
                        pos.epoch = epoch.to_string();
                    }
                    pos.offset = offset;
                }
                let now_ns = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(0);
                let replayed = offset.is_some_and(|o| o <= replay_up_to);
                soak.ledger.delivered(
                    soak.now() as u64,
                    now_ns.saturating_sub(ts) / 1000,
                    replayed,
                    (node, instance),
                );
            }
            Ok(Some(Ok(_))) => {}
        }
    }
    if record.t_join.is_finite() {
        soak.ledger.session(record);
        Ok((!pos.epoch.is_empty()).then_some(pos))
    } else {
        Err("no connection.recovery frame".into())
    }
}

/// Creates an instance, connects 3 clients, publishes 5 events they must
/// all get, deletes the instance: each must be closed with 4004.
pub(crate) async fn ephemeral_round(soak: &Soak, name: &str) -> BoxResult<()> {
    let t0 = soak.now();
    let api = soak.cluster.api(0);
    let (status, body) = api
        .call(
            "POST",
            "/api/instance/new",
            Some(json!({"name": name, "websocketEnabled": true})),
        )
        .await?;
    if status != 201 {
        return Err(format!("create: {status} {body}"));
    }
    let mut clients = Vec::new();
    for i in 0..3 {
        let node = i % soak.cluster.len();
        let url = format!(
            "{}/ws/{name}?token={TOKEN}&recover=true",
            soak.cluster.ws_base(node)
        );
        let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .map_err(|e| format!("connect: {e}"))?;
        // The first frame says the session joined.
        let _ = tokio::time::timeout(Duration::from_secs(5), ws.next()).await;
        clients.push(ws);
    }
    // Give the other node's interest subscription a moment in a cluster.
    tokio::time::sleep(Duration::from_millis(if soak.cluster.len() > 1 {
        1000
    } else {
        50
    }))
    .await;
    let items: Vec<Value> = (0..5)
        .map(|n| json!({"event": "call.update", "data": {"n": n}}))
        .collect();
    let (status, body) = api
        .call(
            "POST",
            &format!("/api/events/publish/{name}"),
            Some(Value::Array(items)),
        )
        .await?;
    if status != 202 {
        return Err(format!("publish: {status} {body}"));
    }
    let mut problems = Vec::new();
    for (i, ws) in clients.iter_mut().enumerate() {
        let mut got = 0;
        while got < 5 {
            match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
                Ok(Some(Ok(Message::Text(_)))) => got += 1,
                Ok(Some(Ok(_))) => {}
                _ => break,
            }
        }
        if got < 5 {
            problems.push(format!("client {i} got {got} of 5 events"));
        }
    }
    let (status, body) = api
        .call("DELETE", &format!("/api/instance/delete/{name}"), None)
        .await?;
    if status != 200 {
        return Err(format!("delete: {status} {body}"));
    }
    for (i, ws) in clients.iter_mut().enumerate() {
        let mut code = None;
        while let Ok(Some(Ok(msg))) = tokio::time::timeout(Duration::from_secs(5), ws.next()).await
        {
            if let Message::Close(frame) = msg {
                code = frame.map(|f| u16::from(f.code));
                break;
            }
        }
        if code != Some(4004) {
            problems.push(format!("client {i} closed with {code:?}, not 4004"));
        }
    }
    soak.ledger.ephemeral_round();
    if problems.is_empty() || soak.ledger.in_ws_fault(t0, soak.now()) {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}
