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
                // While the WebSocket is disabled nothing is delivered (§7):
                // a client that missed events is told so, not sent them.
                let recovered = epoch == history.epoch()
                    && history.covers(*since, Instant::now())
                    && (config.is_some() || *since >= history.latest());
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use actix::prelude::*;
    use serde_json::{json, Value};
    use tokio::sync::mpsc;

    use super::super::mirror::tests::actor_with_history;
    use super::super::InstanceActor;
    use crate::domain::{EventKind, EventSet, VersionedConfig, WsConfig};
    use crate::events::Event;
    use crate::instance::messages::{
        Join, Publish, Recovery, SessionId, SessionShared, ToSession, UpdateSettings,
    };

    /// A session as the instance sees it: what it is sent goes to the test.
    struct Sink(mpsc::UnboundedSender<ToSession>);

    impl Actor for Sink {
        type Context = Context<Self>;
    }

    impl Handler<ToSession> for Sink {
        type Result = ();

        fn handle(&mut self, msg: ToSession, _: &mut Self::Context) {
            let _ = self.0.send(msg);
        }
    }

    async fn set_enabled(actor: &Addr<InstanceActor>, enabled: bool, version: i64) {
        let config = WsConfig::normalized(enabled, Vec::new(), false);
        actor
            .send(UpdateSettings(Some(VersionedConfig { config, version })))
            .await
            .unwrap();
    }

    /// Joins session `id` recovering `since` (epoch, offset); returns the
    /// frames of its recovery: the first frame, then the replay.
    async fn recover(
        actor: &Addr<InstanceActor>,
        id: u64,
        since: Option<(String, u64)>,
    ) -> Vec<Value> {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let sink = Sink(tx).start();
        actor.do_send(Join {
            session: SessionId(id),
            recipient: sink.recipient(),
            narrowing: EventSet::default(),
            shared: Arc::new(SessionShared::default()),
            recovery: Some(Recovery { since }),
        });
        match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
            Ok(Some(ToSession::Replay(batch))) => batch
                .frames
                .iter()
                .map(|f| serde_json::from_str(f).unwrap())
                .collect(),
            other => panic!("expected the recovery, got {other:?}"),
        }
    }

    /// A client whose recovery lands while the WebSocket is disabled (it was
    /// enabled when the client's upgrade was checked) is told it missed
    /// events, since none is delivered while disabled; one that missed
    /// nothing is still told `recovered: true`.
    #[actix_rt::test]
    async fn a_recovery_while_disabled_says_what_was_missed_is_not_coming() {
        let actor = actor_with_history();
        set_enabled(&actor, true, 1).await;
        let start = recover(&actor, 1, None).await;
        let epoch = start[0]["data"]["epoch"].as_str().unwrap().to_string();
        let before = start[0]["data"]["offset"].as_u64().unwrap();
        for i in 0..2 {
            let event = Event {
                kind: EventKind::MessageStatus,
                data: json!({ "i": i }).as_object().unwrap().clone(),
            };
            actor.send(Publish::new(vec![event].into())).await.unwrap();
        }

        let enabled = recover(&actor, 2, Some((epoch.clone(), before))).await;
        assert_eq!(enabled[0]["data"]["recovered"], true, "{enabled:?}");
        assert_eq!(
            enabled.len(),
            3,
            "the first frame and both events: {enabled:?}"
        );
        let latest = enabled[0]["data"]["offset"].as_u64().unwrap();

        set_enabled(&actor, false, 2).await;
        let disabled = recover(&actor, 3, Some((epoch.clone(), before))).await;
        assert_eq!(disabled[0]["data"]["recovered"], false, "{disabled:?}");
        assert_eq!(disabled.len(), 1, "nothing replayed: {disabled:?}");
        let nothing_missed = recover(&actor, 4, Some((epoch, latest))).await;
        assert_eq!(
            nothing_missed[0]["data"]["recovered"], true,
            "{nothing_missed:?}"
        );
        assert_eq!(nothing_missed.len(), 1);
    }
}
