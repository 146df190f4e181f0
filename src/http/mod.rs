//! The HTTP surface: the route table, the contract's 404/405 replies and
//! request counting. What handlers see is in [`state`], the checks of
//! contract §2 in `authorize`, body helpers in [`body`]; handlers live in
//! one file per resource.

mod authorize;
pub mod body;
pub mod connect;
// The console (contract §13).
pub mod console;
#[cfg(feature = "test-echo")]
pub mod echo;
pub mod health;
pub mod instances;
pub mod publish;
pub mod state;
pub mod webhooks;
pub mod websocket;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::{from_fn, Next};
use actix_web::{web, Error};

use crate::error::ApiError;
use crate::metrics::Metrics;

pub use body::{has_no_content_type, instance_param, is_json, read_body};
pub use state::{AppState, OriginPolicy};

/// A resource answering `method` with `handler` and 405 (with `Allow`)
/// otherwise. A GET resource answers HEAD too, as RFC 9110 asks: the same
/// handler, status and headers; actix-http sends no body for HEAD.
macro_rules! resource {
    ($path:expr, get, $handler:expr) => {
        web::resource($path)
            .route(web::get().to($handler))
            .route(web::head().to($handler))
            .default_service(web::to(|| async {
                Err::<actix_web::HttpResponse, _>(crate::error::ApiError::MethodNotAllowed {
                    allow: "GET, HEAD",
                })
            }))
    };
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
    .service(resource!("/api/instance/list", get, instances::list))
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
        websocket::get
    ))
    .service(resource!(
        "/api/events/publish/{instance}",
        post,
        "POST",
        publish::publish
    ))
    .service(
        // Webhooks (contract §11): set, read (alias of getWebhook) and remove share a path.
        web::resource("/api/events/webhook/{instance}")
            .route(web::post().to(webhooks::set))
            .route(web::get().to(webhooks::get))
            .route(web::head().to(webhooks::get))
            .route(web::delete().to(webhooks::delete))
            .default_service(web::to(|| async {
                Err::<actix_web::HttpResponse, _>(ApiError::MethodNotAllowed {
                    allow: "GET, HEAD, POST, DELETE",
                })
            })),
    )
    .service(resource!(
        "/api/events/getWebhook/{instance}",
        get,
        webhooks::get
    ))
    .service(resource!(
        "/api/events/webhook/{instance}/failed",
        get,
        webhooks::failed
    ))
    .service(resource!(
        "/api/events/webhook/{instance}/retry",
        post,
        "POST",
        webhooks::retry
    ))
    .service(resource!("/ws/{instance}", get, connect::connect))
    .service(resource!("/healthz", get, health::healthz))
    .service(resource!("/readyz", get, health::readyz))
    .service(resource!("/metrics", get, health::metrics))
    .service(resource!("/openapi.yaml", get, health::openapi));
    // The console (contract §13).
    cfg.configure(console::routes);
    #[cfg(feature = "test-echo")]
    cfg.service(resource!("/test/echo", get, echo::echo));
}

/// The contract's 404 for unknown paths.
pub async fn not_found() -> Result<actix_web::HttpResponse, ApiError> {
    Err(ApiError::NotFound)
}

/// One request being handled, in [`AppState::in_flight`] until dropped
/// (also when the request's future is dropped unfinished).
struct InFlight(web::Data<AppState>);

/// Paths the drain leaves to their handlers: the probes and the metrics,
/// which answer, and the WebSocket routes, which refuse an upgrade during
/// the drain themselves and count it among the upgrades.
fn left_to_the_route_while_draining(path: &str) -> bool {
    matches!(path, "/healthz" | "/readyz" | "/metrics" | "/test/echo") || path.starts_with("/ws/")
}

impl InFlight {
    /// Counts the request in, or refuses it once the drain has begun (a
    /// request is either counted before the drain looks, and waited for,
    /// or sees that it began).
    fn enter(state: web::Data<AppState>, path: &str) -> Result<InFlight, ApiError> {
        state
            .in_flight
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let entered = InFlight(state);
        if entered.0.is_shutting_down() && !left_to_the_route_while_draining(path) {
            return Err(ApiError::ShuttingDown);
        }
        Ok(entered)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0
            .in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Counts requests by route pattern and status, and those being handled;
/// refuses new ones (503 `Server is shutting down`) once the drain began.
pub async fn count_requests(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, Error> {
    let metrics = req.app_data::<web::Data<Metrics>>().cloned();
    let _in_flight = match req.app_data::<web::Data<AppState>>().cloned() {
        Some(state) => Some(InFlight::enter(state, req.path())?),
        None => None,
    };
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
