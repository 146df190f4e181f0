//! `eventgate-bench soak`: a long run of real-looking traffic against real
//! gateways this mode starts itself (one node on SQLite, or two on
//! PostgreSQL + NATS), with faults injected on a schedule, checked all along.
//!
//! At the same time it runs: WebSocket clients that come and go (some
//! reconnecting with recovery), publishes at a fixed rate with bursts and
//! batches of up to 1000 events, settings changes (filters, mediaBase64,
//! disable/enable) every few seconds, webhook receivers that answer slowly,
//! fail with 500, time out and recover, and instances created and deleted.
//! Faults: a webhook receiver down for a while, a node killed with SIGKILL
//! and restarted, and with two nodes NATS and PostgreSQL restarted.
//!
//! It checks: every event each connected client should get (given its
//! filters at that moment; events near a settings change or inside a fault
//! window are not counted either way), every acknowledged webhook delivery
//! (all must arrive, whatever the faults), no 5xx outside a fault window, no
//! unexpected close code, and open files and RSS that do not keep growing.
//! The rooms: [`nodes`] (gateway processes and their database), [`api`]
//! (the REST calls), [`receiver`] (webhook receivers), [`clients`]
//! (WebSocket clients), [`ledger`] (what was sent, seen and allowed to be
//! missed) and [`report`] (summary, time series, verdict).
//! Traffic only ever goes to 127.0.0.1.

mod api;
mod clients;
mod ledger;
mod nodes;
mod receiver;
mod report;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use serde_json::{json, Value};

use crate::BoxResult;
use api::Api;
use ledger::{Fault, Ledger};
use nodes::Cluster;
use receiver::{Mode as ReceiverMode, Receivers};

/// The six event types of the contract.
pub(crate) const KINDS: [&str; 6] = [
    "message.exchange",
    "message.status",
    "call.update",
    "group.flow",
    "instance.state",
    "label.update",
];

/// The account token the soak's gateways provision.
const TOKEN: &str = "soak-account-token-0123456789abcdef0123";

/// What `eventgate-bench soak` is told.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct SoakArgs {
    /// soak: minutes of traffic (fractions allowed, e.g. 1.5).
    #[arg(long, global = true, default_value_t = 30.0)]
    pub(crate) minutes: f64,
    /// soak: gateway nodes (1: SQLite; 2: PostgreSQL + NATS).
    #[arg(long, global = true, default_value_t = 1)]
    pub(crate) nodes: usize,
    /// soak: the eventgate binary to run.
    #[arg(long, global = true, default_value = "target/release/eventgate")]
    pub(crate) bin: PathBuf,
    /// soak: where the summary, time series and plot go.
    #[arg(long, global = true, default_value = "bench/results/soak")]
    pub(crate) out: PathBuf,
    /// soak: PostgreSQL server (a fresh database is made there) for 2 nodes.
    #[arg(
        long,
        global = true,
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    pub(crate) pg_url: String,
    /// soak: NATS with JetStream, for 2 nodes.
    #[arg(long, global = true, default_value = "nats://127.0.0.1:4222")]
    pub(crate) nats_url: String,
    /// soak: shell command that restarts NATS (2 nodes).
    #[arg(
        long,
        global = true,
        default_value = "start-stop-daemon --stop --oknodo --retry 10 --exec /usr/sbin/nats-server; start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server -- -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log"
    )]
    pub(crate) nats_restart: String,
    /// soak: shell command that restarts PostgreSQL (2 nodes).
    #[arg(
        long,
        global = true,
        default_value = "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql | head -n 1) main restart"
    )]
    pub(crate) pg_restart: String,
    /// soak: WebSocket clients kept connected (they come and go).
    #[arg(long, global = true, default_value_t = 120)]
    pub(crate) soak_clients: usize,
    /// soak: instances with clients and a webhook each.
    #[arg(long, global = true, default_value_t = 6)]
    pub(crate) soak_instances: usize,
    /// soak: events per second, bursts aside.
    #[arg(long, global = true, default_value_t = 100.0)]
    pub(crate) soak_rate: f64,
    /// soak: clients leaving (and others arriving) per second.
    #[arg(long, global = true, default_value_t = 4.0)]
    pub(crate) churn: f64,
    /// soak: no injected faults (flapping receivers still flap).
    #[arg(long, global = true)]
    pub(crate) no_faults: bool,
    /// soak: seconds after the traffic for webhook deliveries to arrive.
    #[arg(long, global = true, default_value_t = 240.0)]
    pub(crate) settle: f64,
}

/// The whole run's shared parts.
pub(crate) struct Soak {
    pub(crate) args: SoakArgs,
    pub(crate) started: Instant,
    pub(crate) ledger: Ledger,
    pub(crate) cluster: Cluster,
    pub(crate) receivers: Receivers,
}

impl Soak {
    /// Seconds since the start of the run.
    pub(crate) fn now(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    fn total(&self) -> f64 {
        self.args.minutes * 60.0
    }

    /// An API client on a random running node.
    pub(crate) fn api(&self) -> Api {
        self.cluster.api(self.random_node())
    }

    /// A random node's index.
    pub(crate) fn random_node(&self) -> usize {
        rand::thread_rng().gen_range(0..self.cluster.len())
    }

    fn running(&self) -> bool {
        self.now() < self.total()
    }
}

/// Runs the soak and writes its report; an error when a check failed.
pub(crate) async fn mode_soak(args: SoakArgs) -> BoxResult<()> {
    if args.nodes == 0 || args.nodes > 2 {
        return Err("soak: --nodes is 1 (SQLite) or 2 (PostgreSQL + NATS)".into());
    }
    std::fs::create_dir_all(&args.out).map_err(|e| format!("soak: {}: {e}", args.out.display()))?;
    let receivers = Receivers::start(args.soak_instances).await?;
    let cluster = Cluster::start(&args, TOKEN).await?;
    let soak = Arc::new(Soak {
        args: args.clone(),
        started: Instant::now(),
        ledger: Ledger::default(),
        cluster,
        receivers,
    });
    eprintln!(
        "soak: {} node(s), {} min, {} clients over {} instances, {} events/s; report in {}",
        args.nodes,
        args.minutes,
        args.soak_clients,
        args.soak_instances,
        args.soak_rate,
        args.out.display()
    );
    let instances = setup_instances(&soak).await?;
    let mut tasks = Vec::new();
    tasks.push(tokio::spawn(clients::run_pool(
        soak.clone(),
        instances.clone(),
    )));
    for inst in &instances {
        tasks.push(tokio::spawn(publish_loop(soak.clone(), inst.clone())));
    }
    tasks.push(tokio::spawn(settings_loop(soak.clone(), instances.clone())));
    tasks.push(tokio::spawn(ephemeral_loop(soak.clone())));
    tasks.push(tokio::spawn(receiver_flaps(soak.clone())));
    tasks.push(tokio::spawn(faults(soak.clone())));
    let sampler = tokio::spawn(report::sample_loop(soak.clone()));
    for t in tasks {
        let _ = t.await;
    }
    eprintln!(
        "soak: traffic over at {:.0} s; waiting for webhook deliveries",
        soak.now()
    );
    soak.receivers.set_all(ReceiverMode::Normal);
    settle_webhooks(&soak, &instances).await;
    sampler.abort();
    soak.cluster.stop_all().await;
    report::write(&soak, &instances)
}

/// A persistent instance of the soak: its name and its webhook's receiver.
#[derive(Clone, Debug)]
pub(crate) struct Inst {
    pub(crate) name: String,
    pub(crate) index: usize,
}

async fn setup_instances(soak: &Soak) -> BoxResult<Vec<Inst>> {
    let api = soak.cluster.api(0);
    let mut out = Vec::new();
    for index in 0..soak.args.soak_instances {
        let name = format!("soak-{index}");
        let url = soak.receivers.url(index, &name);
        let body = json!({
            "name": name, "websocketEnabled": true, "websocketEvents": [], "websocketMediaBase64": true,
            "webhookEnabled": true, "webhookURL": url, "webhookMediaBase64": false,
        });
        let (status, reply) = api.call("POST", "/api/instance/new", Some(body)).await?;
        if status != 201 {
            return Err(format!("soak: creating {name}: {status} {reply}"));
        }
        soak.ledger
            .settings_changed(&name, soak.now(), soak.now(), ledger::WsState::all(true));
        out.push(Inst { name, index });
    }
    Ok(out)
}

/// Publishes to one instance at its share of the rate: mostly single
/// events and small batches, a burst of 1000 every 20 s. One request in
/// flight, so the instance's acceptance order is the sequence order.
async fn publish_loop(soak: Arc<Soak>, inst: Inst) {
    let share = soak.args.soak_rate / soak.args.soak_instances.max(1) as f64;
    let mut seq: u64 = 0;
    let mut next_burst = 10.0 + inst.index as f64 * 3.0;
    let started = Instant::now();
    let mut sent_events = 0u64;
    while soak.running() {
        let now = soak.now();
        let batch = if now >= next_burst {
            next_burst += 20.0;
            1000
        } else {
            rand::thread_rng().gen_range(1..=4)
        };
        let mut items = Vec::with_capacity(batch);
        let mut kinds = Vec::with_capacity(batch);
        for _ in 0..batch {
            seq += 1;
            let kind = (seq % 6) as usize;
            kinds.push((seq, kind));
            items.push(event_item(&inst.name, seq, kind));
        }
        let node = soak.random_node();
        let api = soak.cluster.api(node);
        let t_send = soak.now();
        let outcome = api
            .call(
                "POST",
                &format!("/api/events/publish/{}", inst.name),
                Some(Value::Array(items)),
            )
            .await;
        let t_ack = soak.now();
        match outcome {
            Ok((202, _)) => soak
                .ledger
                .published(&inst.name, node, &kinds, t_send, t_ack),
            Ok((status, body)) => {
                soak.ledger
                    .http_status("publish", status, t_ack, &body.to_string())
            }
            Err(e) => soak.ledger.http_error("publish", t_ack, &e),
        }
        sent_events += batch as u64;
        // Pace to the share: sleep until this many events are due.
        let due = Duration::from_secs_f64(sent_events as f64 / share.max(0.1));
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            tokio::time::sleep(wait.min(Duration::from_secs(2))).await;
        }
    }
}

/// One published item: `data` carries the instance, the sequence number, the
/// send time and, for messages, media whose base64 the filter may strip.
fn event_item(instance: &str, seq: u64, kind: usize) -> Value {
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut data = json!({"i": instance, "seq": seq, "ts": ts});
    if kind == 0 {
        data["message"] = json!({"media": {"mimetype": "image/png", "base64": "QUJD"}});
    }
    json!({"event": KINDS[kind], "data": data})
}

/// Every 3 s one instance's WebSocket settings change: a new filter, the
/// other mediaBase64, or disabled (and enabled again at its next turn).
async fn settings_loop(soak: Arc<Soak>, instances: Vec<Inst>) {
    let mut turn = 0usize;
    let mut disabled: Vec<bool> = vec![false; instances.len()];
    while soak.running() {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let i = turn % instances.len().max(1);
        turn += 1;
        let Some(inst) = instances.get(i) else { return };
        let state = if disabled[i] {
            disabled[i] = false;
            ledger::WsState::all(true)
        } else {
            match rand::thread_rng().gen_range(0..4) {
                0 => {
                    disabled[i] = true;
                    ledger::WsState::disabled()
                }
                1 => ledger::WsState::all(rand::thread_rng().gen_bool(0.5)),
                _ => {
                    let mut events: Vec<usize> = (0..6)
                        .filter(|_| rand::thread_rng().gen_bool(0.5))
                        .collect();
                    if events.is_empty() {
                        events.push(0);
                    }
                    ledger::WsState {
                        enabled: true,
                        events,
                        media: rand::thread_rng().gen_bool(0.5),
                    }
                }
            }
        };
        let body = json!({
            "enabled": state.enabled,
            "events": state.events.iter().map(|k| KINDS[*k]).collect::<Vec<_>>(),
            "mediaBase64": state.media,
        });
        let t_send = soak.now();
        match soak
            .api()
            .call(
                "POST",
                &format!("/api/events/websocket/{}", inst.name),
                Some(body),
            )
            .await
        {
            Ok((200, _)) => soak
                .ledger
                .settings_changed(&inst.name, t_send, soak.now(), state),
            Ok((status, body)) => {
                // Not applied as far as we know: the instance's state is unknown
                // until the next acknowledged change.
                soak.ledger.settings_unknown(&inst.name, t_send);
                soak.ledger
                    .http_status("settings", status, soak.now(), &body.to_string());
            }
            Err(e) => {
                soak.ledger.settings_unknown(&inst.name, t_send);
                soak.ledger.http_error("settings", soak.now(), &e);
            }
        }
    }
}

/// Every 15 s an instance is created, gets clients and events, and is
/// deleted: its clients must be closed with 4004.
async fn ephemeral_loop(soak: Arc<Soak>) {
    let mut n = 0u64;
    while soak.running() {
        tokio::time::sleep(Duration::from_secs(15)).await;
        n += 1;
        let name = format!("eph-{n}");
        if let Err(e) = clients::ephemeral_round(&soak, &name).await {
            soak.ledger
                .problem(soak.now(), format!("ephemeral instance {name}: {e}"));
        }
    }
}

/// Receivers 1–3 misbehave all along: one slow, one failing with 500 half
/// the time, one timing out for 8 s of every 30.
async fn receiver_flaps(soak: Arc<Soak>) {
    soak.receivers.set(1, ReceiverMode::Slow);
    let mut tick = 0u64;
    while soak.running() {
        tokio::time::sleep(Duration::from_secs(1)).await;
        tick += 1;
        soak.receivers.set(
            2,
            if (tick / 10) % 2 == 0 {
                ReceiverMode::Fail500
            } else {
                ReceiverMode::Normal
            },
        );
        soak.receivers.set(
            3,
            if tick % 30 < 8 {
                ReceiverMode::Timeout
            } else {
                ReceiverMode::Normal
            },
        );
    }
}

/// The fault schedule, as fractions of the run.
async fn faults(soak: Arc<Soak>) {
    if soak.args.no_faults {
        return;
    }
    let total = soak.total();
    let mut plan: Vec<(f64, Fault)> = vec![
        (
            0.15,
            Fault::ReceiverDown {
                receiver: 0,
                secs: (total * 0.1).clamp(10.0, 180.0),
            },
        ),
        (
            0.45,
            Fault::KillNode {
                node: soak.cluster.len() - 1,
            },
        ),
    ];
    if soak.cluster.len() > 1 {
        plan.push((0.30, Fault::RestartNats));
        plan.push((0.60, Fault::RestartPostgres));
    }
    plan.sort_by(|a, b| a.0.total_cmp(&b.0));
    for (at, fault) in plan {
        let wait = at * total - soak.now();
        if wait > 0.0 {
            tokio::time::sleep(Duration::from_secs_f64(wait)).await;
        }
        let start = soak.now();
        eprintln!("soak: {start:.0} s: fault {fault}");
        let outcome = inject(&soak, &fault).await;
        let end = soak.now();
        if let Err(e) = &outcome {
            soak.ledger.problem(end, format!("fault {fault}: {e}"));
        }
        soak.ledger.fault(fault, start, end);
    }
}

async fn inject(soak: &Soak, fault: &Fault) -> BoxResult<()> {
    match fault {
        Fault::ReceiverDown { receiver, secs } => {
            soak.receivers.set(*receiver, ReceiverMode::Down);
            tokio::time::sleep(Duration::from_secs_f64(*secs)).await;
            soak.receivers.set(*receiver, ReceiverMode::Normal);
            Ok(())
        }
        Fault::KillNode { node } => soak.cluster.kill_and_restart(*node).await,
        Fault::RestartNats => {
            shell(&soak.args.nats_restart).await?;
            soak.cluster.wait_ready(Duration::from_secs(60)).await
        }
        Fault::RestartPostgres => {
            shell(&soak.args.pg_restart).await?;
            soak.cluster.wait_ready(Duration::from_secs(60)).await
        }
    }
}

async fn shell(command: &str) -> BoxResult<()> {
    let status = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .status()
        .await
        .map_err(|e| format!("{command}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{command}: {status}"))
    }
}

/// Waits until every acknowledged webhook delivery arrived, retrying dead
/// letters once the receivers are back, or `--settle` seconds pass.
async fn settle_webhooks(soak: &Soak, instances: &[Inst]) {
    let deadline = Instant::now() + Duration::from_secs_f64(soak.args.settle);
    let mut retried_at = Instant::now();
    loop {
        let missing = soak.ledger.webhook_missing(&soak.receivers);
        if missing == 0 || Instant::now() >= deadline {
            eprintln!("soak: {missing} webhook deliveries still missing");
            return;
        }
        if retried_at.elapsed() > Duration::from_secs(20) {
            retried_at = Instant::now();
            for inst in instances {
                let path = format!("/api/events/webhook/{}/retry", inst.name);
                if let Ok((202, body)) = soak.api().call("POST", &path, Some(json!({}))).await {
                    let n = body["requeued"].as_u64().unwrap_or(0);
                    if n > 0 {
                        soak.ledger.dead_letters_retried(n);
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
