//! The instance actor's side of the cluster's shared history (see
//! `shared_history`): while it has sessions (and for `INTEREST_LINGER`
//! after the last one left), the actor follows the instance's subject and
//! keeps a mirror of it in its `history`, numbered with the shared offsets
//! and epoch, so recoveries are served from memory, atomically with live
//! delivery, as on a single node.
//!
//! Joins that arrive while the mirror loads wait (are parked) until it has
//! caught up, or until [`SYNC_WAIT`] passes; so do joins that recover from
//! an offset of the shared epoch the mirror has not reached yet (a client
//! that saw it on another node a moment before), until the mirror reaches it
//! or, past [`SYNC_WAIT`], with `recovered: false`. Events that did not go through
//! the shared history (NATS unreachable) make the actor fall back to a
//! local numbering with its own epoch until the shared one is back, so
//! recoveries across it answer `recovered: false` while live delivery goes on.
//!
//! From the moment NATS drops until the follower has looked at JetStream
//! again, the mirror may lack what JetStream holds, and JetStream may have
//! lost the history (the epoch ends): joins that recover wait as well, so
//! none is told `recovered: true` from an epoch that is gone. When the
//! follower finds a new epoch after one it followed, what the new one holds
//! was accepted since and never reached this node: it is delivered live,
//! not loaded as history.

use std::time::{Duration, Instant};

use actix::prelude::*;

use super::super::history::History;
use super::super::messages::{
    Batch, FollowerId, Join, MirrorPosition, Sequenced, SyncStart, Unsure,
};
use super::super::shared_history::{last_offset_of, offset_of, OFFSET_BITS};
use super::{Frame, InstanceActor};
use crate::domain::EventSet;
use crate::events::{envelope, strips_media};

/// Longest a join waits for the mirror before the actor numbers locally.
const SYNC_WAIT: Duration = Duration::from_secs(3);

impl InstanceActor {
    /// Starts following the shared history (when there is one).
    pub(super) fn follow_shared(&mut self, ctx: &mut Context<Self>) {
        if let (Some(shared), None) = (&self.shared, &self.mirror_task) {
            self.follower = FollowerId(self.follower.0 + 1);
            self.mirror_task = Some(shared.follow(self.info.id, ctx.address(), self.follower));
        }
    }

    /// Whether a message of `follower` is from the one followed now.
    fn hears(&self, follower: FollowerId) -> bool {
        self.mirror_task.is_some() && follower == self.follower
    }

    /// Stops following it; the mirror is dropped (reloaded on the next join).
    pub(super) fn unfollow_shared(&mut self) {
        if let Some(task) = self.mirror_task.take() {
            task.abort();
            self.history = None;
            self.synced = false;
            self.loading = false;
            self.numbered_locally_at = None;
            self.unsure = false;
            self.degraded = false;
            self.shared_seen = None;
        }
    }

    /// Whether the mirror can answer a recovery: loaded, and not unsure of
    /// the shared epoch — neither told so by its follower nor, before the
    /// follower has heard, with NATS down now (a local numbering answers at
    /// once: it is this node's own).
    fn mirror_sure(&self) -> bool {
        let linked = self.shared.as_ref().is_none_or(|s| s.connected());
        self.synced && (self.degraded || (!self.unsure && linked))
    }

    /// Whether `join` must wait for the mirror: it is loading, or the join
    /// recovers and the mirror is not sure, or not yet as far as its `since`.
    pub(super) fn waits_for_mirror(&self, join: &Join) -> bool {
        self.waits_for_sure_mirror(join) || self.behind_since(join)
    }

    /// Whether `join` waits for the mirror to load, or to be sure (a
    /// recovery also waits while the mirror is `finishing_load`: what it
    /// loads is history, not live events).
    fn waits_for_sure_mirror(&self, join: &Join) -> bool {
        !self.synced || (join.recovery.is_some() && (!self.mirror_sure() || self.finishing_load()))
    }

    /// Whether the mirror numbered locally while it loaded (so it is synced)
    /// and, following the shared history again, is still loading.
    fn finishing_load(&self) -> bool {
        self.synced && self.loading && !self.degraded
    }

    /// Whether `join` recovers from an offset of the shared epoch that this
    /// node's mirror has not reached yet: the client saw it on another node,
    /// whose events reach this one a moment later. Answered at once, it would
    /// be `recovered: false` for an event that is in the shared history.
    fn behind_since(&self, join: &Join) -> bool {
        let since = join.recovery.as_ref().and_then(|r| r.since.as_ref());
        match (since, &self.history) {
            (Some((epoch, since)), Some(history)) if self.shared.is_some() && !self.degraded => {
                epoch == history.epoch() && *since > history.latest()
            }
            _ => false,
        }
    }

    /// Holds a join until the mirror is loaded (and sure, and as far as its
    /// `since`); see `check_parked`.
    pub(super) fn park(&mut self, msg: Join, ctx: &mut Context<Self>) {
        self.parked.push((msg, Instant::now()));
        self.update_interest(ctx);
        ctx.run_later(SYNC_WAIT, Self::check_parked);
    }

    /// Runs [`SYNC_WAIT`] after a join was parked. A join that has waited
    /// that long for the mirror to load or be sure makes the actor number
    /// locally — unless the mirror is sure and finishing a load it began
    /// after numbering locally: a recovery then waits for the load's end
    /// (what it loads is history, not yet all there), looked at again every
    /// [`SYNC_WAIT`]. A join whose `since` the mirror has not reached by
    /// then is answered (`recovered: false`).
    fn check_parked(&mut self, ctx: &mut Context<Self>) {
        // Set for one join, this timer may outlive it: only joins still
        // waiting count.
        let overdue = self.parked.iter().any(|(join, arrived)| {
            arrived.elapsed() >= SYNC_WAIT && self.waits_for_sure_mirror(join)
        });
        if overdue {
            if self.finishing_load() && self.mirror_sure() {
                ctx.run_later(SYNC_WAIT, Self::check_parked);
            } else {
                log::warn!(
                    "instance={} shared history not loaded in time; numbering locally",
                    self.info.name
                );
                self.degrade(ctx);
            }
        }
        self.admit_parked(ctx, Some(SYNC_WAIT));
    }

    /// Admits the parked joins that no longer wait for the mirror, and those
    /// waiting only for their `since` that have waited `expired` or longer.
    fn admit_parked(&mut self, ctx: &mut Context<Self>, expired: Option<Duration>) {
        if self.parked.is_empty() {
            return;
        }
        let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.parked)
            .into_iter()
            .partition(|(join, arrived)| {
                let expired = expired.is_some_and(|e| arrived.elapsed() >= e);
                !self.waits_for_mirror(join) || (expired && !self.waits_for_sure_mirror(join))
            });
        self.parked = waiting;
        self.admit_all(ready, ctx);
    }

    /// Admits `joins` (parked, with when they arrived), in order.
    fn admit_all(&mut self, joins: Vec<(Join, Instant)>, ctx: &mut Context<Self>) {
        if joins.is_empty() {
            return;
        }
        for (join, arrived) in joins {
            self.admit(join, Some(arrived), ctx);
        }
        // A join whose session is gone meanwhile is not admitted.
        self.update_interest(ctx);
    }

    /// Numbers locally from now on (a fresh epoch), until the shared
    /// history is heard from again.
    pub(super) fn degrade(&mut self, ctx: &mut Context<Self>) {
        // While a load goes on, what it brings that was accepted since the
        // first of the joins waiting arrived is delivered live (`Sequenced`).
        let first_waiting = self.parked.iter().map(|(_, arrived)| *arrived).min();
        self.numbered_locally_at
            .get_or_insert(first_waiting.unwrap_or_else(Instant::now));
        if !self.degraded {
            if let Some(limits) = self.env.history {
                if self.loading {
                    // Before the part loaded is replaced: joins that do not
                    // recover get what it holds since they arrived.
                    let (plain, recovering) = std::mem::take(&mut self.parked)
                        .into_iter()
                        .partition(|(join, _)| join.recovery.is_none());
                    self.parked = recovering;
                    self.admit_all(plain, ctx);
                }
                self.history = Some(History::new(limits));
                self.degraded = true;
            }
        }
        self.set_synced(ctx);
    }

    /// The mirror is usable: parked joins are admitted (but those whose
    /// `since` it has not reached yet).
    fn set_synced(&mut self, ctx: &mut Context<Self>) {
        self.synced = true;
        self.admit_parked(ctx, None);
    }

    /// What a session that waited for the mirror missed meanwhile: kept
    /// events accepted after it arrived, through its filters.
    pub(super) fn published_since(&self, arrived: Instant, narrowing: EventSet) -> Batch {
        let mut frames = Vec::new();
        let config = self
            .config
            .as_ref()
            .map(|c| &c.config)
            .filter(|c| c.enabled);
        if let (Some(history), Some(config)) = (&self.history, config) {
            let filter = config.event_set();
            for kept in history
                .after(0)
                .filter(|e| e.at >= arrived && filter.allows(e.kind) && narrowing.allows(e.kind))
            {
                frames.push(kept.frame_for(config.media_base64).clone());
            }
        }
        let frames: std::sync::Arc<[bytestring::ByteString]> = frames.into();
        let bytes = frames.iter().map(|f| f.len()).sum();
        Batch { frames, bytes }
    }
}

impl Handler<MirrorPosition> for InstanceActor {
    type Result = Option<(std::sync::Arc<str>, u64)>;

    fn handle(&mut self, _: MirrorPosition, _: &mut Self::Context) -> Self::Result {
        self.shared_seen.clone()
    }
}

impl Handler<Unsure> for InstanceActor {
    type Result = ();

    fn handle(&mut self, msg: Unsure, _: &mut Self::Context) {
        if !self.hears(msg.follower) {
            return;
        }
        self.unsure = self.shared.is_some();
    }
}

impl Handler<SyncStart> for InstanceActor {
    type Result = ();

    fn handle(&mut self, msg: SyncStart, ctx: &mut Self::Context) {
        let Some(limits) = self.env.history.filter(|_| self.hears(msg.follower)) else {
            return;
        };
        self.unsure = false;
        if msg.resumed {
            // What came meanwhile follows, delivered live (or, while the
            // mirror is still loading, kept until it has caught up).
            if msg.caught_up {
                self.loading = false;
                self.numbered_locally_at = None;
            }
            if msg.caught_up || self.synced {
                self.set_synced(ctx);
            }
            return;
        }
        // A mirror that followed an epoch before: the new one holds only
        // what was accepted since, which is delivered, not loaded.
        let followed_before = self.shared_seen.is_some();
        self.history = Some(History::with_epoch(limits, msg.epoch.to_string()));
        self.shared_seen = Some((msg.epoch.clone(), 0));
        self.degraded = false;
        self.synced = false;
        self.loading = !msg.caught_up && !followed_before;
        if msg.caught_up {
            self.set_synced(ctx);
        }
    }
}

impl Handler<Sequenced> for InstanceActor {
    type Result = ();

    fn handle(&mut self, msg: Sequenced, ctx: &mut Self::Context) {
        let Some(limits) = self.env.history.filter(|_| self.hears(msg.follower)) else {
            return;
        };
        let same_epoch = self
            .history
            .as_ref()
            .is_some_and(|h| !self.degraded && h.epoch() == &*msg.epoch);
        if !same_epoch {
            self.history = Some(History::with_epoch(limits, msg.epoch.to_string()));
            self.degraded = false;
        }
        self.shared_seen = Some((msg.epoch.clone(), msg.seq));
        let now = Instant::now();
        let at = now.checked_sub(msg.age).unwrap_or(now);
        let config = self.config.as_ref().map(|c| &c.config);
        // While loading, what arrives is history: kept, not delivered (but
        // what was accepted after the sessions were admitted meanwhile).
        let loaded = self.loading && self.numbered_locally_at.is_none_or(|t| at < t);
        let live = !loaded && !self.sessions.is_empty() && !msg.delivered;
        // Filtered as accepted (a change of `events` or `mediaBase64` made
        // after their 202 does not apply to them); none is delivered while
        // the WebSocket is disabled now (contract §7).
        let (filter, media, enabled) = match (msg.accepted_under, config) {
            (Some((filter, media)), Some(c)) => (filter, media, c.enabled),
            (None, Some(c)) => (c.event_set(), c.media_base64, c.enabled),
            (_, None) => (EventSet::default(), false, false),
        };
        let stamping = self.recovering > 0;
        let mut frames = Vec::new();
        if let Some(history) = self.history.as_mut() {
            if msg.gap {
                // Events went outside the history before this marker.
                history.restart_after(last_offset_of(msg.seq));
            } else if history.latest() >> OFFSET_BITS != msg.prev {
                // What came before this message is gone from the stream.
                history.restart_after(last_offset_of(msg.prev));
            }
            for (i, e) in msg.events.iter().enumerate() {
                let offset = offset_of(msg.seq, i);
                let kept = envelope(e, &self.instance_data, true);
                let stripped = strips_media(e).then(|| envelope(e, &self.instance_data, false));
                let plain = match (&stripped, media) {
                    (Some(stripped), false) => stripped.clone(),
                    _ => kept.clone(),
                };
                history.push_at(offset, e.kind, kept, stripped, at, now);
                if live && enabled && filter.allows(e.kind) {
                    let stamped = stamping.then(|| history.stamp(&plain, offset));
                    frames.push(Frame {
                        kind: e.kind,
                        plain,
                        stamped,
                    });
                }
            }
        }
        if !frames.is_empty() {
            // Nothing more pending in the stream, and no publish waiting for
            // any instance of the node: nothing waits behind these.
            let quiet = msg.caught_up && self.node_quiet(0);
            self.fan_out(&frames, 0, quiet, ctx);
        }
        if msg.caught_up {
            self.loading = false;
            self.numbered_locally_at = None;
            if !self.synced {
                self.set_synced(ctx);
            }
        }
        if self.synced && !self.loading {
            // Joins waiting for a `since` this message may have reached.
            self.admit_parked(ctx, None);
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::bus::Bus;
    use crate::domain::{AccountId, InstanceId};
    use crate::instance::actor::FanoutEnv;
    use crate::instance::history::HistoryLimits;
    use crate::instance::inbox::Pressure;
    use crate::instance::InstanceInfo;
    use crate::ws::session::SessionLimits;

    /// An instance actor of one node (no cluster) keeping a history.
    pub(in crate::instance::actor) fn actor_with_history() -> Addr<InstanceActor> {
        let env = FanoutEnv {
            base_url: "http://h".into(),
            client_buffer_bytes: 1 << 20,
            metrics: std::sync::Arc::new(crate::metrics::Metrics::new().unwrap()),
            bus: Bus::Local,
            publish_queue: 64,
            publish_lag: 0,
            direct_writes: false,
            history: Some(HistoryLimits {
                size: 100,
                ttl: Duration::from_secs(60),
                bytes: 1 << 20,
            }),
            ping_interval: Duration::from_secs(20),
            idle_timeout: Duration::from_secs(60),
            session_limits: SessionLimits {
                mailbox: 16,
                max_message_bytes: 1 << 16,
            },
        };
        let info = InstanceInfo {
            id: InstanceId(1),
            account: AccountId(1),
            name: "i".into(),
            token: "t".into(),
        };
        let pressure = std::sync::Arc::new(Pressure::default());
        InstanceActor::new(
            info,
            None,
            env,
            std::sync::Weak::new(),
            "i".into(),
            pressure,
        )
        .start()
    }

    /// Messages of a follower the actor no longer runs (already on their
    /// way when it stopped following) leave no mirror and no position
    /// behind: the next follower's first load must not be taken for
    /// events accepted after a follow.
    #[actix_rt::test]
    async fn a_stopped_followers_messages_are_ignored() {
        let actor = actor_with_history();
        let stale = FollowerId::default();
        actor
            .send(SyncStart {
                follower: stale,
                epoch: "e1".into(),
                caught_up: false,
                resumed: false,
            })
            .await
            .unwrap();
        actor
            .send(Sequenced {
                follower: stale,
                epoch: "e1".into(),
                seq: 5,
                prev: 0,
                age: Duration::ZERO,
                events: Vec::new().into(),
                delivered: false,
                accepted_under: None,
                gap: false,
                caught_up: true,
            })
            .await
            .unwrap();
        actor.send(Unsure { follower: stale }).await.unwrap();
        assert_eq!(actor.send(MirrorPosition).await.unwrap(), None);
    }
}
