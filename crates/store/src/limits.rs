//! Per-user limits an admin sets (named servers, allowed templates, GPU-hours per period).

use sqlx::Row;

use crate::{Result, Store, StoreError};

/// What an admin set for one user; `None` means the hub-wide setting.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserLimits {
    pub max_named_servers: Option<u32>,
    /// Template ids the user may start.
    pub templates: Option<Vec<String>>,
    /// GPU-hours the user may use per usage period; 0 means unlimited.
    /// Kept to the millisecond of GPU time.
    #[serde(default)]
    pub gpu_hours_per_period: Option<f64>,
}

const MS_PER_HOUR: f64 = 3_600_000.0;

impl Store {
    pub async fn user_limits(&self, user: &str) -> Result<UserLimits> {
        let row =
            sqlx::query("SELECT max_named_servers, templates, gpu_ms_per_period FROM user_limits WHERE user_name = $1")
                .bind(user)
                .fetch_optional(&self.pool)
                .await?;
        let Some(r) = row else { return Ok(UserLimits::default()) };
        let max: Option<i64> = r.try_get("max_named_servers")?;
        let templates: Option<String> = r.try_get("templates")?;
        let gpu_ms: Option<i64> = r.try_get("gpu_ms_per_period")?;
        Ok(UserLimits {
            max_named_servers: max.map(|m| m.clamp(0, u32::MAX as i64) as u32),
            templates: templates.and_then(|t| serde_json::from_str(&t).ok()),
            gpu_hours_per_period: gpu_ms.map(|ms| ms.max(0) as f64 / MS_PER_HOUR),
        })
    }

    /// Every user's own GPU-hour limit, where one is set (one query, for lists).
    pub async fn gpu_hour_limits(&self) -> Result<std::collections::HashMap<String, f64>> {
        let rows =
            sqlx::query("SELECT user_name, gpu_ms_per_period FROM user_limits WHERE gpu_ms_per_period IS NOT NULL")
                .fetch_all(&self.pool)
                .await?;
        rows.iter()
            .map(|r| {
                let ms: i64 = r.try_get("gpu_ms_per_period")?;
                Ok((r.try_get::<String, _>("user_name")?, ms.max(0) as f64 / MS_PER_HOUR))
            })
            .collect()
    }

    pub async fn set_user_limits(&self, user: &str, l: &UserLimits) -> Result<()> {
        let templates = l.templates.as_ref().map(|t| serde_json::to_string(t).unwrap_or_else(|_| "[]".into()));
        // Callers check the value; what is not a finite number of hours is no limit.
        let gpu_ms = l
            .gpu_hours_per_period
            .filter(|h| h.is_finite() && *h >= 0.0)
            .map(|h| (h * MS_PER_HOUR).round().min(i64::MAX as f64) as i64);
        let r = sqlx::query(
            "INSERT INTO user_limits (user_name, max_named_servers, templates, gpu_ms_per_period) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (user_name) DO UPDATE SET max_named_servers = $2, templates = $3, gpu_ms_per_period = $4",
        )
        .bind(user)
        .bind(l.max_named_servers.map(i64::from))
        .bind(templates)
        .bind(gpu_ms)
        .execute(&self.pool)
        .await;
        match r {
            Ok(_) => Ok(()),
            Err(e) if e.as_database_error().is_some_and(|d| d.is_foreign_key_violation()) => {
                Err(StoreError::NotFound { what: format!("user {user}") })
            }
            Err(e) => Err(e.into()),
        }
    }
}
