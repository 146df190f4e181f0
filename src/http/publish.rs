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
use crate::events::parse_publish;

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
        state.bus.publish_events(instance.id, &events);
        if let Some(inbox) = state.registry.inbox(instance.id) {
            if inbox.publish(Arc::from(events)).await {
                state.metrics.publish_waits.inc();
            }
        }
    }
    Ok(HttpResponse::Accepted().json(json!({
        "success": true,
        "message": "Events accepted",
        "accepted": accepted,
    })))
}
