//! User accounts: creation, flags, passwords, log-in bookkeeping, renames
//! and deletion. Reads go through the directory (`directory.rs`).

use sqlx::Row;

use crate::records::USER_COLS;
use crate::{b, is_unique_violation, now_ms, NewUser, Result, Store, StoreError, User};

impl Store {
    pub async fn create_user(&self, u: &NewUser) -> Result<User> {
        let now = now_ms();
        // Starts with a digit, so it is never a user name (those start with a letter).
        let account_id = crate::random_id("1");
        let res = sqlx::query(
            "INSERT INTO users (name, admin, authorized, password_hash, created, account_id) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&u.name)
        .bind(b(u.admin))
        .bind(b(u.authorized))
        .bind(u.password_hash.clone())
        .bind(now)
        .bind(&account_id)
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
        let _changed = self.auth_changing();
        self.update_one("UPDATE users SET authorized = $2 WHERE name = $1", name, b(authorized)).await
    }

    pub async fn set_admin(&self, name: &str, admin: bool) -> Result<()> {
        let _changed = self.auth_changing();
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
        let _changed = self.auth_changing();
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
        sqlx::query("DELETE FROM login_failures WHERE user_name = $1").bind(name).execute(&mut *tx).await?;
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
        let _changed = self.auth_changing();
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
        let _changed = self.auth_changing();
        let r = sqlx::query("DELETE FROM users WHERE name = $1").bind(name).execute(&self.pool).await?;
        if r.rows_affected() == 0 {
            return Err(StoreError::NotFound { what: format!("user {name}") });
        }
        self.directory_changed(&[name]).await
    }

    /// Failed log-ins of `user` from one source address: (count, last, locked until).
    pub async fn login_failures(&self, user: &str, addr: &str) -> Result<Option<(i64, i64, Option<i64>)>> {
        let row = sqlx::query(
            "SELECT failed, last_failed, locked_until FROM login_failures WHERE user_name = $1 AND addr = $2",
        )
        .bind(user)
        .bind(addr)
        .fetch_optional(&self.pool)
        .await?;
        Ok(match row {
            Some(r) => Some((r.try_get("failed")?, r.try_get("last_failed")?, r.try_get("locked_until")?)),
            None => None,
        })
    }

    pub async fn record_address_failure(
        &self,
        user: &str,
        addr: &str,
        failed: i64,
        at: i64,
        locked_until: Option<i64>,
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM login_failures WHERE user_name = $1 AND addr = $2")
            .bind(user)
            .bind(addr)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO login_failures (user_name, addr, failed, last_failed, locked_until) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(user)
        .bind(addr)
        .bind(failed)
        .bind(at)
        .bind(locked_until)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn clear_address_failures(&self, user: &str, addr: &str) -> Result<()> {
        sqlx::query("DELETE FROM login_failures WHERE user_name = $1 AND addr = $2")
            .bind(user)
            .bind(addr)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
