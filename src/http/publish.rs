//! `POST /api/events/publish/:instance` (contract §9): validate every event,
//! then hand them, in order, to the instance's actor on this node. The reply
//! does not wait for delivery, unless the instance's fan-out is far behind
//! (see `instance::inbox`).

use std::sync::Arc;

use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::json;

use super::{has_no_content_type, instance_param, is_json, read_body, AppState};
use crate::auth;
use crate::error::ApiError;
use crate::events::{parse_publish, Event};

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
    state.metrics.events_published.inc_by(accepted as u64);
    if accepted > 0 {
        let events: Arc<[Event]> = Arc::from(events);
        // With a shared history (contract §12), every node, this one too,
        // delivers the events from it, in its order; the reply waits for
        // JetStream's acknowledgement. When it cannot be reached, the events
        // take the plain way and recovery across them is refused.
        let enabled = instance.config.as_ref().is_some_and(|c| c.config.enabled);
        let shared = state
            .bus
            .shared_history()
            .filter(|_| enabled && state.bus.is_connected());
        let through_history = match shared {
            Some(history) => match history.publish(instance.id, &events).await {
                Ok(()) => true,
                Err(e) => {
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
            state.bus.publish_events(instance.id, &events);
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
