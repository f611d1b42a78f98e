//! [`Spawner`] for [`DockerSpawner`]: start, stop, poll, list, logs, exec.

use std::collections::HashMap;

use berth_spawner::{
    BoxFuture, ImageInfo, Progress, ProgressTx, RegistryImage, SpawnError, SpawnSpec, Spawner, Started, Status,
    StopGrace,
};
use bollard::query_parameters::{
    InspectContainerOptions, ListContainersOptions, LogsOptions, StartContainerOptions, StopContainerOptions,
};
use futures_util::StreamExt;
use serde_json::json;

use crate::{
    container_name, engine_error, exec, is_not_found, state_id, DockerSpawner, CONTAINER_PORT, LABEL_MANAGED,
    LABEL_SERVER, LABEL_USER,
};

impl Spawner for DockerSpawner {
    fn exec<'a>(
        &'a self,
        _user: &'a str,
        state: &'a serde_json::Value,
        req: berth_spawner::ExecRequest,
    ) -> BoxFuture<'a, Result<berth_spawner::ExecProcess, SpawnError>> {
        Box::pin(async move { self.exec_in(&exec::state_container(state)?, req).await })
    }

    fn connect<'a>(
        &'a self,
        state: &'a serde_json::Value,
        port: u16,
    ) -> BoxFuture<'a, Result<tokio::net::TcpStream, SpawnError>> {
        Box::pin(async move { self.connect_in(&exec::state_container(state)?, port).await })
    }

    fn kind(&self) -> &'static str {
        "docker"
    }

    fn runs_images(&self) -> bool {
        true
    }

    fn start(&self, spec: SpawnSpec, progress: ProgressTx) -> BoxFuture<'_, Result<Started, SpawnError>> {
        Box::pin(async move {
            let t0 = std::time::Instant::now();
            let (id, create_time) = match self.create_timed(&spec, &progress).await {
                Ok(x) => x,
                Err(e) => {
                    self.reset_on(&e);
                    return Err(e);
                }
            };
            let _ = progress.send(Progress {
                progress: 45,
                message: format!("Starting container {}", container_name(&spec.user, &spec.server)),
            });
            let t_start = std::time::Instant::now();
            if let Err(e) = self.client()?.start_container(&id, None::<StartContainerOptions>).await {
                self.remove(&id).await;
                return Err(engine_error(e));
            }
            let ip = self.container_ip(&id).await;
            // Time in the engine's create, start and inspect calls, and in all of start.
            let engine = create_time + t_start.elapsed();
            let total = t0.elapsed();
            let ip = match ip {
                Ok(Some(ip)) => ip,
                Ok(None) => {
                    self.remove(&id).await;
                    return Err(SpawnError::Failed(format!(
                        "the container has no address on the network {}",
                        self.cfg.network
                    )));
                }
                Err(e) => {
                    self.remove(&id).await;
                    return Err(e);
                }
            };
            let target = format!("http://{ip}:{}", spec.port.unwrap_or(CONTAINER_PORT));
            tracing::info!(
                user = %spec.user,
                server = %spec.server,
                container = %&id[..12.min(id.len())],
                %target,
                gpus = ?spec.gpus,
                engine_ms = engine.as_secs_f64() * 1000.0,
                spawn_ms = total.as_secs_f64() * 1000.0,
                "started container"
            );
            Ok(Started {
                target: target.clone(),
                state: json!({
                    "container_id": id,
                    "container_name": container_name(&spec.user, &spec.server),
                    "target": target,
                    "gpus": spec.gpus,
                }),
            })
        })
    }

    fn stop<'a>(&'a self, state: &'a serde_json::Value, grace: StopGrace) -> BoxFuture<'a, Result<(), SpawnError>> {
        Box::pin(async move {
            let id = state_id(state)?;
            let t = (grace.interrupt + grace.terminate).as_secs().min(i32::MAX as u64) as i32;
            match self.client()?.stop_container(&id, Some(StopContainerOptions { t: Some(t), signal: None })).await {
                Ok(()) => {}
                Err(e) if is_not_found(&e) => return Ok(()),
                // 304: already stopped.
                Err(bollard::errors::Error::DockerResponseServerError { status_code: 304, .. }) => {}
                Err(e) => return Err(engine_error(e)),
            }
            if self.cfg.remove_on_stop {
                self.remove(&id).await;
            }
            Ok(())
        })
    }

    fn poll<'a>(&'a self, state: &'a serde_json::Value) -> BoxFuture<'a, Result<Status, SpawnError>> {
        Box::pin(async move {
            let id = state_id(state)?;
            match self.client()?.inspect_container(&id, None::<InspectContainerOptions>).await {
                Ok(c) => {
                    let st = c.state.unwrap_or_default();
                    if st.running == Some(true) {
                        return Ok(Status::Running);
                    }
                    let mut why = format!("the container exited with code {}", st.exit_code.unwrap_or(-1));
                    if st.oom_killed == Some(true) {
                        why.push_str(" (killed for using too much memory)");
                    }
                    if let Some(e) = st.error.filter(|e| !e.is_empty()) {
                        why.push_str(&format!(": {e}"));
                    }
                    Ok(Status::Exited(why))
                }
                Err(e) if is_not_found(&e) => Ok(Status::Exited("the container is gone".into())),
                Err(e) => Err(engine_error(e)),
            }
        })
    }

    fn list_managed(&self) -> BoxFuture<'_, Vec<(String, String, String)>> {
        Box::pin(async move {
            let filters = HashMap::from([("label".to_string(), vec![format!("{LABEL_MANAGED}=true")])]);
            let opts = ListContainersOptions { all: true, filters: Some(filters), ..Default::default() };
            let Ok(docker) = self.client() else { return Vec::new() };
            match docker.list_containers(Some(opts)).await {
                Ok(list) => list
                    .into_iter()
                    .filter_map(|c| {
                        let labels = c.labels.unwrap_or_default();
                        Some((
                            labels.get(LABEL_USER)?.clone(),
                            labels.get(LABEL_SERVER).cloned().unwrap_or_default(),
                            c.id?,
                        ))
                    })
                    .collect(),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot list berth's containers");
                    Vec::new()
                }
            }
        })
    }

    fn watch_exits(&self, exits: tokio::sync::mpsc::UnboundedSender<(String, String)>) -> BoxFuture<'_, ()> {
        Box::pin(self.watch_container_exits(exits))
    }

    fn remove_user_data<'a>(&'a self, user: &'a str, owner_id: &'a str) -> BoxFuture<'a, Result<(), SpawnError>> {
        Box::pin(self.remove_user_volumes(if owner_id.is_empty() { user } else { owner_id }))
    }

    fn images<'a>(&'a self, images: &'a [String]) -> BoxFuture<'a, Result<Vec<ImageInfo>, SpawnError>> {
        Box::pin(self.image_infos(images))
    }

    fn registry_image<'a>(&'a self, image: &'a str) -> BoxFuture<'a, Result<RegistryImage, SpawnError>> {
        Box::pin(DockerSpawner::registry_image(self, image))
    }

    fn update_image<'a>(&'a self, image: &'a str, previous: &'a str) -> BoxFuture<'a, Result<String, SpawnError>> {
        Box::pin(DockerSpawner::update_image(self, image, previous))
    }

    fn set_aside_image<'a>(&'a self, image: &'a str, previous: &'a str) -> BoxFuture<'a, Result<(), SpawnError>> {
        Box::pin(DockerSpawner::set_aside_image(self, image, previous))
    }

    fn restore_image<'a>(&'a self, image: &'a str, previous: &'a str) -> BoxFuture<'a, Result<(), SpawnError>> {
        Box::pin(DockerSpawner::restore_image(self, image, previous))
    }

    fn prepare_image<'a>(
        &'a self,
        image: &'a str,
        build: &'a [(String, String)],
        progress: ProgressTx,
    ) -> BoxFuture<'a, Result<bool, SpawnError>> {
        Box::pin(async move {
            if build.is_empty() {
                // A template on a named image: fetched as a start would.
                let had = self.client()?.inspect_image(image).await.is_ok();
                self.ensure_image(image, &progress).await?;
                return Ok(!had);
            }
            self.ensure_built(image, build, &progress).await
        })
    }

    fn logs<'a>(&'a self, user: &'a str, server: &'a str) -> BoxFuture<'a, Option<String>> {
        Box::pin(async move {
            let opts = LogsOptions { stdout: true, stderr: true, tail: "400".into(), ..Default::default() };
            let docker = self.client().ok()?;
            let mut s = docker.logs(&container_name(user, server), Some(opts));
            let mut out = String::new();
            while let Some(Ok(chunk)) = s.next().await {
                out.push_str(&chunk.to_string());
            }
            (!out.is_empty()).then_some(out)
        })
    }
}
