//! The instance actor: holds one instance's settings and its sessions on this
//! node, and fans published events out to them.
//!
//! Each session is stored with the one `Recipient` used for every send, so a
//! full mailbox is reported to us (`try_send` → `Full`) and the session is
//! evicted with 4008; nobody else waits for it. The envelope of an event is
//! built once per event (per mediaBase64 variant) and shared by all sessions;
//! with no sessions nothing is built. One timer per instance, not one per
//! session, drives the heartbeats: the instance pings a client still heard
//! from on its socket itself, and tells its session only when it cannot.
//!
//! With a history (contract §12, [`History`]), every event accepted while the
//! WebSocket is enabled is kept and numbered, sessions or not; sessions that
//! opted in get envelopes stamped with offset and epoch (stamped once per
//! event), and a recovering session's replay is queued inside `Join`, so
//! nothing published around the hand-over is missed or repeated.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::dev::SendError;
use actix::prelude::*;
use bytes::Bytes;
use bytestring::ByteString;
use tokio::sync::oneshot;

use super::history::{History, HistoryLimits};
use super::inbox::Pressure;
use super::messages::*;
use super::{Inbox, InstanceInfo, Registry};
use crate::domain::{EventKind, EventSet, VersionedConfig};
use crate::events::{envelope, instance_data_json, strips_media};
use crate::metrics::Metrics;
use crate::ws::close::CloseCode;
use crate::ws::direct::{encode_texts, Direct, PING};

// Following the cluster's shared history: handlers of `SyncStart` and
// `Sequenced`, joins parked until the mirror is loaded.
#[path = "mirror.rs"]
mod mirror;

// Joining: a recovering session's first frame and replay.
#[path = "recovery.rs"]
mod recovery;

/// Mailbox capacity of an instance actor (see `started`).
const INSTANCE_MAILBOX: usize = 1 << 16;

/// How long a node goes on following an instance's events (and, in a
/// cluster with history, its shared history) after its last session left:
/// clients that come back after a short drop (a network change, a deploy)
/// find the mirror loaded instead of waiting for it.
const INTEREST_LINGER: Duration = Duration::from_secs(30);

/// How often an instance that is behind looks again at its sessions.
const LAG_POLL: Duration = Duration::from_millis(1);

/// Sessions an instance that is behind looks at every [`LAG_POLL`]: a
/// sample, since looking at tens of thousands every millisecond would be a
/// busy node's work in itself.
const LAG_SAMPLE: usize = 128;

/// What the actor needs from the node, shared by all instance actors.
#[derive(Clone)]
pub struct FanoutEnv {
    /// `instanceData.baseUrl`.
    pub base_url: Arc<str>,
    /// Bytes of frames a session may have queued before it is a slow consumer.
    pub client_buffer_bytes: usize,
    pub metrics: Arc<Metrics>,
    /// Where this instance's events from other nodes come from.
    pub bus: crate::bus::Bus,
    /// Publishes waiting for an instance actor from which every publisher
    /// waits (`limits.publish_queue`; see `Inbox`).
    pub publish_queue: usize,
    /// Publishes waiting in a session from which it lags, and waiting for
    /// the actor from which local publishers wait (`limits.publish_lag`; see
    /// `Inbox`); 0 = never.
    pub publish_lag: usize,
    /// Whether the fan-out writes idle sessions' sockets itself (`ws::direct`).
    pub direct_writes: bool,
    /// Bounds of each instance's history; `None`: no history is kept.
    pub history: Option<HistoryLimits>,
    /// How often each client is pinged and its silence checked
    /// (`ws.ping_interval_secs`), by this actor's heartbeat turns ([`HEARTBEAT_SLICE`]).
    pub ping_interval: Duration,
    /// How long a client may stay silent before it is closed with 4001
    /// (`ws.idle_timeout_secs`).
    pub idle_timeout: Duration,
    /// Each session's mailbox and message size (`ws.client_buffer`,
    /// `ws.max_message_bytes`).
    pub session_limits: crate::ws::session::SessionLimits,
}

struct SessionEntry {
    recipient: Recipient<ToSession>,
    narrowing: EventSet,
    shared: Arc<SessionShared>,
    /// Whether the client opted in to recovery (`?recover=true`).
    recovering: bool,
}

/// Least time between the node's fan-outs (of all its instances) for the
/// second to write idle sockets itself (`ws::direct`): a node fanning out
/// faster than this (200 publishes a second in all) keeps its sessions'
/// writers busy, and they gather several publishes into one write, which a
/// write per publish from here cannot match.
const DIRECT_SPACING: Duration = Duration::from_millis(5);

/// How often an instance with sessions takes the heartbeat turn of a slice
/// of them: each session once per ping interval, so one timer per instance
/// serves every session (a timer per session cost each idle connection
/// about 150 bytes), and a large instance's pings are spread over the
/// interval instead of sent at once.
const HEARTBEAT_SLICE: Duration = Duration::from_secs(1);

/// One event's envelopes for this node's sessions.
struct Frame {
    kind: EventKind,
    /// As every client that did not opt in receives it.
    plain: ByteString,
    /// With `"offset"` and `"epoch"`, when a session that opted in needs it.
    stamped: Option<ByteString>,
}

/// One instance's actor.
pub struct InstanceActor {
    info: InstanceInfo,
    config: Option<VersionedConfig>,
    /// `instanceData` of this instance's envelopes, serialised once.
    instance_data: String,
    /// By id, that is in the order their connections came: the fan-out
    /// then writes their sockets in the order the kernel made them, which
    /// its caches follow (in a hash's order each write cost the kernel
    /// about a sixth more; BENCHMARKS, "Fan-out in join order").
    sessions: BTreeMap<SessionId, SessionEntry>,
    env: FanoutEnv,
    registry: std::sync::Weak<Registry>,
    /// The label this instance reports its client count under.
    metrics_label: String,
    /// What this actor has added to that label's gauge.
    reported: i64,
    /// Follows this instance's events from other nodes while it has
    /// sessions, and for [`INTEREST_LINGER`] after the last one left.
    following: Option<tokio::task::JoinHandle<()>>,
    /// Ends `following` once the actor has been without sessions for
    /// [`INTEREST_LINGER`].
    linger: Option<SpawnHandle>,
    /// Backpressure shared with its `Inbox`es: publishes not yet handled,
    /// and whether this node is behind with the sessions.
    pressure: Arc<Pressure>,
    /// Whether the last fan-out found at most one in eight of its sessions
    /// with something waiting for them: only then does the next one write
    /// sockets itself (`ws::direct`).
    writers_idle: bool,
    /// Publishers waiting for the sessions to catch up.
    answers: Vec<oneshot::Sender<()>>,
    /// Looks at the sessions every [`LAG_POLL`] while publishers wait.
    lag_watch: Option<SpawnHandle>,
    /// Takes the sessions' heartbeat turns, while there are any.
    heartbeats: Option<SpawnHandle>,
    /// Heartbeat turns taken so far, one slice each ([`HEARTBEAT_SLICE`]).
    heartbeat_slices: u64,
    /// This instance's recent events (`None`: no history configured).
    history: Option<History>,
    /// Sessions that opted in to recovery.
    recovering: usize,
    /// The cluster's shared history, when instances keep one: `history` is
    /// then this node's mirror of it.
    shared: Option<Arc<super::shared_history::SharedHistory>>,
    /// Whether the mirror is loaded (always, without a shared history).
    synced: bool,
    /// Whether `history` is a local numbering standing in for the shared one
    /// (it could not be reached).
    degraded: bool,
    /// Whether the mirror is loading what the shared history holds (those
    /// events are kept, not delivered).
    loading: bool,
    /// Set when the actor first numbers locally since it began following
    /// (admitting the joins waiting): when the first of them arrived, or
    /// then. While its mirror loads, what the load brings that was accepted
    /// since is delivered live, to the sessions admitted meanwhile.
    numbered_locally_at: Option<Instant>,
    /// Whether NATS dropped or came back since the follower last looked at
    /// JetStream: recoveries wait (see `mirror`).
    unsure: bool,
    /// Joins waiting for the mirror (see `mirror`), with when they arrived.
    parked: Vec<(Join, Instant)>,
    /// The shared epoch and the last stream sequence the follower delivered.
    shared_seen: Option<(Arc<str>, u64)>,
    /// Follows the shared history into this actor while it has sessions.
    mirror_task: Option<tokio::task::JoinHandle<()>>,
    /// The follower `mirror_task` runs (only its messages are heard).
    follower: FollowerId,
}

impl InstanceActor {
    pub fn new(
        info: InstanceInfo,
        config: Option<VersionedConfig>,
        env: FanoutEnv,
        registry: std::sync::Weak<Registry>,
        metrics_label: String,
        pressure: Arc<Pressure>,
    ) -> Self {
        let instance_data = instance_data_json(&env.base_url, &info.name, &info.token);
        let shared = env.history.and(env.bus.shared_history().cloned());
        let history = match shared {
            Some(_) => None,
            None => env.history.map(History::new),
        };
        Self {
            info,
            config,
            instance_data,
            sessions: BTreeMap::new(),
            env,
            registry,
            metrics_label,
            reported: 0,
            following: None,
            linger: None,
            pressure,
            writers_idle: true,
            answers: Vec::new(),
            lag_watch: None,
            heartbeats: None,
            heartbeat_slices: 0,
            synced: shared.is_none(),
            shared,
            history,
            recovering: 0,
            degraded: false,
            parked: Vec::new(),
            loading: false,
            numbered_locally_at: None,
            unsure: false,
            shared_seen: None,
            mirror_task: None,
            follower: FollowerId::default(),
        }
    }

    /// Forgets a session (keeping the count of those that opted in).
    fn remove_session(&mut self, id: SessionId) -> Option<SessionEntry> {
        let entry = self.sessions.remove(&id)?;
        if entry.recovering {
            self.recovering -= 1;
        }
        Some(entry)
    }

    fn evict(&mut self, id: SessionId, code: CloseCode) {
        if let Some(entry) = self.remove_session(id) {
            entry.shared.request_close(code);
            // Bypasses the full mailbox on purpose: one control message.
            entry.recipient.do_send(ToSession::Close(code));
            self.env
                .metrics
                .clients_evicted
                .with_label_values(&[code.label()])
                .inc();
            log::warn!(
                "instance={} session={id} evicted: {}",
                self.info.name,
                code.reason()
            );
            self.report_count();
        }
    }

    fn close_all(&mut self, code: CloseCode) -> usize {
        let n = self.sessions.len();
        self.recovering = 0;
        for entry in std::mem::take(&mut self.sessions).into_values() {
            entry.shared.request_close(code);
            entry.recipient.do_send(ToSession::Close(code));
        }
        let waiting = self.parked.len();
        for (join, _) in self.parked.drain(..) {
            join.shared.request_close(code);
            join.recipient.do_send(ToSession::Close(code));
        }
        self.report_count();
        n + waiting
    }

    /// Subscribes to other nodes' events while there are sessions, and for
    /// [`INTEREST_LINGER`] after the last one left.
    fn update_interest(&mut self, ctx: &mut Context<Self>) {
        let idle = self.sessions.is_empty() && self.parked.is_empty();
        match (idle, self.heartbeats.is_some()) {
            (false, false) => {
                self.heartbeats =
                    Some(ctx.run_interval(HEARTBEAT_SLICE, |act, _| act.take_heartbeat_turns()));
            }
            (true, true) => {
                if let Some(timer) = self.heartbeats.take() {
                    ctx.cancel_future(timer);
                }
            }
            _ => {}
        }
        if !idle {
            if let Some(timer) = self.linger.take() {
                ctx.cancel_future(timer);
            }
            if self.following.is_none() {
                let inbox = Inbox::new(
                    ctx.address(),
                    &self.info.name,
                    self.pressure.clone(),
                    &self.env,
                );
                self.following = self.env.bus.follow(self.info.id, inbox);
                self.follow_shared(ctx);
            }
        } else if self.following.is_some() && self.linger.is_none() {
            self.linger = Some(ctx.run_later(INTEREST_LINGER, |act, _| {
                act.linger = None;
                if let Some(task) = act.following.take() {
                    task.abort();
                }
                act.unfollow_shared();
            }));
        }
    }

    /// Brings the per-instance gauge up to date (by difference: instances
    /// past the label limit share one series).
    fn report_count(&mut self) {
        let now = i64::try_from(self.sessions.len()).unwrap_or(i64::MAX);
        self.env
            .metrics
            .connected_by_instance
            .with_label_values(&[&self.metrics_label])
            .add(now - self.reported);
        self.reported = now;
    }
}

impl Actor for InstanceActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // Publishes and control messages arrive by `do_send`, which ignores
        // the capacity; it only makes `send` (counts, shutdown) wait less
        // behind a backlog than the default of 16 would.
        ctx.set_mailbox_capacity(INSTANCE_MAILBOX);
        self.env.metrics.instance_actors.inc();
    }

    fn stopped(&mut self, ctx: &mut Self::Context) {
        self.env.metrics.instance_actors.dec();
        self.sessions.clear();
        self.report_count();
        if let Some(task) = self.following.take() {
            task.abort();
        }
        self.unfollow_shared();
        if self.metrics_label != super::registry::OTHER_LABEL {
            let _ = self
                .env
                .metrics
                .connected_by_instance
                .remove_label_values(&[&self.metrics_label]);
        }
        if let Some(registry) = self.registry.upgrade() {
            registry.remove(self.info.id, &ctx.address(), &self.metrics_label);
        }
    }
}

impl InstanceActor {
    /// Queues `batch` to a session within its bounds; the close code it
    /// earns otherwise.
    fn offer(
        &self,
        entry: &SessionEntry,
        batch: Batch,
        wrap: fn(Batch) -> ToSession,
    ) -> Result<(), CloseCode> {
        let bytes = batch.bytes;
        let queued = entry.shared.queued_bytes.fetch_add(bytes, Ordering::AcqRel);
        // A client with nothing queued takes any batch: it is not behind.
        if queued > 0 && queued + bytes > self.env.client_buffer_bytes {
            entry.shared.queued_bytes.fetch_sub(bytes, Ordering::AcqRel);
            return Err(CloseCode::SlowConsumer);
        }
        entry.shared.queued_batches.fetch_add(1, Ordering::AcqRel);
        match entry.recipient.try_send(wrap(batch)) {
            Ok(()) => Ok(()),
            Err(SendError::Full(_)) => {
                entry.shared.queued_bytes.fetch_sub(bytes, Ordering::AcqRel);
                entry.shared.queued_batches.fetch_sub(1, Ordering::AcqRel);
                Err(CloseCode::SlowConsumer)
            }
            Err(SendError::Closed(_)) => Err(CloseCode::Normal),
        }
    }
}

impl Handler<Leave> for InstanceActor {
    type Result = ();

    fn handle(&mut self, msg: Leave, ctx: &mut Self::Context) {
        let waiting = self.parked.len();
        self.parked.retain(|(join, _)| join.session != msg.session);
        if self.remove_session(msg.session).is_some() || self.parked.len() != waiting {
            self.report_count();
            self.update_interest(ctx);
        }
    }
}

impl Handler<UpdateSettings> for InstanceActor {
    type Result = ();

    fn handle(&mut self, msg: UpdateSettings, _: &mut Self::Context) {
        // Settings are never removed, only replaced by newer versions: "none
        // stored" is older than anything held (a late notice from before the
        // first store, or a malformed one, never wipes what is known).
        let newer = match (&self.config, &msg.0) {
            (Some(held), Some(new)) => new.version > held.version,
            (Some(_), None) => false,
            (None, _) => true,
        };
        if newer {
            self.config = msg.0;
        }
    }
}

impl Handler<Deleted> for InstanceActor {
    type Result = ();

    fn handle(&mut self, _: Deleted, ctx: &mut Self::Context) {
        let n = self.close_all(CloseCode::InstanceDeleted);
        log::info!("instance={} deleted; closed {n} sessions", self.info.name);
        ctx.stop();
    }
}

impl Handler<CloseAll> for InstanceActor {
    type Result = usize;

    fn handle(&mut self, msg: CloseAll, ctx: &mut Self::Context) -> usize {
        let n = self.close_all(msg.0);
        self.update_interest(ctx);
        n
    }
}

impl Handler<CountSessions> for InstanceActor {
    type Result = usize;

    fn handle(&mut self, _: CountSessions, _: &mut Self::Context) -> usize {
        self.sessions.len()
    }
}

impl Handler<Publish> for InstanceActor {
    type Result = ();

    fn handle(&mut self, mut msg: Publish, ctx: &mut Self::Context) {
        // Dropped unanswered on every early return: nothing to wait for.
        let answer = msg.answer.take();
        if self.sessions.is_empty() && self.history.is_none() && self.parked.is_empty() {
            return;
        }
        let Some(config) = self.config.as_ref().map(|c| &c.config) else {
            return;
        };
        if !config.enabled {
            return;
        }
        if self.shared.is_some() {
            // Events that did not go through the shared history.
            self.degrade(ctx);
        }
        let Some(config) = self.config.as_ref().map(|c| &c.config) else {
            return;
        };
        let (filter, media) = (config.event_set(), config.media_base64);
        let frames = match &mut self.history {
            None => msg
                .events
                .iter()
                .filter(|e| filter.allows(e.kind))
                .map(|e| Frame {
                    kind: e.kind,
                    plain: envelope(e, &self.instance_data, media),
                    stamped: None,
                })
                .collect(),
            Some(history) => {
                // Every accepted event is kept, whatever the filter.
                let now = Instant::now();
                let stamping = self.recovering > 0;
                let mut frames = Vec::with_capacity(msg.events.len());
                for e in msg.events.iter() {
                    let kept = envelope(e, &self.instance_data, true);
                    let stripped = strips_media(e).then(|| envelope(e, &self.instance_data, false));
                    let plain = match (&stripped, media) {
                        (Some(stripped), false) => stripped.clone(),
                        _ => kept.clone(),
                    };
                    let offset = history.push(e.kind, kept, stripped, now);
                    if !self.sessions.is_empty() && filter.allows(e.kind) {
                        let stamped = stamping.then(|| history.stamp(&plain, offset));
                        frames.push(Frame {
                            kind: e.kind,
                            plain,
                            stamped,
                        });
                    }
                }
                frames
            }
        };
        if frames.is_empty() {
            return;
        }
        // Another publish waiting behind this one, of this instance or of
        // any on this node (the node's count holds every instance's, this
        // one's ticket included): the node is busy, and the sessions'
        // writers, which gather several publishes into one write, keep up
        // better than a write per publish here.
        let quiet = self.node_quiet(1);
        self.fan_out(&frames, 1, quiet, ctx);
        self.env
            .metrics
            .fanout_seconds
            .observe(msg.accepted_at.elapsed().as_secs_f64());
        if let Some(answer) = answer {
            if self.pressure.behind.load(Ordering::Acquire) {
                self.answers.push(answer);
                self.watch_lag(ctx);
            } else {
                let _ = answer.send(());
            }
        }
    }
}

impl InstanceActor {
    /// Whether no more than `own` publishes (those being handled here) wait
    /// for the instance actors of this node (not counted, so `true`,
    /// without direct writes, which alone ask).
    pub(super) fn node_quiet(&self, own: usize) -> bool {
        self.pressure
            .node
            .as_ref()
            .is_none_or(|n| n.waiting.load(Ordering::Acquire) <= own)
    }

    /// The batches a session holds from which it lags, now (see
    /// [`lag_threshold`]); `own` publishes are being handled here.
    fn lag_threshold(&self, own: usize) -> usize {
        let waiting = self.pressure.waiting.load(Ordering::Acquire);
        lag_threshold(self.env.publish_lag, waiting.saturating_sub(own))
    }

    /// Whether this fan-out may write idle sessions' sockets itself: the
    /// node `quiet`, at least [`DIRECT_SPACING`] after its previous one (of
    /// any instance), and this instance's previous one found the writers idle.
    fn may_write_directly(&self, quiet: bool) -> bool {
        let spaced = self
            .pressure
            .node
            .as_ref()
            .is_some_and(|n| n.fan_out_spaced(DIRECT_SPACING));
        quiet && spaced && self.writers_idle
    }

    /// Queues `frames` to every session, evicting those past their bounds;
    /// `own` publishes (0 or 1) are being handled here and still counted as
    /// waiting for this actor. With `server.direct_writes`, when the node is
    /// `quiet` (nothing but the `own` publishes waits for this actor or any
    /// other of the node; and see `may_write_directly`), an idle session's
    /// socket is written here at once instead (`ws::direct`), until another
    /// publish arrives for the node: from then on the rest take their
    /// mailboxes, so a publish never waits behind a whole fan-out of socket
    /// writes.
    fn fan_out(&mut self, frames: &[Frame], own: usize, quiet: bool, ctx: &mut Context<Self>) {
        if frames.is_empty() {
            return;
        }
        // Sessions with the same narrowing and opt-in share one batch (and
        // its encoding, made when a session is first written directly).
        let mut batches: Vec<((EventSet, bool), Batch, Option<Bytes>)> = Vec::new();
        let mut dropped = Vec::new();
        let mut delivered = 0u64;
        let mut lag = Lag::new(self.lag_threshold(own));
        // Batches written directly, whole and in part (`ws::direct`).
        let mut written = [0u64; 2];
        let mut direct = self.env.direct_writes && self.may_write_directly(quiet);
        // Sessions given frames, and those of them with some still waiting.
        let (mut given, mut busy) = (0usize, 0usize);
        let mut sessions = self.sessions.iter().peekable();
        while let Some((id, entry)) = sessions.next() {
            if let Some((_, next)) = sessions.peek() {
                prefetch(&*next.shared);
            }
            let key = (entry.narrowing, entry.recovering);
            let pos = match batches.iter().position(|(k, _, _)| *k == key) {
                Some(pos) => pos,
                None => {
                    batches.push((key, batch_of(frames, key.0, key.1), None));
                    batches.len() - 1
                }
            };
            let (_, batch, wire) = &mut batches[pos];
            if batch.frames.is_empty() {
                continue;
            }
            let n = batch.frames.len() as u64;
            if self.env.direct_writes {
                let idle = entry.shared.nothing_waiting();
                given += 1;
                busy += usize::from(!idle);
                // Looked at before each write: a publish arriving ends them.
                direct = direct && self.node_quiet(own);
                if direct && idle {
                    let wire = wire.get_or_insert_with(|| encode_texts(&batch.frames));
                    let done = entry.shared.direct.write(wire);
                    if done != Direct::Refused {
                        if done == Direct::Partly {
                            // Wakes the writer to send the rest (if it is
                            // full or gone, what waits wakes it, or nothing need).
                            let _ = entry.recipient.try_send(ToSession::Flush);
                        }
                        written[usize::from(done == Direct::Partly)] += 1;
                        delivered += n;
                        lag.count(&entry.shared);
                        continue;
                    }
                }
            }
            match self.offer(entry, batch.clone(), ToSession::Deliver) {
                Ok(()) => {
                    delivered += n;
                    lag.count(&entry.shared);
                }
                Err(code) => dropped.push((*id, code)),
            }
        }
        // At full speed sessions have publishes waiting, and each writer
        // gathers several into one write: better than a write per publish here.
        self.writers_idle = busy * 8 <= given;
        self.set_behind(lag.behind(), ctx);
        let lost_some = !dropped.is_empty();
        for (id, code) in dropped {
            if code == CloseCode::SlowConsumer {
                self.evict(id, code);
            } else {
                self.remove_session(id);
                self.report_count();
            }
        }
        if lost_some {
            self.update_interest(ctx);
        }
        self.env.metrics.events_delivered.inc_by(delivered);
        if written != [0, 0] {
            let counter = &self.env.metrics.direct_writes;
            counter.with_label_values(&["whole"]).inc_by(written[0]);
            counter.with_label_values(&["partly"]).inc_by(written[1]);
        }
    }
}

/// Asks the CPU to bring `value` into its caches, without waiting for it.
/// The fan-out asks for the next session's shared state while the kernel
/// writes this one's socket; read after, it was a cache miss per session
/// (BENCHMARKS, "Fan-out in join order").
fn prefetch<T>(value: &T) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        const LINE: usize = 64;
        let start = (value as *const T).cast::<i8>();
        let skew = start as usize % LINE;
        let first = start.wrapping_sub(skew);
        for line in 0..(skew + std::mem::size_of::<T>()).div_ceil(LINE) {
            // SAFETY: a prefetch is a hint that reads nothing into the
            // program and cannot fault, whatever the address.
            #[allow(unsafe_code)] // One of the crate's unsafe calls (see `lib.rs`).
            unsafe {
                _mm_prefetch::<_MM_HINT_T0>(first.wrapping_add(line * LINE));
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = value;
}

/// The batches a session holds from which it lags (see `Lag`):
/// `publish_lag` (`limits.publish_lag`) less the `waiting` publishes queued
/// for the instance's actor behind the one being fanned out, at least 1
/// (0: the rule is off). A publish crosses both queues, the actor's and
/// then its sessions', so together, not each, they hold about `publish_lag`
/// publishes.
fn lag_threshold(publish_lag: usize, waiting: usize) -> usize {
    if publish_lag == 0 {
        return 0;
    }
    publish_lag.saturating_sub(waiting).max(1)
}

/// How many sessions are lagging, of how many (see `SessionShared::lagging`).
struct Lag {
    /// The batches from which a session lags ([`lag_threshold`]; 0: never).
    threshold: usize,
    lagging: usize,
    sessions: usize,
}

impl Lag {
    fn new(threshold: usize) -> Self {
        Self {
            threshold,
            lagging: 0,
            sessions: 0,
        }
    }

    fn count(&mut self, session: &SessionShared) {
        self.sessions += 1;
        if self.threshold > 0 && session.lagging(self.threshold) {
            self.lagging += 1;
        }
    }

    /// Whether most sessions are lagging: this node is behind with them.
    /// Sessions whose clients do not keep up never lag, so slow clients,
    /// however many, never make an instance behind.
    fn behind(&self) -> bool {
        self.lagging * 2 > self.sessions
    }
}

impl InstanceActor {
    /// Whether this node is behind with the instance's sessions: while it is,
    /// publishers wait (see `Inbox`); once it is not, they are answered.
    fn set_behind(&mut self, behind: bool, ctx: &mut Context<Self>) {
        let was = self.pressure.behind.swap(behind, Ordering::AcqRel);
        if behind {
            if !was {
                self.env.metrics.publish_lag.inc();
            }
            return;
        }
        for answer in self.answers.drain(..) {
            let _ = answer.send(());
        }
        if let Some(watch) = self.lag_watch.take() {
            ctx.cancel_future(watch);
        }
    }

    /// Takes the heartbeat turn of this slice's sessions (and of joins
    /// waiting for the mirror): a session's slice is its id modulo the number
    /// of slices in a ping interval. A client still heard from whose writer
    /// is idle is pinged here, straight on its socket (`ws::direct`), with
    /// no message and no wake-up of its session; any other session is told
    /// to take its turn itself (ping, or close).
    fn take_heartbeat_turns(&mut self) {
        let slices = (self.env.ping_interval.as_millis() / HEARTBEAT_SLICE.as_millis()).max(1);
        let slices = u64::try_from(slices).unwrap_or(u64::MAX);
        let slice = self.heartbeat_slices % slices;
        self.heartbeat_slices = self.heartbeat_slices.wrapping_add(1);
        let now = Instant::now();
        let sessions = self
            .sessions
            .iter()
            .map(|(id, e)| (id, &e.recipient, &e.shared));
        let waiting = self
            .parked
            .iter()
            .map(|(j, _)| (&j.session, &j.recipient, &j.shared));
        for (id, recipient, shared) in sessions.chain(waiting) {
            if id.0 % slices != slice {
                continue;
            }
            let silent_since = shared.heartbeat.silent_since(self.env.idle_timeout, now);
            if silent_since.is_none() && shared.requested_close().is_none() {
                match shared.direct.write(&PING) {
                    Direct::Written => continue,
                    Direct::Partly => {
                        // Its writer sends the rest once woken.
                        let _ = recipient.try_send(ToSession::Flush);
                        continue;
                    }
                    Direct::Refused => {}
                }
            }
            // Past the mailbox's bound, as a close is: one small message.
            recipient.do_send(ToSession::Heartbeat { silent_since });
        }
    }

    /// Looks at (a sample of) the sessions every [`LAG_POLL`] while
    /// publishers wait for them, until they have caught up.
    fn watch_lag(&mut self, ctx: &mut Context<Self>) {
        if self.lag_watch.is_some() {
            return;
        }
        self.lag_watch = Some(ctx.run_interval(LAG_POLL, |act, ctx| {
            let mut lag = Lag::new(act.lag_threshold(0));
            for entry in act.sessions.values().take(LAG_SAMPLE) {
                lag.count(&entry.shared);
            }
            act.set_behind(lag.behind(), ctx);
        }));
    }
}

/// Collects the frames a session with `narrowing` receives into one shared
/// batch, stamped when it opted in (and the instance keeps a history).
fn batch_of(frames: &[Frame], narrowing: EventSet, stamped: bool) -> Batch {
    let frames: Arc<[ByteString]> = frames
        .iter()
        .filter(|f| narrowing.allows(f.kind))
        .map(|f| match (&f.stamped, stamped) {
            (Some(s), true) => s.clone(),
            _ => f.plain.clone(),
        })
        .collect();
    let bytes = frames.iter().map(|f| f.len()).sum();
    Batch { frames, bytes }
}

#[cfg(test)]
mod tests {
    use super::lag_threshold;

    #[test]
    fn the_actors_queue_and_the_sessions_share_one_lag() {
        // Nothing waits for the actor: the sessions may hold all of it.
        assert_eq!(lag_threshold(6, 0), 6);
        // Publishes waiting for the actor count against the sessions' part.
        assert_eq!(lag_threshold(6, 2), 4);
        // However many wait, a session with a batch waiting still lags.
        assert_eq!(lag_threshold(6, 6), 1);
        assert_eq!(lag_threshold(6, 1000), 1);
        // 0 turns the rule off, whatever waits.
        assert_eq!(lag_threshold(0, 0), 0);
        assert_eq!(lag_threshold(0, 3), 0);
    }
}
