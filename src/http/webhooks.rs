//! The webhook endpoints (contract §11): set (upsert by label), get (and its
//! alias), delete, the dead letters (`/failed`, paged) and their replay
//! (`/retry`). Each persists first, then tells every node what changed
//! through `Registry::change`. Instance creation stores its `default`
//! webhook in its own transaction, with a configuration made by
//! [`new_config`].

use std::collections::HashMap;

use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::{json, Map, Value};

use super::{has_no_content_type, is_json, read_body, AppState};
use crate::domain::{EventKind, InstanceId};
use crate::error::ApiError;
use crate::events::{envelope, instance_data_json, Event};
use crate::instance::Change;
use crate::storage::deliveries::{self, PageStart};
use crate::storage::instances::InstanceRecord;
use crate::storage::webhooks::{self, Counts, NewConfig, SetError, WebhookRow};
use crate::storage::{self, now_millis, StorageError};
use crate::webhook::address::AddressPolicy;
use crate::webhook::config::{
    is_valid_label, label_or_default, parse_fields, WebhookInput, DEFAULT_LABEL, SET_KEYS,
};
use crate::webhook::sealing::Sealer;
use crate::webhook::signature::{delivery_id_time, is_delivery_id, new_secret};
use crate::webhook::worker::read_enabled;

/// 500 message of the set endpoint.
const SET_FAILED: &str = "Failed to get instance";
/// 500 message of the read endpoints.
const GET_FAILED: &str = "Failed to get webhook configuration";

/// Default and largest page of `/failed`.
const DEFAULT_PAGE: i64 = 100;
const MAX_PAGE: i64 = 1000;

/// The refused-address rule in force.
pub fn address_policy(state: &AppState) -> AddressPolicy {
    AddressPolicy::new(&state.settings.webhook.allowed_networks)
}

/// The codec of secrets at rest (the key was validated with the settings).
pub fn sealer(state: &AppState) -> Sealer {
    Sealer::new(&state.settings.webhook.encryption_key).unwrap_or_default()
}

/// A webhook as replied: its configuration with secrets shown decrypted,
/// and `stats` when given.
pub fn webhook_json(row: &WebhookRow, sealer: &Sealer, stats: Option<Counts>) -> Value {
    let events: Vec<&str> = row
        .event_kinds()
        .into_iter()
        .map(EventKind::as_str)
        .collect();
    let mut out = json!({
        "label": row.label,
        "enabled": row.enabled,
        "url": row.url,
        "authorization": row.auth_header.as_deref().map(|a| sealer.show(a)),
        "byEvents": row.by_events,
        "events": events,
        "mediaBase64": row.media_base64,
        "ordered": row.ordered,
        "secret": sealer.show(&row.secret),
    });
    if let Some(c) = stats {
        out["stats"] = json!({
            "pending": c.pending,
            "failed": c.failed,
            "delivered": row.delivered,
            "lastSuccessAt": row.last_success_at,
            "lastFailureAt": row.last_failure_at,
            "lastError": row.last_error,
        });
    }
    out
}

/// What storing a validated configuration writes: secrets sealed, and a
/// new secret for a new label or a rotation.
pub fn new_config(state: &AppState, input: WebhookInput) -> NewConfig {
    let sealer = sealer(state);
    let c = input.config;
    NewConfig {
        label: c.label,
        enabled: c.enabled,
        url: c.url,
        auth_header: c.authorization.as_deref().map(|a| sealer.seal(a)),
        by_events: c.by_events,
        events: c.events,
        media_base64: c.media_base64,
        ordered: c.ordered,
        new_secret: sealer.seal(&new_secret()),
        rotate_secret: input.rotate_secret,
    }
}

/// Stores a validated configuration for the instance and tells every node
/// which of its webhooks are enabled now.
async fn store(
    state: &AppState,
    instance: InstanceId,
    input: WebhookInput,
) -> Result<WebhookRow, ApiError> {
    let new = new_config(state, input);
    let hold_ms = crate::webhook::worker::ordered_hold_ms(&state.settings.webhook);
    // Every storage failure, the connection's checkout too, is `SET_FAILED`.
    let hooks = state.registry.webhooks().clone();
    let (row, enabled, killed) = state
        .db(move |conn| {
            let stored = webhooks::upsert(conn, instance, &new, hold_ms).map_err(|e| match e {
                SetError::TooManyEnabled => ApiError::TooManyWebhooks,
                SetError::Storage(cause) => ApiError::Storage {
                    message: SET_FAILED,
                    cause,
                },
            });
            Ok::<_, StorageError>(stored.and_then(|(row, killed)| {
                let enabled =
                    read_enabled(conn, &hooks, instance).map_err(ApiError::storage(SET_FAILED))?;
                Ok((row, enabled, killed))
            }))
        })
        .await
        .map_err(ApiError::storage(SET_FAILED))??;
    state
        .metrics
        .webhook_deliveries
        .with_label_values(&["dead_letter"])
        .inc_by(killed as u64);
    state
        .registry
        .tell_others(&Change::Webhooks { instance, enabled });
    if !row.enabled {
        state.registry.webhooks().ring();
    }
    Ok(row)
}

fn json_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid_body(format!("body is not valid JSON: {e}")))?;
    match value {
        Value::Object(fields) => Ok(fields),
        _ => Err(ApiError::invalid_body("body must be a JSON object")),
    }
}

/// `POST /api/events/webhook/:instance`.
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
    let fields = json_object(&body)?;
    let input = parse_fields(&fields, &SET_KEYS, true, &address_policy(&state))
        .map_err(|i| ApiError::invalid_body(i.details()))?
        .ok_or_else(|| ApiError::invalid_body("`enabled` is required"))?;
    let row = store(&state, instance.id, input).await?;
    log::info!(
        "instance={} webhook {} configured (enabled={})",
        instance.name,
        row.label,
        row.enabled
    );
    Ok(HttpResponse::Ok().json(json!({
        "success": true,
        "message": "Webhook configured successfully",
        "webhook": webhook_json(&row, &sealer(&state), None),
    })))
}

/// The query string's pairs (an unparsable one counts as empty).
fn query(req: &HttpRequest) -> HashMap<String, String> {
    serde_urlencoded::from_str::<Vec<(String, String)>>(req.query_string())
        .unwrap_or_default()
        .into_iter()
        .collect()
}

/// `GET /api/events/getWebhook/:instance` and `GET /api/events/webhook/:instance`.
pub async fn get(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let instance = state.target_instance(&req, false, Some(GET_FAILED)).await?;
    let label = query(&req)
        .get("label")
        .map(|l| label_or_default(l).to_string());
    let id = instance.id;
    let (rows, counts) = state
        .db(move |conn| {
            webhooks::snapshot(conn, |conn| {
                let rows = match &label {
                    Some(l) if !is_valid_label(l) => Vec::new(),
                    Some(l) => webhooks::find(conn, id, l)?.into_iter().collect(),
                    None => webhooks::list(conn, id)?,
                };
                let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
                let counts = webhooks::counts(conn, &ids)?;
                Ok((rows, counts))
            })
        })
        .await
        .map_err(ApiError::storage(GET_FAILED))?;
    let sealer = sealer(&state);
    let with_stats = |row: &WebhookRow| {
        let c = counts
            .iter()
            .find(|c| c.webhook_id == row.id)
            .copied()
            .unwrap_or_default();
        webhook_json(row, &sealer, Some(c))
    };
    if query(&req).contains_key("label") {
        let row = rows.first().ok_or(ApiError::WebhookNotFound)?;
        return Ok(HttpResponse::Ok().json(json!({
            "success": true,
            "message": "Webhook retrieved",
            "webhook": with_stats(row),
        })));
    }
    let message = match rows.len() {
        1 => "1 Webhook found".to_string(),
        n => format!("{n} Webhooks found"),
    };
    let list: Vec<Value> = rows.iter().map(with_stats).collect();
    Ok(HttpResponse::Ok().json(json!({
        "success": true,
        "message": message,
        "webhooks": list,
    })))
}

/// `DELETE /api/events/webhook/:instance?label=<label>`.
pub async fn delete(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let instance = state.target_instance(&req, false, Some(GET_FAILED)).await?;
    let label = query(&req)
        .get("label")
        .map_or(DEFAULT_LABEL, |l| label_or_default(l))
        .to_string();
    let id = instance.id;
    let shown = label.clone();
    let hooks = state.registry.webhooks().clone();
    let (deleted, enabled) = state
        .db(move |conn| {
            let deleted = is_valid_label(&label) && webhooks::delete(conn, id, &label)?;
            let enabled = read_enabled(conn, &hooks, id)?;
            Ok::<_, storage::StorageError>((deleted, enabled))
        })
        .await
        .map_err(ApiError::storage(GET_FAILED))?;
    if !deleted {
        return Err(ApiError::WebhookNotFound);
    }
    state.registry.tell_others(&Change::Webhooks {
        instance: id,
        enabled,
    });
    log::info!("instance={} webhook {shown} deleted", instance.name);
    Ok(HttpResponse::Ok().json(json!({
        "success": true,
        "message": "Webhook deleted",
        "webhook": {"label": shown, "status": "deleted"},
    })))
}

/// The webhooks a `label` selects: that one (404 when unknown), or all.
fn select<'a>(
    rows: &'a [WebhookRow],
    label: Option<&str>,
) -> Result<Vec<&'a WebhookRow>, ApiError> {
    match label {
        None => Ok(rows.iter().collect()),
        Some(l) => {
            let l = label_or_default(l);
            rows.iter()
                .find(|r| r.label == l)
                .map(|r| vec![r])
                .ok_or(ApiError::WebhookNotFound)
        }
    }
}

/// The envelope a dead letter is (or would be) sent as.
fn dead_envelope(
    letter: &deliveries::DeadLetter,
    row: &WebhookRow,
    instance: &InstanceRecord,
    base_url: &str,
) -> Value {
    let data: Map<String, Value> = serde_json::from_str(&letter.data).unwrap_or_default();
    let Some(kind) = EventKind::parse(&letter.event) else {
        return Value::Null;
    };
    let idata = instance_data_json(base_url, &instance.name, &instance.token);
    let text = envelope(&Event { kind, data }, &idata, row.media_base64);
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

/// `GET /api/events/webhook/:instance/failed`.
pub async fn failed(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let instance = state.target_instance(&req, false, Some(GET_FAILED)).await?;
    let q = query(&req);
    let limit = match q.get("limit") {
        None => DEFAULT_PAGE,
        Some(l) => l
            .parse::<i64>()
            .ok()
            .filter(|n| (1..=MAX_PAGE).contains(n) && l.bytes().all(|b| b.is_ascii_digit()))
            .ok_or_else(|| ApiError::invalid_body("`limit` must be an integer from 1 to 1000"))?,
    };
    let after = match q.get("after") {
        None => None,
        Some(a) if is_delivery_id(a) => Some(a.clone()),
        Some(_) => {
            return Err(ApiError::invalid_body(
                "`after` must be a delivery id (msg_…)",
            ))
        }
    };
    let id = instance.id;
    let rows = state
        .db(move |conn| webhooks::list(conn, id))
        .await
        .map_err(ApiError::storage(GET_FAILED))?;
    let chosen = select(&rows, q.get("label").map(String::as_str))?;
    let ids: Vec<i64> = chosen.iter().map(|r| r.id).collect();
    let mut letters = state
        .db(move |conn| {
            let start = match &after {
                None => PageStart::AfterSeq(0),
                Some(a) => match (deliveries::seq_of(conn, a)?, delivery_id_time(a)) {
                    (Some(seq), _) => PageStart::AfterSeq(seq),
                    // Gone since: resume where it stood, by its time.
                    (None, Some(at)) => PageStart::Since(at),
                    (None, None) => return Ok(Vec::new()),
                },
            };
            deliveries::dead_letters(conn, &ids, start, limit + 1)
        })
        .await
        .map_err(ApiError::storage(GET_FAILED))?;
    let more = letters.len() as i64 > limit;
    letters.truncate(usize::try_from(limit).unwrap_or(0));
    let next = if more {
        letters.last().map(|l| l.id.clone())
    } else {
        None
    };
    let base_url = state.registry.env().base_url.clone();
    let items: Vec<Value> = letters
        .iter()
        .filter_map(|l| {
            let row = rows.iter().find(|r| r.id == l.webhook_id)?;
            Some(json!({
                "id": l.id,
                "label": row.label,
                "event": l.event,
                "attempts": l.attempts,
                "lastStatus": l.last_status,
                "lastError": l.last_error.clone().unwrap_or_default(),
                "createdAt": l.created_at,
                "lastAttemptAt": l.last_attempt_at,
                "envelope": dead_envelope(l, row, &instance, &base_url),
            }))
        })
        .collect();
    let message = match items.len() {
        1 => "1 failed delivery".to_string(),
        n => format!("{n} failed deliveries"),
    };
    Ok(HttpResponse::Ok().json(json!({
        "success": true,
        "message": message,
        "deliveries": items,
        "next": next,
    })))
}

/// `POST /api/events/webhook/:instance/retry`.
pub async fn retry(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let instance = state.target_instance(&req, false, Some(GET_FAILED)).await?;
    let body = read_body(&req, payload, state.settings.limits.body_bytes).await?;
    let fields = if body.iter().all(u8::is_ascii_whitespace) {
        Map::new()
    } else {
        if !(is_json(&req) || has_no_content_type(&req)) {
            return Err(ApiError::invalid_body(
                "Content-Type must be application/json",
            ));
        }
        json_object(&body)?
    };
    let label = match fields.get("label") {
        None => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(ApiError::invalid_body("`label` must be a string")),
    };
    let ids = match fields.get("ids") {
        None => None,
        Some(Value::Array(items)) => Some(
            items
                .iter()
                .map(|i| i.as_str().map(String::from))
                .collect::<Option<Vec<String>>>()
                .ok_or_else(|| ApiError::invalid_body("`ids` must be a list of strings"))?,
        ),
        Some(_) => return Err(ApiError::invalid_body("`ids` must be a list of strings")),
    };
    let id = instance.id;
    let rows = state
        .db(move |conn| webhooks::list(conn, id))
        .await
        .map_err(ApiError::storage(GET_FAILED))?;
    let hooks: Vec<i64> = select(&rows, label.as_deref())?
        .into_iter()
        .filter(|r| r.enabled)
        .map(|r| r.id)
        .collect();
    let requeued = state
        .db(move |conn| deliveries::requeue(conn, &hooks, ids.as_deref(), now_millis()))
        .await
        .map_err(ApiError::storage(GET_FAILED))?;
    if requeued > 0 {
        state.registry.change(Change::WebhooksDue { instance: id });
    }
    Ok(HttpResponse::Accepted().json(json!({
        "success": true,
        "message": "Deliveries requeued",
        "requeued": requeued,
    })))
}
