//! The connection pool: a connection manager that picks the backend from the
//! URL scheme (so a down PostgreSQL reports its real error at once), SQLite
//! pragmas on every connection, and the embedded migrations of both backends.

use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::pg::PgConnection;
use diesel::sqlite::SqliteConnection;
use diesel::Connection;
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};

use super::StorageError;

const SQLITE_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/sqlite");
const POSTGRES_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/postgres");

/// Most SQLite connections pooled: writes serialise on one lock anyway.
const SQLITE_MAX_POOL: u32 = 4;

/// Milliseconds a SQLite writer waits for the lock before failing.
const SQLITE_BUSY_TIMEOUT_MS: u32 = 10_000;

/// One connection to either backend.
pub enum DbConn {
    Pg(PgConnection),
    Sqlite(SqliteConnection),
}

impl DbConn {
    /// Whether this is a PostgreSQL connection.
    pub fn is_pg(&self) -> bool {
        matches!(self, DbConn::Pg(_))
    }
}

/// Which backend a URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

impl Backend {
    /// `postgres://` and `postgresql://` are PostgreSQL; anything else is a SQLite path or URL.
    pub fn of(url: &str) -> Backend {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Backend::Postgres
        } else {
            Backend::Sqlite
        }
    }
}

/// Opens connections for r2d2, choosing the backend by URL scheme.
#[derive(Debug, Clone)]
pub struct DbManager {
    url: String,
    backend: Backend,
}

impl DbManager {
    pub fn new(url: &str) -> Self {
        let backend = Backend::of(url);
        let url = match backend {
            Backend::Postgres => url.to_string(),
            Backend::Sqlite => url.strip_prefix("sqlite://").unwrap_or(url).to_string(),
        };
        Self { url, backend }
    }
}

impl r2d2::ManageConnection for DbManager {
    type Connection = DbConn;
    type Error = StorageError;

    fn connect(&self) -> Result<DbConn, StorageError> {
        match self.backend {
            Backend::Postgres => {
                let mut conn = PgConnection::establish(&self.url)
                    .map_err(|e| StorageError::Connection(e.to_string()))?;
                // No JIT: its compilation takes hundreds of milliseconds, and
                // a claim whose row estimate passes `jit_above_cost` (the
                // LIMITs are per webhook) paid it on every run.
                conn.batch_execute("SET jit = off")
                    .map_err(|e| StorageError::Connection(e.to_string()))?;
                Ok(DbConn::Pg(conn))
            }
            Backend::Sqlite => {
                let mut conn = SqliteConnection::establish(&self.url)
                    .map_err(|e| StorageError::Connection(e.to_string()))?;
                // One statement each, busy_timeout first: the WAL switch itself may wait.
                // Temporary storage in memory: a multi-row `INSERT` keeps the
                // pages it changes in a statement journal, which past 64 KiB
                // went to a temporary file (11% of the intake's store,
                // `benches/intake.rs`); it is never needed after a crash.
                for pragma in [
                    format!("PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS};"),
                    "PRAGMA journal_mode = WAL;".to_string(),
                    "PRAGMA synchronous = FULL;".to_string(),
                    "PRAGMA foreign_keys = ON;".to_string(),
                    "PRAGMA temp_store = MEMORY;".to_string(),
                ] {
                    conn.batch_execute(&pragma)
                        .map_err(|e| StorageError::Connection(e.to_string()))?;
                }
                Ok(DbConn::Sqlite(conn))
            }
        }
    }

    fn is_valid(&self, conn: &mut DbConn) -> Result<(), StorageError> {
        super::with_conn!(conn, c => c.batch_execute("SELECT 1").map_err(StorageError::from))
    }

    fn has_broken(&self, _conn: &mut DbConn) -> bool {
        false
    }
}

/// The shared pool of connections.
pub type DbPool = r2d2::Pool<DbManager>;

/// Opens one connection, creating the SQLite file's directory when needed,
/// and applies pending migrations. Errors are the backend's own (r2d2 would
/// only report a timeout, hiding the cause).
pub fn open_one(url: &str) -> Result<DbConn, StorageError> {
    let manager = DbManager::new(url);
    open_with(&manager)
}

fn open_with(manager: &DbManager) -> Result<DbConn, StorageError> {
    if manager.backend == Backend::Sqlite {
        if let Some(dir) = std::path::Path::new(&manager.url).parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir).map_err(|e| {
                    StorageError::Connection(format!("cannot create {}: {e}", dir.display()))
                })?;
            }
        }
    }
    let mut conn = r2d2::ManageConnection::connect(manager)?;
    run_migrations(&mut conn)?;
    Ok(conn)
}

/// Opens the pool, failing at once with the real error when the database
/// cannot be reached, after applying pending migrations.
pub fn connect(url: &str, pool_size: u32, timeout: Duration) -> Result<DbPool, StorageError> {
    let manager = DbManager::new(url);
    drop(open_with(&manager)?);
    let size = match manager.backend {
        Backend::Sqlite => pool_size.min(SQLITE_MAX_POOL),
        Backend::Postgres => pool_size,
    };
    Ok(r2d2::Pool::builder()
        .max_size(size)
        .min_idle(Some(1))
        .connection_timeout(timeout)
        .build(manager)?)
}

/// Key of the PostgreSQL advisory lock that serialises migrations between
/// nodes starting together on one database (any fixed number will do).
const MIGRATION_LOCK: i64 = 0x6576_656e_7467_6174; // "eventgat"

/// Applies every pending migration of the connection's backend. On
/// PostgreSQL, nodes starting at once take turns under an advisory lock
/// (released with the session if the process dies), so the second finds the
/// first's work done instead of racing it.
pub fn run_migrations(conn: &mut DbConn) -> Result<usize, StorageError> {
    let applied = match conn {
        DbConn::Sqlite(c) => c.run_pending_migrations(SQLITE_MIGRATIONS).map(|v| v.len()),
        DbConn::Pg(c) => {
            c.batch_execute(&format!("SELECT pg_advisory_lock({MIGRATION_LOCK})"))?;
            let applied = c
                .run_pending_migrations(POSTGRES_MIGRATIONS)
                .map(|v| v.len());
            c.batch_execute(&format!("SELECT pg_advisory_unlock({MIGRATION_LOCK})"))?;
            applied
        }
    };
    applied.map_err(|e| StorageError::Migration(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use diesel::migration::{MigrationConnection, MigrationSource};
    use diesel::sqlite::Sqlite;
    use diesel::RunQueryDsl;

    /// The migration that keeps what holds back an `ordered` webhook gives
    /// every webhook already ordered the end of its deliveries' leases.
    #[test]
    fn webhooks_already_ordered_wait_for_their_leased_deliveries() {
        let dir = tempfile::tempdir().unwrap();
        let url = dir.path().join("m.db").display().to_string();
        let mut c = SqliteConnection::establish(&url).unwrap();
        c.setup().unwrap();
        let all = MigrationSource::<Sqlite>::migrations(&SQLITE_MIGRATIONS).unwrap();
        let before = all
            .iter()
            .position(|m| m.name().to_string().starts_with("2026-12-07-000003"))
            .unwrap();
        for m in &all[..before] {
            c.run_migration(m.as_ref()).unwrap();
        }
        c.batch_execute(
            "INSERT INTO accounts (id, name, token_hash, created_at) VALUES (1, 'a', 'h', 0);
             INSERT INTO instances (id, account_id, name, token, token_hash, created_at)
                 VALUES (1, 1, 'i', 't', 'th', 0);
             INSERT INTO webhooks (id, instance_id, label, enabled, url, by_events, events,
                 media_base64, ordered, secret, created_at, updated_at)
                 VALUES (1, 1, 'o', 1, 'http://x', 0, '[]', 0, 1, 's', 0, 0),
                        (2, 1, 'p', 1, 'http://x', 0, '[]', 0, 0, 's', 0, 0),
                        (3, 1, 'q', 1, 'http://x', 0, '[]', 0, 1, 's', 0, 0);
             INSERT INTO webhook_deliveries (id, webhook_id, event, data, created_at,
                 attempts, next_attempt_at, lease_until)
                 VALUES ('msg_1', 1, 'call.update', '{}', 0, 1, 0, 9000),
                        ('msg_2', 1, 'call.update', '{}', 0, 0, 0, 0),
                        ('msg_3', 2, 'call.update', '{}', 0, 1, 0, 7000);",
        )
        .unwrap();
        c.run_pending_migrations(SQLITE_MIGRATIONS).unwrap();
        #[derive(diesel::QueryableByName, Debug, PartialEq)]
        struct Held {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            webhook_id: i64,
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            seq: i64,
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            until: i64,
        }
        let stored: Vec<Held> = diesel::sql_query(
            "SELECT webhook_id, seq, until FROM webhook_in_flight ORDER BY webhook_id",
        )
        .load(&mut c)
        .unwrap();
        let held = |webhook_id, until| Held {
            webhook_id,
            seq: 0,
            until,
        };
        assert_eq!(stored, [held(1, 9_000), held(3, 0)]);
    }
}
