//! How a session joins its instance actor (contract §12): a client that
//! opted in gets `connection.recovery` first and, when the history still
//! holds everything after its `since`, the replay of what it missed through
//! its filters, queued inside `Join` so the hand-over to live events has no
//! gap and no duplicate. The replay counts against the session's bounds.

use std::sync::Arc;
use std::time::Instant;

use actix::prelude::*;
use bytestring::ByteString;

use super::super::history::recovery_frame;
use super::super::messages::{Batch, Join, Recovery, ToSession};
use super::{InstanceActor, SessionEntry};
use crate::domain::EventSet;

impl Handler<Join> for InstanceActor {
    type Result = ();

    fn handle(&mut self, msg: Join, ctx: &mut Self::Context) {
        if self.waits_for_mirror(&msg) {
            return self.park(msg, ctx);
        }
        self.admit(msg, None, ctx);
    }
}

impl InstanceActor {
    /// Adds a session, queuing its recovery first (or, for a session that
    /// waited for the mirror, what was published since it arrived).
    pub(super) fn admit(&mut self, msg: Join, arrived: Option<Instant>, ctx: &mut Context<Self>) {
        let entry = SessionEntry {
            recipient: msg.recipient,
            narrowing: msg.narrowing,
            shared: msg.shared,
            recovering: msg.recovery.is_some(),
        };
        if let Some(recovery) = msg.recovery {
            // Queued before any later publish is handled: the replay ends
            // exactly where live events begin.
            let batch = self.recovery_batch(&recovery, entry.narrowing);
            if let Err(code) = self.offer(&entry, batch, ToSession::Replay) {
                entry.shared.request_close(code);
                entry.recipient.do_send(ToSession::Close(code));
                return;
            }
            self.recovering += 1;
        } else if let Some(arrived) = arrived {
            let batch = self.published_since(arrived, entry.narrowing);
            if !batch.frames.is_empty() {
                if let Err(code) = self.offer(&entry, batch, ToSession::Replay) {
                    entry.shared.request_close(code);
                    entry.recipient.do_send(ToSession::Close(code));
                    return;
                }
            }
        }
        self.sessions.insert(msg.session, entry);
        self.report_count();
        self.update_interest(ctx);
    }
}

impl InstanceActor {
    /// A recovering session's first frame and the replay that follows it
    /// (contract §12), counted in the metrics.
    fn recovery_batch(&mut self, recovery: &Recovery, narrowing: EventSet) -> Batch {
        let config = self
            .config
            .as_ref()
            .map(|c| &c.config)
            .filter(|c| c.enabled);
        let mut frames = Vec::new();
        let (recovered, first) = match (&mut self.history, &recovery.since) {
            (None, since) => (since.is_none(), recovery_frame(since.is_none(), "", 0)),
            (Some(history), None) => (
                true,
                recovery_frame(true, history.epoch(), history.latest()),
            ),
            (Some(history), Some((epoch, since))) => {
                let recovered = epoch == history.epoch() && history.covers(*since, Instant::now());
                if let (true, Some(config)) = (recovered, config) {
                    let filter = config.event_set();
                    for kept in history
                        .after(*since)
                        .filter(|e| filter.allows(e.kind) && narrowing.allows(e.kind))
                    {
                        frames.push(history.stamped(kept, config.media_base64));
                    }
                }
                (
                    recovered,
                    recovery_frame(recovered, history.epoch(), history.latest()),
                )
            }
        };
        if let Some((_, since)) = &recovery.since {
            let metrics = &self.env.metrics;
            metrics
                .recoveries
                .with_label_values(&[if recovered { "true" } else { "false" }])
                .inc();
            metrics.replayed_events.inc_by(frames.len() as u64);
            log::debug!(
                "instance={} recovery since {since}: recovered={recovered}, {} replayed",
                self.info.name,
                frames.len()
            );
        }
        frames.insert(0, first);
        let frames: Arc<[ByteString]> = frames.into();
        let bytes = frames.iter().map(|f| f.len()).sum();
        Batch { frames, bytes }
    }
}
