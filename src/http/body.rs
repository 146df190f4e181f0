//! Reading what a request carries: its body (within a limit, after
//! authentication, as the contract orders the checks), its content type and
//! its path's `{instance}`.

use actix_web::http::header;
use actix_web::{web, HttpRequest};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;

use crate::error::ApiError;

/// Reads the request body up to `limit` bytes (413 beyond it). Called after
/// authentication, as the contract orders the checks.
pub async fn read_body(
    req: &HttpRequest,
    mut payload: web::Payload,
    limit: usize,
) -> Result<Bytes, ApiError> {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::PayloadTooLarge);
    }
    let mut body = BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk =
            chunk.map_err(|e| ApiError::invalid_body(format!("body could not be read: {e}")))?;
        if body.len() + chunk.len() > limit {
            return Err(ApiError::PayloadTooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// Whether the request declares a JSON body (`application/json`, parameters allowed).
pub fn is_json(req: &HttpRequest) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
}

/// Whether the request has no Content-Type at all.
pub fn has_no_content_type(req: &HttpRequest) -> bool {
    req.headers().get(header::CONTENT_TYPE).is_none()
}

/// The path's `{instance}` segment.
pub fn instance_param(req: &HttpRequest) -> String {
    req.match_info()
        .get("instance")
        .unwrap_or_default()
        .to_string()
}
