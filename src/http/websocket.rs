//! `POST /api/events/websocket/:instance` and `GET /api/events/getWebsocket/:instance`
//! (contract §5): persist first, then tell the instance's actor.

use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::{json, Value};

use super::instances::optional_bool;
use super::{is_json, read_body, AppState};
use crate::domain::{EventKind, WsConfig};
use crate::error::ApiError;
use crate::instance::Change;
use crate::storage;

/// 500 message of the set endpoint.
const SET_FAILED: &str = "Failed to get instance";
/// 500 message of the get endpoint.
const GET_FAILED: &str = "Failed to get websocket configuration";

/// An `events` list: an array of the six names (duplicates allowed here).
pub fn parse_events(value: &Value, key: &str) -> Result<Vec<EventKind>, ApiError> {
    let Value::Array(items) = value else {
        return Err(ApiError::invalid_body(format!(
            "`{key}` must be a list of event names"
        )));
    };
    items
        .iter()
        .map(|item| {
            item.as_str().and_then(EventKind::parse).ok_or_else(|| {
                ApiError::invalid_body(format!("`{key}` has an unknown event name: {item}"))
            })
        })
        .collect()
}

/// Validates a settings body and builds the configuration to store.
pub fn parse_settings(body: &[u8]) -> Result<WsConfig, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid_body(format!("body is not valid JSON: {e}")))?;
    let Value::Object(fields) = value else {
        return Err(ApiError::invalid_body("body must be a JSON object"));
    };
    let enabled = optional_bool(&fields, "enabled")?
        .ok_or_else(|| ApiError::invalid_body("`enabled` is required"))?;
    let events = match fields.get("events") {
        None => Vec::new(),
        Some(v) => parse_events(v, "events")?,
    };
    let media = optional_bool(&fields, "mediaBase64")?.unwrap_or(false);
    Ok(WsConfig::normalized(enabled, events, media))
}

/// `POST /api/events/websocket/:instance`.
pub async fn set(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let instance = state.target_instance(&req, false, Some(SET_FAILED)).await?;
    let body = read_body(&req, payload, state.settings.limits.body_bytes).await?;
    if !is_json(&req) {
        return Err(ApiError::invalid_body(
            "Content-Type must be application/json",
        ));
    }
    let config = parse_settings(&body)?;
    let id = instance.id;
    let persisted = state
        .db(move |conn| storage::ws_settings::upsert(conn, id, &config))
        .await
        .map_err(ApiError::storage(SET_FAILED))?;
    state.registry.change(Change::Settings {
        instance: id,
        settings: Some(persisted.clone()),
    });
    log::info!(
        "instance={} websocket configured (enabled={})",
        instance.name,
        persisted.config.enabled
    );
    Ok(HttpResponse::Ok().json(json!({
        "success": true,
        "message": "WebSocket configured successfully",
        "websocket": persisted.config,
    })))
}

/// `GET /api/events/getWebsocket/:instance`.
pub async fn get(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let instance = state.target_instance(&req, false, Some(GET_FAILED)).await?;
    let config = instance.config.ok_or(ApiError::WebSocketNotConfigured)?;
    Ok(HttpResponse::Ok().json(json!({
        "success": true,
        "message": "WebSocket configuration retrieved",
        "websocket": config.config,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_bodies() {
        let c = parse_settings(br#"{"enabled":true,"events":["call.update","group.flow","call.update"],"mediaBase64":true,"x":1}"#).unwrap();
        assert_eq!(c.events, vec![EventKind::CallUpdate, EventKind::GroupFlow]);
        let off =
            parse_settings(br#"{"enabled":false,"events":["call.update"],"mediaBase64":true}"#)
                .unwrap();
        assert!(off.events.is_empty() && !off.media_base64);
        for bad in [
            &br#"{}"#[..],
            br#"{"enabled":"true"}"#,
            br#"{"enabled":null}"#,
            br#"{"enabled":true,"events":null}"#,
            br#"{"enabled":true,"events":"call.update"}"#,
            br#"{"enabled":true,"events":[1]}"#,
            br#"{"enabled":true,"mediaBase64":null}"#,
            br#"[true]"#,
            br#"nope"#,
        ] {
            assert!(
                parse_settings(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
