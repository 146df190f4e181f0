//! The session actor: one per WebSocket client. It joins its instance's
//! fan-out from `started` (after raising its mailbox capacity), writes the
//! frames it is given, answers pings, pings when its instance asks (see
//! [`ToSession::Heartbeat`]), and closes with the contract's codes. It never
//! touches the database. Client data is ignored, except in echo mode (the
//! conformance route), which sends each message back.
//!
//! A recovery's replay (contract §12) arrives as one message; it is written a
//! chunk at a time, each when the socket has taken the previous one, and its
//! frames stay counted in the session's queued bytes until written, so a
//! client too slow for its replay is evicted like any slow consumer.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use actix::prelude::*;
use actix_http::ws::{CloseReason, Item, Message, ProtocolError};
use actix_web_actors::ws::WebsocketContext;
use bytestring::ByteString;

use super::close::CloseCode;
use super::rules::{self, Reassembly, Verdict, Whole};
use crate::domain::EventSet;
use crate::instance::messages::{
    Batch, Join, Leave, Recovery, SessionId, SessionShared, ToSession,
};
use crate::instance::SharedAddr;
use crate::limits::ConnectionSlot;
use crate::settings::WsSettings;

static NEXT_SESSION: AtomicU64 = AtomicU64::new(1);

/// Bytes of a replay written before the session waits for the socket to
/// take them (the socket's own high-water mark).
const REPLAY_CHUNK: usize = super::socket::HIGH_WATER;

/// Per-session limits, from the `[ws]` settings (held once per instance,
/// in its [`SharedAddr`]).
#[derive(Debug, Clone, Copy)]
pub struct SessionLimits {
    pub mailbox: usize,
    pub max_message_bytes: usize,
}

impl SessionLimits {
    pub fn from_settings(ws: &WsSettings) -> Self {
        Self {
            mailbox: ws.client_buffer,
            max_message_bytes: ws.max_message_bytes,
        }
    }
}

/// One connected client. Every byte here is in every connection's task
/// (see `ws::socket`): what all sessions of an instance share (its name,
/// the node's metrics, the session limits) is in its [`SharedAddr`], and
/// what few sessions hold is boxed.
pub struct Session {
    id: SessionId,
    instance: Arc<SharedAddr>,
    narrowing: EventSet,
    shared: Arc<SessionShared>,
    reassembly: Reassembly,
    /// Why the session ended, for the disconnect counter: the close code
    /// of the close handshake (the client's or ours), or `None` while there
    /// was none: a connection that ends without one (a reset, an EOF with
    /// no close frame, `TCP_USER_TIMEOUT`) was lost (RFC 6455's 1006).
    ended: Option<CloseCode>,
    /// Sends each client message back instead of ignoring it.
    echo: bool,
    /// The client's opt-in to recovery until the session joins its
    /// instance, then the replay's frames not yet written.
    aside: Aside,
    /// This client's place in the connection limits, given back on drop.
    _slot: ConnectionSlot,
}

/// What few sessions hold, allocated only while held: most clients never
/// recover. Until the session joins, the client's opt-in to recovery
/// (handed to the instance with the join); after it, the replay's frames
/// (and deliveries behind them) not yet written, whose bytes are still
/// counted in `shared.queued_bytes`.
#[derive(Default)]
struct Aside(Option<Box<Held>>);

enum Held {
    Recovery(Recovery),
    Backlog(VecDeque<ByteString>),
}

impl Aside {
    fn recovering(recovery: Recovery) -> Self {
        Self(Some(Box::new(Held::Recovery(recovery))))
    }

    /// The recovery asked for, taken to join (nothing is held after it).
    fn take_recovery(&mut self) -> Option<Recovery> {
        match self.0.take().map(|held| *held) {
            Some(Held::Recovery(recovery)) => Some(recovery),
            Some(backlog @ Held::Backlog(_)) => {
                self.0 = Some(Box::new(backlog));
                None
            }
            None => None,
        }
    }

    /// Whether no replay frame waits.
    fn is_empty(&self) -> bool {
        !matches!(self.0.as_deref(), Some(Held::Backlog(_)))
    }

    fn extend(&mut self, frames: impl IntoIterator<Item = ByteString>) {
        if self.is_empty() {
            self.0 = Some(Box::new(Held::Backlog(VecDeque::new())));
        }
        if let Some(Held::Backlog(queue)) = self.0.as_deref_mut() {
            queue.extend(frames);
            if queue.is_empty() {
                self.0 = None;
            }
        }
    }

    fn pop_front(&mut self) -> Option<ByteString> {
        let Some(Held::Backlog(queue)) = self.0.as_deref_mut() else {
            return None;
        };
        let frame = queue.pop_front();
        if queue.is_empty() {
            self.0 = None;
        }
        frame
    }

    fn clear(&mut self) {
        if !self.is_empty() {
            self.0 = None;
        }
    }
}

impl Session {
    pub fn new(instance: Arc<SharedAddr>, narrowing: EventSet, slot: ConnectionSlot) -> Self {
        Self {
            id: SessionId(NEXT_SESSION.fetch_add(1, Ordering::Relaxed)),
            instance,
            narrowing,
            shared: Arc::new(SessionShared::default()),
            reassembly: Reassembly::default(),
            ended: None,
            echo: false,
            aside: Aside::default(),
            _slot: slot,
        }
    }

    /// What the session shares with its instance actor.
    pub fn shared(&self) -> Arc<SessionShared> {
        self.shared.clone()
    }

    /// The same session, recovering as the client asked (`?recover=true`).
    pub fn recovering(mut self, recovery: Recovery) -> Self {
        self.aside = Aside::recovering(recovery);
        self
    }

    /// Queues frames behind the backlog and writes the next chunk.
    fn queue(&mut self, batch: Batch, ctx: &mut WebsocketContext<Self>) {
        let was_idle = self.aside.is_empty();
        self.aside.extend(batch.frames.iter().cloned());
        if was_idle {
            self.write_backlog(ctx);
        }
    }

    /// Writes up to [`REPLAY_CHUNK`] bytes of the backlog, then comes back
    /// for more once the socket has taken them (the context is polled again
    /// only below the socket's high-water mark).
    fn write_backlog(&mut self, ctx: &mut WebsocketContext<Self>) {
        if let Some(code) = self.shared.requested_close() {
            self.aside.clear();
            return self.close(ctx, code);
        }
        let mut written = 0;
        while written < REPLAY_CHUNK {
            let Some(frame) = self.aside.pop_front() else {
                break;
            };
            written += frame.len();
            self.shared
                .queued_bytes
                .fetch_sub(frame.len(), Ordering::AcqRel);
            ctx.text(frame);
        }
        if !self.aside.is_empty() {
            ctx.spawn(
                actix::fut::wrap_future::<_, Self>(tokio::task::yield_now())
                    .map(|_, act, ctx| act.write_backlog(ctx)),
            );
        }
    }

    /// The same session, sending each complete client message back.
    pub fn echoing(mut self) -> Self {
        self.echo = true;
        self
    }

    /// The heartbeat turn the instance actor could not take itself (see
    /// [`ToSession::Heartbeat`]).
    fn heartbeat_turn(&mut self, silent_since: Option<u64>, ctx: &mut WebsocketContext<Self>) {
        // Heard from since the instance looked: not silent after all.
        let silent = silent_since == Some(self.shared.heartbeat.last_heard());
        if let Some(code) = self.shared.requested_close() {
            self.close(ctx, code);
        } else if silent {
            self.instance
                .metrics()
                .clients_evicted
                .with_label_values(&[CloseCode::HeartbeatTimeout.label()])
                .inc();
            log::warn!(
                "instance={} session={} heartbeat timeout",
                self.instance.name(),
                self.id
            );
            self.close(ctx, CloseCode::HeartbeatTimeout);
        } else {
            ctx.ping(b"");
        }
    }

    /// Sends a close frame with `code` and stops the actor.
    fn close(&mut self, ctx: &mut WebsocketContext<Self>, code: CloseCode) {
        // Nothing may follow the close frame.
        self.shared.direct.end();
        self.ended = Some(code);
        ctx.close(Some(CloseReason {
            code: code.code().into(),
            description: Some(code.reason().to_string()),
        }));
        ctx.stop();
    }

    fn verdict(&mut self, ctx: &mut WebsocketContext<Self>, verdict: Verdict) {
        match verdict {
            Verdict::Ok => {}
            Verdict::Complete(Whole::Text(text)) => ctx.text(text),
            Verdict::Complete(Whole::Binary(data)) => ctx.binary(data),
            Verdict::Close(code) => {
                log::warn!(
                    "instance={} session={} client frame refused: {}",
                    self.instance.name(),
                    self.id,
                    code.reason()
                );
                self.close(ctx, code);
            }
        }
    }
}

impl Actor for Session {
    type Context = WebsocketContext<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(self.instance.session_limits().mailbox);
        self.instance.do_send(Join {
            session: self.id,
            recipient: ctx.address().recipient(),
            narrowing: self.narrowing,
            shared: self.shared.clone(),
            recovery: self.aside.take_recovery(),
        });
        self.instance.metrics().connected_clients.inc();
        if !self.instance.connected() {
            // The instance was deleted as this client connected: its actor
            // stopped, so nothing would reach the session (not even its
            // heartbeat turns, which the instance actor gives).
            self.close(ctx, CloseCode::InstanceDeleted);
        }
        log::debug!(
            "instance={} session={} connected",
            self.instance.name(),
            self.id
        );
    }

    fn stopping(&mut self, _: &mut Self::Context) -> Running {
        self.shared.direct.end();
        self.instance.do_send(Leave { session: self.id });
        Running::Stop
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        self.instance.metrics().connected_clients.dec();
        self.instance
            .metrics()
            .disconnects
            .with_label_values(&[self.ended.map_or("connection_lost", CloseCode::label)])
            .inc();
        log::info!(
            "instance={} session={} disconnected: {}",
            self.instance.name(),
            self.id,
            self.ended.map_or("connection lost", CloseCode::reason)
        );
    }
}

impl Handler<ToSession> for Session {
    type Result = ();

    fn handle(&mut self, msg: ToSession, ctx: &mut Self::Context) {
        if matches!(msg, ToSession::Deliver(_) | ToSession::Replay(_)) {
            self.shared.queued_batches.fetch_sub(1, Ordering::AcqRel);
        }
        match msg {
            ToSession::Replay(batch) => self.queue(batch, ctx),
            ToSession::Deliver(batch) if !self.aside.is_empty() => self.queue(batch, ctx),
            ToSession::Deliver(batch) => {
                self.shared
                    .queued_bytes
                    .fetch_sub(batch.bytes, Ordering::AcqRel);
                if let Some(code) = self.shared.requested_close() {
                    return self.close(ctx, code);
                }
                for frame in batch.frames.iter() {
                    ctx.text(frame.clone());
                }
            }
            ToSession::Close(code) => self.close(ctx, code),
            ToSession::Heartbeat { silent_since } => self.heartbeat_turn(silent_since, ctx),
            // The connection's writer, polled for this, sends what is left.
            ToSession::Flush => {}
        }
    }
}

impl StreamHandler<Result<Message, ProtocolError>> for Session {
    fn handle(&mut self, msg: Result<Message, ProtocolError>, ctx: &mut Self::Context) {
        self.shared.heartbeat.heard();
        let max = self.instance.session_limits().max_message_bytes;
        let msg = match msg {
            Ok(msg) => msg,
            Err(e) => {
                return match rules::refusal(&e) {
                    Some(code) => self.verdict(ctx, Verdict::Close(code)),
                    // The connection itself failed: nothing to send a close on.
                    None => ctx.stop(),
                };
            }
        };
        match msg {
            Message::Ping(payload) => ctx.pong(&payload),
            Message::Pong(_) | Message::Nop => {}
            Message::Text(_) | Message::Binary(_) if self.reassembly.is_open() => {
                self.verdict(ctx, Verdict::Close(CloseCode::ProtocolError));
            }
            // One frame is within the limit: the codec refuses larger ones.
            Message::Text(text) if self.echo => ctx.text(text),
            Message::Binary(data) if self.echo => ctx.binary(data),
            Message::Text(_) | Message::Binary(_) => {}
            Message::Continuation(item) => {
                let verdict = match item {
                    Item::FirstText(data) => self.reassembly.first(true, self.echo, &data, max),
                    Item::FirstBinary(data) => self.reassembly.first(false, self.echo, &data, max),
                    Item::Continue(data) => self.reassembly.more(&data, max),
                    Item::Last(data) => self.reassembly.last(&data, max),
                };
                self.verdict(ctx, verdict);
            }
            Message::Close(reason) => {
                // Echo the client's code, as the close handshake asks.
                self.shared.direct.end();
                self.ended = Some(CloseCode::Normal);
                ctx.close(reason);
                ctx.stop();
            }
        }
    }

    /// The client's side ended: after its close frame a clean close,
    /// without one (a bare EOF) a lost connection (`ended` stays `None`).
    fn finished(&mut self, ctx: &mut Self::Context) {
        ctx.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Nothing is allocated while nothing is held: not at first, not after
    /// the recovery was taken to join, not once the backlog's last frame
    /// was taken.
    #[test]
    fn the_aside_is_allocated_only_while_it_holds_something() {
        let mut aside = Aside::recovering(Recovery { since: None });
        assert!(aside.is_empty(), "a recovery is no backlog");
        assert!(aside.take_recovery().is_some());
        assert!(aside.is_empty() && aside.0.is_none());
        assert!(aside.take_recovery().is_none());
        aside.extend(Vec::new());
        assert!(aside.is_empty() && aside.0.is_none());
        aside.extend([ByteString::from("a"), ByteString::from("b")]);
        assert!(!aside.is_empty());
        assert!(aside.take_recovery().is_none(), "the backlog stays");
        assert_eq!(aside.pop_front().as_deref(), Some("a"));
        assert!(!aside.is_empty());
        assert_eq!(aside.pop_front().as_deref(), Some("b"));
        assert!(aside.is_empty() && aside.0.is_none());
        assert_eq!(aside.pop_front(), None);
        aside.extend([ByteString::from("c")]);
        aside.clear();
        assert!(aside.is_empty() && aside.0.is_none());
    }
}
