//! Queries on `webhook_deliveries` (contract §11): a delivery is pending
//! while `dead_at` is NULL and a dead letter after. Publishing enqueues all
//! of a request's deliveries in one transaction, shared with the requests
//! that arrived with it (`webhook::intake`) as bundles
//! (`storage::bundles`): those the accepting node attempts at once in one
//! leased to it, the others in one for a claim. Workers claim due ones with a lease (`FOR UPDATE
//! SKIP LOCKED` on PostgreSQL, inside SQLite's single write lock there),
//! taking bundles as their rooms need (leased whole, or unpacked into
//! rows), and record outcomes in batches, closing the leased bundles whose
//! deliveries all have one.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Bool, Nullable, Text};

use super::bundles::{self, BundleRows};
use super::schema::webhook_deliveries as d;
use super::schema::webhook_requeued as r;
use super::webhooks::{dialect, dialect_of, hook_locks, id_list, HookId, WebhookRow, COLUMNS};
use super::{unsynced, with_conn, write_tx, DbConn, StorageError};

/// Error of a delivery refused because its webhook's backlog is full.
pub const BACKLOG_FULL: &str = "backlog full";

/// One delivery to store.
#[derive(Debug, Clone)]
pub struct NewDelivery {
    pub id: String,
    pub event: &'static str,
    /// The event's `data` object, as JSON text.
    pub data: String,
}

/// A claimed delivery, with what its attempt needs.
#[derive(Debug, Clone, QueryableByName)]
pub struct Claimed {
    #[diesel(sql_type = BigInt)]
    pub seq: i64,
    #[diesel(sql_type = Text)]
    pub id: String,
    #[diesel(sql_type = BigInt)]
    pub webhook_id: i64,
    #[diesel(sql_type = Text)]
    pub event: String,
    #[diesel(sql_type = Text)]
    pub data: String,
    #[diesel(sql_type = BigInt)]
    pub created_at: i64,
    /// Attempts made before this one.
    #[diesel(sql_type = BigInt)]
    pub attempts: i64,
    /// When it became due.
    #[diesel(sql_type = BigInt)]
    pub next_attempt_at: i64,
    #[diesel(sql_type = Bool)]
    pub ordered: bool,
    /// The bundle leased whole it is attempted from (its `seq`; 0: a row).
    #[diesel(sql_type = BigInt)]
    pub bundle: i64,
}

/// A bundle leased whole to this node (`storage::bundles`): its deliveries
/// are attempted from it, and it is closed once each has an outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeasedBundle {
    pub seq: i64,
    pub webhook_id: i64,
    pub lease_until: i64,
    /// Its deliveries.
    pub count: usize,
}

/// A leased bundle to close, with the outcome of each of its deliveries
/// (when the node stops, those being attempted have none yet: they are
/// stored leased to it until the bundle's lease ends, their outcomes
/// recorded later as rows').
#[derive(Debug, Clone)]
pub struct Closing {
    pub bundle: LeasedBundle,
    pub outcomes: Vec<Outcome>,
}

impl Closing {
    /// Whether every delivery of the bundle succeeded (the usual case: its
    /// close then reads nothing back and stores no row).
    fn all_delivered(&self) -> bool {
        self.outcomes.len() >= self.bundle.count && self.outcomes.iter().all(Outcome::is_delivered)
    }
}

/// A webhook with its instance's name and token (for envelopes).
#[derive(Debug, Clone, QueryableByName)]
pub struct Target {
    #[diesel(embed)]
    pub hook: WebhookRow,
    #[diesel(sql_type = Text)]
    pub instance_name: String,
    #[diesel(sql_type = Text)]
    pub instance_token: String,
}

/// How an attempt ended, as recorded. `lease` is the end of the lease
/// the delivery was attempted under (its claim's, or its bundle's): the
/// row holds it while it is this node's, and an outcome recorded once it
/// no longer does (claimed again) is not applied to it.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Delivered {
        seq: i64,
        webhook_id: i64,
        lease: i64,
        at: i64,
    },
    Retry {
        seq: i64,
        webhook_id: i64,
        attempts: i64,
        lease: i64,
        next_at: i64,
        status: Option<i64>,
        error: String,
        at: i64,
    },
    Dead {
        seq: i64,
        webhook_id: i64,
        attempts: i64,
        lease: i64,
        status: Option<i64>,
        error: String,
        at: i64,
    },
    /// Claimed and given back unattempted: the lease ends and the attempt
    /// the claim counted is undone (`attempts` is the count before it).
    Released {
        seq: i64,
        webhook_id: i64,
        attempts: i64,
        lease: i64,
    },
}

impl Outcome {
    /// The delivery's acceptance position.
    pub fn seq(&self) -> i64 {
        match self {
            Outcome::Delivered { seq, .. }
            | Outcome::Retry { seq, .. }
            | Outcome::Dead { seq, .. }
            | Outcome::Released { seq, .. } => *seq,
        }
    }

    /// The webhook the delivery belongs to.
    pub fn webhook_id(&self) -> i64 {
        match self {
            Outcome::Delivered { webhook_id, .. }
            | Outcome::Retry { webhook_id, .. }
            | Outcome::Dead { webhook_id, .. }
            | Outcome::Released { webhook_id, .. } => *webhook_id,
        }
    }

    /// Whether the receiver accepted the delivery.
    pub fn is_delivered(&self) -> bool {
        matches!(self, Outcome::Delivered { .. })
    }
}

/// One dead letter.
#[derive(Debug, Clone, Queryable)]
pub struct DeadLetter {
    pub seq: i64,
    pub id: String,
    pub webhook_id: i64,
    pub event: String,
    pub data: String,
    pub created_at: i64,
    pub attempts: i64,
    pub last_status: Option<i64>,
    pub last_error: Option<String>,
    pub last_attempt_at: Option<i64>,
}

/// One publish's deliveries: per webhook id, the rows to store, accepted at `now`.
pub struct Intake<'a> {
    pub batches: &'a [(i64, Vec<NewDelivery>)],
    /// Per batch: how many of its first rows this node attempts at once,
    /// without a claim (stored in a bundle leased until `lease_until`,
    /// their first attempt counted, as a claim would).
    pub leased: &'a [usize],
    pub now: i64,
    pub lease_until: i64,
}

/// What [`enqueue`] stored.
#[derive(Debug, Default)]
pub struct Enqueued {
    /// Per publish, how many became dead letters at once (`backlog full`).
    pub refused: Vec<u64>,
    /// The deliveries stored leased to this node, as a claim returns them
    /// (each from one of `leased_bundles`).
    pub leased: Vec<Claimed>,
    /// The bundles they were stored in, leased to this node.
    pub leased_bundles: Vec<LeasedBundle>,
    /// Whether any row was stored for a claim to take.
    pub for_claims: bool,
}

/// How long a webhook's counted backlog stands in for a new count.
const COUNT_FOR: Duration = Duration::from_secs(1);

/// What a node knows of each webhook's pending deliveries: the last count
/// and what the node stored since. Counting reads every pending row of the
/// webhook, which a long backlog (a slow or dead receiver) makes costly, so
/// a publish counts again only when the count is older than [`COUNT_FOR`]
/// or the estimate says the backlog bound would be passed. On one node the
/// estimate is never below the truth (only that node stores; deliveries
/// lower it); in a cluster it misses what other nodes stored in the last
/// second, as concurrent transactions of two nodes would anyway.
#[derive(Debug, Default)]
pub struct PendingCounts {
    known: HashMap<i64, (i64, Instant)>,
}

impl PendingCounts {
    /// The estimate of `webhook`'s pending deliveries, when it is fresh and
    /// leaves room for `adding` under `max_pending` (else: count them).
    fn estimate(&self, webhook: i64, adding: usize, max_pending: i64) -> Option<i64> {
        let adding = i64::try_from(adding).unwrap_or(i64::MAX);
        self.known
            .get(&webhook)
            .filter(|(n, at)| at.elapsed() < COUNT_FOR && n.saturating_add(adding) <= max_pending)
            .map(|(n, _)| *n)
    }

    /// `webhook` has `n` pending deliveries now.
    fn counted(&mut self, webhook: i64, n: i64) {
        self.known.insert(webhook, (n, Instant::now()));
    }

    /// `stored` more pending deliveries of `webhook`.
    fn stored(&mut self, webhook: i64, stored: usize) {
        if let Some((n, _)) = self.known.get_mut(&webhook) {
            *n = n.saturating_add(i64::try_from(stored).unwrap_or(i64::MAX));
        }
    }

    /// Forgets counts too old to stand in for one.
    fn forget_stale(&mut self) {
        self.known.retain(|_, (_, at)| at.elapsed() < COUNT_FOR);
    }
}

/// How a new row is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stored {
    /// Leased (to this node, or as the bundle it comes from was), its first
    /// attempt counted (as a claim counts it).
    Leased,
    /// Due, for a claim to take (from the intake: in a bundle).
    Due,
    /// A dead letter at once (`backlog full`).
    Refused,
}

/// One new row, with its acceptance position (reserved when its publish
/// was stored: [`SeqReserve`]), its publish's acceptance time and lease.
pub(super) struct NewRow<'a> {
    pub(super) seq: i64,
    pub(super) row: &'a NewDelivery,
    pub(super) now: i64,
    pub(super) lease_until: i64,
}

/// Consecutive new rows of one webhook stored the same way.
pub(super) struct Run<'a> {
    pub(super) stored: Stored,
    pub(super) rows: Vec<NewRow<'a>>,
}

/// Each webhook's new rows of a group, in acceptance order, as runs.
#[derive(Default)]
struct Runs<'a> {
    webhooks: Vec<(i64, Vec<Run<'a>>)>,
    at: HashMap<i64, usize>,
}

impl<'a> Runs<'a> {
    /// Adds `rows` of `webhook`, of the publish `from`, stored as `stored`,
    /// with the next of `seqs` each.
    fn push(
        &mut self,
        webhook: i64,
        stored: Stored,
        rows: &'a [NewDelivery],
        from: &Intake<'_>,
        seqs: &mut impl Iterator<Item = i64>,
    ) {
        let rows: Vec<NewRow<'a>> = rows
            .iter()
            .zip(seqs)
            .map(|(row, seq)| NewRow {
                seq,
                row,
                now: from.now,
                lease_until: from.lease_until,
            })
            .collect();
        let i = *self.at.entry(webhook).or_insert_with(|| {
            self.webhooks.push((webhook, Vec::new()));
            self.webhooks.len() - 1
        });
        let runs = &mut self.webhooks[i].1;
        match runs.last_mut() {
            Some(run) if run.stored == stored => run.rows.extend(rows),
            _ => runs.push(Run { stored, rows }),
        }
    }
}

/// A run's rows, inserted with their reserved `seq`s; returns how many
/// were stored (none when the webhook is gone).
pub(super) trait InsertRun {
    fn insert_run(&mut self, webhook: i64, run: &Run<'_>) -> QueryResult<usize>;
}

/// Reserves acceptance positions (`webhook_deliveries.seq`) for deliveries
/// being stored, in order. A delivery left in a bundle keeps the one it
/// was accepted with, so rows unpacked later still sort by acceptance
/// (`/failed` is "oldest first by acceptance").
pub(super) trait SeqReserve {
    /// Reserves `n`; on PostgreSQL `locks` (a `hook_locks` statement) is
    /// taken in the same statement (one round trip for both).
    fn reserve_seqs(&mut self, n: usize, locks: Option<&str>) -> QueryResult<Vec<i64>>;
}

#[derive(QueryableByName)]
struct SeqValue {
    #[diesel(sql_type = BigInt)]
    seq: i64,
}

/// SQLite: `AUTOINCREMENT` keeps the table's largest `seq` in
/// `sqlite_sequence`; moving it on by `n` (inside the single writer's
/// transaction) reserves the `n` after it. Its row exists once a row was
/// ever stored; only the first reservation of a new database adds it.
impl SeqReserve for diesel::sqlite::SqliteConnection {
    fn reserve_seqs(&mut self, n: usize, _locks: Option<&str>) -> QueryResult<Vec<i64>> {
        if n == 0 {
            return Ok(Vec::new());
        }
        let count = i64::try_from(n).unwrap_or(i64::MAX);
        let move_on = || {
            diesel::sql_query(
                "UPDATE sqlite_sequence SET seq = seq + ?1 \
                 WHERE name = 'webhook_deliveries' RETURNING seq",
            )
            .bind::<BigInt, _>(count)
        };
        let last = match move_on().get_result::<SeqValue>(self).optional()? {
            Some(last) => last.seq,
            None => {
                diesel::sql_query(
                    "INSERT INTO sqlite_sequence (name, seq) SELECT 'webhook_deliveries', \
                     COALESCE((SELECT MAX(seq) FROM webhook_deliveries), 0)",
                )
                .execute(self)?;
                move_on().get_result::<SeqValue>(self)?.seq
            }
        };
        Ok((last - count + 1..=last).collect())
    }
}

/// Positions in a block reserved at once on PostgreSQL.
const SEQ_BLOCK_BITS: u32 = 16;

/// PostgreSQL: whole blocks of positions, one `nextval` of
/// `webhook_delivery_blocks` each (see its migration): a block's number
/// shifted left by [`SEQ_BLOCK_BITS`] is its first position. Other nodes'
/// blocks may fall between a transaction's; each is larger than any
/// before it.
impl SeqReserve for diesel::pg::PgConnection {
    fn reserve_seqs(&mut self, n: usize, locks: Option<&str>) -> QueryResult<Vec<i64>> {
        #[derive(QueryableByName)]
        struct Reserved {
            #[diesel(sql_type = diesel::sql_types::Array<BigInt>)]
            blocks: Vec<i64>,
        }
        let block = 1_usize << SEQ_BLOCK_BITS;
        let locked = locks
            .map(|q| format!(", (SELECT COUNT(*) FROM ({q}) AS l) AS locked"))
            .unwrap_or_default();
        let blocks = diesel::sql_query(format!(
            "SELECT (SELECT COALESCE(array_agg(v ORDER BY v), '{{}}') FROM \
             (SELECT nextval('webhook_delivery_blocks') AS v FROM generate_series(1, $1)) AS t) \
             AS blocks{locked}"
        ))
        .bind::<BigInt, _>(i64::try_from(n.div_ceil(block)).unwrap_or(i64::MAX))
        .get_result::<Reserved>(self)?
        .blocks;
        Ok(blocks
            .into_iter()
            .flat_map(|b| {
                let first = b << SEQ_BLOCK_BITS;
                first..first + (1 << SEQ_BLOCK_BITS)
            })
            .take(n)
            .collect())
    }
}

impl Stored {
    /// `(attempts, leased, dead)` of a row stored this way.
    fn columns(self) -> (i64, bool, bool) {
        match self {
            Stored::Leased => (1, true, false),
            Stored::Due => (0, false, false),
            Stored::Refused => (0, false, true),
        }
    }
}

/// SQLite: multi-row `INSERT`s of fixed sizes (a statement costs no round
/// trip here). Each size is one statement, prepared once per connection
/// and kept in diesel's cache (a fixed-size array of rows has a static
/// query id); a run is cut into the largest sizes first. A statement text
/// made for each run's row count was parsed anew every time: 14% of the
/// intake's store (`benches/intake.rs`).
impl InsertRun for diesel::sqlite::SqliteConnection {
    fn insert_run(&mut self, webhook: i64, run: &Run<'_>) -> QueryResult<usize> {
        let mut stored = 0;
        let mut rows = run.rows.as_slice();
        while !rows.is_empty() {
            let (n, got) = match rows.len() {
                64.. => (64, insert_fixed::<64>(self, webhook, run.stored, rows)?),
                16.. => (16, insert_fixed::<16>(self, webhook, run.stored, rows)?),
                4.. => (4, insert_fixed::<4>(self, webhook, run.stored, rows)?),
                _ => (1, insert_fixed::<1>(self, webhook, run.stored, rows)?),
            };
            stored += got;
            rows = rows.get(n..).unwrap_or_default();
        }
        Ok(stored)
    }
}

/// Inserts the first `N` of `rows` (none when there are fewer) in one
/// cached statement.
fn insert_fixed<const N: usize>(
    c: &mut diesel::sqlite::SqliteConnection,
    webhook: i64,
    stored: Stored,
    rows: &[NewRow<'_>],
) -> QueryResult<usize> {
    let Some(rows) = rows.first_chunk::<N>() else {
        return Ok(0);
    };
    let (attempts, leased, dead) = stored.columns();
    // Owned values: a statement is cached by its type, which must then
    // borrow nothing.
    let values: [_; N] = std::array::from_fn(|i| {
        let n = &rows[i];
        (
            d::seq.eq(n.seq),
            d::id.eq(n.row.id.clone()),
            d::webhook_id.eq(webhook),
            d::event.eq(n.row.event),
            d::data.eq(n.row.data.clone()),
            d::created_at.eq(n.now),
            d::attempts.eq(attempts),
            d::next_attempt_at.eq(n.now),
            d::lease_until.eq(if leased { n.lease_until } else { 0 }),
            d::last_error.eq(dead.then_some(BACKLOG_FULL)),
            d::dead_at.eq(dead.then_some(n.now)),
        )
    });
    diesel::insert_into(d::table).values(values).execute(c)
}

/// PostgreSQL: the whole run in one statement of one short text, its
/// columns bound as arrays (a multi-row `VALUES` list was parsed and
/// planned anew for every statement, with ten parameters per row), and
/// nothing stored when the webhook is gone (there is no foreign key).
impl InsertRun for diesel::pg::PgConnection {
    fn insert_run(&mut self, webhook: i64, run: &Run<'_>) -> QueryResult<usize> {
        use diesel::sql_types::{Array, Nullable};
        const INSERT: &str = "INSERT INTO webhook_deliveries \
             (seq, id, webhook_id, event, data, created_at, attempts, next_attempt_at, lease_until, last_error, dead_at) \
             SELECT t.seq, t.id, $1, t.event, t.data, t.at, $2, t.at, t.lease, $3, CASE WHEN $4 THEN t.at END \
             FROM unnest($5::text[], $6::text[], $7::text[], $8::bigint[], $9::bigint[], $10::bigint[]) \
             AS t(id, event, data, at, lease, seq) \
             WHERE EXISTS (SELECT 1 FROM webhooks WHERE id = $1) ORDER BY t.seq";
        let (attempts, leased, dead) = run.stored.columns();
        let rows = &run.rows;
        diesel::sql_query(INSERT)
            .bind::<BigInt, _>(webhook)
            .bind::<BigInt, _>(attempts)
            .bind::<Nullable<Text>, _>(dead.then_some(BACKLOG_FULL))
            .bind::<Bool, _>(dead)
            .bind::<Array<Text>, _>(rows.iter().map(|n| n.row.id.as_str()).collect::<Vec<_>>())
            .bind::<Array<Text>, _>(rows.iter().map(|n| n.row.event).collect::<Vec<_>>())
            .bind::<Array<Text>, _>(rows.iter().map(|n| n.row.data.as_str()).collect::<Vec<_>>())
            .bind::<Array<BigInt>, _>(rows.iter().map(|n| n.now).collect::<Vec<_>>())
            .bind::<Array<BigInt>, _>(
                rows.iter()
                    .map(|n| if leased { n.lease_until } else { 0 })
                    .collect::<Vec<_>>(),
            )
            .bind::<Array<BigInt>, _>(rows.iter().map(|n| n.seq).collect::<Vec<_>>())
            .execute(self)
    }
}

/// Stores the deliveries of several publishes in one transaction, in the
/// order given (their acceptance order). Past `max_pending` pending
/// deliveries of a webhook, the rest are stored as dead letters with error
/// `backlog full`. Of the rest, each batch's first `leased` rows are stored
/// leased (returned, for this node to attempt at once), the others due for
/// a claim. Each webhook's rows of all the publishes go in as few
/// statements as their order allows (one per run of rows stored the same
/// way), not one per publish: on PostgreSQL each statement is a round
/// trip, and a stream of single-event publishes waited for them in turn.
pub fn enqueue(
    conn: &mut DbConn,
    intakes: &[Intake<'_>],
    max_pending: i64,
    pending: &mut PendingCounts,
) -> Result<Enqueued, StorageError> {
    pending.forget_stale();
    // The webhooks are held until the commit (`hook_locks`), and a webhook
    // deleted meanwhile gets no rows: on PostgreSQL each `INSERT` asks for
    // its webhook itself (no round trip more; a publish's `refused` may
    // then count rows of a webhook deleted at that moment), on SQLite,
    // whose foreign key would refuse them, a query asks first.
    let mut hooks: Vec<i64> = intakes
        .iter()
        .flat_map(|i| i.batches.iter().map(|(w, _)| *w))
        .collect();
    // Each once: a group's publishes mostly name the same webhooks.
    hooks.sort_unstable();
    hooks.dedup();
    let q_lock = hook_locks(conn.is_pg(), &hooks, true);
    let q_hooks = (!conn.is_pg())
        .then(|| format!("SELECT id FROM webhooks WHERE id IN ({})", id_list(&hooks)));
    // A position for every delivery of the group, reserved with the locks
    // (those of a webhook gone meanwhile are left unused).
    let total: usize = intakes
        .iter()
        .flat_map(|i| i.batches.iter().map(|(_, rows)| rows.len()))
        .sum();
    let stored = write_tx!(conn, c => {
        let mut seqs = c.reserve_seqs(total, q_lock.as_deref())?.into_iter();
        let gone: Vec<i64> = match &q_hooks {
            Some(q) => {
                let stored: Vec<HookId> = diesel::sql_query(q).load(c)?;
                hooks
                    .iter()
                    .copied()
                    .filter(|w| !stored.iter().any(|h| h.id == *w))
                    .collect()
            }
            None => Vec::new(),
        };
        let mut out = Enqueued::default();
        // What each publish stores, in acceptance order, before the
        // positions are reserved for them all at once.
        let mut plan = Vec::new();
        // Pending rows of each webhook this group adds before the inserts:
        // a count made meanwhile does not see them yet.
        let mut planned: HashMap<i64, i64> = HashMap::new();
        for intake in intakes {
            let mut over_total = 0u64;
            for (i, (webhook, rows)) in intake.batches.iter().enumerate() {
                if rows.is_empty() || gone.contains(webhook) {
                    continue;
                }
                let held = match pending.estimate(*webhook, rows.len(), max_pending) {
                    Some(n) => n,
                    None => {
                        let n = c.pending_of(*webhook)?
                            + planned.get(webhook).copied().unwrap_or(0);
                        pending.counted(*webhook, n);
                        n
                    }
                };
                let room = usize::try_from((max_pending - held).max(0)).unwrap_or(0);
                let (ok, over) = rows.split_at(room.min(rows.len()));
                pending.stored(*webhook, ok.len());
                *planned.entry(*webhook).or_insert(0) += i64::try_from(ok.len()).unwrap_or(i64::MAX);
                let leased_n = intake.leased.get(i).copied().unwrap_or(0).min(ok.len());
                let (leased, due) = ok.split_at(leased_n);
                for (stored, rows) in [
                    (Stored::Leased, leased),
                    (Stored::Due, due),
                    (Stored::Refused, over),
                ] {
                    if !rows.is_empty() {
                        plan.push((*webhook, stored, rows, intake));
                    }
                }
                out.for_claims |= !due.is_empty();
                over_total += over.len() as u64;
            }
            out.refused.push(over_total);
        }
        let mut runs = Runs::default();
        for (webhook, stored, rows, intake) in plan {
            runs.push(webhook, stored, rows, intake, &mut seqs);
        }
        for (webhook, runs) in &runs.webhooks {
            for run in runs {
                match run.stored {
                    Stored::Due => {
                        bundles::store(c, *webhook, &run.rows, 0)?;
                    }
                    // Started at once by this node: one bundle leased to
                    // it, closed as one a claim leased (no row is written
                    // for a delivery that succeeds at its first attempt).
                    Stored::Leased => {
                        // The group's lease (every publish of it has the same).
                        let lease_until =
                            run.rows.iter().map(|n| n.lease_until).max().unwrap_or(0);
                        let Some(seq) = bundles::store(c, *webhook, &run.rows, lease_until)?
                        else {
                            continue;
                        };
                        out.leased_bundles.push(LeasedBundle {
                            seq,
                            webhook_id: *webhook,
                            lease_until,
                            count: run.rows.len(),
                        });
                        out.leased.extend(run.rows.iter().map(|n| Claimed {
                            seq: n.seq,
                            id: n.row.id.clone(),
                            webhook_id: *webhook,
                            event: n.row.event.to_string(),
                            data: n.row.data.clone(),
                            created_at: n.now,
                            attempts: 0,
                            next_attempt_at: n.now,
                            ordered: false,
                            bundle: seq,
                        }));
                    }
                    Stored::Refused => {
                        c.insert_run(*webhook, run)?;
                    }
                }
            }
        }
        Ok::<Enqueued, diesel::result::Error>(out)
    })?;
    Ok(stored)
}

/// The columns of a claimed delivery, from `d` (and `w.ordered`).
const CLAIMED: &str = "d.seq, d.id, d.webhook_id, d.event, d.data, d.created_at, d.attempts, \
     d.next_attempt_at, CAST(0 AS BIGINT) AS bundle";

/// The due deliveries of webhook `w`, not `ordered` (the first `$3`, in
/// claim order).
const DUE_OF_WEBHOOK: &str = "d.webhook_id = w.id AND d.dead_at IS NULL \
     AND d.next_attempt_at <= $1 AND d.lease_until <= $1";

/// The delivery an `ordered` webhook `w` may start: its oldest pending one
/// (found in the `(webhook_id, dead_at, seq)` index, then by its key; as
/// `MIN(seq)`, PostgreSQL walked the primary key from the oldest row of
/// any webhook), if it is due and not leased, and while nothing holds the
/// webhook back in `webhook_in_flight`: the delivery claimed last, still
/// pending and leased (a dead letter put back by `/retry` is the oldest
/// while a later one may be in flight); or, until the time kept there
/// when the webhook was made ordered, any delivery of it leased, as a row
/// or a bundle (those started before are not known one by one). Each step
/// is a lookup by key, however many deliveries wait behind (before, every
/// claim looked at every due row of the webhook: with 200,000 behind a
/// retrying one, 70 ms on PostgreSQL and 220 ms of SQLite's write lock);
/// only in that time after a change to ordered are its pending rows read.
/// No index holds `lease_until`, so that a claim's lease stays a HOT
/// update on PostgreSQL.
const NEXT_OF_ORDERED: &str = "d.seq = (SELECT d2.seq FROM webhook_deliveries d2 \
          WHERE d2.webhook_id = w.id AND d2.dead_at IS NULL \
          ORDER BY d2.webhook_id, d2.dead_at, d2.seq LIMIT 1) \
     AND d.dead_at IS NULL AND d.next_attempt_at <= $1 AND d.lease_until <= $1 \
     AND NOT EXISTS (SELECT 1 FROM webhook_in_flight f WHERE f.webhook_id = w.id \
          AND (EXISTS (SELECT 1 FROM webhook_deliveries y \
               WHERE y.seq = f.seq AND y.webhook_id = w.id AND y.dead_at IS NULL \
               AND y.lease_until > $1) \
          OR (f.until > $1 AND (EXISTS (SELECT 1 FROM webhook_deliveries y \
               WHERE y.webhook_id = w.id AND y.dead_at IS NULL AND y.lease_until > $1) \
               OR EXISTS (SELECT 1 FROM webhook_bundles b \
               WHERE b.webhook_id = w.id AND b.lease_until > $1)))))";

/// Records what holds `ordered` webhook `$1` back (`NEXT_OF_ORDERED`): its
/// delivery claimed last (`$2`), and a time until which any delivery of it
/// leased does (`$3`, set when it is made ordered).
pub(super) const HOLD_BACK: &str = "INSERT INTO webhook_in_flight (webhook_id, seq, until) \
     VALUES ($1, $2, $3) \
     ON CONFLICT (webhook_id) DO UPDATE SET seq = excluded.seq, until = excluded.until";

/// SQLite's claim of webhook `?3`: the first `?2` rows (due at `?1`) that
/// `next` selects.
fn claim_one(next: &str) -> String {
    dialect_of(
        false,
        &format!(
            "SELECT {CLAIMED}, w.ordered FROM webhook_deliveries d JOIN webhooks w ON w.id = $3 \
             WHERE {next} ORDER BY d.next_attempt_at, d.seq LIMIT $2"
        ),
    )
}

/// A webhook's id and whether it is `ordered`.
#[derive(QueryableByName)]
struct HookOrdered {
    #[diesel(sql_type = BigInt)]
    id: i64,
    #[diesel(sql_type = Bool)]
    ordered: bool,
}

/// What a claim took.
#[derive(Debug)]
pub struct Claim {
    /// The deliveries, leased to the caller.
    pub rows: Vec<Claimed>,
    /// Their webhooks.
    pub targets: Vec<Target>,
    /// The bundles leased whole among them.
    pub bundles: Vec<LeasedBundle>,
    /// False when the claim stopped at its limit (due deliveries may remain
    /// beyond what each webhook's room asked for), or made due rows of
    /// bundles whose lease ran out.
    pub complete: bool,
}

/// How many deliveries of each webhook a claim may take for this node.
#[derive(Debug, Clone)]
pub struct Rooms {
    /// The room of each webhook the node holds deliveries of.
    pub known: HashMap<i64, usize>,
    /// Any other webhook's (its in-flight limit).
    pub default: usize,
    /// Never more than this for one webhook.
    pub most: usize,
}

impl Rooms {
    /// Webhook `w`'s room.
    pub fn of(&self, w: i64) -> usize {
        self.known
            .get(&w)
            .copied()
            .unwrap_or(self.default)
            .min(self.most)
    }
}

/// Claims up to `limit` due deliveries (oldest first), leasing them until
/// `lease_until`, skipping webhooks in `exclude` (at their in-flight limit
/// on this node) and taking at most each webhook's room (bundles leased
/// whole may pass it by less than one bundle; `storage::bundles`). An
/// `ordered` webhook's delivery is due only when it is the webhook's oldest
/// pending one, so one is in flight in the whole cluster and a retrying one
/// holds back the later ones.
///
/// Each webhook's due deliveries are read from its own index range, so the
/// backlog of an excluded webhook (a slow or dead receiver) costs nothing,
/// nor does an ordered webhook's (`NEXT_OF_ORDERED`): two `LATERAL`
/// queries on PostgreSQL (unordered webhooks, ordered ones), one query per
/// enabled webhook on SQLite (in process, inside its write lock). Each
/// reads and locks no more than the webhook's room: a row locked is a row
/// written, and a claim that locked a prefetch's worth of rows of a webhook
/// with room for a sixth of them spent most of its time on rows it then
/// let go.
pub fn claim(
    conn: &mut DbConn,
    now: i64,
    lease_until: i64,
    limit: i64,
    exclude: &[i64],
    rooms: &Rooms,
) -> Result<Claim, StorageError> {
    let pg = conn.is_pg();
    let claimable = format!("w.enabled AND w.id NOT IN ({})", id_list(exclude));
    let hooks = format!("SELECT w.id, w.ordered FROM webhooks w WHERE {claimable}");
    // PostgreSQL: every unordered webhook's due rows in one statement, with
    // each webhook's room (`$4` for one the node holds nothing of), and
    // every ordered one's next row in another (`FOR UPDATE` refuses a
    // `UNION`).
    let unordered = |ids: &[i64], sizes: &[i64]| {
        format!(
            "SELECT d.*, w.ordered FROM webhooks w \
         LEFT JOIN unnest('{{{}}}'::bigint[], '{{{}}}'::bigint[]) AS r(id, room) ON r.id = w.id \
         CROSS JOIN LATERAL (SELECT {CLAIMED} FROM webhook_deliveries d \
             WHERE {DUE_OF_WEBHOOK} ORDER BY d.next_attempt_at, d.seq \
             LIMIT LEAST(COALESCE(r.room, $4), $3) \
             FOR UPDATE OF d SKIP LOCKED) d \
         WHERE {claimable} AND NOT w.ordered ORDER BY d.next_attempt_at, d.seq LIMIT $2",
            id_list(ids),
            id_list(sizes),
        )
    };
    let no_room: Vec<i64> = rooms
        .known
        .keys()
        .copied()
        .filter(|w| rooms.of(*w) == 0)
        .collect();
    let ordered = format!(
        "SELECT d.*, w.ordered FROM webhooks w \
         CROSS JOIN LATERAL (SELECT {CLAIMED} FROM webhook_deliveries d \
             WHERE {NEXT_OF_ORDERED} FOR UPDATE OF d SKIP LOCKED) d \
         WHERE {claimable} AND w.ordered AND w.id NOT IN ({})",
        id_list(&no_room)
    );
    let (q_unordered, q_ordered) = (claim_one(DUE_OF_WEBHOOK), claim_one(NEXT_OF_ORDERED));
    let q_hold = dialect(conn, HOLD_BACK);
    let most = i64::try_from(rooms.most).unwrap_or(i64::MAX).min(limit);
    let q_bundled = format!(
        "SELECT w.id, w.ordered FROM webhooks w WHERE {claimable} \
         AND EXISTS (SELECT 1 FROM webhook_bundles b WHERE b.webhook_id = w.id \
         AND b.lease_until <= {now}) ORDER BY w.id"
    );
    let room_of = |w: i64| i64::try_from(rooms.of(w)).unwrap_or(i64::MAX).min(most);
    let (claimed, bundles, complete) = unsynced(conn, |conn| {
        Ok(write_tx!(conn, c => {
            let mut found: Vec<Claimed> = if pg {
                let (ids, sizes): (Vec<i64>, Vec<i64>) =
                    rooms.known.keys().map(|w| (*w, room_of(*w))).unzip();
                let mut found: Vec<Claimed> = diesel::sql_query(unordered(&ids, &sizes))
                    .bind::<BigInt, _>(now)
                    .bind::<BigInt, _>(limit)
                    .bind::<BigInt, _>(most)
                    .bind::<BigInt, _>(i64::try_from(rooms.default).unwrap_or(i64::MAX))
                    .load(c)?;
                found.extend(
                    diesel::sql_query(&ordered)
                        .bind::<BigInt, _>(now)
                        .load::<Claimed>(c)?,
                );
                found
            } else {
                let candidates: Vec<HookOrdered> = diesel::sql_query(&hooks).load(c)?;
                let mut found = Vec::new();
                for hook in candidates {
                    let take = room_of(hook.id);
                    if take == 0 {
                        continue;
                    }
                    let q = if hook.ordered { &q_ordered } else { &q_unordered };
                    found.extend(
                        diesel::sql_query(q)
                            .bind::<BigInt, _>(now)
                            .bind::<BigInt, _>(take)
                            .bind::<BigInt, _>(hook.id)
                            .load::<Claimed>(c)?,
                    );
                }
                found
            };
            found.sort_unstable_by_key(|r| (r.next_attempt_at, r.seq));
            // Each webhook's query took at most its room: nothing more to drop.
            found.truncate(usize::try_from(limit).unwrap_or(0));
            if !found.is_empty() {
                let seqs: Vec<i64> = found.iter().map(|r| r.seq).collect();
                diesel::update(d::table.filter(d::seq.eq_any(&seqs)))
                    .set((
                        d::lease_until.eq(lease_until),
                        // An attempt counts once started: a node that dies during
                        // it has used it up (attempt numbers are the cluster's).
                        d::attempts.eq(d::attempts + 1_i64),
                    ))
                    .execute(c)?;
            }
            // Then bundles, for what each room still lacks: a webhook's
            // rows are older than its bundles (under the webhook's shared
            // lock, as the intake stores, so a delete misses none of the
            // rows unpacked; `bundles::unpack_for_claim`).
            let budget = limit.saturating_sub(i64::try_from(found.len()).unwrap_or(i64::MAX));
            let mut whole = Vec::new();
            let mut retaken = false;
            if budget > 0 {
                let bundled: Vec<(i64, bool)> = diesel::sql_query(&q_bundled)
                    .load::<HookOrdered>(c)?
                    .into_iter()
                    .map(|h| (h.id, h.ordered))
                    .collect();
                if !bundled.is_empty() {
                    let mut taken: HashMap<i64, i64> = HashMap::new();
                    for r in &found {
                        *taken.entry(r.webhook_id).or_insert(0) += 1;
                    }
                    let room_left = |w: i64| room_of(w) - taken.get(&w).copied().unwrap_or(0);
                    let from = bundles::unpack_for_claim(
                        c, &bundled, now, lease_until, budget, room_left,
                    )?;
                    found.extend(from.claimed);
                    whole = from.leased;
                    // Rows of bundles whose lease ran out are due now: the
                    // next claim, at once, takes them.
                    retaken = from.retaken > 0;
                    found.sort_unstable_by_key(|r| (r.next_attempt_at, r.seq));
                }
            }
            // An ordered webhook's delivery taken now holds the webhook
            // back while it is pending and leased (`NEXT_OF_ORDERED`).
            for r in found.iter().filter(|r| r.ordered) {
                diesel::sql_query(&q_hold)
                    .bind::<BigInt, _>(r.webhook_id)
                    .bind::<BigInt, _>(r.seq)
                    .bind::<BigInt, _>(0_i64)
                    .execute(c)?;
            }
            let complete = !retaken && found.len() < usize::try_from(limit).unwrap_or(0);
            Ok::<_, diesel::result::Error>((found, whole, complete))
        })?)
    })?;
    if claimed.is_empty() {
        return Ok(Claim {
            rows: claimed,
            targets: Vec::new(),
            bundles,
            complete,
        });
    }
    let mut hooks: Vec<i64> = claimed.iter().map(|r| r.webhook_id).collect();
    hooks.sort_unstable();
    hooks.dedup();
    Ok(Claim {
        targets: targets(conn, &hooks)?,
        rows: claimed,
        bundles,
        complete,
    })
}

/// These webhooks, with their instances' names and tokens (a read only).
pub fn targets(conn: &mut DbConn, hooks: &[i64]) -> Result<Vec<Target>, StorageError> {
    if hooks.is_empty() {
        return Ok(Vec::new());
    }
    let text = format!(
        "SELECT {COLUMNS}, i.name AS instance_name, i.token AS instance_token \
         FROM webhooks w JOIN instances i ON i.id = w.instance_id WHERE w.id IN ({})",
        id_list(hooks)
    );
    Ok(with_conn!(conn, c => diesel::sql_query(&text).load(c))?)
}

/// The pending row at `seq` as the claim that counted its attempt
/// `attempts` and leased it until `lease` left it (not claimed again
/// since, nor put back and claimed again with the same count, nor
/// already given its outcome: each of those changes its lease).
#[diesel::dsl::auto_type]
fn held(seq: i64, attempts: i64, lease: i64) -> _ {
    d::table
        .filter(d::seq.eq(seq))
        .filter(d::dead_at.is_null())
        .filter(d::attempts.eq(attempts))
        .filter(d::lease_until.eq(lease))
}

/// Records attempt outcomes of rows (and the webhooks' counters) and
/// closes leased bundles (`bundles::close`) in one transaction. An outcome
/// is applied only to a row its attempt's claim left as it is: not to a
/// delivery that became a dead letter meanwhile (its webhook was
/// disabled), nor to a bundle no longer leased to this node, nor to a row
/// claimed again since (its lease ran out while the outcome waited to be
/// recorded: the other claim counted one attempt more, and the row is that
/// node's now); a success is recorded all the same. Where such a row still
/// holds the lease the attempt ran under (made a dead letter, or put back
/// by `/retry`, or taken back with its bundle, meanwhile), only that lease
/// is ended: the attempt is over.
pub fn complete(
    conn: &mut DbConn,
    outcomes: &[Outcome],
    closing: &[Closing],
) -> Result<(), StorageError> {
    // One update of each webhook's row: on PostgreSQL a second update of a
    // row in one transaction checks its foreign key (the instance row, FOR
    // KEY SHARE), which waited for an instance being deleted while that
    // delete waited for this transaction's webhook lock: a deadlock.
    let q_counters = dialect(
        conn,
        "UPDATE webhooks SET delivered = delivered + $1, \
         last_success_at = COALESCE($2, last_success_at), \
         last_failure_at = COALESCE($3, last_failure_at), last_error = COALESCE($4, last_error) \
         WHERE id = $5",
    );
    // Successes in one statement, and one counter update per webhook.
    let delivered: Vec<(i64, i64)> = outcomes
        .iter()
        .filter_map(|o| match o {
            Outcome::Delivered { seq, lease, .. } => Some((*seq, *lease)),
            _ => None,
        })
        .collect();
    let mut last_success: HashMap<i64, i64> = HashMap::new();
    // Failures likewise: one update per webhook, with its latest failure.
    let mut last_failure: HashMap<i64, (i64, &str)> = HashMap::new();
    for o in outcomes
        .iter()
        .chain(closing.iter().flat_map(|b| &b.outcomes))
    {
        match o {
            Outcome::Delivered { webhook_id, at, .. } => {
                let e = last_success.entry(*webhook_id).or_insert(*at);
                *e = (*e).max(*at);
            }
            Outcome::Retry {
                webhook_id,
                at,
                error,
                ..
            }
            | Outcome::Dead {
                webhook_id,
                at,
                error,
                ..
            } => {
                let e = last_failure.entry(*webhook_id).or_insert((*at, error));
                if *at >= e.0 {
                    *e = (*at, error);
                }
            }
            Outcome::Released { .. } => {}
        }
    }
    let hooks: Vec<i64> = outcomes
        .iter()
        .map(Outcome::webhook_id)
        .chain(closing.iter().map(|b| b.bundle.webhook_id))
        .collect();
    let q_lock = hook_locks(conn.is_pg(), &hooks, true);
    unsynced(conn, |conn| {
        Ok(write_tx!(conn, c => {
            if let Some(q) = &q_lock {
                diesel::sql_query(q).execute(c)?;
            }
            let mut delivered_per_hook: HashMap<i64, i64> = HashMap::new();
            // Bundles first: what of them did not succeed becomes rows, which
            // their outcomes then update as any row's.
            let mut closed: Vec<&Outcome> = Vec::new();
            let (whole, partly): (Vec<&Closing>, Vec<&Closing>) =
                closing.iter().partition(|b| b.all_delivered());
            // Those whose deliveries all succeeded in one statement.
            let leases: Vec<(i64, i64)> = whole
                .iter()
                .map(|b| (b.bundle.seq, b.bundle.lease_until))
                .collect();
            let dropped: HashSet<i64> =
                c.drop_bundles(&leases)?.into_iter().collect();
            // Attempts whose outcome found no row held under their lease:
            // its delivery was made a dead letter (its webhook disabled),
            // put back by `/retry`, or taken back with its bundle, while
            // they ran. Their lease is ended, so that a delivery put back
            // meanwhile waits for the attempt, not for the lease.
            let mut unheld: Vec<(i64, i64)> = Vec::new();
            let mut bundle_gone = |b: &Closing| {
                unheld.extend(b.outcomes.iter().map(|o| (o.seq(), b.bundle.lease_until)));
            };
            for b in &whole {
                if dropped.contains(&b.bundle.seq) {
                    *delivered_per_hook.entry(b.bundle.webhook_id).or_insert(0) +=
                        i64::try_from(b.outcomes.len()).unwrap_or(i64::MAX);
                } else {
                    bundle_gone(b);
                }
            }
            for b in partly {
                if !bundles::close(c, &b.bundle, &b.outcomes)? {
                    bundle_gone(b);
                } else {
                    let (succeeded, failed): (Vec<&Outcome>, Vec<&Outcome>) = b
                        .outcomes
                        .iter()
                        .partition(|o| o.is_delivered());
                    *delivered_per_hook.entry(b.bundle.webhook_id).or_insert(0) +=
                        i64::try_from(succeeded.len()).unwrap_or(i64::MAX);
                    closed.extend(failed);
                }
            }
            if !delivered.is_empty() {
                // Not `dead_at IS NULL`: PostgreSQL would read the whole
                // partial index of pending rows beside the primary key
                // (a BitmapAnd) whenever its statistics lag a burst.
                let seqs: Vec<i64> = delivered.iter().map(|(seq, _)| *seq).collect();
                let gone: Vec<(i64, i64)> = diesel::delete(
                    d::table
                        .filter(d::seq.eq_any(&seqs))
                        .filter(diesel::dsl::sql::<Bool>("COALESCE(dead_at, -1) < 0")),
                )
                .returning((d::seq, d::webhook_id))
                .get_results(c)?;
                for (_, w) in &gone {
                    *delivered_per_hook.entry(*w).or_insert(0) += 1;
                }
                // Rarely: successes whose row was not there to delete.
                if gone.len() < delivered.len() {
                    let gone: HashSet<i64> = gone.iter().map(|(seq, _)| *seq).collect();
                    unheld.extend(delivered.iter().filter(|(seq, _)| !gone.contains(seq)));
                }
            }
            for o in outcomes.iter().chain(closed) {
                match o {
                    Outcome::Delivered { .. } => {}
                    Outcome::Retry { seq, attempts, lease, next_at, status, error, at, .. } => {
                        let n = diesel::update(held(*seq, *attempts, *lease))
                            .set((
                                d::attempts.eq(attempts),
                                d::next_attempt_at.eq(next_at),
                                d::lease_until.eq(0_i64),
                                d::last_status.eq(status),
                                d::last_error.eq(error),
                                d::last_attempt_at.eq(at),
                            ))
                            .execute(c)?;
                        if n == 0 {
                            unheld.push((*seq, *lease));
                        }
                    }
                    Outcome::Released { seq, attempts, lease, .. } => {
                        let n = diesel::update(held(*seq, attempts + 1, *lease))
                            .set((d::attempts.eq(attempts), d::lease_until.eq(0_i64)))
                            .execute(c)?;
                        if n == 0 {
                            unheld.push((*seq, *lease));
                        }
                    }
                    Outcome::Dead { seq, attempts, lease, status, error, at, .. } => {
                        let n = diesel::update(held(*seq, *attempts, *lease))
                            .set((
                                d::attempts.eq(attempts),
                                d::lease_until.eq(0_i64),
                                d::last_status.eq(status),
                                d::last_error.eq(error),
                                d::last_attempt_at.eq(at),
                                d::dead_at.eq(at),
                            ))
                            .execute(c)?;
                        if n == 0 {
                            unheld.push((*seq, *lease));
                        }
                    }
                }
            }
            for (seq, lease) in unheld {
                diesel::update(d::table.filter(d::seq.eq(seq)).filter(d::lease_until.eq(lease)))
                    .set(d::lease_until.eq(0_i64))
                    .execute(c)?;
            }
            // The webhooks' rows last, in id order: two nodes recording
            // outcomes of the same webhooks lock them in one order (no deadlock).
            let mut hooks: Vec<i64> = delivered_per_hook
                .keys()
                .chain(last_failure.keys())
                .copied()
                .collect();
            hooks.sort_unstable();
            hooks.dedup();
            for w in hooks {
                let failure = last_failure.get(&w);
                let delivered = delivered_per_hook.get(&w).copied().unwrap_or(0);
                let success_at = last_success.get(&w).copied().filter(|_| delivered > 0);
                diesel::sql_query(&q_counters)
                    .bind::<BigInt, _>(delivered)
                    .bind::<Nullable<BigInt>, _>(success_at)
                    .bind::<Nullable<BigInt>, _>(failure.map(|(at, _)| *at))
                    .bind::<Nullable<Text>, _>(failure.map(|(_, e)| *e))
                    .bind::<BigInt, _>(w)
                    .execute(c)?;
            }
            Ok::<(), diesel::result::Error>(())
        })?)
    })
}

/// The acceptance position of a delivery id: pending or dead, or put back
/// by `/retry` since (and perhaps delivered and gone).
pub fn seq_of(conn: &mut DbConn, id: &str) -> Result<Option<i64>, StorageError> {
    Ok(with_conn!(conn, c => {
        match d::table.filter(d::id.eq(id)).select(d::seq).first::<i64>(c).optional()? {
            Some(seq) => Ok(Some(seq)),
            None => r::table.filter(r::id.eq(id)).select(r::seq).first::<i64>(c).optional(),
        }
    })?)
}

/// Where a page of dead letters starts.
#[derive(Debug, Clone, Copy)]
pub enum PageStart {
    /// After the delivery at this acceptance position (0: from the first).
    AfterSeq(i64),
    /// With the deliveries accepted at or after this time (Unix ms): where
    /// a cursor whose delivery is gone (replayed and delivered, or
    /// deleted) stood.
    Since(i64),
}

/// Dead letters of these webhooks from `start`, oldest first, at most `limit`.
pub fn dead_letters(
    conn: &mut DbConn,
    webhooks: &[i64],
    start: PageStart,
    limit: i64,
) -> Result<Vec<DeadLetter>, StorageError> {
    let (after_seq, since) = match start {
        PageStart::AfterSeq(seq) => (seq, i64::MIN),
        PageStart::Since(at) => (0, at),
    };
    Ok(with_conn!(conn, c => d::table
        .filter(d::webhook_id.eq_any(webhooks))
        .filter(d::dead_at.is_not_null())
        .filter(d::seq.gt(after_seq))
        .filter(d::created_at.ge(since))
        .order(d::seq)
        .limit(limit)
        .select((
            d::seq,
            d::id,
            d::webhook_id,
            d::event,
            d::data,
            d::created_at,
            d::attempts,
            d::last_status,
            d::last_error,
            d::last_attempt_at,
        ))
        .load::<DeadLetter>(c))?)
}

/// Ids of dead letters requeued per statement.
const REQUEUE_CHUNK: usize = 1_000;

/// Positions kept per statement (three bound values each: SQLite takes at
/// most 32,766 in a statement).
const POSITIONS_CHUNK: usize = 5_000;

/// Puts dead letters of these webhooks (all, or those of `ids`) back as
/// pending from the first attempt; returns how many. Where each stood is
/// kept (`webhook_requeued`, the time of its latest put-back), for a
/// `/failed` cursor that names one after it was delivered.
pub fn requeue(
    conn: &mut DbConn,
    webhooks: &[i64],
    ids: Option<&[String]>,
    now: i64,
) -> Result<usize, StorageError> {
    // The lease is left: a letter made dead while an attempt of it ran
    // (its webhook disabled) waits for that attempt to end, whose outcome
    // ends the lease (`complete`), or for the lease to run out.
    let changes = (
        d::dead_at.eq(None::<i64>),
        d::attempts.eq(0_i64),
        d::next_attempt_at.eq(now),
    );
    let letters = d::table
        .filter(d::webhook_id.eq_any(webhooks))
        .filter(d::dead_at.is_not_null());
    Ok(write_tx!(conn, c => {
        let put_back: Vec<(String, i64)> = match ids {
            // In chunks: SQLite takes at most 32,766 bound values in a
            // statement, and a request may name more ids (unknown ones are
            // ignored).
            Some(ids) => {
                let mut put_back = Vec::new();
                for chunk in ids.chunks(REQUEUE_CHUNK) {
                    put_back.extend(
                        diesel::update(letters.clone().filter(d::id.eq_any(chunk)))
                            .set(changes)
                            .returning((d::id, d::seq))
                            .get_results::<(String, i64)>(c)?,
                    );
                }
                put_back
            }
            None => diesel::update(letters)
                .set(changes)
                .returning((d::id, d::seq))
                .get_results(c)?,
        };
        for chunk in put_back.chunks(POSITIONS_CHUNK) {
            let rows: Vec<_> = chunk
                .iter()
                .map(|(id, seq)| (r::id.eq(id), r::seq.eq(seq), r::at.eq(now)))
                .collect();
            diesel::insert_into(r::table)
                .values(&rows)
                .on_conflict(r::id)
                .do_update()
                .set(r::at.eq(diesel::upsert::excluded(r::at)))
                .execute(c)?;
        }
        Ok::<usize, diesel::result::Error>(put_back.len())
    })?)
}

/// Dead row versions of a queue table (delivered rows and closed bundles
/// deleted, leases and attempts updated) past which PostgreSQL's copy is
/// vacuumed.
const VACUUM_DEAD_ROWS: i64 = 20_000;

/// The tables that turn over as queues.
const QUEUE_TABLES: [&str; 2] = ["webhook_deliveries", "webhook_bundles"];

#[derive(QueryableByName)]
struct RowVersions {
    #[diesel(sql_type = BigInt)]
    live: i64,
    #[diesel(sql_type = BigInt)]
    dead: i64,
}

/// On PostgreSQL, vacuums and analyses each queue table (`webhook_deliveries`,
/// `webhook_bundles`) once its dead row versions pass [`VACUUM_DEAD_ROWS`]
/// and a fifth of its live rows. A queue table turns over quickly: without
/// it (autovacuum off, or lagging a burst) every claim walks the dead
/// entries of its indexes and the planner works from stale statistics, and
/// claims slow to hundreds of milliseconds. With autovacuum keeping up this
/// never fires. `SKIP_LOCKED`: a vacuum already running elsewhere is
/// enough. Returns the tables it vacuumed.
pub fn vacuum_if_bloated(conn: &mut DbConn) -> Result<Vec<&'static str>, StorageError> {
    use diesel::connection::SimpleConnection;
    let DbConn::Pg(c) = conn else {
        return Ok(Vec::new());
    };
    let mut vacuumed = Vec::new();
    for table in QUEUE_TABLES {
        let versions: Option<RowVersions> = diesel::sql_query(
            "SELECT n_live_tup AS live, n_dead_tup AS dead FROM pg_stat_user_tables \
             WHERE relname = $1 AND schemaname = current_schema()",
        )
        .bind::<Text, _>(table)
        .get_result(c)
        .optional()?;
        if versions.is_some_and(|v| v.dead >= VACUUM_DEAD_ROWS.max(v.live / 5)) {
            c.batch_execute(&format!("VACUUM (ANALYZE, SKIP_LOCKED) {table}"))?;
            vacuumed.push(table);
        }
    }
    Ok(vacuumed)
}

/// Deletes dead letters that died before `before`, and the positions of
/// those put back before it.
pub fn purge_dead(conn: &mut DbConn, before: i64) -> Result<usize, StorageError> {
    Ok(write_tx!(conn, c => {
        diesel::delete(r::table.filter(r::at.lt(before))).execute(c)?;
        diesel::delete(d::table.filter(d::dead_at.lt(before))).execute(c)
    })?)
}

/// Turns pending deliveries of disabled webhooks into dead letters with
/// error `webhook disabled` (a publish that raced with the disable).
pub fn kill_disabled(conn: &mut DbConn, now: i64) -> Result<usize, StorageError> {
    let hooks = HookId::ids(with_conn!(conn, c => diesel::sql_query(
        "SELECT w.id FROM webhooks w WHERE NOT w.enabled AND (EXISTS \
         (SELECT 1 FROM webhook_deliveries d WHERE d.webhook_id = w.id AND d.dead_at IS NULL) \
         OR EXISTS (SELECT 1 FROM webhook_bundles b WHERE b.webhook_id = w.id)) ORDER BY w.id",
    )
    .load::<HookId>(c))?);
    kill_disabled_of(conn, &hooks, now)
}

/// [`kill_disabled`] for `hooks`, read as disabled before their locks were
/// taken: only those still disabled once they are held are unpacked (one
/// enabled again meanwhile keeps its bundles, leased to a live node too).
/// Enabling takes no such lock on PostgreSQL: one enabled between that
/// read and the unpack, one statement apart, is still unpacked (its
/// deliveries stay pending; only a leased bundle's may be attempted twice).
fn kill_disabled_of(conn: &mut DbConn, hooks: &[i64], now: i64) -> Result<usize, StorageError> {
    if hooks.is_empty() {
        return Ok(0);
    }
    let q_lock = hook_locks(conn.is_pg(), hooks, false);
    let q_still = format!(
        "SELECT id FROM webhooks WHERE NOT enabled AND id IN ({}) ORDER BY id",
        id_list(hooks)
    );
    let text = dialect(
        conn,
        &format!(
            "UPDATE webhook_deliveries SET dead_at = $1, last_error = 'webhook disabled' \
             WHERE dead_at IS NULL AND webhook_id IN ({}) \
             AND webhook_id IN (SELECT id FROM webhooks WHERE NOT enabled)",
            id_list(hooks)
        ),
    );
    Ok(write_tx!(conn, c => {
        if let Some(q) = &q_lock {
            diesel::sql_query(q).execute(c)?;
        }
        for w in HookId::ids(diesel::sql_query(&q_still).load::<HookId>(c)?) {
            bundles::unpack_all(c, w)?;
        }
        diesel::sql_query(&text).bind::<BigInt, _>(now).execute(c)
    })?)
}

/// Pending deliveries of every webhook, rows and bundles.
pub fn pending_total(conn: &mut DbConn) -> Result<i64, StorageError> {
    bundles::pending_total(conn)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{InstanceId, InstanceName};
    use crate::storage::schema::webhook_bundles as bundles_table;
    use crate::storage::webhooks::{upsert, NewConfig};
    use crate::storage::{accounts, instances, pool};

    /// How long a webhook made ordered here waits for deliveries started
    /// before at most: `upsert` stamps the real time, and the tests' clock
    /// is made up (thousands of ms), so for the whole test.
    const HOLD_MS: i64 = 0;

    /// A SQLite database in `dir` with one enabled webhook.
    fn one_webhook(dir: &tempfile::TempDir, ordered: bool) -> (DbConn, i64) {
        let url = dir.path().join("d.db").display().to_string();
        let mut conn = pool::open_one(&url).unwrap();
        let account = accounts::create(&mut conn, "a", "h").unwrap();
        let name = InstanceName::parse("i").unwrap();
        let (instance, _) =
            instances::create(&mut conn, account, &name, "t", "th", None, None).unwrap();
        let (hook, _) = upsert(&mut conn, instance.id, &config(ordered), HOLD_MS).unwrap();
        (conn, hook.id)
    }

    /// The configuration [`one_webhook`] sets.
    fn config(ordered: bool) -> NewConfig {
        NewConfig {
            label: "default".into(),
            enabled: true,
            url: Some("http://127.0.0.1:9/".into()),
            auth_header: None,
            by_events: false,
            events: Vec::new(),
            media_base64: false,
            ordered,
            new_secret: "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into(),
            rotate_secret: false,
        }
    }

    /// `n` deliveries with ids `msg_<tag>_000`… and data `{"i":…}`.
    fn deliveries(tag: &str, n: usize) -> Vec<NewDelivery> {
        (0..n)
            .map(|i| NewDelivery {
                id: format!("msg_{tag}_{i:03}"),
                event: "message.exchange",
                data: format!("{{\"i\":{i}}}"),
            })
            .collect()
    }

    /// Stores `rows` of `hook` as one publish accepted at `now`: its first
    /// `leased` leased until `now + 1000`, the rest due (in a bundle), past
    /// `max_pending` refused.
    fn publish(
        conn: &mut DbConn,
        hook: i64,
        rows: Vec<NewDelivery>,
        now: i64,
        leased: usize,
        max_pending: i64,
    ) -> Enqueued {
        let batches = vec![(hook, rows)];
        let intake = Intake {
            batches: &batches,
            leased: &[leased],
            now,
            lease_until: now + 1_000,
        };
        enqueue(conn, &[intake], max_pending, &mut PendingCounts::default()).unwrap()
    }

    /// `n` deliveries whose ids start with `tag`, stored due (in bundles).
    fn publish_due(conn: &mut DbConn, hook: i64, tag: &str, n: usize, now: i64) {
        publish(conn, hook, deliveries(tag, n), now, 0, i64::MAX);
    }

    fn rooms(n: usize) -> Rooms {
        Rooms {
            known: HashMap::new(),
            default: n,
            most: n,
        }
    }

    /// The rows of `hook`: id, attempts, next attempt, lease, last status, dead.
    type RowState = (String, i64, i64, i64, Option<i64>, bool);
    fn row_states(conn: &mut DbConn) -> Vec<RowState> {
        with_conn!(conn, c => d::table
            .order(d::seq)
            .select((d::id, d::attempts, d::next_attempt_at, d::lease_until, d::last_status, d::dead_at))
            .load::<(String, i64, i64, i64, Option<i64>, Option<i64>)>(c))
        .unwrap()
        .into_iter()
        .map(|(id, a, n, l, s, dead)| (id, a, n, l, s, dead.is_some()))
        .collect()
    }

    fn row(id: &str, attempts: i64, next: i64, lease: i64, status: Option<i64>) -> RowState {
        (id.to_string(), attempts, next, lease, status, false)
    }

    /// The `delivered` counter of `hook`, as its stored row has it.
    fn delivered_count(conn: &mut DbConn, hook: i64) -> Vec<i64> {
        targets(conn, &[hook])
            .unwrap()
            .iter()
            .map(|t| t.hook.delivered)
            .collect()
    }

    /// An attempt of `seq`, leased until `lease`, that succeeded at `at`.
    fn delivered_at(seq: i64, hook: i64, lease: i64, at: i64) -> Outcome {
        Outcome::Delivered {
            seq,
            webhook_id: hook,
            lease,
            at,
        }
    }

    /// A claim of `seq` (after `attempts` attempts), leased until `lease`,
    /// given back unattempted.
    fn given_back(seq: i64, hook: i64, attempts: i64, lease: i64) -> Outcome {
        Outcome::Released {
            seq,
            webhook_id: hook,
            attempts,
            lease,
        }
    }

    /// Attempt `attempts` of `seq`, leased until `lease`, answered `status`
    /// at `at` and made a dead letter (a 410, or the schedule's last).
    fn dead_letter(
        seq: i64,
        hook: i64,
        attempts: i64,
        lease: i64,
        status: i64,
        at: i64,
    ) -> Outcome {
        Outcome::Dead {
            seq,
            webhook_id: hook,
            attempts,
            lease,
            status: Some(status),
            error: format!("HTTP {status}"),
            at,
        }
    }

    /// What a node records late of a first attempt of `seq` it made under
    /// `lease`: a retry, a give-back, a dead letter.
    fn late_of_first_attempt(seq: i64, hook: i64, lease: i64) -> [Outcome; 3] {
        [
            answered_500(seq, hook, lease, 2_100),
            given_back(seq, hook, 0, lease),
            dead_letter(seq, hook, 1, lease, 410, 2_100),
        ]
    }

    /// A first attempt at `at`, leased until `lease`, answered 500:
    /// retried at 5,000.
    fn answered_500(seq: i64, hook: i64, lease: i64, at: i64) -> Outcome {
        Outcome::Retry {
            seq,
            webhook_id: hook,
            attempts: 1,
            lease,
            next_at: 5_000,
            status: Some(500),
            error: "HTTP 500".into(),
            at,
        }
    }

    fn ids(claim: &Claim) -> Vec<&str> {
        claim.rows.iter().map(|r| r.id.as_str()).collect()
    }

    /// A dead letter put back twice keeps its position with the time of the
    /// latest put-back (the positions are purged with the dead letters of
    /// then); the position is found once it is delivered and gone.
    #[test]
    fn a_put_back_dead_letter_keeps_its_position_from_its_latest_put_back() {
        let dir = tempfile::tempdir().unwrap();
        let (mut conn, hook) = one_webhook(&dir, false);
        // Refused at once (no room): a dead letter.
        publish(&mut conn, hook, deliveries("a", 1), 1_000, 0, 0);
        let seq = seq_of(&mut conn, "msg_a_000").unwrap().unwrap();
        let kept = |conn: &mut DbConn| {
            with_conn!(conn, c => r::table
                .select((r::id, r::seq, r::at))
                .load::<(String, i64, i64)>(c))
            .unwrap()
        };
        assert_eq!(requeue(&mut conn, &[hook], None, 3_000).unwrap(), 1);
        assert_eq!(kept(&mut conn), [("msg_a_000".to_string(), seq, 3_000)]);
        // Dead again, and put back again.
        let taken = claim(&mut conn, 3_000, 8_000, 100, &[], &rooms(1)).unwrap();
        assert_eq!(ids(&taken), ["msg_a_000"]);
        let dead = dead_letter(seq, hook, 1, 8_000, 500, 3_500);
        complete(&mut conn, &[dead], &[]).unwrap();
        assert_eq!(requeue(&mut conn, &[hook], None, 6_000).unwrap(), 1);
        assert_eq!(kept(&mut conn), [("msg_a_000".to_string(), seq, 6_000)]);
        // Delivered: its row is gone, its position is not.
        let taken = claim(&mut conn, 6_000, 11_000, 100, &[], &rooms(1)).unwrap();
        assert_eq!(ids(&taken), ["msg_a_000"]);
        let delivered = delivered_at(seq, hook, 11_000, 6_100);
        complete(&mut conn, &[delivered], &[]).unwrap();
        assert!(row_states(&mut conn).is_empty());
        assert_eq!(seq_of(&mut conn, "msg_a_000").unwrap(), Some(seq));
        purge_dead(&mut conn, 6_000).unwrap();
        assert_eq!(kept(&mut conn).len(), 1, "put back at 6,000, not before");
        purge_dead(&mut conn, 6_001).unwrap();
        assert_eq!(seq_of(&mut conn, "msg_a_000").unwrap(), None);
    }

    /// An outcome recorded after its lease ran out and another node claimed
    /// the delivery again (counting its attempt again) leaves the row to
    /// that node; the other node's own outcome is recorded.
    #[test]
    fn an_outcome_recorded_after_another_claim_leaves_the_row_to_it() {
        let dir = tempfile::tempdir().unwrap();
        let (mut conn, hook) = one_webhook(&dir, false);
        publish_due(&mut conn, hook, "a", 3, 1_000);
        // Node A claims a_000 until 9,000; its outcomes come late.
        let a = claim(&mut conn, 2_000, 9_000, 100, &[], &rooms(1)).unwrap();
        assert_eq!(ids(&a), ["msg_a_000"]);
        let seq = a.rows[0].seq;
        // Node B claims it again once A's lease has run out.
        let b = claim(&mut conn, 9_001, 20_000, 100, &[], &rooms(1)).unwrap();
        assert_eq!(ids(&b), ["msg_a_000"]);
        let b_holds = row("msg_a_000", 2, 1_000, 20_000, None);
        assert_eq!(row_states(&mut conn)[0], b_holds);
        for outcome in late_of_first_attempt(seq, hook, 9_000) {
            complete(&mut conn, std::slice::from_ref(&outcome), &[]).unwrap();
            assert_eq!(row_states(&mut conn)[0], b_holds, "{outcome:?}");
        }
        let own = Outcome::Retry {
            seq,
            webhook_id: hook,
            attempts: 2,
            lease: 20_000,
            next_at: 30_000,
            status: Some(503),
            error: "HTTP 503".into(),
            at: 9_100,
        };
        complete(&mut conn, &[own], &[]).unwrap();
        assert_eq!(
            row_states(&mut conn)[0],
            row("msg_a_000", 2, 30_000, 0, Some(503))
        );
    }

    /// An outcome that finds the row with the attempt count its claim left
    /// but under another lease is not applied either: the delivery became
    /// a dead letter, was put back by `/retry` (its count starts again)
    /// and was claimed again; or the outcome was recorded once already (a
    /// commit whose reply was lost, recorded again) and the row was
    /// claimed again since.
    #[test]
    fn an_outcome_under_an_older_lease_leaves_the_row_alone() {
        let dir = tempfile::tempdir().unwrap();
        let (mut conn, hook) = one_webhook(&dir, false);
        // A row of its own: refused at once (no room), then put back.
        publish(&mut conn, hook, deliveries("a", 1), 1_000, 0, 0);
        assert_eq!(requeue(&mut conn, &[hook], None, 1_500).unwrap(), 1);
        let at = |conn: &mut DbConn, now: i64, lease: i64| {
            let taken = claim(conn, now, lease, 100, &[], &rooms(1)).unwrap();
            assert_eq!(ids(&taken), ["msg_a_000"], "claimed at {now}");
            taken.rows[0].seq
        };
        // Node A: attempt 1, leased until 9,000; its outcomes come late.
        let seq = at(&mut conn, 2_000, 9_000);
        // Node B: attempt 2 once A's lease ran out, and a dead letter.
        at(&mut conn, 9_001, 20_000);
        let dead = dead_letter(seq, hook, 2, 20_000, 500, 9_100);
        complete(&mut conn, &[dead], &[]).unwrap();
        // Put back, and claimed by node C: attempt 1 again, as A's was.
        assert_eq!(requeue(&mut conn, &[hook], None, 10_000).unwrap(), 1);
        at(&mut conn, 10_001, 21_000);
        let c_holds = row_states(&mut conn)[0].clone();
        assert_eq!((c_holds.1, c_holds.3), (1, 21_000));
        for outcome in late_of_first_attempt(seq, hook, 9_000) {
            complete(&mut conn, std::slice::from_ref(&outcome), &[]).unwrap();
            assert_eq!(row_states(&mut conn)[0], c_holds, "{outcome:?}");
        }
        // C gives it back; node D claims it; C's record is applied again.
        let released = given_back(seq, hook, 0, 21_000);
        complete(&mut conn, std::slice::from_ref(&released), &[]).unwrap();
        assert_eq!(
            (row_states(&mut conn)[0].1, row_states(&mut conn)[0].3),
            (0, 0)
        );
        at(&mut conn, 10_002, 22_000);
        let d_holds = row_states(&mut conn)[0].clone();
        complete(&mut conn, &[released], &[]).unwrap();
        assert_eq!(row_states(&mut conn)[0], d_holds);
        assert_eq!((d_holds.1, d_holds.3), (1, 22_000));
    }

    /// A claim leases the oldest bundles whole while its room lasts and
    /// unpacks one larger than its room into rows; closing a leased bundle
    /// stores as rows only what did not succeed (a retry, a delivery given
    /// back, one without an outcome), and a bundle whose lease ran out is
    /// unpacked with its first attempt counted. The counts see bundled
    /// deliveries as pending throughout.
    #[test]
    fn claims_lease_whole_bundles_and_closing_one_keeps_what_did_not_succeed() {
        let dir = tempfile::tempdir().unwrap();
        let (mut conn, hook) = one_webhook(&dir, false);
        publish_due(&mut conn, hook, "a", 3, 1_000);
        publish_due(&mut conn, hook, "b", 4, 1_001);
        publish_due(&mut conn, hook, "c", 2, 1_002);
        assert_eq!(pending_total(&mut conn).unwrap(), 9);
        let counts = crate::storage::webhooks::counts(&mut conn, &[hook]).unwrap();
        assert_eq!((counts[0].pending, counts[0].failed), (9, 0));
        assert!(row_states(&mut conn).is_empty());

        // Room for 2: the oldest bundle (3) does not fit and is unpacked.
        let taken = claim(&mut conn, 2_000, 9_000, 100, &[], &rooms(2)).unwrap();
        assert_eq!(ids(&taken), ["msg_a_000", "msg_a_001"]);
        assert!(taken.bundles.is_empty() && taken.rows.iter().all(|r| r.bundle == 0));
        assert_eq!(
            row_states(&mut conn),
            [
                row("msg_a_000", 1, 1_000, 9_000, None),
                row("msg_a_001", 1, 1_000, 9_000, None),
                row("msg_a_002", 0, 1_000, 0, None),
            ]
        );

        // A delivery accepted after the bundles, refused at once (backlog
        // full), sorts after all of theirs however late they are unpacked.
        publish(&mut conn, hook, deliveries("late", 1), 1_003, 0, 0);

        // Room for 5: the due row, then bundle b whole (no row for it).
        let taken = claim(&mut conn, 2_000, 9_000, 100, &[], &rooms(5)).unwrap();
        assert_eq!(
            ids(&taken),
            [
                "msg_a_002",
                "msg_b_000",
                "msg_b_001",
                "msg_b_002",
                "msg_b_003"
            ]
        );
        let [b] = taken.bundles[..] else {
            panic!("{:?}", taken.bundles)
        };
        assert_eq!((b.webhook_id, b.lease_until, b.count), (hook, 9_000, 4));
        assert_eq!(taken.rows[0].bundle, 0);
        assert!(taken.rows[1..]
            .iter()
            .all(|r| r.bundle == b.seq && r.attempts == 0));
        assert_eq!(taken.rows[1].created_at, 1_001);
        assert_eq!(taken.rows[1].data, "{\"i\":0}");
        assert_eq!(
            row_states(&mut conn).len(),
            4,
            "a's three and the refused one"
        );
        assert_eq!(pending_total(&mut conn).unwrap(), 9);

        // b_000 succeeded, b_001 is to be retried, b_002 was given back,
        // b_003 has no outcome yet (the node is stopping during its attempt).
        let r = &taken.rows;
        let closing = Closing {
            bundle: b,
            outcomes: vec![
                delivered_at(r[1].seq, hook, b.lease_until, 2_100),
                answered_500(r[2].seq, hook, b.lease_until, 2_100),
                given_back(r[3].seq, hook, 0, b.lease_until),
            ],
        };
        let a_002 = delivered_at(r[0].seq, hook, 9_000, 2_100);
        complete(&mut conn, &[a_002], std::slice::from_ref(&closing)).unwrap();
        let states = row_states(&mut conn);
        assert_eq!(
            states,
            [
                row("msg_a_000", 1, 1_000, 9_000, None),
                row("msg_a_001", 1, 1_000, 9_000, None),
                row("msg_b_001", 1, 5_000, 0, Some(500)),
                row("msg_b_002", 0, 1_001, 0, None),
                row("msg_b_003", 1, 1_001, 9_000, None),
                ("msg_late_000".into(), 0, 1_003, 0, None, true),
            ]
        );
        let counts = crate::storage::webhooks::counts(&mut conn, &[hook]).unwrap();
        assert_eq!((counts[0].pending, counts[0].failed), (7, 1));
        assert_eq!(delivered_count(&mut conn, hook), [2]);

        // Closed already (as when its lease ran out and it was taken again):
        // nothing changes.
        complete(&mut conn, &[], &[closing]).unwrap();
        assert_eq!(row_states(&mut conn), states);

        // The due row, then bundle c whole.
        let taken = claim(&mut conn, 2_001, 9_001, 100, &[], &rooms(10)).unwrap();
        assert_eq!(ids(&taken), ["msg_b_002", "msg_c_000", "msg_c_001"]);
        assert_eq!(taken.bundles.len(), 1);

        // c is never closed: once its lease has run out, a claim unpacks it
        // into due rows, its first attempt counted, and the next takes them.
        let taken = claim(&mut conn, 10_000, 30_000, 100, &[], &rooms(5)).unwrap();
        assert_eq!(
            ids(&taken),
            [
                "msg_a_000",
                "msg_a_001",
                "msg_b_002",
                "msg_b_003",
                "msg_b_001"
            ],
            "due by next attempt, then acceptance"
        );
        assert!(taken.bundles.is_empty());
        let taken = claim(&mut conn, 10_000, 30_000, 100, &[], &rooms(5)).unwrap();
        assert!(
            taken.rows.is_empty() && !taken.complete,
            "unpacked, not taken"
        );
        let taken = claim(&mut conn, 10_000, 30_000, 100, &[], &rooms(5)).unwrap();
        assert_eq!(ids(&taken), ["msg_c_000", "msg_c_001"]);
        assert!(taken.complete);
        assert!(taken.rows.iter().all(|r| r.attempts == 1 && r.bundle == 0));
        assert_eq!(pending_total(&mut conn).unwrap(), 7);
    }

    /// Bundles whose deliveries all succeeded are closed in one statement:
    /// each is deleted only while still leased until the time it was
    /// leased until, and only those count as delivered; closing them again
    /// changes nothing.
    #[test]
    fn bundles_whose_deliveries_all_succeeded_are_dropped_together_once() {
        let dir = tempfile::tempdir().unwrap();
        let (mut conn, hook) = one_webhook(&dir, false);
        publish_due(&mut conn, hook, "a", 2, 1_000);
        publish_due(&mut conn, hook, "b", 3, 1_001);
        publish_due(&mut conn, hook, "c", 1, 1_002);
        let taken = claim(&mut conn, 2_000, 9_000, 100, &[], &rooms(10)).unwrap();
        assert_eq!(taken.bundles.len(), 3);
        let all_delivered = |b: &LeasedBundle| Closing {
            bundle: *b,
            outcomes: taken
                .rows
                .iter()
                .filter(|r| r.bundle == b.seq)
                .map(|r| delivered_at(r.seq, hook, b.lease_until, 2_100))
                .collect(),
        };
        let (a, b) = (
            all_delivered(&taken.bundles[0]),
            all_delivered(&taken.bundles[1]),
        );
        // c as its lease would be once another node took it back: not ours.
        let mut c = all_delivered(&taken.bundles[2]);
        c.bundle.lease_until += 1;
        complete(&mut conn, &[], &[a.clone(), b.clone(), c]).unwrap();
        assert_eq!(delivered_count(&mut conn, hook), [5]);
        assert_eq!(pending_total(&mut conn).unwrap(), 1, "c stays");
        assert!(row_states(&mut conn).is_empty(), "no row for a success");
        complete(&mut conn, &[], &[a, b]).unwrap();
        assert_eq!(delivered_count(&mut conn, hook), [5]);
        assert_eq!(pending_total(&mut conn).unwrap(), 1);
    }

    /// Bundles are leased whole while they fit; what is left of the room
    /// when the next is larger than the whole room is unpacked from it. A
    /// webhook made `ordered` while a bundle of it is leased whole unpacks
    /// nothing more until that bundle is closed.
    #[test]
    fn a_bundle_larger_than_the_room_fills_what_is_left_as_rows() {
        let dir = tempfile::tempdir().unwrap();
        let (mut conn, hook) = one_webhook(&dir, false);
        publish_due(&mut conn, hook, "x", 2, 1_000);
        publish_due(&mut conn, hook, "y", 6, 1_001);
        let taken = claim(&mut conn, 2_000, 9_000, 100, &[], &rooms(5)).unwrap();
        assert_eq!(
            ids(&taken),
            [
                "msg_x_000",
                "msg_x_001",
                "msg_y_000",
                "msg_y_001",
                "msg_y_002"
            ]
        );
        assert_eq!(taken.bundles.len(), 1);
        assert!(taken.rows[..2]
            .iter()
            .all(|r| r.bundle == taken.bundles[0].seq));
        assert!(taken.rows[2..].iter().all(|r| r.bundle == 0));
        assert_eq!(
            row_states(&mut conn),
            [
                row("msg_y_000", 1, 1_001, 9_000, None),
                row("msg_y_001", 1, 1_001, 9_000, None),
                row("msg_y_002", 1, 1_001, 9_000, None),
                row("msg_y_003", 0, 1_001, 0, None),
                row("msg_y_004", 0, 1_001, 0, None),
                row("msg_y_005", 0, 1_001, 0, None),
            ]
        );

        // Everything delivered: no row, no bundle left.
        let delivered = |rows: &[Claimed]| -> Vec<Outcome> {
            rows.iter()
                .map(|r| delivered_at(r.seq, hook, 9_000, 2_100))
                .collect()
        };
        let (x, y) = taken.rows.split_at(2);
        let closing = Closing {
            bundle: taken.bundles[0],
            outcomes: delivered(x),
        };
        complete(&mut conn, &delivered(y), &[closing]).unwrap();
        let rest = claim(&mut conn, 2_100, 9_000, 100, &[], &rooms(5)).unwrap();
        complete(&mut conn, &delivered(&rest.rows), &[]).unwrap();
        assert!(row_states(&mut conn).is_empty());
        assert_eq!(pending_total(&mut conn).unwrap(), 0);
        assert_eq!(
            delivered_count(&mut conn, hook),
            [8],
            "x closed whole, y's rows"
        );

        // Made ordered while a bundle of it is leased whole: the next one
        // waits until that bundle is closed.
        publish_due(&mut conn, hook, "p", 2, 3_000);
        publish_due(&mut conn, hook, "q", 3, 3_001);
        let taken = claim(&mut conn, 3_100, 9_000, 100, &[], &rooms(2)).unwrap();
        assert_eq!(ids(&taken), ["msg_p_000", "msg_p_001"]);
        let ordered = diesel::sql_query("UPDATE webhooks SET ordered = true");
        with_conn!(&mut conn, c => ordered.clone().execute(c)).unwrap();
        let none = claim(&mut conn, 3_200, 9_000, 100, &[], &rooms(5)).unwrap();
        assert!(none.rows.is_empty(), "{:?}", ids(&none));
        let closing = Closing {
            bundle: taken.bundles[0],
            outcomes: delivered(&taken.rows),
        };
        complete(&mut conn, &[], &[closing]).unwrap();
        let next = claim(&mut conn, 3_300, 9_000, 100, &[], &rooms(5)).unwrap();
        assert_eq!(ids(&next), ["msg_q_000"]);
    }

    /// An `ordered` webhook's bundle is unpacked only once it has no
    /// pending row, and disabling a webhook turns bundled deliveries into
    /// dead letters.
    #[test]
    fn ordered_webhooks_unpack_after_their_last_row_and_disabling_kills_bundles() {
        let dir = tempfile::tempdir().unwrap();
        let (mut conn, hook) = one_webhook(&dir, true);
        publish_due(&mut conn, hook, "a", 2, 1_000);
        publish_due(&mut conn, hook, "b", 2, 1_001);
        let taken = |conn: &mut DbConn| {
            claim(conn, 2_000, 9_000, 100, &[], &rooms(8))
                .unwrap()
                .rows
                .into_iter()
                .map(|r| r.id)
                .collect::<Vec<_>>()
        };
        assert_eq!(taken(&mut conn), ["msg_a_000"]);
        // Leased: nothing more, and the second bundle stays packed.
        assert!(taken(&mut conn).is_empty());
        let bundles = "SELECT COUNT(*) AS n FROM webhook_bundles";
        #[derive(QueryableByName)]
        struct N {
            #[diesel(sql_type = BigInt)]
            n: i64,
        }
        let count = |conn: &mut DbConn| {
            with_conn!(conn, c => diesel::sql_query(bundles).get_result::<N>(c))
                .unwrap()
                .n
        };
        assert_eq!(count(&mut conn), 1);

        let disabled = diesel::sql_query("UPDATE webhooks SET enabled = false");
        with_conn!(&mut conn, c => disabled.clone().execute(c)).unwrap();
        assert_eq!(kill_disabled(&mut conn, 3_000).unwrap(), 4);
        assert_eq!(count(&mut conn), 0);
        assert_eq!(pending_total(&mut conn).unwrap(), 0);
        let dead = dead_letters(&mut conn, &[hook], PageStart::AfterSeq(0), 10).unwrap();
        let ids: Vec<&str> = dead.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(ids, ["msg_a_000", "msg_a_001", "msg_b_000", "msg_b_001"]);
    }

    /// Sets the one webhook of [`one_webhook`] again, as a set request
    /// does, with `change` made to its configuration; how many of its
    /// deliveries became dead letters.
    fn reconfigure(conn: &mut DbConn, change: impl FnOnce(&mut NewConfig)) -> usize {
        #[derive(QueryableByName)]
        struct Instance {
            #[diesel(sql_type = BigInt)]
            instance_id: i64,
        }
        let q = diesel::sql_query("SELECT instance_id FROM webhooks");
        let instance = with_conn!(conn, c => q.clone().get_result::<Instance>(c)).unwrap();
        let mut config = config(false);
        change(&mut config);
        upsert(conn, InstanceId(instance.instance_id), &config, HOLD_MS)
            .unwrap()
            .1
    }

    /// Makes the one webhook of [`one_webhook`] `ordered`.
    fn make_ordered(conn: &mut DbConn) {
        reconfigure(conn, |c| c.ordered = true);
    }

    /// A delivery made a dead letter while it is attempted (its webhook
    /// disabled) and put back by `/retry` waits for that attempt, whose
    /// outcome, whichever it is, ends its lease; then it starts again from
    /// the first attempt. An attempt that ended before the put-back (its
    /// outcome found a dead letter) ended the lease then.
    #[test]
    fn a_letter_killed_while_attempted_and_put_back_waits_for_that_attempt() {
        for (case, ends_before) in [
            ("retry", false),
            ("dead", false),
            ("released", false),
            ("delivered", true),
            ("retry", true),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let (mut conn, hook) = one_webhook(&dir, false);
            publish_due(&mut conn, hook, "a", 3, 1_000);
            let a = claim(&mut conn, 2_000, 9_000, 100, &[], &rooms(1)).unwrap();
            assert_eq!(ids(&a), ["msg_a_000"]);
            let (seq, lease) = (a.rows[0].seq, 9_000);
            let ended = match case {
                "retry" => answered_500(seq, hook, lease, 2_500),
                "dead" => dead_letter(seq, hook, 1, lease, 410, 2_500),
                "released" => given_back(seq, hook, 0, lease),
                _ => delivered_at(seq, hook, lease, 2_500),
            };
            assert_eq!(reconfigure(&mut conn, |c| c.enabled = false), 3);
            reconfigure(&mut conn, |_| {});
            if ends_before {
                complete(&mut conn, std::slice::from_ref(&ended), &[]).unwrap();
            }
            assert_eq!(requeue(&mut conn, &[hook], None, 3_000).unwrap(), 3);
            let taken = claim(&mut conn, 3_100, 20_000, 100, &[], &rooms(8)).unwrap();
            if ends_before {
                assert_eq!(
                    ids(&taken),
                    ["msg_a_000", "msg_a_001", "msg_a_002"],
                    "{case}"
                );
                continue;
            }
            assert_eq!(
                ids(&taken),
                ["msg_a_001", "msg_a_002"],
                "{case}: a_000 is attempted"
            );
            complete(&mut conn, &[ended], &[]).unwrap();
            let again = claim(&mut conn, 3_300, 20_000, 100, &[], &rooms(8)).unwrap();
            assert_eq!(ids(&again), ["msg_a_000"], "{case}");
            assert_eq!(again.rows[0].attempts, 0, "{case}: from the first attempt");
        }
    }

    /// The deliveries of a bundle leased whole, made dead letters while
    /// attempted and put back, wait for their node to close the bundle
    /// (gone by then: their leases end), whatever their outcomes.
    #[test]
    fn a_bundle_killed_while_attempted_and_put_back_waits_for_its_node() {
        for all_delivered in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let (mut conn, hook) = one_webhook(&dir, false);
            let out = publish(&mut conn, hook, deliveries("d", 2), 1_000, 2, i64::MAX);
            let [b] = out.leased_bundles[..] else {
                panic!("{:?}", out.leased_bundles)
            };
            assert_eq!(reconfigure(&mut conn, |c| c.enabled = false), 2);
            reconfigure(&mut conn, |_| {});
            assert_eq!(requeue(&mut conn, &[hook], None, 1_500).unwrap(), 2);
            let taken = claim(&mut conn, 1_600, 9_000, 100, &[], &rooms(8)).unwrap();
            assert!(ids(&taken).is_empty(), "attempted until 2,000");
            let delivered = |r: &Claimed| delivered_at(r.seq, hook, b.lease_until, 1_650);
            let second = if all_delivered {
                delivered(&out.leased[1])
            } else {
                given_back(out.leased[1].seq, hook, 0, b.lease_until)
            };
            let closing = Closing {
                bundle: b,
                outcomes: vec![delivered(&out.leased[0]), second],
            };
            complete(&mut conn, &[], &[closing]).unwrap();
            let taken = claim(&mut conn, 1_700, 9_000, 100, &[], &rooms(8)).unwrap();
            assert_eq!(ids(&taken), ["msg_d_000", "msg_d_001"], "{all_delivered}");
        }
    }

    /// A webhook made `ordered` while deliveries of it are in flight starts
    /// its next one only once they have ended (here: a lease runs out),
    /// then one at a time.
    #[test]
    fn a_webhook_made_ordered_with_deliveries_in_flight_waits_for_them() {
        let dir = tempfile::tempdir().unwrap();
        let (mut conn, hook) = one_webhook(&dir, false);
        publish_due(&mut conn, hook, "a", 3, 1_000);
        let taken = claim(&mut conn, 2_000, 9_000, 100, &[], &rooms(2)).unwrap();
        assert_eq!(ids(&taken), ["msg_a_000", "msg_a_001"]);
        // The first is answered 500 (due again at 5,000); the second is
        // still in flight when the webhook is made ordered.
        complete(
            &mut conn,
            &[answered_500(taken.rows[0].seq, hook, 9_000, 2_100)],
            &[],
        )
        .unwrap();
        make_ordered(&mut conn);
        let at = |conn: &mut DbConn, now: i64| {
            ids(&claim(conn, now, now + 10_000, 100, &[], &rooms(8)).unwrap())
                .into_iter()
                .map(str::to_string)
                .collect::<Vec<_>>()
        };
        assert!(
            at(&mut conn, 6_000).is_empty(),
            "a_001 is in flight until 9,000"
        );
        assert_eq!(at(&mut conn, 9_001), ["msg_a_000"]);
        assert!(at(&mut conn, 9_002).is_empty(), "a_000 is in flight");
    }

    /// A webhook made `ordered` while deliveries of it are in flight starts
    /// its next one as soon as they have ended, before their leases do.
    #[test]
    fn a_webhook_made_ordered_goes_on_once_its_deliveries_in_flight_end() {
        let dir = tempfile::tempdir().unwrap();
        let (mut conn, hook) = one_webhook(&dir, false);
        publish_due(&mut conn, hook, "a", 3, 1_000);
        let taken = claim(&mut conn, 2_000, 9_000, 100, &[], &rooms(2)).unwrap();
        assert_eq!(ids(&taken), ["msg_a_000", "msg_a_001"]);
        let out = publish(&mut conn, hook, deliveries("b", 1), 2_000, 1, i64::MAX);
        let [b] = out.leased_bundles[..] else {
            panic!("{:?}", out.leased_bundles)
        };
        make_ordered(&mut conn);
        let at = |conn: &mut DbConn, now: i64| {
            ids(&claim(conn, now, now + 10_000, 100, &[], &rooms(8)).unwrap())
                .into_iter()
                .map(str::to_string)
                .collect::<Vec<_>>()
        };
        let done = |r: &Claimed, lease: i64| delivered_at(r.seq, hook, lease, 2_100);
        // a_000 failed and is due again at once; the others are in flight.
        let again = Outcome::Retry {
            seq: taken.rows[0].seq,
            webhook_id: hook,
            attempts: 1,
            lease: 9_000,
            next_at: 2_150,
            status: Some(500),
            error: "HTTP 500".into(),
            at: 2_100,
        };
        complete(&mut conn, &[again], &[]).unwrap();
        assert!(at(&mut conn, 2_200).is_empty(), "a_001 is in flight");
        complete(&mut conn, &[done(&taken.rows[1], 9_000)], &[]).unwrap();
        assert!(at(&mut conn, 2_300).is_empty(), "b_000 is in flight");
        let closing = Closing {
            bundle: b,
            outcomes: vec![done(&out.leased[0], b.lease_until)],
        };
        complete(&mut conn, &[], &[closing]).unwrap();
        assert_eq!(at(&mut conn, 2_400), ["msg_a_000"]);
    }

    /// A dead letter of an `ordered` webhook put back while a later
    /// delivery is in flight is the oldest pending one, and waits for it.
    #[test]
    fn an_ordered_dead_letter_put_back_waits_for_the_delivery_in_flight() {
        let dir = tempfile::tempdir().unwrap();
        let (mut conn, hook) = one_webhook(&dir, true);
        publish_due(&mut conn, hook, "a", 3, 1_000);
        let at = |conn: &mut DbConn, now: i64| {
            claim(conn, now, now + 10_000, 100, &[], &rooms(8))
                .unwrap()
                .rows
        };
        let first = at(&mut conn, 2_000);
        assert_eq!(first.len(), 1);
        let gone = dead_letter(first[0].seq, hook, 1, 12_000, 410, 2_100);
        complete(&mut conn, &[gone], &[]).unwrap();
        let second = at(&mut conn, 2_200);
        assert_eq!(second[0].id, "msg_a_001");
        assert_eq!(requeue(&mut conn, &[hook], None, 2_300).unwrap(), 1);
        assert!(at(&mut conn, 2_400).is_empty(), "a_001 is in flight");
        let delivered = delivered_at(second[0].seq, hook, 12_200, 2_500);
        complete(&mut conn, &[delivered], &[]).unwrap();
        let third = at(&mut conn, 2_600);
        assert_eq!(third[0].id, "msg_a_000");
        assert!(at(&mut conn, 2_700).is_empty(), "a_000 is in flight");
    }

    /// An ordered webhook's claim finds its next delivery by key, however
    /// many due deliveries wait behind it (SQLite's plan; before, it walked
    /// every due row of the webhook looking for the oldest).
    #[test]
    fn an_ordered_claim_finds_its_next_delivery_by_key() {
        let dir = tempfile::tempdir().unwrap();
        let (mut conn, hook) = one_webhook(&dir, true);
        #[derive(QueryableByName)]
        struct Step {
            #[diesel(sql_type = Text)]
            detail: String,
        }
        let q = diesel::sql_query(format!("EXPLAIN QUERY PLAN {}", claim_one(NEXT_OF_ORDERED)))
            .bind::<BigInt, _>(2_000)
            .bind::<BigInt, _>(8)
            .bind::<BigInt, _>(hook);
        let plan: Vec<String> = with_conn!(&mut conn, c => q.clone().load::<Step>(c))
            .unwrap()
            .into_iter()
            .map(|s| s.detail)
            .collect();
        let deliveries: Vec<&String> = plan
            .iter()
            .filter(|s| s.starts_with("SEARCH d ") || s.starts_with("SCAN d "))
            .collect();
        assert_eq!(
            deliveries,
            ["SEARCH d USING INTEGER PRIMARY KEY (rowid=?)"],
            "{plan:?}"
        );
    }

    /// A webhook read as disabled and enabled again before its lock was
    /// taken keeps its bundles, leased ones too: they are not taken back
    /// from the node attempting them.
    #[test]
    fn a_webhook_enabled_again_before_the_kill_keeps_its_bundles() {
        let dir = tempfile::tempdir().unwrap();
        let (mut conn, hook) = one_webhook(&dir, false);
        let out = publish(&mut conn, hook, deliveries("d", 3), 1_000, 3, i64::MAX);
        assert_eq!(out.leased_bundles.len(), 1);
        publish_due(&mut conn, hook, "e", 2, 1_001);
        // Read as disabled; enabled again by the time the kill holds it.
        assert_eq!(kill_disabled_of(&mut conn, &[hook], 1_500).unwrap(), 0);
        let bundles: Vec<(i64, i64)> = with_conn!(&mut conn, c => bundles_table::table
            .select((bundles_table::count, bundles_table::lease_until))
            .order(bundles_table::seq)
            .load(c))
        .unwrap();
        assert_eq!(bundles, [(3, 2_000), (2, 0)]);
        assert!(row_states(&mut conn).is_empty());
        assert_eq!(pending_total(&mut conn).unwrap(), 5);
    }

    /// What a node starts at once is one bundle leased to it: no row, no
    /// claim takes it, and it is closed as a bundle a claim leased (only
    /// the delivery that did not succeed becomes a row).
    #[test]
    fn deliveries_started_at_once_are_one_leased_bundle() {
        let dir = tempfile::tempdir().unwrap();
        let (mut conn, hook) = one_webhook(&dir, false);
        let out = publish(&mut conn, hook, deliveries("d", 3), 1_000, 3, i64::MAX);
        let [b] = out.leased_bundles[..] else {
            panic!("{:?}", out.leased_bundles)
        };
        assert_eq!((b.webhook_id, b.lease_until, b.count), (hook, 2_000, 3));
        let r = &out.leased;
        assert_eq!(r.len(), 3);
        assert!(r.iter().all(|c| c.bundle == b.seq && c.attempts == 0));
        assert!(!out.for_claims);
        assert!(row_states(&mut conn).is_empty());
        assert_eq!(pending_total(&mut conn).unwrap(), 3);
        let taken = claim(&mut conn, 1_500, 9_000, 100, &[], &rooms(8)).unwrap();
        assert!(ids(&taken).is_empty() && taken.bundles.is_empty());

        let delivered = |c: &Claimed| delivered_at(c.seq, hook, b.lease_until, 1_100);
        let closing = Closing {
            bundle: b,
            outcomes: vec![
                delivered(&r[0]),
                delivered(&r[1]),
                answered_500(r[2].seq, hook, b.lease_until, 1_100),
            ],
        };
        complete(&mut conn, &[], &[closing]).unwrap();
        assert_eq!(
            row_states(&mut conn),
            [row("msg_d_002", 1, 5_000, 0, Some(500))]
        );
        assert_eq!(pending_total(&mut conn).unwrap(), 1);
        assert_eq!(delivered_count(&mut conn, hook), [2]);
    }

    /// A publish's rows are stored whole and in order, leased and due, at
    /// every length the fixed-size statements cut differently (SQLite).
    #[test]
    fn every_row_of_a_run_is_stored_in_order_whatever_its_length() {
        let dir = tempfile::tempdir().unwrap();
        let (mut conn, hook_id) = one_webhook(&dir, false);
        let mut total = 0;
        for n in [1, 2, 3, 4, 5, 15, 16, 17, 63, 64, 65, 85, 100, 149] {
            let rows = deliveries(&n.to_string(), n);
            let out = publish(&mut conn, hook_id, rows, 1_000, n * 2 / 3, i64::MAX);
            // The due ones wait in a bundle until a claim unpacks them.
            total += n;
            assert_eq!(
                pending_total(&mut conn).unwrap(),
                i64::try_from(total).unwrap()
            );
            write_tx!(&mut conn, c => bundles::unpack_all(c, hook_id)).unwrap();
            assert_eq!(
                pending_total(&mut conn).unwrap(),
                i64::try_from(total).unwrap()
            );
            let stored: Vec<(String, String, i64, i64)> = with_conn!(&mut conn, c => d::table
                .filter(d::id.like(format!("msg_{n}_%")))
                .order(d::seq)
                .select((d::id, d::data, d::attempts, d::lease_until))
                .load(c))
            .unwrap();
            // The leased ones were one bundle leased to this node: taken
            // back under its lease, their first attempt counted.
            let expected: Vec<(String, String, i64, i64)> = (0..n)
                .map(|i| {
                    let leased = i < n * 2 / 3;
                    (
                        format!("msg_{n}_{i:03}"),
                        format!("{{\"i\":{i}}}"),
                        i64::from(leased),
                        if leased { 2_000 } else { 0 },
                    )
                })
                .collect();
            assert_eq!(stored, expected, "{n} rows");
            let returned: Vec<&str> = out.leased.iter().map(|c| c.id.as_str()).collect();
            let leased_ids: Vec<&str> =
                expected[..n * 2 / 3].iter().map(|r| r.0.as_str()).collect();
            assert_eq!(returned, leased_ids, "{n} rows: the leased ones returned");
            match out.leased_bundles.as_slice() {
                [] => assert!(leased_ids.is_empty(), "{n} rows"),
                [b] => {
                    assert_eq!((b.webhook_id, b.lease_until), (hook_id, 2_000));
                    assert_eq!(b.count, leased_ids.len(), "{n} rows");
                    assert!(out.leased.iter().all(|c| c.bundle == b.seq), "{n} rows");
                }
                more => panic!("{n} rows: {more:?}"),
            }
            assert_eq!(out.for_claims, n * 2 / 3 < n, "{n} rows");
        }
    }
}
