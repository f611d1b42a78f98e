//! Catalog templates built on demand: a start whose image the engine lacks
//! builds it from the rendered context the hub hands in (the tag is the
//! context's hash, so an unchanged template never builds twice), with the
//! build's steps as progress. One build or pull of an image at a time:
//! concurrent starts of the same template wait for the first and then find
//! the image, while other templates build meanwhile. The
//! engine tags an image only when its build succeeds, so a failed build
//! leaves no half-made tag.

use std::collections::{HashMap, VecDeque};

use berth_spawner::{ImageInfo, Progress, ProgressTx, SpawnError};
use bollard::query_parameters::BuildImageOptions;
use bollard::Docker;
use futures_util::StreamExt;

use crate::single::BuildStep;
use crate::{engine_error, DockerSpawner, LABEL_MANAGED};

/// Lines of the build's output kept for the error message.
const TAIL: usize = 6;

impl DockerSpawner {
    /// Uses `image` when the engine has it, else builds it from `files`;
    /// `Ok(true)` when it built.
    pub(crate) async fn ensure_built(
        &self,
        image: &str,
        files: &[(String, String)],
        progress: &ProgressTx,
    ) -> Result<bool, SpawnError> {
        if self.client()?.inspect_image(image).await.is_ok() {
            return Ok(false);
        }
        let lock = self.image_lock(image);
        let _one_at_a_time = lock.lock().await;
        if self.client()?.inspect_image(image).await.is_ok() {
            return Ok(false);
        }
        let _ = progress
            .send(Progress { progress: 12, message: format!("Building {image} (first start of this template)…") });
        let refs: Vec<(&str, String)> = files.iter().map(|(p, t)| (p.as_str(), t.clone())).collect();
        let labels = HashMap::from([(LABEL_MANAGED.to_string(), "true".to_string())]);
        let docker = self.client()?;
        build_image(&docker, image, &refs, HashMap::new(), labels, |s| {
            let step = format!("step {}/{} ({})", s.done, s.total, s.text.trim());
            let pct = 12 + (s.done * 23 / s.total.max(1)) as u8;
            let _ = progress.send(Progress { progress: pct.min(35), message: format!("Building {image}: {step}") });
        })
        .await
        .map_err(|f| SpawnError::Failed(f.describe(image)))?;
        if self.client()?.inspect_image(image).await.is_err() {
            return Err(SpawnError::Failed(format!("built {image}, but the engine does not list it")));
        }
        let _ = progress.send(Progress { progress: 35, message: format!("Built {image}") });
        tracing::info!(%image, "built a template image");
        Ok(true)
    }
}

/// Why a build failed: the engine, the context, or a step (with where and
/// the last lines of output).
#[derive(Debug)]
pub(crate) enum BuildFailure {
    Engine(bollard::errors::Error),
    Context(std::io::Error),
    Step { step: String, message: String, tail: Vec<String> },
}

impl BuildFailure {
    /// One line for users: what failed, at which step, and the last output.
    pub(crate) fn describe(&self, image: &str) -> String {
        match self {
            BuildFailure::Engine(e) => format!("building {image} failed: {e}"),
            BuildFailure::Context(e) => format!("building {image} failed: the build context: {e}"),
            BuildFailure::Step { step, message, tail } => {
                let at = if step.is_empty() { String::new() } else { format!(" at {step}") };
                format!("building {image} failed{at}: {}; its last output: {}", message.trim(), tail.join(" | "))
            }
        }
    }
}

/// The one builder, for the hub's starts and `berth up`: builds `image`
/// from `files` (intermediate containers removed), calling `on_step` for
/// each step the engine begins.
pub(crate) async fn build_image(
    docker: &Docker,
    image: &str,
    files: &[(&str, String)],
    build_args: HashMap<String, String>,
    labels: HashMap<String, String>,
    mut on_step: impl FnMut(BuildStep<'_>),
) -> Result<(), BuildFailure> {
    let opts = BuildImageOptions {
        dockerfile: "Dockerfile".into(),
        t: Some(image.to_string()),
        rm: true,
        forcerm: true,
        buildargs: Some(build_args),
        labels: Some(labels),
        ..Default::default()
    };
    let tar = crate::single::context_tar(files).map_err(BuildFailure::Context)?;
    let mut stream = docker.build_image(opts, None, Some(bollard::body_full(tar.into())));
    let mut tail: VecDeque<String> = VecDeque::new();
    let mut step = String::new();
    while let Some(item) = stream.next().await {
        let info = match item {
            Ok(info) => info,
            // A step that fails comes as an error in the stream: the step
            // and what it printed say why.
            Err(bollard::errors::Error::DockerStreamError { error }) => {
                return Err(BuildFailure::Step { step, message: error, tail: tail.into() })
            }
            Err(e) => return Err(BuildFailure::Engine(e)),
        };
        if let Some(message) = info.error {
            return Err(BuildFailure::Step { step, message, tail: tail.into() });
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
            on_step(s);
        }
    }
    Ok(())
}

/// A hub template's image as the engine has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateImage {
    /// `berth-template-<id>:<hash>`.
    pub tag: String,
    pub size_bytes: i64,
    /// Unix seconds.
    pub created: i64,
}

impl crate::single::Engine {
    /// Builds a hub template's image (`image` = `berth-template-<id>:<hash>`)
    /// unless the engine has it; `Ok(false)` when it was there already.
    pub async fn build_template(
        &self,
        image: &str,
        files: &[(String, String)],
        on_step: impl FnMut(BuildStep<'_>),
    ) -> Result<bool, crate::single::Error> {
        if self.docker().inspect_image(image).await.is_ok() {
            return Ok(false);
        }
        let refs: Vec<(&str, String)> = files.iter().map(|(p, t)| (p.as_str(), t.clone())).collect();
        let labels = HashMap::from([(LABEL_MANAGED.to_string(), "true".to_string())]);
        build_image(self.docker(), image, &refs, HashMap::new(), labels, on_step)
            .await
            .map_err(|f| crate::single::Error::BuildStep { image: image.to_string(), message: f.describe(image) })?;
        Ok(true)
    }

    /// The hub templates' images the engine has (`berth-template-*`).
    pub async fn template_images(&self) -> Result<Vec<TemplateImage>, crate::single::Error> {
        use bollard::query_parameters::ListImagesOptions;
        let filters = HashMap::from([("reference".to_string(), vec!["berth-template-*".to_string()])]);
        let list = self
            .docker()
            .list_images(Some(ListImagesOptions { filters: Some(filters), ..Default::default() }))
            .await
            .map_err(|e| crate::single::Error::ListImages { cause: e.into() })?;
        let mut out: Vec<TemplateImage> = list
            .into_iter()
            .flat_map(|i| {
                let (size, created) = (i.size, i.created);
                i.repo_tags.into_iter().map(move |tag| TemplateImage { tag, size_bytes: size, created })
            })
            .filter(|t| t.tag.starts_with("berth-template-"))
            .collect();
        out.sort_by(|a, b| a.tag.cmp(&b.tag));
        Ok(out)
    }

    /// Names of the containers, running or not, created from the name
    /// `image` (another tag of the same image does not count: removing this
    /// one only untags it).
    pub async fn containers_using(&self, image: &str) -> Result<Vec<String>, crate::single::Error> {
        containers_using(self.docker(), image).await.map_err(|e| crate::single::Error::List { cause: e.into() })
    }

    /// Removes the tag `image` (and its layers once nothing else holds them).
    /// Never forced: the engine refuses while a container uses it.
    pub async fn remove_template_image(&self, image: &str) -> Result<(), crate::single::Error> {
        use bollard::query_parameters::RemoveImageOptions;
        if !image.starts_with("berth-template-") {
            return Err(crate::single::Error::NotTemplateImage { image: image.to_string() });
        }
        self.docker()
            .remove_image(image, Some(RemoveImageOptions { force: false, noprune: false }), None)
            .await
            .map_err(|e| crate::single::Error::RemoveImage { image: image.to_string(), cause: e.into() })?;
        Ok(())
    }
}

/// Names of the containers, running or not, created from the name `image`.
pub(crate) async fn containers_using(docker: &Docker, image: &str) -> Result<Vec<String>, bollard::errors::Error> {
    use bollard::query_parameters::ListContainersOptions;
    let filters = HashMap::from([("ancestor".to_string(), vec![image.to_string()])]);
    let opts = ListContainersOptions { all: true, filters: Some(filters), ..Default::default() };
    let list = docker.list_containers(Some(opts)).await?;
    Ok(list
        .into_iter()
        .filter(|c| c.image.as_deref() == Some(image))
        .filter_map(|c| c.names.and_then(|n| n.first().cloned()))
        .map(|n| n.trim_start_matches('/').to_string())
        .collect())
}

impl DockerSpawner {
    /// Those of `images` the engine has (the admin's templates page).
    pub(crate) async fn image_infos(&self, images: &[String]) -> Result<Vec<ImageInfo>, SpawnError> {
        use bollard::query_parameters::ListImagesOptions;
        if images.is_empty() {
            return Ok(Vec::new());
        }
        let docker = self.client()?;
        let filters = HashMap::from([("reference".to_string(), images.to_vec())]);
        let list = docker
            .list_images(Some(ListImagesOptions { filters: Some(filters), ..Default::default() }))
            .await
            .map_err(engine_error)?;
        let mut out = Vec::new();
        for i in list {
            for tag in i.repo_tags.iter().filter(|t| images.contains(t)) {
                let used_by = containers_using(&docker, tag).await.map_err(engine_error)?;
                out.push(ImageInfo { image: tag.clone(), size_bytes: i.size, created: i.created, used_by });
            }
        }
        out.sort_by(|a, b| a.image.cmp(&b.image));
        Ok(out)
    }
}
