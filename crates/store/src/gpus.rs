//! GPU allocations to servers, and which devices are shared.

use sqlx::Row;

use crate::{now_ms, Result, Store, UsageKind};

impl Store {
    /// Every allocation: (device id, user, server).
    pub async fn gpu_allocations(&self) -> Result<Vec<(String, String, String)>> {
        let rows = sqlx::query(
            "SELECT device_id, user_name, server_name FROM gpu_allocations ORDER BY device_id, user_name, server_name",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| Ok((r.try_get("device_id")?, r.try_get("user_name")?, r.try_get("server_name")?))).collect()
    }

    /// Records the allocation and opens its usage intervals, in one transaction.
    pub async fn add_gpu_allocations(&self, user: &str, server: &str, devices: &[String]) -> Result<()> {
        let at = now_ms();
        let mut tx = self.pool.begin().await?;
        for d in devices {
            sqlx::query("INSERT INTO gpu_allocations (device_id, user_name, server_name, at) VALUES ($1, $2, $3, $4)")
                .bind(d)
                .bind(user)
                .bind(server)
                .bind(at)
                .execute(&mut *tx)
                .await?;
            Store::open_usage(&mut *tx, user, server, UsageKind::Gpu, d, at).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Frees what a server holds now; returns how many devices.
    pub async fn free_gpus(&self, user: &str, server: &str) -> Result<u64> {
        self.free_gpus_at(user, server, now_ms()).await
    }

    /// Frees what a server holds and closes its GPU intervals at `at` (in
    /// one transaction); returns how many devices.
    pub async fn free_gpus_at(&self, user: &str, server: &str, at: i64) -> Result<u64> {
        let mut tx = self.pool.begin().await?;
        let r = sqlx::query("DELETE FROM gpu_allocations WHERE user_name = $1 AND server_name = $2")
            .bind(user)
            .bind(server)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "UPDATE usage_intervals SET ended = CASE WHEN started > $3 THEN started ELSE $3 END \
             WHERE user_name = $1 AND server_name = $2 AND kind = 'gpu' AND ended IS NULL",
        )
        .bind(user)
        .bind(server)
        .bind(at)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(r.rows_affected())
    }

    pub async fn shared_gpus(&self) -> Result<Vec<String>> {
        let rows = sqlx::query("SELECT device_id FROM gpu_shared ORDER BY device_id").fetch_all(&self.pool).await?;
        rows.iter().map(|r| Ok(r.try_get("device_id")?)).collect()
    }

    pub async fn set_gpu_shared(&self, device: &str, shared: bool) -> Result<()> {
        if shared {
            sqlx::query("INSERT INTO gpu_shared (device_id) VALUES ($1) ON CONFLICT (device_id) DO NOTHING")
                .bind(device)
                .execute(&self.pool)
                .await?;
        } else {
            sqlx::query("DELETE FROM gpu_shared WHERE device_id = $1").bind(device).execute(&self.pool).await?;
        }
        Ok(())
    }
}
