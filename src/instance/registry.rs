//! The registry of instance actors on this node: created once before the HTTP
//! server, it starts an instance's actor on demand (spread over a few
//! arbiters so one busy instance does not hold the others back) and finds it
//! again for publishes and settings changes.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use actix::prelude::*;
use parking_lot::Mutex;

use super::actor::{FanoutEnv, InstanceActor};
use super::inbox::{NodeLoad, Pressure};
use super::messages::{CloseAll, CountSessions, Deleted};
use super::{Inbox, InstanceInfo, SharedAddr};
use crate::auth::AccessCache;
use crate::domain::{InstanceId, VersionedConfig};
use crate::metrics::MAX_INSTANCE_LABELS;
use crate::ws::close::CloseCode;

/// The per-instance metrics label shared by instances past the first
/// `MAX_INSTANCE_LABELS`.
pub const OTHER_LABEL: &str = "_other";

/// Instance actors by id, and the threads they run on.
pub struct Registry {
    instances: Mutex<HashMap<InstanceId, Inbox>>,
    /// Instances deleted since the start (ids are never reused): an actor
    /// started for one by a request authorised just before the deletion is
    /// told at once, and stops.
    deleted: Mutex<HashSet<InstanceId>>,
    arbiters: Vec<Arbiter>,
    next_arbiter: AtomicUsize,
    env: FanoutEnv,
    labelled: AtomicUsize,
    /// How busy this node's instance actors are, together (see
    /// `Pressure::node`; only with direct writes).
    node: Option<Arc<NodeLoad>>,
    /// Remembered authorisations, forgotten on every change (see [`super::change`]).
    access: Arc<AccessCache>,
    /// Every instance's enabled webhooks (see [`crate::webhook::Webhooks`]).
    webhooks: Arc<crate::webhook::Webhooks>,
    me: Weak<Registry>,
}

impl Registry {
    /// Starts `arbiters` threads for instance actors; with 0, an instance's
    /// actor runs on the HTTP worker thread that first needs it (no
    /// cross-thread hand-off on the way to its sessions). Call inside an
    /// actix system.
    pub fn new(arbiters: usize, env: FanoutEnv, access: Arc<AccessCache>) -> Arc<Self> {
        Arc::new_cyclic(|me| Registry {
            instances: Mutex::new(HashMap::new()),
            deleted: Mutex::default(),
            arbiters: (0..arbiters).map(|_| Arbiter::new()).collect(),
            next_arbiter: AtomicUsize::new(0),
            node: env.direct_writes.then(Arc::default),
            env,
            labelled: AtomicUsize::new(0),
            access,
            webhooks: Arc::default(),
            me: me.clone(),
        })
    }

    /// Remembered authorisations of the hot paths.
    pub fn access(&self) -> &AccessCache {
        &self.access
    }

    /// Every instance's enabled webhooks on this node.
    pub fn webhooks(&self) -> &Arc<crate::webhook::Webhooks> {
        &self.webhooks
    }

    /// What every instance actor of this node shares.
    pub fn env(&self) -> &FanoutEnv {
        &self.env
    }

    /// The instance's actor, if it runs on this node.
    pub fn get(&self, id: InstanceId) -> Option<Addr<InstanceActor>> {
        self.instances.lock().get(&id).map(Inbox::addr)
    }

    /// Where the instance's published events go, if its actor runs on this node.
    pub fn inbox(&self, id: InstanceId) -> Option<Inbox> {
        self.instances.lock().get(&id).cloned()
    }

    /// The instance's actor, started with `config` when it is not running
    /// (its address shared, for `do_send`: see [`SharedAddr`]).
    pub fn get_or_start(
        &self,
        info: InstanceInfo,
        config: Option<VersionedConfig>,
    ) -> Arc<SharedAddr> {
        let mut instances = self.instances.lock();
        if let Some(inbox) = instances.get(&info.id).filter(|i| i.connected()) {
            return inbox.shared_addr();
        }
        let label = if self.labelled.fetch_add(1, Ordering::AcqRel) < MAX_INSTANCE_LABELS {
            format!("{}#{}", info.name, info.id.0)
        } else {
            self.labelled.fetch_sub(1, Ordering::AcqRel);
            OTHER_LABEL.to_string()
        };
        let arbiter = match self.arbiters.len() {
            0 => Arbiter::current(),
            n => self.arbiters[self.next_arbiter.fetch_add(1, Ordering::Relaxed) % n].handle(),
        };
        let (id, name) = (info.id, info.name.clone());
        let (env, me) = (self.env.clone(), self.me.clone());
        let pressure = Arc::new(Pressure::on_node(self.node.clone()));
        let inbox_env = env.clone();
        let shared = pressure.clone();
        let addr = InstanceActor::start_in_arbiter(&arbiter, move |_| {
            InstanceActor::new(info, config, env, me, label, shared)
        });
        if self.deleted.lock().contains(&id) {
            addr.do_send(Deleted);
        }
        let inbox = Inbox::new(addr, &name, pressure, &inbox_env);
        let addr = inbox.shared_addr();
        instances.insert(id, inbox);
        addr
    }

    /// Remembers that the instance was deleted, before its actor (if any)
    /// is told: whichever of a deletion and a start comes second under the
    /// actors' lock sees the other.
    pub(super) fn mark_deleted(&self, id: InstanceId) {
        self.deleted.lock().insert(id);
    }

    /// Forgets a stopped actor (only if it is still the one registered).
    pub(super) fn remove(&self, id: InstanceId, addr: &Addr<InstanceActor>, label: &str) {
        let mut instances = self.instances.lock();
        if instances.get(&id).is_some_and(|i| i.leads_to(addr)) {
            instances.remove(&id);
        }
        if label != OTHER_LABEL {
            self.labelled.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Ids of every running instance actor.
    pub fn ids(&self) -> Vec<InstanceId> {
        self.instances.lock().keys().copied().collect()
    }

    /// Every running instance actor.
    pub fn all(&self) -> Vec<Addr<InstanceActor>> {
        self.instances.lock().values().map(Inbox::addr).collect()
    }

    /// Clients of the instance connected to this node.
    pub async fn connected(&self, id: InstanceId) -> usize {
        match self.get(id) {
            Some(addr) => addr.send(CountSessions).await.unwrap_or(0),
            None => 0,
        }
    }

    /// Closes every session of every instance with `code`; returns how many.
    pub async fn close_all(&self, code: CloseCode) -> usize {
        let mut closed = 0;
        for addr in self.all() {
            closed += addr.send(CloseAll(code)).await.unwrap_or(0);
        }
        closed
    }

    /// Whether every instance thread, and every instance actor, answers
    /// within `timeout` (watchdog).
    pub async fn ping(&self, timeout: Duration) -> bool {
        let mut threads = Vec::with_capacity(self.arbiters.len());
        for arbiter in &self.arbiters {
            let (tx, rx) = tokio::sync::oneshot::channel();
            if !arbiter.spawn(async move {
                let _ = tx.send(());
            }) {
                return false;
            }
            threads.push(rx);
        }
        let actors: Vec<_> = self
            .all()
            .into_iter()
            .map(|a| a.send(CountSessions))
            .collect();
        let all = async {
            let threads = futures_util::future::join_all(threads).await;
            let actors = futures_util::future::join_all(actors).await;
            threads.iter().all(Result::is_ok) && actors.iter().all(Result::is_ok)
        };
        matches!(tokio::time::timeout(timeout, all).await, Ok(true))
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        for arbiter in &self.arbiters {
            arbiter.stop();
        }
    }
}
