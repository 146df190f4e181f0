//! Queries on `webhook_deliveries` (contract §11): a delivery is pending
//! while `dead_at` is NULL and a dead letter after. Publishing enqueues all
//! of a request's deliveries in one transaction, shared with the requests
//! that arrived with it (`webhook::intake`); workers claim due ones with
//! a lease (`FOR UPDATE SKIP LOCKED` on PostgreSQL, inside SQLite's single
//! write lock there), and record outcomes in batches.

use std::collections::HashMap;

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Bool, Text};

use super::schema::webhook_deliveries as d;
use super::webhooks::{dialect, id_list, WebhookRow, COLUMNS};
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
    #[diesel(sql_type = Bool)]
    pub ordered: bool,
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

/// How an attempt ended, as recorded.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Delivered {
        seq: i64,
        webhook_id: i64,
        at: i64,
    },
    Retry {
        seq: i64,
        webhook_id: i64,
        attempts: i64,
        next_at: i64,
        status: Option<i64>,
        error: String,
        at: i64,
    },
    Dead {
        seq: i64,
        webhook_id: i64,
        attempts: i64,
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
    },
}

impl Outcome {
    /// The webhook the delivery belongs to.
    pub fn webhook_id(&self) -> i64 {
        match self {
            Outcome::Delivered { webhook_id, .. }
            | Outcome::Retry { webhook_id, .. }
            | Outcome::Dead { webhook_id, .. }
            | Outcome::Released { webhook_id, .. } => *webhook_id,
        }
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

/// Rows per INSERT statement (well under both backends' bind limits).
const INSERT_CHUNK: usize = 400;

/// One publish's deliveries: per webhook id, the rows to store, accepted at `now`.
pub struct Intake<'a> {
    pub batches: &'a [(i64, Vec<NewDelivery>)],
    pub now: i64,
}

/// Stores the deliveries of several publishes in one transaction, in the
/// order given (their acceptance order). Past `max_pending` pending
/// deliveries of a webhook, the rest are stored as dead letters with error
/// `backlog full`. Returns, per publish, how many were.
pub fn enqueue(
    conn: &mut DbConn,
    intakes: &[Intake<'_>],
    max_pending: i64,
) -> Result<Vec<u64>, StorageError> {
    let refused = write_tx!(conn, c => {
        // Each webhook's pending count, read once per transaction.
        let mut pending: HashMap<i64, i64> = HashMap::new();
        let mut refused = Vec::with_capacity(intakes.len());
        for intake in intakes {
            let now = intake.now;
            let mut over_total = 0u64;
            for (webhook, rows) in intake.batches {
                if rows.is_empty() {
                    continue;
                }
                let held = match pending.get(webhook) {
                    Some(n) => *n,
                    None => d::table
                        .filter(d::webhook_id.eq(webhook))
                        .filter(d::dead_at.is_null())
                        .count()
                        .get_result(c)?,
                };
                let room = usize::try_from((max_pending - held).max(0)).unwrap_or(0);
                let (ok, over) = rows.split_at(room.min(rows.len()));
                pending.insert(*webhook, held + ok.len() as i64);
                for chunk in ok.chunks(INSERT_CHUNK) {
                    let values: Vec<_> = chunk
                        .iter()
                        .map(|r| (
                            d::id.eq(&r.id),
                            d::webhook_id.eq(webhook),
                            d::event.eq(r.event),
                            d::data.eq(&r.data),
                            d::created_at.eq(now),
                            d::attempts.eq(0_i64),
                            d::next_attempt_at.eq(now),
                            d::lease_until.eq(0_i64),
                        ))
                        .collect();
                    diesel::insert_into(d::table).values(values).execute(c)?;
                }
                for chunk in over.chunks(INSERT_CHUNK) {
                    let values: Vec<_> = chunk
                        .iter()
                        .map(|r| (
                            d::id.eq(&r.id),
                            d::webhook_id.eq(webhook),
                            d::event.eq(r.event),
                            d::data.eq(&r.data),
                            d::created_at.eq(now),
                            d::attempts.eq(0_i64),
                            d::next_attempt_at.eq(now),
                            d::lease_until.eq(0_i64),
                            d::last_error.eq(BACKLOG_FULL),
                            d::dead_at.eq(now),
                        ))
                        .collect();
                    diesel::insert_into(d::table).values(values).execute(c)?;
                }
                over_total += over.len() as u64;
            }
            refused.push(over_total);
        }
        Ok::<Vec<u64>, diesel::result::Error>(refused)
    })?;
    Ok(refused)
}

/// Claims up to `limit` due deliveries (oldest first), leasing them until
/// `lease_until`, skipping webhooks in `exclude` (at their in-flight limit
/// on this node) and taking at most `room(webhook)` per webhook. An
/// `ordered` webhook's delivery is due only when it is the webhook's oldest
/// pending one, so one is in flight in the whole cluster and a retrying one
/// holds back the later ones.
pub fn claim(
    conn: &mut DbConn,
    now: i64,
    lease_until: i64,
    limit: i64,
    exclude: &[i64],
    room: &mut dyn FnMut(i64) -> usize,
) -> Result<(Vec<Claimed>, Vec<Target>), StorageError> {
    let locking = if matches!(conn, DbConn::Pg(_)) {
        " FOR UPDATE OF d SKIP LOCKED"
    } else {
        ""
    };
    let select = dialect(
        conn,
        &format!(
            "SELECT d.seq, d.id, d.webhook_id, d.event, d.data, d.created_at, d.attempts, w.ordered \
             FROM webhook_deliveries d JOIN webhooks w ON w.id = d.webhook_id \
             WHERE d.dead_at IS NULL AND d.next_attempt_at <= $1 AND d.lease_until <= $1 AND w.enabled \
             AND d.webhook_id NOT IN ({}) \
             AND (NOT w.ordered OR d.seq = (SELECT MIN(d2.seq) FROM webhook_deliveries d2 \
                  WHERE d2.webhook_id = d.webhook_id AND d2.dead_at IS NULL)) \
             ORDER BY d.next_attempt_at, d.seq LIMIT $2{locking}",
            id_list(exclude)
        ),
    );
    let claimed: Vec<Claimed> = unsynced(conn, |conn| {
        Ok(write_tx!(conn, c => {
            let found: Vec<Claimed> = diesel::sql_query(&select)
                .bind::<BigInt, _>(now)
                .bind::<BigInt, _>(limit)
                .load(c)?;
            let mut taken: std::collections::HashMap<i64, usize> = std::collections::HashMap::new();
            let mut chosen = Vec::with_capacity(found.len());
            for row in found {
                let n = taken.entry(row.webhook_id).or_insert(0);
                if *n < room(row.webhook_id) {
                    *n += 1;
                    chosen.push(row);
                }
            }
            if !chosen.is_empty() {
                let seqs: Vec<i64> = chosen.iter().map(|r| r.seq).collect();
                diesel::update(d::table.filter(d::seq.eq_any(&seqs)))
                    .set((
                        d::lease_until.eq(lease_until),
                        // An attempt counts once started: a node that dies during
                        // it has used it up (attempt numbers are the cluster's).
                        d::attempts.eq(d::attempts + 1_i64),
                    ))
                    .execute(c)?;
            }
            Ok::<_, diesel::result::Error>(chosen)
        })?)
    })?;
    if claimed.is_empty() {
        return Ok((claimed, Vec::new()));
    }
    let mut hooks: Vec<i64> = claimed.iter().map(|r| r.webhook_id).collect();
    hooks.sort_unstable();
    hooks.dedup();
    let text = format!(
        "SELECT {COLUMNS}, i.name AS instance_name, i.token AS instance_token \
         FROM webhooks w JOIN instances i ON i.id = w.instance_id WHERE w.id IN ({})",
        id_list(&hooks)
    );
    let targets: Vec<Target> = with_conn!(conn, c => diesel::sql_query(&text).load(c))?;
    Ok((claimed, targets))
}

/// Records attempt outcomes (and the webhooks' counters) in one transaction.
/// A delivery that became a dead letter meanwhile (its webhook was
/// disabled) is left as it is.
pub fn complete(conn: &mut DbConn, outcomes: &[Outcome]) -> Result<(), StorageError> {
    let q_success = dialect(
        conn,
        "UPDATE webhooks SET delivered = delivered + $1, last_success_at = $2 WHERE id = $3",
    );
    let q_failure = dialect(
        conn,
        "UPDATE webhooks SET last_failure_at = $1, last_error = $2 WHERE id = $3",
    );
    // Successes in one statement, and one counter update per webhook.
    let delivered: Vec<i64> = outcomes
        .iter()
        .filter_map(|o| match o {
            Outcome::Delivered { seq, .. } => Some(*seq),
            _ => None,
        })
        .collect();
    let mut last_success: std::collections::HashMap<i64, i64> = std::collections::HashMap::new();
    // Failures likewise: one update per webhook, with its latest failure.
    let mut last_failure: std::collections::HashMap<i64, (i64, &str)> =
        std::collections::HashMap::new();
    for o in outcomes {
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
    unsynced(conn, |conn| {
        Ok(write_tx!(conn, c => {
            if !delivered.is_empty() {
                // Not `dead_at IS NULL`: PostgreSQL would read the whole
                // partial index of pending rows beside the primary key
                // (a BitmapAnd) whenever its statistics lag a burst.
                let gone: Vec<i64> = diesel::delete(
                    d::table
                        .filter(d::seq.eq_any(&delivered))
                        .filter(diesel::dsl::sql::<Bool>("COALESCE(dead_at, -1) < 0")),
                )
                .returning(d::webhook_id)
                .get_results(c)?;
                let mut per_hook: std::collections::HashMap<i64, i64> = std::collections::HashMap::new();
                for w in gone {
                    *per_hook.entry(w).or_insert(0) += 1;
                }
                for (w, n) in per_hook {
                    diesel::sql_query(&q_success)
                        .bind::<BigInt, _>(n)
                        .bind::<BigInt, _>(last_success.get(&w).copied().unwrap_or(0))
                        .bind::<BigInt, _>(w)
                        .execute(c)?;
                }
            }
            for o in outcomes {
                match o {
                    Outcome::Delivered { .. } => {}
                    Outcome::Retry { seq, attempts, next_at, status, error, at, .. } => {
                        diesel::update(d::table.filter(d::seq.eq(seq)).filter(d::dead_at.is_null()))
                            .set((
                                d::attempts.eq(attempts),
                                d::next_attempt_at.eq(next_at),
                                d::lease_until.eq(0_i64),
                                d::last_status.eq(status),
                                d::last_error.eq(error),
                                d::last_attempt_at.eq(at),
                            ))
                            .execute(c)?;
                    }
                    Outcome::Released { seq, attempts, .. } => {
                        diesel::update(d::table.filter(d::seq.eq(seq)).filter(d::dead_at.is_null()))
                            .set((d::attempts.eq(attempts), d::lease_until.eq(0_i64)))
                            .execute(c)?;
                    }
                    Outcome::Dead { seq, attempts, status, error, at, .. } => {
                        diesel::update(d::table.filter(d::seq.eq(seq)).filter(d::dead_at.is_null()))
                            .set((
                                d::attempts.eq(attempts),
                                d::lease_until.eq(0_i64),
                                d::last_status.eq(status),
                                d::last_error.eq(error),
                                d::last_attempt_at.eq(at),
                                d::dead_at.eq(at),
                            ))
                            .execute(c)?;
                    }
                }
            }
            for (w, (at, error)) in &last_failure {
                diesel::sql_query(&q_failure)
                    .bind::<BigInt, _>(at)
                    .bind::<Text, _>(*error)
                    .bind::<BigInt, _>(w)
                    .execute(c)?;
            }
            Ok::<(), diesel::result::Error>(())
        })?)
    })
}

/// The acceptance position of a delivery id (pending or dead).
pub fn seq_of(conn: &mut DbConn, id: &str) -> Result<Option<i64>, StorageError> {
    Ok(with_conn!(conn, c => d::table
        .filter(d::id.eq(id))
        .select(d::seq)
        .first::<i64>(c)
        .optional())?)
}

/// Dead letters of these webhooks after `after_seq`, oldest first, at most `limit`.
pub fn dead_letters(
    conn: &mut DbConn,
    webhooks: &[i64],
    after_seq: i64,
    limit: i64,
) -> Result<Vec<DeadLetter>, StorageError> {
    Ok(with_conn!(conn, c => d::table
        .filter(d::webhook_id.eq_any(webhooks))
        .filter(d::dead_at.is_not_null())
        .filter(d::seq.gt(after_seq))
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

/// Puts dead letters of these webhooks (all, or those of `ids`) back as
/// pending from the first attempt; returns how many.
pub fn requeue(
    conn: &mut DbConn,
    webhooks: &[i64],
    ids: Option<&[String]>,
    now: i64,
) -> Result<usize, StorageError> {
    let changes = (
        d::dead_at.eq(None::<i64>),
        d::attempts.eq(0_i64),
        d::next_attempt_at.eq(now),
        d::lease_until.eq(0_i64),
    );
    let n = match ids {
        Some(ids) => write_tx!(conn, c => diesel::update(
            d::table
                .filter(d::webhook_id.eq_any(webhooks))
                .filter(d::dead_at.is_not_null())
                .filter(d::id.eq_any(ids)),
        )
        .set(changes)
        .execute(c))?,
        None => write_tx!(conn, c => diesel::update(
            d::table
                .filter(d::webhook_id.eq_any(webhooks))
                .filter(d::dead_at.is_not_null()),
        )
        .set(changes)
        .execute(c))?,
    };
    Ok(n)
}

/// Dead row versions of `webhook_deliveries` (delivered rows deleted,
/// leases and attempts updated) past which PostgreSQL's copy is vacuumed.
const VACUUM_DEAD_ROWS: i64 = 20_000;

#[derive(QueryableByName)]
struct RowVersions {
    #[diesel(sql_type = BigInt)]
    live: i64,
    #[diesel(sql_type = BigInt)]
    dead: i64,
}

/// On PostgreSQL, vacuums and analyses `webhook_deliveries` once its dead
/// row versions pass [`VACUUM_DEAD_ROWS`] and a fifth of its live rows. A
/// queue table turns over quickly: without it (autovacuum off, or lagging a
/// burst) every claim walks the dead entries of the due index and the
/// planner works from stale statistics, and claims slow to hundreds of
/// milliseconds. With autovacuum keeping up this never fires. `SKIP_LOCKED`:
/// a vacuum already running elsewhere is enough. Returns whether it ran.
pub fn vacuum_if_bloated(conn: &mut DbConn) -> Result<bool, StorageError> {
    use diesel::connection::SimpleConnection;
    let DbConn::Pg(c) = conn else {
        return Ok(false);
    };
    let versions: Option<RowVersions> = diesel::sql_query(
        "SELECT n_live_tup AS live, n_dead_tup AS dead FROM pg_stat_user_tables \
         WHERE relname = 'webhook_deliveries' AND schemaname = current_schema()",
    )
    .get_result(c)
    .optional()?;
    match versions {
        Some(v) if v.dead >= VACUUM_DEAD_ROWS.max(v.live / 5) => {
            c.batch_execute("VACUUM (ANALYZE, SKIP_LOCKED) webhook_deliveries")?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// Deletes dead letters that died before `before`.
pub fn purge_dead(conn: &mut DbConn, before: i64) -> Result<usize, StorageError> {
    Ok(write_tx!(conn, c => diesel::delete(d::table.filter(d::dead_at.lt(before))).execute(c))?)
}

/// Turns pending deliveries of disabled webhooks into dead letters with
/// error `webhook disabled` (a publish that raced with the disable).
pub fn kill_disabled(conn: &mut DbConn, now: i64) -> Result<usize, StorageError> {
    let text = dialect(
        conn,
        "UPDATE webhook_deliveries SET dead_at = $1, last_error = 'webhook disabled' \
         WHERE dead_at IS NULL AND webhook_id IN (SELECT id FROM webhooks WHERE NOT enabled)",
    );
    Ok(write_tx!(conn, c => diesel::sql_query(&text).bind::<BigInt, _>(now).execute(c))?)
}

/// Pending deliveries of every webhook.
pub fn pending_total(conn: &mut DbConn) -> Result<i64, StorageError> {
    Ok(with_conn!(conn, c => d::table.filter(d::dead_at.is_null()).count().get_result(c))?)
}

/// The earliest time a pending delivery is due, if any.
pub fn next_due(conn: &mut DbConn) -> Result<Option<i64>, StorageError> {
    use diesel::dsl::min;
    Ok(with_conn!(conn, c => d::table
        .filter(d::dead_at.is_null())
        .select(min(d::next_attempt_at))
        .first::<Option<i64>>(c))?)
}
