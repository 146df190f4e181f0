//! Authorisations remembered for a few seconds, so the hot paths (publish,
//! upgrade) do not ask the database on every request, and so connected
//! producers keep publishing from memory while the database is down.
//!
//! Keys hold a token's SHA-256, never the token. Entries of an instance are
//! forgotten when its settings change or it is deleted, on this node or (via
//! the bus) on another.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::{token_hash, Access, Principal};
use crate::domain::InstanceId;

/// How long an entry is used without asking the database again.
pub const FRESH_FOR: Duration = Duration::from_secs(5);

/// Most entries kept; past it the cache starts over.
const MAX_ENTRIES: usize = 100_000;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    token_hash: String,
    instance: String,
    account_only: bool,
}

struct Entry {
    access: Access,
    at: Instant,
}

/// Remembered `authorize` results for instance-scoped requests.
#[derive(Default)]
pub struct AccessCache {
    entries: Mutex<HashMap<Key, Entry>>,
}

/// A lookup's key, built once per request.
pub struct CacheKey(Key);

impl CacheKey {
    pub fn new(token: &str, instance: &str, account_only: bool) -> Self {
        CacheKey(Key {
            token_hash: token_hash(token),
            instance: instance.to_string(),
            account_only,
        })
    }
}

impl AccessCache {
    /// A remembered result no older than `FRESH_FOR`.
    pub fn fresh(&self, key: &CacheKey) -> Option<Access> {
        let entries = self.entries.lock();
        entries
            .get(&key.0)
            .filter(|e| e.at.elapsed() < FRESH_FOR)
            .map(|e| e.access.clone())
    }

    /// A remembered result of any age (used only when the database fails).
    pub fn stale(&self, key: &CacheKey) -> Option<Access> {
        self.entries.lock().get(&key.0).map(|e| e.access.clone())
    }

    pub fn insert(&self, key: CacheKey, access: Access) {
        let mut entries = self.entries.lock();
        if entries.len() >= MAX_ENTRIES {
            entries.clear();
        }
        entries.insert(
            key.0,
            Entry {
                access,
                at: Instant::now(),
            },
        );
    }

    /// Forgets every entry that names the instance (as target or as token owner).
    pub fn forget_instance(&self, id: InstanceId) {
        self.entries.lock().retain(|_, e| {
            let target = e.access.instance.as_ref().is_some_and(|i| i.id == id);
            let owner = matches!(&e.access.principal, Principal::Instance(rec) if rec.id == id);
            !(target || owner)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::AccountId;
    use crate::storage::instances::InstanceRecord;

    fn access(id: i64) -> Access {
        Access {
            principal: Principal::Account(AccountId(1)),
            instance: Some(InstanceRecord {
                id: InstanceId(id),
                account: AccountId(1),
                name: format!("i{id}"),
                token: "t".into(),
                config: None,
            }),
        }
    }

    #[test]
    fn remembers_and_forgets_by_instance() {
        let cache = AccessCache::default();
        cache.insert(CacheKey::new("tok", "i1", true), access(1));
        cache.insert(CacheKey::new("tok", "i2", true), access(2));
        assert!(cache.fresh(&CacheKey::new("tok", "i1", true)).is_some());
        assert!(cache.fresh(&CacheKey::new("tok", "i1", false)).is_none());
        assert!(cache.fresh(&CacheKey::new("other", "i1", true)).is_none());
        cache.forget_instance(InstanceId(1));
        assert!(cache.stale(&CacheKey::new("tok", "i1", true)).is_none());
        assert!(cache.stale(&CacheKey::new("tok", "i2", true)).is_some());
    }
}
