//! The delivery loop of one node (contract §11): claims due deliveries with a
//! lease, attempts them on tokio tasks on threads of their own
//! ([`AttemptThreads`]; never on an HTTP worker), and records
//! outcomes in batches — success, a retry after the jittered schedule (or a
//! receiver's `Retry-After`), or a dead letter (attempts used up, 410,
//! refused address); the outcomes of a bundle leased whole are recorded
//! together, when it is closed. Each webhook has a lane on this node: at
//! most `webhook.max_in_flight` attempts at once, and claims that run ahead
//! of them only while its receiver answers fast (a slow receiver holds about
//! its own slots, a bundle leased whole at most; what it cannot attempt
//! within the lease goes back unattempted). New deliveries of a webhook
//! whose lane has room and has taken every due delivery skip the claim: the
//! intake stores them in a bundle leased to this node and hands them to
//! the lane ([`Direct`]). Housekeeping beside it: the pending gauge,
//! dead-letter retention, and a periodic re-read of the enabled webhooks (a
//! safety net behind the bus).
//!
//! Storage work runs on the blocking pool; this module owns no HTTP route.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{HeaderMap, HeaderName, HeaderValue, AUTHORIZATION, CONTENT_TYPE, USER_AGENT};
use parking_lot::Mutex;
use rand::Rng;
use tokio::sync::mpsc;

use super::address::AddressPolicy;
use super::client::{Client, Endpoint, SendError};
use super::config::{ip_literal, target_url};
use super::sealing::Sealer;
use super::signature::{secret_key, signature_header, ROTATION_OVERLAP_MS};
use super::{EnabledWebhook, Webhooks};
use crate::domain::{EventKind, InstanceId};
use crate::events::{instance_data_json, stored_envelope};
use crate::instance::change::RefreshTimer;
use crate::metrics::Metrics;
use crate::settings::WebhookSettings;
use crate::storage::deliveries::{self, Claimed, Closing, LeasedBundle, Outcome, Rooms, Target};
use crate::storage::{clock, now_millis, webhooks, DbConn, DbPool, StorageError};

/// Deliveries claimed in one round.
const CLAIM_BATCH: i64 = 1024;

/// How many times its in-flight room a webhook whose receiver answers fast
/// may hold: claims run ahead of attempts, so the database round trip of a
/// claim is not between one attempt and the next. What a lane holds must
/// start within its lease (the attempt timeout and
/// `LEASE_MARGIN_MS - RECORD_MARGIN_MS`, 10 s): 1,024 deliveries at the
/// default in-flight limit, a tenth of a second of a fast receiver.
const PREFETCH: usize = 128;

/// An attempt that succeeded within this lets its webhook claim ahead.
const FAST_ATTEMPT: Duration = Duration::from_secs(1);

/// A queued delivery starts only while its lease covers a whole attempt
/// and this much more, to record the outcome.
const RECORD_MARGIN_MS: i64 = 5_000;

/// Outcomes recorded in one transaction at most.
const COMPLETE_BATCH: usize = 1024;

/// How long the recorder waits after an outcome for more to record in the
/// same transaction: without it, outcomes arriving one by one were
/// recorded nearly one transaction (and one blocking-pool hand-off) each.
const RECORD_GATHER: Duration = Duration::from_millis(2);

/// How long a webhook as a claim read it stands for its stored row when new
/// deliveries skip the claim: a change this node did not hear of (missed on
/// the bus, or made in the database) is used within this. Past it, the next
/// deliveries wait for a claim, which reads the row again.
pub const TARGET_FRESH: Duration = Duration::from_secs(1);

/// How often the loop looks for due deliveries when nothing woke it
/// (retries coming due, deliveries stored by another node without a bus).
const POLL: Duration = Duration::from_millis(500);

/// Retry due times a node keeps to claim them on time (beyond, the poll
/// finds them).
const RETRY_TIMES: usize = 4096;

/// How long past a retry's due time the loop waits for others due with it
/// (a receiver's outage makes many, each one claim otherwise).
const RETRY_GATHER: Duration = Duration::from_millis(20);

/// How often the pending gauge is refreshed and old dead letters purged.
const HOUSEKEEPING: Duration = Duration::from_secs(5);

/// Lease beyond the attempt timeout: room to record the outcome.
const LEASE_MARGIN_MS: i64 = 15_000;

/// Longest `Retry-After` honoured, in seconds.
const MAX_RETRY_AFTER: u64 = 3600;

/// Error of an attempt to an address the rule refuses.
pub const REFUSED_ADDRESS: &str = "refused address";

/// Error of an attempt whose secret or authorization cannot be decrypted.
pub const CANNOT_DECRYPT: &str = "cannot decrypt";

/// What the delivery loop needs.
#[derive(Clone)]
pub struct WorkerEnv {
    pub pool: DbPool,
    pub webhooks: Arc<Webhooks>,
    pub settings: WebhookSettings,
    pub metrics: Arc<Metrics>,
    /// `instanceData.baseUrl` of envelopes.
    pub base_url: Arc<str>,
    pub sealer: Sealer,
    pub client: Arc<Client>,
    /// The refused-address rule, for URLs that are IP literals.
    pub policy: Arc<AddressPolicy>,
    /// Ticks when housekeeping should run at once (the bus came back:
    /// wake-ups sent by other nodes meanwhile may be lost).
    pub resync: Option<tokio::sync::watch::Receiver<u64>>,
    /// Whether the node is shutting down.
    pub stopping: Arc<dyn Fn() -> bool + Send + Sync>,
    /// Where attempts and their connections run ([`AttemptThreads`]).
    pub attempts: tokio::runtime::Handle,
}

/// The threads attempts and their connections run on, one per core: off
/// the HTTP workers and the actix system thread, so a burst of deliveries
/// uses every core and the node's other work is not queued behind it.
/// Shut down, without waiting, when dropped.
pub struct AttemptThreads {
    runtime: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
}

impl AttemptThreads {
    pub fn start() -> std::io::Result<AttemptThreads> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .thread_name("eventgate-webhook")
            .enable_all()
            .build()?;
        Ok(AttemptThreads {
            handle: runtime.handle().clone(),
            runtime: Some(runtime),
        })
    }

    /// Where to spawn attempts.
    pub fn handle(&self) -> tokio::runtime::Handle {
        self.handle.clone()
    }
}

impl Drop for AttemptThreads {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Reads every enabled webhook into the node's map (start-up and the
/// periodic re-read, `instance::change::refresh_from_storage`; blocking).
pub fn load_enabled(conn: &mut DbConn, into: &Webhooks) -> Result<(), StorageError> {
    let read = into.ticket();
    let mut all: HashMap<InstanceId, Vec<EnabledWebhook>> = HashMap::new();
    for row in webhooks::enabled_all(conn)? {
        all.entry(InstanceId(row.instance_id))
            .or_default()
            .push(enabled_from(&row));
    }
    into.replace_all(read, all);
    Ok(())
}

/// Reads one instance's enabled webhooks into the node's map, with the
/// ticket of this read (after a change of them, made here or on another
/// node; blocking): the list read, for the other nodes.
pub fn read_enabled(
    conn: &mut DbConn,
    into: &Webhooks,
    instance: InstanceId,
) -> Result<Vec<EnabledWebhook>, StorageError> {
    let read = into.ticket();
    let enabled: Vec<EnabledWebhook> = webhooks::enabled_of(conn, instance)?
        .iter()
        .map(enabled_from)
        .collect();
    into.set(instance, read, enabled.clone());
    Ok(enabled)
}

/// The in-memory form of an enabled row.
pub fn enabled_from(row: &webhooks::EnabledRow) -> EnabledWebhook {
    EnabledWebhook {
        id: row.id,
        events: EventKind::ALL
            .into_iter()
            .filter(|k| {
                row.events.0 != crate::domain::EventSet::default() && row.events.0.allows(*k)
            })
            .collect(),
    }
}

/// Runs blocking storage work on the blocking pool.
pub(crate) async fn db<T: Send + 'static>(
    pool: &DbPool,
    f: impl FnOnce(&mut DbConn) -> Result<T, StorageError> + Send + 'static,
) -> Result<T, StorageError> {
    let pool = pool.clone();
    actix_web::web::block(move || {
        let mut conn = pool.get().map_err(StorageError::from)?;
        f(&mut conn)
    })
    .await
    .map_err(|e| StorageError::Blocking(e.to_string()))?
}

/// What this node holds of one webhook: deliveries claimed and not yet
/// recorded (queued here, being attempted, or attempted and waiting for the
/// recorder).
#[derive(Default)]
struct Lane {
    /// Claimed, not started yet, in acceptance order, with their lease's end.
    queued: VecDeque<(Claimed, i64)>,
    /// Being attempted: at most `webhook.max_in_flight`.
    sending: usize,
    /// Claimed and not yet recorded (queued + sending + finished), and
    /// room reserved by the intake for deliveries it is storing leased.
    held: usize,
    /// Whether the last attempt succeeded within [`FAST_ATTEMPT`]: then the
    /// lane claims ahead of its attempts ([`PREFETCH`]).
    fast: bool,
    /// Whether the last claim of this webhook took every due delivery of it
    /// and none was stored for a claim since: new deliveries may then skip
    /// the claim without starting before older ones.
    caught_up: bool,
    /// When the intake last handed deliveries to it (a webhook with
    /// traffic: its row is read again before it goes stale).
    handed_at: Option<Instant>,
}

impl Lane {
    /// Most deliveries the lane may hold.
    fn depth(&self, max: usize) -> usize {
        if self.fast {
            max * PREFETCH
        } else {
            max
        }
    }

    /// Whether a claim should skip this webhook: it is full, or (claiming
    /// ahead) still holds more than half its depth, so claims come in batches.
    fn skip_claim(&self, max: usize) -> bool {
        let depth = self.depth(max);
        if self.fast {
            self.held * 2 > depth
        } else {
            self.held >= depth
        }
    }
}

/// A webhook as its attempts need it, read by a claim: its row and
/// instance, with the secrets decrypted and the instance data of envelopes
/// made once, not at every attempt.
struct Prepared {
    target: Target,
    /// When the claim read it, and the generation of the enabled webhooks then.
    read_at: Instant,
    generation: u64,
    /// `instanceData` of its envelopes.
    instance_data: String,
    /// Where each kind of event goes (at `EventKind::index`; empty
    /// without a URL).
    destinations: Vec<Destination>,
    /// Its signing keys and authorization, or the error of every attempt.
    keys: Result<Keys, &'static str>,
}

/// The URL one kind of event is sent to.
struct Destination {
    /// Parsed once (`None`: it does not parse, and attempts fail).
    url: Option<Endpoint>,
    /// Whether it is an IP literal the refused-address rule refuses.
    refused: bool,
}

struct Keys {
    current: Vec<u8>,
    /// The previous secret's key, honoured until the given time.
    previous: Option<(Vec<u8>, i64)>,
    authorization: Option<HeaderValue>,
}

impl Prepared {
    fn new(env: &WorkerEnv, target: Target, generation: u64) -> Prepared {
        let keys = Self::keys(env, &target);
        let instance_data =
            instance_data_json(&env.base_url, &target.instance_name, &target.instance_token);
        let hook = &target.hook;
        let destinations = match hook.url.as_deref() {
            Some(url) => EventKind::ALL
                .into_iter()
                .map(|kind| {
                    let url = target_url(url, hook.by_events, kind);
                    Destination {
                        refused: ip_literal(&url).is_some_and(|ip| !env.policy.permits(ip)),
                        url: Endpoint::parse(&url),
                    }
                })
                .collect(),
            None => Vec::new(),
        };
        Prepared {
            target,
            read_at: Instant::now(),
            generation,
            instance_data,
            destinations,
            keys,
        }
    }

    fn keys(env: &WorkerEnv, target: &Target) -> Result<Keys, &'static str> {
        let hook = &target.hook;
        let decrypt = |stored: &str| {
            env.sealer.open(stored).map_err(|_| {
                log::warn!(
                    "webhook {} of instance {}: a stored secret cannot be decrypted",
                    hook.label,
                    target.instance_name
                );
                CANNOT_DECRYPT
            })
        };
        let key = |stored: &str| secret_key(&decrypt(stored)?).map_err(|_| CANNOT_DECRYPT);
        let previous = match (&hook.previous_secret, hook.rotated_at) {
            (Some(prev), Some(at)) => Some((key(prev)?, at + ROTATION_OVERLAP_MS)),
            _ => None,
        };
        let authorization = match &hook.auth_header {
            Some(a) => {
                Some(HeaderValue::from_str(&decrypt(a)?).map_err(|_| "invalid authorization")?)
            }
            None => None,
        };
        Ok(Keys {
            current: key(&hook.secret)?,
            previous,
            authorization,
        })
    }

    /// Whether new deliveries of this webhook may skip the claim on its strength.
    fn fresh(&self, generation: u64) -> bool {
        self.generation == generation
            && self.read_at.elapsed() < TARGET_FRESH
            && !self.target.hook.ordered
    }
}

/// The lanes of this node, by webhook id, and the targets their deliveries go to.
#[derive(Default)]
struct Lanes {
    lanes: HashMap<i64, Lane>,
    targets: HashMap<i64, Arc<Prepared>>,
    /// Counts the times the intake began storing deliveries for a claim: a
    /// claim marks webhooks caught up only when this did not move while it
    /// ran and none of those stores was still uncommitted when it began
    /// (its query could not see their rows).
    stored_for_claims: u64,
    /// Stores for a claim begun and not yet ended (committed or failed).
    storing_for_claims: usize,
    /// The due times (Unix ms) of retries this node recorded, earliest
    /// first, that no claim has looked for yet (at most [`RETRY_TIMES`]):
    /// the loop claims at each, not at its next poll, which made retries up
    /// to [`POLL`] later than their interval.
    retries_due: BinaryHeap<Reverse<i64>>,
}

impl Lanes {
    /// Remembers a retry due at `at`.
    fn retry_at(&mut self, at: i64) {
        if self.retries_due.len() < RETRY_TIMES {
            self.retries_due.push(Reverse(at));
        }
    }

    /// Forgets the retries a claim at `now` looks for.
    fn claimed_retries(&mut self, now: i64) {
        while self
            .retries_due
            .peek()
            .is_some_and(|Reverse(at)| *at <= now)
        {
            self.retries_due.pop();
        }
    }

    /// How long the loop may wait: until the next retry comes due, and
    /// [`RETRY_GATHER`] more, so that retries due together take one claim.
    fn until_next_retry(&self, now: i64) -> Duration {
        self.retries_due.peek().map_or(POLL, |Reverse(at)| {
            (Duration::from_millis(u64::try_from(at - now).unwrap_or(0)) + RETRY_GATHER).min(POLL)
        })
    }
}

type SharedLanes = Arc<Mutex<Lanes>>;

/// Deliveries stored leased to this node, on their way to their lanes,
/// with the bundles they were stored in.
type Handoff = (Vec<Claimed>, Vec<LeasedBundle>);

/// How the intake gives new deliveries straight to this node's lanes: it
/// reserves room in a lane, stores that many deliveries in one bundle
/// leased to this node in the publish's transaction, and hands them over
/// once committed. The lease keeps other nodes off them; if this node dies
/// they come due when it ends, as claimed ones do.
pub struct Direct {
    lanes: SharedLanes,
    webhooks: Arc<Webhooks>,
    max: usize,
    lease_ms: i64,
    handoff: mpsc::UnboundedSender<Handoff>,
    stopping: Arc<dyn Fn() -> bool + Send + Sync>,
}

impl Direct {
    /// The lease of deliveries stored at `now`.
    pub fn lease_until(&self, now: i64) -> i64 {
        now + self.lease_ms
    }

    /// How many of `n` new deliveries of `webhook` go straight to its lane,
    /// counted as held from now; the rest are for a claim, and the webhook
    /// is no longer caught up (they must start before any newer one).
    pub fn reserve(&self, webhook: i64, n: usize) -> usize {
        let generation = self.webhooks.generation();
        let stopping = (self.stopping)();
        let mut held = self.lanes.lock();
        let Lanes {
            lanes,
            targets,
            stored_for_claims,
            storing_for_claims,
            ..
        } = &mut *held;
        let fresh = targets.get(&webhook).is_some_and(|t| t.fresh(generation));
        let lane = lanes.entry(webhook).or_default();
        let room = if fresh && lane.caught_up && !stopping {
            lane.depth(self.max).saturating_sub(lane.held)
        } else {
            0
        };
        let take = room.min(n);
        lane.held += take;
        if take > 0 {
            lane.handed_at = Some(Instant::now());
        }
        if take < n {
            lane.caught_up = false;
            *stored_for_claims += 1;
            *storing_for_claims += 1;
        }
        take
    }

    /// Ends `n` stores for a claim that [`Direct::reserve`] began (their
    /// transaction committed or failed).
    pub fn stores_for_claims_ended(&self, n: usize) {
        if n > 0 {
            let mut held = self.lanes.lock();
            held.storing_for_claims = held.storing_for_claims.saturating_sub(n);
        }
    }

    /// Gives back room reserved for deliveries that were not stored leased.
    pub fn unreserve(&self, webhook: i64, n: usize) {
        if n == 0 {
            return;
        }
        let mut held = self.lanes.lock();
        if let Some(lane) = held.lanes.get_mut(&webhook) {
            lane.held = lane.held.saturating_sub(n);
        }
    }

    /// Hands deliveries stored leased in `bundles` to their lanes.
    pub fn hand_over(&self, rows: Vec<Claimed>, bundles: Vec<LeasedBundle>) {
        if !rows.is_empty() {
            // Closed only when the loop stopped: the leases then run out.
            let _ = self.handoff.send((rows, bundles));
        }
    }
}

/// Starts the delivery loop and the outcome recorder on the current
/// (actix system) runtime; returns the intake's way to its lanes.
pub fn start(env: WorkerEnv) -> Arc<Direct> {
    let lanes: SharedLanes = Arc::default();
    let (done_tx, done_rx) = mpsc::unbounded_channel::<Record>();
    let (handoff, handoffs) = mpsc::unbounded_channel::<Handoff>();
    let direct = Arc::new(Direct {
        lanes: lanes.clone(),
        webhooks: env.webhooks.clone(),
        max: env.settings.max_in_flight,
        lease_ms: lease_ms(&env.settings),
        handoff,
        stopping: env.stopping.clone(),
    });
    actix_web::rt::spawn(record_outcomes(env.clone(), lanes.clone(), done_rx));
    actix_web::rt::spawn(housekeeping(env.clone()));
    actix_web::rt::spawn(take_handoffs(
        env.clone(),
        lanes.clone(),
        handoffs,
        done_tx.clone(),
    ));
    actix_web::rt::spawn(refresh_targets(env.clone(), lanes.clone()));
    actix_web::rt::spawn(dispatch(env, lanes, done_tx));
    direct
}

/// Reads again, before they go stale, the webhooks whose new deliveries
/// skip the claim (and did in the last two seconds), so a busy webhook
/// keeps doing so: otherwise every
/// [`TARGET_FRESH`] its deliveries would wait for a claim (a write, which
/// on SQLite may wait behind publishes) just to read the webhook again.
async fn refresh_targets(env: WorkerEnv, lanes: SharedLanes) {
    loop {
        tokio::time::sleep(TARGET_FRESH / 4).await;
        if (env.stopping)() {
            return;
        }
        let generation = env.webhooks.generation();
        let due: Vec<i64> = {
            let held = lanes.lock();
            held.lanes
                .iter()
                .filter(|(w, lane)| {
                    lane.caught_up
                        && lane
                            .handed_at
                            .is_some_and(|at| at.elapsed() < TARGET_FRESH * 2)
                        && held.targets.get(w).is_some_and(|t| {
                            t.generation == generation && t.read_at.elapsed() > TARGET_FRESH / 2
                        })
                })
                .map(|(w, _)| *w)
                .collect()
        };
        if due.is_empty() {
            continue;
        }
        match db(&env.pool, move |conn| deliveries::targets(conn, &due)).await {
            Ok(read) => {
                let mut held = lanes.lock();
                for t in read {
                    if held.lanes.contains_key(&t.hook.id) {
                        held.targets
                            .insert(t.hook.id, Arc::new(Prepared::new(&env, t, generation)));
                    }
                }
            }
            Err(e) => log::debug!("webhooks not read again: {e}"),
        }
    }
}

/// How long a claim (or a delivery stored leased) holds a delivery.
fn lease_ms(settings: &WebhookSettings) -> i64 {
    super::attempt_ms(settings) + LEASE_MARGIN_MS
}

/// How long after a webhook is made `ordered` a delivery of it started as
/// unordered may still be in flight: a lease taken at that moment by the
/// node that hears of the change last (changes reach every node within
/// 1 s, and an intake trusts what it read for [`TARGET_FRESH`] more).
pub fn ordered_hold_ms(settings: &WebhookSettings) -> i64 {
    lease_ms(settings) + 2_000
}

/// Puts deliveries the intake stored leased into their lanes and starts them.
async fn take_handoffs(
    env: WorkerEnv,
    lanes: SharedLanes,
    mut handoffs: mpsc::UnboundedReceiver<Handoff>,
    done: mpsc::UnboundedSender<Record>,
) {
    while let Some((rows, bundles)) = handoffs.recv().await {
        let leases: HashMap<i64, i64> = bundles.iter().map(|b| (b.seq, b.lease_until)).collect();
        // Before any of their deliveries starts (and may be recorded).
        for b in bundles {
            let _ = done.send(Record::Leased(b));
        }
        let mut held = lanes.lock();
        let mut touched = Vec::new();
        for row in rows {
            let w = row.webhook_id;
            let lease_until = leases.get(&row.bundle).copied().unwrap_or(0);
            // The room was reserved (held) before the rows were stored.
            held.lanes
                .entry(w)
                .or_default()
                .queued
                .push_back((row, lease_until));
            touched.push(w);
        }
        touched.sort_unstable();
        touched.dedup();
        for w in touched {
            start_attempts(&env, &lanes, &mut held, w, &done);
        }
    }
}

async fn dispatch(env: WorkerEnv, lanes: SharedLanes, done: mpsc::UnboundedSender<Record>) {
    let lease_ms = lease_ms(&env.settings);
    let max = env.settings.max_in_flight;
    let mut failing_since: Option<Instant> = None;
    loop {
        if (env.stopping)() {
            release_queued(&lanes, &done);
            return;
        }
        let generation = env.webhooks.generation();
        let (exclude, room, mark): (Vec<i64>, Rooms, Option<u64>) = {
            let mut held = lanes.lock();
            // Idle lanes of webhooks changed since they were read go: a
            // claim makes them again as they are now.
            let Lanes { lanes, targets, .. } = &mut *held;
            lanes.retain(|w, l| {
                let current = targets.get(w).is_some_and(|t| t.generation == generation);
                if l.held == 0 && !current {
                    targets.remove(w);
                }
                l.held > 0 || current
            });
            let mut exclude: Vec<i64> = held
                .lanes
                .iter()
                .filter(|(_, l)| l.skip_claim(max))
                .map(|(id, _)| *id)
                .collect();
            exclude.sort_unstable();
            let room = Rooms {
                known: held
                    .lanes
                    .iter()
                    .map(|(id, l)| (*id, l.depth(max).saturating_sub(l.held)))
                    .collect(),
                // A webhook this node holds nothing of starts with its in-flight room.
                default: max,
                most: max * PREFETCH,
            };
            // Rows of a store not committed yet are not seen by this claim.
            let mark = (held.storing_for_claims == 0).then_some(held.stored_for_claims);
            (exclude, room, mark)
        };
        let now = now_millis();
        // This claim looks for every retry due by now.
        lanes.lock().claimed_retries(now);
        if env.webhooks.all_among(&exclude) {
            // No enabled webhook anywhere (the map is the cluster's), or
            // every one's lane here is full: a claim could take nothing,
            // so none touches the database. Room freed in a lane whose
            // webhook has deliveries left in the database rings.
            wait_for_work(&env, &lanes).await;
            continue;
        }
        let lease_until = now + lease_ms;
        let (asked, excluded) = (room.clone(), exclude.clone());
        let claimed = db(&env.pool, move |conn| {
            deliveries::claim(conn, now, lease_until, CLAIM_BATCH, &exclude, &room)
        })
        .await;
        let claim = match claimed {
            Ok(found) => {
                failing_since = None;
                found
            }
            Err(e) => {
                if failing_since.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                    log::warn!("webhook deliveries cannot be claimed: {e}");
                    failing_since = Some(Instant::now());
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let full_round = !claim.complete;
        // Before any of their deliveries starts (and may be recorded).
        for b in claim.bundles {
            let _ = done.send(Record::Leased(b));
        }
        {
            let mut held = lanes.lock();
            for t in claim.targets {
                held.targets
                    .insert(t.hook.id, Arc::new(Prepared::new(&env, t, generation)));
            }
            let mut found: HashMap<i64, usize> = HashMap::new();
            for row in claim.rows {
                let w = row.webhook_id;
                let lane = held.lanes.entry(w).or_default();
                lane.held += 1;
                lane.queued.push_back((row, lease_until));
                *found.entry(w).or_insert(0) += 1;
            }
            // A webhook the claim asked more of than it found has nothing
            // due left, unless the intake stored some for a claim meanwhile
            // (or was storing some when the claim began).
            if !full_round && mark == Some(held.stored_for_claims) {
                for (w, lane) in held.lanes.iter_mut() {
                    if !excluded.contains(w) && found.get(w).copied().unwrap_or(0) < asked.of(*w) {
                        lane.caught_up = true;
                    }
                }
            }
            let mut touched: Vec<i64> = found.into_keys().collect();
            touched.sort_unstable();
            for w in touched {
                start_attempts(&env, &lanes, &mut held, w, &done);
            }
        }
        if !full_round {
            wait_for_work(&env, &lanes).await;
        }
    }
}

/// Waits for a ring of the workers' bell, or the next retry's due time.
async fn wait_for_work(env: &WorkerEnv, lanes: &SharedLanes) {
    let wait = lanes.lock().until_next_retry(now_millis());
    tokio::select! {
        _ = env.webhooks.wake.notified() => {}
        _ = tokio::time::sleep(wait) => {}
    }
}

/// Starts queued deliveries of webhook `w` while it has in-flight room. A
/// queued delivery whose lease no longer covers a whole attempt (its
/// receiver turned slow while it waited) is given back instead: released
/// unattempted, for the next claim.
fn start_attempts(
    env: &WorkerEnv,
    shared: &SharedLanes,
    held: &mut Lanes,
    w: i64,
    done: &mpsc::UnboundedSender<Record>,
) {
    let max = env.settings.max_in_flight;
    let attempt_ms = super::attempt_ms(&env.settings);
    let Some(target) = held.targets.get(&w).cloned() else {
        return;
    };
    // Disabled or deleted since the claim (the change reached this node):
    // what is queued goes back, and the database makes it a dead letter.
    // Changed since its target was read (a change of any webhook moves the
    // generation): what is queued goes back too, and the next claim reads
    // the configuration anew — each attempt uses the configuration as it is
    // when the attempt starts (§11).
    let give_back = (env.stopping)()
        || target.generation != env.webhooks.generation()
        || !env
            .webhooks
            .enabled(InstanceId(target.target.hook.instance_id))
            .is_some_and(|hooks| hooks.iter().any(|h| h.id == w));
    let Some(lane) = held.lanes.get_mut(&w) else {
        return;
    };
    while lane.sending < max {
        let Some((row, lease_until)) = lane.queued.pop_front() else {
            break;
        };
        if give_back || lease_until - now_millis() < attempt_ms + RECORD_MARGIN_MS {
            let _ = done.send(release(&row, lease_until));
            continue;
        }
        lane.sending += 1;
        let threads = &env.attempts;
        let (env, done, shared, target) =
            (env.clone(), done.clone(), shared.clone(), target.clone());
        threads.spawn(async move {
            let started = Instant::now();
            let outcome = attempt(&env, &row, lease_until, &target).await;
            let fast = outcome.is_delivered() && started.elapsed() < FAST_ATTEMPT;
            let _ = done.send(Record::Done(outcome, row.bundle));
            let mut held = shared.lock();
            if let Some(lane) = held.lanes.get_mut(&row.webhook_id) {
                lane.sending = lane.sending.saturating_sub(1);
                lane.fast = fast;
            }
            start_attempts(&env, &shared, &mut held, row.webhook_id, &done);
        });
    }
}

/// What the recorder is told.
enum Record {
    /// How an attempt ended (or that a delivery was given back), with the
    /// leased bundle it was attempted from (0: a row).
    Done(Outcome, i64),
    /// A bundle a claim leased whole to this node, told before any of its
    /// deliveries starts.
    Leased(LeasedBundle),
}

/// Gives a claimed delivery, leased until `lease`, back without an attempt.
fn release(row: &Claimed, lease: i64) -> Record {
    let outcome = Outcome::Released {
        seq: row.seq,
        webhook_id: row.webhook_id,
        attempts: row.attempts,
        lease,
    };
    Record::Done(outcome, row.bundle)
}

/// Gives back every queued delivery (the node is stopping).
fn release_queued(lanes: &SharedLanes, done: &mpsc::UnboundedSender<Record>) {
    let mut held = lanes.lock();
    for lane in held.lanes.values_mut() {
        for (row, lease) in lane.queued.drain(..) {
            let _ = done.send(release(&row, lease));
        }
    }
}

/// What the lanes learn of one recorded outcome.
struct Finished {
    webhook: i64,
    delivered: bool,
    retry_at: Option<i64>,
}

/// Records outcomes in batches, frees the lanes' room, and wakes the loop.
/// The outcomes of a leased bundle's deliveries are kept until each has
/// one, then the bundle is closed with them (at a stop, at once with those
/// it has: its deliveries then are rows, and later outcomes are recorded as
/// rows'); the room of those that did not succeed is freed then.
async fn record_outcomes(
    env: WorkerEnv,
    lanes: SharedLanes,
    mut rx: mpsc::UnboundedReceiver<Record>,
) {
    let mut open: HashMap<i64, (Closing, Vec<Finished>)> = HashMap::new();
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        let mut gathered = false;
        while batch.len() < COMPLETE_BATCH {
            match rx.try_recv() {
                Ok(o) => batch.push(o),
                Err(_) if !gathered => {
                    gathered = true;
                    tokio::time::sleep(RECORD_GATHER).await;
                }
                Err(_) => break,
            }
        }
        let mut rows = Vec::new();
        let mut closing = Vec::new();
        let mut finished = Vec::new();
        for record in batch {
            let (outcome, bundle) = match record {
                Record::Leased(b) => {
                    let outcomes = Vec::with_capacity(b.count);
                    let closing = Closing {
                        bundle: b,
                        outcomes,
                    };
                    open.insert(b.seq, (closing, Vec::with_capacity(b.count)));
                    continue;
                }
                Record::Done(outcome, bundle) => (outcome, bundle),
            };
            let f = Finished {
                webhook: outcome.webhook_id(),
                delivered: outcome.is_delivered(),
                retry_at: match outcome {
                    Outcome::Retry { next_at, .. } => Some(next_at),
                    _ => None,
                },
            };
            match open.get_mut(&bundle) {
                Some((b, held_back)) => {
                    b.outcomes.push(outcome);
                    // A success frees its room at once; the others, once
                    // they are rows (a claim must not find the lane caught
                    // up while a given-back delivery is not yet due).
                    if f.delivered {
                        finished.push(f);
                    } else {
                        held_back.push(f);
                    }
                    if b.outcomes.len() >= b.bundle.count {
                        if let Some((b, held_back)) = open.remove(&bundle) {
                            closing.push(b);
                            finished.extend(held_back);
                        }
                    }
                }
                None => {
                    rows.push(outcome);
                    finished.push(f);
                }
            }
        }
        if (env.stopping)() {
            for (_, (b, held_back)) in open.drain() {
                closing.push(b);
                finished.extend(held_back);
            }
        }
        let shared = Arc::new((rows, closing));
        while !shared.0.is_empty() || !shared.1.is_empty() {
            let b = shared.clone();
            match db(&env.pool, move |conn| {
                deliveries::complete(conn, &b.0, &b.1)
            })
            .await
            {
                Ok(()) => break,
                Err(e) => {
                    log::warn!("webhook outcomes not recorded yet (retrying): {e}");
                    if (env.stopping)() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
        let mut held = lanes.lock();
        // Room freed in a lane that is not caught up may let a claim take
        // what waits in the database; a caught-up lane has nothing there,
        // unless its webhook is ordered.
        let mut wake = false;
        for f in finished {
            let w = f.webhook;
            if let Some(at) = f.retry_at {
                held.retry_at(at);
            }
            // An ordered webhook's next delivery is due only now.
            let ordered = held.targets.get(&w).is_some_and(|t| t.target.hook.ordered);
            let Some(lane) = held.lanes.get_mut(&w) else {
                wake = true;
                continue;
            };
            wake |= ordered || !lane.caught_up || !f.delivered;
            lane.held = lane.held.saturating_sub(1);
            // A fast or caught-up lane is remembered (its next claim runs
            // ahead; new deliveries skip the claim), with its target.
            if lane.held == 0 && !lane.fast && !lane.caught_up {
                held.lanes.remove(&w);
                held.targets.remove(&w);
            }
        }
        drop(held);
        if wake {
            env.webhooks.ring();
        }
    }
}

/// The pending gauge, dead-letter retention, the vacuum of the deliveries
/// table on PostgreSQL, this node's clock against PostgreSQL's (logged
/// when it goes out of step and back), and closing receivers' connections
/// left unused.
async fn housekeeping(env: WorkerEnv) {
    let mut timer = RefreshTimer::new(HOUSEKEEPING, env.resync.clone());
    let mut asked = false;
    let mut out_of_step = false;
    // At once, then every period: the gauge is right from the start.
    loop {
        if (env.stopping)() {
            return;
        }
        env.client.sweep();
        let keep_ms = i64::try_from(env.settings.dead_letter_hours)
            .unwrap_or(i64::MAX)
            .saturating_mul(3_600_000);
        let done = db(&env.pool, move |conn| {
            let purged = deliveries::purge_dead(conn, now_millis().saturating_sub(keep_ms))?;
            // A publish that raced with a disable may have stored some.
            let killed = deliveries::kill_disabled(conn, now_millis())?;
            let pending = deliveries::pending_total(conn)?;
            for table in deliveries::vacuum_if_bloated(conn)? {
                log::debug!("{table} vacuumed");
            }
            Ok((purged, pending, killed, clock::offset(conn)?))
        })
        .await;
        match done {
            Ok((purged, pending, killed, offset)) => {
                if let Some(offset) = offset {
                    env.metrics.clock_offset.set(offset.ms as f64 / 1000.0);
                    if offset.out_of_step() != out_of_step {
                        out_of_step = !out_of_step;
                        log_clock(offset, out_of_step);
                    }
                }
                env.metrics
                    .webhook_deliveries
                    .with_label_values(&["dead_letter"])
                    .inc_by(killed as u64);
                env.metrics.webhook_pending.set(pending);
                if purged > 0 {
                    log::info!("{purged} webhook dead letters past retention removed");
                }
                if asked {
                    // Wake-ups sent by other nodes meanwhile may be lost too.
                    env.webhooks.ring();
                    asked = false;
                }
            }
            Err(e) => log::warn!("webhook housekeeping skipped: {e}"),
        }
        asked |= timer.tick().await;
    }
}

/// Logs this node's clock going out of step with PostgreSQL's, or back.
fn log_clock(offset: clock::Offset, out_of_step: bool) {
    let (ms, within) = (offset.ms, offset.within_ms);
    if out_of_step {
        let side = if ms > 0 { "ahead of" } else { "behind" };
        log::warn!(
            "this node's clock is {} ms (± {within}) {side} PostgreSQL's: webhook leases \
             compare node clocks, so a node ahead can take over a delivery still being \
             attempted; keep the nodes' clocks in step (NTP)",
            ms.saturating_abs()
        );
    } else {
        log::info!("this node's clock is in step with PostgreSQL's again ({ms} ms ± {within})");
    }
}

/// A failed attempt, before the schedule decides what follows.
struct Failure {
    status: Option<i64>,
    error: String,
    retry_after: Option<u64>,
    /// No retry whatever the schedule says (410, refused address).
    final_: bool,
}

impl Failure {
    fn new(status: Option<i64>, error: impl Into<String>) -> Self {
        Failure {
            status,
            error: error.into(),
            retry_after: None,
            final_: false,
        }
    }
}

/// One attempt of one claimed delivery, leased until `lease`.
async fn attempt(env: &WorkerEnv, row: &Claimed, lease: i64, target: &Prepared) -> Outcome {
    let attempt_no = row.attempts + 1;
    let started = now_millis();
    let result = send(env, row, target, attempt_no, started).await;
    let at = now_millis();
    match result {
        Ok(()) => {
            env.metrics
                .webhook_deliveries
                .with_label_values(&["success"])
                .inc();
            let secs = (at - row.created_at).max(0) as f64 / 1000.0;
            env.metrics.webhook_delivery_seconds.observe(secs);
            Outcome::Delivered {
                seq: row.seq,
                webhook_id: row.webhook_id,
                lease,
                at,
            }
        }
        Err(f) => {
            env.metrics
                .webhook_deliveries
                .with_label_values(&["failure"])
                .inc();
            let schedule = &env.settings.retry_schedule_secs;
            let next = usize::try_from(row.attempts)
                .ok()
                .and_then(|i| schedule.get(i));
            match next {
                Some(&interval) if !f.final_ => {
                    let delay_ms = match f.retry_after {
                        Some(ra) if ra > interval => ra as f64 * 1000.0,
                        _ => interval as f64 * 1000.0 * rand::thread_rng().gen_range(0.8..=1.2),
                    };
                    Outcome::Retry {
                        seq: row.seq,
                        webhook_id: row.webhook_id,
                        attempts: attempt_no,
                        lease,
                        // Saturating (`as` does too): an interval too long
                        // for the clock is a retry that never comes due.
                        next_at: at.saturating_add(delay_ms as i64),
                        status: f.status,
                        error: f.error,
                        at,
                    }
                }
                _ => {
                    env.metrics
                        .webhook_deliveries
                        .with_label_values(&["dead_letter"])
                        .inc();
                    Outcome::Dead {
                        seq: row.seq,
                        webhook_id: row.webhook_id,
                        attempts: attempt_no,
                        lease,
                        status: f.status,
                        error: f.error,
                        at,
                    }
                }
            }
        }
    }
}

fn header(name: &'static str, value: &str) -> Option<(HeaderName, HeaderValue)> {
    Some((
        HeaderName::from_static(name),
        HeaderValue::from_str(value).ok()?,
    ))
}

/// Builds and sends the request of one attempt.
async fn send(
    env: &WorkerEnv,
    row: &Claimed,
    prepared: &Prepared,
    attempt_no: i64,
    now: i64,
) -> Result<(), Failure> {
    let hook = &prepared.target.hook;
    let kind = EventKind::parse(&row.event)
        .ok_or_else(|| Failure::new(None, "stored event is invalid"))?;
    let body = stored_envelope(kind, &row.data, &prepared.instance_data, hook.media_base64)
        .ok_or_else(|| Failure::new(None, "stored event is invalid"))?;
    let Some(to) = prepared.destinations.get(kind.index()) else {
        return Err(Failure {
            final_: true,
            ..Failure::new(None, "webhook disabled")
        });
    };
    let keys = prepared.keys.as_ref().map_err(|e| Failure::new(None, *e))?;
    let previous = keys
        .previous
        .as_ref()
        .filter(|(_, until)| now < *until)
        .map(|(key, _)| key.as_slice());
    if to.refused {
        return Err(Failure {
            final_: true,
            ..Failure::new(None, REFUSED_ADDRESS)
        });
    }
    let url = to
        .url
        .as_ref()
        .ok_or_else(|| Failure::new(None, "request failed"))?;
    let ts = now / 1000;
    let signature = signature_header(&keys.current, previous, &row.id, ts, body.as_bytes());
    let mut headers = HeaderMap::new();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(
        USER_AGENT,
        HeaderValue::from_static(concat!("eventgate/", env!("CARGO_PKG_VERSION"))),
    );
    if let Some(a) = &keys.authorization {
        headers.insert(AUTHORIZATION, a.clone());
    }
    for (name, value) in [
        header("webhook-id", &row.id),
        header("webhook-timestamp", &ts.to_string()),
        header("webhook-signature", &signature),
        header("eventgate-attempt", &attempt_no.to_string()),
    ]
    .into_iter()
    .flatten()
    {
        headers.insert(name, value);
    }
    let reply = env
        .client
        .post(url, headers, body.into_bytes())
        .await
        .map_err(|e| match e {
            SendError::Refused => Failure {
                final_: true,
                ..Failure::new(None, REFUSED_ADDRESS)
            },
            SendError::Timeout => Failure::new(None, "timeout"),
            SendError::Connect => Failure::new(None, "connection failed"),
            SendError::Request => Failure::new(None, "request failed"),
        })?;
    if (200..300).contains(&reply.status) {
        return Ok(());
    }
    let code = i64::from(reply.status);
    let retry_after = if code == 429 || code == 503 {
        reply
            .retry_after
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            // Whole seconds only: `+8`, `8.0` and dates are other forms.
            .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|s| *s <= MAX_RETRY_AFTER)
    } else {
        None
    };
    Err(Failure {
        status: Some(code),
        error: format!("HTTP {code}"),
        retry_after,
        final_: code == 410,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loop_waits_for_the_next_retry_and_a_claim_forgets_those_due() {
        let mut lanes = Lanes::default();
        assert_eq!(lanes.until_next_retry(1_000), POLL, "no retry: the poll");
        lanes.retry_at(1_300);
        lanes.retry_at(1_100);
        lanes.retry_at(1_100);
        assert_eq!(
            lanes.until_next_retry(1_000),
            Duration::from_millis(100) + RETRY_GATHER
        );
        assert_eq!(lanes.until_next_retry(1_200), RETRY_GATHER, "already due");
        lanes.claimed_retries(1_150);
        assert_eq!(
            lanes.until_next_retry(1_150),
            Duration::from_millis(150) + RETRY_GATHER
        );
        lanes.retry_at(5_000);
        lanes.claimed_retries(1_300);
        assert_eq!(
            lanes.until_next_retry(1_300),
            POLL,
            "the next is a poll away or more"
        );
        for i in 0..RETRY_TIMES + 10 {
            lanes.retry_at(10_000 + i as i64);
        }
        assert_eq!(lanes.retries_due.len(), RETRY_TIMES, "bounded");
    }
}
