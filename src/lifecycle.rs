//! Life under systemd: readiness and status notifications, a watchdog that
//! pings the actor system rather than a timer, signals (SIGTERM/SIGINT drain
//! and stop, SIGHUP reload), and the graceful drain itself.
//!
//! Outside systemd (no `NOTIFY_SOCKET`) the notifications do nothing.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use actix_web::dev::ServerHandle;
use actix_web::web;
use sd_notify::NotifyState;
use tokio::signal::unix::{signal, Signal, SignalKind};

use crate::http::{AppState, OriginPolicy};
use crate::rate_limit::RateLimiter;
use crate::settings::Settings;
use crate::ws::close::CloseCode;

/// How long the watchdog waits for the instance threads to answer.
const PING_TIMEOUT: Duration = Duration::from_secs(2);

/// How long closing frames get to reach clients before connections are dropped.
const CLOSE_FLUSH: Duration = Duration::from_millis(500);

/// How often the drain looks whether requests are still being handled.
const IN_FLIGHT_POLL: Duration = Duration::from_millis(10);

/// Time for the last replies to leave before the connections are closed.
const REPLY_FLUSH: Duration = Duration::from_millis(100);

fn notify(states: &[NotifyState<'_>]) {
    if let Err(e) = send_notify(states) {
        log::debug!("sd_notify failed: {e}");
    }
}

/// Sends `states` to `$NOTIFY_SOCKET`, a path or, when it begins with `@`,
/// a name in Linux's abstract socket namespace (as `sd_notify(3)` reads it;
/// the `sd-notify` crate takes every value for a path).
fn send_notify(states: &[NotifyState<'_>]) -> std::io::Result<()> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(());
    };
    let message: String = states.iter().map(|s| format!("{s}\n")).collect();
    let socket = UnixDatagram::unbound()?;
    let bytes = target.as_encoded_bytes();
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name)?,
        None => SocketAddr::from_pathname(&target)?,
    };
    let sent = socket.send_to_addr(message.as_bytes(), &addr)?;
    if sent == message.len() {
        Ok(())
    } else {
        Err(std::io::Error::new(
            std::io::ErrorKind::WriteZero,
            "incomplete notification",
        ))
    }
}

/// Tells systemd the gateway is ready (migrations ran, listener bound).
pub fn notify_ready(listening: std::net::SocketAddr) {
    let status = format!("STATUS=listening on {listening}");
    notify(&[NotifyState::Ready, NotifyState::Custom(&status)]);
}

/// Sends `WATCHDOG=1` at half the interval systemd asks for, and `STATUS=`
/// with the client count, but only while the instance threads answer.
pub async fn watchdog(state: web::Data<AppState>) {
    let interval = sd_notify::watchdog_enabled();
    let enabled = interval.is_some();
    let period = interval
        .filter(|d| !d.is_zero())
        .map_or(Duration::from_secs(10), |d| d / 2);
    loop {
        tokio::time::sleep(period).await;
        if state.is_shutting_down() {
            return;
        }
        if state.registry.ping(PING_TIMEOUT).await {
            let status = format!(
                "STATUS=serving; {} clients connected",
                state.metrics.connected_clients.get()
            );
            if enabled {
                notify(&[NotifyState::Watchdog, NotifyState::Custom(&status)]);
            } else {
                notify(&[NotifyState::Custom(&status)]);
            }
        } else {
            log::error!("watchdog: instance threads did not answer within {PING_TIMEOUT:?}");
        }
    }
}

/// Drains and stops the server: refuse upgrades and new requests (503, but
/// for the probes and metrics), close every WebSocket with 1001, let the
/// requests being handled finish, stop within the drain time. Idle
/// keep-alive connections are not waited for: once no request is being
/// handled (and its reply has had [`REPLY_FLUSH`] to leave), the server
/// stops and closes them.
pub async fn drain(state: web::Data<AppState>, server: ServerHandle) {
    let deadline = Instant::now() + Duration::from_secs(state.settings.server.shutdown_drain_secs);
    state.shutting_down.store(true, Ordering::SeqCst);
    notify(&[
        NotifyState::Stopping,
        NotifyState::Custom("STATUS=draining"),
    ]);
    let closed = state.registry.close_all(CloseCode::GoingAway).await;
    log::info!("shutting down: closed {closed} WebSocket sessions");
    tokio::time::sleep(CLOSE_FLUSH).await;
    while state.in_flight.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
        tokio::time::sleep(IN_FLIGHT_POLL).await;
    }
    tokio::time::sleep(REPLY_FLUSH).await;
    server.stop(false).await;
}

/// Applies what can change safely at run time; logs what changed.
pub fn reload(state: &AppState, limiter: &RateLimiter, fresh: &Settings) {
    if let Some(filter) = crate::logging::reload(&fresh.log.level) {
        log::info!("reload: log filter is now {filter}");
    }
    let origins = OriginPolicy::new(&fresh.ws.allowed_origins);
    let mut held = state.origins.write();
    if *held != origins {
        *held = origins;
        log::info!(
            "reload: allowed origins are now {}",
            fresh.ws.allowed_origins.join(",")
        );
    }
    drop(held);
    if limiter.set_limits(fresh.rate_limit.clone()) {
        log::info!(
            "reload: rate limits {}/min, instance creation {}/min, publish {}/min",
            fresh.rate_limit.per_minute,
            fresh.rate_limit.instance_new_per_minute,
            fresh.rate_limit.publish_per_minute
        );
    }
}

/// The signals the gateway handles, listened for from the moment they are
/// installed: a signal that arrives before the handler loop runs (right
/// after `READY=1`, or even before it) is kept and handled then, never lost
/// to the default action.
pub struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
}

impl Signals {
    /// Installs the handlers for SIGTERM, SIGINT and SIGHUP. Call before the
    /// listener is bound and before `READY=1`.
    pub fn install() -> std::io::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }
}

/// Waits for signals: SIGTERM/SIGINT drain and stop; SIGHUP calls `reload_settings`.
pub async fn handle_signals(
    mut signals: Signals,
    state: web::Data<AppState>,
    limiter: web::Data<RateLimiter>,
    server: ServerHandle,
    reload_settings: impl Fn() -> Result<Settings, String>,
) {
    loop {
        tokio::select! {
            _ = signals.term.recv() => { log::info!("SIGTERM: draining"); break; }
            _ = signals.int.recv() => { log::info!("SIGINT: draining"); break; }
            _ = signals.hup.recv() => match reload_settings() {
                Ok(fresh) => reload(&state, &limiter, &fresh),
                Err(e) => log::error!("reload failed, settings unchanged: {e}"),
            },
        }
    }
    drain(state, server).await;
}
