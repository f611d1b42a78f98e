//! Catalog templates built on demand: a start whose image the engine lacks
//! builds it from the rendered context the hub hands in (the tag is the
//! context's hash, so an unchanged template never builds twice), with the
//! build's steps as progress. One build or pull at a time: concurrent starts
//! of the same template wait for the first and then find the image. The
//! engine tags an image only when its build succeeds, so a failed build
//! leaves no half-made tag.

use std::collections::VecDeque;

use berth_spawner::{Progress, ProgressTx, SpawnError};
use bollard::query_parameters::BuildImageOptions;
use futures_util::StreamExt;

use crate::single::BuildStep;
use crate::{DockerSpawner, LABEL_MANAGED};

/// Lines of the build's output kept for the error message.
const TAIL: usize = 6;

impl DockerSpawner {
    /// Uses `image` when the engine has it, else builds it from `files`.
    pub(crate) async fn ensure_built(
        &self,
        image: &str,
        files: &[(String, String)],
        progress: &ProgressTx,
    ) -> Result<(), SpawnError> {
        if self.client()?.inspect_image(image).await.is_ok() {
            return Ok(());
        }
        let _one_at_a_time = self.pull_lock.lock().await;
        if self.client()?.inspect_image(image).await.is_ok() {
            return Ok(());
        }
        let _ = progress
            .send(Progress { progress: 12, message: format!("Building {image} (first start of this template)…") });
        let refs: Vec<(&str, String)> = files.iter().map(|(p, t)| (p.as_str(), t.clone())).collect();
        let tar = crate::single::context_tar(&refs).map_err(SpawnError::Io)?;
        let opts = BuildImageOptions {
            dockerfile: "Dockerfile".into(),
            t: Some(image.to_string()),
            rm: true,
            forcerm: true,
            labels: Some(std::collections::HashMap::from([(LABEL_MANAGED.to_string(), "true".to_string())])),
            ..Default::default()
        };
        let docker = self.client()?;
        let mut stream = docker.build_image(opts, None, Some(bollard::body_full(tar.into())));
        let mut tail: VecDeque<String> = VecDeque::new();
        let mut step = String::new();
        while let Some(item) = stream.next().await {
            let info = match item {
                Ok(info) => info,
                Err(e) => return Err(failed(image, &step, &e.to_string(), &tail)),
            };
            if let Some(message) = info.error {
                return Err(failed(image, &step, &message, &tail));
            }
            let Some(text) = info.stream.as_deref() else { continue };
            for line in text.lines().map(str::trim_end).filter(|l| !l.trim().is_empty()) {
                if tail.len() == TAIL {
                    tail.pop_front();
                }
                tail.push_back(line.to_string());
            }
            if let Some(s) = BuildStep::parse(text) {
                step = format!("step {}/{} ({})", s.done, s.total, s.text.trim());
                let pct = 12 + (s.done * 23 / s.total.max(1)) as u8;
                let _ = progress.send(Progress { progress: pct.min(35), message: format!("Building {image}: {step}") });
            }
        }
        if self.client()?.inspect_image(image).await.is_err() {
            return Err(SpawnError::Failed(format!("built {image}, but the engine does not list it")));
        }
        let _ = progress.send(Progress { progress: 35, message: format!("Built {image}") });
        tracing::info!(%image, "built a template image");
        Ok(())
    }
}

fn failed(image: &str, step: &str, why: &str, tail: &VecDeque<String>) -> SpawnError {
    let at = if step.is_empty() { String::new() } else { format!(" at {step}") };
    let out: Vec<&str> = tail.iter().map(String::as_str).collect();
    SpawnError::Failed(format!("building {image} failed{at}: {}; its last output: {}", why.trim(), out.join(" | ")))
}
