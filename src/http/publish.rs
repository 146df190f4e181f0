//! `POST /api/events/publish/:instance` (contract §9): validate every event,
//! then hand them, in order, to the instance's actor on this node. The reply
//! does not wait for delivery, unless the instance's fan-out is far behind
//! (see `instance::inbox`).

use std::sync::Arc;

use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::json;

use super::{has_no_content_type, instance_param, is_json, read_body, AppState};
use crate::auth;
use crate::domain::InstanceId;
use crate::error::ApiError;
use crate::events::{parse_publish, Event};
use crate::instance::shared_history::SharedHistoryError;
use crate::instance::{Change, InstanceInfo};
use crate::storage::deliveries::NewDelivery;
use crate::webhook::signature::new_delivery_id;

/// When a `backlog full` refusal was last logged (at most every 10 s).
static BACKLOG_LOGGED: parking_lot::Mutex<Option<std::time::Instant>> =
    parking_lot::Mutex::new(None);

/// Stores every webhook delivery of the request in one transaction (shared
/// with concurrent publishes: [`crate::webhook::intake`]), before the 202
/// (contract §11). An instance without enabled webhooks (known from
/// memory) touches no database.
async fn enqueue_webhooks(
    state: &AppState,
    instance: InstanceId,
    events: &[Event],
) -> Result<(), ApiError> {
    let hooks = if state.bus.is_connected() {
        state.registry.webhooks().enabled(instance)
    } else {
        enabled_in_storage(state, instance).await?
    };
    let Some(hooks) = hooks else {
        return Ok(());
    };
    let batches: Vec<(i64, Vec<NewDelivery>)> = hooks
        .iter()
        .map(|h| {
            let rows = events
                .iter()
                .filter(|e| h.wants(e.kind))
                .map(|e| NewDelivery {
                    id: new_delivery_id(),
                    event: e.kind.as_str(),
                    // A Map serialises infallibly: keys are strings, numbers finite.
                    data: serde_json::to_string(&e.data).unwrap_or_else(|_| "{}".into()),
                })
                .collect();
            (h.id, rows)
        })
        .filter(|(_, rows): &(i64, Vec<NewDelivery>)| !rows.is_empty())
        .collect();
    if batches.is_empty() {
        return Ok(());
    }
    let stored = state
        .intake
        .store(batches, crate::storage::now_millis())
        .await
        .map_err(ApiError::from)?;
    let refused = stored.refused;
    if refused > 0 {
        state
            .metrics
            .webhook_deliveries
            .with_label_values(&["dead_letter"])
            .inc_by(refused);
        let mut last = BACKLOG_LOGGED.lock();
        if last.is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(10)) {
            *last = Some(std::time::Instant::now());
            log::warn!(
                "webhook backlog full: {refused} deliveries became dead letters (instance id {})",
                instance.0
            );
        }
    }
    // Deliveries stored leased to this node are already in its lanes.
    if stored.for_claims {
        state.registry.change(Change::WebhooksDue { instance });
    }
    Ok(())
}

/// The instance's enabled webhooks as storage has them (also kept in this
/// node's map). Read while NATS is down: changes made on other nodes cannot
/// reach this one then, and the deliveries of a 202 must follow the webhooks
/// as they are, not as this node last heard of them.
async fn enabled_in_storage(
    state: &AppState,
    instance: InstanceId,
) -> Result<Option<Arc<[crate::webhook::EnabledWebhook]>>, ApiError> {
    let webhooks = state.registry.webhooks().clone();
    let read = crate::webhook::worker::db(&state.pool, move |conn| {
        crate::webhook::worker::read_enabled(conn, &webhooks, instance)
    })
    .await
    .map_err(ApiError::from)?;
    Ok((!read.is_empty()).then(|| read.into()))
}

/// `POST /api/events/publish/:instance`: TokenAccount only.
pub async fn publish(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let access = state
        .authorize_instance(auth::request_token(&req), instance_param(&req), true)
        .await?;
    let instance = access.instance.ok_or(ApiError::InstanceNotFound)?;
    let limits = &state.settings.limits;
    let body = read_body(&req, payload, limits.publish_body_bytes).await?;
    if !(is_json(&req) || has_no_content_type(&req)) {
        return Err(ApiError::invalid_body(
            "Content-Type must be application/json",
        ));
    }
    let events = parse_publish(&body, limits.publish_batch).map_err(ApiError::invalid_body)?;
    let accepted = events.len();
    enqueue_webhooks(&state, instance.id, &events).await?;
    state.metrics.events_published.inc_by(accepted as u64);
    if accepted > 0 {
        let events: Arc<[Event]> = Arc::from(events);
        // With a shared history (contract §12), every node, this one too,
        // delivers the events from it, in its order; the reply waits for
        // JetStream's acknowledgement. When it cannot be reached, the events
        // take the plain way and recovery across them is refused.
        let config = instance
            .config
            .as_ref()
            .map(|c| &c.config)
            .filter(|c| c.enabled);
        let shared = state
            .bus
            .shared_history()
            .zip(config)
            .filter(|_| state.bus.is_connected());
        let mut history_id = None;
        let through_history = match shared {
            Some((history, config)) => match history.publish(instance.id, &events, config).await {
                Ok(()) => true,
                Err(e) => {
                    if let SharedHistoryError::Unsure { id, .. } = &e {
                        // Kept after all? Then no node delivers it a second time.
                        history_id = Some(id.clone());
                    }
                    log::warn!(
                        "instance={} events not kept in the shared history: {e}",
                        instance.name
                    );
                    state
                        .metrics
                        .bus_errors
                        .with_label_values(&["history"])
                        .inc();
                    false
                }
            },
            None => false,
        };
        if !through_history {
            if let (Some(history), Some(_)) = (state.bus.shared_history(), config) {
                // Outside the shared history: the other nodes' mirrors learn
                // of the gap from a marker this node appends later.
                history.note_gap(instance.id);
            }
            state.bus.publish_events(instance.id, &events, history_id);
            // With a history kept on this node, every event accepted while
            // the WebSocket is enabled is numbered and kept (§12), whether
            // or not a client has connected since the start: the actor
            // that keeps it is started here too.
            let keeps_history =
                state.registry.env().history.is_some() && state.bus.shared_history().is_none();
            if keeps_history && config.is_some() && state.registry.inbox(instance.id).is_none() {
                state
                    .registry
                    .get_or_start(InstanceInfo::from(&instance), instance.config.clone());
            }
            if let Some(inbox) = state.registry.inbox(instance.id) {
                if inbox.publish(events).await {
                    state.metrics.publish_waits.inc();
                }
            }
        }
    }
    Ok(HttpResponse::Accepted().json(json!({
        "success": true,
        "message": "Events accepted",
        "accepted": accepted,
    })))
}
