//! Changes to an instance that every node must apply: new WebSocket
//! settings, deletion. [`Registry::apply`] is the one way such a change
//! reaches this node — it forgets what was remembered about the instance's
//! authorisations, then tells the instance's actor — whether the change was
//! made here (HTTP handlers, through [`Registry::change`], which also sends it
//! to the other nodes), arrived over the bus, or was found in storage by the
//! refresh loop ([`refresh_from_storage`]), periodically and at once when
//! the bus comes back from an outage ([`RefreshTimer`]).
//!
//! Nothing here touches the database except the refresh loop, which reads it
//! on the blocking pool (the enabled webhooks too, see
//! [`refresh_from_storage`]), and [`reread_webhooks`], which reads the
//! webhooks of an instance changed on another node.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::messages::{Deleted, UpdateSettings};
use super::Registry;
use crate::domain::{InstanceId, VersionedConfig};
use crate::storage::{self, DbPool, StorageError};

/// A change of one instance, as applied on every node (and as it crosses
/// the bus, JSON-encoded).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Change {
    /// The instance's WebSocket settings as persisted (`None`: never set).
    Settings {
        instance: InstanceId,
        settings: Option<VersionedConfig>,
    },
    /// The instance was deleted.
    Deleted { instance: InstanceId },
    /// The instance's enabled webhooks as persisted (contract §11).
    Webhooks {
        instance: InstanceId,
        enabled: Vec<crate::webhook::EnabledWebhook>,
    },
    /// Webhook deliveries of the instance were stored or requeued: wake the
    /// delivery workers.
    WebhooksDue { instance: InstanceId },
}

impl Change {
    /// The instance the change is about.
    pub fn instance(&self) -> InstanceId {
        match self {
            Change::Settings { instance, .. }
            | Change::Deleted { instance }
            | Change::Webhooks { instance, .. }
            | Change::WebhooksDue { instance } => *instance,
        }
    }
}

impl Registry {
    /// Applies a change on this node: remembered authorisations of the
    /// instance are forgotten, then its actor (if it runs here) is told.
    pub fn apply(&self, change: Change) {
        let id = change.instance();
        match &change {
            // Made on another node (this node's own changes are set by the
            // handler that made them, with the ticket of its read).
            Change::Webhooks { enabled, .. } => {
                return self.webhooks().changed_elsewhere(id, enabled.clone());
            }
            Change::WebhooksDue { .. } => return self.webhooks().ring(),
            Change::Deleted { .. } => {
                self.mark_deleted(id);
                self.webhooks().set_now(id, Vec::new());
            }
            Change::Settings { .. } => {}
        }
        self.access().forget_instance(id);
        let Some(addr) = self.get(id) else {
            return;
        };
        match change {
            Change::Settings { settings, .. } => addr.do_send(UpdateSettings(settings)),
            Change::Deleted { .. } => addr.do_send(Deleted),
            Change::Webhooks { .. } | Change::WebhooksDue { .. } => {}
        }
    }

    /// A change made on this node: applied here, then sent to the others.
    pub fn change(&self, change: Change) {
        self.apply(change.clone());
        self.tell_others(&change);
    }

    /// Sends a change made and applied on this node to the other nodes.
    pub fn tell_others(&self, change: &Change) {
        self.env().bus.publish_change(change);
    }
}

/// When a loop re-reads storage: every `every`, and at once when the bus
/// asks for it ([`crate::bus::Bus::resyncs`]: NATS came back, so notices
/// may have been lost).
pub struct RefreshTimer {
    every: Duration,
    resync: Option<watch::Receiver<u64>>,
}

impl RefreshTimer {
    pub fn new(every: Duration, resync: Option<watch::Receiver<u64>>) -> Self {
        RefreshTimer { every, resync }
    }

    /// Waits for the next re-read; `true` when the bus asked for it.
    pub async fn tick(&mut self) -> bool {
        let Some(resync) = self.resync.as_mut() else {
            tokio::time::sleep(self.every).await;
            return false;
        };
        tokio::select! {
            () = tokio::time::sleep(self.every) => false,
            changed = resync.changed() => {
                if changed.is_err() {
                    self.resync = None;
                }
                changed.is_ok()
            }
        }
    }
}

/// Safety net: re-reads every running instance's settings, and every
/// enabled webhook, from storage at each tick of `timer`, in case a change
/// notice was lost on the bus or the change was made offline (`eventgate
/// instance delete` on a running node's database). The webhooks on every
/// node, delivering or not: the intake stores deliveries only for webhooks
/// it knows enabled. Stops when `stopping` says so.
pub async fn refresh_from_storage(
    registry: Arc<Registry>,
    pool: DbPool,
    mut timer: RefreshTimer,
    stopping: impl Fn() -> bool,
) {
    loop {
        timer.tick().await;
        if stopping() {
            return;
        }
        refresh_instances(&registry, &pool).await;
        let (pool, webhooks) = (pool.clone(), registry.webhooks().clone());
        let read = actix_web::web::block(move || {
            let mut conn = pool.get().map_err(StorageError::from)?;
            crate::webhook::worker::load_enabled(&mut conn, &webhooks)
        })
        .await;
        match read {
            Ok(Ok(())) => {}
            Ok(Err(e)) => log::warn!("enabled webhooks not read again: {e}"),
            Err(e) => log::warn!("enabled webhooks not read again: {e}"),
        }
    }
}

/// Reads again the enabled webhooks of instances whose webhooks changed on
/// another node ([`crate::webhook::Webhooks::changed_elsewhere`]), those
/// waiting together in one go. Each read carries its ticket, so two notices
/// arriving in the other order than their changes were made leave the
/// newer state. A read that fails leaves it to the next refresh.
pub async fn reread_webhooks(
    webhooks: Arc<crate::webhook::Webhooks>,
    pool: DbPool,
    mut asked: tokio::sync::mpsc::UnboundedReceiver<InstanceId>,
) {
    while let Some(first) = asked.recv().await {
        let mut ids = vec![first];
        while let Ok(more) = asked.try_recv() {
            if !ids.contains(&more) {
                ids.push(more);
            }
        }
        let (pool, webhooks) = (pool.clone(), webhooks.clone());
        let read = actix_web::web::block(move || {
            let mut conn = pool.get().map_err(StorageError::from)?;
            for id in ids {
                crate::webhook::worker::read_enabled(&mut conn, &webhooks, id)?;
            }
            Ok::<(), StorageError>(())
        })
        .await;
        match read {
            Ok(Ok(())) => {}
            Ok(Err(e)) => log::warn!("webhooks changed on another node not read: {e}"),
            Err(e) => log::warn!("webhooks changed on another node not read: {e}"),
        }
    }
}

/// Applies every running instance's stored settings (or its deletion).
async fn refresh_instances(registry: &Registry, pool: &DbPool) {
    for id in registry.ids() {
        let pool = pool.clone();
        let looked_up = actix_web::web::block(move || {
            let mut conn = pool.get().map_err(StorageError::from)?;
            storage::instances::find_by_id(&mut conn, id)
        })
        .await;
        match looked_up {
            Ok(Ok(Some(rec))) => registry.apply(Change::Settings {
                instance: id,
                settings: rec.config,
            }),
            Ok(Ok(None)) => registry.apply(Change::Deleted { instance: id }),
            Ok(Err(e)) => {
                log::warn!("refresh from storage skipped: {e}");
                return;
            }
            Err(e) => {
                log::warn!("refresh from storage skipped: {e}");
                return;
            }
        }
    }
}
