//! How a WebSocket handshake leaves HTTP: every request carrying
//! `Upgrade: websocket` is handed here by actix-http (its upgrade service)
//! together with the connection. It runs through the same application as
//! every other request (rate limits, routes, the contract's checks). When the
//! handler accepted it, the 101 is written and the socket goes to
//! [`super::socket::serve`] with the session the handler built, so an
//! upgraded connection keeps no HTTP dispatcher and none of its 8 KiB
//! buffers. Any other answer is written as it is, then the connection closes
//! (a body sent with such a request is not read).

use std::rc::Rc;

use actix_codec::Framed;
use actix_http::body::{self, BodySize, MessageBody};
use actix_http::h1::{Codec, Message};
use actix_http::{ConnectionType, HttpMessage, Request, Response};
use actix_rt::net::TcpStream;
use actix_service::{fn_factory, fn_service, Service, ServiceFactory};
use actix_web::dev::{AppConfig, ServiceResponse};
use actix_web::{HttpRequest, HttpResponse};
use futures_util::SinkExt;

use super::session::Session;
use crate::error::ApiError;

/// A request and its connection, as actix-http hands an upgrade over.
pub type Upgrading = (Request, Framed<TcpStream, Codec>);

/// Marks a request that arrived through the upgrade path: only those can be
/// accepted (a handshake sent with a chunked body stays on the HTTP path).
struct UpgradePath;

/// What an accepting handler leaves in its 101 response.
struct Accepted {
    session: Session,
    max_frame: usize,
}

/// Accepts the WebSocket handshake of `req` for `session`: the 101 response,
/// carrying the session to start once it is written.
pub fn accept(
    req: &HttpRequest,
    session: Session,
    max_frame: usize,
) -> Result<HttpResponse, ApiError> {
    if req.extensions().get::<UpgradePath>().is_none() {
        return Err(ApiError::UpgradeExpected);
    }
    let mut res = actix_web_actors::ws::handshake(req)
        .map_err(|_| ApiError::UpgradeExpected)?
        .finish();
    res.extensions_mut().insert(Accepted { session, max_frame });
    Ok(res)
}

/// Whether `req` is a valid WebSocket handshake that can be accepted.
pub fn is_handshake(req: &HttpRequest) -> bool {
    req.extensions().get::<UpgradePath>().is_some() && actix_http::ws::handshake(req.head()).is_ok()
}

/// The upgrade service of one worker: a second copy of the application
/// (same shared state) that answers the upgrade requests.
pub fn service<F, B>(
    app: F,
) -> impl ServiceFactory<Upgrading, Config = (), Response = (), Error = actix_web::Error, InitError = ()>
where
    F: ServiceFactory<
            Request,
            Config = AppConfig,
            Response = ServiceResponse<B>,
            Error = actix_web::Error,
            InitError = (),
        > + 'static,
    B: MessageBody + 'static,
{
    let app = Rc::new(app);
    fn_factory(move || {
        let app = app.clone();
        async move {
            let svc = Rc::new(app.new_service(AppConfig::default()).await?);
            Ok(fn_service(move |upgrading: Upgrading| {
                answer(svc.clone(), upgrading)
            }))
        }
    })
}

async fn answer<S, B>(app: Rc<S>, (req, mut framed): Upgrading) -> Result<(), actix_web::Error>
where
    S: Service<Request, Response = ServiceResponse<B>, Error = actix_web::Error>,
    B: MessageBody + 'static,
{
    req.extensions_mut().insert(UpgradePath);
    let res: Response<body::BoxBody> = match app.call(req).await {
        Ok(res) => Response::from(res).map_into_boxed_body(),
        Err(e) => e.error_response().into(),
    };
    let (mut head, body) = res.into_parts();
    let accepted = head.extensions_mut().remove::<Accepted>();
    if let Some(Accepted { session, max_frame }) = accepted {
        framed.send(Message::Item((head, BodySize::None))).await?;
        let parts = framed.into_parts();
        actix_rt::spawn(super::socket::serve(
            parts.io,
            parts.read_buf.freeze(),
            session,
            max_frame,
        ));
        return Ok(());
    }
    let bytes = body::to_bytes(body).await.unwrap_or_default();
    head.head_mut().set_connection_type(ConnectionType::Close);
    // One write for head and body: some clients read only what came with the head.
    framed
        .feed(Message::Item((head, BodySize::Sized(bytes.len() as u64))))
        .await?;
    framed.feed(Message::Chunk(Some(bytes))).await?;
    framed.feed(Message::Chunk(None)).await?;
    // `Framed::close` shuts the socket down without flushing its own buffer.
    framed.flush().await?;
    framed.close().await?;
    Ok(())
}
