//! The audit log of events: who did what, when, to what.

use std::collections::HashMap;

use sqlx::any::AnyRow;
use sqlx::Row;

use crate::{now_ms, random_id, Event, Result, Store};

/// Which events to read: every filter is optional, the page is
/// `offset`/`limit` in newest-first order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventQuery {
    /// Events by this user (the actor) or about them (the subject is the
    /// user, or one of their servers, `user/<server>`). A valid user name
    /// (it holds no `LIKE` wildcards).
    pub user: Option<String>,
    /// Exactly this kind (`user-authorize`, `start`, `cull`, …).
    pub kind: Option<String>,
    /// At or after this time (unix ms).
    pub since: Option<i64>,
    /// Before this time (unix ms).
    pub until: Option<i64>,
    pub offset: i64,
    pub limit: i64,
}

fn event_of(r: &AnyRow) -> Result<Event> {
    Ok(Event {
        id: r.try_get("id")?,
        at: r.try_get("at")?,
        actor: r.try_get("actor")?,
        kind: r.try_get("kind")?,
        subject: r.try_get("subject")?,
        detail: r.try_get("detail")?,
    })
}

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
        let q = EventQuery { limit, ..Default::default() };
        Ok(self.query_events(&q).await?.0)
    }

    /// One page of the events `q` selects, newest first, and how many it
    /// selects in all.
    pub async fn query_events(&self, q: &EventQuery) -> Result<(Vec<Event>, i64)> {
        // The conditions, each with its own placeholder numbers.
        let mut conds: Vec<String> = Vec::new();
        let mut binds: Vec<Bind> = Vec::new();
        if let Some(u) = &q.user {
            let n = binds.len();
            conds.push(format!("(actor = ${} OR subject = ${} OR subject LIKE ${})", n + 1, n + 2, n + 3));
            binds.push(Bind::Text(u.clone()));
            binds.push(Bind::Text(u.clone()));
            // The caller passes a validated name (`[a-z][a-z0-9-]*`): no LIKE wildcards.
            binds.push(Bind::Text(format!("{u}/%")));
        }
        if let Some(k) = &q.kind {
            conds.push(format!("kind = ${}", binds.len() + 1));
            binds.push(Bind::Text(k.clone()));
        }
        if let Some(t) = q.since {
            conds.push(format!("at >= ${}", binds.len() + 1));
            binds.push(Bind::Int(t));
        }
        if let Some(t) = q.until {
            conds.push(format!("at < ${}", binds.len() + 1));
            binds.push(Bind::Int(t));
        }
        let filter = if conds.is_empty() { String::new() } else { format!(" WHERE {}", conds.join(" AND ")) };
        let count_sql = format!("SELECT COUNT(*) AS n FROM events{filter}");
        let mut count = sqlx::query(&count_sql);
        for b in &binds {
            count = b.bind(count);
        }
        let total: i64 = count.fetch_one(&self.pool).await?.try_get("n")?;
        let n = binds.len();
        let page_sql = format!(
            "SELECT id, at, actor, kind, subject, detail FROM events{filter} ORDER BY at DESC, id DESC LIMIT ${} OFFSET ${}",
            n + 1,
            n + 2
        );
        let mut page = sqlx::query(&page_sql);
        for b in &binds {
            page = b.bind(page);
        }
        let rows = page.bind(q.limit.max(0)).bind(q.offset.max(0)).fetch_all(&self.pool).await?;
        let events = rows.iter().map(event_of).collect::<Result<Vec<_>>>()?;
        Ok((events, total))
    }

    /// The latest events of one kind, newest first.
    pub async fn recent_events_of_kind(&self, kind: &str, limit: i64) -> Result<Vec<Event>> {
        let rows = sqlx::query(
            "SELECT id, at, actor, kind, subject, detail FROM events WHERE kind = $1 ORDER BY at DESC LIMIT $2",
        )
        .bind(kind)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(event_of).collect()
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

enum Bind {
    Text(String),
    Int(i64),
}

type AnyQuery<'q> = sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>;

impl Bind {
    fn bind<'q>(&self, q: AnyQuery<'q>) -> AnyQuery<'q> {
        match self {
            Bind::Text(s) => q.bind(s.clone()),
            Bind::Int(i) => q.bind(*i),
        }
    }
}
