//! `GET /ws/:instance` (contract §6): every check before the upgrade, in the
//! contract's order, then a session actor joined to the instance's actor.

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};

use super::{instance_param, AppState};
use crate::auth::{self, query_values};
use crate::domain::{EventKind, EventSet};
use crate::error::ApiError;
use crate::instance::messages::Recovery;
use crate::instance::InstanceInfo;
use crate::ws::session::Session;
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

/// Parses `?recover=`, `?since=` and `?epoch=` (contract §12): `None` when
/// the client does not opt in to recovery.
pub fn parse_recovery(query: &str) -> Result<Option<Recovery>, ApiError> {
    let bad = |details: &str| Err(ApiError::invalid_body(details.to_string()));
    let recover = query_values(query, "recover");
    let since = query_values(query, "since");
    let epoch = query_values(query, "epoch");
    let recover = match recover.first().map(String::as_str) {
        _ if recover.len() > 1 => return bad("`recover` may be given once"),
        None => None,
        Some("true") => Some(true),
        Some("false") => Some(false),
        Some(_) => return bad("`recover` must be true or false"),
    };
    if since.len() > 1 || epoch.len() > 1 {
        return bad("`since` and `epoch` may be given once");
    }
    let since = match since.first() {
        None => None,
        Some(s) if (1..=19).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit()) => {
            match s.parse::<u64>() {
                Ok(n) => Some(n),
                Err(_) => return bad("`since` must be 1-19 decimal digits"),
            }
        }
        Some(_) => return bad("`since` must be 1-19 decimal digits"),
    };
    let since = match (since, epoch.into_iter().next()) {
        (Some(since), Some(epoch)) => Some((epoch, since)),
        (None, None) => None,
        _ => return bad("`since` and `epoch` go together"),
    };
    match (recover, since) {
        (Some(false), Some(_)) => bad("`since` and `epoch` need recover=true"),
        (Some(false), None) | (None, None) => Ok(None),
        (_, since) => Ok(Some(Recovery { since })),
    }
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
    let recovery = parse_recovery(req.query_string()).map_err(refused)?;
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
    let addr = state
        .registry
        .get_or_start(InstanceInfo::from(&instance), instance.config.clone());
    let mut session = Session::new(addr, narrowing, slot);
    if let Some(recovery) = recovery {
        session = session.recovering(recovery);
    }
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

    #[test]
    fn recovery_queries() {
        let since = |e: &str, n: u64| {
            Some(Recovery {
                since: Some((e.to_string(), n)),
            })
        };
        assert_eq!(parse_recovery("").unwrap(), None);
        assert_eq!(parse_recovery("recover=false").unwrap(), None);
        assert_eq!(
            parse_recovery("recover=true").unwrap(),
            Some(Recovery { since: None })
        );
        assert_eq!(
            parse_recovery("recover=true&epoch=ab&since=7").unwrap(),
            since("ab", 7)
        );
        assert_eq!(parse_recovery("epoch=&since=0").unwrap(), since("", 0));
        assert_eq!(
            parse_recovery("since=9999999999999999999&epoch=x").unwrap(),
            since("x", 9_999_999_999_999_999_999)
        );
        for bad in [
            "recover=yes",
            "recover=",
            "recover=TRUE",
            "recover=true&recover=false",
            "since=1",
            "epoch=x",
            "recover=true&since=1",
            "recover=true&epoch=x",
            "recover=false&since=1&epoch=x",
            "since=-1&epoch=x",
            "since=+1&epoch=x",
            "since=&epoch=x",
            "since=1.0&epoch=x",
            "since=12345678901234567890&epoch=x",
            "since=1&since=2&epoch=x",
        ] {
            assert!(parse_recovery(bad).is_err(), "{bad}");
        }
    }
}
