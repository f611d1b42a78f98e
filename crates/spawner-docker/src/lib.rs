//! The Docker spawner: each server in its own container, talking to the
//! engine through its API (bollard; never the `docker` CLI).
//!
//! Containers are named `berth-<user>[--<server>]` and labelled with owner,
//! server and template, so a restarted hub finds them again; per-user named
//! volumes (home, workspace, cache) and one shared volume are created on
//! first use and kept. GPUs arrive as explicit device ids (allocated by the
//! hub) and become `DeviceRequests`.
//!
//! Must not know the store or HTTP.
#![forbid(unsafe_code)]

mod exec;
pub mod gpu;
pub mod single;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use berth_spawner::{BoxFuture, Progress, ProgressTx, SpawnError, SpawnSpec, Spawner, Started, Status, StopGrace};
use bollard::models::{
    ContainerCreateBody, DeviceRequest, HostConfig, Mount, MountTypeEnum, NetworkCreateRequest, RestartPolicy,
    RestartPolicyNameEnum, VolumeCreateOptions,
};
use bollard::query_parameters::{
    CreateContainerOptions, CreateImageOptions, InspectContainerOptions, ListContainersOptions, LogsOptions,
    RemoveContainerOptions, StartContainerOptions, StopContainerOptions,
};
use bollard::Docker;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::json;

pub const LABEL_MANAGED: &str = "berth.managed";
pub const LABEL_USER: &str = "berth.user";
pub const LABEL_SERVER: &str = "berth.server";
pub const LABEL_TEMPLATE: &str = "berth.template";

/// The port the single-user server listens on inside its container.
pub const CONTAINER_PORT: u16 = 8888;

/// The `[docker]` section of berth's configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Image for servers that do not name one.
    pub image: String,
    /// Network the containers join (created if missing); the hub reaches them on it.
    pub network: String,
    /// URL containers use to reach the hub's API; empty derives it from the network's gateway.
    pub hub_connect_url: String,
    /// Remove the container when its server stops (volumes are always kept).
    pub remove_on_stop: bool,
    /// Where the user's workspace volume is mounted.
    pub workdir: String,
    /// Where the user's home volume is mounted.
    pub home_dir: String,
    /// Where the user's cache volume is mounted.
    pub cache_dir: String,
    /// The shared volume (empty turns it off) and where it is mounted.
    pub shared_volume: String,
    pub shared_mount: String,
    /// Volume driver and its options (`key=value;key=value`), e.g. CIFS:
    /// `type=cifs;device=//server/share;o=username=u,password=p`.
    pub shared_volume_driver: String,
    pub shared_volume_opts: String,
    /// `/dev/shm` size in MiB (PyTorch data loaders need more than Docker's 64 MB).
    pub shm_size_mib: u64,
    /// CPU limit in cores (0: none) and memory limit in MiB (0: none).
    pub cpu_limit: f64,
    pub mem_limit_mib: u64,
    /// Extra environment for every container: `KEY=value;KEY=value`.
    pub env: String,
    /// Driver named in GPU device requests.
    pub gpu_driver: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            image: "jupyter/base-notebook:latest".into(),
            network: "berth".into(),
            hub_connect_url: String::new(),
            remove_on_stop: true,
            workdir: "/home/lab/workspace".into(),
            home_dir: "/home".into(),
            cache_dir: "/home/lab/.cache".into(),
            shared_volume: "berth-shared".into(),
            shared_mount: "/mnt/shared".into(),
            shared_volume_driver: "local".into(),
            shared_volume_opts: String::new(),
            shm_size_mib: 2048,
            cpu_limit: 0.0,
            mem_limit_mib: 0,
            env: String::new(),
            gpu_driver: "nvidia".into(),
        }
    }
}

/// Variables passed through from berth's environment when set (the
/// original deployment's service toggles).
const PASS_THROUGH: &[&str] = &["ENABLE_SERVICE_MLFLOW", "ENABLE_SERVICE_GLANCES", "ENABLE_SERVICE_TENSORBOARD"];

pub fn parse_pairs(s: &str) -> Vec<(String, String)> {
    s.split(';')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .filter(|(k, _)| !k.is_empty())
        .collect()
}

pub fn container_name(user: &str, server: &str) -> String {
    if server.is_empty() {
        format!("berth-{user}")
    } else {
        format!("berth-{user}--{server}")
    }
}

pub struct DockerSpawner {
    /// Connected on first use and again after the engine went away, so an
    /// engine that restarts (or starts after berth) needs no berth restart.
    docker: std::sync::Mutex<Option<Docker>>,
    cfg: Config,
    /// The hub's port, for the derived `hub_connect_url`.
    hub_port: std::sync::atomic::AtomicU16,
    base_url: String,
    pull_lock: tokio::sync::Mutex<()>,
    /// The engine does not refuse a second network of the same name, so
    /// creation is one at a time.
    network_lock: tokio::sync::Mutex<()>,
}

fn engine_error(e: bollard::errors::Error) -> SpawnError {
    use bollard::errors::Error as E;
    match &e {
        E::DockerResponseServerError { status_code, message } => {
            SpawnError::Failed(format!("the Docker engine refused ({status_code}): {message}"))
        }
        E::IOError { .. } | E::HyperResponseError { .. } | E::RequestTimeoutError => SpawnError::Failed(format!(
            "the Docker engine does not answer ({e}); is it running? Starts work again once it is back"
        )),
        _ => SpawnError::Failed(format!("Docker: {e}")),
    }
}

fn is_not_found(e: &bollard::errors::Error) -> bool {
    matches!(e, bollard::errors::Error::DockerResponseServerError { status_code: 404, .. })
}

impl DockerSpawner {
    /// Connects to the local engine (DOCKER_HOST or the default socket).
    pub fn connect(cfg: Config, base_url: &str) -> Result<Arc<DockerSpawner>, SpawnError> {
        let docker = Docker::connect_with_local_defaults().ok();
        Ok(Arc::new(DockerSpawner {
            docker: std::sync::Mutex::new(docker),
            cfg,
            hub_port: std::sync::atomic::AtomicU16::new(0),
            base_url: base_url.to_string(),
            pull_lock: tokio::sync::Mutex::new(()),
            network_lock: tokio::sync::Mutex::new(()),
        }))
    }

    /// The engine client, connecting if needed.
    pub fn client(&self) -> Result<Docker, SpawnError> {
        let mut slot = self.docker.lock().map_err(|_| SpawnError::Failed("Docker client lock poisoned".into()))?;
        if let Some(d) = slot.as_ref() {
            return Ok(d.clone());
        }
        let d = Docker::connect_with_local_defaults().map_err(|e| {
            SpawnError::Failed(format!(
                "the Docker engine does not answer ({e}); is it running? Starts work again once it is back"
            ))
        })?;
        *slot = Some(d.clone());
        Ok(d)
    }

    /// Forgets the client after a connection failure, so the next call reconnects.
    fn reset_on(&self, e: &SpawnError) {
        if e.to_string().contains("does not answer") {
            if let Ok(mut slot) = self.docker.lock() {
                *slot = None;
            }
        }
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Tells the spawner the hub's port once it is bound.
    pub fn set_hub_port(&self, port: u16) {
        self.hub_port.store(port, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether the engine answers, and its version.
    pub async fn ping(&self) -> Result<String, SpawnError> {
        let v = self.client()?.version().await.map_err(engine_error);
        if let Err(e) = &v {
            self.reset_on(e);
        }
        Ok(v?.version.unwrap_or_else(|| "unknown".into()))
    }

    /// Creates the network unless it exists; returns its gateway address.
    pub async fn ensure_network(&self) -> Result<String, SpawnError> {
        let _one_at_a_time = self.network_lock.lock().await;
        let name = &self.cfg.network;
        let net = match self
            .client()?
            .inspect_network(name, None::<bollard::query_parameters::InspectNetworkOptions>)
            .await
        {
            Ok(n) => n,
            Err(e) if is_not_found(&e) => {
                let labels = HashMap::from([(LABEL_MANAGED.to_string(), "true".to_string())]);
                let req = NetworkCreateRequest {
                    name: name.clone(),
                    driver: Some("bridge".into()),
                    labels: Some(labels),
                    ..Default::default()
                };
                match self.client()?.create_network(req).await {
                    Ok(_) => {}
                    // Created meanwhile by a concurrent start.
                    Err(bollard::errors::Error::DockerResponseServerError { status_code: 409, .. }) => {}
                    Err(e) => return Err(engine_error(e)),
                }
                self.client()?
                    .inspect_network(name, None::<bollard::query_parameters::InspectNetworkOptions>)
                    .await
                    .map_err(engine_error)?
            }
            Err(e) => return Err(engine_error(e)),
        };
        let gateway = net
            .ipam
            .and_then(|i| i.config)
            .and_then(|c| c.into_iter().find_map(|c| c.gateway))
            .ok_or_else(|| SpawnError::Failed(format!("the Docker network {name} has no gateway address")))?;
        Ok(gateway)
    }

    async fn ensure_volume(
        &self,
        name: &str,
        driver: &str,
        opts: &[(String, String)],
        user: &str,
    ) -> Result<(), SpawnError> {
        match self.client()?.inspect_volume(name).await {
            Ok(_) => return Ok(()),
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(engine_error(e)),
        }
        let mut labels = HashMap::from([(LABEL_MANAGED.to_string(), "true".to_string())]);
        if !user.is_empty() {
            labels.insert(LABEL_USER.to_string(), user.to_string());
        }
        let req = VolumeCreateOptions {
            name: Some(name.to_string()),
            driver: Some(driver.to_string()),
            driver_opts: Some(opts.iter().cloned().collect()),
            labels: Some(labels),
            ..Default::default()
        };
        self.client()?.create_volume(req).await.map_err(engine_error)?;
        Ok(())
    }

    /// Uses a local image, or pulls it with progress (bytes) on the way.
    async fn ensure_image(&self, image: &str, progress: &ProgressTx) -> Result<(), SpawnError> {
        if self.client()?.inspect_image(image).await.is_ok() {
            return Ok(());
        }
        let _one_pull = self.pull_lock.lock().await;
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

    fn hub_api_url(&self, gateway: &str) -> String {
        if !self.cfg.hub_connect_url.is_empty() {
            return self.cfg.hub_connect_url.trim_end_matches('/').to_string();
        }
        let port = self.hub_port.load(std::sync::atomic::Ordering::Relaxed);
        format!("http://{gateway}:{port}{}hub/api", self.base_url)
    }

    /// The container's creation request, as `start` sends it (public so tests
    /// can check what a GPU server's container carries without a GPU).
    pub fn container_body(&self, spec: &SpawnSpec, api_url: &str) -> ContainerCreateBody {
        let image = spec.image.clone().unwrap_or_else(|| self.cfg.image.clone());
        let mut env: Vec<String> = Vec::new();
        for (k, v) in &spec.env {
            let v = match k.as_str() {
                "JUPYTERHUB_API_URL" => api_url.to_string(),
                "JUPYTERHUB_ACTIVITY_URL" => format!("{api_url}/users/{}/activity", spec.user),
                _ => v.clone(),
            };
            env.push(format!("{k}={v}"));
        }
        let port = spec.port.unwrap_or(CONTAINER_PORT);
        env.push(format!("JUPYTERHUB_SERVICE_URL=http://0.0.0.0:{port}{}", spec.prefix));
        for k in PASS_THROUGH {
            if let Ok(v) = std::env::var(k) {
                env.push(format!("{k}={v}"));
            }
        }
        env.extend(parse_pairs(&self.cfg.env).into_iter().map(|(k, v)| format!("{k}={v}")));
        if !spec.gpus.is_empty() {
            env.push(format!("NVIDIA_VISIBLE_DEVICES={}", spec.gpus.join(",")));
        }
        let vol = |suffix: &str| format!("berth-{}-{suffix}", spec.user);
        let mount = |source: String, target: &str| Mount {
            source: Some(source),
            target: Some(target.to_string()),
            typ: Some(MountTypeEnum::VOLUME),
            ..Default::default()
        };
        let mut mounts = vec![
            mount(vol("home"), &self.cfg.home_dir),
            mount(vol("workspace"), &self.cfg.workdir),
            mount(vol("cache"), &self.cfg.cache_dir),
        ];
        if !self.cfg.shared_volume.is_empty() {
            mounts.push(mount(self.cfg.shared_volume.clone(), &self.cfg.shared_mount));
        }
        let device_requests = (!spec.gpus.is_empty()).then(|| {
            vec![DeviceRequest {
                driver: Some(self.cfg.gpu_driver.clone()),
                device_ids: Some(spec.gpus.clone()),
                capabilities: Some(vec![vec!["gpu".to_string()]]),
                ..Default::default()
            }]
        });
        let labels = HashMap::from([
            (LABEL_MANAGED.to_string(), "true".to_string()),
            (LABEL_USER.to_string(), spec.user.clone()),
            (LABEL_SERVER.to_string(), spec.server.clone()),
            (LABEL_TEMPLATE.to_string(), spec.template.clone()),
        ]);
        let host_config = HostConfig {
            network_mode: Some(self.cfg.network.clone()),
            mounts: Some(mounts),
            shm_size: Some((self.cfg.shm_size_mib * 1024 * 1024) as i64),
            nano_cpus: (self.cfg.cpu_limit > 0.0).then_some((self.cfg.cpu_limit * 1e9) as i64),
            memory: (self.cfg.mem_limit_mib > 0).then(|| (self.cfg.mem_limit_mib * 1024 * 1024) as i64),
            device_requests,
            restart_policy: Some(RestartPolicy { name: Some(RestartPolicyNameEnum::NO), maximum_retry_count: None }),
            init: Some(true),
            ..Default::default()
        };
        ContainerCreateBody {
            image: Some(image),
            cmd: (!spec.cmd.is_empty())
                .then(|| spec.cmd.iter().map(|a| a.replace("{port}", &port.to_string())).collect()),
            env: Some(env),
            labels: Some(labels),
            working_dir: Some(self.cfg.workdir.clone()),
            exposed_ports: Some(HashMap::from([(format!("{port}/tcp"), HashMap::new())])),
            host_config: Some(host_config),
            ..Default::default()
        }
    }

    /// Creates (but does not start) the server's container; returns its id.
    pub async fn create(&self, spec: &SpawnSpec, progress: &ProgressTx) -> Result<String, SpawnError> {
        self.create_timed(spec, progress).await.map(|(id, _)| id)
    }

    /// `create`, also returning the time spent in the engine's create call.
    async fn create_timed(&self, spec: &SpawnSpec, progress: &ProgressTx) -> Result<(String, Duration), SpawnError> {
        let gateway = self.ensure_network().await?;
        let image = spec.image.clone().unwrap_or_else(|| self.cfg.image.clone());
        self.ensure_image(&image, progress).await?;
        let _ = progress.send(Progress { progress: 40, message: "Preparing volumes…".into() });
        for suffix in ["home", "workspace", "cache"] {
            self.ensure_volume(&format!("berth-{}-{suffix}", spec.user), "local", &[], &spec.user).await?;
        }
        if !self.cfg.shared_volume.is_empty() {
            let opts = parse_pairs(&self.cfg.shared_volume_opts);
            self.ensure_volume(&self.cfg.shared_volume, &self.cfg.shared_volume_driver, &opts, "").await?;
        }
        let name = container_name(&spec.user, &spec.server);
        // A container of that name left from an earlier run (kept on stop, or
        // the engine restarted): it is berth's, so replace it.
        match self.client()?.inspect_container(&name, None::<InspectContainerOptions>).await {
            Ok(existing) => {
                let ours = existing
                    .config
                    .and_then(|c| c.labels)
                    .is_some_and(|l| l.get(LABEL_MANAGED).is_some_and(|v| v == "true"));
                if !ours {
                    return Err(SpawnError::Failed(format!(
                        "a container named {name} exists and is not berth's; remove or rename it"
                    )));
                }
                self.client()?
                    .remove_container(&name, Some(RemoveContainerOptions { force: true, ..Default::default() }))
                    .await
                    .map_err(engine_error)?;
            }
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(engine_error(e)),
        }
        let body = self.container_body(spec, &self.hub_api_url(&gateway));
        let t = std::time::Instant::now();
        let created = self
            .client()?
            .create_container(Some(CreateContainerOptions { name: Some(name.clone()), ..Default::default() }), body)
            .await
            .map_err(engine_error)?;
        Ok((created.id, t.elapsed()))
    }

    async fn container_ip(&self, id: &str) -> Result<Option<String>, SpawnError> {
        let c = self.client()?.inspect_container(id, None::<InspectContainerOptions>).await.map_err(engine_error)?;
        Ok(c.network_settings
            .and_then(|n| n.networks)
            .and_then(|mut nets| nets.remove(&self.cfg.network))
            .and_then(|e| e.ip_address)
            .filter(|ip| !ip.is_empty()))
    }

    async fn remove(&self, id: &str) {
        let Ok(docker) = self.client() else { return };
        if let Err(e) =
            docker.remove_container(id, Some(RemoveContainerOptions { force: true, ..Default::default() })).await
        {
            if !is_not_found(&e) {
                tracing::warn!(container = %id, error = %e, "could not remove the container");
            }
        }
    }

    /// Removes a user's volumes (asked for explicitly when deleting a user).
    pub async fn remove_user_volumes(&self, user: &str) -> Result<(), SpawnError> {
        for suffix in ["home", "workspace", "cache"] {
            match self
                .client()?
                .remove_volume(
                    &format!("berth-{user}-{suffix}"),
                    None::<bollard::query_parameters::RemoveVolumeOptions>,
                )
                .await
            {
                Ok(()) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(engine_error(e)),
            }
        }
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

fn state_id(state: &serde_json::Value) -> Result<String, SpawnError> {
    state
        .get("container_id")
        .and_then(|v| v.as_str())
        .map(str::to_string)
        .ok_or_else(|| SpawnError::BadState(format!("no container_id in {state}")))
}

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

    fn remove_user_data<'a>(&'a self, user: &'a str) -> BoxFuture<'a, Result<(), SpawnError>> {
        Box::pin(self.remove_user_volumes(user))
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

    #[test]
    fn pairs() {
        assert_eq!(
            parse_pairs("type=cifs;device=//srv/share;o=username=u,password=p"),
            vec![
                ("type".to_string(), "cifs".to_string()),
                ("device".to_string(), "//srv/share".to_string()),
                ("o".to_string(), "username=u,password=p".to_string())
            ]
        );
        assert!(parse_pairs("").is_empty());
    }

    #[test]
    fn names() {
        assert_eq!(container_name("alice", ""), "berth-alice");
        assert_eq!(container_name("alice", "lab"), "berth-alice--lab");
    }
}
