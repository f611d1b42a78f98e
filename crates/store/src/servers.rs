//! Server records (writes and database reads; cached reads are in
//! `directory.rs`).

use crate::records::SERVER_COLS;
use crate::{Result, Server, Store};

impl Store {
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
}
