//! How events and setting changes reach other nodes: `local` (one node, no
//! external service) or NATS (`cluster.nats_url`).
//!
//! A publish is delivered to this node's clients directly and sent once to
//! `<prefix>.ev.<instance id>`; a node subscribes to that subject only while
//! it has clients of the instance, and for a while after the last one left
//! (interest-based, see `instance::actor::INTEREST_LINGER`). NATS does not
//! echo what a node sent back to it (`no_echo`); what a node sent itself is
//! skipped anyway (the origin header), should an echo come. Settings
//! changes and deletions go to `<prefix>.ctl`.
//! Sending goes through a bounded queue and is skipped while NATS is
//! unreachable, so a NATS outage never blocks a request or grows memory:
//! what could not cross is counted (`eventgate_bus_errors_total`) and
//! logged.
//!
//! A change that could not cross is not lost for good: each time a node's
//! NATS connection comes up (at start and after an outage) it re-reads
//! storage at once ([`Bus::resyncs`]) and asks every other node to do the
//! same on `<prefix>.resync`, so changes made or missed while away apply
//! everywhere within moments of NATS returning, not at the next periodic
//! refresh.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::{Client, HeaderMap};
use bytes::Bytes;
use futures_util::StreamExt;
use parking_lot::Mutex;
use tokio::sync::{mpsc, watch};

use crate::domain::InstanceId;
use crate::events::Event;
use crate::instance::history::HistoryLimits;
use crate::instance::shared_history::SharedHistory;
use crate::instance::{Change, Inbox, Registry};
use crate::metrics::Metrics;
use crate::settings::ClusterSettings;

/// Messages waiting to be sent to NATS before new ones are dropped.
const OUTBOX: usize = 10_000;

/// A message waiting in the outbox: subject, history id (see
/// [`HISTORY_ID_HEADER`]), payload.
type Outgoing = (String, Option<String>, Bytes);

/// Header naming the node a message came from.
const ORIGIN_HEADER: &str = "Eventgate-Node";

/// On events sent the plain way after a shared-history publish of unknown
/// outcome: that publish's message id (see `shared_history`).
const HISTORY_ID_HEADER: &str = "Eventgate-History-Id";

/// Longest wait between reconnect attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// How often at most a "could not cross" warning is logged.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// Why the bus could not start.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("NATS: {0}")]
    Connect(String),
}

/// This node's NATS connection: how many times it came up, and whether it
/// is up now (a watch of it tells the shared history's followers when
/// their mirror may have fallen out of step).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Link {
    pub ups: u64,
    pub up: bool,
}

/// Whether `client` is connected to NATS at this moment.
pub fn connected(client: &Client) -> bool {
    matches!(
        client.connection_state(),
        async_nats::connection::State::Connected
    )
}

/// The bus chosen by settings.
#[derive(Clone)]
pub enum Bus {
    /// Single node: nothing crosses.
    Local,
    /// Several nodes through NATS.
    Nats(Arc<NatsBus>),
}

/// The NATS side of the bus.
pub struct NatsBus {
    client: Client,
    node: String,
    prefix: String,
    outbox: mpsc::Sender<Outgoing>,
    metrics: Arc<Metrics>,
    last_warning: Mutex<Option<Instant>>,
    /// The shared history, when the instances keep one (contract §12).
    history: Option<Arc<SharedHistory>>,
    /// Bumped whenever this node should re-read storage at once.
    resync: watch::Sender<u64>,
}

impl Bus {
    /// Connects in the background when `cluster.nats_url` is set (a NATS that
    /// is down at start-up is retried, and `/readyz` says so meanwhile).
    pub async fn connect(
        cluster: &ClusterSettings,
        metrics: Arc<Metrics>,
        history: Option<HistoryLimits>,
    ) -> Result<Bus, BusError> {
        if cluster.nats_url.is_empty() {
            return Ok(Bus::Local);
        }
        let node = crate::auth::generate_token()[..16].to_string();
        let events_metrics = metrics.clone();
        let (link_tx, mut link) = watch::channel(Link::default());
        let client = async_nats::ConnectOptions::new()
            .name(format!("eventgate-{node}"))
            // What this node sends is not sent back to it: a node's own
            // events would cost it a second copy of every event it publishes.
            .no_echo()
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connection_timeout(Duration::from_secs(2))
            .reconnect_delay_callback(|attempt| {
                let exp = u32::try_from(attempt.min(6)).unwrap_or(6);
                (Duration::from_millis(100) * 2u32.pow(exp)).min(MAX_BACKOFF)
            })
            .event_callback(move |event| {
                let metrics = events_metrics.clone();
                let link_tx = link_tx.clone();
                async move {
                    match event {
                        async_nats::Event::SlowConsumer(sid) => {
                            metrics.bus_errors.with_label_values(&["slow_consumer"]).inc();
                            log::warn!("NATS subscription {sid} overflowed: cross-node events were dropped");
                        }
                        async_nats::Event::Connected => {
                            log::info!("NATS connected");
                            link_tx.send_modify(|l| {
                                l.ups += 1;
                                l.up = true;
                            });
                        }
                        async_nats::Event::Disconnected => {
                            log::warn!("NATS disconnected; reconnecting");
                            link_tx.send_modify(|l| l.up = false);
                        }
                        other => log::warn!("NATS: {other}"),
                    }
                }
            })
            .connect(cluster.nats_url.as_str())
            .await
            .map_err(|e| BusError::Connect(e.to_string()))?;
        let (outbox, mut rx) = mpsc::channel::<Outgoing>(OUTBOX);
        let bus = Arc::new(NatsBus {
            client: client.clone(),
            node: node.clone(),
            prefix: cluster.subject_prefix.clone(),
            outbox,
            metrics,
            last_warning: Mutex::new(None),
            history: history.map(|limits| {
                Arc::new(SharedHistory::new(
                    client.clone(),
                    &cluster.subject_prefix,
                    limits,
                    link.clone(),
                ))
            }),
            resync: watch::Sender::new(0),
        });
        if let Some(history) = bus.history.clone() {
            // Gap markers this node owes, when the connection comes up and
            // every few seconds while it is up (JetStream not ready yet, a
            // flapping connection).
            let mut link = link.clone();
            actix_web::rt::spawn(async move {
                loop {
                    tokio::select! {
                        () = tokio::time::sleep(crate::instance::shared_history::GAP_RETRY) => {}
                        changed = link.changed() => if changed.is_err() { return },
                    }
                    if link.borrow_and_update().up && history.owes_gaps() {
                        history.mark_gaps().await;
                    }
                }
            });
        }
        let announcer = bus.clone();
        actix_web::rt::spawn(async move {
            // A connection made before this task ran is still a change.
            let mut ups = 0;
            while link.changed().await.is_ok() {
                let now = *link.borrow_and_update();
                if now.ups != ups {
                    ups = now.ups;
                    announcer.resync_here();
                    announcer.send(format!("{}.resync", announcer.prefix), Vec::new());
                }
            }
        });
        let sender = bus.clone();
        actix_web::rt::spawn(async move {
            while let Some((subject, history_id, payload)) = rx.recv().await {
                let mut headers = HeaderMap::new();
                headers.insert(ORIGIN_HEADER, sender.node.as_str());
                if let Some(id) = history_id {
                    headers.insert(HISTORY_ID_HEADER, id.as_str());
                }
                if let Err(e) = sender
                    .client
                    .publish_with_headers(subject, headers, payload)
                    .await
                {
                    sender.could_not_cross("publish_failed", &e);
                }
            }
        });
        log::info!(
            "cluster mode: node {node}, NATS {}",
            crate::settings::mask_url_password(&cluster.nats_url)
        );
        Ok(Bus::Nats(bus))
    }

    /// Whether the bus can reach the other nodes (`Err` says why not).
    pub fn readiness(&self) -> Result<(), &'static str> {
        match self {
            Bus::Local => Ok(()),
            Bus::Nats(bus) if connected(&bus.client) => Ok(()),
            Bus::Nats(_) => Err("NATS unreachable"),
        }
    }

    /// Sends accepted events to the other nodes (not waiting, never blocking).
    /// `history_id` names a shared-history publish of unknown outcome that
    /// these events are (the receiving nodes remember it).
    pub fn publish_events(
        &self,
        instance: InstanceId,
        events: &[Event],
        history_id: Option<String>,
    ) {
        if let Bus::Nats(bus) = self {
            match serde_json::to_vec(events) {
                Ok(payload) => bus.send_with(
                    format!("{}.ev.{}", bus.prefix, instance.0),
                    history_id,
                    payload,
                ),
                Err(e) => bus.could_not_cross("encode", &e),
            }
        }
    }

    /// The cluster's shared history, when instances keep one and NATS is
    /// connected (otherwise publishes take the local path).
    pub fn shared_history(&self) -> Option<&Arc<SharedHistory>> {
        match self {
            Bus::Nats(bus) => bus.history.as_ref(),
            Bus::Local => None,
        }
    }

    /// Whether NATS is connected right now.
    pub fn is_connected(&self) -> bool {
        match self {
            Bus::Nats(bus) => {
                bus.client.connection_state() == async_nats::connection::State::Connected
            }
            Bus::Local => true,
        }
    }

    /// Sends a change of an instance to the other nodes (and, for a
    /// deletion, clears its shared history).
    pub fn publish_change(&self, msg: &Change) {
        if let (Bus::Nats(bus), Change::Deleted { instance }) = (self, msg) {
            if let Some(history) = bus.history.clone() {
                let id = *instance;
                actix_web::rt::spawn(async move {
                    if let Err(e) = history.clear(id).await {
                        log::warn!("instance_id={} shared history not cleared: {e}", id.0);
                    }
                });
            }
        }
        if let Bus::Nats(bus) = self {
            match serde_json::to_vec(msg) {
                Ok(payload) => bus.send(format!("{}.ctl", bus.prefix), payload),
                Err(e) => bus.could_not_cross("encode", &e),
            }
        }
    }

    /// Follows the instance's events from other nodes into its actor, until
    /// the returned task is aborted. `None` on a single node.
    pub fn follow(
        &self,
        instance: InstanceId,
        inbox: Inbox,
    ) -> Option<tokio::task::JoinHandle<()>> {
        let Bus::Nats(bus) = self else {
            return None;
        };
        let bus = bus.clone();
        Some(actix_web::rt::spawn(async move {
            let subject = format!("{}.ev.{}", bus.prefix, instance.0);
            let mut sub = match bus.client.subscribe(subject).await {
                Ok(sub) => sub,
                Err(e) => return bus.could_not_cross("subscribe", &e),
            };
            while let Some(msg) = sub.next().await {
                if bus.is_own(&msg) {
                    continue;
                }
                let history_id = msg.headers.as_ref().and_then(|h| h.get(HISTORY_ID_HEADER));
                if let (Some(id), Some(history)) = (history_id, &bus.history) {
                    history.delivered_plainly(id.as_str());
                }
                match serde_json::from_slice::<Vec<Event>>(&msg.payload) {
                    // Waits while the instance's mailbox is at its bound
                    // (never for its sessions: see `Inbox::forward`); the
                    // subscription's own bound then drops (and counts) what
                    // overflows.
                    Ok(events) if !events.is_empty() => {
                        if inbox.forward(events.into()).await {
                            bus.metrics.publish_waits.inc();
                        }
                    }
                    Ok(_) => {}
                    Err(e) => bus.could_not_cross("decode", &e),
                }
            }
        }))
    }

    /// Ticks whenever this node should re-read instance settings and
    /// webhooks from storage at once: its NATS connection came up, or
    /// another node's did (changes made meanwhile may not have crossed).
    /// `None` on a single node.
    pub fn resyncs(&self) -> Option<watch::Receiver<u64>> {
        match self {
            Bus::Nats(bus) => Some(bus.resync.subscribe()),
            Bus::Local => None,
        }
    }

    /// Applies changes made on other nodes (through [`Registry::apply`]),
    /// and hears their requests to re-read storage.
    pub fn listen_changes(&self, registry: Arc<Registry>) {
        let Bus::Nats(bus) = self else {
            return;
        };
        let listener = bus.clone();
        actix_web::rt::spawn(async move {
            let subject = format!("{}.resync", listener.prefix);
            let mut sub = match listener.client.subscribe(subject).await {
                Ok(sub) => sub,
                Err(e) => return listener.could_not_cross("subscribe", &e),
            };
            while let Some(msg) = sub.next().await {
                if !listener.is_own(&msg) {
                    listener.resync_here();
                }
            }
        });
        let bus = bus.clone();
        actix_web::rt::spawn(async move {
            let mut sub = match bus.client.subscribe(format!("{}.ctl", bus.prefix)).await {
                Ok(sub) => sub,
                Err(e) => return bus.could_not_cross("subscribe", &e),
            };
            while let Some(msg) = sub.next().await {
                if bus.is_own(&msg) {
                    continue;
                }
                match serde_json::from_slice::<Change>(&msg.payload) {
                    Ok(change) => registry.apply(change),
                    Err(e) => bus.could_not_cross("decode", &e),
                }
            }
        });
    }
}

impl NatsBus {
    /// Asks this node's refresh loops to re-read storage now.
    fn resync_here(&self) {
        self.resync.send_modify(|n| *n += 1);
    }

    fn send(&self, subject: String, payload: Vec<u8>) {
        self.send_with(subject, None, payload)
    }

    fn send_with(&self, subject: String, history_id: Option<String>, payload: Vec<u8>) {
        if self.client.connection_state() != async_nats::connection::State::Connected {
            return self.could_not_cross("disconnected", &"NATS is not connected");
        }
        if self
            .outbox
            .try_send((subject, history_id, Bytes::from(payload)))
            .is_err()
        {
            self.could_not_cross("queue_full", &"the outgoing queue is full");
        }
    }

    fn is_own(&self, msg: &async_nats::Message) -> bool {
        msg.headers
            .as_ref()
            .and_then(|h| h.get(ORIGIN_HEADER))
            .is_some_and(|v| v.as_str() == self.node)
    }

    /// Counts a message that could not cross, and logs it now and then.
    fn could_not_cross(&self, kind: &'static str, cause: &dyn std::fmt::Display) {
        self.metrics.bus_errors.with_label_values(&[kind]).inc();
        let mut last = self.last_warning.lock();
        if last.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
            *last = Some(Instant::now());
            log::warn!("cross-node message not sent ({kind}): {cause}");
        }
    }
}
