//! Queries on `webhooks` (contract §11): one row per instance and label —
//! its configuration, its signing secret (and the previous one while a
//! rotation is recent), its counters. Secrets and `authorization` arrive
//! here already sealed (see `webhook::sealing`); this file never sees a key.
//!
//! The table has more columns than diesel's `table!` takes by default, so
//! its queries are SQL text, written once for both backends (`$n`
//! placeholders, rewritten to `?n` on SQLite).

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Bool, Nullable, Text};

use super::ws_settings::encode_events;
use super::{now_millis, with_conn, write_tx, DbConn, StorageError};
use crate::domain::{EventKind, InstanceId};

/// Most webhooks of one instance enabled at once.
pub const MAX_ENABLED: i64 = 3;

/// The SQL text for the connection's backend: `$n` placeholders become
/// `?n` on SQLite.
pub(crate) fn dialect(conn: &DbConn, sql: &str) -> String {
    dialect_of(conn.is_pg(), sql)
}

/// [`dialect`] for a backend known without its connection (PostgreSQL
/// when `pg`), as in code written once for both connection types.
pub(crate) fn dialect_of(pg: bool, sql: &str) -> String {
    if pg {
        sql.to_string()
    } else {
        sql.replace('$', "?")
    }
}

/// Locks an instance's row (PostgreSQL): whoever sets one of its webhooks,
/// or deletes it with its webhooks, goes one at a time.
pub(crate) const LOCK_INSTANCE: &str = "SELECT id FROM instances WHERE id = $1 FOR UPDATE";

/// A webhook's id.
#[derive(QueryableByName)]
pub(crate) struct HookId {
    #[diesel(sql_type = BigInt)]
    pub id: i64,
}

impl HookId {
    /// The ids of `rows`, as a query for webhooks loads them.
    pub(crate) fn ids(rows: Vec<HookId>) -> Vec<i64> {
        rows.into_iter().map(|h| h.id).collect()
    }
}

/// The statement that takes, on PostgreSQL (`pg`), the transaction's
/// advisory lock on each of `hooks` (sorted, so takers never wait in a
/// circle): shared by the intake while it stores their deliveries and by
/// the recording of their outcomes, exclusive by whoever deletes or kills
/// them, before touching them. Deliveries have no foreign key to their
/// webhook (its per-row check cost a twelfth of the database's time), so
/// this is what keeps a delete from missing rows a publish is storing: the
/// delete waits for the intake to commit, and an intake behind it finds
/// the webhook gone. `None` on SQLite, whose writers take turns anyway.
///
/// The locks use PostgreSQL's two-key form, under [`HOOK_LOCK_CLASS`], so
/// they never meet another application's single-key advisory locks on the
/// same database; the second key is [`lock_key`] (two webhooks 2³¹ ids
/// apart would only share a lock).
pub(crate) fn hook_locks(pg: bool, hooks: &[i64], shared: bool) -> Option<String> {
    if !pg {
        return None;
    }
    let mut keys: Vec<i64> = hooks.iter().copied().map(lock_key).collect();
    keys.sort_unstable();
    keys.dedup();
    let kind = if shared { "_shared" } else { "" };
    Some(format!(
        "SELECT pg_advisory_xact_lock{kind}({HOOK_LOCK_CLASS}, k) FROM unnest('{{{}}}'::int4[]) AS k",
        id_list(&keys)
    ))
}

/// The statement that tries, without waiting, to take `hook`'s shared
/// lock of [`hook_locks`] (PostgreSQL); it answers `got`. For a claim that
/// already holds rows: waiting there for a delete or disable, which takes
/// the lock first and the rows after, would be a deadlock.
pub(crate) fn try_hook_lock_shared(hook: i64) -> String {
    format!(
        "SELECT pg_try_advisory_xact_lock_shared({HOOK_LOCK_CLASS}, {}) AS got",
        lock_key(hook)
    )
}

/// The second key of a webhook's advisory locks: its id's low 31 bits
/// (PostgreSQL's two-key form takes two `int4`).
pub(crate) fn lock_key(hook: i64) -> i64 {
    hook & 0x7fff_ffff
}

/// First key of the webhooks' advisory locks (any fixed number will do).
const HOOK_LOCK_CLASS: i32 = 0x6567_7768; // "egwh"

/// A comma-separated list of ids for an `IN (…)` (never empty: `-1` stands
/// for none, which no row has).
pub(crate) fn id_list(ids: &[i64]) -> String {
    if ids.is_empty() {
        return "-1".into();
    }
    ids.iter().map(i64::to_string).collect::<Vec<_>>().join(",")
}

/// Runs `f` on one consistent, read-only snapshot of the database (a
/// webhook's counters and its deliveries' counts seen at the same moment).
pub fn snapshot<T>(
    conn: &mut DbConn,
    f: impl FnOnce(&mut DbConn) -> Result<T, StorageError>,
) -> Result<T, StorageError> {
    use diesel::connection::SimpleConnection;
    let begin = match conn {
        DbConn::Pg(_) => "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
        DbConn::Sqlite(_) => "BEGIN DEFERRED",
    };
    with_conn!(conn, c => c.batch_execute(begin))?;
    let out = f(conn);
    let end = if out.is_ok() { "COMMIT" } else { "ROLLBACK" };
    let closed = with_conn!(conn, c => c.batch_execute(end));
    let out = out?;
    closed?;
    Ok(out)
}

/// One stored webhook, secrets as stored (possibly sealed).
#[derive(Debug, Clone, PartialEq, Eq, QueryableByName)]
pub struct WebhookRow {
    #[diesel(sql_type = BigInt)]
    pub id: i64,
    #[diesel(sql_type = BigInt)]
    pub instance_id: i64,
    #[diesel(sql_type = Text)]
    pub label: String,
    #[diesel(sql_type = Bool)]
    pub enabled: bool,
    #[diesel(sql_type = Nullable<Text>)]
    pub url: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    pub auth_header: Option<String>,
    #[diesel(sql_type = Bool)]
    pub by_events: bool,
    /// JSON array of event names.
    #[diesel(sql_type = Text)]
    pub events: String,
    #[diesel(sql_type = Bool)]
    pub media_base64: bool,
    #[diesel(sql_type = Bool)]
    pub ordered: bool,
    #[diesel(sql_type = Text)]
    pub secret: String,
    #[diesel(sql_type = Nullable<Text>)]
    pub previous_secret: Option<String>,
    #[diesel(sql_type = Nullable<BigInt>)]
    pub rotated_at: Option<i64>,
    #[diesel(sql_type = BigInt)]
    pub delivered: i64,
    #[diesel(sql_type = Nullable<BigInt>)]
    pub last_success_at: Option<i64>,
    #[diesel(sql_type = Nullable<BigInt>)]
    pub last_failure_at: Option<i64>,
    #[diesel(sql_type = Nullable<Text>)]
    pub last_error: Option<String>,
}

impl WebhookRow {
    /// The event filter (unknown stored names are skipped).
    pub fn event_kinds(&self) -> Vec<EventKind> {
        let names: Vec<String> = serde_json::from_str(&self.events).unwrap_or_default();
        names.iter().filter_map(|n| EventKind::parse(n)).collect()
    }
}

/// The columns of [`WebhookRow`], for SELECTs (`w.` prefixed).
pub(crate) const COLUMNS: &str = "w.id, w.instance_id, w.label, w.enabled, w.url, w.auth_header, \
     w.by_events, w.events, w.media_base64, w.ordered, w.secret, w.previous_secret, w.rotated_at, \
     w.delivered, w.last_success_at, w.last_failure_at, w.last_error";

/// Counts of one webhook's deliveries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, QueryableByName)]
pub struct Counts {
    #[diesel(sql_type = BigInt)]
    pub webhook_id: i64,
    #[diesel(sql_type = BigInt)]
    pub pending: i64,
    #[diesel(sql_type = BigInt)]
    pub failed: i64,
}

/// What a set request stores (secrets already sealed by the caller).
#[derive(Debug, Clone)]
pub struct NewConfig {
    pub label: String,
    pub enabled: bool,
    pub url: Option<String>,
    pub auth_header: Option<String>,
    pub by_events: bool,
    pub events: Vec<EventKind>,
    pub media_base64: bool,
    pub ordered: bool,
    /// A new sealed secret, used when the label is new or rotates.
    pub new_secret: String,
    pub rotate_secret: bool,
}

/// Why a set was not stored.
#[derive(Debug, thiserror::Error)]
pub enum SetError {
    #[error("three other webhooks of the instance are enabled")]
    TooManyEnabled,
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// An enabled webhook as the publish path needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, QueryableByName)]
pub struct EnabledRow {
    #[diesel(sql_type = BigInt)]
    pub id: i64,
    #[diesel(sql_type = BigInt)]
    pub instance_id: i64,
    #[diesel(sql_type = Text)]
    #[diesel(deserialize_as = String)]
    pub events: EventsText,
}

/// A stored event list decoded into a bit set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventsText(pub crate::domain::EventSet);

impl From<String> for EventsText {
    fn from(text: String) -> Self {
        let names: Vec<String> = serde_json::from_str(&text).unwrap_or_default();
        let kinds: Vec<EventKind> = names.iter().filter_map(|n| EventKind::parse(n)).collect();
        EventsText(crate::domain::EventSet::of(&kinds))
    }
}

/// Every webhook of the instance, sorted by label (byte order).
pub fn list(conn: &mut DbConn, instance: InstanceId) -> Result<Vec<WebhookRow>, StorageError> {
    let text = dialect(
        conn,
        &format!("SELECT {COLUMNS} FROM webhooks w WHERE w.instance_id = $1"),
    );
    let mut rows: Vec<WebhookRow> =
        with_conn!(conn, c => diesel::sql_query(&text).bind::<BigInt, _>(instance.0).load(c))?;
    rows.sort_by(|a, b| a.label.as_bytes().cmp(b.label.as_bytes()));
    Ok(rows)
}

/// The instance's webhook of that label.
pub fn find(
    conn: &mut DbConn,
    instance: InstanceId,
    label: &str,
) -> Result<Option<WebhookRow>, StorageError> {
    let text = one_by_label(conn);
    let rows: Vec<WebhookRow> = with_conn!(conn, c => diesel::sql_query(&text)
        .bind::<BigInt, _>(instance.0)
        .bind::<Text, _>(label)
        .load(c))?;
    Ok(rows.into_iter().next())
}

/// The `default` webhooks of these instances.
pub fn defaults_of(
    conn: &mut DbConn,
    instances: &[InstanceId],
) -> Result<Vec<WebhookRow>, StorageError> {
    let ids: Vec<i64> = instances.iter().map(|i| i.0).collect();
    let text = dialect(
        conn,
        &format!(
            "SELECT {COLUMNS} FROM webhooks w WHERE w.label = 'default' AND w.instance_id IN ({})",
            id_list(&ids)
        ),
    );
    Ok(with_conn!(conn, c => diesel::sql_query(&text).load(c))?)
}

/// Pending (rows and bundles) and dead-letter counts of these webhooks.
pub fn counts(conn: &mut DbConn, webhooks: &[i64]) -> Result<Vec<Counts>, StorageError> {
    let text = format!(
        "SELECT webhook_id, \
         SUM(CASE WHEN dead_at IS NULL THEN 1 ELSE 0 END) AS pending, \
         SUM(CASE WHEN dead_at IS NULL THEN 0 ELSE 1 END) AS failed \
         FROM webhook_deliveries WHERE webhook_id IN ({}) GROUP BY webhook_id",
        id_list(webhooks)
    );
    let mut counts: Vec<Counts> = with_conn!(conn, c => diesel::sql_query(&text).load(c))?;
    for (webhook_id, n) in super::bundles::bundled_of(conn, webhooks)? {
        match counts.iter_mut().find(|c| c.webhook_id == webhook_id) {
            Some(c) => c.pending += n,
            None => counts.push(Counts {
                webhook_id,
                pending: n,
                failed: 0,
            }),
        }
    }
    Ok(counts)
}

/// Every enabled webhook of every instance (to fill the in-memory map).
pub fn enabled_all(conn: &mut DbConn) -> Result<Vec<EnabledRow>, StorageError> {
    let text = "SELECT id, instance_id, events FROM webhooks WHERE enabled ORDER BY id";
    Ok(with_conn!(conn, c => diesel::sql_query(text).load(c))?)
}

/// The enabled webhooks of one instance.
pub fn enabled_of(
    conn: &mut DbConn,
    instance: InstanceId,
) -> Result<Vec<EnabledRow>, StorageError> {
    let text = dialect(
        conn,
        "SELECT id, instance_id, events FROM webhooks WHERE enabled AND instance_id = $1 ORDER BY id",
    );
    Ok(with_conn!(conn, c => diesel::sql_query(&text).bind::<BigInt, _>(instance.0).load(c))?)
}

/// The query of one webhook of an instance by label (`$1` instance, `$2`
/// label), in `conn`'s dialect: [`find`], and transactions' own reads.
pub(crate) fn one_by_label(conn: &DbConn) -> String {
    dialect(
        conn,
        &format!("SELECT {COLUMNS} FROM webhooks w WHERE w.instance_id = $1 AND w.label = $2"),
    )
}

/// The insert of a new label's webhook (`$1` instance, `$2`–`$10` the
/// configuration as [`insert_webhook`] binds it, `$11` now).
pub(crate) const INSERT: &str = "INSERT INTO webhooks (instance_id, label, enabled, url, \
     auth_header, by_events, events, media_base64, ordered, secret, previous_secret, rotated_at, \
     delivered, created_at, updated_at) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, NULL, NULL, 0, $11, $11)";

/// Inserts a new label's webhook in the caller's transaction: `$c` is the
/// backend's connection inside `write_tx!`, `$q` the [`INSERT`] text in its
/// dialect, `$new` a [`NewConfig`] and `$events` its events as stored. A
/// macro, as `write_tx!` is: its body runs on either backend's connection.
/// A set request ([`upsert`]) and an instance's creation
/// (`instances::create`) both store a new webhook through it.
macro_rules! insert_webhook {
    ($c:expr, $q:expr, $instance:expr, $new:expr, $events:expr, $now:expr) => {{
        use diesel::sql_types::{BigInt, Bool, Nullable, Text};
        let new: &$crate::storage::webhooks::NewConfig = $new;
        diesel::sql_query($q)
            .bind::<BigInt, _>($instance)
            .bind::<Text, _>(&new.label)
            .bind::<Bool, _>(new.enabled)
            .bind::<Nullable<Text>, _>(new.url.as_deref())
            .bind::<Nullable<Text>, _>(new.auth_header.as_deref())
            .bind::<Bool, _>(new.by_events)
            .bind::<Text, _>($events)
            .bind::<Bool, _>(new.media_base64)
            .bind::<Bool, _>(new.ordered)
            .bind::<Text, _>(&new.new_secret)
            .bind::<BigInt, _>($now)
            .execute($c)
    }};
}
pub(crate) use insert_webhook;

/// Stores a set request: insert or replace the label's configuration (its
/// secret kept unless rotating), refusing a fourth enabled webhook; a
/// disabled webhook's pending deliveries become dead letters with error
/// `webhook disabled` (their number is returned). A webhook made `ordered`
/// is held back, for `hold_ms` (how long a delivery started before may
/// still be in flight), while any delivery of it is leased. One
/// transaction; on PostgreSQL the instance row is locked so concurrent
/// enables cannot pass the limit together.
pub fn upsert(
    conn: &mut DbConn,
    instance: InstanceId,
    new: &NewConfig,
    hold_ms: i64,
) -> Result<(WebhookRow, usize), SetError> {
    let now = now_millis();
    let events = encode_events(&new.events);
    let pg = conn.is_pg();
    let lock = pg.then_some(LOCK_INSTANCE);
    let q_existing = one_by_label(conn);
    let q_enabled = dialect(
        conn,
        "SELECT COUNT(*) AS n FROM webhooks WHERE instance_id = $1 AND enabled AND label <> $2",
    );
    let q_insert = dialect(conn, INSERT);
    let q_update = dialect(
        conn,
        "UPDATE webhooks SET enabled = $1, url = $2, auth_header = $3, by_events = $4, events = $5, \
         media_base64 = $6, ordered = $7, secret = $8, previous_secret = $9, rotated_at = $10, \
         updated_at = $11 WHERE id = $12",
    );
    let q_kill = dialect(
        conn,
        "UPDATE webhook_deliveries SET dead_at = $1, last_error = 'webhook disabled' \
         WHERE webhook_id = $2 AND dead_at IS NULL",
    );
    let q_now_ordered = dialect(conn, super::deliveries::HOLD_BACK);
    let lock = lock.map(|l| dialect(conn, l));
    #[derive(QueryableByName)]
    struct N {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    let outcome: Result<Result<usize, SetError>, diesel::result::Error> = write_tx!(conn, c => {
        let mut killed = 0;
        if let Some(lock) = &lock {
            diesel::sql_query(lock).bind::<BigInt, _>(instance.0).execute(c)?;
        }
        let existing: Option<WebhookRow> = diesel::sql_query(&q_existing)
            .bind::<BigInt, _>(instance.0)
            .bind::<Text, _>(&new.label)
            .load::<WebhookRow>(c)?
            .into_iter()
            .next();
        if new.enabled {
            let others: Vec<N> = diesel::sql_query(&q_enabled)
                .bind::<BigInt, _>(instance.0)
                .bind::<Text, _>(&new.label)
                .load(c)?;
            if others.first().map_or(0, |n| n.n) >= MAX_ENABLED {
                return Ok(Err(SetError::TooManyEnabled));
            }
        }
        match &existing {
            None => {
                insert_webhook!(c, &q_insert, instance.0, new, &events, now)?;
            }
            Some(old) => {
                let (secret, previous, rotated) = if new.rotate_secret {
                    (new.new_secret.as_str(), Some(old.secret.as_str()), Some(now))
                } else {
                    (old.secret.as_str(), old.previous_secret.as_deref(), old.rotated_at)
                };
                // Its pending deliveries are about to die (`hook_locks`).
                if let Some(q) = hook_locks(pg && !new.enabled, &[old.id], false) {
                    diesel::sql_query(q).execute(c)?;
                }
                diesel::sql_query(&q_update)
                    .bind::<Bool, _>(new.enabled)
                    .bind::<Nullable<Text>, _>(new.url.as_deref())
                    .bind::<Nullable<Text>, _>(new.auth_header.as_deref())
                    .bind::<Bool, _>(new.by_events)
                    .bind::<Text, _>(&events)
                    .bind::<Bool, _>(new.media_base64)
                    .bind::<Bool, _>(new.ordered)
                    .bind::<Text, _>(secret)
                    .bind::<Nullable<Text>, _>(previous)
                    .bind::<Nullable<BigInt>, _>(rotated)
                    .bind::<BigInt, _>(now)
                    .bind::<BigInt, _>(old.id)
                    .execute(c)?;
                if !new.enabled {
                    super::bundles::unpack_all(c, old.id)?;
                    killed = diesel::sql_query(&q_kill)
                        .bind::<BigInt, _>(now)
                        .bind::<BigInt, _>(old.id)
                        .execute(c)?;
                }
                // Made ordered while deliveries of it may be in flight
                // (claimed or stored leased on any node, also by a claim
                // running now): until they may all have ended, a claim
                // looks for any of them still leased (they are not known
                // one by one). After the deliveries' rows: a claim locks
                // those first, then this row (one order, no deadlock).
                if new.ordered && !old.ordered {
                    diesel::sql_query(&q_now_ordered)
                        .bind::<BigInt, _>(old.id)
                        .bind::<BigInt, _>(0_i64)
                        .bind::<BigInt, _>(now.saturating_add(hold_ms))
                        .execute(c)?;
                }
            }
        }
        Ok(Ok(killed))
    });
    let killed = outcome.map_err(StorageError::from)??;
    let row = find(conn, instance, &new.label)?.ok_or_else(|| {
        SetError::Storage(StorageError::Corrupt("stored webhook vanished".into()))
    })?;
    Ok((row, killed))
}

/// Removes the label's webhook with its deliveries and dead letters;
/// `false` when there was none.
pub fn delete(conn: &mut DbConn, instance: InstanceId, label: &str) -> Result<bool, StorageError> {
    let Some(found) = find(conn, instance, label)? else {
        return Ok(false);
    };
    let q_lock = hook_locks(conn.is_pg(), &[found.id], false);
    let q_bundles = dialect(conn, "DELETE FROM webhook_bundles WHERE webhook_id = $1");
    let q_deliveries = dialect(conn, "DELETE FROM webhook_deliveries WHERE webhook_id = $1");
    let q_in_flight = dialect(conn, "DELETE FROM webhook_in_flight WHERE webhook_id = $1");
    let q_hook = dialect(conn, "DELETE FROM webhooks WHERE id = $1");
    let n: usize = write_tx!(conn, c => {
        if let Some(q) = &q_lock {
            diesel::sql_query(q).execute(c)?;
        }
        diesel::sql_query(&q_bundles).bind::<BigInt, _>(found.id).execute(c)?;
        diesel::sql_query(&q_deliveries).bind::<BigInt, _>(found.id).execute(c)?;
        diesel::sql_query(&q_in_flight).bind::<BigInt, _>(found.id).execute(c)?;
        diesel::sql_query(&q_hook).bind::<BigInt, _>(found.id).execute(c)
    })?;
    Ok(n > 0)
}
