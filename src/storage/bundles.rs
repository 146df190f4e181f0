//! Queries on `webhook_bundles` (contract §11): the deliveries a publish
//! leaves for a claim, stored as one row per webhook and intake group (a
//! bundle) rather than one row each, so the 202 waits for a few rows
//! instead of one per delivery. A bundle holds its deliveries as a JSON
//! array of `[seq, id, event, accepted at (Unix ms), data]`: `seq` is the
//! acceptance position reserved for the delivery when it was stored (its
//! row's `seq` later), `data` exactly as the publish gave it.
//!
//! Nothing is attempted from a bundle. A claim takes a webhook's due rows
//! first, then, for what its room still lacks, unpacks the webhook's
//! oldest bundles: the deliveries it takes as rows leased to it, the rest
//! of those bundles as due rows (an `ordered` webhook's, only when it has
//! no pending row). Unpacking is one node at a time per webhook (an
//! advisory lock on PostgreSQL, the single writer on SQLite), and checks
//! the webhook again once it holds that turn. Disabling a webhook unpacks
//! all its bundles to turn them into dead letters. Everything after the
//! first attempt (leases, retries, dead letters, paging) works on rows.
//! Counts of pending deliveries add the bundles' `count`.

use std::collections::HashMap;

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Bool, Text};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::deliveries::{Claimed, InsertRun, NewDelivery, NewRow, Run, Stored};
use super::webhooks::{dialect_of, id_list, try_hook_lock_shared};
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
    /// Stores `count` deliveries of `webhook` packed as `text`; nothing
    /// when the webhook is gone.
    fn insert_bundle(&mut self, webhook: i64, count: i64, text: &str) -> QueryResult<usize>;
    /// The oldest `limit` bundles of `webhook`.
    fn oldest_bundles(&mut self, webhook: i64, limit: i64) -> QueryResult<Vec<Bundle>>;
    fn delete_bundles(&mut self, seqs: &[i64]) -> QueryResult<usize>;
    /// `webhook`'s pending deliveries, rows and bundles, counted in one
    /// statement (one snapshot: a claim unpacking bundles meanwhile moves
    /// deliveries from one table to the other).
    fn pending_of(&mut self, webhook: i64) -> QueryResult<i64>;
    /// Takes `webhook`'s shared lock (`webhooks::hook_locks`) if no delete
    /// or disable holds it, without waiting; whether it was taken.
    fn try_hook_lock(&mut self, webhook: i64) -> QueryResult<bool>;
    /// Waits for this transaction's turn to unpack `webhook`'s bundles.
    fn unpacking_turn(&mut self, webhook: i64) -> QueryResult<()>;
    /// Whether `webhook` is enabled and has pending rows, as committed now
    /// (`None`: it is gone).
    fn standing(&mut self, webhook: i64) -> QueryResult<Option<Standing>>;
}

const INSERT: &str = "INSERT INTO webhook_bundles (webhook_id, count, deliveries) \
     SELECT $1, $2, $3 WHERE EXISTS (SELECT 1 FROM webhooks WHERE id = $1)";
const OLDEST: &str =
    "SELECT seq, count, deliveries FROM webhook_bundles WHERE webhook_id = $1 ORDER BY seq LIMIT $2";
const STANDING: &str = "SELECT w.enabled, EXISTS (SELECT 1 FROM webhook_deliveries d \
     WHERE d.webhook_id = w.id AND d.dead_at IS NULL) AS pending FROM webhooks w WHERE w.id = $1";

macro_rules! bundle_rows {
    ($conn:ty, $pg:expr) => {
        impl BundleRows for $conn {
            fn insert_bundle(
                &mut self,
                webhook: i64,
                count: i64,
                text: &str,
            ) -> QueryResult<usize> {
                diesel::sql_query(dialect_of($pg, INSERT))
                    .bind::<BigInt, _>(webhook)
                    .bind::<BigInt, _>(count)
                    .bind::<Text, _>(text)
                    .execute(self)
            }

            fn oldest_bundles(&mut self, webhook: i64, limit: i64) -> QueryResult<Vec<Bundle>> {
                diesel::sql_query(dialect_of($pg, OLDEST))
                    .bind::<BigInt, _>(webhook)
                    .bind::<BigInt, _>(limit)
                    .load(self)
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
                        webhook & 0x7fff_ffff
                    ))
                    .execute(self)?;
                }
                Ok(())
            }

            fn standing(&mut self, webhook: i64) -> QueryResult<Option<Standing>> {
                diesel::sql_query(dialect_of($pg, STANDING))
                    .bind::<BigInt, _>(webhook)
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

/// Stores `rows` of `webhook` as one bundle.
pub(super) fn store<C: BundleRows>(
    c: &mut C,
    webhook: i64,
    rows: &[NewRow<'_>],
) -> QueryResult<()> {
    let text = pack(rows).map_err(diesel::result::Error::SerializationError)?;
    let count = i64::try_from(rows.len()).unwrap_or(i64::MAX);
    c.insert_bundle(webhook, count, &text)?;
    Ok(())
}

/// One unpacked delivery: its reserved position and acceptance time.
pub(super) struct Unpacked {
    seq: i64,
    row: NewDelivery,
    at: i64,
}

/// Unpacks `webhook`'s oldest bundles, whole bundles until at least
/// `wanted` deliveries (every bundle when `None`): their first `leased`
/// deliveries are stored leased until `lease_until`, their first attempt
/// counted (as a claim counts it) and returned, the others due.
pub(super) fn unpack<C: BundleRows + InsertRun>(
    c: &mut C,
    webhook: i64,
    wanted: Option<i64>,
    leased: usize,
    lease_until: i64,
) -> QueryResult<Vec<Unpacked>> {
    let mut unpacked = 0;
    let mut taken = Vec::new();
    while wanted.is_none_or(|w| unpacked < w) {
        let bundles = c.oldest_bundles(webhook, READ_AT_ONCE)?;
        if bundles.is_empty() {
            break;
        }
        let mut seqs = Vec::new();
        let mut deliveries = Vec::new();
        for bundle in &bundles {
            if wanted.is_some_and(|w| unpacked >= w) {
                break;
            }
            deliveries.extend(unpack_text(&bundle.deliveries)?);
            seqs.push(bundle.seq);
            unpacked += bundle.count;
        }
        let lease_now = leased.saturating_sub(taken.len()).min(deliveries.len());
        let due = deliveries.split_off(lease_now);
        for (stored, rows) in [(Stored::Leased, &deliveries), (Stored::Due, &due)] {
            if rows.is_empty() {
                continue;
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
        }
        taken.extend(deliveries);
        c.delete_bundles(&seqs)?;
    }
    Ok(taken)
}

/// Unpacks every bundle of `webhook` into due rows.
pub(super) fn unpack_all<C: BundleRows + InsertRun>(c: &mut C, webhook: i64) -> QueryResult<()> {
    unpack(c, webhook, None, 0, 0).map(|_| ())
}

/// After a claim's due rows, at most `limit` deliveries more: for each of
/// `hooks` (`(id, ordered)`, in id order), what its room (`room_left`)
/// still lacks is unpacked from its oldest bundles and returned leased
/// until `lease_until`. An `ordered` webhook's room is its one delivery in
/// flight, taken only when it has no pending row. A bundle that cannot be
/// read is logged and its webhook left for this claim; the others go on.
pub(super) fn unpack_for_claim<C: BundleRows + InsertRun>(
    c: &mut C,
    hooks: &[(i64, bool)],
    lease_until: i64,
    limit: i64,
    room_left: impl Fn(i64) -> i64,
) -> QueryResult<Vec<Claimed>> {
    let mut claimed = Vec::new();
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
        match c.standing(webhook)? {
            Some(s) if s.enabled && !(ordered && s.pending) => {}
            _ => continue,
        }
        let leased = usize::try_from(lacking).unwrap_or(0);
        let taken = match unpack(c, webhook, Some(lacking), leased, lease_until) {
            Ok(taken) => taken,
            Err(diesel::result::Error::DeserializationError(e)) => {
                log::error!("webhook {webhook}: a bundle of its deliveries cannot be read ({e}); its deliveries wait");
                continue;
            }
            Err(e) => return Err(e),
        };
        claimed.extend(taken.into_iter().map(|u| Claimed {
            seq: u.seq,
            id: u.row.id,
            webhook_id: webhook,
            event: u.row.event.to_string(),
            data: u.row.data,
            created_at: u.at,
            attempts: 0,
            next_attempt_at: u.at,
            ordered,
        }));
    }
    Ok(claimed)
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
