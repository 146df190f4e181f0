//! Persistent state: accounts, instances, their WebSocket settings and
//! webhooks, and webhook deliveries (pending, as rows or bundles, and dead
//! letters), on SQLite (the default, embedded) or PostgreSQL (when the URL
//! says so).
//!
//! Owns the connection pool, migrations and every query. Functions here take
//! a `&mut DbConn` and block: callers run them inside `web::block` (or on a
//! command-line thread, or the webhook workers' blocking calls), never on an
//! actor's thread.

pub mod accounts;
mod bundles;
pub mod clock;
pub mod deliveries;
pub mod instances;
pub mod pool;
pub mod schema;
pub mod webhooks;
pub mod ws_settings;

pub use pool::{connect, DbConn, DbPool};

use std::time::{SystemTime, UNIX_EPOCH};

/// Failures of the storage layer. The text is for logs only.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("database query failed: {0}")]
    Query(#[from] diesel::result::Error),
    #[error("database connection failed: {0}")]
    Connection(String),
    #[error("database pool: {0}")]
    Pool(#[from] r2d2::Error),
    #[error("storage work could not run: {0}")]
    Blocking(String),
    #[error("migrations failed: {0}")]
    Migration(String),
    #[error("stored data is invalid: {0}")]
    Corrupt(String),
}

/// Whether a diesel error is a unique-constraint violation.
pub fn is_unique_violation(e: &diesel::result::Error) -> bool {
    matches!(
        e,
        diesel::result::Error::DatabaseError(diesel::result::DatabaseErrorKind::UniqueViolation, _)
    )
}

/// Unix time in milliseconds, as stored in `*_at` columns.
pub fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// A trivial query: whether the connection still works.
pub fn ping(conn: &mut DbConn) -> Result<(), StorageError> {
    use diesel::connection::SimpleConnection;
    with_conn!(conn, c => c.batch_execute("SELECT 1")).map_err(StorageError::from)
}

/// On SQLite, whether the database file is still where it was opened: a
/// file deleted (or moved) under a running node keeps answering through its
/// open handle, and everything written to it then is lost at the restart.
pub fn file_present(conn: &mut DbConn) -> Result<(), StorageError> {
    #[derive(diesel::QueryableByName)]
    struct Database {
        #[diesel(sql_type = diesel::sql_types::Text)]
        name: String,
        #[diesel(sql_type = diesel::sql_types::Text)]
        file: String,
    }
    let DbConn::Sqlite(c) = conn else {
        return Ok(());
    };
    let databases: Vec<Database> =
        diesel::RunQueryDsl::load(diesel::sql_query("PRAGMA database_list"), c)?;
    match databases.iter().find(|d| d.name == "main") {
        Some(main) if !main.file.is_empty() && !std::path::Path::new(&main.file).exists() => Err(
            StorageError::Connection(format!("{} no longer exists", main.file)),
        ),
        _ => Ok(()),
    }
}

/// Whether the database still holds the gateway's tables (a database
/// dropped and created again empty under a running node answers [`ping`]).
pub fn schema_present(conn: &mut DbConn) -> Result<(), StorageError> {
    use diesel::connection::SimpleConnection;
    with_conn!(conn, c => c.batch_execute("SELECT 1 FROM accounts LIMIT 1"))
        .map_err(StorageError::from)
}

/// Runs `$body` with `$c` bound to the concrete connection of either backend,
/// so one query text serves both even where diesel's generic types differ.
macro_rules! with_conn {
    ($conn:expr, $c:ident => $body:expr) => {
        match $conn {
            $crate::storage::DbConn::Sqlite($c) => $body,
            $crate::storage::DbConn::Pg($c) => $body,
        }
    };
}

/// SQLite has one writer at a time. The writers of this process take turns
/// here, each woken as soon as the one before it commits, rather than in
/// SQLite's busy handler, which sleeps 1, 2, 5 … up to 100 ms between
/// tries: a publish stream committing a few thousand times a second kept
/// the delivery workers' outcomes and claims sleeping for 30–330 ms at a
/// time, and their deliveries waiting. (Write transactions never nest.)
pub static SQLITE_WRITER: parking_lot::Mutex<()> = parking_lot::Mutex::new(());

/// Runs `$body` in a write transaction on either backend: `BEGIN IMMEDIATE`
/// on SQLite (takes the write lock up front, so no "database is locked" on
/// upgrade), after this process's other writers ([`SQLITE_WRITER`]); an
/// ordinary transaction on PostgreSQL.
macro_rules! write_tx {
    ($conn:expr, $c:ident => $body:expr) => {
        match $conn {
            $crate::storage::DbConn::Sqlite(conn) => {
                let _turn = $crate::storage::SQLITE_WRITER.lock();
                conn.immediate_transaction(|$c| $body)
            }
            $crate::storage::DbConn::Pg(conn) => conn.transaction(|$c| $body),
        }
    };
}

pub(crate) use {with_conn, write_tx};

/// Runs `f` with commits that do not wait for the disk (SQLite's
/// `synchronous = NORMAL` in WAL mode, PostgreSQL's asynchronous commit):
/// they survive a crash of the process, and an operating-system crash may
/// undo the last of them, never leaving the database inconsistent. Only for
/// writes whose loss repeats work — a delivery's lease or outcome, after
/// which it is attempted again (at least once) — never for what a reply
/// acknowledges. The connection's setting is restored afterwards.
pub fn unsynced<T>(
    conn: &mut DbConn,
    f: impl FnOnce(&mut DbConn) -> Result<T, StorageError>,
) -> Result<T, StorageError> {
    use diesel::connection::SimpleConnection;
    let (relax, restore) = match conn {
        DbConn::Sqlite(_) => ("PRAGMA synchronous = NORMAL", "PRAGMA synchronous = FULL"),
        DbConn::Pg(_) => ("SET synchronous_commit = off", "RESET synchronous_commit"),
    };
    with_conn!(conn, c => c.batch_execute(relax))?;
    let out = f(conn);
    let restored = with_conn!(conn, c => c.batch_execute(restore));
    let out = out?;
    restored?;
    Ok(out)
}
