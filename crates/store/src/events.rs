//! The audit log of events.

use std::collections::HashMap;

use sqlx::Row;

use crate::{now_ms, random_id, Event, Result, Store};

impl Store {
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

    /// The latest events of one kind, newest first.
    pub async fn recent_events_of_kind(&self, kind: &str, limit: i64) -> Result<Vec<Event>> {
        let rows = sqlx::query(
            "SELECT at, actor, kind, subject, detail FROM events WHERE kind = $1 ORDER BY at DESC LIMIT $2",
        )
        .bind(kind)
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

    /// Events of `kind` counted per subject (the admin view's SSH session column).
    pub async fn count_events_by_subject(&self, kind: &str) -> Result<HashMap<String, i64>> {
        let rows = sqlx::query("SELECT subject, COUNT(*) AS n FROM events WHERE kind = $1 GROUP BY subject")
            .bind(kind)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| Ok((r.try_get::<String, _>("subject")?, r.try_get::<i64, _>("n")?))).collect()
    }

    /// Events of `kind` counted per detail (culls by reason, for the metrics).
    pub async fn count_events_by_detail(&self, kind: &str) -> Result<Vec<(String, i64)>> {
        let rows = sqlx::query("SELECT detail, COUNT(*) AS n FROM events WHERE kind = $1 GROUP BY detail")
            .bind(kind)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| Ok((r.try_get::<String, _>("detail")?, r.try_get::<i64, _>("n")?))).collect()
    }
}
