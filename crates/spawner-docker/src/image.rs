//! Images: a local one is used as is, a missing one is pulled with progress.

use std::collections::HashMap;
use std::time::Duration;

use berth_spawner::{Progress, ProgressTx, SpawnError};
use bollard::query_parameters::CreateImageOptions;
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
        let (from_image, tag) = split_image(image);
        let _ = progress.send(Progress { progress: 15, message: format!("Pulling {image}…") });
        let opts = CreateImageOptions { from_image: Some(from_image), tag: Some(tag), ..Default::default() };
        let mut stream = self.client()?.create_image(Some(opts), None, None);
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
