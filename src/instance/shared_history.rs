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
//! Every node with clients of the instance follows the subject with an
//! ordered consumer from its first retained message, so its instance actor
//! mirrors the history and serves recoveries itself, atomically with live
//! delivery, in offset order (see `actor`). This module owns the stream and
//! the wire format only; it never touches the database or sessions.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use actix::Addr;
use async_nats::jetstream::{self, consumer, stream};
use async_nats::{Client, HeaderMap};
use futures_util::StreamExt;
use parking_lot::Mutex;

use super::history::HistoryLimits;
use super::messages::{MirrorPosition, Sequenced, SyncStart};
use super::InstanceActor;
use crate::domain::InstanceId;
use crate::events::Event;

/// Offsets of one stream message's events: `sequence << OFFSET_BITS | index`.
pub const OFFSET_BITS: u32 = 20;

/// Header naming the previous message of the same subject (0: none).
const PREV_HEADER: &str = "Eventgate-Prev";

/// Attempts at a publish whose expected predecessor another node changed.
const PUBLISH_ATTEMPTS: usize = 8;

/// How much longer than `ws.history_ttl_secs` the stream keeps messages, so
/// that the age bound is applied by the nodes (at the same moment for all
/// the events it concerns) rather than by JetStream.
const AGE_MARGIN: Duration = Duration::from_secs(60);

/// Why a publish did not reach the shared history.
#[derive(Debug, thiserror::Error)]
pub enum SharedHistoryError {
    #[error("JetStream: {0}")]
    JetStream(String),
}

fn js_error(e: impl std::fmt::Display) -> SharedHistoryError {
    SharedHistoryError::JetStream(e.to_string())
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
    /// Ticks each time this node's NATS connection comes up: a consumer of
    /// the connection before may be gone from the server, so followers
    /// start over at once instead of waiting to miss its heartbeats.
    connected: tokio::sync::watch::Receiver<u64>,
}

impl SharedHistory {
    pub fn new(
        client: Client,
        prefix: &str,
        limits: HistoryLimits,
        connected: tokio::sync::watch::Receiver<u64>,
    ) -> Self {
        Self {
            connected,
            js: jetstream::new(client),
            prefix: prefix.to_string(),
            stream_name: format!("{}_HISTORY", prefix.replace('.', "_")),
            limits,
            stream: tokio::sync::Mutex::new(None),
            heads: Mutex::new(HashMap::new()),
        }
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
    /// follower delivers them. Waits for JetStream's acknowledgement.
    pub async fn publish(
        &self,
        id: InstanceId,
        events: &[Event],
    ) -> Result<(), SharedHistoryError> {
        let payload = serde_json::to_vec(events).map_err(js_error)?;
        let head = self.heads.lock().entry(id).or_default().clone();
        let mut head = head.lock().await;
        let subject = self.subject(id);
        let mut fresh = false;
        for _ in 0..PUBLISH_ATTEMPTS {
            let stream = self.stream(fresh).await?;
            let prev = match *head {
                Some(prev) => prev,
                None => match stream.get_last_raw_message_by_subject(&subject).await {
                    Ok(m) => m.sequence,
                    Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => 0,
                    Err(e) => return Err(js_error(e)),
                },
            };
            let mut headers = HeaderMap::new();
            headers.insert(PREV_HEADER, prev.to_string().as_str());
            headers.insert(
                async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
                prev.to_string().as_str(),
            );
            let outcome = match self
                .js
                .publish_with_headers(subject.clone(), headers, payload.clone().into())
                .await
            {
                Ok(ack) => ack.await,
                Err(e) => Err(e),
            };
            match outcome {
                Ok(ack) => {
                    *head = Some(ack.sequence);
                    return Ok(());
                }
                Err(e) if e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence => {
                    *head = None;
                }
                Err(e) if e.kind() == jetstream::context::PublishErrorKind::StreamNotFound => {
                    *head = None;
                    fresh = true;
                }
                Err(e) => {
                    *head = None;
                    return Err(js_error(e));
                }
            }
        }
        Err(SharedHistoryError::JetStream(
            "the instance's history kept changing under this publish".into(),
        ))
    }

    /// Forgets a deleted instance's history.
    pub async fn clear(&self, id: InstanceId) -> Result<(), SharedHistoryError> {
        self.heads.lock().remove(&id);
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
    /// when the consumer fails, and at once when NATS reconnects.
    pub fn follow(
        self: &Arc<Self>,
        id: InstanceId,
        actor: Addr<InstanceActor>,
    ) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        actix_web::rt::spawn(async move {
            let mut backoff = Duration::from_millis(100);
            let mut connected = me.connected.clone();
            connected.borrow_and_update();
            loop {
                tokio::select! {
                    followed = me.follow_once(id, &actor) => {
                        if let Err(e) = followed {
                            log::warn!("instance_id={} shared history not followed: {e}", id.0);
                        }
                    }
                    Ok(()) = connected.changed() => {
                        // Resumes after the last message seen: nothing is skipped.
                        log::debug!("instance_id={} NATS reconnected: following again", id.0);
                        backoff = Duration::from_millis(100);
                        continue;
                    }
                }
                if !actor.connected() {
                    return;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        })
    }

    async fn follow_once(
        &self,
        id: InstanceId,
        actor: &Addr<InstanceActor>,
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
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: subject.clone(),
                deliver_policy,
                max_expires: Duration::from_secs(5),
                ..Default::default()
            })
            .await
            .map_err(js_error)?;
        if resume_after.is_none() {
            let pending = consumer.cached_info().num_pending;
            actor.do_send(SyncStart {
                epoch: epoch.clone(),
                caught_up: pending == 0,
            });
        }
        let mut messages = consumer.messages().await.map_err(js_error)?;
        while let Some(msg) = messages.next().await {
            let msg = msg.map_err(js_error)?;
            let Ok(info) = msg.info() else {
                continue;
            };
            let (seq, pending) = (info.stream_sequence, info.pending);
            let age = SystemTime::now()
                .duration_since(SystemTime::from(info.published))
                .unwrap_or_default();
            let prev = msg
                .headers
                .as_ref()
                .and_then(|h| h.get(PREV_HEADER))
                .and_then(|v| v.as_str().parse::<u64>().ok())
                .unwrap_or(0);
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
                    epoch: epoch.clone(),
                    seq,
                    prev,
                    age,
                    events: events.into(),
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
