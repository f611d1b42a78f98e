//! The Swarm spawner: each server is a Docker Swarm service with one
//! replica, made from the same container the Docker spawner would run
//! (image, environment, volumes, labels, limits, dropped capabilities), so
//! the two share everything but the engine objects.
//!
//! A start waits for the service's task to run (a task that keeps failing
//! ends the start with its error, and the service is removed again); the
//! hub's readiness check then waits for the server's own answer. Stop
//! removes the service (volumes are kept). The saved state names the
//! service, its task and the task's container, so a restarted berth finds
//! them again; the services carry berth's labels.
//!
//! This first part runs every service on berth's own node (a placement
//! constraint on its node id): the images, the volumes, the GPU inventory
//! and the network the hub reaches servers on are that node's. GPUs cannot
//! be passed to a service as device requests (Swarm has no `--gpus`), so
//! the ids berth allocated go in `NVIDIA_VISIBLE_DEVICES`, plus a generic
//! resource reservation when the node advertises GPUs that way.
//!
//! The network is swarm-scoped but of the bridge driver, configured from a
//! config-only network with traffic between containers off — the Docker
//! spawner's isolation — so the hub, on the host, reaches tasks through the
//! bridge's gateway and they reach it there (docs/swarm.md says why not an
//! overlay yet).

use std::collections::HashMap;
use std::time::Duration;

use berth_spawner::{
    BoxFuture, ImageInfo, Progress, ProgressTx, RegistryImage, SpawnError, SpawnSpec, Spawner, Started, Status,
    StopGrace,
};
use bollard::models::{
    ConfigReference, GenericResourcesInner, GenericResourcesInnerDiscreteResourceSpec, Ipam, IpamConfig, Limit,
    LocalNodeState, Mount, MountTmpfsOptions, MountTypeEnum, Network, NetworkAttachmentConfig, NetworkCreateRequest,
    ResourceObject, ServiceSpec, ServiceSpecMode, ServiceSpecModeReplicated, Task, TaskSpec, TaskSpecContainerSpec,
    TaskSpecContainerSpecPrivileges, TaskSpecPlacement, TaskSpecResources, TaskSpecRestartPolicy,
    TaskSpecRestartPolicyConditionEnum, TaskState,
};
use bollard::query_parameters::{
    InspectContainerOptions, InspectNetworkOptions, InspectServiceOptions, ListContainersOptions, ListTasksOptions,
    LogsOptions, RemoveContainerOptions,
};
use bollard::Docker;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::sync::Arc;

use crate::{engine_error, is_not_found, DockerSpawner, CONTAINER_PORT, LABEL_MANAGED, LABEL_SERVER, LABEL_USER};

/// Label on the services the Swarm spawner makes.
pub const LABEL_SWARM: &str = "berth.swarm";

/// The bridge driver's option for traffic between the network's containers.
const ICC_OPTION: &str = crate::network::ICC_OPTION;

/// Generic resource kinds a node may advertise its GPUs as
/// (`node-generic-resources` in the engine's daemon.json).
const GPU_KINDS: &[&str] = &["NVIDIA-GPU", "gpu", "GPU"];

/// The `[swarm]` section of berth's configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SwarmConfig {
    /// The swarm-scoped network the services join (created if missing,
    /// with traffic between containers off); the hub reaches them on it.
    pub network: String,
    /// How often a server's task that fails while starting is tried again
    /// before the start fails with its error.
    pub restart_attempts: u32,
}

impl Default for SwarmConfig {
    fn default() -> Self {
        SwarmConfig { network: "berth-swarm".into(), restart_attempts: 2 }
    }
}

/// What berth needs to know of the swarm and its own node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeFacts {
    /// berth's own node, where its services run.
    pub node_id: String,
    /// The generic resource kind the node advertises its GPUs as, if any.
    pub gpu_kind: Option<String>,
}

pub struct SwarmSpawner {
    docker: Arc<DockerSpawner>,
    cfg: SwarmConfig,
    /// Given to each service as its stop grace period.
    grace: StopGrace,
    /// Network creation one at a time (the engine allows two of one name).
    network_lock: tokio::sync::Mutex<()>,
}

/// The service's name: the container's name, shortened with a hash where
/// it would pass Swarm's 63 characters.
pub fn service_name(user: &str, server: &str) -> String {
    let name = crate::container_name(user, server);
    if name.len() <= 63 {
        return name;
    }
    // FNV-1a: stable across runs and releases.
    let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    format!("{}-{:012x}", name[..50].trim_end_matches('-'), hash & 0xffff_ffff_ffff)
}

fn task_state(t: &Task) -> Option<TaskState> {
    t.status.as_ref().and_then(|s| s.state)
}

fn task_error(t: &Task) -> String {
    let st = t.status.clone().unwrap_or_default();
    let mut why = st.err.filter(|e| !e.is_empty()).or(st.message).unwrap_or_default();
    if let Some(code) = st.container_status.and_then(|c| c.exit_code).filter(|c| *c != 0) {
        if !why.contains(&code.to_string()) {
            why.push_str(&format!(" (exit code {code})"));
        }
    }
    why
}

fn is_failed(state: Option<TaskState>) -> bool {
    matches!(state, Some(TaskState::FAILED | TaskState::REJECTED | TaskState::ORPHANED))
}

/// The ids of a started server's service, task and container in its state.
fn state_field<'a>(state: &'a serde_json::Value, key: &str) -> Result<&'a str, SpawnError> {
    state.get(key).and_then(|v| v.as_str()).ok_or_else(|| SpawnError::BadState(format!("no {key} in {state}")))
}

/// Removes a service that a start created, unless the start got to the end
/// (also when the hub's start timeout drops the start half-way).
struct ServiceGuard {
    docker: Docker,
    service: Option<String>,
}

impl Drop for ServiceGuard {
    fn drop(&mut self) {
        if let Some(id) = self.service.take() {
            let docker = self.docker.clone();
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    if let Err(e) = docker.delete_service(&id).await {
                        if !is_not_found(&e) {
                            tracing::warn!(service = %id, error = %e, "could not remove the failed start's service");
                        }
                    }
                });
            }
        }
    }
}

impl SwarmSpawner {
    /// The Swarm spawner over the local engine, which must be a manager of a
    /// swarm by the first start (checked then, with a clear error).
    pub fn new(docker: Arc<DockerSpawner>, cfg: SwarmConfig, grace: StopGrace) -> Arc<SwarmSpawner> {
        Arc::new(SwarmSpawner { docker, cfg, grace, network_lock: tokio::sync::Mutex::new(()) })
    }

    /// The Docker spawner this one shares its engine and containers with.
    pub fn docker(&self) -> &Arc<DockerSpawner> {
        &self.docker
    }

    pub fn config(&self) -> &SwarmConfig {
        &self.cfg
    }

    /// The engine is a reachable swarm manager; berth's node and its GPUs.
    pub async fn node_facts(&self) -> Result<NodeFacts, SpawnError> {
        let docker = self.docker.client()?;
        let info = docker.info().await.map_err(engine_error)?;
        let swarm = info.swarm.unwrap_or_default();
        match swarm.local_node_state {
            Some(LocalNodeState::ACTIVE) => {}
            Some(LocalNodeState::PENDING) => {
                return Err(SpawnError::Failed("this Docker engine is still joining its swarm; try again".into()))
            }
            state => {
                let state = state.map(|s| s.to_string()).unwrap_or_else(|| "unknown".into());
                let err = swarm.error.filter(|e| !e.is_empty()).map(|e| format!(": {e}")).unwrap_or_default();
                return Err(SpawnError::Failed(format!(
                    "this Docker engine is not in a swarm (its swarm state is {state}{err}): run `docker swarm init` \
                     (or join it to one as a manager), or set spawner.kind = \"docker\""
                )));
            }
        }
        if swarm.control_available != Some(true) {
            return Err(SpawnError::Failed(
                "this Docker engine is a swarm worker; berth must run beside a manager (promote this node with \
                 `docker node promote`)"
                    .into(),
            ));
        }
        let node_id = swarm.node_id.filter(|n| !n.is_empty()).ok_or_else(|| {
            SpawnError::Failed("the Docker engine is in a swarm but does not say which node it is".into())
        })?;
        let node = docker.inspect_node(&node_id).await.map_err(engine_error)?;
        let generic = node.description.and_then(|d| d.resources).and_then(|r| r.generic_resources).unwrap_or_default();
        Ok(NodeFacts { node_id, gpu_kind: gpu_kind(&generic) })
    }

    /// The service a server runs as (public so tests can check what a GPU
    /// server's service carries without a GPU).
    pub fn service_spec(&self, spec: &SpawnSpec, api_url: &str, node: &NodeFacts) -> ServiceSpec {
        let body = self.docker.container_body(spec, api_url);
        let hc = body.host_config.unwrap_or_default();
        let mut mounts: Vec<Mount> = hc.mounts.unwrap_or_default();
        // Services have no ShmSize: a tmpfs of that size on /dev/shm instead.
        if let Some(size) = hc.shm_size {
            mounts.push(Mount {
                target: Some("/dev/shm".into()),
                typ: Some(MountTypeEnum::TMPFS),
                tmpfs_options: Some(MountTmpfsOptions { size_bytes: Some(size), mode: Some(0o1777), options: None }),
                ..Default::default()
            });
        }
        let mut labels = body.labels.clone().unwrap_or_default();
        labels.insert(LABEL_SWARM.to_string(), "true".to_string());
        let grace = self.grace.interrupt + self.grace.terminate;
        let reservations =
            (!spec.gpus.is_empty()).then_some(()).and(node.gpu_kind.as_ref()).map(|kind| ResourceObject {
                generic_resources: Some(vec![GenericResourcesInner {
                    discrete_resource_spec: Some(GenericResourcesInnerDiscreteResourceSpec {
                        kind: Some(kind.clone()),
                        value: Some(spec.gpus.len() as i64),
                    }),
                    named_resource_spec: None,
                }]),
                ..Default::default()
            });
        let container = TaskSpecContainerSpec {
            image: body.image,
            labels: Some(labels.clone()),
            // The image's entrypoint stays; the start's command replaces its CMD.
            args: body.cmd,
            env: body.env,
            dir: body.working_dir,
            mounts: Some(mounts),
            init: hc.init,
            capability_drop: hc.cap_drop,
            // Engines before API 1.46 (Docker 27) ignore it (docs/swarm.md).
            privileges: Some(TaskSpecContainerSpecPrivileges {
                no_new_privileges: Some(
                    hc.security_opt.iter().flatten().any(|o| o.as_str() == "no-new-privileges:true"),
                ),
                ..Default::default()
            }),
            stop_grace_period: Some(i64::try_from(grace.as_nanos()).unwrap_or(i64::MAX)),
            ..Default::default()
        };
        let task = TaskSpec {
            container_spec: Some(container),
            resources: Some(TaskSpecResources {
                limits: Some(Limit { nano_cpus: hc.nano_cpus, memory_bytes: hc.memory, pids: hc.pids_limit }),
                reservations,
            }),
            restart_policy: Some(TaskSpecRestartPolicy {
                condition: Some(TaskSpecRestartPolicyConditionEnum::ON_FAILURE),
                delay: Some(1_000_000_000),
                max_attempts: Some(i64::from(self.cfg.restart_attempts)),
                window: None,
            }),
            placement: Some(TaskSpecPlacement {
                constraints: Some(vec![format!("node.id=={}", node.node_id)]),
                ..Default::default()
            }),
            networks: Some(vec![NetworkAttachmentConfig {
                target: Some(self.cfg.network.clone()),
                ..Default::default()
            }]),
            ..Default::default()
        };
        ServiceSpec {
            name: Some(service_name(&spec.user, &spec.server)),
            labels: Some(labels),
            task_template: Some(task),
            mode: Some(ServiceSpecMode {
                replicated: Some(ServiceSpecModeReplicated { replicas: Some(1) }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    async fn inspect_network(&self, name: &str) -> Result<Option<Network>, SpawnError> {
        match self.docker.client()?.inspect_network(name, None::<InspectNetworkOptions>).await {
            Ok(n) => Ok(Some(n)),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(engine_error(e)),
        }
    }

    async fn create_network(&self, req: NetworkCreateRequest) -> Result<(), SpawnError> {
        match self.docker.client()?.create_network(req).await {
            Ok(_) => Ok(()),
            // Made meanwhile by someone else.
            Err(bollard::errors::Error::DockerResponseServerError { status_code: 409, .. }) => Ok(()),
            Err(e) => Err(engine_error(e)),
        }
    }

    /// The name of the config-only network that carries the swarm
    /// network's options and addresses.
    fn config_network(&self) -> String {
        format!("{}-config", self.cfg.network)
    }

    /// Makes the network unless it exists; returns its gateway on this node
    /// (where the hub listens for its servers).
    ///
    /// A swarm-scoped bridge network takes its options from a config-only
    /// network (options given to it directly are dropped by the engine), so
    /// that one is made first, with traffic between containers off and an
    /// address range the engine picks for a probe network made and removed
    /// just before (so it does not overlap another network's).
    pub async fn ensure_network(&self) -> Result<String, SpawnError> {
        // Not in a swarm: say so, before making half of the pair.
        self.node_facts().await?;
        let _one_at_a_time = self.network_lock.lock().await;
        let name = &self.cfg.network;
        let config_name = self.config_network();
        let existing = self.inspect_network(name).await?;
        if let Some(net) = &existing {
            if net.scope.as_deref() != Some("swarm") {
                return Err(SpawnError::Failed(format!(
                    "the Docker network {name} exists with {} scope; swarm services can only join a swarm-scoped \
                     network: remove it, or set swarm.network to a name that does not exist and berth makes it",
                    net.scope.as_deref().unwrap_or("unknown")
                )));
            }
        }
        let from = existing.as_ref().and_then(|n| n.config_from.as_ref()).and_then(|c| c.network.clone());
        let config_name = from.filter(|f| !f.is_empty()).unwrap_or(config_name);
        let config = match self.inspect_network(&config_name).await? {
            Some(c) => c,
            None if existing.is_some() => {
                return Err(SpawnError::Failed(format!(
                    "the Docker network {name} has no config-only network {config_name} on this node, so berth \
                     cannot tell its gateway: remove {name} and berth makes both, or set docker.hub_connect_url"
                )))
            }
            None => {
                let ipam = self.free_subnet().await?;
                self.create_network(NetworkCreateRequest {
                    name: config_name.clone(),
                    config_only: Some(true),
                    ipam: Some(Ipam { config: Some(vec![ipam]), ..Default::default() }),
                    options: Some(HashMap::from([(ICC_OPTION.to_string(), "false".to_string())])),
                    labels: Some(HashMap::from([(LABEL_MANAGED.to_string(), "true".to_string())])),
                    ..Default::default()
                })
                .await?;
                self.inspect_network(&config_name).await?.ok_or_else(|| {
                    SpawnError::Failed(format!("the Docker network {config_name} vanished right after its creation"))
                })?
            }
        };
        if existing.is_none() {
            self.create_network(NetworkCreateRequest {
                name: name.clone(),
                driver: Some("bridge".into()),
                scope: Some("swarm".into()),
                attachable: Some(true),
                // No labels: the engine takes none beside a configuration network.
                config_from: Some(ConfigReference { network: Some(config_name.clone()) }),
                ..Default::default()
            })
            .await?;
        }
        if crate::network::icc(&Network { driver: Some("bridge".into()), ..config.clone() }) != crate::network::Icc::Off
        {
            tracing::warn!(
                network = %name,
                "the network's configuration ({config_name}) lets containers connect to each other, so users' \
                 servers can reach one another; remove both networks when no server runs and berth re-creates them \
                 with that traffic off"
            );
        }
        config
            .ipam
            .and_then(|i| i.config)
            .and_then(|c| c.into_iter().find_map(|c| c.gateway))
            .ok_or_else(|| SpawnError::Failed(format!("the Docker network {config_name} has no gateway address")))
    }

    /// An address range no other network uses: the one the engine gives a
    /// probe bridge network, which is removed again.
    async fn free_subnet(&self) -> Result<IpamConfig, SpawnError> {
        let probe = format!("{}-probe", self.cfg.network);
        self.create_network(NetworkCreateRequest {
            name: probe.clone(),
            driver: Some("bridge".into()),
            labels: Some(HashMap::from([(LABEL_MANAGED.to_string(), "true".to_string())])),
            ..Default::default()
        })
        .await?;
        let net = self.inspect_network(&probe).await;
        if let Err(e) = self.docker.client()?.remove_network(&probe).await {
            if !is_not_found(&e) {
                tracing::warn!(network = %probe, error = %e, "could not remove the probe network");
            }
        }
        let config = net?.and_then(|n| n.ipam).and_then(|i| i.config).and_then(|c| c.into_iter().next());
        match config {
            Some(c) if c.subnet.is_some() && c.gateway.is_some() => {
                Ok(IpamConfig { subnet: c.subnet, gateway: c.gateway, ..Default::default() })
            }
            _ => Err(SpawnError::Failed(format!("the engine gave the probe network {probe} no address range"))),
        }
    }

    /// Tasks of a service, newest first.
    async fn tasks(&self, service_id: &str) -> Result<Vec<Task>, SpawnError> {
        let filters = HashMap::from([("service".to_string(), vec![service_id.to_string()])]);
        let mut tasks = self
            .docker
            .client()?
            .list_tasks(Some(ListTasksOptions { filters: Some(filters) }))
            .await
            .map_err(engine_error)?;
        tasks.sort_by(|a, b| b.created_at.cmp(&a.created_at));
        Ok(tasks)
    }

    /// Removes a service of berth's left from before (berth was killed in a
    /// start, say); a service of that name that is not berth's is an error.
    async fn remove_stale(&self, name: &str) -> Result<(), SpawnError> {
        let docker = self.docker.client()?;
        match docker.inspect_service(name, None::<InspectServiceOptions>).await {
            Ok(s) => {
                let ours =
                    s.spec.and_then(|s| s.labels).is_some_and(|l| l.get(LABEL_MANAGED).is_some_and(|v| v == "true"));
                if !ours {
                    return Err(SpawnError::Failed(format!(
                        "a Swarm service named {name} exists and is not berth's; remove or rename it"
                    )));
                }
                let id = s.id.unwrap_or_else(|| name.to_string());
                let containers = self.containers_of(&id).await;
                match docker.delete_service(&id).await {
                    Ok(()) => {}
                    Err(e) if is_not_found(&e) => {}
                    Err(e) => return Err(engine_error(e)),
                }
                for c in containers {
                    self.wait_gone(&c, Duration::from_secs(30)).await;
                }
                Ok(())
            }
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(engine_error(e)),
        }
    }

    async fn containers_of(&self, service_id: &str) -> Vec<String> {
        self.tasks(service_id)
            .await
            .unwrap_or_default()
            .into_iter()
            .filter_map(|t| t.status?.container_status?.container_id)
            .filter(|c| !c.is_empty())
            .collect()
    }

    /// After its service was removed: waits until the task's container has
    /// stopped (up to `limit`, then it is killed) and removes it, so the
    /// next start finds its volumes free and nothing is left behind (the
    /// engine removes it too, a moment later).
    async fn wait_gone(&self, container: &str, limit: Duration) {
        let Ok(docker) = self.docker.client() else { return };
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match docker.inspect_container(container, None::<InspectContainerOptions>).await {
                Err(e) if is_not_found(&e) => return,
                Ok(c) if c.state.as_ref().and_then(|s| s.running) == Some(true) => {
                    if tokio::time::Instant::now() >= deadline {
                        tracing::warn!(container = %container, "the removed service's container did not stop in time");
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                _ => break,
            }
        }
        let force = RemoveContainerOptions { force: true, ..Default::default() };
        if let Err(e) = docker.remove_container(container, Some(force)).await {
            if !is_not_found(&e) {
                tracing::warn!(container = %container, error = %e, "could not remove the removed service's container");
            }
        }
    }

    /// The last `lines` of a container's output, if it has any.
    async fn output_tail(&self, container: &str, lines: usize) -> Option<String> {
        let docker = self.docker.client().ok()?;
        let opts = LogsOptions { stdout: true, stderr: true, tail: lines.to_string(), ..Default::default() };
        let mut s = docker.logs(container, Some(opts));
        let mut out = String::new();
        while let Some(Ok(chunk)) = futures_util::StreamExt::next(&mut s).await {
            out.push_str(&chunk.to_string());
        }
        let out = out.trim_end().to_string();
        (!out.is_empty()).then_some(out)
    }

    /// The container's address on the swarm network, while it runs.
    async fn container_ip(&self, container: &str) -> Result<Option<String>, SpawnError> {
        let c = match self.docker.client()?.inspect_container(container, None::<InspectContainerOptions>).await {
            Ok(c) => c,
            Err(e) if is_not_found(&e) => return Ok(None),
            Err(e) => return Err(engine_error(e)),
        };
        if c.state.as_ref().and_then(|s| s.running) != Some(true) {
            return Ok(None);
        }
        Ok(c.network_settings
            .and_then(|n| n.networks)
            .and_then(|mut nets| nets.remove(&self.cfg.network))
            .and_then(|e| e.ip_address)
            .filter(|ip| !ip.is_empty()))
    }

    /// Waits for the service's task to run: the task, its container and its
    /// address, or the error of the last try once the task has failed more
    /// often than it is retried.
    async fn wait_running(
        &self,
        service_id: &str,
        progress: &ProgressTx,
    ) -> Result<(String, String, String), SpawnError> {
        let mut last_state = None;
        loop {
            let tasks = self.tasks(service_id).await?;
            let failed: Vec<&Task> = tasks.iter().filter(|t| is_failed(task_state(t))).collect();
            if failed.len() > self.cfg.restart_attempts as usize {
                let tries = failed.len();
                let container = failed[0].status.clone().and_then(|s| s.container_status).and_then(|c| c.container_id);
                let output = match container.filter(|c| !c.is_empty()) {
                    Some(c) => self.output_tail(&c, 3).await.map(|o| format!("; its last output: {o}")),
                    None => None,
                };
                return Err(SpawnError::Failed(format!(
                    "the server's task failed {tries} time{}; the last time: {}{}",
                    if tries == 1 { "" } else { "s" },
                    task_error(failed[0]),
                    output.unwrap_or_default()
                )));
            }
            if let Some(t) = tasks
                .iter()
                .find(|t| task_state(t) == Some(TaskState::RUNNING) && t.desired_state == Some(TaskState::RUNNING))
            {
                let container = t.status.clone().and_then(|s| s.container_status).and_then(|c| c.container_id);
                if let (Some(task), Some(container)) = (t.id.clone(), container.filter(|c| !c.is_empty())) {
                    // A task that dies at once is still "running" for a
                    // moment; its container then has no address.
                    if let Some(ip) = self.container_ip(&container).await? {
                        return Ok((task, container, ip));
                    }
                }
            }
            let state = tasks.first().and_then(task_state);
            if state != last_state {
                if let Some(s) = state {
                    let _ = progress.send(Progress { progress: 50, message: format!("The server's task is {s}") });
                }
                last_state = state;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    async fn start_service(&self, spec: SpawnSpec, progress: ProgressTx) -> Result<Started, SpawnError> {
        let gateway = self.ensure_network().await?;
        let node = self.node_facts().await?;
        let image = spec.image.clone().unwrap_or_else(|| self.docker.config().image.clone());
        if image.is_empty() {
            return Err(SpawnError::Failed(
                "no image to run: docker.image is empty and the start names no template (set docker.image, or \
                 templates.default for default servers)"
                    .into(),
            ));
        }
        if spec.build.is_empty() {
            self.docker.ensure_image(&image, &progress).await?;
        } else {
            self.docker.ensure_built(&image, &spec.build, &progress).await?;
        }
        let _ = progress.send(Progress { progress: 40, message: "Preparing volumes…".into() });
        self.docker.prepare_volumes(&spec).await?;
        let name = service_name(&spec.user, &spec.server);
        self.remove_stale(&name).await?;
        let body = self.service_spec(&spec, &self.docker.hub_api_url(&gateway), &node);
        let docker = self.docker.client()?;
        let created = docker.create_service(body, None).await.map_err(engine_error)?;
        let service_id = created.id.filter(|i| !i.is_empty()).unwrap_or_else(|| name.clone());
        let mut guard = ServiceGuard { docker, service: Some(service_id.clone()) };
        let _ = progress.send(Progress { progress: 45, message: format!("Starting the Swarm service {name}") });
        let (task_id, container, ip) = self.wait_running(&service_id, &progress).await?;
        let target = format!("http://{ip}:{}", spec.port.unwrap_or(CONTAINER_PORT));
        guard.service = None;
        tracing::info!(
            user = %spec.user, server = %spec.server, service = %name, task = %task_id, %target, gpus = ?spec.gpus,
            "started Swarm service"
        );
        Ok(Started {
            target: target.clone(),
            state: json!({
                "service_id": service_id,
                "service_name": name,
                "task_id": task_id,
                "container_id": container,
                "node_id": node.node_id,
                "target": target,
                "gpus": spec.gpus,
            }),
        })
    }
}

/// The kind a node advertises its GPUs as among its generic resources.
pub fn gpu_kind(generic: &[GenericResourcesInner]) -> Option<String> {
    generic.iter().find_map(|g| {
        let kind = g
            .discrete_resource_spec
            .as_ref()
            .and_then(|d| d.kind.clone())
            .or_else(|| g.named_resource_spec.as_ref().and_then(|n| n.kind.clone()))?;
        GPU_KINDS.contains(&kind.as_str()).then_some(kind)
    })
}

impl Spawner for SwarmSpawner {
    fn kind(&self) -> &'static str {
        "swarm"
    }

    fn runs_images(&self) -> bool {
        true
    }

    fn start(&self, spec: SpawnSpec, progress: ProgressTx) -> BoxFuture<'_, Result<Started, SpawnError>> {
        Box::pin(async move {
            let r = self.start_service(spec, progress).await;
            if let Err(e) = &r {
                self.docker.reset_on(e);
            }
            r
        })
    }

    fn stop<'a>(&'a self, state: &'a serde_json::Value, grace: StopGrace) -> BoxFuture<'a, Result<(), SpawnError>> {
        Box::pin(async move {
            let service = state_field(state, "service_id")?;
            let container = state_field(state, "container_id").ok().map(str::to_string);
            match self.docker.client()?.delete_service(service).await {
                Ok(()) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(engine_error(e)),
            }
            // The task's container stops after the service is gone; wait so
            // the next start finds the volumes free and the name unused.
            if let Some(c) = container {
                self.wait_gone(&c, grace.interrupt + grace.terminate + Duration::from_secs(10)).await;
            }
            Ok(())
        })
    }

    fn poll<'a>(&'a self, state: &'a serde_json::Value) -> BoxFuture<'a, Result<Status, SpawnError>> {
        Box::pin(async move {
            let service = state_field(state, "service_id")?;
            let task = state_field(state, "task_id")?;
            let docker = self.docker.client()?;
            match docker.inspect_service(service, None::<InspectServiceOptions>).await {
                Ok(_) => {}
                Err(e) if is_not_found(&e) => return Ok(Status::Exited("the server's Swarm service is gone".into())),
                Err(e) => return Err(engine_error(e)),
            }
            match docker.inspect_task(task).await {
                Ok(t) => {
                    let state = task_state(&t);
                    if state == Some(TaskState::RUNNING) && t.desired_state == Some(TaskState::RUNNING) {
                        return Ok(Status::Running);
                    }
                    let state = state.map(|s| s.to_string()).unwrap_or_else(|| "unknown".into());
                    let why = task_error(&t);
                    Ok(Status::Exited(if why.is_empty() {
                        format!("the server's task is {state}")
                    } else {
                        format!("the server's task is {state}: {why}")
                    }))
                }
                Err(e) if is_not_found(&e) => Ok(Status::Exited("the server's task is gone".into())),
                Err(e) => Err(engine_error(e)),
            }
        })
    }

    fn exec<'a>(
        &'a self,
        _user: &'a str,
        state: &'a serde_json::Value,
        req: berth_spawner::ExecRequest,
    ) -> BoxFuture<'a, Result<berth_spawner::ExecProcess, SpawnError>> {
        // One node: the task's container is on the local engine.
        Box::pin(async move { self.docker.exec_in(state_field(state, "container_id")?, req).await })
    }

    fn connect<'a>(
        &'a self,
        state: &'a serde_json::Value,
        port: u16,
    ) -> BoxFuture<'a, Result<tokio::net::TcpStream, SpawnError>> {
        Box::pin(async move { self.docker.connect_in(state_field(state, "container_id")?, port).await })
    }

    fn list_managed(&self) -> BoxFuture<'_, Vec<(String, String, String)>> {
        // The tasks' containers carry berth's labels as the Docker
        // spawner's do (the GPU sampler attributes processes by them).
        Spawner::list_managed(&*self.docker)
    }

    fn watch_exits(&self, exits: tokio::sync::mpsc::UnboundedSender<(String, String)>) -> BoxFuture<'_, ()> {
        Box::pin(self.docker.watch_container_exits(exits))
    }

    fn remove_user_data<'a>(&'a self, user: &'a str, owner_id: &'a str) -> BoxFuture<'a, Result<(), SpawnError>> {
        Spawner::remove_user_data(&*self.docker, user, owner_id)
    }

    fn images<'a>(&'a self, images: &'a [String]) -> BoxFuture<'a, Result<Vec<ImageInfo>, SpawnError>> {
        Spawner::images(&*self.docker, images)
    }

    fn registry_image<'a>(&'a self, image: &'a str) -> BoxFuture<'a, Result<RegistryImage, SpawnError>> {
        Spawner::registry_image(&*self.docker, image)
    }

    fn update_image<'a>(&'a self, image: &'a str, previous: &'a str) -> BoxFuture<'a, Result<String, SpawnError>> {
        Spawner::update_image(&*self.docker, image, previous)
    }

    fn set_aside_image<'a>(&'a self, image: &'a str, previous: &'a str) -> BoxFuture<'a, Result<(), SpawnError>> {
        Spawner::set_aside_image(&*self.docker, image, previous)
    }

    fn restore_image<'a>(&'a self, image: &'a str, previous: &'a str) -> BoxFuture<'a, Result<(), SpawnError>> {
        Spawner::restore_image(&*self.docker, image, previous)
    }

    fn prepare_image<'a>(
        &'a self,
        image: &'a str,
        build: &'a [(String, String)],
        progress: ProgressTx,
    ) -> BoxFuture<'a, Result<bool, SpawnError>> {
        Spawner::prepare_image(&*self.docker, image, build, progress)
    }

    fn logs<'a>(&'a self, user: &'a str, server: &'a str) -> BoxFuture<'a, Option<String>> {
        Box::pin(async move {
            // The newest of the server's task containers (a failed one is
            // kept until its service goes).
            let docker = self.docker.client().ok()?;
            let filters = HashMap::from([(
                "label".to_string(),
                vec![format!("{LABEL_USER}={user}"), format!("{LABEL_SWARM}=true")],
            )]);
            let opts = ListContainersOptions { all: true, filters: Some(filters), ..Default::default() };
            let mut list = docker.list_containers(Some(opts)).await.ok()?;
            list.retain(|c| c.labels.as_ref().and_then(|l| l.get(LABEL_SERVER)).map(String::as_str) == Some(server));
            list.sort_by_key(|c| std::cmp::Reverse(c.created));
            let id = list.into_iter().next()?.id?;
            self.output_tail(&id, 400).await
        })
    }
}

impl crate::HubNetwork for SwarmSpawner {
    fn set_hub_port(&self, port: u16) {
        self.docker.set_hub_port(port);
    }

    fn gateway(&self) -> BoxFuture<'_, Result<String, SpawnError>> {
        Box::pin(self.ensure_network())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::Config;

    fn spec(gpus: &[&str]) -> SpawnSpec {
        SpawnSpec {
            owner_id: "1abc".into(),
            build: Vec::new(),
            user: "alice".into(),
            server: "lab".into(),
            env: BTreeMap::from([
                ("NVIDIA_VISIBLE_DEVICES".to_string(), "all".to_string()),
                ("JUPYTERHUB_API_URL".to_string(), "x".to_string()),
            ]),
            cmd: vec!["jupyterhub-singleuser".into(), "--port={port}".into()],
            prefix: "/user/alice/lab/".into(),
            template: "default".into(),
            image: Some("img:1".into()),
            gpus: gpus.iter().map(|g| g.to_string()).collect(),
            port: None,
            volumes: Vec::new(),
        }
    }

    fn swarm() -> Arc<SwarmSpawner> {
        let d = DockerSpawner::connect(Config { pids_limit: 100, ..Config::default() }, "/").unwrap();
        SwarmSpawner::new(d, SwarmConfig::default(), StopGrace::default())
    }

    fn env(s: &ServiceSpec) -> Vec<String> {
        s.task_template.clone().unwrap().container_spec.unwrap().env.unwrap()
    }

    #[test]
    fn a_service_carries_the_containers_spec_pinned_to_berths_node() {
        let node = NodeFacts { node_id: "n0de".into(), gpu_kind: None };
        let s = swarm().service_spec(&spec(&[]), "http://10.0.0.1:1/hub/api", &node);
        assert_eq!(s.name.as_deref(), Some("berth-alice--lab"));
        let labels = s.labels.clone().unwrap();
        assert_eq!(labels[LABEL_USER], "alice");
        assert_eq!(labels[LABEL_SERVER], "lab");
        assert_eq!(labels[LABEL_SWARM], "true");
        assert_eq!(s.mode.clone().unwrap().replicated.unwrap().replicas, Some(1));
        let t = s.task_template.clone().unwrap();
        assert_eq!(t.placement.unwrap().constraints.unwrap(), ["node.id==n0de"]);
        assert_eq!(t.networks.unwrap()[0].target.as_deref(), Some("berth-swarm"));
        let c = t.container_spec.unwrap();
        assert_eq!(c.labels.unwrap()[LABEL_USER], "alice", "the container is labelled as the Docker spawner's are");
        assert_eq!(c.args.unwrap(), ["jupyterhub-singleuser", "--port=8888"]);
        assert!(c.capability_drop.unwrap().contains(&"NET_RAW".to_string()));
        assert_eq!(c.privileges.unwrap().no_new_privileges, Some(true));
        let mounts: Vec<String> = c
            .mounts
            .unwrap()
            .into_iter()
            .map(|m| format!("{}:{}", m.source.unwrap_or_default(), m.target.unwrap_or_default()))
            .collect();
        assert!(mounts.contains(&"berth-1abc-home:/home".to_string()), "{mounts:?}");
        assert!(mounts.contains(&":/dev/shm".to_string()), "shm as a tmpfs: {mounts:?}");
        let limits = t.resources.clone().unwrap().limits.unwrap();
        assert_eq!(limits.pids, Some(100));
        assert_eq!(t.resources.unwrap().reservations, None, "no GPU, no reservation");
        assert!(env(&s).contains(&"NVIDIA_VISIBLE_DEVICES=void".to_string()));
        assert!(env(&s).contains(&"JUPYTERHUB_API_URL=http://10.0.0.1:1/hub/api".to_string()), "{:?}", env(&s));
    }

    #[test]
    fn gpus_go_in_the_environment_and_as_generic_resources_where_advertised() {
        let plain = NodeFacts { node_id: "n1".into(), gpu_kind: None };
        let s = swarm().service_spec(&spec(&["GPU-1", "GPU-3"]), "http://x/hub/api", &plain);
        let gpu_env: Vec<String> = env(&s).into_iter().filter(|e| e.starts_with("NVIDIA_VISIBLE_DEVICES=")).collect();
        assert_eq!(gpu_env, ["NVIDIA_VISIBLE_DEVICES=GPU-1,GPU-3"], "berth's ids, once, whatever the template said");
        assert_eq!(s.task_template.unwrap().resources.unwrap().reservations, None);

        let advertised = NodeFacts { node_id: "n1".into(), gpu_kind: Some("NVIDIA-GPU".into()) };
        let s = swarm().service_spec(&spec(&["GPU-1", "GPU-3"]), "http://x/hub/api", &advertised);
        let generic = s.task_template.unwrap().resources.unwrap().reservations.unwrap().generic_resources.unwrap();
        let d = generic[0].discrete_resource_spec.clone().unwrap();
        assert_eq!((d.kind.as_deref(), d.value), (Some("NVIDIA-GPU"), Some(2)));
    }

    #[test]
    fn gpu_kinds_and_names() {
        let discrete = |k: &str| GenericResourcesInner {
            discrete_resource_spec: Some(GenericResourcesInnerDiscreteResourceSpec {
                kind: Some(k.into()),
                value: Some(2),
            }),
            named_resource_spec: None,
        };
        assert_eq!(gpu_kind(&[discrete("ssd"), discrete("NVIDIA-GPU")]), Some("NVIDIA-GPU".into()));
        assert_eq!(gpu_kind(&[discrete("ssd")]), None);
        assert_eq!(gpu_kind(&[]), None);
        assert_eq!(service_name("alice", ""), "berth-alice");
        let long = service_name(&"a".repeat(32), &"b".repeat(32));
        assert!(long.len() <= 63, "{long}");
        assert_ne!(long, service_name(&"a".repeat(32), &format!("{}c", "b".repeat(31))));
    }
}
