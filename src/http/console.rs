//! `GET`/`HEAD` `/console`, `/console/<asset>` and `/favicon.ico`: hands out
//! the compiled-in files of [`crate::console`] with the contract's
//! Content-Security-Policy. `/console` itself is rate limited like `/api/*`
//! (by the middleware in `crate::rate_limit`); its assets are not.

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};

use crate::console::{self, Asset};
use crate::error::ApiError;

/// The reply for one asset, with the console's headers.
fn serve(asset: &Asset, cache: &'static str) -> HttpResponse {
    HttpResponse::Ok()
        .content_type(asset.content_type)
        .insert_header((
            header::CONTENT_SECURITY_POLICY,
            console::CONTENT_SECURITY_POLICY,
        ))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .insert_header((header::REFERRER_POLICY, "no-referrer"))
        .insert_header((header::X_FRAME_OPTIONS, "DENY"))
        .insert_header((header::CACHE_CONTROL, cache))
        .body(asset.body)
}

/// `GET /console`: the page.
pub async fn page() -> HttpResponse {
    serve(&console::PAGE, "no-store")
}

/// `GET /console/{file}`: one asset, or the contract's 404.
pub async fn asset(req: HttpRequest) -> Result<HttpResponse, ApiError> {
    console::asset(req.path())
        .map(|a| serve(a, "no-cache"))
        .ok_or(ApiError::NotFound)
}

/// `GET /favicon.ico`.
pub async fn favicon() -> HttpResponse {
    serve(&console::FAVICON_ICO, "max-age=86400")
}

/// `/console/` (with the slash) leads to the page.
pub async fn to_page() -> HttpResponse {
    HttpResponse::PermanentRedirect()
        .insert_header((header::LOCATION, "/console"))
        .finish()
}

/// A resource answering GET and HEAD with `handler`, and 405 otherwise.
macro_rules! get_and_head {
    ($path:expr, $handler:expr) => {
        web::resource($path)
            .route(web::get().to($handler))
            .route(web::head().to($handler))
            .default_service(web::to(|| async {
                Err::<HttpResponse, _>(ApiError::MethodNotAllowed { allow: "GET, HEAD" })
            }))
    };
}

/// The console's routes.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(get_and_head!("/console", page))
        .service(get_and_head!("/console/", to_page))
        .service(get_and_head!("/console/{file}", asset))
        .service(get_and_head!("/favicon.ico", favicon));
}
