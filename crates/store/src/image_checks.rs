//! The last image-update check of each template (migration 12): what the
//! registry served, what the engine had, and what was done about it.

use sqlx::Row;

use crate::{Result, Store};

/// One template's last check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageCheck {
    pub template: String,
    pub image: String,
    /// Unix ms.
    pub checked: i64,
    /// `current`, `available`, `updated`, `failed`.
    pub status: String,
    pub local_digest: String,
    pub remote_digest: String,
    /// What happened, in words (the reason when it failed).
    pub message: String,
}

impl Store {
    /// Records `c` as its template's last check.
    pub async fn set_image_check(&self, c: &ImageCheck) -> Result<()> {
        sqlx::query(
            "INSERT INTO image_checks (template, image, checked, status, local_digest, remote_digest, message) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (template) DO UPDATE SET image = excluded.image, \
             checked = excluded.checked, status = excluded.status, local_digest = excluded.local_digest, \
             remote_digest = excluded.remote_digest, message = excluded.message",
        )
        .bind(&c.template)
        .bind(&c.image)
        .bind(c.checked)
        .bind(&c.status)
        .bind(&c.local_digest)
        .bind(&c.remote_digest)
        .bind(&c.message)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Every template's last check, by template.
    pub async fn image_checks(&self) -> Result<Vec<ImageCheck>> {
        let rows = sqlx::query(
            "SELECT template, image, checked, status, local_digest, remote_digest, message FROM image_checks \
             ORDER BY template",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(ImageCheck {
                    template: r.try_get("template")?,
                    image: r.try_get("image")?,
                    checked: r.try_get("checked")?,
                    status: r.try_get("status")?,
                    local_digest: r.try_get("local_digest")?,
                    remote_digest: r.try_get("remote_digest")?,
                    message: r.try_get("message")?,
                })
            })
            .collect()
    }
}
