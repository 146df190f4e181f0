//! The session actor: one per WebSocket client. It joins its instance's
//! fan-out from `started` (after raising its mailbox capacity), writes the
//! frames it is given, answers pings, pings on a timer, and closes with the
//! contract's codes. It never touches the database. Client data is ignored,
//! except in echo mode (the conformance route), which sends each message back.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_http::ws::{CloseReason, Item, Message, ProtocolError};
use actix_web_actors::ws::WebsocketContext;

use super::close::CloseCode;
use super::rules::{self, Heartbeat, Reassembly, Verdict, Whole};
use crate::domain::EventSet;
use crate::instance::messages::{Join, Leave, SessionId, SessionShared, ToSession};
use crate::instance::InstanceActor;
use crate::limits::ConnectionSlot;
use crate::metrics::Metrics;
use crate::settings::WsSettings;

static NEXT_SESSION: AtomicU64 = AtomicU64::new(1);

/// Per-session limits, from the `[ws]` settings.
#[derive(Debug, Clone, Copy)]
pub struct SessionLimits {
    pub mailbox: usize,
    pub max_message_bytes: usize,
    pub ping_interval: Duration,
    pub idle_timeout: Duration,
}

impl SessionLimits {
    pub fn from_settings(ws: &WsSettings) -> Self {
        Self {
            mailbox: ws.client_buffer,
            max_message_bytes: ws.max_message_bytes,
            ping_interval: Duration::from_secs(ws.ping_interval_secs),
            idle_timeout: Duration::from_secs(ws.idle_timeout_secs),
        }
    }
}

/// One connected client.
pub struct Session {
    id: SessionId,
    instance: Addr<InstanceActor>,
    instance_name: String,
    narrowing: EventSet,
    shared: Arc<SessionShared>,
    limits: SessionLimits,
    heartbeat: Heartbeat,
    reassembly: Reassembly,
    metrics: Arc<Metrics>,
    /// Why the session ended, for the disconnect counter.
    ended: CloseCode,
    /// Sends each client message back instead of ignoring it.
    echo: bool,
    /// This client's place in the connection limits, given back on drop.
    _slot: ConnectionSlot,
}

impl Session {
    pub fn new(
        instance: Addr<InstanceActor>,
        instance_name: String,
        narrowing: EventSet,
        limits: SessionLimits,
        metrics: Arc<Metrics>,
        slot: ConnectionSlot,
    ) -> Self {
        Self {
            id: SessionId(NEXT_SESSION.fetch_add(1, Ordering::Relaxed)),
            instance,
            instance_name,
            narrowing,
            shared: Arc::new(SessionShared::default()),
            limits,
            heartbeat: Heartbeat::new(limits.idle_timeout),
            reassembly: Reassembly::default(),
            metrics,
            ended: CloseCode::Normal,
            echo: false,
            _slot: slot,
        }
    }

    /// The same session, sending each complete client message back.
    pub fn echoing(mut self) -> Self {
        self.echo = true;
        self.reassembly = Reassembly::keeping();
        self
    }

    /// Sends a close frame with `code` and stops the actor.
    fn close(&mut self, ctx: &mut WebsocketContext<Self>, code: CloseCode) {
        self.ended = code;
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
                    self.instance_name,
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
        ctx.set_mailbox_capacity(self.limits.mailbox);
        self.instance.do_send(Join {
            session: self.id,
            recipient: ctx.address().recipient(),
            narrowing: self.narrowing,
            shared: self.shared.clone(),
        });
        self.metrics.connected_clients.inc();
        log::debug!(
            "instance={} session={} connected",
            self.instance_name,
            self.id
        );
        ctx.run_interval(self.limits.ping_interval, |act, ctx| {
            if let Some(code) = act.shared.requested_close() {
                act.close(ctx, code);
            } else if act.heartbeat.expired(Instant::now()) {
                act.metrics
                    .clients_evicted
                    .with_label_values(&[CloseCode::HeartbeatTimeout.label()])
                    .inc();
                log::warn!(
                    "instance={} session={} heartbeat timeout",
                    act.instance_name,
                    act.id
                );
                act.close(ctx, CloseCode::HeartbeatTimeout);
            } else {
                ctx.ping(b"");
            }
        });
    }

    fn stopping(&mut self, _: &mut Self::Context) -> Running {
        self.instance.do_send(Leave { session: self.id });
        Running::Stop
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        self.metrics.connected_clients.dec();
        self.metrics
            .disconnects
            .with_label_values(&[self.ended.label()])
            .inc();
        log::info!(
            "instance={} session={} disconnected: {}",
            self.instance_name,
            self.id,
            self.ended.reason()
        );
    }
}

impl Handler<ToSession> for Session {
    type Result = ();

    fn handle(&mut self, msg: ToSession, ctx: &mut Self::Context) {
        match msg {
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
        }
    }
}

impl StreamHandler<Result<Message, ProtocolError>> for Session {
    fn handle(&mut self, msg: Result<Message, ProtocolError>, ctx: &mut Self::Context) {
        self.heartbeat.heard();
        let max = self.limits.max_message_bytes;
        let msg = match msg {
            Ok(msg) => msg,
            Err(e) => {
                return match rules::refusal(&e) {
                    Some(code) => self.verdict(ctx, Verdict::Close(code)),
                    None => {
                        // The connection itself failed: nothing to send a close on.
                        self.ended = CloseCode::ProtocolError;
                        ctx.stop();
                    }
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
                    Item::FirstText(data) => self.reassembly.first(true, &data, max),
                    Item::FirstBinary(data) => self.reassembly.first(false, &data, max),
                    Item::Continue(data) => self.reassembly.more(&data, max),
                    Item::Last(data) => self.reassembly.last(&data, max),
                };
                self.verdict(ctx, verdict);
            }
            Message::Close(reason) => {
                // Echo the client's code, as the close handshake asks.
                self.ended = CloseCode::Normal;
                ctx.close(reason);
                ctx.stop();
            }
        }
    }

    fn finished(&mut self, ctx: &mut Self::Context) {
        ctx.stop();
    }
}
