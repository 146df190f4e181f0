//! Error kinds of the REST API and their replies (contract §2–§9), and the
//! internal causes behind a 500.
//!
//! Each `ApiError` variant carries its contract `error.message` literal in
//! its `#[error]` attribute (that is its `Display`); [`ApiError::class`] maps
//! it to a status and a metrics label in one place. An optional `details`
//! explains a refusal to a human. Internal causes ride along as `#[source]`
//! and are logged once, when the reply is built ([`ResponseError`]), never
//! sent.

use actix_web::http::{header, StatusCode};
use actix_web::{HttpResponse, ResponseError};
use serde_json::json;

use crate::storage::StorageError;

/// An internal cause of a 500, for the log only.
pub type Cause = Box<dyn std::error::Error + Send + Sync>;

/// Every error reply the API gives. Its `Display` is the contract literal.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("Missing token in header, Authorization header, or query parameter")]
    MissingToken,
    #[error("Invalid token")]
    InvalidToken,
    #[error("Instance token does not match this instance")]
    InstanceTokenMismatch,
    #[error("Instance not found")]
    InstanceNotFound,
    #[error("WebSocket not configured for this instance")]
    WebSocketNotConfigured,
    #[error("WebSocket is not enabled for this instance. Configure it first using POST /api/events/websocket/{instance}")]
    WebSocketNotEnabled { instance: String },
    #[error("Origin not allowed")]
    OriginNotAllowed,
    #[error("WebSocket upgrade expected")]
    UpgradeExpected,
    #[error("Invalid request body")]
    InvalidBody { details: Option<String> },
    #[error("Payload too large")]
    PayloadTooLarge,
    #[error("Instance already exists")]
    InstanceExists,
    #[error("Token already in use")]
    TokenInUse,
    #[error("Rate limit exceeded. Try again later.")]
    RateLimited { retry_after_secs: u64 },
    #[error("Server is shutting down")]
    ShuttingDown,
    #[error("Too many connections")]
    TooManyConnections { details: String },
    #[error("Server at capacity")]
    NodeFull,
    #[error("Not found")]
    NotFound,
    #[error("Method not allowed")]
    MethodNotAllowed { allow: &'static str },
    // Webhooks (contract §11).
    #[error("Webhook not found")]
    WebhookNotFound,
    #[error("Maximum of 3 enabled webhooks per instance")]
    TooManyWebhooks,
    /// A storage failure on a path whose contract names its own 500 message.
    #[error("{message}")]
    Storage {
        message: &'static str,
        #[source]
        cause: StorageError,
    },
    /// Anything unexpected: the generic 500.
    #[error("Internal server error")]
    Internal(#[source] Cause),
}

impl ApiError {
    /// A 400 with a human explanation of what was wrong.
    pub fn invalid_body(details: impl Into<String>) -> Self {
        ApiError::InvalidBody {
            details: Some(details.into()),
        }
    }

    /// Turns a storage failure into the contract's 500 `message` (for `map_err`).
    pub fn storage(message: &'static str) -> impl FnOnce(StorageError) -> ApiError {
        move |cause| ApiError::Storage { message, cause }
    }

    /// The generic 500 for an unexpected cause.
    pub fn internal(cause: impl Into<Cause>) -> Self {
        ApiError::Internal(cause.into())
    }

    /// The contract's `error.message`.
    pub fn message(&self) -> String {
        self.to_string()
    }

    /// The status of the reply and a short machine-readable name (a metrics label).
    pub fn class(&self) -> (StatusCode, &'static str) {
        use StatusCode as S;
        match self {
            ApiError::MissingToken => (S::UNAUTHORIZED, "missing_token"),
            ApiError::InvalidToken => (S::UNAUTHORIZED, "invalid_token"),
            ApiError::InstanceTokenMismatch => (S::FORBIDDEN, "forbidden"),
            ApiError::InstanceNotFound => (S::NOT_FOUND, "instance_not_found"),
            ApiError::WebSocketNotConfigured => (S::NOT_FOUND, "not_configured"),
            ApiError::WebSocketNotEnabled { .. } => (S::BAD_REQUEST, "not_enabled"),
            ApiError::OriginNotAllowed => (S::FORBIDDEN, "origin"),
            ApiError::UpgradeExpected => (S::BAD_REQUEST, "not_upgrade"),
            ApiError::InvalidBody { .. } => (S::BAD_REQUEST, "invalid_body"),
            ApiError::PayloadTooLarge => (S::PAYLOAD_TOO_LARGE, "too_large"),
            ApiError::InstanceExists => (S::CONFLICT, "exists"),
            ApiError::TokenInUse => (S::CONFLICT, "token_in_use"),
            ApiError::RateLimited { .. } => (S::TOO_MANY_REQUESTS, "rate_limited"),
            ApiError::ShuttingDown => (S::SERVICE_UNAVAILABLE, "shutting_down"),
            ApiError::TooManyConnections { .. } => (S::TOO_MANY_REQUESTS, "connection_limit"),
            ApiError::NodeFull => (S::SERVICE_UNAVAILABLE, "node_full"),
            ApiError::NotFound => (S::NOT_FOUND, "not_found"),
            ApiError::MethodNotAllowed { .. } => (S::METHOD_NOT_ALLOWED, "method"),
            ApiError::WebhookNotFound => (S::NOT_FOUND, "webhook_not_found"),
            ApiError::TooManyWebhooks => (S::CONFLICT, "too_many_webhooks"),
            ApiError::Storage { .. } | ApiError::Internal(_) => {
                (S::INTERNAL_SERVER_ERROR, "internal")
            }
        }
    }

    /// A short machine-readable name, used as a metrics label.
    pub fn reason(&self) -> &'static str {
        self.class().1
    }

    fn details(&self) -> Option<&str> {
        match self {
            ApiError::InvalidBody { details } => details.as_deref(),
            ApiError::TooManyConnections { details } => Some(details),
            _ => None,
        }
    }
}

impl From<StorageError> for ApiError {
    fn from(e: StorageError) -> Self {
        ApiError::Internal(Box::new(e))
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.class().0
    }

    fn error_response(&self) -> HttpResponse {
        if let Some(cause) = std::error::Error::source(self) {
            log::error!("{self}: {cause}");
        }
        let mut error = json!({ "message": self.message() });
        if let Some(details) = self.details() {
            error["details"] = json!(details);
        }
        let mut reply = HttpResponse::build(self.status_code());
        match self {
            ApiError::RateLimited { retry_after_secs } => {
                reply.insert_header((header::RETRY_AFTER, retry_after_secs.max(&1).to_string()));
            }
            ApiError::MethodNotAllowed { allow } => {
                reply.insert_header((header::ALLOW, *allow));
            }
            _ => {}
        }
        reply.json(json!({ "success": false, "error": error }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_and_statuses_stay_as_the_contract_writes_them() {
        let not_enabled = ApiError::WebSocketNotEnabled {
            instance: "sales-1".into(),
        };
        assert_eq!(
            not_enabled.message(),
            "WebSocket is not enabled for this instance. Configure it first using POST /api/events/websocket/sales-1"
        );
        assert_eq!(not_enabled.status_code(), StatusCode::BAD_REQUEST);
        let failed =
            ApiError::storage("Failed to get instance")(StorageError::Connection("refused".into()));
        assert_eq!(failed.message(), "Failed to get instance");
        assert_eq!(failed.status_code(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(
            ApiError::internal("boom").message(),
            "Internal server error"
        );
    }
}
