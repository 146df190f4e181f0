//! Webhooks (contract §11): durable, signed delivery of an instance's events
//! to HTTP receivers, at least once.
//!
//! - [`config`]: what a webhook is configured with, validated.
//! - [`address`]: the refused-address rule and the resolver that applies it.
//! - [`signature`], [`sealing`]: Standard Webhooks signatures; secrets at rest.
//! - [`worker`]: the delivery loop of this node (claims, attempts, retries,
//!   dead letters), on tokio tasks off the HTTP workers.
//!
//! This file holds [`Webhooks`], the node's in-memory view of every
//! instance's *enabled* webhooks, so that a publish to an instance without
//! one touches no database. It is kept current like WebSocket settings:
//! changes arrive as [`crate::instance::Change::Webhooks`] through
//! `Registry::apply`, on every node. It never touches the database itself.

pub mod address;
pub mod config;
pub mod sealing;
pub mod signature;
pub mod worker;

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::RwLock;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::domain::{EventKind, EventSet, InstanceId};

/// An enabled webhook as the publish path needs it (and as it crosses the bus).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnabledWebhook {
    /// Database id of the webhook.
    pub id: i64,
    /// Its event filter; empty = all six.
    pub events: Vec<EventKind>,
}

impl EnabledWebhook {
    /// Whether an event of `kind` becomes a delivery for this webhook.
    pub fn wants(&self, kind: EventKind) -> bool {
        EventSet::of(&self.events).allows(kind)
    }
}

/// Every instance's enabled webhooks on this node, and the bell that wakes
/// this node's delivery workers.
#[derive(Debug, Default)]
pub struct Webhooks {
    enabled: RwLock<HashMap<InstanceId, Arc<[EnabledWebhook]>>>,
    /// Rung when deliveries were stored or requeued.
    pub wake: Notify,
}

impl Webhooks {
    /// The instance's enabled webhooks (empty for most instances).
    pub fn enabled(&self, instance: InstanceId) -> Option<Arc<[EnabledWebhook]>> {
        self.enabled.read().get(&instance).cloned()
    }

    /// Replaces what is known of one instance.
    pub fn set(&self, instance: InstanceId, hooks: Vec<EnabledWebhook>) {
        let mut map = self.enabled.write();
        if hooks.is_empty() {
            map.remove(&instance);
        } else {
            map.insert(instance, hooks.into());
        }
    }

    /// Replaces everything (start-up, and the periodic re-read from storage).
    pub fn replace_all(&self, all: HashMap<InstanceId, Vec<EnabledWebhook>>) {
        let fresh = all
            .into_iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(k, v)| (k, Arc::from(v)))
            .collect();
        *self.enabled.write() = fresh;
    }

    /// Wakes the delivery workers of this node.
    pub fn ring(&self) {
        self.wake.notify_one();
    }
}
