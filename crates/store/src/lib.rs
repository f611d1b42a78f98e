//! berth's persistence: SQLite (the default, in WAL mode) or PostgreSQL behind
//! one [`Store`], with the same versioned migrations for both.
//!
//! The store maps rows to plain records; it must not know HTTP or Docker.
//! Times are unix milliseconds. Secrets never reach it in clear: sessions and
//! tokens arrive hashed, passwords as PHC strings.
#![forbid(unsafe_code)]

mod adopted;
mod directory;
mod events;
mod gpus;
mod image_checks;
mod image_moves;
mod limits;
mod migrations;
mod oauth;
mod queue;
mod records;
mod servers;
mod sessions;
mod settings;
mod ssh_keys;
mod tokens;
mod usage;
mod users;

use std::path::Path;
use std::sync::Once;
use std::time::Duration;

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};

pub use adopted::AdoptedVolume;
pub use events::EventQuery;
pub use image_checks::ImageCheck;
pub use image_moves::ImageMove;
pub use limits::UserLimits;
pub use queue::QueueEntry;
pub use records::*;
pub use ssh_keys::{NewSshKey, SshKey};
pub use usage::{UsageInterval, UsageKind};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the database {url}: {source}")]
    Open { url: String, source: sqlx::Error },
    #[error("the database {url} is damaged or not a berth database: {message}")]
    Corrupt { url: String, message: String },
    #[error("the database has schema version {found}, newer than this berth ({known}); upgrade berth")]
    TooNew { found: i64, known: i64 },
    #[error("{what} already exists")]
    Conflict { what: String },
    #[error("{what} not found")]
    NotFound { what: String },
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// The one handle to the database. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
    /// Bumped by every change that can take a credential's power away
    /// (revocations, deletions, demotions), so caches of authenticated
    /// callers know to forget.
    auth_generation: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Users and servers, read from memory (see `directory.rs`).
    dir: std::sync::Arc<std::sync::RwLock<directory::Directory>>,
    /// Orders this process's directory updates by version.
    dir_writer: std::sync::Arc<tokio::sync::Mutex<()>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("backend", &self.backend).finish()
    }
}

/// Current time in unix milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

fn random_id(prefix: &str) -> String {
    // Not a secret: ids only need to be unique.
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("{prefix}{:x}{:04x}{:x}", t as u64, std::process::id() & 0xffff, n)
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(d) => {
            d.is_unique_violation() || d.message().contains("UNIQUE") || d.code().as_deref() == Some("23505")
        }
        _ => false,
    }
}

fn b(v: bool) -> i64 {
    v as i64
}

impl Store {
    /// Opens (creating if needed) the database at `url` and migrates it.
    /// `sqlite://PATH` or `postgres://...`.
    pub async fn open(url: &str) -> Result<Store> {
        Store::open_with_acquire_timeout(url, Duration::from_secs(10)).await
    }

    /// [`Store::open`] with the time a query may wait for a pooled
    /// connection. Tests on a paused clock set it beyond their deadlines:
    /// there, virtual time runs on while a query is in SQLite's thread.
    pub async fn open_with_acquire_timeout(url: &str, acquire_timeout: Duration) -> Result<Store> {
        static DRIVERS: Once = Once::new();
        DRIVERS.call_once(sqlx::any::install_default_drivers);
        let backend = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Backend::Postgres
        } else {
            Backend::Sqlite
        };
        let shown = redact_url(url);
        let connect_url = match backend {
            Backend::Sqlite if !url.contains('?') => format!("{url}?mode=rwc"),
            _ => url.to_string(),
        };
        let max = match backend {
            Backend::Sqlite => 8,
            Backend::Postgres => 16,
        };
        // One direct connection first: a pool would retry a damaged file until
        // its time-out and then report only that.
        {
            use sqlx::Connection;
            let mut probe =
                sqlx::AnyConnection::connect(&connect_url).await.map_err(|source| classify_open(&shown, source))?;
            let check = if backend == Backend::Sqlite { "SELECT COUNT(*) FROM sqlite_master" } else { "SELECT 1" };
            sqlx::query(check).execute(&mut probe).await.map_err(|e| classify_open(&shown, e))?;
            if backend == Backend::Sqlite {
                sqlx::query("PRAGMA journal_mode = WAL")
                    .execute(&mut probe)
                    .await
                    .map_err(|e| classify_open(&shown, e))?;
            }
            let _ = probe.close().await;
        }
        let pool = AnyPoolOptions::new()
            .max_connections(max)
            .min_connections(1)
            .acquire_timeout(acquire_timeout)
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        sqlx::query("PRAGMA foreign_keys = ON").execute(&mut *conn).await?;
                        sqlx::query("PRAGMA busy_timeout = 5000").execute(&mut *conn).await?;
                        sqlx::query("PRAGMA synchronous = NORMAL").execute(&mut *conn).await?;
                    }
                    Ok(())
                })
            })
            .connect(&connect_url)
            .await
            .map_err(|source| classify_open(&shown, source))?;
        let store = Store {
            pool,
            backend,
            auth_generation: Default::default(),
            dir: Default::default(),
            dir_writer: Default::default(),
        };
        store.migrate().await.map_err(|e| match e {
            StoreError::Db(source) => classify_open(&shown, source),
            other => other,
        })?;
        Ok(store)
    }

    /// Opens the default SQLite database inside a data directory.
    pub async fn open_in_dir(dir: &Path) -> Result<Store> {
        Store::open(&format!("sqlite://{}", dir.join("berth.sqlite").display())).await
    }

    /// SQLite's journal mode (`wal` once opened by berth); "" on PostgreSQL.
    pub async fn journal_mode(&self) -> Result<String> {
        if self.backend != Backend::Sqlite {
            return Ok(String::new());
        }
        let row = sqlx::query("PRAGMA journal_mode").fetch_one(&self.pool).await?;
        Ok(row.try_get::<String, _>(0)?)
    }

    /// See the field: changes whenever cached authentication may be stale.
    pub fn auth_generation(&self) -> u64 {
        self.auth_generation.load(std::sync::atomic::Ordering::Acquire)
    }

    fn auth_changed(&self) {
        self.auth_generation.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    /// Marks cached authentication stale now and again when dropped, after
    /// the write it guards: a request that read the old rows while the
    /// write ran cannot leave them cached under the newer generation.
    fn auth_changing(&self) -> AuthChange<'_> {
        self.auth_changed();
        AuthChange(self)
    }

    /// Runs `sql` (`$1` an id, `$2` a time) once per pair, in one transaction:
    /// the activity flush's batched last-seen updates.
    pub(crate) async fn update_each(&self, sql: &str, seen: &[(String, i64)]) -> Result<()> {
        if seen.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        for (id, at) in seen {
            sqlx::query(sql).bind(id).bind(*at).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

fn redact_url(url: &str) -> String {
    // postgres://user:password@host/db -> postgres://user:***@host/db
    if let Some((scheme, rest)) = url.split_once("://") {
        if let Some((cred, host)) = rest.split_once('@') {
            if let Some((user, _)) = cred.split_once(':') {
                return format!("{scheme}://{user}:***@{host}");
            }
        }
    }
    url.to_string()
}

fn classify_open(url: &str, source: sqlx::Error) -> StoreError {
    let msg = source.to_string();
    if msg.contains("not a database") || msg.contains("malformed") || msg.contains("corrupt") {
        StoreError::Corrupt { url: url.to_string(), message: msg }
    } else {
        StoreError::Open { url: url.to_string(), source }
    }
}

pub(crate) fn get_bool(r: &AnyRow, col: &str) -> Result<bool> {
    Ok(r.try_get::<i64, _>(col)? != 0)
}

/// See [`Store::auth_changing`].
struct AuthChange<'a>(&'a Store);

impl Drop for AuthChange<'_> {
    fn drop(&mut self) {
        self.0.auth_changed();
    }
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn urls_are_redacted() {
        assert_eq!(redact_url("postgres://u:secret@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact_url("sqlite:///x/y.sqlite"), "sqlite:///x/y.sqlite");
    }
}
