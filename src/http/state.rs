//! What every handler can reach ([`AppState`], built once before the server
//! starts), the browser Origin allowlist, and how handlers run storage work
//! off the worker thread.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use actix_web::web;
use parking_lot::RwLock;

use crate::bus::Bus;
use crate::instance::Registry;
use crate::metrics::Metrics;
use crate::settings::Settings;
use crate::storage::{DbConn, DbPool, StorageError};

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
    /// Instance actors of this node; changes reach them through
    /// [`Registry::change`].
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    pub origins: RwLock<OriginPolicy>,
    /// Set when a graceful shutdown begins: upgrades get 503, `/readyz` 503.
    pub shutting_down: AtomicBool,
    /// HTTP requests being handled now (the drain waits for them, not for
    /// idle keep-alive connections).
    pub in_flight: std::sync::atomic::AtomicUsize,
    /// How events and changes reach other nodes.
    pub bus: Bus,
    /// WebSocket clients per instance, account and node.
    pub connections: Arc<crate::limits::ConnectionLimits>,
    /// Where publishes store their webhook deliveries.
    pub intake: crate::webhook::intake::Intake,
}

impl AppState {
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    /// Runs blocking storage work on the blocking pool with a pooled
    /// connection. A failed checkout (or a blocking pool that is gone)
    /// becomes `E` through its `From<StorageError>`.
    pub async fn db<T, E, F>(&self, f: F) -> Result<T, E>
    where
        F: FnOnce(&mut DbConn) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<StorageError> + Send + 'static,
    {
        let pool = self.pool.clone();
        web::block(move || {
            let mut conn = pool.get().map_err(StorageError::from)?;
            f(&mut conn)
        })
        .await
        .map_err(|e| E::from(StorageError::Blocking(e.to_string())))?
    }
}
