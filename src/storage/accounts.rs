//! Queries on `accounts`. Only a hash of each TokenAccount is stored.

use diesel::prelude::*;

use super::schema::{accounts, instances};
use super::{now_millis, with_conn, write_tx, DbConn, StorageError};
use crate::domain::AccountId;

/// An account as listed by the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountRow {
    pub id: AccountId,
    pub name: String,
    pub created_at: i64,
}

/// Ensures an account with this token hash exists; returns its id.
pub fn ensure(conn: &mut DbConn, name: &str, token_hash: &str) -> Result<AccountId, StorageError> {
    if let Some(id) = find_by_token_hash(conn, token_hash)? {
        return Ok(id);
    }
    match create(conn, name, token_hash) {
        // Another process created it in between: take that one.
        Err(StorageError::Query(e)) if super::is_unique_violation(&e) => {
            find_by_token_hash(conn, token_hash)?
                .ok_or_else(|| StorageError::Corrupt("account vanished after conflict".into()))
        }
        other => other,
    }
}

/// Creates an account; a unique violation when the hash exists.
pub fn create(conn: &mut DbConn, name: &str, token_hash: &str) -> Result<AccountId, StorageError> {
    let id: i64 = write_tx!(conn, c => diesel::insert_into(accounts::table)
        .values((
            accounts::name.eq(name),
            accounts::token_hash.eq(token_hash),
            accounts::created_at.eq(now_millis()),
        ))
        .returning(accounts::id)
        .get_result(c))?;
    Ok(AccountId(id))
}

/// Every account, oldest first.
pub fn list(conn: &mut DbConn) -> Result<Vec<AccountRow>, StorageError> {
    let rows: Vec<(i64, String, i64)> = with_conn!(conn, c => accounts::table
        .select((accounts::id, accounts::name, accounts::created_at))
        .order(accounts::id)
        .load(c))?;
    Ok(rows
        .into_iter()
        .map(|(id, name, created_at)| AccountRow {
            id: AccountId(id),
            name,
            created_at,
        })
        .collect())
}

/// The account whose token hashes to `token_hash`.
pub fn find_by_token_hash(
    conn: &mut DbConn,
    token_hash: &str,
) -> Result<Option<AccountId>, StorageError> {
    let id: Option<i64> = with_conn!(conn, c => accounts::table
        .filter(accounts::token_hash.eq(token_hash))
        .select(accounts::id)
        .first(c)
        .optional())?;
    Ok(id.map(AccountId))
}

/// Whether any account or instance already uses a token with this hash.
pub fn token_hash_in_use(conn: &mut DbConn, token_hash: &str) -> Result<bool, StorageError> {
    let accounts: i64 = with_conn!(conn, c => accounts::table
        .filter(accounts::token_hash.eq(token_hash))
        .count()
        .get_result(c))?;
    let instances: i64 = with_conn!(conn, c => instances::table
        .filter(instances::token_hash.eq(token_hash))
        .count()
        .get_result(c))?;
    Ok(accounts + instances > 0)
}
