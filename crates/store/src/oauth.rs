//! OAuth clients (one per server) and their one-time authorization codes.

use sqlx::Row;

use crate::{now_ms, OAuthClient, OAuthCode, Result, Store};

impl Store {
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
}
