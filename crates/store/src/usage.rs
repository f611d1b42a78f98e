//! The usage ledger: intervals during which a server held a GPU (`gpu`, one
//! per device) or existed as started (`server`), from which GPU-hours and
//! server-hours are summed. An interval is open (`ended` NULL) while it
//! lasts; at most one is open per (user, server, kind, device), so nothing
//! is counted twice. GPU intervals are opened and closed in the same
//! transaction as the allocation itself (`gpus.rs`). After a crash,
//! [`Store::reconcile_usage`] makes the ledger agree with the allocations
//! and server records again.

use sqlx::Row;

use crate::{random_id, Result, Store};

/// What an interval measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageKind {
    Gpu,
    Server,
}

impl UsageKind {
    pub fn as_str(self) -> &'static str {
        match self {
            UsageKind::Gpu => "gpu",
            UsageKind::Server => "server",
        }
    }
}

/// One interval of the ledger (unix milliseconds; `ended` is `None` while open).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageInterval {
    pub user: String,
    pub server: String,
    pub kind: UsageKind,
    /// The GPU's id; empty for server intervals.
    pub device: String,
    pub started: i64,
    pub ended: Option<i64>,
}

/// `ended = max(started, $n)`, in SQL both backends accept.
fn close_at(n: u8) -> String {
    format!("ended = CASE WHEN started > ${n} THEN started ELSE ${n} END")
}

impl Store {
    /// Opens an interval unless one is open for the same key (then nothing).
    pub(crate) async fn open_usage<'e, E>(
        exec: E,
        user: &str,
        server: &str,
        kind: UsageKind,
        device: &str,
        at: i64,
    ) -> Result<()>
    where
        E: sqlx::Executor<'e, Database = sqlx::Any>,
    {
        sqlx::query(
            "INSERT INTO usage_intervals (id, user_name, server_name, kind, device_id, started, ended) \
             VALUES ($1, $2, $3, $4, $5, $6, NULL) ON CONFLICT DO NOTHING",
        )
        .bind(random_id("u"))
        .bind(user)
        .bind(server)
        .bind(kind.as_str())
        .bind(device)
        .bind(at)
        .execute(exec)
        .await?;
        Ok(())
    }

    /// Records that a server started (its server-hours count from `at`).
    pub async fn open_server_usage(&self, user: &str, server: &str, at: i64) -> Result<()> {
        Store::open_usage(&self.pool, user, server, UsageKind::Server, "", at).await
    }

    /// Records that a server stopped at `at` (never before its interval began).
    pub async fn close_server_usage(&self, user: &str, server: &str, at: i64) -> Result<u64> {
        let r = sqlx::query(&format!(
            "UPDATE usage_intervals SET {} WHERE user_name = $1 AND server_name = $2 AND kind = 'server' AND ended IS NULL",
            close_at(3)
        ))
        .bind(user)
        .bind(server)
        .bind(at)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected())
    }

    /// Intervals that overlap `[from, to)`, of one user or everyone.
    pub async fn usage_intervals(&self, user: Option<&str>, from: i64, to: i64) -> Result<Vec<UsageInterval>> {
        let cols = "user_name, server_name, kind, device_id, started, ended";
        let overlap = "started < $1 AND (ended IS NULL OR ended > $2)";
        let rows = match user {
            Some(u) => {
                sqlx::query(&format!(
                    "SELECT {cols} FROM usage_intervals WHERE {overlap} AND user_name = $3 ORDER BY started"
                ))
                .bind(to)
                .bind(from)
                .bind(u)
                .fetch_all(&self.pool)
                .await?
            }
            None => {
                sqlx::query(&format!("SELECT {cols} FROM usage_intervals WHERE {overlap} ORDER BY user_name, started"))
                    .bind(to)
                    .bind(from)
                    .fetch_all(&self.pool)
                    .await?
            }
        };
        rows.iter()
            .map(|r| {
                let kind: String = r.try_get("kind")?;
                Ok(UsageInterval {
                    user: r.try_get("user_name")?,
                    server: r.try_get("server_name")?,
                    kind: if kind == "gpu" { UsageKind::Gpu } else { UsageKind::Server },
                    device: r.try_get("device_id")?,
                    started: r.try_get("started")?,
                    ended: r.try_get("ended")?,
                })
            })
            .collect()
    }

    /// When a berth process last said it was alive (see [`Store::set_usage_heartbeat`]).
    pub async fn usage_heartbeat(&self) -> Result<Option<i64>> {
        let row =
            sqlx::query("SELECT value FROM meta WHERE key = 'usage_heartbeat'").fetch_optional(&self.pool).await?;
        Ok(match row {
            Some(r) => Some(r.try_get("value")?),
            None => None,
        })
    }

    /// Written every minute while berth runs: after a crash, time a server
    /// could have run unseen is counted up to here, not up to the restart.
    pub async fn set_usage_heartbeat(&self, at: i64) -> Result<()> {
        sqlx::query(
            "INSERT INTO meta (key, value) VALUES ('usage_heartbeat', $1) ON CONFLICT (key) DO UPDATE SET value = $1",
        )
        .bind(at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Makes the ledger agree with what is recorded (at start-up, after the
    /// servers were reconciled): intervals whose allocation or active server
    /// is gone are closed at `alive_until` (berth's last heartbeat: nothing
    /// was seen after it); allocations and active servers without an open
    /// interval (from before the ledger existed, or a write that failed) get
    /// one, starting where their allocation or start did but never before
    /// the last interval of the same key ended. Returns (closed, opened).
    pub async fn reconcile_usage(&self, alive_until: i64, now: i64) -> Result<(u64, u64)> {
        let mut closed = sqlx::query(&format!(
            "UPDATE usage_intervals SET {} WHERE kind = 'gpu' AND ended IS NULL AND NOT EXISTS \
             (SELECT 1 FROM gpu_allocations a WHERE a.device_id = usage_intervals.device_id \
              AND a.user_name = usage_intervals.user_name AND a.server_name = usage_intervals.server_name)",
            close_at(1)
        ))
        .bind(alive_until)
        .execute(&self.pool)
        .await?
        .rows_affected();
        closed += sqlx::query(&format!(
            "UPDATE usage_intervals SET {} WHERE kind = 'server' AND ended IS NULL AND NOT EXISTS \
             (SELECT 1 FROM servers s WHERE s.user_name = usage_intervals.user_name \
              AND s.name = usage_intervals.server_name AND s.state <> 'stopped')",
            close_at(1)
        ))
        .bind(alive_until)
        .execute(&self.pool)
        .await?
        .rows_affected();

        let mut missing: Vec<(String, String, UsageKind, String, i64)> = Vec::new();
        let rows = sqlx::query(
            "SELECT a.device_id, a.user_name, a.server_name, a.at FROM gpu_allocations a WHERE NOT EXISTS \
             (SELECT 1 FROM usage_intervals u WHERE u.kind = 'gpu' AND u.ended IS NULL AND u.device_id = a.device_id \
              AND u.user_name = a.user_name AND u.server_name = a.server_name)",
        )
        .fetch_all(&self.pool)
        .await?;
        for r in &rows {
            missing.push((
                r.try_get("user_name")?,
                r.try_get("server_name")?,
                UsageKind::Gpu,
                r.try_get("device_id")?,
                r.try_get("at")?,
            ));
        }
        let rows = sqlx::query(
            "SELECT s.user_name, s.name, s.started FROM servers s WHERE s.state <> 'stopped' AND NOT EXISTS \
             (SELECT 1 FROM usage_intervals u WHERE u.kind = 'server' AND u.ended IS NULL \
              AND u.user_name = s.user_name AND u.server_name = s.name) \
             AND NOT EXISTS (SELECT 1 FROM gpu_queue q WHERE q.user_name = s.user_name AND q.server_name = s.name)",
        )
        .fetch_all(&self.pool)
        .await?;
        for r in &rows {
            let started: Option<i64> = r.try_get("started")?;
            missing.push((
                r.try_get("user_name")?,
                r.try_get("name")?,
                UsageKind::Server,
                String::new(),
                started.unwrap_or(now),
            ));
        }
        let mut opened = 0;
        for (user, server, kind, device, from) in missing {
            let last: Option<i64> = sqlx::query(
                "SELECT MAX(ended) AS e FROM usage_intervals WHERE user_name = $1 AND server_name = $2 AND kind = $3 AND device_id = $4",
            )
            .bind(&user)
            .bind(&server)
            .bind(kind.as_str())
            .bind(&device)
            .fetch_one(&self.pool)
            .await?
            .try_get("e")?;
            let at = from.max(last.unwrap_or(i64::MIN)).min(now);
            Store::open_usage(&self.pool, &user, &server, kind, &device, at).await?;
            opened += 1;
        }
        Ok((closed, opened))
    }
}
