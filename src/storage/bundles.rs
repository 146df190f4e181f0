//! Queries on `webhook_bundles` (contract §11): the deliveries a publish
//! leaves for a claim, stored as one row per webhook and intake group (a
//! bundle) rather than one row each, so the 202 waits for a few rows
//! instead of one per delivery; and those the node that stored them
//! starts at once, as one bundle leased to it from the start (closed like
//! one a claim leased, below). A bundle holds its deliveries as a JSON
//! array of `[seq, id, event, accepted at (Unix ms), data]`: `seq` is the
//! acceptance position reserved for the delivery when it was stored (its
//! row's `seq` later), `data` exactly as the publish gave it.
//!
//! A claim takes a webhook's due rows first, then, for what its room
//! still lacks, the webhook's oldest bundles (one node at a time per
//! webhook: an advisory lock on PostgreSQL, the single writer on SQLite;
//! the webhook is checked again once that turn is held):
//! - while they fit in the room, whole: each bundle is leased to the node
//!   (`lease_until`) and its deliveries attempted from it; once each has an
//!   outcome the node closes it ([`close`]): deletes it and stores as rows
//!   only those that did not succeed, so a delivery that succeeds at once
//!   costs no row (the bundles whose deliveries all succeeded are deleted
//!   together, `BundleRows::drop_bundles`);
//! - otherwise (an `ordered` webhook, only when it has no pending row nor a
//!   bundle leased; or what is left of the room when the next bundle is
//!   larger than the whole room) unpacked: the deliveries it takes as rows
//!   leased to it, the rest of those bundles as due rows.
//!
//! A bundle whose lease ran out (its node died) is taken back into due
//! rows with their first attempt counted, by the claim that meets it (a
//! conditional delete: its node may be closing it at that moment).
//! Disabling a webhook unpacks all its bundles to turn them into dead
//! letters. Everything after the first attempt (retries, dead letters,
//! paging) works on rows. Counts of pending deliveries add the bundles'
//! `count`.

use std::collections::HashMap;

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Bool, Text};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::deliveries::{
    Claimed, InsertRun, LeasedBundle, NewDelivery, NewRow, Outcome, Run, Stored,
};
use super::webhooks::{dialect_of, id_list, lock_key, try_hook_lock_shared};
use super::{with_conn, DbConn, StorageError};
use crate::domain::EventKind;

/// Bundles read at a time while unpacking.
const READ_AT_ONCE: i64 = 16;

/// First key of the advisory lock that makes unpacking a webhook's bundles
/// one node's turn at a time (PostgreSQL; any fixed number will do).
const UNPACK_LOCK_CLASS: i32 = 0x6567_7570; // "egup"

/// Deliveries in the bundles a query selects.
const BUNDLED: &str = "CAST(COALESCE(SUM(count), 0) AS BIGINT)";

/// A bundle, as unpacking reads it.
#[derive(QueryableByName)]
pub(super) struct Bundle {
    #[diesel(sql_type = BigInt)]
    seq: i64,
    #[diesel(sql_type = BigInt)]
    count: i64,
    #[diesel(sql_type = Text)]
    deliveries: String,
    /// Leased until then (Unix ms; 0: never leased).
    #[diesel(sql_type = BigInt)]
    lease_until: i64,
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// A webhook as unpacking finds it once it holds its turn.
#[derive(QueryableByName)]
pub(super) struct Standing {
    #[diesel(sql_type = Bool)]
    enabled: bool,
    #[diesel(sql_type = Bool)]
    pending: bool,
}

/// The statements on bundles, one implementation per backend (they differ
/// in placeholders and locks).
pub(super) trait BundleRows {
    /// Stores `count` deliveries of `webhook` packed as `text`, leased
    /// until `lease_until` (0: not leased); its `seq`, or nothing when the
    /// webhook is gone.
    fn insert_bundle(
        &mut self,
        webhook: i64,
        count: i64,
        text: &str,
        lease_until: i64,
    ) -> QueryResult<Option<i64>>;
    /// The oldest `limit` bundles of `webhook` not leased past `free_at`.
    fn oldest_bundles(
        &mut self,
        webhook: i64,
        free_at: i64,
        limit: i64,
    ) -> QueryResult<Vec<Bundle>>;
    fn delete_bundles(&mut self, seqs: &[i64]) -> QueryResult<usize>;
    fn lease_bundles(&mut self, seqs: &[i64], lease_until: i64) -> QueryResult<usize>;
    /// Deletes bundle `seq` if it is still leased until `lease_until`;
    /// its deliveries' text when it was.
    fn close_bundle(&mut self, seq: i64, lease_until: i64) -> QueryResult<Option<String>>;
    /// Deletes each bundle `(seq, lease_until)` of `leases` still leased
    /// until then, in one statement, without reading them back; the `seq`
    /// of those it deleted.
    fn drop_bundles(&mut self, leases: &[(i64, i64)]) -> QueryResult<Vec<i64>>;
    /// `webhook`'s pending deliveries, rows and bundles, counted in one
    /// statement (one snapshot: a claim unpacking bundles meanwhile moves
    /// deliveries from one table to the other).
    fn pending_of(&mut self, webhook: i64) -> QueryResult<i64>;
    /// Takes `webhook`'s shared lock (`webhooks::hook_locks`) if no delete
    /// or disable holds it, without waiting; whether it was taken.
    fn try_hook_lock(&mut self, webhook: i64) -> QueryResult<bool>;
    /// Waits for this transaction's turn to unpack `webhook`'s bundles.
    fn unpacking_turn(&mut self, webhook: i64) -> QueryResult<()>;
    /// Whether `webhook` is enabled and has pending rows or a bundle leased
    /// past `now`, as committed now (`None`: it is gone).
    fn standing(&mut self, webhook: i64, now: i64) -> QueryResult<Option<Standing>>;
}

const INSERT: &str = "INSERT INTO webhook_bundles (webhook_id, count, deliveries, lease_until) \
     SELECT $1, $2, $3, $4 WHERE EXISTS (SELECT 1 FROM webhooks WHERE id = $1) RETURNING seq";
const OLDEST: &str = "SELECT seq, count, deliveries, lease_until FROM webhook_bundles \
     WHERE webhook_id = $1 AND lease_until <= $2 ORDER BY seq LIMIT $3";
const CLOSE: &str =
    "DELETE FROM webhook_bundles WHERE seq = $1 AND lease_until = $2 RETURNING deliveries";
const STANDING: &str = "SELECT w.enabled, (EXISTS (SELECT 1 FROM webhook_deliveries d \
     WHERE d.webhook_id = w.id AND d.dead_at IS NULL) OR EXISTS (SELECT 1 FROM webhook_bundles b \
     WHERE b.webhook_id = w.id AND b.lease_until > $2)) AS pending FROM webhooks w WHERE w.id = $1";

macro_rules! bundle_rows {
    ($conn:ty, $pg:expr) => {
        impl BundleRows for $conn {
            fn insert_bundle(
                &mut self,
                webhook: i64,
                count: i64,
                text: &str,
                lease_until: i64,
            ) -> QueryResult<Option<i64>> {
                #[derive(QueryableByName)]
                struct Inserted {
                    #[diesel(sql_type = BigInt)]
                    seq: i64,
                }
                diesel::sql_query(dialect_of($pg, INSERT))
                    .bind::<BigInt, _>(webhook)
                    .bind::<BigInt, _>(count)
                    .bind::<Text, _>(text)
                    .bind::<BigInt, _>(lease_until)
                    .get_result::<Inserted>(self)
                    .optional()
                    .map(|i| i.map(|i| i.seq))
            }

            fn oldest_bundles(
                &mut self,
                webhook: i64,
                free_at: i64,
                limit: i64,
            ) -> QueryResult<Vec<Bundle>> {
                diesel::sql_query(dialect_of($pg, OLDEST))
                    .bind::<BigInt, _>(webhook)
                    .bind::<BigInt, _>(free_at)
                    .bind::<BigInt, _>(limit)
                    .load(self)
            }

            fn lease_bundles(&mut self, seqs: &[i64], lease_until: i64) -> QueryResult<usize> {
                if seqs.is_empty() {
                    return Ok(0);
                }
                diesel::sql_query(format!(
                    "UPDATE webhook_bundles SET lease_until = {lease_until} WHERE seq IN ({})",
                    id_list(seqs)
                ))
                .execute(self)
            }

            fn close_bundle(&mut self, seq: i64, lease_until: i64) -> QueryResult<Option<String>> {
                #[derive(QueryableByName)]
                struct Closed {
                    #[diesel(sql_type = Text)]
                    deliveries: String,
                }
                diesel::sql_query(dialect_of($pg, CLOSE))
                    .bind::<BigInt, _>(seq)
                    .bind::<BigInt, _>(lease_until)
                    .get_result::<Closed>(self)
                    .optional()
                    .map(|t| t.map(|t| t.deliveries))
            }

            fn drop_bundles(&mut self, leases: &[(i64, i64)]) -> QueryResult<Vec<i64>> {
                #[derive(QueryableByName)]
                struct Dropped {
                    #[diesel(sql_type = BigInt)]
                    seq: i64,
                }
                if leases.is_empty() {
                    return Ok(Vec::new());
                }
                let pairs: Vec<String> = leases
                    .iter()
                    .map(|(seq, until)| format!("({seq}, {until})"))
                    .collect();
                diesel::sql_query(format!(
                    "DELETE FROM webhook_bundles WHERE (seq, lease_until) IN (VALUES {}) \
                     RETURNING seq",
                    pairs.join(", ")
                ))
                .load::<Dropped>(self)
                .map(|d| d.into_iter().map(|d| d.seq).collect())
            }

            fn delete_bundles(&mut self, seqs: &[i64]) -> QueryResult<usize> {
                diesel::sql_query(format!(
                    "DELETE FROM webhook_bundles WHERE seq IN ({})",
                    id_list(seqs)
                ))
                .execute(self)
            }

            fn pending_of(&mut self, webhook: i64) -> QueryResult<i64> {
                let text = format!(
                    "SELECT (SELECT COUNT(*) FROM webhook_deliveries \
                     WHERE webhook_id = $1 AND dead_at IS NULL) \
                     + (SELECT {BUNDLED} FROM webhook_bundles WHERE webhook_id = $1) AS n"
                );
                diesel::sql_query(dialect_of($pg, &text))
                    .bind::<BigInt, _>(webhook)
                    .get_result::<Count>(self)
                    .map(|c| c.n)
            }

            fn try_hook_lock(&mut self, webhook: i64) -> QueryResult<bool> {
                #[derive(QueryableByName)]
                struct Got {
                    #[diesel(sql_type = Bool)]
                    got: bool,
                }
                if !$pg {
                    return Ok(true);
                }
                diesel::sql_query(try_hook_lock_shared(webhook))
                    .get_result::<Got>(self)
                    .map(|g| g.got)
            }

            fn unpacking_turn(&mut self, webhook: i64) -> QueryResult<()> {
                if $pg {
                    diesel::sql_query(format!(
                        "SELECT pg_advisory_xact_lock({UNPACK_LOCK_CLASS}, {})",
                        lock_key(webhook)
                    ))
                    .execute(self)?;
                }
                Ok(())
            }

            fn standing(&mut self, webhook: i64, now: i64) -> QueryResult<Option<Standing>> {
                diesel::sql_query(dialect_of($pg, STANDING))
                    .bind::<BigInt, _>(webhook)
                    .bind::<BigInt, _>(now)
                    .get_result::<Standing>(self)
                    .optional()
            }
        }
    };
}

bundle_rows!(diesel::sqlite::SqliteConnection, false);
bundle_rows!(diesel::pg::PgConnection, true);

/// Pending deliveries of every webhook, rows and bundles (one snapshot).
pub(super) fn pending_total(conn: &mut DbConn) -> Result<i64, StorageError> {
    let text = format!(
        "SELECT (SELECT COUNT(*) FROM webhook_deliveries WHERE dead_at IS NULL) \
         + (SELECT {BUNDLED} FROM webhook_bundles) AS n"
    );
    Ok(with_conn!(conn, c => diesel::sql_query(&text).get_result::<Count>(c))?.n)
}

/// Deliveries waiting in bundles, per webhook of `hooks` that has any.
pub(super) fn bundled_of(
    conn: &mut DbConn,
    hooks: &[i64],
) -> Result<HashMap<i64, i64>, StorageError> {
    #[derive(QueryableByName)]
    struct Of {
        #[diesel(sql_type = BigInt)]
        webhook_id: i64,
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    let text = format!(
        "SELECT webhook_id, {BUNDLED} AS n FROM webhook_bundles \
         WHERE webhook_id IN ({}) GROUP BY webhook_id",
        id_list(hooks)
    );
    let rows: Vec<Of> = with_conn!(conn, c => diesel::sql_query(&text).load(c))?;
    Ok(rows.into_iter().map(|o| (o.webhook_id, o.n)).collect())
}

/// Stores `rows` of `webhook` as one bundle, leased to this node until
/// `lease_until` (0: due, for a claim); its `seq`, or nothing when the
/// webhook is gone.
pub(super) fn store<C: BundleRows>(
    c: &mut C,
    webhook: i64,
    rows: &[NewRow<'_>],
    lease_until: i64,
) -> QueryResult<Option<i64>> {
    let text = pack(rows).map_err(diesel::result::Error::SerializationError)?;
    let count = i64::try_from(rows.len()).unwrap_or(i64::MAX);
    c.insert_bundle(webhook, count, &text, lease_until)
}

/// One unpacked delivery: its reserved position and acceptance time.
pub(super) struct Unpacked {
    seq: i64,
    row: NewDelivery,
    at: i64,
}

/// Stores `rows` of `webhook` as rows stored `stored` (leased until
/// `lease_until` when leased).
fn store_rows<C: InsertRun>(
    c: &mut C,
    webhook: i64,
    stored: Stored,
    rows: &[Unpacked],
    lease_until: i64,
) -> QueryResult<()> {
    if rows.is_empty() {
        return Ok(());
    }
    let run = Run {
        stored,
        rows: rows
            .iter()
            .map(|u| NewRow {
                seq: u.seq,
                row: &u.row,
                now: u.at,
                lease_until,
            })
            .collect(),
    };
    c.insert_run(webhook, &run)?;
    Ok(())
}

/// Unpacks `webhook`'s oldest bundles not leased past `free_at`, whole
/// bundles until at least `wanted` deliveries (every bundle when `None`):
/// their first `leased` deliveries are stored leased until `lease_until`,
/// their first attempt counted (as a claim counts it) and returned, the
/// others due. The deliveries of a bundle leased before (its lease ran
/// out, or the webhook is being disabled) are all stored under that lease
/// with their first attempt counted ([`retake`]), and added to `retaken`.
pub(super) fn unpack<C: BundleRows + InsertRun>(
    c: &mut C,
    webhook: i64,
    free_at: i64,
    wanted: Option<i64>,
    (leased, lease_until): (usize, i64),
    retaken_n: &mut usize,
) -> QueryResult<Vec<Unpacked>> {
    let mut unpacked = 0;
    let mut taken = Vec::new();
    while wanted.is_none_or(|w| unpacked < w) {
        let bundles = c.oldest_bundles(webhook, free_at, READ_AT_ONCE)?;
        if bundles.is_empty() {
            break;
        }
        let mut seqs = Vec::new();
        let mut fresh = Vec::new();
        for bundle in &bundles {
            if wanted.is_some_and(|w| unpacked >= w) {
                break;
            }
            unpacked += bundle.count;
            if bundle.lease_until > 0 {
                *retaken_n += retake(c, webhook, bundle)?;
                continue;
            }
            fresh.extend(unpack_text(&bundle.deliveries)?);
            seqs.push(bundle.seq);
        }
        let lease_now = leased.saturating_sub(taken.len()).min(fresh.len());
        let due = fresh.split_off(lease_now);
        store_rows(c, webhook, Stored::Leased, &fresh, lease_until)?;
        store_rows(c, webhook, Stored::Due, &due, 0)?;
        taken.extend(fresh);
        if !seqs.is_empty() {
            c.delete_bundles(&seqs)?;
        }
    }
    Ok(taken)
}

/// Unpacks every bundle of `webhook` into rows: due, and those of a
/// leased bundle under its lease ([`retake`]).
pub(super) fn unpack_all<C: BundleRows + InsertRun>(c: &mut C, webhook: i64) -> QueryResult<()> {
    unpack(c, webhook, i64::MAX, None, (0, 0), &mut 0).map(|_| ())
}

/// Takes back `bundle`, whose lease ran out (or whose webhook is being
/// disabled): deletes it if its lease is still the one read (the node it
/// was leased to may close it meanwhile) and stores its deliveries as rows
/// under the bundle's lease, their first attempt counted: due once it has
/// ended (at once when it ran out), and a delivery of a disabled webhook
/// put back by `/retry` while its node may still be attempting it waits
/// for the end of that attempt. How many.
fn retake<C: BundleRows + InsertRun>(
    c: &mut C,
    webhook: i64,
    bundle: &Bundle,
) -> QueryResult<usize> {
    let Some(text) = c.close_bundle(bundle.seq, bundle.lease_until)? else {
        return Ok(0);
    };
    let rows = unpack_text(&text)?;
    store_rows(c, webhook, Stored::Leased, &rows, bundle.lease_until)?;
    Ok(rows.len())
}

/// What [`lease_whole`] took.
struct Whole {
    /// The deliveries, each with its bundle's `seq` (0: unpacked into a row).
    taken: Vec<(Unpacked, i64)>,
    leased: Vec<LeasedBundle>,
    /// What is left of the room when the next bundle is larger than the
    /// whole room (it is then unpacked for it).
    left_for_rows: i64,
}

/// Leases `webhook`'s oldest bundles whole until `lease_until` until they
/// fill `room` deliveries (the last may pass it), none larger than `room`.
/// It stops early at a bundle whose lease ran out (free at `now`): that
/// one is taken back into due rows (counted in `retaken`), for the next
/// claim to take before newer bundles; and at one that cannot be read
/// once it leased any (else its error is returned).
fn lease_whole<C: BundleRows + InsertRun>(
    c: &mut C,
    webhook: i64,
    now: i64,
    (room, lease_until): (i64, i64),
    retaken_n: &mut usize,
) -> QueryResult<Whole> {
    let mut left = room;
    let mut whole = Whole {
        taken: Vec::new(),
        leased: Vec::new(),
        left_for_rows: 0,
    };
    loop {
        let bundles = c.oldest_bundles(webhook, now, READ_AT_ONCE)?;
        let mut more = bundles.len() == usize::try_from(READ_AT_ONCE).unwrap_or(usize::MAX);
        let mut lease = Vec::new();
        for bundle in &bundles {
            if bundle.lease_until > 0 {
                *retaken_n += retake(c, webhook, bundle)?;
                more = false;
                break;
            }
            if left <= 0 {
                more = false;
                break;
            }
            if bundle.count > room {
                whole.left_for_rows = left;
                more = false;
                break;
            }
            let unpacked = match unpack_text(&bundle.deliveries) {
                Ok(unpacked) => unpacked,
                Err(e) if whole.leased.is_empty() => return Err(e),
                Err(e) => {
                    log::error!("webhook {webhook}: {e}; its later deliveries wait");
                    more = false;
                    break;
                }
            };
            whole.leased.push(LeasedBundle {
                seq: bundle.seq,
                webhook_id: webhook,
                lease_until,
                count: unpacked.len(),
            });
            left -= bundle.count;
            lease.push(bundle.seq);
            whole
                .taken
                .extend(unpacked.into_iter().map(|u| (u, bundle.seq)));
        }
        c.lease_bundles(&lease, lease_until)?;
        if !more || left <= 0 {
            return Ok(whole);
        }
    }
}

/// What a claim took from bundles.
pub(super) struct FromBundles {
    pub(super) claimed: Vec<Claimed>,
    /// The bundles leased whole.
    pub(super) leased: Vec<LeasedBundle>,
    /// Deliveries of bundles whose lease ran out, stored due (not taken).
    pub(super) retaken: usize,
}

/// After a claim's due rows at `now`, at most `limit` deliveries more: for
/// each of `hooks` (`(id, ordered)`, in id order), what its room
/// (`room_left`) still lacks is taken from its oldest bundles, leased until
/// `lease_until`: whole bundles while they fit (returned too), else
/// unpacked into rows. An `ordered` webhook's room is its one delivery in
/// flight, unpacked only when it has no pending row. A bundle that cannot
/// be read is logged and its webhook left for this claim; the others go on.
pub(super) fn unpack_for_claim<C: BundleRows + InsertRun>(
    c: &mut C,
    hooks: &[(i64, bool)],
    now: i64,
    lease_until: i64,
    limit: i64,
    room_left: impl Fn(i64) -> i64,
) -> QueryResult<FromBundles> {
    let mut claimed = Vec::new();
    let mut whole = Vec::new();
    let mut retaken = 0;
    for &(webhook, ordered) in hooks {
        let room = if ordered { 1 } else { room_left(webhook) };
        let budget = limit - i64::try_from(claimed.len()).unwrap_or(i64::MAX);
        let lacking = room.min(budget);
        if lacking <= 0 {
            continue;
        }
        // The claim holds rows already: a webhook being deleted or disabled
        // is left for the next claim rather than waited for.
        if !c.try_hook_lock(webhook)? {
            continue;
        }
        // Another node may have unpacked (and committed) while this one
        // waited for its turn: what is pending is read again after it.
        c.unpacking_turn(webhook)?;
        match c.standing(webhook, now)? {
            Some(s) if s.enabled && !(ordered && s.pending) => {}
            _ => continue,
        }
        let mut take = |c: &mut C| -> QueryResult<Whole> {
            let mut whole = if ordered {
                Whole {
                    taken: Vec::new(),
                    leased: Vec::new(),
                    left_for_rows: lacking,
                }
            } else {
                lease_whole(c, webhook, now, (lacking, lease_until), &mut retaken)?
            };
            // An ordered webhook's bundle, or what is left of the room when
            // the next bundle is larger than all of it: unpacked into rows.
            let rows = whole.left_for_rows;
            if rows > 0 {
                let leased = (usize::try_from(rows).unwrap_or(0), lease_until);
                let unpacked = unpack(c, webhook, now, Some(rows), leased, &mut retaken)?;
                whole.taken.extend(unpacked.into_iter().map(|u| (u, 0)));
            }
            Ok(whole)
        };
        let Whole { taken, leased, .. } = match take(c) {
            Ok(taken) => taken,
            Err(diesel::result::Error::DeserializationError(e)) => {
                log::error!("webhook {webhook}: a bundle of its deliveries cannot be read ({e}); its deliveries wait");
                continue;
            }
            Err(e) => return Err(e),
        };
        whole.extend(leased);
        claimed.extend(taken.into_iter().map(|(u, bundle)| Claimed {
            seq: u.seq,
            id: u.row.id,
            webhook_id: webhook,
            event: u.row.event.to_string(),
            data: u.row.data,
            created_at: u.at,
            attempts: 0,
            next_attempt_at: u.at,
            ordered,
            bundle,
        }));
    }
    Ok(FromBundles {
        claimed,
        leased: whole,
        retaken,
    })
}

/// Closes bundle `b`, leased to this node, with its deliveries' `outcomes`
/// (each has one, or the node is stopping; a bundle whose deliveries all
/// succeeded is dropped instead, `BundleRows::drop_bundles`): if it is
/// still leased to this node, deletes it and stores as rows those that did
/// not succeed, their first attempt counted, leased to this node until the
/// bundle's lease ends (under which they were attempted): their outcomes
/// are then recorded on them as on any row's, and those without one
/// (being attempted) stay this node's. Whether it was still
/// this node's (else its lease ran out and it was taken back, or its
/// webhook was disabled or deleted).
pub(super) fn close<C: BundleRows + InsertRun>(
    c: &mut C,
    b: &LeasedBundle,
    outcomes: &[Outcome],
) -> QueryResult<bool> {
    let Some(text) = c.close_bundle(b.seq, b.lease_until)? else {
        return Ok(false);
    };
    let ended: HashMap<i64, bool> = outcomes
        .iter()
        .map(|o| (o.seq(), o.is_delivered()))
        .collect();
    let left: Vec<Unpacked> = unpack_text(&text)?
        .into_iter()
        .filter(|u| ended.get(&u.seq) != Some(&true))
        .collect();
    store_rows(c, b.webhook_id, Stored::Leased, &left, b.lease_until)?;
    Ok(true)
}

/// Packs `rows` as a bundle's `deliveries`, written into one buffer (the
/// intake thread packs every delivery it leaves for a claim).
fn pack(rows: &[NewRow<'_>]) -> Result<String, Box<dyn std::error::Error + Send + Sync>> {
    use std::io::Write;
    let size: usize = rows
        .iter()
        .map(|n| n.row.id.len() + n.row.event.len() + n.row.data.len() + 48)
        .sum();
    let mut out: Vec<u8> = Vec::with_capacity(size + 2);
    out.push(b'[');
    for (i, n) in rows.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write!(out, "[{},", n.seq)?;
        serde_json::to_writer(&mut out, &n.row.id)?;
        out.push(b',');
        serde_json::to_writer(&mut out, n.row.event)?;
        // `data` is the JSON text of an object (the intake's input).
        write!(out, ",{},{}]", n.now, n.row.data)?;
    }
    out.push(b']');
    Ok(String::from_utf8(out)?)
}

/// One packed delivery.
#[derive(Deserialize)]
struct Packed(i64, String, String, i64, Box<RawValue>);

/// A bundle's deliveries.
fn unpack_text(text: &str) -> QueryResult<Vec<Unpacked>> {
    let corrupt = |e: String| diesel::result::Error::DeserializationError(e.into());
    let packed: Vec<Packed> =
        serde_json::from_str(text).map_err(|e| corrupt(format!("a webhook bundle: {e}")))?;
    packed
        .into_iter()
        .map(|Packed(seq, id, event, at, data)| {
            let event = EventKind::parse(&event)
                .ok_or_else(|| corrupt(format!("a webhook bundle's event {event:?}")))?;
            Ok(Unpacked {
                seq,
                row: NewDelivery {
                    id,
                    event: event.as_str(),
                    data: data.get().to_string(),
                },
                at,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What is packed comes back byte for byte, escapes and numbers too.
    #[test]
    fn a_bundle_unpacks_to_what_was_packed() {
        let rows = [
            NewDelivery {
                id: "msg_1".into(),
                event: "call.update",
                data: r#"{"a":1.50,"b":"x\"\u00e9\n","c":[1,{"d":null}],"n":12345678901234567890}"#
                    .into(),
            },
            NewDelivery {
                id: "msg_2".into(),
                event: "label.update",
                data: "{}".into(),
            },
        ];
        let packed: Vec<NewRow<'_>> = rows
            .iter()
            .enumerate()
            .map(|(i, row)| NewRow {
                seq: 50 + i64::try_from(i).unwrap(),
                row,
                now: 1_000 + i64::try_from(i).unwrap(),
                lease_until: 0,
            })
            .collect();
        let text = pack(&packed).unwrap();
        let back = unpack_text(&text).unwrap();
        assert_eq!(back.len(), 2);
        for (got, (want, i)) in back.iter().zip(rows.iter().zip(0..)) {
            assert_eq!(
                (got.seq, &got.row.id, got.row.event, &got.row.data, got.at),
                (50 + i, &want.id, want.event, &want.data, 1_000 + i)
            );
        }
        assert!(unpack_text(r#"[[3,"msg_3","no.such",1,{}]]"#).is_err());
        assert!(unpack_text("[[").is_err());
    }
}
