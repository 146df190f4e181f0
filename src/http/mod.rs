//! The HTTP surface: routes, the shared state handlers see, and the helpers
//! every handler uses (storage off the worker thread, body limits, the
//! contract's 404/405 replies). Handlers live in one file per resource.

pub mod connect;
// The console (contract §13).
pub mod console;
#[cfg(feature = "test-echo")]
pub mod echo;
pub mod health;
pub mod instances;
pub mod publish;
pub mod websocket;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header;
use actix_web::middleware::{from_fn, Next};
use actix_web::{web, Error, HttpRequest};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use parking_lot::RwLock;

use crate::auth::cache::CacheKey;
use crate::auth::{self, Access, AccessCache, Scope};
use crate::bus::{Bus, Control};
use crate::domain::{InstanceId, VersionedConfig};
use crate::error::ApiError;
use crate::instance::messages::{Deleted, UpdateSettings};
use crate::instance::Registry;
use crate::metrics::Metrics;
use crate::settings::Settings;
use crate::storage::{DbConn, DbPool};

/// The browser Origin allowlist (contract §6). Reloadable on SIGHUP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginPolicy {
    any: bool,
    allowed: Vec<String>,
}

impl OriginPolicy {
    pub fn new(list: &[String]) -> Self {
        Self {
            any: list.iter().any(|o| o == "*"),
            allowed: list.iter().map(|o| o.to_ascii_lowercase()).collect(),
        }
    }

    /// A request without an Origin is always allowed.
    pub fn allows(&self, origin: Option<&str>) -> bool {
        match origin {
            None => true,
            Some(_) if self.any => true,
            Some(o) => self.allowed.iter().any(|a| a.eq_ignore_ascii_case(o)),
        }
    }
}

/// What every handler can reach. Built once before the server starts.
pub struct AppState {
    pub settings: Arc<Settings>,
    pub pool: DbPool,
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    pub origins: RwLock<OriginPolicy>,
    /// Set when a graceful shutdown begins: upgrades get 503, `/readyz` 503.
    pub shutting_down: AtomicBool,
    /// How events and changes reach other nodes.
    pub bus: Bus,
    /// Remembered authorisations of the hot paths.
    pub access: Arc<AccessCache>,
    /// WebSocket clients per instance, account and node.
    pub connections: Arc<crate::limits::ConnectionLimits>,
}

impl AppState {
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }

    /// Authorises an instance-scoped request (contract §2 order): from memory
    /// when a fresh answer is remembered, else from storage; when storage
    /// fails, a remembered answer of any age still serves.
    pub async fn authorize_instance(
        &self,
        token: Option<String>,
        name: String,
        account_only: bool,
    ) -> Result<Access, ApiError> {
        let token = token.ok_or(ApiError::MissingToken)?;
        let key = CacheKey::new(&token, &name, account_only);
        if let Some(hit) = self.access.fresh(&key) {
            return Ok(hit);
        }
        match self
            .authorize_stored(Some(token), name, account_only, None)
            .await
        {
            Ok(access) => {
                self.access.insert(key, access.clone());
                Ok(access)
            }
            Err(ApiError::Internal) => self.access.stale(&key).ok_or(ApiError::Internal),
            Err(e) => Err(e),
        }
    }

    /// The instance a request's path names, authorised from storage (no
    /// remembered answers: the caller reads or changes what is stored).
    /// Storage failures answer 500 with `failure` when given.
    pub async fn target_instance(
        &self,
        req: &HttpRequest,
        account_only: bool,
        failure: Option<&'static str>,
    ) -> Result<crate::storage::instances::InstanceRecord, ApiError> {
        let access = self
            .authorize_stored(
                auth::request_token(req),
                instance_param(req),
                account_only,
                failure,
            )
            .await?;
        access.instance.ok_or(ApiError::InstanceNotFound)
    }

    /// The checks of contract §2 for an instance-scoped request, from storage.
    async fn authorize_stored(
        &self,
        token: Option<String>,
        name: String,
        account_only: bool,
        failure: Option<&'static str>,
    ) -> Result<Access, ApiError> {
        self.db(failure, move |conn| {
            auth::authorize(
                conn,
                token.as_deref(),
                Scope::Instance {
                    name: &name,
                    account_only,
                },
            )
        })
        .await
    }

    /// Applies persisted settings on this node and sends them to the others.
    pub fn settings_changed(&self, id: InstanceId, persisted: &VersionedConfig) {
        self.access.forget_instance(id);
        if let Some(addr) = self.registry.get(id) {
            addr.do_send(UpdateSettings(Some(persisted.clone())));
        }
        self.bus.publish_control(&Control::Settings {
            instance: id.0,
            config: persisted.config.clone(),
            version: persisted.version,
        });
    }

    /// Closes a deleted instance's sockets on this node and tells the others.
    pub fn instance_deleted(&self, id: InstanceId) {
        self.access.forget_instance(id);
        if let Some(addr) = self.registry.get(id) {
            addr.do_send(Deleted);
        }
        self.bus
            .publish_control(&Control::Deleted { instance: id.0 });
    }

    /// Runs blocking storage work on the blocking pool with a pooled
    /// connection. Checkout and query failures become 500s with `failure`.
    pub async fn db<T, F>(&self, failure: Option<&'static str>, f: F) -> Result<T, ApiError>
    where
        F: FnOnce(&mut DbConn) -> Result<T, ApiError> + Send + 'static,
        T: Send + 'static,
    {
        let pool = self.pool.clone();
        let outcome = web::block(move || {
            let mut conn = pool.get().map_err(|e| ApiError::internal(&e))?;
            f(&mut conn)
        })
        .await
        .map_err(|e| ApiError::internal(&e))
        .and_then(|r| r);
        match (outcome, failure) {
            (Err(ApiError::Internal), Some(message)) => Err(ApiError::Storage { message }),
            (other, _) => other,
        }
    }
}

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

/// A resource answering `method` with `handler` and 405 (with `Allow`) otherwise.
macro_rules! resource {
    ($path:expr, $method:ident, $allow:literal, $handler:expr) => {
        web::resource($path)
            .route(web::$method().to($handler))
            .default_service(web::to(|| async {
                Err::<actix_web::HttpResponse, _>(crate::error::ApiError::MethodNotAllowed {
                    allow: $allow,
                })
            }))
    };
}

/// Every route of the contract.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(resource!(
        "/api/instance/new",
        post,
        "POST",
        instances::create
    ))
    .service(resource!("/api/instance/list", get, "GET", instances::list))
    .service(resource!(
        "/api/instance/delete/{instance}",
        delete,
        "DELETE",
        instances::delete
    ))
    .service(resource!(
        "/api/events/websocket/{instance}",
        post,
        "POST",
        websocket::set
    ))
    .service(resource!(
        "/api/events/getWebsocket/{instance}",
        get,
        "GET",
        websocket::get
    ))
    .service(resource!(
        "/api/events/publish/{instance}",
        post,
        "POST",
        publish::publish
    ))
    .service(resource!("/ws/{instance}", get, "GET", connect::connect))
    .service(resource!("/healthz", get, "GET", health::healthz))
    .service(resource!("/readyz", get, "GET", health::readyz))
    .service(resource!("/metrics", get, "GET", health::metrics))
    .service(resource!("/openapi.yaml", get, "GET", health::openapi));
    // The console (contract §13).
    cfg.configure(console::routes);
    #[cfg(feature = "test-echo")]
    cfg.service(resource!("/test/echo", get, "GET", echo::echo));
}

/// The contract's 404 for unknown paths.
pub async fn not_found() -> Result<actix_web::HttpResponse, ApiError> {
    Err(ApiError::NotFound)
}

/// Counts requests by route pattern and status.
pub async fn count_requests(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, Error> {
    let metrics = req.app_data::<web::Data<Metrics>>().cloned();
    let res = next.call(req).await?;
    if let Some(metrics) = metrics {
        let route = res
            .request()
            .match_pattern()
            .unwrap_or_else(|| "unmatched".into());
        metrics
            .http_requests
            .with_label_values(&[&route, res.status().as_str()])
            .inc();
    }
    Ok(res)
}

/// The application: routes, 404, rate limits and request counting.
pub fn app(
    state: web::Data<AppState>,
    limiter: web::Data<crate::rate_limit::RateLimiter>,
    metrics: web::Data<Metrics>,
) -> actix_web::App<
    impl actix_web::dev::ServiceFactory<
        ServiceRequest,
        Config = (),
        Response = ServiceResponse<impl MessageBody>,
        Error = Error,
        InitError = (),
    >,
> {
    actix_web::App::new()
        .app_data(state)
        .app_data(limiter)
        .app_data(metrics)
        .configure(routes)
        .default_service(web::to(not_found))
        .wrap(from_fn(crate::rate_limit::middleware))
        .wrap(from_fn(count_requests))
}
