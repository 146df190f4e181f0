//! Error kinds of the REST API and their replies (contract §2–§9), and the
//! internal errors behind a 500.
//!
//! An `ApiError` carries the exact `error.message` literal and status a client
//! matches on; an optional `details` explains it to a human. Internal causes
//! are logged here, once, and never sent.

use actix_web::http::{header, StatusCode};
use actix_web::{HttpResponse, ResponseError};
use serde_json::json;

use crate::storage::StorageError;

/// Every error reply the API gives. `message()` is the contract literal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiError {
    MissingToken,
    InvalidToken,
    InstanceTokenMismatch,
    InstanceNotFound,
    WebSocketNotConfigured,
    WebSocketNotEnabled {
        instance: String,
    },
    OriginNotAllowed,
    UpgradeExpected,
    InvalidBody {
        details: Option<String>,
    },
    PayloadTooLarge,
    InstanceExists,
    TokenInUse,
    RateLimited {
        retry_after_secs: u64,
    },
    ShuttingDown,
    TooManyConnections {
        details: String,
    },
    NodeFull,
    NotFound,
    MethodNotAllowed {
        allow: &'static str,
    },
    /// A storage failure on a path whose contract names its own 500 message.
    Storage {
        message: &'static str,
    },
    Internal,
}

impl ApiError {
    /// A 400 with a human explanation of what was wrong.
    pub fn invalid_body(details: impl Into<String>) -> Self {
        ApiError::InvalidBody {
            details: Some(details.into()),
        }
    }

    /// Logs an internal cause and turns it into the given contract 500.
    pub fn storage(message: &'static str, cause: &dyn std::fmt::Display) -> Self {
        log::error!("storage failure ({message}): {cause}");
        ApiError::Storage { message }
    }

    /// Logs an internal cause and turns it into the generic 500.
    pub fn internal(cause: &dyn std::fmt::Display) -> Self {
        log::error!("internal error: {cause}");
        ApiError::Internal
    }

    /// The contract's `error.message`.
    pub fn message(&self) -> String {
        match self {
            ApiError::MissingToken => {
                "Missing token in header, Authorization header, or query parameter".into()
            }
            ApiError::InvalidToken => "Invalid token".into(),
            ApiError::InstanceTokenMismatch => "Instance token does not match this instance".into(),
            ApiError::InstanceNotFound => "Instance not found".into(),
            ApiError::WebSocketNotConfigured => "WebSocket not configured for this instance".into(),
            ApiError::WebSocketNotEnabled { instance } => format!(
                "WebSocket is not enabled for this instance. Configure it first using POST /api/events/websocket/{instance}"
            ),
            ApiError::OriginNotAllowed => "Origin not allowed".into(),
            ApiError::UpgradeExpected => "WebSocket upgrade expected".into(),
            ApiError::InvalidBody { .. } => "Invalid request body".into(),
            ApiError::PayloadTooLarge => "Payload too large".into(),
            ApiError::InstanceExists => "Instance already exists".into(),
            ApiError::TokenInUse => "Token already in use".into(),
            ApiError::RateLimited { .. } => "Rate limit exceeded. Try again later.".into(),
            ApiError::ShuttingDown => "Server is shutting down".into(),
            ApiError::TooManyConnections { .. } => "Too many connections".into(),
            ApiError::NodeFull => "Server at capacity".into(),
            ApiError::NotFound => "Not found".into(),
            ApiError::MethodNotAllowed { .. } => "Method not allowed".into(),
            ApiError::Storage { message } => (*message).into(),
            ApiError::Internal => "Internal server error".into(),
        }
    }

    fn details(&self) -> Option<&str> {
        match self {
            ApiError::InvalidBody { details } => details.as_deref(),
            ApiError::TooManyConnections { details } => Some(details),
            _ => None,
        }
    }

    /// A short machine-readable name, used as a metrics label.
    pub fn reason(&self) -> &'static str {
        match self {
            ApiError::MissingToken => "missing_token",
            ApiError::InvalidToken => "invalid_token",
            ApiError::InstanceTokenMismatch => "forbidden",
            ApiError::InstanceNotFound => "instance_not_found",
            ApiError::WebSocketNotConfigured => "not_configured",
            ApiError::WebSocketNotEnabled { .. } => "not_enabled",
            ApiError::OriginNotAllowed => "origin",
            ApiError::UpgradeExpected => "not_upgrade",
            ApiError::InvalidBody { .. } => "invalid_body",
            ApiError::PayloadTooLarge => "too_large",
            ApiError::InstanceExists => "exists",
            ApiError::TokenInUse => "token_in_use",
            ApiError::RateLimited { .. } => "rate_limited",
            ApiError::ShuttingDown => "shutting_down",
            ApiError::TooManyConnections { .. } => "connection_limit",
            ApiError::NodeFull => "node_full",
            ApiError::NotFound => "not_found",
            ApiError::MethodNotAllowed { .. } => "method",
            ApiError::Storage { .. } | ApiError::Internal => "internal",
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message())
    }
}

impl From<StorageError> for ApiError {
    fn from(e: StorageError) -> Self {
        ApiError::internal(&e)
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::MissingToken | ApiError::InvalidToken => StatusCode::UNAUTHORIZED,
            ApiError::InstanceTokenMismatch | ApiError::OriginNotAllowed => StatusCode::FORBIDDEN,
            ApiError::InstanceNotFound | ApiError::WebSocketNotConfigured | ApiError::NotFound => {
                StatusCode::NOT_FOUND
            }
            ApiError::WebSocketNotEnabled { .. }
            | ApiError::UpgradeExpected
            | ApiError::InvalidBody { .. } => StatusCode::BAD_REQUEST,
            ApiError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::InstanceExists | ApiError::TokenInUse => StatusCode::CONFLICT,
            ApiError::RateLimited { .. } | ApiError::TooManyConnections { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            ApiError::ShuttingDown | ApiError::NodeFull => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Storage { .. } | ApiError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
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
