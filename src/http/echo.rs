//! `GET /test/echo`, compiled only with the `test-echo` feature: a WebSocket
//! that sends every client message back, run by the same session code as
//! `/ws/:instance`, for the protocol conformance run (`.ci/autobahn`). It has
//! no authentication and touches no database.
//!
//! Each echo session joins a pseudo instance actor of its own, started here
//! and kept out of the registry: the registry's instances are checked
//! against storage, where this one does not exist (it would be closed as
//! deleted), and nothing publishes to it.

use std::time::Duration;

use actix::Actor;
use actix_web::{web, HttpRequest, HttpResponse};

use super::AppState;
use crate::bus::Bus;
use crate::domain::{AccountId, EventSet, InstanceId};
use crate::error::ApiError;
use crate::instance::actor::FanoutEnv;
use crate::instance::{InstanceActor, InstanceInfo, SharedAddr};
use crate::ws::session::{Session, SessionLimits};
use crate::ws::upgrade;

/// The pseudo instance; no stored row has these ids.
const NAME: &str = "echo";
const INSTANCE: InstanceId = InstanceId(-1);
const ACCOUNT: AccountId = AccountId(-1);

/// `GET /test/echo`.
pub async fn echo(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    if state.is_shutting_down() {
        return Err(ApiError::ShuttingDown);
    }
    if !upgrade::is_handshake(&req) {
        return Err(ApiError::UpgradeExpected);
    }
    let slot = state.connections.acquire(INSTANCE, ACCOUNT)?;
    let ws = &state.settings.ws;
    let info = InstanceInfo {
        id: INSTANCE,
        account: ACCOUNT,
        name: NAME.to_string(),
        token: String::new(),
    };
    let env = FanoutEnv {
        base_url: "".into(),
        client_buffer_bytes: ws.client_buffer_bytes,
        metrics: state.metrics.clone(),
        bus: Bus::Local,
        publish_queue: state.settings.limits.publish_queue,
        publish_lag: state.settings.limits.publish_lag,
        // Nothing is fanned out here: the session answers its client itself.
        direct_writes: false,
        history: None,
        ping_interval: Duration::from_secs(ws.ping_interval_secs),
        idle_timeout: Duration::from_secs(ws.idle_timeout_secs),
        session_limits: SessionLimits::from_settings(ws),
    };
    let shared_env = env.clone();
    // Stops with its session, the only holder of its address.
    let instance = InstanceActor::new(
        info,
        None,
        env,
        std::sync::Weak::new(),
        NAME.to_string(),
        Default::default(),
    )
    .start();
    let instance = std::sync::Arc::new(SharedAddr::new(instance, NAME, &shared_env));
    let session = Session::new(instance, EventSet::default(), slot).echoing();
    upgrade::accept(&req, session, ws.max_message_bytes)
}
