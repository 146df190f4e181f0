//! Queries on `instances` (with their WebSocket configuration joined in).
//! A TokenInstance is stored as given (it is shown to the account and put in
//! envelopes) together with its hash, which is what lookups use.

use diesel::prelude::*;

use super::schema::{accounts, instances, ws_settings};
use super::webhooks::{
    self, hook_locks, id_list, insert_webhook, HookId, NewConfig, WebhookRow, LOCK_INSTANCE,
};
use super::ws_settings::{decode, encode_events, ConfigRow};
use super::{is_unique_violation, now_millis, with_conn, write_tx, DbConn, StorageError};
use crate::domain::{AccountId, InstanceId, InstanceName, VersionedConfig, WsConfig};

/// An instance with its configuration (if any).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceRecord {
    pub id: InstanceId,
    pub account: AccountId,
    pub name: String,
    /// The TokenInstance itself.
    pub token: String,
    pub config: Option<VersionedConfig>,
}

/// Why an instance could not be created.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    #[error("an instance of that name exists in the account")]
    NameTaken,
    #[error("the token is already in use")]
    TokenTaken,
    #[error(transparent)]
    Storage(#[from] StorageError),
}

type InstanceRow = (
    i64,
    i64,
    String,
    String,
    Option<bool>,
    Option<String>,
    Option<bool>,
    Option<i64>,
);

fn record(row: InstanceRow) -> Result<InstanceRecord, StorageError> {
    let (id, account, name, token, enabled, events, media, version) = row;
    let config = match (enabled, events, media, version) {
        (Some(e), Some(ev), Some(m), Some(v)) => Some(decode((e, ev, m, v))?),
        _ => None,
    };
    Ok(InstanceRecord {
        id: InstanceId(id),
        account: AccountId(account),
        name,
        token,
        config,
    })
}

/// Loads instances matching `$filter`, oldest first, configuration joined in.
macro_rules! load_instances {
    ($conn:expr, $filter:expr) => {{
        let rows: Vec<InstanceRow> = with_conn!($conn, c => instances::table
            .left_join(ws_settings::table)
            .filter($filter)
            .select((
                instances::id,
                instances::account_id,
                instances::name,
                instances::token,
                ws_settings::enabled.nullable(),
                ws_settings::events.nullable(),
                ws_settings::media_base64.nullable(),
                ws_settings::version.nullable(),
            ))
            .order(instances::id)
            .load(c))?;
        rows.into_iter().map(record).collect::<Result<Vec<_>, StorageError>>()
    }};
}

/// Every instance of the account, in creation order.
pub fn list(conn: &mut DbConn, account: AccountId) -> Result<Vec<InstanceRecord>, StorageError> {
    load_instances!(conn, instances::account_id.eq(account.0))
}

/// Every instance of every account (command line).
pub fn list_all(conn: &mut DbConn) -> Result<Vec<InstanceRecord>, StorageError> {
    load_instances!(conn, instances::id.ge(0_i64))
}

/// The account's instance of that name.
pub fn find(
    conn: &mut DbConn,
    account: AccountId,
    name: &str,
) -> Result<Option<InstanceRecord>, StorageError> {
    let found = load_instances!(
        conn,
        instances::account_id
            .eq(account.0)
            .and(instances::name.eq(name))
    )?;
    Ok(found.into_iter().next())
}

/// The instance with this id (any account).
pub fn find_by_id(
    conn: &mut DbConn,
    id: InstanceId,
) -> Result<Option<InstanceRecord>, StorageError> {
    let found = load_instances!(conn, instances::id.eq(id.0))?;
    Ok(found.into_iter().next())
}

/// The instance whose TokenInstance hashes to `token_hash`.
pub fn find_by_token_hash(
    conn: &mut DbConn,
    token_hash: &str,
) -> Result<Option<InstanceRecord>, StorageError> {
    let found = load_instances!(conn, instances::token_hash.eq(token_hash))?;
    Ok(found.into_iter().next())
}

/// Creates an instance and, when given, its WebSocket configuration and its
/// first webhook (a new label: no other webhook of it exists yet), in one
/// transaction: all of it is stored, or nothing. Returns the webhook as
/// stored, read in that transaction.
pub fn create(
    conn: &mut DbConn,
    account: AccountId,
    name: &InstanceName,
    token: &str,
    token_hash: &str,
    config: Option<&WsConfig>,
    webhook: Option<&NewConfig>,
) -> Result<(InstanceRecord, Option<WebhookRow>), CreateError> {
    let now = now_millis();
    let events = config.map(|c| encode_events(&c.events));
    let webhook = webhook.map(|new| {
        (
            new,
            webhooks::dialect(conn, webhooks::INSERT),
            encode_events(&new.events),
            webhooks::one_by_label(conn),
        )
    });
    type Created = (i64, Option<ConfigRow>, Option<WebhookRow>);
    let outcome: Result<Result<Created, CreateError>, diesel::result::Error> = write_tx!(conn, c => {
        let name_taken: i64 = instances::table
            .filter(instances::account_id.eq(account.0))
            .filter(instances::name.eq(name.as_str()))
            .count()
            .get_result(c)?;
        if name_taken > 0 {
            return Ok(Err(CreateError::NameTaken));
        }
        let token_taken: i64 = instances::table
            .filter(instances::token_hash.eq(token_hash))
            .count()
            .get_result(c)?;
        let account_taken: i64 = accounts::table
            .filter(accounts::token_hash.eq(token_hash))
            .count()
            .get_result(c)?;
        if token_taken + account_taken > 0 {
            return Ok(Err(CreateError::TokenTaken));
        }
        let id: i64 = diesel::insert_into(instances::table)
            .values((
                instances::account_id.eq(account.0),
                instances::name.eq(name.as_str()),
                instances::token.eq(token),
                instances::token_hash.eq(token_hash),
                instances::created_at.eq(now),
            ))
            .returning(instances::id)
            .get_result(c)?;
        let row = match (config, &events) {
            (Some(cfg), Some(events)) => Some(
                diesel::insert_into(ws_settings::table)
                    .values((
                        ws_settings::instance_id.eq(id),
                        ws_settings::enabled.eq(cfg.enabled),
                        ws_settings::events.eq(events),
                        ws_settings::media_base64.eq(cfg.media_base64),
                        ws_settings::version.eq(1_i64),
                        ws_settings::updated_at.eq(now),
                    ))
                    .returning((
                        ws_settings::enabled,
                        ws_settings::events,
                        ws_settings::media_base64,
                        ws_settings::version,
                    ))
                    .get_result::<ConfigRow>(c)?,
            ),
            _ => None,
        };
        let hook = match &webhook {
            Some((new, q, events, q_row)) => {
                insert_webhook!(c, q, id, new, events, now)?;
                diesel::sql_query(q_row)
                    .bind::<diesel::sql_types::BigInt, _>(id)
                    .bind::<diesel::sql_types::Text, _>(&new.label)
                    .load::<WebhookRow>(c)?
                    .into_iter()
                    .next()
            }
            None => None,
        };
        Ok(Ok((id, row, hook)))
    });
    let (id, row, hook) = match outcome {
        Ok(result) => result?,
        // A concurrent creation on PostgreSQL won the race between check and insert.
        Err(e) if is_unique_violation(&e) => {
            let taken = find(conn, account, name.as_str())?.is_some();
            return Err(if taken {
                CreateError::NameTaken
            } else {
                CreateError::TokenTaken
            });
        }
        Err(e) => return Err(StorageError::from(e).into()),
    };
    let record = InstanceRecord {
        id: InstanceId(id),
        account,
        name: name.as_str().to_string(),
        token: token.to_string(),
        config: row.map(decode).transpose()?,
    };
    Ok((record, hook))
}

/// Deletes the account's instance of that name (its configuration goes with
/// it); returns what was deleted.
pub fn delete(
    conn: &mut DbConn,
    account: AccountId,
    name: &str,
) -> Result<Option<InstanceRecord>, StorageError> {
    let Some(found) = find(conn, account, name)? else {
        return Ok(None);
    };
    // Its webhooks, locked as `webhooks::delete` locks one, then their
    // deliveries (no foreign key cascades to those on PostgreSQL). The
    // instance's row first: a webhook set meanwhile (`webhooks::upsert`
    // locks it too) comes before or after all of this.
    let pg = conn.is_pg();
    let q_hooks = format!("SELECT id FROM webhooks WHERE instance_id = {}", found.id.0);
    let deleted: usize = write_tx!(conn, c => {
        if pg {
            diesel::sql_query(LOCK_INSTANCE)
                .bind::<diesel::sql_types::BigInt, _>(found.id.0)
                .execute(c)?;
        }
        let hooks = HookId::ids(diesel::sql_query(&q_hooks).load::<HookId>(c)?);
        if let Some(q) = hook_locks(pg, &hooks, false) {
            diesel::sql_query(q).execute(c)?;
        }
        let ids = id_list(&hooks);
        diesel::sql_query(format!("DELETE FROM webhook_bundles WHERE webhook_id IN ({ids})"))
            .execute(c)?;
        diesel::sql_query(format!("DELETE FROM webhook_deliveries WHERE webhook_id IN ({ids})"))
            .execute(c)?;
        diesel::sql_query(format!("DELETE FROM webhook_in_flight WHERE webhook_id IN ({ids})"))
            .execute(c)?;
        diesel::delete(ws_settings::table.filter(ws_settings::instance_id.eq(found.id.0)))
            .execute(c)?;
        diesel::delete(instances::table.filter(instances::id.eq(found.id.0))).execute(c)
    })?;
    Ok((deleted > 0).then_some(found))
}
