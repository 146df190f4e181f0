//! Webhooks (contract §11): durable, signed delivery of an instance's events
//! to HTTP receivers, at least once.
//!
//! - [`config`]: what a webhook is configured with, validated.
//! - [`address`]: the refused-address rule and the resolver that applies it.
//! - [`signature`], [`sealing`]: Standard Webhooks signatures; secrets at rest.
//! - [`intake`]: how publishes store their deliveries before the 202, many
//!   publishes to one commit.
//! - [`worker`]: the delivery loop of this node (claims, attempts, retries,
//!   dead letters), on tokio tasks off the HTTP workers.
//!
//! This file holds [`Webhooks`], the node's in-memory view of every
//! instance's *enabled* webhooks, so that a publish to an instance without
//! one touches no database. It is kept current like WebSocket settings:
//! changes arrive as [`crate::instance::Change::Webhooks`] through
//! `Registry::apply`, on every node. It never touches the database itself.

pub mod address;
pub mod client;
pub mod config;
pub mod intake;
pub mod sealing;
pub mod signature;
pub mod worker;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::domain::{EventKind, EventSet, InstanceId};

/// The longest an attempt may last: a longer `webhook.timeout_secs` is
/// taken as this (a day; past it a deadline would not fit the clock).
pub const LONGEST_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// How long an attempt may last (`webhook.timeout_secs`, at most
/// [`LONGEST_TIMEOUT`]).
pub fn attempt_timeout(s: &crate::settings::WebhookSettings) -> Duration {
    Duration::from_secs(s.timeout_secs).min(LONGEST_TIMEOUT)
}

/// [`attempt_timeout`] in milliseconds.
pub fn attempt_ms(s: &crate::settings::WebhookSettings) -> i64 {
    i64::try_from(attempt_timeout(s).as_millis()).unwrap_or(i64::MAX)
}

/// Checks the `[webhook]` settings that parse but cannot work: the key at
/// fault and why.
pub fn validate_settings(
    s: &crate::settings::WebhookSettings,
) -> Result<(), (&'static str, String)> {
    if s.timeout_secs == 0 {
        return Err(("webhook.timeout_secs", "must be greater than 0".into()));
    }
    if s.retry_schedule_secs.len() > 100 || s.retry_schedule_secs.contains(&0) {
        return Err((
            "webhook.retry_schedule_secs",
            "must be 0 to 100 positive integers".into(),
        ));
    }
    for (key, value) in [
        ("webhook.max_in_flight", s.max_in_flight as u64),
        ("webhook.max_pending", s.max_pending),
        ("webhook.dead_letter_hours", s.dead_letter_hours),
    ] {
        if value == 0 {
            return Err((key, "must be greater than 0".into()));
        }
    }
    if let Some(bad) = s
        .allowed_networks
        .iter()
        .find(|n| address::Network::parse(n).is_none())
    {
        return Err((
            "webhook.allowed_networks",
            format!("`{bad}` is not a CIDR such as 10.1.0.0/16"),
        ));
    }
    if sealing::Sealer::new(&s.encryption_key).is_err() {
        return Err((
            "webhook.encryption_key",
            "must be the base64 of 32 bytes".into(),
        ));
    }
    Ok(())
}

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
    /// Counts the changes of webhooks seen here: what the delivery workers
    /// read of a webhook at one generation is stale at the next.
    generation: AtomicU64,
    /// Rung when deliveries were stored or requeued.
    pub wake: Notify,
}

impl Webhooks {
    /// The instance's enabled webhooks (empty for most instances).
    pub fn enabled(&self, instance: InstanceId) -> Option<Arc<[EnabledWebhook]>> {
        self.enabled.read().get(&instance).cloned()
    }

    /// Whether any instance has an enabled webhook (else nothing can be due).
    pub fn any_enabled(&self) -> bool {
        !self.enabled.read().is_empty()
    }

    /// The count of webhook changes seen on this node.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Replaces what is known of one instance (after any change of one of
    /// its webhooks, its URL or secret too).
    pub fn set(&self, instance: InstanceId, hooks: Vec<EnabledWebhook>) {
        let mut map = self.enabled.write();
        self.generation.fetch_add(1, Ordering::AcqRel);
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
        let mut map = self.enabled.write();
        if *map != fresh {
            self.generation.fetch_add(1, Ordering::AcqRel);
            *map = fresh;
        }
    }

    /// Wakes the delivery workers of this node.
    pub fn ring(&self) {
        self.wake.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use crate::settings::Settings;

    fn load(var: &'static str, value: &'static str) -> Result<Settings, String> {
        Settings::load(None, &move |k| (k == var).then(|| value.to_string()))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn webhook_variables() {
        let schedule = "EVENTGATE_WEBHOOK_RETRY_SCHEDULE_SECS";
        assert_eq!(
            load(schedule, "1,1").unwrap().webhook.retry_schedule_secs,
            vec![1, 1]
        );
        assert!(load(schedule, "")
            .unwrap()
            .webhook
            .retry_schedule_secs
            .is_empty());
        assert_eq!(
            Settings::default().webhook.retry_schedule_secs,
            vec![5, 300, 1800, 7200, 18000, 36000, 36000]
        );
        for bad in ["0", "x", "1,-2"] {
            assert!(load(schedule, bad).is_err(), "{bad}");
        }
        let many: &'static str = Box::leak(vec!["1"; 101].join(",").into_boxed_str());
        assert!(load(schedule, many).is_err());
        assert!(load("EVENTGATE_WEBHOOK_ALLOWED_NETWORKS", "10.0.0.0/8, nope").is_err());
        assert!(load("EVENTGATE_ENCRYPTION_KEY", "c2hvcnQ=").is_err());
        let s = load("EVENTGATE_WEBHOOK_ALLOWED_NETWORKS", "127.0.0.0/8,::1/128").unwrap();
        assert_eq!(s.webhook.allowed_networks, vec!["127.0.0.0/8", "::1/128"]);
        assert_eq!(
            load("EVENTGATE_WEBHOOK_MAX_IN_FLIGHT", "3")
                .unwrap()
                .webhook
                .max_in_flight,
            3
        );
        assert!(load("EVENTGATE_WEBHOOK_TIMEOUT_SECS", "0").is_err());
    }
}
