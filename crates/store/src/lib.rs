//! berth's persistence: SQLite (the default, in WAL mode) or PostgreSQL behind
//! one [`Store`], with the same versioned migrations for both.
//!
//! The store maps rows to plain records; it must not know HTTP or Docker.
//! Times are unix milliseconds. Secrets never reach it in clear: sessions and
//! tokens arrive hashed, passwords as PHC strings.
#![forbid(unsafe_code)]

mod directory;
mod migrations;
mod records;
mod ssh_keys;

use std::path::Path;
use std::sync::Once;
use std::time::Duration;

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};

pub use records::*;
pub use ssh_keys::{NewSshKey, SshKey, UserLimits};

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
            .acquire_timeout(Duration::from_secs(10))
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

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    async fn migrate(&self) -> Result<()> {
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, description TEXT NOT NULL, applied BIGINT NOT NULL)",
        )
        .execute(&self.pool)
        .await?;
        let current: Option<i64> = sqlx::query("SELECT MAX(version) AS v FROM schema_migrations")
            .fetch_one(&self.pool)
            .await?
            .try_get::<Option<i64>, _>("v")?;
        let current = current.unwrap_or(0);
        let known = migrations::MIGRATIONS.last().map(|m| m.0).unwrap_or(0);
        if current > known {
            return Err(StoreError::TooNew { found: current, known });
        }
        for (version, description, sql) in migrations::MIGRATIONS.iter().filter(|m| m.0 > current) {
            let mut tx = self.pool.begin().await?;
            for stmt in sql.split(';').map(str::trim).filter(|s| !s.is_empty()) {
                sqlx::query(stmt).execute(&mut *tx).await?;
            }
            sqlx::query("INSERT INTO schema_migrations (version, description, applied) VALUES ($1, $2, $3)")
                .bind(*version)
                .bind(*description)
                .bind(now_ms())
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            tracing::info!(version, description, "applied database migration");
        }
        Ok(())
    }

    pub async fn schema_version(&self) -> Result<i64> {
        let v: Option<i64> =
            sqlx::query("SELECT MAX(version) AS v FROM schema_migrations").fetch_one(&self.pool).await?.try_get("v")?;
        Ok(v.unwrap_or(0))
    }

    // ---------------------------------------------------------------- users

    pub async fn create_user(&self, u: &NewUser) -> Result<User> {
        let now = now_ms();
        let res = sqlx::query(
            "INSERT INTO users (name, admin, authorized, password_hash, created) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&u.name)
        .bind(b(u.admin))
        .bind(b(u.authorized))
        .bind(u.password_hash.clone())
        .bind(now)
        .execute(&self.pool)
        .await;
        match res {
            Ok(_) => {}
            Err(e) if is_unique_violation(&e) => return Err(StoreError::Conflict { what: format!("user {}", u.name) }),
            Err(e) => return Err(e.into()),
        }
        self.directory_changed(&[u.name.as_str()]).await?;
        self.get_user(&u.name).await?.ok_or_else(|| StoreError::NotFound { what: format!("user {}", u.name) })
    }

    /// The user as the database has it now, bypassing the in-memory
    /// directory (for log-in, where another process may just have lifted a
    /// lock-out or changed the password).
    pub async fn get_user_uncached(&self, name: &str) -> Result<Option<User>> {
        self.get_user_db(name).await
    }

    pub(crate) async fn get_user_db(&self, name: &str) -> Result<Option<User>> {
        let row = sqlx::query(&format!("SELECT {USER_COLS} FROM users WHERE name = $1"))
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| User::from_row(&r)).transpose()
    }

    pub async fn set_authorized(&self, name: &str, authorized: bool) -> Result<()> {
        self.auth_changed();
        self.update_one("UPDATE users SET authorized = $2 WHERE name = $1", name, b(authorized)).await
    }

    pub async fn set_admin(&self, name: &str, admin: bool) -> Result<()> {
        self.auth_changed();
        self.update_one("UPDATE users SET admin = $2 WHERE name = $1", name, b(admin)).await
    }

    async fn update_one(&self, sql: &str, name: &str, v: i64) -> Result<()> {
        let r = sqlx::query(sql).bind(name).bind(v).execute(&self.pool).await?;
        if r.rows_affected() == 0 {
            return Err(StoreError::NotFound { what: format!("user {name}") });
        }
        self.directory_changed(&[name]).await?;
        Ok(())
    }

    /// Sets a new password hash, clears the lock-out, and revokes every
    /// session of the user but `keep_session` (the one that changed it).
    pub async fn set_password(&self, name: &str, hash: &str, keep_session: Option<&str>) -> Result<()> {
        self.auth_changed();
        let mut tx = self.pool.begin().await?;
        let r =
            sqlx::query("UPDATE users SET password_hash = $2, failed_logins = 0, locked_until = NULL WHERE name = $1")
                .bind(name)
                .bind(hash)
                .execute(&mut *tx)
                .await?;
        if r.rows_affected() == 0 {
            return Err(StoreError::NotFound { what: format!("user {name}") });
        }
        sqlx::query("UPDATE sessions SET revoked = 1 WHERE user_name = $1 AND id_hash <> $2")
            .bind(name)
            .bind(keep_session.unwrap_or(""))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        self.directory_changed(&[name]).await?;
        Ok(())
    }

    /// Replaces the hash without touching sessions (re-hashing an imported
    /// bcrypt hash at log-in).
    pub async fn rehash_password(&self, name: &str, hash: &str) -> Result<()> {
        sqlx::query("UPDATE users SET password_hash = $2 WHERE name = $1")
            .bind(name)
            .bind(hash)
            .execute(&self.pool)
            .await?;
        self.directory_changed(&[name]).await?;
        Ok(())
    }

    pub async fn record_login_failure(
        &self,
        name: &str,
        failed: i64,
        at: i64,
        locked_until: Option<i64>,
    ) -> Result<()> {
        sqlx::query("UPDATE users SET failed_logins = $2, last_failed_login = $3, locked_until = $4 WHERE name = $1")
            .bind(name)
            .bind(failed)
            .bind(at)
            .bind(locked_until)
            .execute(&self.pool)
            .await?;
        self.directory_changed(&[name]).await?;
        Ok(())
    }

    pub async fn record_login_success(&self, name: &str, at: i64) -> Result<()> {
        sqlx::query(
            "UPDATE users SET failed_logins = 0, locked_until = NULL, last_failed_login = NULL, \
             last_activity = CASE WHEN last_activity IS NULL OR last_activity < $2 THEN $2 ELSE last_activity END \
             WHERE name = $1",
        )
        .bind(name)
        .bind(at)
        .execute(&self.pool)
        .await?;
        self.directory_changed(&[name]).await?;
        Ok(())
    }

    pub async fn touch_user_activity(&self, name: &str, at: i64) -> Result<()> {
        sqlx::query(
            "UPDATE users SET last_activity = $2 WHERE name = $1 AND (last_activity IS NULL OR last_activity < $2)",
        )
        .bind(name)
        .bind(at)
        .execute(&self.pool)
        .await?;
        self.directory_changed(&[name]).await?;
        Ok(())
    }

    pub async fn rename_user(&self, old: &str, new: &str) -> Result<()> {
        self.auth_changed();
        let r = sqlx::query("UPDATE users SET name = $2 WHERE name = $1").bind(old).bind(new).execute(&self.pool).await;
        match r {
            Ok(r) if r.rows_affected() == 0 => Err(StoreError::NotFound { what: format!("user {old}") }),
            Ok(_) => self.directory_changed(&[old, new]).await,
            Err(e) if is_unique_violation(&e) => Err(StoreError::Conflict { what: format!("user {new}") }),
            Err(e) => Err(e.into()),
        }
    }

    /// Deletes the user; sessions, tokens, servers and OAuth rows go with it.
    pub async fn delete_user(&self, name: &str) -> Result<()> {
        self.auth_changed();
        let r = sqlx::query("DELETE FROM users WHERE name = $1").bind(name).execute(&self.pool).await?;
        if r.rows_affected() == 0 {
            return Err(StoreError::NotFound { what: format!("user {name}") });
        }
        self.directory_changed(&[name]).await
    }

    // ------------------------------------------------------------- sessions

    pub async fn create_session(&self, id_hash: &str, public_id: &str, user: &str) -> Result<()> {
        let now = now_ms();
        sqlx::query(
            "INSERT INTO sessions (id_hash, public_id, user_name, created, last_seen) VALUES ($1, $2, $3, $4, $4)",
        )
        .bind(id_hash)
        .bind(public_id)
        .bind(user)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// A live (not revoked) session with its user.
    pub async fn get_session(&self, id_hash: &str) -> Result<Option<(Session, User)>> {
        let row = sqlx::query(&format!(
            "SELECT s.id_hash, s.public_id, s.user_name, s.created AS s_created, s.last_seen, {USER_COLS_U} \
             FROM sessions s JOIN users u ON u.name = s.user_name WHERE s.id_hash = $1 AND s.revoked = 0"
        ))
        .bind(id_hash)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            None => Ok(None),
            Some(r) => Ok(Some((
                Session {
                    id_hash: r.try_get("id_hash")?,
                    public_id: r.try_get("public_id")?,
                    user: r.try_get("user_name")?,
                    created: r.try_get("s_created")?,
                    last_seen: r.try_get("last_seen")?,
                },
                User::from_row_p(&r, "u_")?,
            ))),
        }
    }

    pub async fn touch_sessions(&self, seen: &[(String, i64)]) -> Result<()> {
        if seen.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        for (id, at) in seen {
            sqlx::query("UPDATE sessions SET last_seen = $2 WHERE id_hash = $1 AND last_seen < $2")
                .bind(id)
                .bind(*at)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn revoke_session(&self, id_hash: &str) -> Result<()> {
        self.auth_changed();
        sqlx::query("UPDATE sessions SET revoked = 1 WHERE id_hash = $1").bind(id_hash).execute(&self.pool).await?;
        Ok(())
    }

    pub async fn revoke_user_sessions(&self, user: &str) -> Result<()> {
        self.auth_changed();
        sqlx::query("UPDATE sessions SET revoked = 1 WHERE user_name = $1").bind(user).execute(&self.pool).await?;
        Ok(())
    }

    // --------------------------------------------------------------- tokens

    pub async fn create_token(&self, t: &NewToken) -> Result<Token> {
        let id = random_id("a");
        let now = now_ms();
        sqlx::query(
            "INSERT INTO tokens (id, hash, user_name, kind, server_name, scopes, note, created, expires_at, session_id, oauth_client) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        )
        .bind(&id)
        .bind(&t.hash)
        .bind(&t.user)
        .bind(t.kind.as_str())
        .bind(t.server.clone())
        .bind(serde_json::to_string(&t.scopes).unwrap_or_else(|_| "[]".into()))
        .bind(&t.note)
        .bind(now)
        .bind(t.expires_at)
        .bind(t.session_id.clone())
        .bind(t.oauth_client.clone())
        .execute(&self.pool)
        .await?;
        self.get_token(&t.user, &id).await?.ok_or_else(|| StoreError::NotFound { what: format!("token {id}") })
    }

    pub async fn get_token(&self, user: &str, id: &str) -> Result<Option<Token>> {
        let row = sqlx::query(&format!("SELECT {TOKEN_COLS} FROM tokens t WHERE t.user_name = $1 AND t.id = $2"))
            .bind(user)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| Token::from_row(&r)).transpose()
    }

    pub async fn find_token(&self, hash: &str) -> Result<Option<(Token, User)>> {
        let row = sqlx::query(&format!(
            "SELECT {TOKEN_COLS}, {USER_COLS_U} FROM tokens t JOIN users u ON u.name = t.user_name WHERE t.hash = $1"
        ))
        .bind(hash)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            None => Ok(None),
            Some(r) => Ok(Some((Token::from_row(&r)?, User::from_row_p(&r, "u_")?))),
        }
    }

    pub async fn list_tokens(&self, user: &str) -> Result<Vec<Token>> {
        let rows = sqlx::query(&format!(
            "SELECT {TOKEN_COLS} FROM tokens t WHERE t.user_name = $1 AND t.kind = 'api_token' ORDER BY t.created"
        ))
        .bind(user)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(Token::from_row).collect()
    }

    pub async fn delete_token(&self, user: &str, id: &str) -> Result<()> {
        self.auth_changed();
        let r = sqlx::query("DELETE FROM tokens WHERE user_name = $1 AND id = $2")
            .bind(user)
            .bind(id)
            .execute(&self.pool)
            .await?;
        if r.rows_affected() == 0 {
            return Err(StoreError::NotFound { what: format!("token {id}") });
        }
        Ok(())
    }

    /// Deletes the tokens a server held (its own API token and the OAuth
    /// access tokens issued to its client).
    pub async fn delete_server_tokens(&self, user: &str, server: &str, client_id: &str) -> Result<()> {
        self.auth_changed();
        sqlx::query(
            "DELETE FROM tokens WHERE user_name = $1 AND ((kind = 'server' AND server_name = $2) OR oauth_client = $3)",
        )
        .bind(user)
        .bind(server)
        .bind(client_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn delete_expired_tokens(&self, now: i64) -> Result<u64> {
        self.auth_changed();
        let r = sqlx::query("DELETE FROM tokens WHERE expires_at IS NOT NULL AND expires_at < $1")
            .bind(now)
            .execute(&self.pool)
            .await?;
        sqlx::query("DELETE FROM oauth_codes WHERE expires_at < $1").bind(now).execute(&self.pool).await?;
        Ok(r.rows_affected())
    }

    pub async fn touch_tokens(&self, seen: &[(String, i64)]) -> Result<()> {
        if seen.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        for (id, at) in seen {
            sqlx::query("UPDATE tokens SET last_activity = $2 WHERE id = $1")
                .bind(id)
                .bind(*at)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    // -------------------------------------------------------------- servers

    pub(crate) async fn list_servers_db(&self, user: Option<&str>) -> Result<Vec<Server>> {
        let rows = match user {
            Some(u) => {
                sqlx::query(&format!("SELECT {SERVER_COLS} FROM servers WHERE user_name = $1 ORDER BY name"))
                    .bind(u)
                    .fetch_all(&self.pool)
                    .await?
            }
            None => {
                sqlx::query(&format!("SELECT {SERVER_COLS} FROM servers ORDER BY user_name, name"))
                    .fetch_all(&self.pool)
                    .await?
            }
        };
        rows.iter().map(Server::from_row).collect()
    }

    /// Writes the whole server record (insert or update).
    pub async fn put_server(&self, s: &Server) -> Result<()> {
        sqlx::query(
            "INSERT INTO servers (user_name, name, template, state, last_error, spawner_state, url, started, last_activity, user_options) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
             ON CONFLICT (user_name, name) DO UPDATE SET template = $3, state = $4, last_error = $5, spawner_state = $6, \
             url = $7, started = $8, last_activity = $9, user_options = $10",
        )
        .bind(&s.user)
        .bind(&s.name)
        .bind(&s.template)
        .bind(s.state.as_str())
        .bind(s.last_error.clone())
        .bind(&s.spawner_state)
        .bind(s.url.clone())
        .bind(s.started)
        .bind(s.last_activity)
        .bind(&s.user_options)
        .execute(&self.pool)
        .await?;
        self.directory_changed(&[&s.user]).await?;
        Ok(())
    }

    pub async fn delete_server(&self, user: &str, name: &str) -> Result<()> {
        sqlx::query("DELETE FROM servers WHERE user_name = $1 AND name = $2")
            .bind(user)
            .bind(name)
            .execute(&self.pool)
            .await?;
        self.directory_changed(&[user]).await?;
        Ok(())
    }

    /// Moves servers' `last_activity` forward (never back).
    pub async fn touch_servers(&self, seen: &[(String, String, i64)]) -> Result<()> {
        if seen.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        for (user, name, at) in seen {
            sqlx::query(
                "UPDATE servers SET last_activity = $3 WHERE user_name = $1 AND name = $2 AND (last_activity IS NULL OR last_activity < $3)",
            )
            .bind(user)
            .bind(name)
            .bind(*at)
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "UPDATE users SET last_activity = $2 WHERE name = $1 AND (last_activity IS NULL OR last_activity < $2)",
            )
            .bind(user)
            .bind(*at)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        let names: Vec<&str> = seen.iter().map(|(u, _, _)| u.as_str()).collect();
        self.directory_changed(&names).await?;
        Ok(())
    }

    // ----------------------------------------------------------------- gpus

    /// Every allocation: (device id, user, server).
    pub async fn gpu_allocations(&self) -> Result<Vec<(String, String, String)>> {
        let rows = sqlx::query(
            "SELECT device_id, user_name, server_name FROM gpu_allocations ORDER BY device_id, user_name, server_name",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| Ok((r.try_get("device_id")?, r.try_get("user_name")?, r.try_get("server_name")?))).collect()
    }

    pub async fn add_gpu_allocations(&self, user: &str, server: &str, devices: &[String]) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        for d in devices {
            sqlx::query("INSERT INTO gpu_allocations (device_id, user_name, server_name, at) VALUES ($1, $2, $3, $4)")
                .bind(d)
                .bind(user)
                .bind(server)
                .bind(now_ms())
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Frees what a server holds; returns how many devices.
    pub async fn free_gpus(&self, user: &str, server: &str) -> Result<u64> {
        let r = sqlx::query("DELETE FROM gpu_allocations WHERE user_name = $1 AND server_name = $2")
            .bind(user)
            .bind(server)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected())
    }

    pub async fn shared_gpus(&self) -> Result<Vec<String>> {
        let rows = sqlx::query("SELECT device_id FROM gpu_shared ORDER BY device_id").fetch_all(&self.pool).await?;
        rows.iter().map(|r| Ok(r.try_get("device_id")?)).collect()
    }

    pub async fn set_gpu_shared(&self, device: &str, shared: bool) -> Result<()> {
        if shared {
            sqlx::query("INSERT INTO gpu_shared (device_id) VALUES ($1) ON CONFLICT (device_id) DO NOTHING")
                .bind(device)
                .execute(&self.pool)
                .await?;
        } else {
            sqlx::query("DELETE FROM gpu_shared WHERE device_id = $1").bind(device).execute(&self.pool).await?;
        }
        Ok(())
    }

    // ---------------------------------------------------------------- oauth

    pub async fn put_oauth_client(&self, c: &OAuthClient) -> Result<()> {
        sqlx::query(
            "INSERT INTO oauth_clients (id, secret_hash, redirect_uri, user_name, server_name, created) VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (id) DO UPDATE SET secret_hash = $2, redirect_uri = $3, user_name = $4, server_name = $5",
        )
        .bind(&c.id)
        .bind(&c.secret_hash)
        .bind(&c.redirect_uri)
        .bind(&c.user)
        .bind(&c.server)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn get_oauth_client(&self, id: &str) -> Result<Option<OAuthClient>> {
        let row = sqlx::query(
            "SELECT id, secret_hash, redirect_uri, user_name, server_name FROM oauth_clients WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            Ok(OAuthClient {
                id: r.try_get("id")?,
                secret_hash: r.try_get("secret_hash")?,
                redirect_uri: r.try_get("redirect_uri")?,
                user: r.try_get("user_name")?,
                server: r.try_get("server_name")?,
            })
        })
        .transpose()
    }

    pub async fn delete_oauth_client(&self, id: &str) -> Result<()> {
        sqlx::query("DELETE FROM oauth_clients WHERE id = $1").bind(id).execute(&self.pool).await?;
        Ok(())
    }

    pub async fn put_oauth_code(&self, c: &OAuthCode) -> Result<()> {
        sqlx::query(
            "INSERT INTO oauth_codes (code_hash, client_id, user_name, session_id, redirect_uri, code_challenge, scopes, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(&c.code_hash)
        .bind(&c.client_id)
        .bind(&c.user)
        .bind(c.session_id.clone())
        .bind(&c.redirect_uri)
        .bind(c.code_challenge.clone())
        .bind(serde_json::to_string(&c.scopes).unwrap_or_else(|_| "[]".into()))
        .bind(c.expires_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Takes a code: returns it and deletes it, so a code works once.
    pub async fn take_oauth_code(&self, code_hash: &str) -> Result<Option<OAuthCode>> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(
            "SELECT code_hash, client_id, user_name, session_id, redirect_uri, code_challenge, scopes, expires_at FROM oauth_codes WHERE code_hash = $1",
        )
        .bind(code_hash)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(r) = row else { return Ok(None) };
        let deleted =
            sqlx::query("DELETE FROM oauth_codes WHERE code_hash = $1").bind(code_hash).execute(&mut *tx).await?;
        tx.commit().await?;
        if deleted.rows_affected() == 0 {
            return Ok(None);
        }
        let scopes: String = r.try_get("scopes")?;
        Ok(Some(OAuthCode {
            code_hash: r.try_get("code_hash")?,
            client_id: r.try_get("client_id")?,
            user: r.try_get("user_name")?,
            session_id: r.try_get("session_id")?,
            redirect_uri: r.try_get("redirect_uri")?,
            code_challenge: r.try_get("code_challenge")?,
            scopes: serde_json::from_str(&scopes).unwrap_or_default(),
            expires_at: r.try_get("expires_at")?,
        }))
    }

    // --------------------------------------------------------------- events

    pub async fn add_event(&self, actor: &str, kind: &str, subject: &str, detail: &str) -> Result<()> {
        sqlx::query("INSERT INTO events (id, at, actor, kind, subject, detail) VALUES ($1, $2, $3, $4, $5, $6)")
            .bind(random_id("e"))
            .bind(now_ms())
            .bind(actor)
            .bind(kind)
            .bind(subject)
            .bind(detail)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn recent_events(&self, limit: i64) -> Result<Vec<Event>> {
        let rows = sqlx::query("SELECT at, actor, kind, subject, detail FROM events ORDER BY at DESC LIMIT $1")
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(Event {
                    at: r.try_get("at")?,
                    actor: r.try_get("actor")?,
                    kind: r.try_get("kind")?,
                    subject: r.try_get("subject")?,
                    detail: r.try_get("detail")?,
                })
            })
            .collect()
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

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn urls_are_redacted() {
        assert_eq!(redact_url("postgres://u:secret@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact_url("sqlite:///x/y.sqlite"), "sqlite:///x/y.sqlite");
    }
}
