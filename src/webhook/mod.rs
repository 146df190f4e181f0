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
    /// A stored webhook as the publish path needs it, when it is enabled.
    pub fn of(row: &crate::storage::webhooks::WebhookRow) -> Option<EnabledWebhook> {
        row.enabled.then(|| EnabledWebhook {
            id: row.id,
            events: row.event_kinds(),
        })
    }

    /// Whether an event of `kind` becomes a delivery for this webhook.
    pub fn wants(&self, kind: EventKind) -> bool {
        EventSet::of(&self.events).allows(kind)
    }
}

/// When a read of the enabled webhooks from storage began, on this node's
/// one counter: a read that began later sees every change committed before
/// it began, so of two results the later read's is the newer state,
/// whichever arrives first.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct ReadTicket(u64);

/// What this node knows, and since which read.
#[derive(Debug, Default)]
struct Known {
    enabled: HashMap<InstanceId, Arc<[EnabledWebhook]>>,
    /// Per instance, the read its entry came from, when newer than `floor`.
    read_at: HashMap<InstanceId, ReadTicket>,
    /// The read every entry is at least as new as (the last full read;
    /// tickets start at 1).
    floor: ReadTicket,
}

impl Known {
    /// Whether a read taken at `ticket` is not older than what is known of `instance`.
    fn takes(&self, instance: InstanceId, ticket: ReadTicket) -> bool {
        ticket >= self.floor && self.read_at.get(&instance).is_none_or(|t| ticket >= *t)
    }
}

/// Every instance's enabled webhooks on this node, and the bell that wakes
/// this node's delivery workers. Each change is applied with the
/// [`ReadTicket`] of the storage read it came from, and an older read never
/// replaces a newer one: two changes of one instance's webhooks, made on
/// two nodes or two workers, reach this node in either order.
#[derive(Debug, Default)]
pub struct Webhooks {
    known: RwLock<Known>,
    reads: AtomicU64,
    /// Counts the changes of webhooks seen here: what the delivery workers
    /// read of a webhook at one generation is stale at the next.
    generation: AtomicU64,
    /// Where an instance changed on another node is read again (set at
    /// start-up; without it the notice's own list is taken).
    reread: std::sync::OnceLock<tokio::sync::mpsc::UnboundedSender<InstanceId>>,
    /// Rung when deliveries were stored or requeued.
    pub wake: Notify,
}

impl Webhooks {
    /// The instance's enabled webhooks (empty for most instances).
    pub fn enabled(&self, instance: InstanceId) -> Option<Arc<[EnabledWebhook]>> {
        self.known.read().enabled.get(&instance).cloned()
    }

    /// Whether every enabled webhook's id is in `ids` (sorted), as when
    /// none is enabled: then a claim that leaves those out can take nothing.
    pub fn all_among(&self, ids: &[i64]) -> bool {
        self.known
            .read()
            .enabled
            .values()
            .flat_map(|hooks| hooks.iter())
            .all(|h| ids.binary_search(&h.id).is_ok())
    }

    /// The count of webhook changes seen on this node.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Taken just before reading enabled webhooks from storage.
    pub fn ticket(&self) -> ReadTicket {
        ReadTicket(self.reads.fetch_add(1, Ordering::AcqRel) + 1)
    }

    /// Replaces what is known of one instance (after any change of one of
    /// its webhooks, its URL or secret too) with what a read taken at
    /// `ticket` found, unless a newer read is known.
    pub fn set(&self, instance: InstanceId, ticket: ReadTicket, hooks: Vec<EnabledWebhook>) {
        let mut known = self.known.write();
        if !known.takes(instance, ticket) {
            return;
        }
        self.generation.fetch_add(1, Ordering::AcqRel);
        known.read_at.insert(instance, ticket);
        if hooks.is_empty() {
            known.enabled.remove(&instance);
        } else {
            known.enabled.insert(instance, hooks.into());
        }
    }

    /// Sets what is known of `instance` as of now, without a read: a state
    /// this node knows after a commit (a deletion, a new instance's webhook,
    /// or a notice it cannot read again). Any read begun before it is older.
    pub fn set_now(&self, instance: InstanceId, hooks: Vec<EnabledWebhook>) {
        self.set(instance, self.ticket(), hooks);
    }

    /// Replaces everything (start-up, and the periodic re-read from
    /// storage, begun at `ticket`), except instances known from a newer read.
    pub fn replace_all(&self, ticket: ReadTicket, all: HashMap<InstanceId, Vec<EnabledWebhook>>) {
        let mut known = self.known.write();
        if ticket < known.floor {
            return;
        }
        let mut fresh: HashMap<InstanceId, Arc<[EnabledWebhook]>> = all
            .into_iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(k, v)| (k, Arc::from(v)))
            .collect();
        let newer: Vec<InstanceId> = known
            .read_at
            .iter()
            .filter(|(_, t)| **t > ticket)
            .map(|(i, _)| *i)
            .collect();
        for instance in newer {
            match known.enabled.get(&instance) {
                Some(hooks) => fresh.insert(instance, hooks.clone()),
                None => fresh.remove(&instance),
            };
        }
        known.read_at.retain(|_, t| *t > ticket);
        known.floor = ticket;
        if known.enabled != fresh {
            self.generation.fetch_add(1, Ordering::AcqRel);
            known.enabled = fresh;
        }
    }

    /// Where instances changed on other nodes are sent to be read again.
    pub fn reread_with(&self, to: tokio::sync::mpsc::UnboundedSender<InstanceId>) {
        let _ = self.reread.set(to);
    }

    /// A change of `instance`'s webhooks made on another node, with the list
    /// it read there: read again here when this node can (that notice and
    /// another may arrive in either order), else taken as it is.
    pub fn changed_elsewhere(&self, instance: InstanceId, hooks: Vec<EnabledWebhook>) {
        let sent = self
            .reread
            .get()
            .is_some_and(|to| to.send(instance).is_ok());
        if !sent {
            self.set_now(instance, hooks);
        }
    }

    /// Wakes the delivery workers of this node.
    pub fn ring(&self) {
        self.wake.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::{EnabledWebhook, InstanceId, Webhooks};
    use crate::settings::Settings;
    use std::collections::HashMap;

    fn hooks(ids: &[i64]) -> Vec<EnabledWebhook> {
        ids.iter()
            .map(|id| EnabledWebhook {
                id: *id,
                events: Vec::new(),
            })
            .collect()
    }

    fn ids(w: &Webhooks, instance: InstanceId) -> Vec<i64> {
        w.enabled(instance)
            .map(|h| h.iter().map(|e| e.id).collect())
            .unwrap_or_default()
    }

    /// Two reads of one instance's webhooks that finish in the other order
    /// than they began: the later-begun read's state stays.
    #[test]
    fn an_older_read_never_replaces_a_newer_one() {
        let w = Webhooks::default();
        let i = InstanceId(7);
        let older = w.ticket();
        let newer = w.ticket();
        w.set(i, newer, hooks(&[1, 2]));
        w.set(i, older, hooks(&[1]));
        assert_eq!(ids(&w, i), [1, 2]);
        // A full read begun before that newer one keeps it, and sets the rest.
        let other = InstanceId(8);
        let full = {
            let mut all = HashMap::new();
            all.insert(i, hooks(&[1]));
            all.insert(other, hooks(&[3]));
            all
        };
        w.replace_all(older, full);
        assert_eq!((ids(&w, i), ids(&w, other)), (vec![1, 2], vec![3]));
        // Once a later full read is in, reads begun before it are ignored.
        let last = w.ticket();
        w.replace_all(last, HashMap::new());
        assert!(w.all_among(&[]), "none enabled");
        w.set(i, newer, hooks(&[9]));
        assert!(w.all_among(&[]), "a read older than the last full one");
        w.set_now(i, hooks(&[4]));
        assert_eq!(ids(&w, i), [4]);
    }

    /// A claim is skipped only when it would leave out every enabled
    /// webhook of every instance (none enabled: nothing to leave out).
    #[test]
    fn every_enabled_webhook_among_the_excluded() {
        let w = Webhooks::default();
        assert!(w.all_among(&[]), "no webhook enabled");
        w.set_now(InstanceId(1), hooks(&[3, 9]));
        w.set_now(InstanceId(2), hooks(&[5]));
        assert!(!w.all_among(&[]));
        assert!(!w.all_among(&[3, 9]), "webhook 5 of the other instance");
        assert!(!w.all_among(&[3, 5]));
        assert!(w.all_among(&[3, 5, 9]));
        assert!(w.all_among(&[1, 3, 5, 7, 9]), "ids not enabled are ignored");
        w.set_now(InstanceId(2), hooks(&[]));
        assert!(w.all_among(&[3, 9]), "webhook 5 disabled");
    }

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
        for bad in ["0", "x", "1,-2", "5,,5", "5,", ",5"] {
            assert!(load(schedule, bad).is_err(), "{bad}");
        }
        assert_eq!(
            load(schedule, " 5, 6 ")
                .unwrap()
                .webhook
                .retry_schedule_secs,
            vec![5, 6],
            "items are trimmed"
        );
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
