//! Queries on `webhook_bundles` (contract §11): the deliveries a publish
//! leaves for a claim, stored as one row per webhook and intake group (a
//! bundle) rather than one row each, so the 202 waits for a few rows
//! instead of one per delivery. A bundle holds its deliveries as a JSON
//! array of `[id, event, accepted at (Unix ms), data]`, `data` exactly as
//! the publish gave it.
//!
//! Nothing is ever attempted from a bundle: a claim first unpacks a
//! webhook's oldest bundles into due rows of `webhook_deliveries` when the
//! due rows there do not fill the room it claims for (for an `ordered`
//! webhook, only when it has no pending row at all), and disabling a
//! webhook unpacks them all to turn them into dead letters. A webhook's
//! delivery rows are thus always older than its bundles, and everything
//! after the first attempt (leases, retries, dead letters, paging) works on
//! rows. Counts of pending deliveries add the bundles' `count`.

use std::collections::HashMap;

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::deliveries::{Claimed, InsertRun, NewDelivery, NewRow, Run, Stored};
use super::webhooks::id_list;
use super::{with_conn, DbConn, StorageError};
use crate::domain::EventKind;

/// Bundles read at a time while unpacking.
const READ_AT_ONCE: i64 = 16;

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

/// The statements on bundles, one implementation per backend (they differ
/// in placeholders and row locks).
pub(super) trait BundleRows {
    /// Stores `count` deliveries of `webhook` packed as `text`; nothing
    /// when the webhook is gone.
    fn insert_bundle(&mut self, webhook: i64, count: i64, text: &str) -> QueryResult<usize>;
    /// The oldest `limit` bundles of `webhook`, locked on PostgreSQL.
    fn oldest_bundles(&mut self, webhook: i64, limit: i64) -> QueryResult<Vec<Bundle>>;
    fn delete_bundles(&mut self, seqs: &[i64]) -> QueryResult<usize>;
    /// `webhook`'s pending deliveries, rows and bundles, counted in one
    /// statement (one snapshot: a claim unpacking bundles meanwhile moves
    /// deliveries from one table to the other).
    fn pending_of(&mut self, webhook: i64) -> QueryResult<i64>;
    /// Rows of `webhook` a claim at `now` could take, counted up to `limit`:
    /// due ones, or for an `ordered` webhook pending ones (its oldest
    /// pending row holds the others back, due or not).
    fn rows_ready(&mut self, webhook: i64, now: i64, limit: i64, ordered: bool)
        -> QueryResult<i64>;
}

/// `sql` with SQLite's placeholders (`?1` for `$1`) unless on PostgreSQL.
fn placeholders(pg: bool, sql: &str) -> String {
    if pg {
        sql.to_string()
    } else {
        sql.replace('$', "?")
    }
}

const INSERT: &str = "INSERT INTO webhook_bundles (webhook_id, count, deliveries) \
     SELECT $1, $2, $3 WHERE EXISTS (SELECT 1 FROM webhooks WHERE id = $1)";
const OLDEST: &str =
    "SELECT seq, count, deliveries FROM webhook_bundles WHERE webhook_id = $1 ORDER BY seq LIMIT $2";
const PENDING_OF: &str = "SELECT (SELECT COUNT(*) FROM webhook_deliveries \
     WHERE webhook_id = $1 AND dead_at IS NULL) \
     + (SELECT CAST(COALESCE(SUM(count), 0) AS BIGINT) FROM webhook_bundles WHERE webhook_id = $1) AS n";
const DUE: &str = "SELECT COUNT(*) AS n FROM (SELECT 1 FROM webhook_deliveries \
     WHERE webhook_id = $1 AND dead_at IS NULL AND next_attempt_at <= $2 AND lease_until <= $2 \
     LIMIT $3) AS d";
const PENDING: &str = "SELECT COUNT(*) AS n FROM (SELECT 1 FROM webhook_deliveries \
     WHERE webhook_id = $1 AND dead_at IS NULL LIMIT $2) AS d";

macro_rules! bundle_rows {
    ($conn:ty, $pg:expr) => {
        impl BundleRows for $conn {
            fn insert_bundle(
                &mut self,
                webhook: i64,
                count: i64,
                text: &str,
            ) -> QueryResult<usize> {
                diesel::sql_query(placeholders($pg, INSERT))
                    .bind::<BigInt, _>(webhook)
                    .bind::<BigInt, _>(count)
                    .bind::<Text, _>(text)
                    .execute(self)
            }

            fn oldest_bundles(&mut self, webhook: i64, limit: i64) -> QueryResult<Vec<Bundle>> {
                // Two nodes unpacking one webhook take its bundles in turn,
                // so its rows stay in acceptance order.
                let lock = if $pg { " FOR UPDATE" } else { "" };
                diesel::sql_query(format!("{}{lock}", placeholders($pg, OLDEST)))
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
                diesel::sql_query(placeholders($pg, PENDING_OF))
                    .bind::<BigInt, _>(webhook)
                    .get_result::<Count>(self)
                    .map(|c| c.n)
            }

            fn rows_ready(
                &mut self,
                webhook: i64,
                now: i64,
                limit: i64,
                ordered: bool,
            ) -> QueryResult<i64> {
                let counted = if ordered {
                    diesel::sql_query(placeholders($pg, PENDING))
                        .bind::<BigInt, _>(webhook)
                        .bind::<BigInt, _>(limit)
                        .get_result::<Count>(self)
                } else {
                    diesel::sql_query(placeholders($pg, DUE))
                        .bind::<BigInt, _>(webhook)
                        .bind::<BigInt, _>(now)
                        .bind::<BigInt, _>(limit)
                        .get_result::<Count>(self)
                };
                counted.map(|c| c.n)
            }
        }
    };
}

bundle_rows!(diesel::sqlite::SqliteConnection, false);
bundle_rows!(diesel::pg::PgConnection, true);

/// Pending deliveries of every webhook, rows and bundles (one snapshot).
pub(super) fn pending_total(conn: &mut DbConn) -> Result<i64, StorageError> {
    let text = "SELECT (SELECT COUNT(*) FROM webhook_deliveries WHERE dead_at IS NULL) \
         + (SELECT CAST(COALESCE(SUM(count), 0) AS BIGINT) FROM webhook_bundles) AS n";
    Ok(with_conn!(conn, c => diesel::sql_query(text).get_result::<Count>(c))?.n)
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
        "SELECT webhook_id, CAST(SUM(count) AS BIGINT) AS n FROM webhook_bundles \
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
    let text = pack(rows).map_err(|e| diesel::result::Error::SerializationError(Box::new(e)))?;
    let count = i64::try_from(rows.len()).unwrap_or(i64::MAX);
    c.insert_bundle(webhook, count, &text)?;
    Ok(())
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
) -> QueryResult<Vec<(NewDelivery, i64, i64)>> {
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
        let (to_lease, due) = deliveries.split_at(lease_now);
        for (stored, rows) in [(Stored::Leased, to_lease), (Stored::Due, due)] {
            if rows.is_empty() {
                continue;
            }
            let run = Run {
                stored,
                rows: rows
                    .iter()
                    .map(|(row, now)| NewRow {
                        row,
                        now: *now,
                        lease_until,
                    })
                    .collect(),
            };
            let returned = c.insert_run(webhook, &run)?;
            if stored == Stored::Leased {
                let seqs: HashMap<&str, i64> = returned
                    .iter()
                    .map(|(id, seq)| (id.as_str(), *seq))
                    .collect();
                for (row, now) in rows {
                    if let Some(seq) = seqs.get(row.id.as_str()) {
                        taken.push((row.clone(), *now, *seq));
                    }
                }
            }
        }
        c.delete_bundles(&seqs)?;
    }
    Ok(taken)
}

/// Unpacks every bundle of `webhook` into due rows.
pub(super) fn unpack_all<C: BundleRows + InsertRun>(c: &mut C, webhook: i64) -> QueryResult<()> {
    unpack(c, webhook, None, 0, 0).map(|_| ())
}

/// Before a claim at `now` of at most `limit` deliveries: for each of
/// `hooks` (`(id, ordered)`, in id order) whose ready rows do not fill its
/// room, unpacks enough bundles, and returns what the room lacks leased
/// until `lease_until` (an `ordered` webhook's room is its one delivery in
/// flight, when it has no pending row).
pub(super) fn unpack_for_claim<C: BundleRows + InsertRun>(
    c: &mut C,
    hooks: &[(i64, bool)],
    now: i64,
    lease_until: i64,
    limit: i64,
    room: impl Fn(i64) -> i64,
) -> QueryResult<Vec<Claimed>> {
    let mut claimed = Vec::new();
    for &(webhook, ordered) in hooks {
        let room = if ordered { 1 } else { room(webhook) };
        let budget = limit - i64::try_from(claimed.len()).unwrap_or(i64::MAX);
        if room <= 0 || budget <= 0 {
            continue;
        }
        let ready = c.rows_ready(webhook, now, room, ordered)?;
        if ready >= room {
            continue;
        }
        let lacking = (room - ready).min(budget);
        let leased = usize::try_from(lacking).unwrap_or(0);
        for (row, created_at, seq) in unpack(c, webhook, Some(lacking), leased, lease_until)? {
            claimed.push(Claimed {
                seq,
                id: row.id,
                webhook_id: webhook,
                event: row.event.to_string(),
                data: row.data,
                created_at,
                attempts: 0,
                next_attempt_at: created_at,
                ordered,
            });
        }
    }
    Ok(claimed)
}

/// Packs `rows` as a bundle's `deliveries`.
fn pack(rows: &[NewRow<'_>]) -> serde_json::Result<String> {
    let size: usize = rows
        .iter()
        .map(|n| n.row.id.len() + n.row.event.len() + n.row.data.len() + 32)
        .sum();
    let mut out = String::with_capacity(size + 2);
    out.push('[');
    for (i, n) in rows.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push('[');
        out.push_str(&serde_json::to_string(&n.row.id)?);
        out.push(',');
        out.push_str(&serde_json::to_string(n.row.event)?);
        out.push(',');
        out.push_str(&n.now.to_string());
        out.push(',');
        // `data` is the JSON text of an object (the intake's input).
        out.push_str(&n.row.data);
        out.push(']');
    }
    out.push(']');
    Ok(out)
}

/// One packed delivery.
#[derive(Deserialize)]
struct Packed(String, String, i64, Box<RawValue>);

/// A bundle's deliveries, each with its acceptance time.
fn unpack_text(text: &str) -> QueryResult<Vec<(NewDelivery, i64)>> {
    let corrupt = |e: String| diesel::result::Error::DeserializationError(e.into());
    let packed: Vec<Packed> =
        serde_json::from_str(text).map_err(|e| corrupt(format!("a webhook bundle: {e}")))?;
    packed
        .into_iter()
        .map(|Packed(id, event, now, data)| {
            let event = EventKind::parse(&event)
                .ok_or_else(|| corrupt(format!("a webhook bundle's event {event:?}")))?;
            Ok((
                NewDelivery {
                    id,
                    event: event.as_str(),
                    data: data.get().to_string(),
                },
                now,
            ))
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
                row,
                now: 1_000 + i64::try_from(i).unwrap(),
                lease_until: 0,
            })
            .collect();
        let text = pack(&packed).unwrap();
        let back = unpack_text(&text).unwrap();
        assert_eq!(back.len(), 2);
        for ((got, now), (want, i)) in back.iter().zip(rows.iter().zip(0..)) {
            assert_eq!(
                (&got.id, got.event, &got.data, *now),
                (&want.id, want.event, &want.data, 1_000 + i)
            );
        }
        assert!(unpack_text(r#"[["msg_3","no.such",1,{}]]"#).is_err());
        assert!(unpack_text("[[").is_err());
    }
}
