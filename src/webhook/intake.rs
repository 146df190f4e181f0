//! The intake of webhook deliveries (contract §11: the 202 waits for them to
//! be durable). Publishes that arrive together are stored together: each
//! hands its deliveries to this node's one intake thread and waits; the
//! thread takes every request waiting at that moment (up to
//! [`GROUP_ROWS`] rows) into one transaction, so concurrent publishes share
//! one commit — one flush to disk — instead of queueing for one each. A
//! request is answered only after its rows are committed. Deliveries left
//! for a claim are stored as one bundle per webhook (`storage::bundles`),
//! not one row each. When a shared
//! transaction fails, each of its requests is tried again alone, so one
//! request's failure is never another's.
//!
//! Where a webhook's lane on this node has room and nothing older is due,
//! the thread stores its new deliveries as one bundle leased to this node
//! and hands them to the lane after the commit ([`Direct`]): they start at
//! once, with no claim, and no row is written for them unless an attempt
//! fails.

use std::sync::{Arc, OnceLock};

use tokio::sync::{mpsc, oneshot};

use super::worker::Direct;
use crate::storage::deliveries::{self, NewDelivery, PendingCounts};
use crate::storage::{DbPool, StorageError};

/// Rows beyond which a group takes no more requests (a larger request is
/// stored alone).
const GROUP_ROWS: usize = 4_000;

/// Requests waiting for the intake thread before publishers wait to hand theirs.
const QUEUE: usize = 1_024;

/// One publish's deliveries, per webhook id, and where its answer goes.
struct Request {
    batches: Vec<(i64, Vec<NewDelivery>)>,
    now: i64,
    answer: oneshot::Sender<Result<Stored, StorageError>>,
}

/// What storing one publish's deliveries did.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stored {
    /// How many became dead letters at once (`backlog full`).
    pub refused: u64,
    /// Whether some wait for a claim (then delivery workers are woken).
    pub for_claims: bool,
}

impl Request {
    fn rows(&self) -> usize {
        self.batches.iter().map(|(_, rows)| rows.len()).sum()
    }
}

/// The handle publishes store through; the thread ends when it is dropped.
pub struct Intake {
    requests: mpsc::Sender<Request>,
    direct: Arc<OnceLock<Arc<Direct>>>,
}

impl Intake {
    /// Starts the intake thread on `pool`.
    pub fn start(pool: DbPool, max_pending: i64) -> std::io::Result<Intake> {
        let (requests, queue) = mpsc::channel(QUEUE);
        let direct: Arc<OnceLock<Arc<Direct>>> = Arc::default();
        let thread_direct = direct.clone();
        std::thread::Builder::new()
            .name("eventgate-intake".into())
            .spawn(move || run(pool, queue, max_pending, &thread_direct))?;
        Ok(Intake { requests, direct })
    }

    /// Lets deliveries skip the claim on this node (it delivers).
    pub fn attach(&self, direct: Arc<Direct>) {
        let _ = self.direct.set(direct);
    }

    /// Stores one publish's deliveries, accepted at `now`.
    pub async fn store(
        &self,
        batches: Vec<(i64, Vec<NewDelivery>)>,
        now: i64,
    ) -> Result<Stored, StorageError> {
        let stopped = || StorageError::Blocking("the webhook intake has stopped".into());
        let (answer, answered) = oneshot::channel();
        self.requests
            .send(Request {
                batches,
                now,
                answer,
            })
            .await
            .map_err(|_| stopped())?;
        answered.await.map_err(|_| stopped())?
    }
}

/// The intake thread: one group, one transaction, at a time.
fn run(
    pool: DbPool,
    mut queue: mpsc::Receiver<Request>,
    max_pending: i64,
    direct: &OnceLock<Arc<Direct>>,
) {
    let mut pending = PendingCounts::default();
    while let Some(first) = queue.blocking_recv() {
        let mut rows = first.rows();
        let mut group = vec![first];
        while rows < GROUP_ROWS {
            match queue.try_recv() {
                Ok(next) => {
                    rows += next.rows();
                    group.push(next);
                }
                Err(_) => break,
            }
        }
        let direct = direct.get().map(Arc::as_ref);
        match store(&pool, &group, max_pending, &mut pending, direct) {
            Ok(stored) => {
                for (request, stored) in group.into_iter().zip(stored) {
                    let _ = request.answer.send(Ok(stored));
                }
            }
            Err(e) if group.len() == 1 => {
                if let Some(request) = group.pop() {
                    let _ = request.answer.send(Err(e));
                }
            }
            Err(e) => {
                log::warn!(
                    "webhook deliveries of {} publishes not stored together ({e}); storing each alone",
                    group.len()
                );
                for request in group {
                    let alone = store(
                        &pool,
                        std::slice::from_ref(&request),
                        max_pending,
                        &mut pending,
                        direct,
                    )
                    .map(|stored| stored.first().copied().unwrap_or_default());
                    let _ = request.answer.send(alone);
                }
            }
        }
    }
}

/// Stores one group in one transaction: per request, what it stored.
/// Deliveries stored leased go to their lanes once committed; room
/// reserved for more than were stored leased (or for a failed
/// transaction) is given back.
fn store(
    pool: &DbPool,
    group: &[Request],
    max_pending: i64,
    pending: &mut PendingCounts,
    direct: Option<&Direct>,
) -> Result<Vec<Stored>, StorageError> {
    let lease_until = direct.map_or(0, |d| d.lease_until(crate::storage::now_millis()));
    let leased: Vec<Vec<usize>> = group
        .iter()
        .map(|r| {
            r.batches
                .iter()
                .map(|(w, rows)| direct.map_or(0, |d| d.reserve(*w, rows.len())))
                .collect()
        })
        .collect();
    let intakes: Vec<deliveries::Intake<'_>> = group
        .iter()
        .zip(&leased)
        .map(|(r, leased)| deliveries::Intake {
            batches: &r.batches,
            leased,
            now: r.now,
            lease_until,
        })
        .collect();
    let stored = pool
        .get()
        .map_err(StorageError::from)
        .and_then(|mut conn| deliveries::enqueue(&mut conn, &intakes, max_pending, pending));
    let Some(direct) = direct else {
        return stored.map(|s| answers(&s));
    };
    // The stores for a claim that `reserve` began have ended.
    let for_claims = group
        .iter()
        .zip(&leased)
        .flat_map(|(r, leased)| r.batches.iter().zip(leased))
        .filter(|((_, rows), n)| **n < rows.len())
        .count();
    direct.stores_for_claims_ended(for_claims);
    // Room reserved and not used: all of it if nothing was stored.
    let mut unused: std::collections::HashMap<i64, usize> = Default::default();
    for (r, leased) in group.iter().zip(&leased) {
        for ((w, _), n) in r.batches.iter().zip(leased) {
            *unused.entry(*w).or_insert(0) += n;
        }
    }
    if let Ok(s) = &stored {
        for row in &s.leased {
            if let Some(n) = unused.get_mut(&row.webhook_id) {
                *n = n.saturating_sub(1);
            }
        }
    }
    for (w, n) in unused {
        direct.unreserve(w, n);
    }
    let stored = stored?;
    let out = answers(&stored);
    direct.hand_over(stored.leased, stored.leased_bundles);
    Ok(out)
}

/// Each request's answer.
fn answers(stored: &deliveries::Enqueued) -> Vec<Stored> {
    stored
        .refused
        .iter()
        .map(|refused| Stored {
            refused: *refused,
            for_claims: stored.for_claims,
        })
        .collect()
}
