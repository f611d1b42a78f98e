//! Template images as the admin sees them (built or not, tag, size, age,
//! which containers use them) and builds asked for ahead of any start — from
//! the admin's templates page or `templates.prebuild` — through one path.

use std::sync::Arc;
use std::time::Instant;

use berth_core::HubTemplate;
use berth_spawner::{ImageInfo, Progress};
use tracing::Instrument;

use super::Servers;
use crate::error::{HubError, HubResult};

/// Where a build asked for ahead of a start stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BuildState {
    /// Under way; the last step it reported.
    Building {
        step: String,
    },
    Built {
        seconds: u64,
    },
    /// Nothing to build: the image was there, or the spawner runs no images.
    Present,
    Failed {
        reason: String,
    },
}

/// One template's image.
#[derive(Debug, Clone)]
pub struct TemplateImage {
    pub id: String,
    pub name: String,
    pub image: String,
    /// What the spawner has of it; `None`: not built (or not pulled).
    pub info: Option<ImageInfo>,
    /// The last build asked for ahead of a start, if any.
    pub build: Option<BuildState>,
}

impl Servers {
    /// The templates the hub runs (those users may pick, and the default
    /// server's) — what the spawner has of their images.
    pub async fn template_images(&self) -> HubResult<Vec<TemplateImage>> {
        let mut list: Vec<&HubTemplate> = self.templates.templates().iter().collect();
        if let Some(d) = self.templates.default_template() {
            if !list.iter().any(|t| t.id == d.id) {
                list.insert(0, d);
            }
        }
        let images: Vec<String> = list.iter().map(|t| t.image.clone()).collect();
        let have = self.spawner.images(&images).await.map_err(|e| HubError::Spawner { message: e.to_string() })?;
        let builds = self.image_builds.lock().map(|b| b.clone()).unwrap_or_default();
        Ok(list
            .into_iter()
            .map(|t| TemplateImage {
                id: t.id.clone(),
                name: t.name.clone(),
                image: t.image.clone(),
                info: have.iter().find(|i| i.image == t.image).cloned(),
                build: builds.get(&t.id).cloned(),
            })
            .collect())
    }

    /// Makes template `id`'s image (built from its context, or pulled) unless
    /// the spawner has it, logging each step; returns when done. A start of
    /// the same template meanwhile waits for this build.
    pub async fn build_template_image(&self, id: &str) -> HubResult<BuildState> {
        let t = self.templates.require(id, false)?;
        let (image, build) = (t.image.clone(), t.build.clone());
        let set = |state: BuildState| {
            if let Ok(mut b) = self.image_builds.lock() {
                b.insert(id.to_string(), state);
            }
        };
        set(BuildState::Building { step: "waiting for the engine".into() });
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Progress>();
        let steps = async {
            while let Some(p) = rx.recv().await {
                tracing::info!(template = %id, "{}", p.message);
                set(BuildState::Building { step: p.message });
            }
        };
        let started = Instant::now();
        let limit = self.cfg.build_timeout_seconds;
        let made = async {
            let r = tokio::time::timeout(limit, self.spawner.prepare_image(&image, &build, tx)).await;
            match r {
                Ok(Ok(true)) => BuildState::Built { seconds: started.elapsed().as_secs() },
                Ok(Ok(false)) => BuildState::Present,
                Ok(Err(e)) => BuildState::Failed { reason: e.to_string() },
                Err(_) => BuildState::Failed { reason: format!("not built within {} s", limit.as_secs()) },
            }
        };
        let (state, ()) = tokio::join!(made, steps);
        match &state {
            BuildState::Built { seconds } => tracing::info!(template = %id, %image, seconds, "prebuilt"),
            BuildState::Present => {
                tracing::info!(template = %id, %image, spawner = self.spawner.kind(), "nothing to build: the image is there, or this spawner runs no images")
            }
            BuildState::Failed { reason } => {
                tracing::warn!(template = %id, %image, error = %reason, "build failed; the first start will try again")
            }
            BuildState::Building { .. } => {}
        }
        set(state.clone());
        Ok(state)
    }

    /// `build_template_image` in the background (the admin page's button);
    /// refused while that template is building already.
    pub fn start_template_build(self: &Arc<Self>, id: &str) -> HubResult<()> {
        let t = self.templates.require(id, false)?;
        let building = self
            .image_builds
            .lock()
            .map(|b| matches!(b.get(&t.id), Some(BuildState::Building { .. })))
            .unwrap_or(false);
        if building {
            return Err(HubError::Busy { server: format!("the build of {}", t.id) });
        }
        let (me, id) = (self.clone(), t.id.clone());
        let span = tracing::info_span!("build", template = %id);
        self.tasks.spawn(
            async move {
                let _ = me.build_template_image(&id).await;
            }
            .instrument(span),
        );
        Ok(())
    }
}
