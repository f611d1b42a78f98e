//! Images: a local one is used as is, a missing one is pulled with progress.
//! The image-update check asks the registry (through the engine's
//! distribution endpoint, with the configured credentials) for a tag's
//! digest, and an update pulls the tag anew keeping the old copy tagged.

use std::collections::HashMap;
use std::time::Duration;

use berth_spawner::{Progress, ProgressTx, RegistryImage, SpawnError};
use bollard::auth::DockerCredentials;
use bollard::query_parameters::{CreateImageOptions, TagImageOptions};
use futures_util::StreamExt;

use crate::{engine_error, DockerSpawner};

impl DockerSpawner {
    /// Uses a local image, or pulls it with progress (bytes) on the way.
    pub(crate) async fn ensure_image(&self, image: &str, progress: &ProgressTx) -> Result<(), SpawnError> {
        if self.client()?.inspect_image(image).await.is_ok() {
            return Ok(());
        }
        let lock = self.image_lock(image);
        let _one_at_a_time = lock.lock().await;
        if self.client()?.inspect_image(image).await.is_ok() {
            return Ok(());
        }
        self.pull(image, progress).await
    }

    /// Pulls `image` (with the configured registry credentials), reporting
    /// bytes on the way.
    async fn pull(&self, image: &str, progress: &ProgressTx) -> Result<(), SpawnError> {
        let (from_image, tag) = split_image(image);
        let _ = progress.send(Progress { progress: 15, message: format!("Pulling {image}…") });
        let opts = CreateImageOptions { from_image: Some(from_image), tag: Some(tag), ..Default::default() };
        let mut stream = self.client()?.create_image(Some(opts), None, self.credentials());
        let mut layers: HashMap<String, (i64, i64)> = HashMap::new();
        let mut last_report = std::time::Instant::now() - Duration::from_secs(1);
        while let Some(item) = stream.next().await {
            let info = item.map_err(|e| match e {
                bollard::errors::Error::DockerResponseServerError { message, .. } => {
                    SpawnError::Failed(format!("cannot pull {image}: {message}"))
                }
                bollard::errors::Error::DockerStreamError { error } => {
                    SpawnError::Failed(format!("cannot pull {image}: {error}"))
                }
                other => engine_error(other),
            })?;
            if let Some(err) = info.error {
                return Err(SpawnError::Failed(format!("cannot pull {image}: {err}")));
            }
            if let (Some(id), Some(d)) = (info.id, info.progress_detail) {
                if let (Some(cur), Some(total)) = (d.current, d.total) {
                    if total > 0 && info.status.as_deref() == Some("Downloading") {
                        layers.insert(id, (cur, total));
                    }
                }
            }
            if last_report.elapsed() > Duration::from_millis(500) && !layers.is_empty() {
                last_report = std::time::Instant::now();
                let (cur, total) = layers.values().fold((0, 0), |a, (c, t)| (a.0 + c, a.1 + t));
                let pct = 15 + (cur * 20 / total.max(1)) as u8;
                let _ = progress.send(Progress {
                    progress: pct.min(35),
                    message: format!("Pulling {image}: {} of {} downloaded", mib(cur), mib(total)),
                });
            }
        }
        if self.client()?.inspect_image(image).await.is_err() {
            return Err(SpawnError::Failed(format!("pulled {image}, but the engine does not list it")));
        }
        let _ = progress.send(Progress { progress: 35, message: format!("Pulled {image}") });
        Ok(())
    }
}

impl DockerSpawner {
    /// The configured registry credentials, if any.
    fn credentials(&self) -> Option<DockerCredentials> {
        let (user, pass) = (&self.cfg.registry_username, &self.cfg.registry_password.0);
        if user.is_empty() && pass.is_empty() {
            return None;
        }
        Some(DockerCredentials { username: Some(user.clone()), password: Some(pass.clone()), ..Default::default() })
    }

    /// The digest the registry serves for `image` now, refused when the
    /// registry serves no manifest for the engine's platform.
    pub(crate) async fn registry_image(&self, image: &str) -> Result<RegistryImage, SpawnError> {
        let docker = self.client()?;
        let dist =
            docker.inspect_registry_image(image, self.credentials()).await.map_err(|e| registry_error(image, e))?;
        let remote_digest = dist
            .descriptor
            .digest
            .filter(|d| !d.is_empty())
            .ok_or_else(|| SpawnError::Failed(format!("the registry named no digest for {image}")))?;
        let version = docker.version().await.map_err(engine_error)?;
        let (os, arch) = (version.os.unwrap_or_default(), version.arch.unwrap_or_default());
        let platforms: Vec<String> = dist
            .platforms
            .iter()
            .map(|p| format!("{}/{}", p.os.as_deref().unwrap_or("?"), p.architecture.as_deref().unwrap_or("?")))
            .collect();
        if !platforms.is_empty() && !platforms.iter().any(|p| *p == format!("{os}/{arch}")) {
            return Err(SpawnError::Failed(format!(
                "the registry serves {image} for {} only, not for this engine's {os}/{arch}",
                platforms.join(", ")
            )));
        }
        Ok(RegistryImage { image: image.to_string(), remote_digest, local_digest: self.local_digest(image).await? })
    }

    /// The digest the engine's copy of `image` came from its registry with.
    async fn local_digest(&self, image: &str) -> Result<Option<String>, SpawnError> {
        let (repo, _) = split_image(image);
        let Ok(i) = self.client()?.inspect_image(image).await else { return Ok(None) };
        Ok(i.repo_digests
            .unwrap_or_default()
            .iter()
            .filter_map(|d| d.split_once('@'))
            .find(|(r, _)| *r == repo)
            .map(|(_, d)| d.to_string()))
    }

    /// Keeps the engine's copy of `image` as `previous`, pulls `image` anew;
    /// the new digest.
    pub(crate) async fn update_image(&self, image: &str, previous: &str) -> Result<String, SpawnError> {
        let lock = self.image_lock(image);
        let _one_at_a_time = lock.lock().await;
        let docker = self.client()?;
        if docker.inspect_image(image).await.is_ok() {
            self.tag(image, previous).await?;
        }
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        self.pull(image, &tx).await?;
        self.local_digest(image)
            .await?
            .ok_or_else(|| SpawnError::Failed(format!("pulled {image}, but the engine names no digest for it")))
    }

    /// Points `image` at the image tagged `previous` again.
    pub(crate) async fn restore_image(&self, image: &str, previous: &str) -> Result<(), SpawnError> {
        let lock = self.image_lock(image);
        let _one_at_a_time = lock.lock().await;
        self.tag(previous, image).await
    }

    /// Keeps `image` as `previous` and removes the name `image` (never the
    /// image itself: `previous` holds it). Nothing to do when the engine
    /// has no `image`.
    pub(crate) async fn set_aside_image(&self, image: &str, previous: &str) -> Result<(), SpawnError> {
        use bollard::query_parameters::RemoveImageOptions;
        let lock = self.image_lock(image);
        let _one_at_a_time = lock.lock().await;
        if self.client()?.inspect_image(image).await.is_err() {
            return Ok(());
        }
        self.tag(image, previous).await?;
        self.client()?
            .remove_image(image, Some(RemoveImageOptions { force: false, noprune: true }), None)
            .await
            .map_err(|e| SpawnError::Failed(format!("cannot remove the name {image}: {}", registry_message(&e))))?;
        Ok(())
    }

    /// Tags the image `from` also as `to`.
    async fn tag(&self, from: &str, to: &str) -> Result<(), SpawnError> {
        let (repo, tag) = split_image(to);
        self.client()?
            .tag_image(from, Some(TagImageOptions { repo: Some(repo), tag: Some(tag) }))
            .await
            .map_err(|e| SpawnError::Failed(format!("cannot tag {from} as {to}: {}", registry_message(&e))))
    }
}

/// What the engine said, without the request (which could name credentials).
fn registry_message(e: &bollard::errors::Error) -> String {
    match e {
        bollard::errors::Error::DockerResponseServerError { status_code, message } => {
            format!("{message} ({status_code})")
        }
        other => other.to_string(),
    }
}

/// A registry that does not answer, refuses the credentials, or lacks the tag.
fn registry_error(image: &str, e: bollard::errors::Error) -> SpawnError {
    let message = registry_message(&e);
    let lower = message.to_ascii_lowercase();
    let why = if lower.contains("unauthorized") || lower.contains("401") || lower.contains("authentication required") {
        "the registry refused the credentials (401)"
    } else if lower.contains("connection refused") || lower.contains("timeout") || lower.contains("no such host") {
        "the registry does not answer"
    } else {
        "the registry answered with an error"
    };
    SpawnError::Failed(format!("cannot check {image}: {why}: {message}"))
}

fn mib(b: i64) -> String {
    format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0))
}

/// `repo[:tag]` with registry ports kept in the repository part.
pub fn split_image(image: &str) -> (String, String) {
    let slash = image.rfind('/').map(|i| i + 1).unwrap_or(0);
    match image[slash..].rfind(':') {
        Some(i) => (image[..slash + i].to_string(), image[slash + i + 1..].to_string()),
        None => (image.to_string(), "latest".to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_names() {
        assert_eq!(split_image("ubuntu"), ("ubuntu".into(), "latest".into()));
        assert_eq!(split_image("a/b:1.2"), ("a/b".into(), "1.2".into()));
        assert_eq!(split_image("127.0.0.1:5000/x/y:tag"), ("127.0.0.1:5000/x/y".into(), "tag".into()));
        assert_eq!(split_image("127.0.0.1:5000/x/y"), ("127.0.0.1:5000/x/y".into(), "latest".into()));
    }
}
