//! The instance actor: holds one instance's settings and its sessions on this
//! node, and fans published events out to them.
//!
//! Each session is stored with the one `Recipient` used for every send, so a
//! full mailbox is reported to us (`try_send` → `Full`) and the session is
//! evicted with 4008; nobody else waits for it. The envelope of an event is
//! built once per event (per mediaBase64 variant) and shared by all sessions;
//! with no sessions nothing is built.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use actix::dev::SendError;
use actix::prelude::*;
use bytestring::ByteString;

use super::messages::*;
use super::{Inbox, InstanceInfo, Registry};
use crate::domain::{EventSet, VersionedConfig};
use crate::events::{envelope, instance_data_json};
use crate::metrics::Metrics;
use crate::ws::close::CloseCode;

/// Mailbox capacity of an instance actor (see `started`).
const INSTANCE_MAILBOX: usize = 1 << 16;

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
    /// Publishes waiting for an instance actor past which publishers wait
    /// (`limits.publish_queue`; see `Inbox`).
    pub publish_queue: usize,
}

struct SessionEntry {
    recipient: Recipient<ToSession>,
    narrowing: EventSet,
    shared: Arc<SessionShared>,
}

/// One instance's actor.
pub struct InstanceActor {
    info: InstanceInfo,
    config: Option<VersionedConfig>,
    /// `instanceData` of this instance's envelopes, serialised once.
    instance_data: String,
    sessions: HashMap<SessionId, SessionEntry>,
    env: FanoutEnv,
    registry: std::sync::Weak<Registry>,
    /// The label this instance reports its client count under.
    metrics_label: String,
    /// What this actor has added to that label's gauge.
    reported: i64,
    /// Follows this instance's events from other nodes while it has sessions.
    following: Option<tokio::task::JoinHandle<()>>,
    /// Publishes sent to this actor and not yet handled (shared with its `Inbox`es).
    waiting: Arc<AtomicUsize>,
}

impl InstanceActor {
    pub fn new(
        info: InstanceInfo,
        config: Option<VersionedConfig>,
        env: FanoutEnv,
        registry: std::sync::Weak<Registry>,
        metrics_label: String,
        waiting: Arc<AtomicUsize>,
    ) -> Self {
        let instance_data = instance_data_json(&env.base_url, &info.name, &info.token);
        Self {
            info,
            config,
            instance_data,
            sessions: HashMap::new(),
            env,
            registry,
            metrics_label,
            reported: 0,
            following: None,
            waiting,
        }
    }

    fn evict(&mut self, id: SessionId, code: CloseCode) {
        if let Some(entry) = self.sessions.remove(&id) {
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
        for (_, entry) in self.sessions.drain() {
            entry.shared.request_close(code);
            entry.recipient.do_send(ToSession::Close(code));
        }
        self.report_count();
        n
    }

    /// Subscribes to other nodes' events while there are sessions, and only then.
    fn update_interest(&mut self, ctx: &mut Context<Self>) {
        match (self.sessions.is_empty(), &self.following) {
            (false, None) => {
                let inbox = Inbox::new(ctx.address(), self.waiting.clone(), self.env.publish_queue);
                self.following = self.env.bus.follow(self.info.id, inbox);
            }
            (true, Some(task)) => {
                task.abort();
                self.following = None;
            }
            _ => {}
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
    }

    fn stopped(&mut self, ctx: &mut Self::Context) {
        self.sessions.clear();
        self.report_count();
        if let Some(task) = self.following.take() {
            task.abort();
        }
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

impl Handler<Join> for InstanceActor {
    type Result = ();

    fn handle(&mut self, msg: Join, ctx: &mut Self::Context) {
        self.sessions.insert(
            msg.session,
            SessionEntry {
                recipient: msg.recipient,
                narrowing: msg.narrowing,
                shared: msg.shared,
            },
        );
        self.report_count();
        self.update_interest(ctx);
    }
}

impl Handler<Leave> for InstanceActor {
    type Result = ();

    fn handle(&mut self, msg: Leave, ctx: &mut Self::Context) {
        if self.sessions.remove(&msg.session).is_some() {
            self.report_count();
            self.update_interest(ctx);
        }
    }
}

impl Handler<UpdateSettings> for InstanceActor {
    type Result = ();

    fn handle(&mut self, msg: UpdateSettings, _: &mut Self::Context) {
        let newer = match (&self.config, &msg.0) {
            (Some(held), Some(new)) => new.version > held.version,
            _ => true,
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

    fn handle(&mut self, msg: Publish, ctx: &mut Self::Context) {
        if self.sessions.is_empty() {
            return;
        }
        let Some(config) = self.config.as_ref().map(|c| &c.config) else {
            return;
        };
        if !config.enabled {
            return;
        }
        let filter = config.event_set();
        let frames: Vec<(crate::domain::EventKind, ByteString)> = msg
            .events
            .iter()
            .filter(|e| filter.allows(e.kind))
            .map(|e| {
                (
                    e.kind,
                    envelope(e, &self.instance_data, config.media_base64),
                )
            })
            .collect();
        if frames.is_empty() {
            return;
        }
        let all = batch_of(frames.iter());
        // Narrowed clients share one batch per distinct narrowing.
        let mut narrowed: Vec<(EventSet, Batch)> = Vec::new();
        let mut dropped = Vec::new();
        let mut delivered = 0u64;
        for (id, entry) in &self.sessions {
            let batch = if entry.narrowing == EventSet::default() {
                &all
            } else if let Some(pos) = narrowed.iter().position(|(n, _)| *n == entry.narrowing) {
                &narrowed[pos].1
            } else {
                let set = entry.narrowing;
                narrowed.push((set, batch_of(frames.iter().filter(|(k, _)| set.allows(*k)))));
                &narrowed[narrowed.len() - 1].1
            };
            if batch.frames.is_empty() {
                continue;
            }
            let queued = entry
                .shared
                .queued_bytes
                .fetch_add(batch.bytes, Ordering::AcqRel);
            // A client with nothing queued takes any batch: it is not behind.
            if queued > 0 && queued + batch.bytes > self.env.client_buffer_bytes {
                entry
                    .shared
                    .queued_bytes
                    .fetch_sub(batch.bytes, Ordering::AcqRel);
                dropped.push((*id, CloseCode::SlowConsumer));
                continue;
            }
            match entry.recipient.try_send(ToSession::Deliver(batch.clone())) {
                Ok(()) => delivered += batch.frames.len() as u64,
                Err(SendError::Full(_)) => {
                    entry
                        .shared
                        .queued_bytes
                        .fetch_sub(batch.bytes, Ordering::AcqRel);
                    dropped.push((*id, CloseCode::SlowConsumer));
                }
                Err(SendError::Closed(_)) => dropped.push((*id, CloseCode::Normal)),
            }
        }
        let lost_some = !dropped.is_empty();
        for (id, code) in dropped {
            if code == CloseCode::SlowConsumer {
                self.evict(id, code);
            } else {
                self.sessions.remove(&id);
                self.report_count();
            }
        }
        if lost_some {
            self.update_interest(ctx);
        }
        self.env.metrics.events_delivered.inc_by(delivered);
        self.env
            .metrics
            .fanout_seconds
            .observe(msg.accepted_at.elapsed().as_secs_f64());
    }
}

/// Collects frames into one shared batch.
fn batch_of<'a>(frames: impl Iterator<Item = &'a (crate::domain::EventKind, ByteString)>) -> Batch {
    let frames: Arc<[ByteString]> = frames.map(|(_, f)| f.clone()).collect();
    let bytes = frames.iter().map(|f| f.len()).sum();
    Batch { frames, bytes }
}
