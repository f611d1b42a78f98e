//! SSH public keys: one row per key, unique by fingerprint across all users
//! (a key names one account, so a gateway log line is never ambiguous).

use sqlx::any::AnyRow;
use sqlx::Row;

use crate::{is_unique_violation, now_ms, random_id, Result, Store, StoreError};

/// A registered public key. `public_key` is the OpenSSH line without its
/// comment (`ssh-ed25519 AAAA…`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshKey {
    pub id: String,
    pub user: String,
    /// `SHA256:…`, as `ssh-keygen -l` prints it.
    pub fingerprint: String,
    pub algorithm: String,
    pub public_key: String,
    pub comment: String,
    pub created: i64,
    pub last_used: Option<i64>,
}

const COLS: &str = "id, user_name, fingerprint, algorithm, public_key, comment, created, last_used";

impl SshKey {
    fn from_row(r: &AnyRow) -> Result<SshKey> {
        Ok(SshKey {
            id: r.try_get("id")?,
            user: r.try_get("user_name")?,
            fingerprint: r.try_get("fingerprint")?,
            algorithm: r.try_get("algorithm")?,
            public_key: r.try_get("public_key")?,
            comment: r.try_get("comment")?,
            created: r.try_get("created")?,
            last_used: r.try_get("last_used")?,
        })
    }
}

/// What a caller registers; the web layer has parsed and validated it.
#[derive(Debug, Clone)]
pub struct NewSshKey {
    pub user: String,
    pub fingerprint: String,
    pub algorithm: String,
    pub public_key: String,
    pub comment: String,
}

impl Store {
    /// Registers a key. A fingerprint already registered (to anyone) is a `Conflict`.
    pub async fn add_ssh_key(&self, k: &NewSshKey) -> Result<SshKey> {
        let key = SshKey {
            id: random_id("k"),
            user: k.user.clone(),
            fingerprint: k.fingerprint.clone(),
            algorithm: k.algorithm.clone(),
            public_key: k.public_key.clone(),
            comment: k.comment.clone(),
            created: now_ms(),
            last_used: None,
        };
        let r = sqlx::query(&format!("INSERT INTO ssh_keys ({COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, NULL)"))
            .bind(&key.id)
            .bind(&key.user)
            .bind(&key.fingerprint)
            .bind(&key.algorithm)
            .bind(&key.public_key)
            .bind(&key.comment)
            .bind(key.created)
            .execute(&self.pool)
            .await;
        match r {
            Ok(_) => Ok(key),
            Err(e) if is_unique_violation(&e) => Err(StoreError::Conflict { what: format!("key {}", k.fingerprint) }),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn list_ssh_keys(&self, user: &str) -> Result<Vec<SshKey>> {
        let rows = sqlx::query(&format!("SELECT {COLS} FROM ssh_keys WHERE user_name = $1 ORDER BY created, id"))
            .bind(user)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(SshKey::from_row).collect()
    }

    /// The key with this fingerprint, if `user` registered it. Always reads
    /// the database, so a removed key is refused on the next connection.
    pub async fn find_ssh_key(&self, user: &str, fingerprint: &str) -> Result<Option<SshKey>> {
        let row = sqlx::query(&format!("SELECT {COLS} FROM ssh_keys WHERE user_name = $1 AND fingerprint = $2"))
            .bind(user)
            .bind(fingerprint)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(SshKey::from_row).transpose()
    }

    /// Removes a key by id or fingerprint.
    pub async fn delete_ssh_key(&self, user: &str, id_or_fingerprint: &str) -> Result<()> {
        let r = sqlx::query("DELETE FROM ssh_keys WHERE user_name = $1 AND (id = $2 OR fingerprint = $2)")
            .bind(user)
            .bind(id_or_fingerprint)
            .execute(&self.pool)
            .await?;
        if r.rows_affected() == 0 {
            return Err(StoreError::NotFound { what: format!("key {id_or_fingerprint}") });
        }
        Ok(())
    }

    pub async fn touch_ssh_key(&self, id: &str) -> Result<()> {
        sqlx::query("UPDATE ssh_keys SET last_used = $1 WHERE id = $2")
            .bind(now_ms())
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
