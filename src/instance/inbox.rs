//! The way into an instance actor for published events, with backpressure.
//!
//! Publishes reach the actor without waiting for delivery (contract §9), so a
//! producer faster than the fan-out would grow the queues behind it without
//! bound, and every queued event is latency for the events behind it. A
//! publisher is answered only once its events are fanned out, and the
//! clients are keeping up again, when either
//! - `limits.publish_queue` publishes already wait for the actor (a bound on
//!   the actor's mailbox), or
//! - `limits.publish_lag` publishes already wait for the actor: the actor,
//!   not its sessions, is behind (its thread had less of the machine for a
//!   while), and every publish waiting is a fan-out to wait for, or
//! - this node is *behind* with the instance's sessions: most of them have
//!   `limits.publish_lag` or more batches in their mailboxes, less the
//!   publishes waiting for the actor (at least one), while their clients
//!   take all they are sent (`SessionShared::lagging`; the actor looks at
//!   every fan-out, and every millisecond while publishers wait). A publish
//!   crosses both queues, so together they hold about `publish_lag`. This keeps the
//!   sessions' queues a few publishes long at full speed instead of their
//!   mailboxes' length, which at full speed is latency; the previous rule
//!   does the same for the actor's own queue, where the sessions, having
//!   caught up meanwhile, would not hold anyone.
//!
//! Slow clients never cause that wait (contract §6): a session whose socket
//! is full does not count as lagging, and it is evicted when its bounds are
//! reached; only an instance whose fan-out is busier than the node can keep
//! up with does.
//! Events from other nodes ([`Inbox::forward`]) wait only at the mailbox
//! bound: their subscription drops what it cannot hold, so holding them
//! back longer would lose them.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::Addr;
use tokio::sync::oneshot;

use super::actor::FanoutEnv;
use super::messages::{Publish, QueueTicket};
use super::InstanceActor;
use crate::events::Event;
use crate::metrics::Metrics;
use crate::ws::session::SessionLimits;

/// What an instance actor shares with its inboxes.
#[derive(Default)]
pub struct Pressure {
    /// Publishes sent to the actor and not yet handled.
    pub(super) waiting: AtomicUsize,
    /// Whether most sessions are lagging (see the module's comment).
    pub(super) behind: AtomicBool,
    /// How busy the whole node is, shared by all its instance actors. Kept
    /// only for direct writes (`server.direct_writes`), the one reader;
    /// `None` without them.
    pub(super) node: Option<Arc<NodeLoad>>,
}

impl Pressure {
    /// An instance's pressure, counted also in the node's `node`.
    pub fn on_node(node: Option<Arc<NodeLoad>>) -> Self {
        Self {
            node,
            ..Self::default()
        }
    }
}

/// How busy a node's instance actors are, together (see [`Pressure::node`]).
pub struct NodeLoad {
    /// Publishes sent to any instance actor of this node and not yet
    /// handled: more than one means the node is busy.
    pub(super) waiting: AtomicUsize,
    /// When the node's latest fan-out began, in µs since `epoch`.
    last_fan_out: AtomicU64,
    epoch: Instant,
}

impl Default for NodeLoad {
    fn default() -> Self {
        Self {
            waiting: AtomicUsize::new(0),
            last_fan_out: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }
}

impl NodeLoad {
    /// Notes a fan-out beginning now, on any instance of the node; whether
    /// the node's previous one began at least `spacing` earlier.
    pub(super) fn fan_out_spaced(&self, spacing: Duration) -> bool {
        let micros = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let now = micros(self.epoch.elapsed());
        let before = self.last_fan_out.swap(now, Ordering::AcqRel);
        now.saturating_sub(before) >= micros(spacing)
    }
}

/// An instance actor's address as its sessions hold it, with what they all
/// share: the instance's name for their logs, the node's metrics, the
/// session limits. Shared, not cloned: each clone of an `Addr` allocates
/// (its sender's own parking state), and so would each copy of the name;
/// and each session's fields are in its connection's task. Only for
/// `do_send`: a `send` waiting at a full mailbox would share its parking
/// with every other holder.
pub struct SharedAddr {
    addr: Addr<InstanceActor>,
    name: Box<str>,
    metrics: Arc<Metrics>,
    session_limits: SessionLimits,
}

impl SharedAddr {
    pub fn new(addr: Addr<InstanceActor>, name: &str, env: &FanoutEnv) -> Self {
        Self {
            addr,
            name: name.into(),
            metrics: env.metrics.clone(),
            session_limits: env.session_limits,
        }
    }

    /// The node's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The limits of each session.
    pub fn session_limits(&self) -> SessionLimits {
        self.session_limits
    }

    /// Sends `msg` without waiting, whatever the mailbox holds.
    pub fn do_send<M>(&self, msg: M)
    where
        M: actix::Message + Send + 'static,
        M::Result: Send,
        InstanceActor: actix::Handler<M>,
    {
        self.addr.do_send(msg);
    }

    /// Whether the actor still runs.
    pub fn connected(&self) -> bool {
        self.addr.connected()
    }

    /// The instance's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// One instance actor's address with its backpressure.
#[derive(Clone)]
pub struct Inbox {
    addr: Arc<SharedAddr>,
    pressure: Arc<Pressure>,
    bound: usize,
    /// `limits.publish_lag`: publishes waiting for the actor from which a
    /// publisher waits too (0 = never).
    lag: usize,
}

impl Inbox {
    /// The inbox of the actor at `addr`, bounded by `env.publish_queue` (and
    /// `env.publish_lag`, for local publishers).
    pub fn new(
        addr: Addr<InstanceActor>,
        name: &str,
        pressure: Arc<Pressure>,
        env: &FanoutEnv,
    ) -> Self {
        Self {
            addr: Arc::new(SharedAddr::new(addr, name, env)),
            pressure,
            bound: env.publish_queue,
            lag: env.publish_lag,
        }
    }

    /// The actor's address, a clone of its own: free to `send` and wait.
    pub fn addr(&self) -> Addr<InstanceActor> {
        self.addr.addr.clone()
    }

    /// Whether the actor still runs.
    pub fn connected(&self) -> bool {
        self.addr.connected()
    }

    /// Whether this is the way into the actor at `addr`.
    pub fn leads_to(&self, addr: &Addr<InstanceActor>) -> bool {
        self.addr.addr == *addr
    }

    /// The actor's address as sessions share it (see [`SharedAddr`]).
    pub fn shared_addr(&self) -> Arc<SharedAddr> {
        self.addr.clone()
    }

    /// Hands published `events` to the actor, in order behind every earlier
    /// publish. Returns at once unless the actor's mailbox is at its bound,
    /// the actor is behind with its publishes or the instance with its
    /// sessions; then once these events are fanned out and the instance is
    /// no longer behind. `true` when it waited.
    pub async fn publish(&self, events: Arc<[Event]>) -> bool {
        let waiting = self.waiting();
        let over = self.over_bound(waiting)
            || self.actor_behind(waiting)
            || self.pressure.behind.load(Ordering::Acquire);
        self.hand(events, over).await
    }

    /// Hands events from another node to the actor: like [`Inbox::publish`],
    /// but waits only at the mailbox bound.
    pub async fn forward(&self, events: Arc<[Event]>) -> bool {
        self.hand(events, self.over_bound(self.waiting())).await
    }

    /// Publishes sent to the actor and not yet handled.
    fn waiting(&self) -> usize {
        self.pressure.waiting.load(Ordering::Acquire)
    }

    /// Whether `waiting` publishes fill the actor's mailbox (`limits.publish_queue`).
    fn over_bound(&self, waiting: usize) -> bool {
        waiting >= self.bound
    }

    /// Whether `waiting` publishes are `limits.publish_lag` or more.
    fn actor_behind(&self, waiting: usize) -> bool {
        self.lag > 0 && waiting >= self.lag
    }

    async fn hand(&self, events: Arc<[Event]>, wait: bool) -> bool {
        let msg = Publish::new(events).queued(QueueTicket::take(&self.pressure));
        if !wait {
            self.addr.do_send(msg);
            return false;
        }
        let (tx, rx) = oneshot::channel();
        self.addr.do_send(msg.answered_by(tx));
        // An error means the actor dropped the answer (the publish had no one
        // to go to, or the actor stopped): nothing more to wait for.
        let _ = rx.await;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fan_out_is_spaced_only_from_the_nodes_previous_one() {
        let node = NodeLoad::default();
        let spacing = Duration::from_millis(10);
        node.fan_out_spaced(spacing);
        // Right behind the previous fan-out (of any instance): not spaced.
        assert!(!node.fan_out_spaced(spacing));
        std::thread::sleep(Duration::from_millis(20));
        assert!(node.fan_out_spaced(spacing));
        assert!(!node.fan_out_spaced(spacing));
        assert!(node.fan_out_spaced(Duration::ZERO));
    }
}
