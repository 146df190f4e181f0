//! The cluster's shared history (contract §12): one JetStream stream,
//! `<PREFIX>_HISTORY`, with one subject per instance,
//! `<prefix>.hist.<instance id>`. Each publish request of an instance with
//! history is one stream message; its stream sequence `q` gives the request's
//! events the offsets `q·2²⁰ + i`, so every node sees the same offsets. The
//! epoch is the stream's creation time and the instance id: it changes when
//! the stream is lost and when an instance is created.
//!
//! Each message names the previous message of its subject
//! (`Eventgate-Prev`), published with `Nats-Expected-Last-Subject-Sequence`
//! so that the chain holds across nodes: a node that loads the subject can
//! tell what was lost before the first message it found.
//!
//! Each message carries a `Nats-Msg-Id` unique to its publish request, so a
//! publish whose acknowledgement was lost (a timeout, NATS restarting) is
//! sent again and JetStream keeps it once. When every attempt fails, the
//! events take the plain way (see `http::publish`) and the request's id is
//! remembered as *delivered plainly* (on the other nodes too, from the plain
//! message's header): if JetStream did keep it after all, the followers
//! keep it in the mirror without delivering it a second time.
//!
//! Each message also carries the instance's filter (`events`, `mediaBase64`)
//! under which its events were accepted (`Eventgate-Filter`): a node whose
//! follower is behind filters them as they were accepted, not by a settings
//! change made after their 202 (a disabled WebSocket still delivers none).
//!
//! Every node with clients of the instance follows the subject with an
//! ordered push consumer from its first retained message, so its instance
//! actor mirrors the history and serves recoveries itself, atomically with live
//! delivery, in offset order (see `actor`). This module owns the stream and
//! the wire format only; it never touches the database or sessions.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use actix::Addr;
use async_nats::jetstream::{self, consumer, stream};
use async_nats::{Client, HeaderMap};
use futures_util::StreamExt;
use parking_lot::Mutex;

use super::history::HistoryLimits;
use super::messages::{FollowerId, MirrorPosition, Sequenced, SyncStart, Unsure};
use super::InstanceActor;
use crate::bus::Link;
use crate::domain::{EventSet, InstanceId, WsConfig};
use crate::events::Event;

/// Offsets of one stream message's events: `sequence << OFFSET_BITS | index`.
pub const OFFSET_BITS: u32 = 20;

/// Header naming the previous message of the same subject (0: none).
const PREV_HEADER: &str = "Eventgate-Prev";

/// Header with the instance's filter when the events were accepted:
/// `<event set bits>/<mediaBase64 0|1>`.
const FILTER_HEADER: &str = "Eventgate-Filter";

/// Header of a gap marker: a message with no events, appended by a node
/// that delivered events of the instance the plain way (outside the
/// history) once it reaches JetStream again. Every node's mirror then
/// answers `recovered: false` for positions before it, on every node alike:
/// those positions may have missed the plain events.
const GAP_HEADER: &str = "Eventgate-Gap";

/// How often a node that owes gap markers tries again while NATS is up.
pub const GAP_RETRY: Duration = Duration::from_secs(2);

/// Attempts at a publish whose stream was not found (created again between).
const PUBLISH_ATTEMPTS: usize = 8;

/// How long a publish whose expected predecessor another node's publish
/// took goes on trying, each time after a random pause of up to
/// [`CONTENDED_PAUSE_MAX`] (growing with the attempts) so that the nodes
/// publishing to one instance at once stop colliding. Eight attempts at
/// once were not enough for three nodes publishing together: about one
/// publish in a thousand then took the plain way, outside the history.
const CONTENDED_FOR: Duration = Duration::from_secs(5);
const CONTENDED_PAUSE_MAX: Duration = Duration::from_millis(20);

/// How long a publish whose outcome is unknown is sent again (with the same
/// message id) before its events take the plain way. Below JetStream's
/// duplicate window (2 minutes by default), so the retries are deduplicated.
const UNSURE_RETRY_FOR: Duration = Duration::from_secs(6);

/// How long a request delivered plainly is remembered; longer than the
/// duplicate window, after which JetStream cannot keep it any more.
const PLAIN_MEMORY: Duration = Duration::from_secs(180);

/// How much longer than `ws.history_ttl_secs` the stream keeps messages, so
/// that the age bound is applied by the nodes (at the same moment for all
/// the events it concerns) rather than by JetStream.
const AGE_MARGIN: Duration = Duration::from_secs(60);

/// A message that reaches a caught-up follower later than this after
/// JetStream stored it is logged (at most every [`LAG_LOG_EVERY`]): live
/// delivery of the instance is that late on this node.
const LAG_LOGGED_OVER: Duration = Duration::from_secs(1);
const LAG_LOG_EVERY: Duration = Duration::from_secs(10);

/// A random pause before attempt `attempts + 1` of a contended publish: up
/// to 1 ms doubled per attempt, at most [`CONTENDED_PAUSE_MAX`].
fn contended_pause(attempts: usize) -> Duration {
    use rand::Rng;
    let cap = Duration::from_millis(1 << attempts.min(16)).min(CONTENDED_PAUSE_MAX);
    cap.mul_f64(rand::thread_rng().gen::<f64>())
}

/// Why a publish did not reach the shared history.
#[derive(Debug, thiserror::Error)]
pub enum SharedHistoryError {
    #[error("JetStream: {0}")]
    JetStream(String),
    /// No attempt was acknowledged, and one may have been kept: the events
    /// go the plain way under this message id, already remembered here as
    /// delivered plainly (see [`SharedHistory::delivered_plainly`]).
    #[error("JetStream did not acknowledge (message {id}): {cause}")]
    Unsure { id: String, cause: String },
}

fn js_error(e: impl std::fmt::Display) -> SharedHistoryError {
    SharedHistoryError::JetStream(e.to_string())
}

/// An `Eventgate-Filter` header's value: the event set and mediaBase64.
fn parse_filter(value: &str) -> Option<(EventSet, bool)> {
    let (bits, media) = value.split_once('/')?;
    let media = match media {
        "0" => false,
        "1" => true,
        _ => return None,
    };
    Some((EventSet::from_bits(bits.parse().ok()?), media))
}

/// The offset of the `index`th event of the message with sequence `seq`.
pub fn offset_of(seq: u64, index: usize) -> u64 {
    (seq << OFFSET_BITS) | index as u64
}

/// The highest offset a message with sequence `seq` can give.
pub fn last_offset_of(seq: u64) -> u64 {
    if seq == 0 {
        0
    } else {
        offset_of(seq, (1 << OFFSET_BITS) - 1)
    }
}

/// This node's handle on the shared history.
pub struct SharedHistory {
    js: jetstream::Context,
    prefix: String,
    stream_name: String,
    limits: HistoryLimits,
    /// The stream, once created or found.
    stream: tokio::sync::Mutex<Option<stream::Stream>>,
    /// Per instance: the last sequence of its subject this node knows of,
    /// behind a lock that keeps this node's publishes of it in order.
    heads: Mutex<HashMap<InstanceId, Arc<tokio::sync::Mutex<Option<u64>>>>>,
    /// This node's NATS connection. When it goes down, followers tell their
    /// actors that the mirror may be out of step (JetStream may even lose
    /// the history meanwhile); when it comes up, a consumer of the
    /// connection before may be gone from the server, so followers start
    /// over at once instead of waiting to miss its heartbeats.
    link: tokio::sync::watch::Receiver<Link>,
    /// Names this node's publish requests (`<node part>-<counter>`).
    id_prefix: String,
    next_id: AtomicU64,
    /// Message ids of requests whose events were delivered the plain way,
    /// with when: a follower that finds one keeps it without delivering it.
    plain: Mutex<HashMap<String, Instant>>,
    /// Instances whose events this node delivered the plain way since its
    /// last gap marker for them (see [`GAP_HEADER`]).
    gaps: Mutex<HashSet<InstanceId>>,
}

impl SharedHistory {
    pub fn new(
        client: Client,
        prefix: &str,
        limits: HistoryLimits,
        link: tokio::sync::watch::Receiver<Link>,
    ) -> Self {
        Self {
            link,
            js: jetstream::new(client),
            prefix: prefix.to_string(),
            stream_name: format!("{}_HISTORY", prefix.replace('.', "_")),
            limits,
            stream: tokio::sync::Mutex::new(None),
            heads: Mutex::new(HashMap::new()),
            id_prefix: crate::auth::generate_token()[..12].to_string(),
            next_id: AtomicU64::new(1),
            plain: Mutex::new(HashMap::new()),
            gaps: Mutex::new(HashSet::new()),
        }
    }

    /// Whether this node's NATS connection is up at this moment. Followers
    /// hear of a drop a little later (`Unsure`); a recovery decided
    /// meanwhile asks this, so it is never answered from a mirror that a
    /// node already reporting NATS unreachable cannot vouch for.
    pub fn connected(&self) -> bool {
        self.link.borrow().up && crate::bus::connected(&self.js.client())
    }

    /// Remembers that events of `id` took the plain way: a gap marker goes
    /// into its history before its next message (or when NATS is back).
    pub fn note_gap(&self, id: InstanceId) {
        self.gaps.lock().insert(id);
    }

    /// Appends the gap markers this node owes (after NATS came back).
    pub async fn mark_gaps(&self) {
        let owed: Vec<InstanceId> = self.gaps.lock().iter().copied().collect();
        for id in owed {
            let head = self.head_of(id);
            let mut head = head.lock().await;
            if let Err(e) = self.mark_gap(id, &mut head).await {
                log::warn!("instance_id={} gap marker not appended yet: {e}", id.0);
            }
        }
    }

    /// Whether gap markers are owed (tried again every [`GAP_RETRY`]).
    pub fn owes_gaps(&self) -> bool {
        !self.gaps.lock().is_empty()
    }

    /// Appends `id`'s gap marker if one is owed (under its head's lock). The
    /// debt is taken out first, so a gap noted while the marker is on its
    /// way is owed again; a marker that fails is owed again too.
    async fn mark_gap(
        &self,
        id: InstanceId,
        head: &mut Option<u64>,
    ) -> Result<(), SharedHistoryError> {
        if !self.gaps.lock().remove(&id) {
            return Ok(());
        }
        if let Err(e) = self
            .append(id, head, b"[]".to_vec(), &[(GAP_HEADER, "1")])
            .await
        {
            self.note_gap(id);
            return Err(e);
        }
        log::info!(
            "instance_id={} gap marker appended: recoveries from before it answer recovered:false",
            id.0
        );
        Ok(())
    }

    /// The lock on `id`'s head, which keeps this node's appends in order.
    fn head_of(&self, id: InstanceId) -> Arc<tokio::sync::Mutex<Option<u64>>> {
        self.heads.lock().entry(id).or_default().clone()
    }

    /// Remembers that request `id`'s events were delivered the plain way.
    pub fn delivered_plainly(&self, id: &str) {
        let now = Instant::now();
        let mut plain = self.plain.lock();
        plain.retain(|_, at| now.duration_since(*at) < PLAIN_MEMORY);
        plain.insert(id.to_string(), now);
    }

    /// A publish that may have been kept: its events go the plain way, so
    /// they are remembered as delivered plainly.
    fn unsure(&self, id: &str, cause: impl std::fmt::Display) -> SharedHistoryError {
        self.delivered_plainly(id);
        SharedHistoryError::Unsure {
            id: id.to_string(),
            cause: cause.to_string(),
        }
    }

    /// Whether request `id`'s events were delivered the plain way.
    fn was_delivered_plainly(&self, id: &str) -> bool {
        self.plain.lock().contains_key(id)
    }

    fn subject(&self, id: InstanceId) -> String {
        format!("{}.hist.{}", self.prefix, id.0)
    }

    /// The stream, created when missing (also after it was lost).
    async fn stream(&self, fresh: bool) -> Result<stream::Stream, SharedHistoryError> {
        let mut held = self.stream.lock().await;
        if let (Some(s), false) = (held.as_ref(), fresh) {
            return Ok(s.clone());
        }
        let config = stream::Config {
            name: self.stream_name.clone(),
            subjects: vec![format!("{}.hist.>", self.prefix)],
            // One more than the history: the message before the oldest
            // event kept stays, so the chain shows nothing after it is lost.
            max_messages_per_subject: i64::try_from(self.limits.size)
                .unwrap_or(i64::MAX)
                .saturating_add(1),
            max_age: self.limits.ttl + AGE_MARGIN,
            storage: stream::StorageType::File,
            discard: stream::DiscardPolicy::Old,
            ..Default::default()
        };
        let mut s = self
            .js
            .get_or_create_stream(config.clone())
            .await
            .map_err(js_error)?;
        // The limits follow this node's settings (the last node to start wins).
        let held_config = &s.cached_info().config;
        if held_config.max_messages_per_subject != config.max_messages_per_subject
            || held_config.max_age != config.max_age
        {
            self.js.update_stream(&config).await.map_err(js_error)?;
            s = self
                .js
                .get_stream(&self.stream_name)
                .await
                .map_err(js_error)?;
        }
        *held = Some(s.clone());
        Ok(s)
    }

    /// The epoch of `id`'s numbering in `stream`.
    fn epoch(stream: &stream::Stream, id: InstanceId) -> String {
        let created = stream.cached_info().created.unix_timestamp_nanos();
        format!("{created:x}-{}", id.0)
    }

    /// Appends a publish request's events to `id`'s history; every node's
    /// follower delivers them. Waits for JetStream's acknowledgement; a
    /// publish whose acknowledgement did not come is sent again with the
    /// same message id (JetStream keeps it once) for [`UNSURE_RETRY_FOR`].
    pub async fn publish(
        &self,
        id: InstanceId,
        events: &[Event],
        accepted_under: &WsConfig,
    ) -> Result<(), SharedHistoryError> {
        let payload = serde_json::to_vec(events).map_err(js_error)?;
        let filter = format!(
            "{}/{}",
            accepted_under.event_set().bits(),
            u8::from(accepted_under.media_base64)
        );
        let head = self.head_of(id);
        let mut head = head.lock().await;
        // A gap owed goes first; if it cannot, neither can these events.
        self.mark_gap(id, &mut head).await?;
        self.append(id, &mut head, payload, &[(FILTER_HEADER, filter.as_str())])
            .await
    }

    /// Appends one message to `id`'s subject after the one `head` names,
    /// retrying as [`Self::publish`] says.
    async fn append(
        &self,
        id: InstanceId,
        head: &mut Option<u64>,
        payload: Vec<u8>,
        extra: &[(&str, &str)],
    ) -> Result<(), SharedHistoryError> {
        let msg_id = format!(
            "{}-{}",
            self.id_prefix,
            self.next_id.fetch_add(1, Ordering::Relaxed)
        );
        let subject = self.subject(id);
        let started = Instant::now();
        let mut fresh = false;
        let mut sent = false;
        let (mut contended, mut recreated) = (0, 0);
        let mut backoff = Duration::from_millis(100);
        loop {
            let stream = match self.stream(fresh).await {
                Ok(stream) => stream,
                Err(e) if sent => return Err(self.unsure(&msg_id, e)),
                Err(e) => return Err(e),
            };
            let prev = match *head {
                Some(prev) => prev,
                None => match stream.get_last_raw_message_by_subject(&subject).await {
                    Ok(m) => m.sequence,
                    Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => 0,
                    Err(e) if sent => return Err(self.unsure(&msg_id, e)),
                    Err(e) => return Err(js_error(e)),
                },
            };
            let mut headers = HeaderMap::new();
            headers.insert(PREV_HEADER, prev.to_string().as_str());
            headers.insert(
                async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
                prev.to_string().as_str(),
            );
            headers.insert(async_nats::header::NATS_MESSAGE_ID, msg_id.as_str());
            for (name, value) in extra {
                headers.insert(*name, *value);
            }
            let outcome = match self
                .js
                .publish_with_headers(subject.clone(), headers, payload.clone().into())
                .await
            {
                Ok(ack) => {
                    sent = true;
                    ack.await
                }
                Err(e) => Err(e),
            };
            let e = match outcome {
                Ok(ack) => {
                    // A retry of a kept message answers with the first's sequence.
                    *head = Some(ack.sequence);
                    return Ok(());
                }
                Err(e) => e,
            };
            match e.kind() {
                // Not kept: another node's publish came first.
                jetstream::context::PublishErrorKind::WrongLastSequence
                    if started.elapsed() < CONTENDED_FOR =>
                {
                    *head = None;
                    contended += 1;
                    tokio::time::sleep(contended_pause(contended)).await;
                }
                jetstream::context::PublishErrorKind::StreamNotFound
                    if recreated < PUBLISH_ATTEMPTS =>
                {
                    *head = None;
                    fresh = true;
                    recreated += 1;
                }
                jetstream::context::PublishErrorKind::WrongLastSequence
                | jetstream::context::PublishErrorKind::StreamNotFound => {
                    *head = None;
                    return Err(SharedHistoryError::JetStream(
                        "the instance's history kept changing under this publish".into(),
                    ));
                }
                // No answer: it may have been kept. The same id again.
                _ if sent && started.elapsed() + backoff < UNSURE_RETRY_FOR => {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
                _ => {
                    *head = None;
                    return Err(if sent {
                        self.unsure(&msg_id, e)
                    } else {
                        js_error(e)
                    });
                }
            }
        }
    }

    /// Forgets a deleted instance's history.
    pub async fn clear(&self, id: InstanceId) -> Result<(), SharedHistoryError> {
        self.heads.lock().remove(&id);
        self.gaps.lock().remove(&id);
        let stream = self.stream(false).await?;
        stream
            .purge()
            .filter(self.subject(id))
            .await
            .map_err(js_error)?;
        Ok(())
    }

    /// Follows `id`'s subject into its actor, from the first retained
    /// message, until the task is aborted; starts over (a new `SyncStart`)
    /// when the consumer fails, and at once when NATS comes back. From the
    /// moment the connection drops (or comes up again) until the follower
    /// has looked at JetStream again, the actor is `Unsure` of its mirror.
    pub fn follow(
        self: &Arc<Self>,
        id: InstanceId,
        actor: Addr<InstanceActor>,
        follower: FollowerId,
    ) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        actix_web::rt::spawn(async move {
            let mut backoff = Duration::from_millis(100);
            let mut link = me.link.clone();
            link.borrow_and_update();
            loop {
                tokio::select! {
                    followed = me.follow_once(id, &actor, follower) => {
                        if let Err(e) = followed {
                            log::warn!("instance_id={} shared history not followed: {e}", id.0);
                        }
                    }
                    Ok(()) = link.changed() => {
                        actor.do_send(Unsure { follower });
                        backoff = Duration::from_millis(100);
                        // Resumes after the last message seen once NATS is
                        // back: nothing is skipped.
                        while !link.borrow_and_update().up {
                            if link.changed().await.is_err() {
                                return;
                            }
                        }
                        log::debug!("instance_id={} NATS reconnected: following again", id.0);
                        continue;
                    }
                }
                if !actor.connected() {
                    return;
                }
                // NATS coming back ends the pause: the follower starts over
                // at once, not up to 2 s after the reconnection.
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    Ok(()) = link.changed() => {
                        if link.borrow_and_update().up {
                            backoff = Duration::from_millis(100);
                            continue;
                        }
                    }
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        })
    }

    async fn follow_once(
        &self,
        id: InstanceId,
        actor: &Addr<InstanceActor>,
        follower: FollowerId,
    ) -> Result<(), SharedHistoryError> {
        let stream = self.stream(true).await?;
        let epoch: Arc<str> = Self::epoch(&stream, id).into();
        let subject = self.subject(id);
        // A follower that starts again in the same epoch resumes after the
        // last message the actor saw: what came meanwhile is delivered live.
        let resume_after = match actor.send(MirrorPosition).await {
            Ok(Some((seen, seq))) if *seen == *epoch => Some(seq),
            Ok(_) => None,
            Err(_) => return Ok(()),
        };
        let deliver_policy = match resume_after {
            Some(seq) => consumer::DeliverPolicy::ByStartSequence {
                start_sequence: seq + 1,
            },
            None => consumer::DeliverPolicy::All,
        };
        // A push consumer: JetStream sends each message as it is stored (with
        // flow control). An ordered pull consumer was seen in the soak
        // (nats-server 2.9.10) holding stored messages back until its pull
        // request expired: live delivery stalled for the request's lifetime.
        let consumer = stream
            .create_consumer(consumer::push::OrderedConfig {
                deliver_subject: self.js.client().new_inbox(),
                filter_subject: subject.clone(),
                deliver_policy,
                ..Default::default()
            })
            .await
            .map_err(js_error)?;
        // Lag is reported once the follower has caught up (older messages
        // before that are history being loaded, not late delivery).
        let mut caught_up = consumer.cached_info().num_pending == 0;
        actor.do_send(SyncStart {
            follower,
            epoch: epoch.clone(),
            caught_up,
            resumed: resume_after.is_some(),
        });
        let mut messages = consumer.messages().await.map_err(js_error)?;
        let mut lag_logged: Option<Instant> = None;
        while let Some(msg) = messages.next().await {
            let msg = msg.map_err(js_error)?;
            let Ok(info) = msg.info() else {
                continue;
            };
            let (seq, pending) = (info.stream_sequence, info.pending);
            let age = SystemTime::now()
                .duration_since(SystemTime::from(info.published))
                .unwrap_or_default();
            if caught_up
                && age > LAG_LOGGED_OVER
                && lag_logged.is_none_or(|t| t.elapsed() >= LAG_LOG_EVERY)
            {
                lag_logged = Some(Instant::now());
                log::warn!(
                    "instance_id={} history message {seq} reached this node {:.2} s after JetStream stored it ({pending} more pending)",
                    id.0,
                    age.as_secs_f64()
                );
            }
            caught_up |= pending == 0;
            let header = |name: &str| msg.headers.as_ref().and_then(|h| h.get(name));
            let prev = header(PREV_HEADER)
                .and_then(|v| v.as_str().parse::<u64>().ok())
                .unwrap_or(0);
            let accepted_under = header(FILTER_HEADER).and_then(|v| parse_filter(v.as_str()));
            let delivered = header(async_nats::header::NATS_MESSAGE_ID.as_ref())
                .is_some_and(|v| self.was_delivered_plainly(v.as_str()));
            let gap = header(GAP_HEADER).is_some();
            let events: Vec<Event> = match serde_json::from_slice(&msg.payload) {
                Ok(events) => events,
                Err(e) => {
                    log::warn!("instance_id={} history message {seq} unreadable: {e}", id.0);
                    Vec::new()
                }
            };
            // Waits while the actor is behind (its mailbox is bounded).
            if actor
                .send(Sequenced {
                    follower,
                    epoch: epoch.clone(),
                    seq,
                    prev,
                    age,
                    events: events.into(),
                    delivered,
                    accepted_under,
                    gap,
                    caught_up: pending == 0,
                })
                .await
                .is_err()
            {
                return Ok(());
            }
        }
        Err(SharedHistoryError::JetStream("the consumer ended".into()))
    }
}
