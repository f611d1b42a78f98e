//! API, server and OAuth access tokens, stored by their hash.

use crate::records::{TOKEN_COLS, USER_COLS_U};
use crate::{now_ms, random_id, NewToken, Result, Store, StoreError, Token, User};

impl Store {
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
        let _changed = self.auth_changing();
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
        let _changed = self.auth_changing();
        sqlx::query(
            // The server's own token, and every OAuth token issued to it —
            // for its owner and for any visitor.
            "DELETE FROM tokens WHERE (user_name = $1 AND kind = 'server' AND server_name = $2) OR oauth_client = $3",
        )
        .bind(user)
        .bind(server)
        .bind(client_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn delete_expired_tokens(&self, now: i64) -> Result<u64> {
        let _changed = self.auth_changing();
        let r = sqlx::query("DELETE FROM tokens WHERE expires_at IS NOT NULL AND expires_at < $1")
            .bind(now)
            .execute(&self.pool)
            .await?;
        sqlx::query("DELETE FROM oauth_codes WHERE expires_at < $1").bind(now).execute(&self.pool).await?;
        Ok(r.rows_affected())
    }

    pub async fn touch_tokens(&self, seen: &[(String, i64)]) -> Result<()> {
        self.update_each("UPDATE tokens SET last_activity = $2 WHERE id = $1", seen).await
    }

    /// Revokes what was issued through one browser session (OAuth tokens
    /// servers got for that visitor): on log-out.
    pub async fn revoke_session_tokens(&self, session_public_id: &str) -> Result<u64> {
        let _changed = self.auth_changing();
        let r = sqlx::query("DELETE FROM tokens WHERE session_id = $1 AND kind = 'oauth'")
            .bind(session_public_id)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected())
    }

    /// Revokes every API and OAuth token a user holds (their servers' own
    /// tokens stay with the servers): on a password change, unauthorize or delete.
    pub async fn revoke_user_tokens(&self, user: &str) -> Result<u64> {
        let _changed = self.auth_changing();
        let r = sqlx::query("DELETE FROM tokens WHERE user_name = $1 AND kind <> 'server'")
            .bind(user)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected())
    }
}
