//! Browser sessions, stored by the hash of their id.

use sqlx::Row;

use crate::records::USER_COLS_U;
use crate::{now_ms, Result, Session, Store, User};

impl Store {
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
        self.update_each("UPDATE sessions SET last_seen = $2 WHERE id_hash = $1 AND last_seen < $2", seen).await
    }

    pub async fn revoke_session(&self, id_hash: &str) -> Result<()> {
        let _changed = self.auth_changing();
        sqlx::query("UPDATE sessions SET revoked = 1 WHERE id_hash = $1").bind(id_hash).execute(&self.pool).await?;
        Ok(())
    }

    pub async fn revoke_user_sessions(&self, user: &str) -> Result<()> {
        let _changed = self.auth_changing();
        sqlx::query("UPDATE sessions SET revoked = 1 WHERE user_name = $1").bind(user).execute(&self.pool).await?;
        Ok(())
    }

    /// Whether the session with this public id is live (not revoked), and
    /// when it began: what an app host's cookie is checked against.
    pub async fn session_started(&self, public_id: &str) -> Result<Option<i64>> {
        let row = sqlx::query("SELECT created FROM sessions WHERE public_id = $1 AND revoked = 0")
            .bind(public_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(match row {
            Some(r) => Some(r.try_get("created")?),
            None => None,
        })
    }

    /// Live sessions (not revoked, begun at or after `since`), of one user
    /// or of everyone, newest first.
    pub async fn list_sessions(&self, user: Option<&str>, since: i64) -> Result<Vec<Session>> {
        let sql = "SELECT id_hash, public_id, user_name, created, last_seen FROM sessions \
                   WHERE revoked = 0 AND created >= $1 AND ($2 = '' OR user_name = $2) \
                   ORDER BY user_name, created DESC";
        let rows = sqlx::query(sql).bind(since).bind(user.unwrap_or("")).fetch_all(&self.pool).await?;
        rows.iter()
            .map(|r| {
                Ok(Session {
                    id_hash: r.try_get("id_hash")?,
                    public_id: r.try_get("public_id")?,
                    user: r.try_get("user_name")?,
                    created: r.try_get("created")?,
                    last_seen: r.try_get("last_seen")?,
                })
            })
            .collect()
    }

    /// Revokes `user`'s session with this public id; whether there was a
    /// live one.
    pub async fn revoke_session_of(&self, user: &str, public_id: &str) -> Result<bool> {
        let done =
            sqlx::query("UPDATE sessions SET revoked = 1 WHERE user_name = $1 AND public_id = $2 AND revoked = 0")
                .bind(user)
                .bind(public_id)
                .execute(&self.pool)
                .await?;
        self.auth_changed();
        Ok(done.rows_affected() > 0)
    }
}
