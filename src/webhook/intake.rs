//! The intake of webhook deliveries (contract §11: the 202 waits for them to
//! be durable). Publishes that arrive together are stored together: each
//! hands its deliveries to this node's one intake thread and waits; the
//! thread takes every request waiting at that moment (up to
//! [`GROUP_ROWS`] rows) into one transaction, so concurrent publishes share
//! one commit — one flush to disk — instead of queueing for one each. A
//! request is answered only after its rows are committed. When a shared
//! transaction fails, each of its requests is tried again alone, so one
//! request's failure is never another's.

use tokio::sync::{mpsc, oneshot};

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
    answer: oneshot::Sender<Result<u64, StorageError>>,
}

impl Request {
    fn rows(&self) -> usize {
        self.batches.iter().map(|(_, rows)| rows.len()).sum()
    }
}

/// The handle publishes store through; the thread ends when it is dropped.
pub struct Intake {
    requests: mpsc::Sender<Request>,
}

impl Intake {
    /// Starts the intake thread on `pool`.
    pub fn start(pool: DbPool, max_pending: i64) -> std::io::Result<Intake> {
        let (requests, queue) = mpsc::channel(QUEUE);
        std::thread::Builder::new()
            .name("eventgate-intake".into())
            .spawn(move || run(pool, queue, max_pending))?;
        Ok(Intake { requests })
    }

    /// Stores one publish's deliveries, accepted at `now`; returns how many
    /// became dead letters at once (`backlog full`).
    pub async fn store(
        &self,
        batches: Vec<(i64, Vec<NewDelivery>)>,
        now: i64,
    ) -> Result<u64, StorageError> {
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
fn run(pool: DbPool, mut queue: mpsc::Receiver<Request>, max_pending: i64) {
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
        match store(&pool, &group, max_pending, &mut pending) {
            Ok(refused) => {
                for (request, refused) in group.into_iter().zip(refused) {
                    let _ = request.answer.send(Ok(refused));
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
                    )
                    .map(|refused| refused.first().copied().unwrap_or(0));
                    let _ = request.answer.send(alone);
                }
            }
        }
    }
}

fn store(
    pool: &DbPool,
    group: &[Request],
    max_pending: i64,
    pending: &mut PendingCounts,
) -> Result<Vec<u64>, StorageError> {
    let mut conn = pool.get()?;
    let intakes: Vec<deliveries::Intake<'_>> = group
        .iter()
        .map(|r| deliveries::Intake {
            batches: &r.batches,
            now: r.now,
        })
        .collect();
    deliveries::enqueue(&mut conn, &intakes, max_pending, pending)
}
