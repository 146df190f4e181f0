//! `GET /ws/:instance` (contract §6): every check before the upgrade, in the
//! contract's order, then a session actor joined to the instance's actor.

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};

use super::{instance_param, AppState};
use crate::auth::{self, query_values};
use crate::domain::{EventKind, EventSet};
use crate::error::ApiError;
use crate::instance::InstanceInfo;
use crate::ws::session::{Session, SessionLimits};
use crate::ws::upgrade;

/// Parses every `?events=` value (comma-separated, repeatable); empty = no narrowing.
pub fn parse_narrowing(query: &str) -> Result<EventSet, ApiError> {
    let mut kinds = Vec::new();
    for value in query_values(query, "events") {
        for name in value.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let kind = EventKind::parse(name).ok_or_else(|| {
                ApiError::invalid_body(format!("`events` has an unknown event name: {name}"))
            })?;
            kinds.push(kind);
        }
    }
    Ok(EventSet::of(&kinds))
}

/// `GET /ws/:instance`.
pub async fn connect(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let refused = |e: ApiError| {
        state
            .metrics
            .upgrades
            .with_label_values(&[e.reason()])
            .inc();
        e
    };
    if state.is_shutting_down() {
        return Err(refused(ApiError::ShuttingDown));
    }
    let access = state
        .authorize_instance(auth::request_token(&req), instance_param(&req), false)
        .await
        .map_err(refused)?;
    let instance = access
        .instance
        .ok_or(ApiError::InstanceNotFound)
        .map_err(refused)?;
    let origin = req
        .headers()
        .get(header::ORIGIN)
        .map(|v| v.to_str().unwrap_or("\u{0}"));
    if !state.origins.read().allows(origin) {
        return Err(refused(ApiError::OriginNotAllowed));
    }
    let narrowing = parse_narrowing(req.query_string()).map_err(refused)?;
    if !instance.config.as_ref().is_some_and(|c| c.config.enabled) {
        return Err(refused(ApiError::WebSocketNotEnabled {
            instance: instance.name.clone(),
        }));
    }
    if !upgrade::is_handshake(&req) {
        return Err(refused(ApiError::UpgradeExpected));
    }
    let slot = state
        .connections
        .acquire(instance.id, instance.account)
        .map_err(refused)?;
    let ws = &state.settings.ws;
    let limits = SessionLimits::from_settings(ws);
    let info = InstanceInfo {
        id: instance.id,
        account: instance.account,
        name: instance.name.clone(),
        token: instance.token.clone(),
    };
    let addr = state.registry.get_or_start(info, instance.config.clone());
    let session = Session::new(
        addr,
        instance.name,
        narrowing,
        limits,
        state.metrics.clone(),
        slot,
    );
    let reply = upgrade::accept(&req, session, ws.max_message_bytes).map_err(refused)?;
    state
        .metrics
        .upgrades
        .with_label_values(&["accepted"])
        .inc();
    Ok(reply)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn narrowing() {
        assert_eq!(parse_narrowing("").unwrap(), EventSet::default());
        assert_eq!(parse_narrowing("events=").unwrap(), EventSet::default());
        let set = parse_narrowing("events=call.update,group.flow&events=label.update").unwrap();
        assert!(set.allows(EventKind::LabelUpdate) && !set.allows(EventKind::MessageStatus));
        assert!(parse_narrowing("events=call.update,nope").is_err());
    }
}
