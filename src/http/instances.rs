//! `POST /api/instance/new`, `GET /api/instance/list`,
//! `DELETE /api/instance/delete/:instance` (contract §8).

use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::{json, Map, Value};

use super::{instance_param, is_json, read_body, AppState};
use crate::auth::{self, Principal, Scope};
use crate::domain::{InstanceName, WsConfig};
use crate::error::ApiError;
use crate::http::websocket::parse_events;
use crate::instance::Change;
use crate::storage;
use crate::storage::instances::{CreateError, InstanceRecord};
use crate::webhook::EnabledWebhook;

/// The body of `POST /api/instance/new`, validated.
#[derive(Debug)]
pub struct NewInstance {
    pub name: InstanceName,
    pub token: Option<String>,
    pub config: Option<WsConfig>,
}

pub fn parse_new_instance(body: &[u8]) -> Result<NewInstance, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid_body(format!("body is not valid JSON: {e}")))?;
    let Value::Object(fields) = value else {
        return Err(ApiError::invalid_body("body must be a JSON object"));
    };
    let name = match fields.get("name") {
        Some(Value::String(s)) => InstanceName::parse(s).ok_or_else(|| {
            ApiError::invalid_body(
                "`name` must be 1-64 characters of A-Z a-z 0-9 _ . -, starting with a letter or digit",
            )
        })?,
        _ => return Err(ApiError::invalid_body("`name` is required and must be a string")),
    };
    let token = match fields.get("token") {
        None => None,
        Some(Value::String(t)) if auth::is_valid_custom_token(t) => Some(t.clone()),
        Some(_) => {
            return Err(ApiError::invalid_body(
                "`token` must be 32-128 visible ASCII characters",
            ))
        }
    };
    let enabled = optional_bool(&fields, "websocketEnabled")?;
    let events = match fields.get("websocketEvents") {
        None => Vec::new(),
        Some(v) => parse_events(v, "websocketEvents")?,
    };
    let media = optional_bool(&fields, "websocketMediaBase64")?.unwrap_or(false);
    Ok(NewInstance {
        name,
        token,
        config: enabled.map(|enabled| WsConfig::normalized(enabled, events, media)),
    })
}

/// The `webhook*` block of `POST /api/instance/new` (contract §8): `None`
/// when `webhookEnabled` is absent (the other keys are still validated).
pub fn parse_new_webhook(
    body: &[u8],
    policy: &crate::webhook::address::AddressPolicy,
) -> Result<Option<crate::webhook::config::WebhookInput>, ApiError> {
    let Ok(Value::Object(fields)) = serde_json::from_slice::<Value>(body) else {
        return Err(ApiError::invalid_body("body must be a JSON object"));
    };
    crate::webhook::config::parse_fields(
        &fields,
        &crate::webhook::config::INSTANCE_KEYS,
        false,
        policy,
    )
    .map_err(|i| ApiError::invalid_body(i.details()))
}

/// A key that, when present, must be a boolean (`null` is not).
pub(super) fn optional_bool(
    fields: &Map<String, Value>,
    key: &str,
) -> Result<Option<bool>, ApiError> {
    match fields.get(key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(ApiError::invalid_body(format!("`{key}` must be a boolean"))),
    }
}

fn config_json(rec: &InstanceRecord) -> Value {
    match &rec.config {
        Some(c) => json!(c.config),
        None => Value::Null,
    }
}

/// `POST /api/instance/new`: TokenAccount only.
pub async fn create(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let token = auth::required(auth::request_token(&req))?;
    let access = state
        .db(move |conn| auth::authorize(conn, &token, Scope::AccountOnly))
        .await?;
    let body = read_body(&req, payload, state.settings.limits.body_bytes).await?;
    if !is_json(&req) {
        return Err(ApiError::invalid_body(
            "Content-Type must be application/json",
        ));
    }
    let new = parse_new_instance(&body)?;
    let webhook = parse_new_webhook(&body, &super::webhooks::address_policy(&state))?;
    let account = access.principal.account();
    let token = new.token.unwrap_or_else(auth::generate_token);
    let hook = webhook.map(|input| super::webhooks::new_config(&state, input));
    // One transaction stores the instance, its WebSocket configuration and
    // its webhook (all or nothing), and reads the webhook back.
    let (record, webhook) = state
        .db(move |conn| {
            let hash = auth::token_hash(&token);
            storage::instances::create(
                conn,
                account,
                &new.name,
                &token,
                &hash,
                new.config.as_ref(),
                hook.as_ref(),
            )
            .map_err(|e| match e {
                CreateError::NameTaken => ApiError::InstanceExists,
                CreateError::TokenTaken => ApiError::TokenInUse,
                CreateError::Storage(e) => ApiError::from(e),
            })
        })
        .await?;
    let webhook = match webhook {
        Some(row) => {
            // A new instance has no other webhook: what is enabled is known
            // without a read, and stands from now (its ticket is taken after
            // the commit, so no read that missed the row can replace it).
            let enabled: Vec<EnabledWebhook> = EnabledWebhook::of(&row).into_iter().collect();
            state
                .registry
                .webhooks()
                .set_now(record.id, enabled.clone());
            state.registry.tell_others(&Change::Webhooks {
                instance: record.id,
                enabled,
            });
            super::webhooks::webhook_json(&row, &super::webhooks::sealer(&state), None)
        }
        None => Value::Null,
    };
    log::info!("instance={} created", record.name);
    Ok(HttpResponse::Created().json(json!({
        "success": true,
        "message": "Instance created",
        "instance": {
            "name": record.name,
            "token": record.token,
            "websocket": config_json(&record),
            "webhook": webhook,
        }
    })))
}

/// `GET /api/instance/list`: the account's instances, or the caller's own one.
pub async fn list(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let token = auth::required(auth::request_token(&req))?;
    let (principal, records) = state
        .db(move |conn| {
            let access = auth::authorize(conn, &token, Scope::AnyToken)?;
            let records = match &access.principal {
                Principal::Account(account) => storage::instances::list(conn, *account)?,
                Principal::Instance(own) => vec![own.clone()],
            };
            Ok::<_, ApiError>((access.principal, records))
        })
        .await?;
    let ids: Vec<_> = records.iter().map(|r| r.id).collect();
    let defaults = state
        .db(move |conn| storage::webhooks::defaults_of(conn, &ids))
        .await?;
    let sealer = super::webhooks::sealer(&state);
    let show_token = matches!(principal, Principal::Account(_));
    let mut instances = Vec::with_capacity(records.len());
    for rec in &records {
        let mut item = json!({
            "name": rec.name,
            "websocket": config_json(rec),
            "webhook": defaults
                .iter()
                .find(|w| w.instance_id == rec.id.0)
                .map_or(Value::Null, |w| super::webhooks::webhook_json(w, &sealer, None)),
            "connectedClients": state.registry.connected(rec.id).await,
        });
        if show_token {
            item["token"] = json!(rec.token);
        }
        instances.push(item);
    }
    let message = match records.len() {
        1 => "1 Instance found".to_string(),
        n => format!("{n} Instances found"),
    };
    Ok(HttpResponse::Ok().json(json!({
        "success": true,
        "message": message,
        "instances": instances,
    })))
}

/// `DELETE /api/instance/delete/:instance`: TokenAccount only.
pub async fn delete(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let token = auth::required(auth::request_token(&req))?;
    let name = instance_param(&req);
    let deleted = state
        .db(move |conn| {
            let access = auth::authorize(
                conn,
                &token,
                Scope::Instance {
                    name: &name,
                    account_only: true,
                },
            )?;
            let account = access.principal.account();
            storage::instances::delete(conn, account, &name)?.ok_or(ApiError::InstanceNotFound)
        })
        .await?;
    state.registry.change(Change::Deleted {
        instance: deleted.id,
    });
    log::info!("instance={} deleted", deleted.name);
    Ok(HttpResponse::Ok().json(json!({
        "success": true,
        "message": "Instance deleted",
        "instance": {"status": "deleted"},
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_instance_bodies() {
        let ok = parse_new_instance(br#"{"name":"a-1","websocketEnabled":true,"websocketEvents":["call.update","call.update"]}"#).unwrap();
        assert_eq!(ok.config.unwrap().events.len(), 1);
        let none = parse_new_instance(br#"{"name":"a","websocketMediaBase64":true}"#).unwrap();
        assert!(none.config.is_none());
        for bad in [
            &br#"{"name":"-a"}"#[..],
            br#"{"name":5}"#,
            br#"{}"#,
            br#"[]"#,
            br#"{"name":"a","token":"short"}"#,
            br#"{"name":"a","websocketEnabled":null}"#,
            br#"{"name":"a","websocketEvents":["nope"]}"#,
            br#"{"name":"a","websocketMediaBase64":"yes"}"#,
        ] {
            assert!(
                parse_new_instance(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
