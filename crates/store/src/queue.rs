//! The GPU queue (migration 8): starts that wait for GPUs, in the order
//! they will get them. Each row belongs to a server record (deleted with it,
//! and with its user); the order is `seq`, rewritten whole by a reorder.

use sqlx::Row;

use crate::{Result, Store, StoreError};

/// One start waiting for GPUs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueEntry {
    pub user: String,
    pub server: String,
    /// GPUs it asked for.
    pub gpus: u32,
    /// Unix milliseconds when it joined the queue.
    pub queued: i64,
}

impl Store {
    /// The queue, first in line first.
    pub async fn gpu_queue(&self) -> Result<Vec<QueueEntry>> {
        let rows = sqlx::query("SELECT user_name, server_name, gpus, queued FROM gpu_queue ORDER BY seq, queued")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(QueueEntry {
                    user: r.try_get("user_name")?,
                    server: r.try_get("server_name")?,
                    gpus: u32::try_from(r.try_get::<i64, _>("gpus")?).unwrap_or(0),
                    queued: r.try_get("queued")?,
                })
            })
            .collect()
    }

    /// Puts a server at the end of the queue (its record must exist). A
    /// server already waiting is a conflict.
    pub async fn enqueue_gpus(&self, user: &str, server: &str, gpus: u32, at: i64) -> Result<()> {
        // One statement: a read then a write in one SQLite transaction can
        // fail at once (SQLITE_BUSY_SNAPSHOT) when another connection wrote
        // in between; busy_timeout does not wait for that.
        let r = sqlx::query(
            "INSERT INTO gpu_queue (user_name, server_name, gpus, seq, queued) \
             SELECT $1, $2, $3, COALESCE(MAX(seq), 0) + 1, $4 FROM gpu_queue",
        )
        .bind(user)
        .bind(server)
        .bind(i64::from(gpus))
        .bind(at)
        .execute(&self.pool)
        .await;
        match r {
            Ok(_) => {}
            Err(e) if crate::is_unique_violation(&e) => {
                return Err(StoreError::Conflict { what: format!("a queue entry for {user}/{server}") })
            }
            Err(e) => return Err(e.into()),
        }
        Ok(())
    }

    /// Takes a server out of the queue; whether it was in it.
    pub async fn dequeue_gpus(&self, user: &str, server: &str) -> Result<bool> {
        let r = sqlx::query("DELETE FROM gpu_queue WHERE user_name = $1 AND server_name = $2")
            .bind(user)
            .bind(server)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() > 0)
    }

    /// Rewrites the order: `order` lists (user, server) first in line
    /// first; entries it does not name keep their relative order after it.
    pub async fn reorder_gpu_queue(&self, order: &[(String, String)]) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        // A write first, so the transaction holds the write lock before it
        // reads (see `enqueue_gpus`); it changes nothing.
        sqlx::query("UPDATE gpu_queue SET seq = seq WHERE seq < 0").execute(&mut *tx).await?;
        let rows = sqlx::query("SELECT user_name, server_name FROM gpu_queue ORDER BY seq, queued")
            .fetch_all(&mut *tx)
            .await?;
        let mut current = Vec::with_capacity(rows.len());
        for r in &rows {
            current.push((r.try_get::<String, _>("user_name")?, r.try_get::<String, _>("server_name")?));
        }
        let mut next: Vec<&(String, String)> = order.iter().filter(|k| current.contains(k)).collect();
        next.extend(current.iter().filter(|k| !order.contains(k)));
        for (i, (user, server)) in next.into_iter().enumerate() {
            sqlx::query("UPDATE gpu_queue SET seq = $3 WHERE user_name = $1 AND server_name = $2")
                .bind(user)
                .bind(server)
                .bind(i as i64 + 1)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}
