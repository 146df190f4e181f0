//! Messages between HTTP handlers, instance actors and session actors.

use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use actix::prelude::*;
use bytestring::ByteString;

use tokio::sync::oneshot;

use super::inbox::Pressure;
use crate::domain::{EventSet, VersionedConfig};
use crate::events::Event;
use crate::ws::close::CloseCode;

/// A session's identity within its node; later sessions have larger ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SessionId(pub u64);

impl std::fmt::Display for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// State a session shares with its instance actor, outside both mailboxes.
#[derive(Debug, Default)]
pub struct SessionShared {
    /// Bytes of frames sent to the session and not yet handed to its socket.
    pub queued_bytes: AtomicUsize,
    /// Batches sent to the session and not yet taken from its mailbox.
    pub queued_batches: AtomicUsize,
    /// Whether the socket refused bytes at its last write and has not taken
    /// them all since: the client is not reading as fast as it is sent.
    pub socket_full: AtomicBool,
    /// A close the instance asked for (0 = none); read before every delivery.
    pub close_code: AtomicU16,
    /// The fan-out's way to the session's socket while its writer is idle.
    pub direct: crate::ws::direct::DirectWay,
    /// When the client was last heard from (stamped by the session).
    pub heartbeat: crate::ws::rules::Heartbeat,
}

impl SessionShared {
    /// Whether the session has `threshold` or more batches waiting while its
    /// client takes all it is sent: the node, not the client, is late.
    pub fn lagging(&self, threshold: usize) -> bool {
        self.queued_batches.load(Ordering::Acquire) >= threshold
            && !self.socket_full.load(Ordering::Acquire)
    }

    /// Whether nothing sent to the session waits in its mailbox or backlog
    /// and no close was asked for: a direct write would overtake nothing.
    pub fn nothing_waiting(&self) -> bool {
        self.queued_batches.load(Ordering::Acquire) == 0
            && self.queued_bytes.load(Ordering::Acquire) == 0
            && self.close_code.load(Ordering::Acquire) == 0
    }

    /// Marks the session for closing with `code`, unless already marked.
    pub fn request_close(&self, code: CloseCode) {
        let _ =
            self.close_code
                .compare_exchange(0, code.code(), Ordering::AcqRel, Ordering::Acquire);
    }

    /// The close asked for, if any.
    pub fn requested_close(&self) -> Option<CloseCode> {
        CloseCode::from_code(self.close_code.load(Ordering::Acquire))
    }
}

/// Envelopes for one session from one publish request: one mailbox message,
/// however many events the request carried.
#[derive(Debug, Clone)]
pub struct Batch {
    pub frames: Arc<[ByteString]>,
    pub bytes: usize,
}

/// What an instance actor sends a session.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub enum ToSession {
    /// Write these frames, in order.
    Deliver(Batch),
    /// A direct write left part of its frames for the connection's writer
    /// (`ws::direct`): this wakes it to send them.
    Flush,
    /// Write these frames (a recovery's first frame and replay), in order,
    /// as fast as the socket takes them; later deliveries follow them.
    Replay(Batch),
    /// Close with this code and stop.
    Close(CloseCode),
    /// The client's heartbeat turn, once per ping interval, when the
    /// instance could not ping it itself (`ws::direct`): close if a close
    /// was asked for, close with 4001 if the client went silent past the
    /// idle timeout (`silent_since`: when it was last heard, if it still
    /// was not heard since), else ping it.
    Heartbeat { silent_since: Option<u64> },
}

/// A session joins its instance's fan-out (sent from the session's `started`).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Join {
    pub session: SessionId,
    /// The one stored address used for every send to this session.
    pub recipient: Recipient<ToSession>,
    /// The client's `?events=` narrowing (empty = none).
    pub narrowing: EventSet,
    pub shared: Arc<SessionShared>,
    /// Whether (and from where) the client recovers (`?recover=true`).
    pub recovery: Option<Recovery>,
}

/// A client's opt-in to recovery on reconnect (contract §12).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// The epoch and offset of the last envelope the client processed;
    /// `None` when it asks only for its starting position.
    pub since: Option<(String, u64)>,
}

/// A session leaves (sent from the session's `stopping`).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Leave {
    pub session: SessionId,
}

/// Events accepted by the publish endpoint, in accepted order.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Publish {
    pub events: Arc<[Event]>,
    pub accepted_at: Instant,
    /// Counts this publish in its instance's inbox until it is handled.
    ticket: Option<QueueTicket>,
    /// Answered once the events are fanned out and the instance is not
    /// behind (see `Inbox`); dropped unanswered when there is nothing to wait for.
    pub answer: Option<oneshot::Sender<()>>,
}

impl Publish {
    pub fn new(events: Arc<[Event]>) -> Self {
        Self {
            events,
            accepted_at: Instant::now(),
            ticket: None,
            answer: None,
        }
    }

    /// The same publish, whose sender waits for `answer`.
    pub fn answered_by(mut self, answer: oneshot::Sender<()>) -> Self {
        self.answer = Some(answer);
        self
    }

    /// The same publish, counted in an inbox while it waits.
    pub fn queued(mut self, ticket: QueueTicket) -> Self {
        self.ticket = Some(ticket);
        self
    }
}

/// One publish counted as waiting for its instance actor; dropped (handled,
/// or discarded with the mailbox) it is no longer counted.
pub struct QueueTicket(Arc<Pressure>);

impl QueueTicket {
    pub fn take(pressure: &Arc<Pressure>) -> Self {
        pressure.waiting.fetch_add(1, Ordering::AcqRel);
        if let Some(node) = &pressure.node {
            node.waiting.fetch_add(1, Ordering::AcqRel);
        }
        Self(pressure.clone())
    }
}

impl Drop for QueueTicket {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::AcqRel);
        if let Some(node) = &self.0.node {
            node.waiting.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// The instance's settings as persisted; older versions than the one held are ignored.
#[derive(Message)]
#[rtype(result = "()")]
pub struct UpdateSettings(pub Option<VersionedConfig>);

/// The instance was deleted: close every session with 4004 and stop.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Deleted;

/// The node is shutting down: close every session with 1001.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct CloseAll(pub CloseCode);

/// How many sessions the instance has on this node.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct CountSessions;

/// One follower of the shared history into an instance actor, numbered by
/// the actor each time it starts following. A follower's messages that were
/// already on their way when the actor stopped following (and dropped its
/// mirror) are recognised as stale and ignored: they would otherwise bring
/// back a position the next follower's first load would be taken for new.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FollowerId(pub u64);

/// The shared history's follower has looked at JetStream and (re)starts:
/// `resumed` after the last message the mirror saw, in the same epoch (the
/// mirror stays); otherwise the mirror begins empty, in `epoch`.
/// `caught_up` when the subject holds nothing more to load.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SyncStart {
    /// Which follower sent it (see [`FollowerId`]).
    pub follower: FollowerId,
    pub epoch: Arc<str>,
    pub caught_up: bool,
    pub resumed: bool,
}

/// This node's NATS connection dropped or came back: until the follower has
/// looked at JetStream again (the next `SyncStart`), the mirror may lack
/// what JetStream holds, or JetStream may have lost the epoch.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Unsure {
    /// Which follower sent it (see [`FollowerId`]).
    pub follower: FollowerId,
}

/// One publish request's events from the shared history, in stream order.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Sequenced {
    /// Which follower sent it (see [`FollowerId`]).
    pub follower: FollowerId,
    pub epoch: Arc<str>,
    /// Its stream sequence (its events' offsets derive from it).
    pub seq: u64,
    /// The sequence of the subject's previous message (0: none).
    pub prev: u64,
    /// How long ago JetStream accepted it.
    pub age: std::time::Duration,
    pub events: Arc<[Event]>,
    /// Whether this node already delivered them the plain way (JetStream
    /// kept a publish whose acknowledgement never came): kept, not sent.
    pub delivered: bool,
    /// The instance's filter and mediaBase64 when they were accepted
    /// (`None`: the message does not say; the current ones apply).
    pub accepted_under: Option<(EventSet, bool)>,
    /// A gap marker: events of the instance were delivered outside the
    /// history before it, so no recovery from before it is complete.
    pub gap: bool,
    /// Whether nothing older is left to load.
    pub caught_up: bool,
}

/// Where the actor's mirror of the shared history stands: its epoch and the
/// last stream sequence it has seen (a restarted follower resumes after it).
#[derive(Message)]
#[rtype(result = "Option<(Arc<str>, u64)>")]
pub struct MirrorPosition;
