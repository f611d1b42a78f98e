//! Data berth took over from an earlier deployment (`berth migrate`): the
//! volumes it mounts in place of its own, and where imported accounts came
//! from, so a second migration knows what it did the first time.

use sqlx::any::AnyRow;
use sqlx::Row;

use crate::{is_unique_violation, now_ms, Result, Store, StoreError};

/// An existing volume that serves one role (`home`, `workspace`, `cache`
/// for an account, `shared` for everyone). berth mounts it and never
/// creates, renames or removes it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AdoptedVolume {
    pub volume: String,
    /// The account it belongs to; `None` for the shared volume.
    pub account_id: Option<String>,
    pub role: String,
    pub mount_point: String,
    /// The driver and options it was made with (as `key=value;key=value`,
    /// credentials left out: the engine keeps them with the volume).
    pub driver: String,
    pub options: String,
    /// Where it came from, e.g. `jupyterhub:/srv/jupyterhub/jupyterhub.sqlite`.
    pub source: String,
    pub adopted: i64,
}

const COLS: &str = "volume, account_id, role, mount_point, driver, options, source, adopted";

impl AdoptedVolume {
    fn from_row(r: &AnyRow) -> Result<AdoptedVolume> {
        Ok(AdoptedVolume {
            volume: r.try_get("volume")?,
            account_id: r.try_get("account_id")?,
            role: r.try_get("role")?,
            mount_point: r.try_get("mount_point")?,
            driver: r.try_get("driver")?,
            options: r.try_get("options")?,
            source: r.try_get("source")?,
            adopted: r.try_get("adopted")?,
        })
    }
}

impl Store {
    /// Records that `v.volume` serves `v.role` of `v.account_id`. `Ok(false)`
    /// when exactly that is recorded already; `Conflict` when the volume
    /// serves something else or the role is served by another volume.
    pub async fn adopt_volume(&self, v: &AdoptedVolume) -> Result<bool> {
        if let Some(existing) = self.adopted_volume(&v.volume).await? {
            if existing.account_id == v.account_id && existing.role == v.role {
                return Ok(false);
            }
            return Err(StoreError::Conflict {
                what: format!("volume {} (adopted as the {} volume of another account)", v.volume, existing.role),
            });
        }
        let held = match &v.account_id {
            Some(id) => self.adopted_volumes_of(id).await?.into_iter().find(|a| a.role == v.role),
            None => self.shared_adopted_volume().await?,
        };
        if let Some(h) = held {
            return Err(StoreError::Conflict { what: format!("an adopted {} volume ({})", v.role, h.volume) });
        }
        let res = sqlx::query(&format!("INSERT INTO adopted_volumes ({COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"))
            .bind(&v.volume)
            .bind(v.account_id.clone())
            .bind(&v.role)
            .bind(&v.mount_point)
            .bind(&v.driver)
            .bind(&v.options)
            .bind(&v.source)
            .bind(if v.adopted > 0 { v.adopted } else { now_ms() })
            .execute(&self.pool)
            .await;
        match res {
            Ok(_) => Ok(true),
            // Another migration got there first: what it wrote decides.
            Err(e) if is_unique_violation(&e) => match self.adopted_volume(&v.volume).await? {
                Some(x) if x.account_id == v.account_id && x.role == v.role => Ok(false),
                _ => Err(StoreError::Conflict { what: format!("volume {}", v.volume) }),
            },
            Err(e) if e.as_database_error().is_some_and(|d| d.is_foreign_key_violation()) => {
                Err(StoreError::NotFound { what: format!("account {}", v.account_id.clone().unwrap_or_default()) })
            }
            Err(e) => Err(e.into()),
        }
    }

    pub async fn adopted_volume(&self, volume: &str) -> Result<Option<AdoptedVolume>> {
        let row = sqlx::query(&format!("SELECT {COLS} FROM adopted_volumes WHERE volume = $1"))
            .bind(volume)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| AdoptedVolume::from_row(&r)).transpose()
    }

    /// The volumes adopted for one account (not the shared one).
    pub async fn adopted_volumes_of(&self, account_id: &str) -> Result<Vec<AdoptedVolume>> {
        let rows = sqlx::query(&format!("SELECT {COLS} FROM adopted_volumes WHERE account_id = $1 ORDER BY role"))
            .bind(account_id)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(AdoptedVolume::from_row).collect()
    }

    /// The adopted shared volume, if any.
    pub async fn shared_adopted_volume(&self) -> Result<Option<AdoptedVolume>> {
        let row = sqlx::query(&format!(
            "SELECT {COLS} FROM adopted_volumes WHERE account_id IS NULL ORDER BY adopted, volume LIMIT 1"
        ))
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| AdoptedVolume::from_row(&r)).transpose()
    }

    /// What a start of the account's servers mounts in place of berth's own
    /// volumes: its adopted volumes and the adopted shared one.
    pub async fn adopted_volumes_for_start(&self, account_id: &str) -> Result<Vec<AdoptedVolume>> {
        let mut v = self.adopted_volumes_of(account_id).await?;
        v.extend(self.shared_adopted_volume().await?);
        Ok(v)
    }

    pub async fn list_adopted_volumes(&self) -> Result<Vec<AdoptedVolume>> {
        let rows =
            sqlx::query(&format!("SELECT {COLS} FROM adopted_volumes ORDER BY volume")).fetch_all(&self.pool).await?;
        rows.iter().map(AdoptedVolume::from_row).collect()
    }

    /// Records that an account was imported from `source` where it was
    /// called `source_name` (kept if recorded already).
    pub async fn record_import(&self, account_id: &str, source: &str, source_name: &str) -> Result<()> {
        let res = sqlx::query(
            "INSERT INTO imported_accounts (account_id, source, source_name, imported) VALUES ($1, $2, $3, $4)",
        )
        .bind(account_id)
        .bind(source)
        .bind(source_name)
        .bind(now_ms())
        .execute(&self.pool)
        .await;
        match res {
            Ok(_) => Ok(()),
            Err(e) if is_unique_violation(&e) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Where an account was imported from, and its name there.
    pub async fn import_source(&self, account_id: &str) -> Result<Option<(String, String)>> {
        let row = sqlx::query("SELECT source, source_name FROM imported_accounts WHERE account_id = $1")
            .bind(account_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(match row {
            Some(r) => Some((r.try_get("source")?, r.try_get("source_name")?)),
            None => None,
        })
    }
}
