//! Connection limits: WebSocket clients per instance, per account and per
//! node. A slot is taken before the upgrade and given back when the session
//! ends (the session owns it), so the counts are exact on this node.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::domain::{AccountId, InstanceId};
use crate::error::ApiError;
use crate::settings::LimitSettings;

#[derive(Default)]
struct Counts {
    node: usize,
    instances: HashMap<InstanceId, usize>,
    accounts: HashMap<AccountId, usize>,
}

/// The limits and the live counts of this node.
pub struct ConnectionLimits {
    per_node: usize,
    per_account: usize,
    per_instance: usize,
    counts: Mutex<Counts>,
    /// Slots given back since start: clients that left.
    released: AtomicU64,
}

/// One connected client's place in the counts; released on drop.
pub struct ConnectionSlot {
    limits: Arc<ConnectionLimits>,
    instance: InstanceId,
    account: AccountId,
}

/// Decrements a per-key count, forgetting keys that reach zero.
fn release<K: std::hash::Hash + Eq>(map: &mut HashMap<K, usize>, key: &K) {
    if let Some(n) = map.get_mut(key) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            map.remove(key);
        }
    }
}

impl ConnectionLimits {
    /// Limits from settings; 0 means unlimited.
    pub fn new(limits: &LimitSettings) -> Arc<Self> {
        Arc::new(Self {
            per_node: limits.max_connections,
            per_account: limits.max_connections_per_account,
            per_instance: limits.max_connections_per_instance,
            counts: Mutex::new(Counts::default()),
            released: AtomicU64::new(0),
        })
    }

    /// How many clients have left this node since it started.
    pub fn departures(&self) -> u64 {
        self.released.load(Ordering::Relaxed)
    }

    /// Takes a slot, or says which limit is reached: 503 for the node, 429
    /// for the account or the instance.
    pub fn acquire(
        self: &Arc<Self>,
        instance: InstanceId,
        account: AccountId,
    ) -> Result<ConnectionSlot, ApiError> {
        let mut counts = self.counts.lock();
        let full = |limit: usize, count: usize| limit > 0 && count >= limit;
        if full(self.per_node, counts.node) {
            return Err(ApiError::NodeFull);
        }
        if full(
            self.per_account,
            counts.accounts.get(&account).copied().unwrap_or(0),
        ) {
            return Err(ApiError::TooManyConnections {
                details: format!("at most {} clients per account", self.per_account),
            });
        }
        if full(
            self.per_instance,
            counts.instances.get(&instance).copied().unwrap_or(0),
        ) {
            return Err(ApiError::TooManyConnections {
                details: format!("at most {} clients per instance", self.per_instance),
            });
        }
        counts.node += 1;
        *counts.accounts.entry(account).or_default() += 1;
        *counts.instances.entry(instance).or_default() += 1;
        Ok(ConnectionSlot {
            limits: self.clone(),
            instance,
            account,
        })
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut counts = self.limits.counts.lock();
        counts.node = counts.node.saturating_sub(1);
        release(&mut counts.accounts, &self.account);
        release(&mut counts.instances, &self.instance);
        self.limits.released.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_counted_and_given_back() {
        let limits = ConnectionLimits::new(&LimitSettings {
            max_connections: 3,
            max_connections_per_account: 2,
            max_connections_per_instance: 1,
            ..LimitSettings::default()
        });
        let (a, b) = (AccountId(1), AccountId(2));
        let first = limits.acquire(InstanceId(1), a).unwrap();
        assert!(matches!(
            limits.acquire(InstanceId(1), a),
            Err(ApiError::TooManyConnections { .. })
        ));
        let _second = limits.acquire(InstanceId(2), a).unwrap();
        assert!(matches!(
            limits.acquire(InstanceId(3), a),
            Err(ApiError::TooManyConnections { .. })
        ));
        let _third = limits.acquire(InstanceId(4), b).unwrap();
        assert!(matches!(
            limits.acquire(InstanceId(5), b),
            Err(ApiError::NodeFull)
        ));
        assert_eq!(limits.departures(), 0);
        drop(first);
        assert_eq!(limits.departures(), 1);
        assert!(limits.acquire(InstanceId(1), a).is_ok());
        assert_eq!(limits.departures(), 2, "the slot taken and dropped above");
    }
}
