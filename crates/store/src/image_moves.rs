//! Image moves (migration 13): a running server to be recreated on its
//! template's updated image once it is idle (`images.policy = when-idle`),
//! and where the move stands, so that one interrupted by a restart of
//! berth is finished or rolled back, never left half done.

use sqlx::Row;

use crate::{now_ms, Result, Store};

/// One server's move.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageMove {
    pub user: String,
    pub server: String,
    pub template: String,
    /// The image the server runs (a built template's own image).
    pub image: String,
    /// Where the engine keeps the copy `image` replaced.
    pub previous: String,
    /// The digest the update brought.
    pub digest: String,
    /// `waiting` (for the server to be idle), `moving` (recreated on the
    /// new image), `rolling-back` (put back on `previous`).
    pub phase: String,
    /// Why it rolls back (the new image's failure), or "".
    pub detail: String,
    /// Unix ms.
    pub created: i64,
}

impl Store {
    /// Records a move for its server, replacing an earlier one.
    pub async fn put_image_move(&self, m: &ImageMove) -> Result<()> {
        sqlx::query(
            "INSERT INTO image_moves (user_name, server_name, template, image, previous, digest, phase, detail, created) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (user_name, server_name) DO UPDATE SET \
             template = excluded.template, image = excluded.image, previous = excluded.previous, \
             digest = excluded.digest, phase = excluded.phase, detail = excluded.detail, created = excluded.created",
        )
        .bind(&m.user)
        .bind(&m.server)
        .bind(&m.template)
        .bind(&m.image)
        .bind(&m.previous)
        .bind(&m.digest)
        .bind(&m.phase)
        .bind(&m.detail)
        .bind(if m.created == 0 { now_ms() } else { m.created })
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Moves a server's move to `phase` (with `detail`).
    pub async fn set_image_move_phase(&self, user: &str, server: &str, phase: &str, detail: &str) -> Result<()> {
        sqlx::query("UPDATE image_moves SET phase = $1, detail = $2 WHERE user_name = $3 AND server_name = $4")
            .bind(phase)
            .bind(detail)
            .bind(user)
            .bind(server)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The move is over (done, rolled back, or no longer needed).
    pub async fn delete_image_move(&self, user: &str, server: &str) -> Result<()> {
        sqlx::query("DELETE FROM image_moves WHERE user_name = $1 AND server_name = $2")
            .bind(user)
            .bind(server)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Every move, oldest first.
    pub async fn image_moves(&self) -> Result<Vec<ImageMove>> {
        let rows = sqlx::query(
            "SELECT user_name, server_name, template, image, previous, digest, phase, detail, created \
             FROM image_moves ORDER BY created, user_name, server_name",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(ImageMove {
                    user: r.try_get("user_name")?,
                    server: r.try_get("server_name")?,
                    template: r.try_get("template")?,
                    image: r.try_get("image")?,
                    previous: r.try_get("previous")?,
                    digest: r.try_get("digest")?,
                    phase: r.try_get("phase")?,
                    detail: r.try_get("detail")?,
                    created: r.try_get("created")?,
                })
            })
            .collect()
    }
}
