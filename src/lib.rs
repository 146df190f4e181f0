//! # eventgate
//!
//! A real-time event gateway. Producers publish an instance's events over
//! HTTP; eventgate fans them out to that instance's WebSocket clients,
//! filtered by the instance's WebSocket settings. The public contract is
//! `../shared/spec/events-api.md`.
//!
//! ## A tour
//! - [`settings`]: the settings tree (defaults ← TOML file ← `EVENTGATE_*`).
//! - [`storage`]: diesel on SQLite (default) or PostgreSQL; accounts,
//!   instances, WebSocket settings, webhooks and their deliveries. Only HTTP
//!   handlers, the webhook workers and the command
//!   line call it, always off the actor threads.
//! - [`auth`], [`rate_limit`], [`limits`]: tokens (and remembered
//!   authorisations), fixed-window request limits, connection limits.
//! - [`http`]: the REST API and the `/ws/:instance` upgrade.
//! - [`instance`]: one actor per instance (settings + its sessions), found
//!   through the [`instance::Registry`] started once before the server.
//!   With `ws.history_size` it also keeps the instance's recent events for
//!   recovery on reconnect ([`instance::history`]; in a cluster a mirror of
//!   the JetStream history, [`instance::shared_history`]).
//! - [`ws`]: one session actor per client with a bounded mailbox; a client
//!   that falls behind is closed with 4008 and nobody else waits.
//! - [`webhook`]: durable, signed delivery to HTTP receivers (contract §11):
//!   deliveries stored with the publish, delivered by this node's workers
//!   with leases, retries and dead letters.
//! - [`events`]: publish bodies and envelopes (serialised once per event).
//! - [`bus`]: how events and settings changes reach other nodes (NATS), or
//!   nowhere on a single node.
//! - [`lifecycle`], [`metrics`]: systemd, signals, drain, Prometheus.
//! - [`memory`]: gives memory freed by departed clients back to the system.
//! - [`console`]: the web page at `/console` (contract §13), compiled in;
//!   it talks to the gateway only through the public API.
//!
//! [`run`] takes settings and an already-bound listener, so tests bind
//! `127.0.0.1:0` and run exactly what production runs.
//!
//! Unsafe code is denied crate-wide. Four calls need it, each allowed where
//! it is made with a `// SAFETY:` note: `malloc_trim` in [`memory`],
//! `_exit` in the binary's `main.rs`, and on the fan-out's path a socket's
//! descriptor borrowed in `ws::direct` and a prefetch in `instance::actor`.

#![deny(unsafe_code)]

pub mod auth;
pub mod bus;
pub mod cli;
// The console's compiled-in page (contract §13).
pub mod console;
pub mod domain;
pub mod error;
pub mod events;
pub mod http;
pub mod instance;
pub mod lifecycle;
pub mod limits;
pub mod logging;
pub mod memory;
pub mod metrics;
pub mod rate_limit;
pub mod settings;
pub mod storage;
pub mod webhook;
pub mod ws;

use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use actix_http::HttpService;
use actix_rt::net::TcpStream;
use actix_service::{map_config, IntoServiceFactory, ServiceFactoryExt};
use actix_web::dev::AppConfig;
use actix_web::web;
use parking_lot::RwLock;

use crate::auth::AccessCache;
use crate::bus::Bus;
use crate::http::{AppState, OriginPolicy};
use crate::instance::actor::FanoutEnv;
use crate::instance::Registry;
use crate::metrics::Metrics;
use crate::rate_limit::RateLimiter;
use crate::settings::Settings;
use crate::storage::DbPool;

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Settings(#[from] settings::SettingsError),
    #[error("storage: {0}")]
    Storage(#[from] storage::StorageError),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Bus(#[from] bus::BusError),
    #[error(transparent)]
    Webhook(#[from] webhook::client::ClientError),
    #[error("EVENTGATE_ENCRYPTION_KEY {0}")]
    EncryptionKey(#[from] webhook::sealing::BadKey),
    #[error(
        "EVENTGATE_ACCOUNT_TOKEN is the TokenInstance of instance `{0}`: a token names one \
         account or one instance (choose another account token)"
    )]
    AccountTokenOfAnInstance(String),
}

/// Opens the database pool (failing fast with the real error), applies
/// migrations and ensures the configured account exists. Blocking.
pub fn open_storage(settings: &Settings) -> Result<DbPool, StartError> {
    let pool = storage::connect(
        &settings.database_url(),
        settings.storage.pool_size,
        Duration::from_secs(settings.storage.connect_timeout_secs),
    )?;
    let mut conn = pool.get().map_err(storage::StorageError::from)?;
    ensure_account(settings, &mut conn)?;
    Ok(pool)
}

/// One connection without a pool (the command line: no pool threads still
/// at work when the process exits), migrated, with the configured account.
pub fn open_connection(settings: &Settings) -> Result<storage::DbConn, StartError> {
    let mut conn = storage::pool::open_one(&settings.database_url())?;
    ensure_account(settings, &mut conn)?;
    Ok(conn)
}

fn ensure_account(settings: &Settings, conn: &mut storage::DbConn) -> Result<(), StartError> {
    if !settings.auth.account_token.is_empty() {
        let hash = auth::token_hash(&settings.auth.account_token);
        // An account made with an instance's token would take that token
        // from its instance (an account is looked up first).
        if let Some(instance) = storage::instances::find_by_token_hash(conn, &hash)? {
            return Err(StartError::AccountTokenOfAnInstance(instance.name));
        }
        storage::accounts::ensure(conn, "default", &hash)?;
    }
    Ok(())
}

/// Runs the gateway on `listener` until SIGTERM/SIGINT; SIGHUP re-reads the
/// environment. See [`serve`] to reload from a file.
pub async fn run(settings: Settings, listener: TcpListener) -> Result<(), StartError> {
    serve(settings, listener, None, lifecycle::Signals::install()?).await
}

/// Runs the gateway; SIGHUP re-reads `config_path` (when given) and the
/// environment. `signals` were installed before `listener` was bound, so a
/// stop that comes at any moment of the start is a drain.
pub async fn serve(
    settings: Settings,
    listener: TcpListener,
    config_path: Option<PathBuf>,
    signals: lifecycle::Signals,
) -> Result<(), StartError> {
    let settings = Arc::new(settings);
    let opened = {
        let settings = settings.clone();
        tokio::task::spawn_blocking(move || open_storage(&settings)).await
    };
    let pool = opened.map_err(|e| std::io::Error::other(e.to_string()))??;
    let local = listener.local_addr()?;
    let base_url = if settings.server.public_base_url.is_empty() {
        format!("http://{local}")
    } else {
        settings
            .server
            .public_base_url
            .trim_end_matches('/')
            .to_string()
    };
    let metrics = Arc::new(Metrics::new()?);
    let bus = Bus::connect(
        &settings.cluster,
        metrics.clone(),
        crate::instance::history::HistoryLimits::from_settings(&settings.ws),
    )
    .await?;
    let registry = Registry::new(
        settings.server.instance_arbiters,
        FanoutEnv {
            base_url: base_url.into(),
            client_buffer_bytes: settings.ws.client_buffer_bytes,
            metrics: metrics.clone(),
            bus: bus.clone(),
            publish_queue: settings.limits.publish_queue,
            publish_lag: settings.limits.publish_lag,
            direct_writes: settings.server.direct_writes,
            history: crate::instance::history::HistoryLimits::from_settings(&settings.ws),
            ping_interval: Duration::from_secs(settings.ws.ping_interval_secs),
            idle_timeout: Duration::from_secs(settings.ws.idle_timeout_secs),
            session_limits: crate::ws::session::SessionLimits::from_settings(&settings.ws),
        },
        Arc::new(AccessCache::default()),
    );
    bus.listen_changes(registry.clone());
    // The refused-address rule: at connect time (the client's resolver) and
    // for URLs that are IP literals (the workers).
    let webhook_policy = Arc::new(webhook::address::AddressPolicy::new(
        &settings.webhook.allowed_networks,
    ));
    let webhook_client = Arc::new(webhook::client::Client::new(
        webhook::attempt_timeout(&settings.webhook),
        webhook_policy.clone(),
    )?);
    {
        let (pool, webhooks) = (pool.clone(), registry.webhooks().clone());
        tokio::task::spawn_blocking(move || {
            let mut conn = pool.get().map_err(storage::StorageError::from)?;
            webhook::worker::load_enabled(&mut conn, &webhooks)
        })
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))??;
    }
    {
        let (reread, asked) = tokio::sync::mpsc::unbounded_channel();
        registry.webhooks().reread_with(reread);
        actix_web::rt::spawn(instance::change::reread_webhooks(
            registry.webhooks().clone(),
            pool.clone(),
            asked,
        ));
    }
    let intake = webhook::intake::Intake::start(
        pool.clone(),
        i64::try_from(settings.webhook.max_pending).unwrap_or(i64::MAX),
    )?;
    let state = web::Data::new(AppState {
        settings: settings.clone(),
        pool,
        registry: registry.clone(),
        metrics: metrics.clone(),
        origins: RwLock::new(OriginPolicy::new(&settings.ws.allowed_origins)),
        shutting_down: AtomicBool::new(false),
        in_flight: Default::default(),
        bus: bus.clone(),
        connections: limits::ConnectionLimits::new(&settings.limits),
        intake,
    });
    let stopping = state.clone();
    let refresh = Duration::from_secs(settings.cluster.refresh_secs);
    actix_web::rt::spawn(instance::change::refresh_from_storage(
        registry,
        state.pool.clone(),
        instance::change::RefreshTimer::new(refresh, bus.resyncs()),
        move || stopping.is_shutting_down(),
    ));
    let stopping = state.clone();
    let deliver = settings.webhook.deliver;
    let attempt_threads = webhook::worker::AttemptThreads::start()?;
    let worker = webhook::worker::WorkerEnv {
        pool: state.pool.clone(),
        webhooks: state.registry.webhooks().clone(),
        settings: settings.webhook.clone(),
        metrics: metrics.clone(),
        base_url: state.registry.env().base_url.clone(),
        sealer: webhook::sealing::Sealer::new(&settings.webhook.encryption_key)?,
        client: webhook_client,
        policy: webhook_policy,
        resync: bus.resyncs(),
        stopping: Arc::new(move || stopping.is_shutting_down()),
        attempts: attempt_threads.handle(),
    };
    if deliver {
        state.intake.attach(webhook::worker::start(worker));
    } else {
        log::info!("webhook deliveries are stored here and delivered by other nodes");
    }
    let limiter = web::Data::new(RateLimiter::new(settings.rate_limit.clone()));
    let metrics_data = web::Data::from(metrics);
    let server = build_server(&settings, listener, &state, &limiter, &metrics_data)?;
    log::info!("eventgate listening on {local}");
    lifecycle::notify_ready(local);
    actix_web::rt::spawn(lifecycle::watchdog(state.clone()));
    actix_web::rt::spawn(memory::release_after_departures(state.connections.clone()));
    let reload = move || {
        let file = config_path.clone();
        settings::Loaded::from_process(file.as_deref())
            .map(|loaded| loaded.settings)
            .map_err(|e| e.to_string())
    };
    actix_web::rt::spawn(lifecycle::handle_signals(
        signals,
        state.clone(),
        limiter,
        server.handle(),
        reload,
    ));
    server.await?;
    log::info!("eventgate stopped");
    Ok(())
}

/// The HTTP server: actix-web's application on actix-http's HTTP/1 service,
/// with an upgrade service (a second copy of the application per worker)
/// that takes accepted WebSocket connections out of HTTP (see [`ws::upgrade`]).
fn build_server(
    settings: &Settings,
    listener: TcpListener,
    state: &web::Data<AppState>,
    limiter: &web::Data<RateLimiter>,
    metrics: &web::Data<Metrics>,
) -> std::io::Result<actix_server::Server> {
    let local = listener.local_addr()?;
    let user_timeout = Duration::from_secs(settings.ws.tcp_user_timeout_secs);
    let keep_alive = Duration::from_secs(settings.server.keep_alive_secs);
    let request_timeout = Duration::from_secs(settings.server.client_request_timeout_secs);
    let (state, limiter, metrics) = (state.clone(), limiter.clone(), metrics.clone());
    let app = move || http::app(state.clone(), limiter.clone(), metrics.clone());
    Ok(actix_server::Server::build()
        .workers(settings.server.workers)
        .disable_signals()
        .shutdown_timeout(settings.server.shutdown_drain_secs)
        .listen("eventgate", listener, move || {
            HttpService::build()
                .keep_alive(keep_alive)
                .client_request_timeout(request_timeout)
                .client_disconnect_timeout(ws::socket::LINGER)
                .local_addr(local)
                .on_connect_ext(move |io: &TcpStream, _: &mut _| tune_socket(io, user_timeout))
                .upgrade(ws::upgrade::service(app().into_factory()))
                // Nothing here builds URLs from the configured host name.
                .finish(map_config(
                    app().into_factory().map_err(|e| e.error_response()),
                    |()| AppConfig::default(),
                ))
                .tcp()
        })?
        .run())
}

/// Tunes an accepted socket: `TCP_NODELAY`, since every frame is a complete
/// message that should leave at once (Nagle's algorithm would hold small
/// frames back until the peer's delayed ACK), and `TCP_USER_TIMEOUT`, so a
/// peer that stops reading is dropped by the kernel even while its session
/// actor is frozen.
fn tune_socket(tcp: &TcpStream, user_timeout: Duration) {
    if let Err(e) = tcp.set_nodelay(true) {
        log::debug!("cannot set TCP_NODELAY: {e}");
    }
    if !user_timeout.is_zero() {
        if let Err(e) = socket2::SockRef::from(tcp).set_tcp_user_timeout(Some(user_timeout)) {
            log::debug!("cannot set TCP_USER_TIMEOUT: {e}");
        }
    }
}
