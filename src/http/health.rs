//! `GET /healthz`, `/readyz`, `/metrics` and `/openapi.yaml`: no token, no rate limit.

use std::time::Duration;

use actix_web::{web, HttpResponse};
use serde_json::json;

use super::AppState;
use crate::error::ApiError;

/// How long `/readyz` waits for the database.
const READY_TIMEOUT: Duration = Duration::from_secs(2);

/// The OpenAPI document of the REST API.
pub const OPENAPI: &str = include_str!("../../openapi.yaml");

/// 200 while the process runs.
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({"success": true, "message": "ok"}))
}

fn not_ready(reason: &str) -> HttpResponse {
    HttpResponse::ServiceUnavailable().json(json!({
        "success": false,
        "error": {"message": "Not ready", "details": reason},
    }))
}

/// 200 when storage (and, in cluster mode, the bus) is reachable; 503 otherwise
/// and while shutting down.
pub async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    if state.is_shutting_down() {
        return not_ready("shutting down");
    }
    let pool = state.pool.clone();
    let check = web::block(move || -> Result<(), (&'static str, String)> {
        let unreachable = |e: String| ("storage unreachable", e);
        let mut conn = pool
            .get_timeout(READY_TIMEOUT)
            .map_err(|e| unreachable(e.to_string()))?;
        crate::storage::ping(&mut conn).map_err(|e| unreachable(e.to_string()))?;
        crate::storage::file_present(&mut conn)
            .map_err(|e| ("storage file is gone", e.to_string()))?;
        crate::storage::schema_present(&mut conn)
            .map_err(|e| ("storage has lost its tables", e.to_string()))
    });
    match tokio::time::timeout(READY_TIMEOUT * 2, check).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err((reason, e)))) => {
            log::warn!("readiness: {reason}: {e}");
            return not_ready(reason);
        }
        _ => return not_ready("storage unreachable"),
    }
    if let Err(reason) = state.bus.readiness() {
        return not_ready(reason);
    }
    HttpResponse::Ok().json(json!({"success": true, "message": "ready"}))
}

/// Prometheus text format.
pub async fn metrics(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let text = state.metrics.render().map_err(ApiError::internal)?;
    Ok(HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(text))
}

/// The OpenAPI document.
pub async fn openapi() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/yaml")
        .body(OPENAPI)
}
