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
    LocalNodeState, Mount, MountTmpfsOptions, MountTypeEnum, MountVolumeOptionsDriverConfig, Network,
    NetworkAttachmentConfig, NetworkCreateRequest, ResourceObject, ServiceSpec, ServiceSpecMode,
    ServiceSpecModeReplicated, Task, TaskSpec, TaskSpecContainerSpec, TaskSpecContainerSpecPrivileges,
    TaskSpecPlacement, TaskSpecResources, TaskSpecRestartPolicy, TaskSpecRestartPolicyConditionEnum, TaskState,
};
use bollard::query_parameters::{
    InspectContainerOptions, InspectNetworkOptions, InspectServiceOptions, ListContainersOptions, ListNetworksOptions,
    ListTasksOptions, LogsOptions, RemoveContainerOptions,
};
use bollard::Docker;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::sync::Arc;

use crate::nodes::SwarmNode;
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
    /// Which nodes run servers: `self` (berth's own node) or `labelled`
    /// (every node labelled `berth.servers=true`).
    pub nodes: String,
    /// Each node's own engine but berth's: `hostname=tcp://ADDRESS:2376;…`
    /// (or `unix:///path`), for its images, volumes, network and the
    /// servers' containers (address, output, SSH).
    pub engines: String,
    /// Directory with `ca.pem`, `cert.pem` and `key.pem` for `tcp://`
    /// engines (a node's own in `<dir>/<hostname>/` when there is one);
    /// empty: plain HTTP.
    pub engine_tls_dir: String,
    /// Address range the other nodes' parts of `network` are given a `/24`
    /// of each (the hub routes to them).
    pub node_subnets: String,
    /// Where servers on other nodes reach the hub; empty: berth's node's
    /// address in the swarm.
    pub hub_address: String,
    /// Users' volumes: `node` (on the node a user's server first ran on;
    /// later servers go there) or `shared` (created by every node from
    /// `volume_driver` and `volume_opts`, e.g. NFS; servers go anywhere).
    pub volumes: String,
    /// The driver and its options (`key=value;…`, `{volume}` replaced by
    /// the volume's name) of users' volumes with `volumes = "shared"`.
    pub volume_driver: String,
    pub volume_opts: String,
}

impl Default for SwarmConfig {
    fn default() -> Self {
        SwarmConfig {
            network: "berth-swarm".into(),
            restart_attempts: 2,
            nodes: "self".into(),
            engines: String::new(),
            engine_tls_dir: String::new(),
            node_subnets: "10.231.0.0/16".into(),
            hub_address: String::new(),
            volumes: "node".into(),
            volume_driver: "local".into(),
            volume_opts: String::new(),
        }
    }
}

/// Where a service may run, and how its node advertises GPUs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// A Swarm placement constraint (`node.id==…`, `node.labels.…==true`).
    pub constraint: String,
    /// The generic resource kind the node advertises its GPUs as, if any.
    pub gpu_kind: Option<String>,
    /// Users' volumes on a driver every node mounts (`volumes = "shared"`).
    pub shared_volumes: bool,
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
    /// `swarm.engines`, parsed (checked when the configuration is read).
    engines: HashMap<String, crate::Endpoint>,
    /// A Docker spawner over each other node's engine, made on first use.
    pub(crate) node_engines: std::sync::Mutex<HashMap<String, Arc<DockerSpawner>>>,
    /// Nodes whose config-only network was checked in this process.
    networks_ready: std::sync::Mutex<std::collections::HashSet<String>>,
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
        let engines = crate::nodes::parse_engines(&cfg.engines, &cfg.engine_tls_dir).unwrap_or_else(|e| {
            tracing::error!(error = %e, "swarm.engines is unusable; only berth's own node can run servers");
            HashMap::new()
        });
        Arc::new(SwarmSpawner {
            docker,
            cfg,
            grace,
            engines,
            node_engines: std::sync::Mutex::new(HashMap::new()),
            networks_ready: std::sync::Mutex::new(Default::default()),
            network_lock: tokio::sync::Mutex::new(()),
        })
    }

    pub(crate) fn engines(&self) -> &HashMap<String, crate::Endpoint> {
        &self.engines
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
    pub fn service_spec(&self, spec: &SpawnSpec, api_url: &str, place: &Placement) -> ServiceSpec {
        // The hub's GPU ids name their node (`node:device`); the node's
        // runtime knows the device part.
        let mut local = spec.clone();
        local.gpus = spec.gpus.iter().map(|g| crate::nodes::gpu_device(g).to_string()).collect();
        let spec = &local;
        let body = self.docker.container_body(spec, api_url);
        let hc = body.host_config.unwrap_or_default();
        let mut mounts: Vec<Mount> = hc.mounts.unwrap_or_default();
        if place.shared_volumes {
            self.shared_volume_options(spec, &mut mounts);
        }
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
            (!spec.gpus.is_empty()).then_some(()).and(place.gpu_kind.as_ref()).map(|kind| ResourceObject {
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
                constraints: Some(vec![place.constraint.clone()]),
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
                for (engine, c) in containers {
                    self.wait_gone(&engine, &c, Duration::from_secs(30)).await;
                }
                Ok(())
            }
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(engine_error(e)),
        }
    }

    /// The service's tasks' containers, each with its node's engine.
    async fn containers_of(&self, service_id: &str) -> Vec<(Arc<DockerSpawner>, String)> {
        let nodes = self.nodes().await.unwrap_or_default();
        self.tasks(service_id)
            .await
            .unwrap_or_default()
            .into_iter()
            .filter_map(|t| {
                let engine = self.task_node(&t, &nodes).map(|(_, e)| e).unwrap_or_else(|| self.docker.clone());
                let c = t.status?.container_status?.container_id.filter(|c| !c.is_empty())?;
                Some((engine, c))
            })
            .collect()
    }

    /// After its service was removed: waits until the task's container has
    /// stopped (up to `limit`, then it is killed) and removes it, so the
    /// next start finds its volumes free and nothing is left behind (the
    /// engine removes it too, a moment later).
    async fn wait_gone(&self, engine: &DockerSpawner, container: &str, limit: Duration) {
        let Ok(docker) = engine.client() else { return };
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
    async fn output_tail(&self, engine: &DockerSpawner, container: &str, lines: usize) -> Option<String> {
        let docker = engine.client().ok()?;
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
    async fn container_ip(&self, engine: &DockerSpawner, container: &str) -> Result<Option<String>, SpawnError> {
        let c = match engine.client()?.inspect_container(container, None::<InspectContainerOptions>).await {
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

    /// The node a task runs on, from the list, and its engine.
    fn task_node(&self, t: &Task, nodes: &[SwarmNode]) -> Option<(SwarmNode, Arc<DockerSpawner>)> {
        let node = nodes.iter().find(|n| Some(&n.id) == t.node_id.as_ref())?.clone();
        let engine = self.engine_of(&node).ok()?;
        Some((node, engine))
    }

    /// A running task of the service with its container's address, if it
    /// has one.
    async fn running_task(&self, tasks: &[Task], nodes: &[SwarmNode]) -> Result<Option<Running>, SpawnError> {
        for t in tasks
            .iter()
            .filter(|t| task_state(t) == Some(TaskState::RUNNING) && t.desired_state == Some(TaskState::RUNNING))
        {
            let container = t.status.clone().and_then(|s| s.container_status).and_then(|c| c.container_id);
            let (Some(task), Some(container)) = (t.id.clone(), container.filter(|c| !c.is_empty())) else { continue };
            let Some((node, engine)) = self.task_node(t, nodes) else { continue };
            // A task that dies at once is still "running" for a moment;
            // its container then has no address.
            if let Some(ip) = self.container_ip(&engine, &container).await.map_err(|e| on_node(&node, e))? {
                return Ok(Some(Running { task, container, ip, node }));
            }
        }
        Ok(None)
    }

    /// Waits for the service's task to run: the task, its container, its
    /// address and node, or the error of the last try once the task has
    /// failed more often than it is retried.
    async fn wait_running(
        &self,
        service_id: &str,
        nodes: &[SwarmNode],
        progress: &ProgressTx,
    ) -> Result<Running, SpawnError> {
        let mut last_state = None;
        // Since when the newest task has waited for a node with an error
        // ("no suitable node": its node drained or gone mid-start).
        let mut unplaceable: Option<tokio::time::Instant> = None;
        loop {
            let tasks = self.tasks(service_id).await?;
            match tasks.first().filter(|t| task_state(t) == Some(TaskState::PENDING)).map(task_error) {
                Some(why) if !why.is_empty() => {
                    let since = *unplaceable.get_or_insert_with(tokio::time::Instant::now);
                    if since.elapsed() >= UNPLACEABLE_FOR {
                        return Err(SpawnError::Failed(format!("the server's task cannot run on any node: {why}")));
                    }
                }
                _ => unplaceable = None,
            }
            let failed: Vec<&Task> = tasks.iter().filter(|t| is_failed(task_state(t))).collect();
            if failed.len() > self.cfg.restart_attempts as usize {
                let tries = failed.len();
                let container = failed[0].status.clone().and_then(|s| s.container_status).and_then(|c| c.container_id);
                let output = match (container.filter(|c| !c.is_empty()), self.task_node(failed[0], nodes)) {
                    (Some(c), Some((_, engine))) => {
                        self.output_tail(&engine, &c, 3).await.map(|o| format!("; its last output: {o}"))
                    }
                    _ => None,
                };
                return Err(SpawnError::Failed(format!(
                    "the server's task failed {tries} time{}; the last time: {}{}",
                    if tries == 1 { "" } else { "s" },
                    task_error(failed[0]),
                    output.unwrap_or_default()
                )));
            }
            if let Some(r) = self.running_task(&tasks, nodes).await? {
                return Ok(r);
            }
            let state = tasks.first().and_then(task_state);
            if state != last_state {
                if let Some(s) = state {
                    let why = tasks.first().map(task_error).filter(|w| !w.is_empty());
                    let message = match why {
                        // "no suitable node", a pull that fails, …
                        Some(w) if s == TaskState::PENDING || s == TaskState::REJECTED => {
                            format!("The server's task is {s}: {w}")
                        }
                        _ => format!("The server's task is {s}"),
                    };
                    let _ = progress.send(Progress { progress: 50, message });
                }
                last_state = state;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    async fn start_service(&self, spec: SpawnSpec, progress: ProgressTx) -> Result<Started, SpawnError> {
        let gateway = self.ensure_network().await?;
        let image = spec.image.clone().unwrap_or_else(|| self.docker.config().image.clone());
        if image.is_empty() {
            return Err(SpawnError::Failed(
                "no image to run: docker.image is empty and the start names no template (set docker.image, or \
                 templates.default for default servers)"
                    .into(),
            ));
        }
        let home = self
            .docker
            .volume_plan(&spec)
            .into_iter()
            .find(|v| v.role == berth_spawner::DataRole::Home)
            .map(|v| v.name)
            .unwrap_or_default();
        let nodes = self.nodes().await?;
        let node = self.place(&spec.gpus, &home).await?;
        // Where the image, the volumes and the node's part of the network
        // must be: the node, or every usable node when Swarm picks.
        let targets: Vec<SwarmNode> = match &node {
            Some(n) => vec![n.clone()],
            None => nodes.iter().filter(|n| self.may_use(n) && n.is_up()).cloned().collect(),
        };
        for n in &targets {
            let engine = self.engine_of(n)?;
            if !n.own {
                let _ = progress.send(Progress { progress: 20, message: format!("Preparing node {}", n.hostname) });
                self.ensure_node_network(n, &engine, &nodes).await?;
            }
            if spec.build.is_empty() {
                engine.ensure_image(&image, &progress).await.map_err(|e| on_node(n, e))?;
            } else {
                engine.ensure_built(&image, &spec.build, &progress).await.map_err(|e| on_node(n, e))?;
            }
        }
        let shared_volumes = self.cfg.volumes == "shared";
        if !shared_volumes {
            let _ = progress.send(Progress { progress: 40, message: "Preparing volumes…".into() });
            for n in &targets {
                self.engine_of(n)?.prepare_volumes(&spec).await.map_err(|e| on_node(n, e))?;
            }
        }
        let name = service_name(&spec.user, &spec.server);
        self.remove_stale(&name).await?;
        let own = nodes.iter().find(|n| n.own);
        let (constraint, gpu_kind) = match (&node, own) {
            (Some(n), _) => (format!("node.id=={}", n.id), n.gpu_kind.clone()),
            (None, _) if self.cfg.nodes == "labelled" => {
                (format!("node.labels.{}==true", crate::nodes::LABEL_SERVERS), None)
            }
            (None, Some(o)) => (format!("node.id=={}", o.id), o.gpu_kind.clone()),
            (None, None) => return Err(SpawnError::Failed("berth's own node is not in the swarm's node list".into())),
        };
        // Servers on berth's node reach the hub at their bridge's gateway;
        // on any other node (or wherever Swarm puts them), at the hub's
        // address in the swarm.
        let api_url = match &node {
            Some(n) if n.own => self.docker.hub_api_url(&gateway),
            _ => self.docker.hub_api_url(&self.hub_address().await?),
        };
        let body = self.service_spec(&spec, &api_url, &Placement { constraint, gpu_kind, shared_volumes });
        let docker = self.docker.client()?;
        let created = docker.create_service(body, None).await.map_err(engine_error)?;
        let service_id = created.id.filter(|i| !i.is_empty()).unwrap_or_else(|| name.clone());
        let mut guard = ServiceGuard { docker, service: Some(service_id.clone()) };
        let where_ = node.as_ref().map(|n| format!(" on node {}", n.hostname)).unwrap_or_default();
        let _ = progress.send(Progress { progress: 45, message: format!("Starting the Swarm service {name}{where_}") });
        let run = self.wait_running(&service_id, &nodes, &progress).await?;
        let target = format!("http://{}:{}", run.ip, spec.port.unwrap_or(CONTAINER_PORT));
        guard.service = None;
        tracing::info!(
            user = %spec.user, server = %spec.server, service = %name, task = %run.task, node = %run.node.hostname,
            %target, gpus = ?spec.gpus, "started Swarm service"
        );
        Ok(Started { target: target.clone(), state: self.state_of(&service_id, &name, &run, &target, &spec.gpus) })
    }

    /// A started server's saved state. `node` (a hostname) only for a node
    /// other than berth's own, whose engine then answers for the container.
    fn state_of(
        &self,
        service_id: &str,
        name: &str,
        run: &Running,
        target: &str,
        gpus: &[String],
    ) -> serde_json::Value {
        let mut state = json!({
            "service_id": service_id,
            "service_name": name,
            "task_id": run.task,
            "container_id": run.container,
            "node_id": run.node.id,
            "target": target,
            "gpus": gpus,
        });
        if !run.node.own {
            state["node"] = json!(run.node.hostname);
        }
        state
    }

    /// The engine of the node a saved state names (berth's own when none).
    fn engine_for(&self, state: &serde_json::Value) -> Result<Arc<DockerSpawner>, SpawnError> {
        match state.get("node").and_then(|n| n.as_str()) {
            None => Ok(self.docker.clone()),
            Some(host) => {
                let node = SwarmNode {
                    id: state.get("node_id").and_then(|n| n.as_str()).unwrap_or_default().to_string(),
                    hostname: host.to_string(),
                    addr: String::new(),
                    own: false,
                    state: String::new(),
                    availability: String::new(),
                    labels: Default::default(),
                    gpu_kind: None,
                    gpus: Vec::new(),
                    gpu_model: None,
                };
                self.engine_of(&node)
            }
        }
    }

    /// Makes the node's config-only network (`<network>-config`), which its
    /// part of the swarm network is made from, unless it has one: traffic
    /// between containers off, and a `/24` of `swarm.node_subnets` that no
    /// network on the node and no other node's part uses, so the hub can
    /// route to each node's servers.
    async fn ensure_node_network(
        &self,
        node: &SwarmNode,
        engine: &DockerSpawner,
        nodes: &[SwarmNode],
    ) -> Result<(), SpawnError> {
        if self.networks_ready.lock().map(|r| r.contains(&node.hostname)).unwrap_or(false) {
            return Ok(());
        }
        let _one_at_a_time = self.network_lock.lock().await;
        let config_name = self.config_network();
        let docker = engine.client().map_err(|e| on_node(node, e))?;
        match docker.inspect_network(&config_name, None::<InspectNetworkOptions>).await {
            Ok(net) => {
                if crate::network::icc(&Network { driver: Some("bridge".into()), ..net }) != crate::network::Icc::Off {
                    tracing::warn!(
                        node = %node.hostname, network = %config_name,
                        "the node's network configuration lets containers connect to each other; remove it when no \
                         server runs there and berth re-creates it with that traffic off"
                    );
                }
            }
            Err(e) if is_not_found(&e) => {
                let mut taken: Vec<String> = Vec::new();
                let subnets = |nets: Vec<Network>| -> Vec<String> {
                    nets.into_iter()
                        .flat_map(|n| n.ipam.and_then(|i| i.config).unwrap_or_default())
                        .filter_map(|c| c.subnet)
                        .collect()
                };
                let here = docker
                    .list_networks(None::<ListNetworksOptions>)
                    .await
                    .map_err(|e| on_node(node, engine_error(e)))?;
                taken.extend(subnets(here));
                for other in nodes.iter().filter(|n| n.hostname != node.hostname && self.may_use(n)) {
                    let Ok(d) = self.engine_of(other).and_then(|e| e.client()) else { continue };
                    if let Ok(n) = d.inspect_network(&config_name, None::<InspectNetworkOptions>).await {
                        taken.extend(subnets(vec![n]));
                    }
                }
                let (subnet, gateway) =
                    crate::nodes::free_subnet_in(&self.cfg.node_subnets, &taken).ok_or_else(|| {
                        SpawnError::Failed(format!(
                            "no /24 of swarm.node_subnets ({}) is free for node {}'s part of the network",
                            self.cfg.node_subnets, node.hostname
                        ))
                    })?;
                let req = NetworkCreateRequest {
                    name: config_name.clone(),
                    config_only: Some(true),
                    ipam: Some(Ipam {
                        config: Some(vec![IpamConfig {
                            subnet: Some(subnet.clone()),
                            gateway: Some(gateway),
                            ..Default::default()
                        }]),
                        ..Default::default()
                    }),
                    options: Some(HashMap::from([(ICC_OPTION.to_string(), "false".to_string())])),
                    labels: Some(HashMap::from([(LABEL_MANAGED.to_string(), "true".to_string())])),
                    ..Default::default()
                };
                match docker.create_network(req).await {
                    Ok(_) | Err(bollard::errors::Error::DockerResponseServerError { status_code: 409, .. }) => {}
                    Err(e) => return Err(on_node(node, engine_error(e))),
                }
                tracing::info!(node = %node.hostname, %subnet, "made the node's part of the swarm network");
            }
            Err(e) => return Err(on_node(node, engine_error(e))),
        }
        if let Ok(mut r) = self.networks_ready.lock() {
            r.insert(node.hostname.clone());
        }
        Ok(())
    }

    /// With `swarm.volumes = "shared"`: the user's own volumes carry the
    /// driver and options every node creates them with on first use.
    fn shared_volume_options(&self, spec: &SpawnSpec, mounts: &mut [Mount]) {
        let own: Vec<String> = self
            .docker
            .volume_plan(spec)
            .into_iter()
            .filter(|v| v.role != berth_spawner::DataRole::Shared && !spec.volumes.iter().any(|a| a.role == v.role))
            .map(|v| v.name)
            .collect();
        for m in mounts.iter_mut() {
            let Some(src) = m.source.clone().filter(|s| own.contains(s)) else { continue };
            let options: HashMap<String, String> = crate::config::parse_pairs(&self.cfg.volume_opts)
                .into_iter()
                .map(|(k, v)| (k, v.replace("{volume}", &src)))
                .collect();
            let mut vo = m.volume_options.clone().unwrap_or_default();
            vo.driver_config = Some(MountVolumeOptionsDriverConfig {
                name: Some(self.cfg.volume_driver.clone()),
                options: Some(options),
            });
            m.volume_options = Some(vo);
        }
    }
}

impl SwarmSpawner {
    /// Every few seconds: which task of each of berth's services runs; a
    /// server whose task changed (ended, or another one runs) is sent to
    /// `exits`, and the hub checks it.
    async fn watch_tasks(&self, exits: tokio::sync::mpsc::UnboundedSender<(String, String)>) {
        let mut running: HashMap<String, (String, String, Option<String>)> = HashMap::new();
        loop {
            tokio::time::sleep(TASK_WATCH_INTERVAL).await;
            if exits.is_closed() {
                return;
            }
            let Ok(docker) = self.docker.client() else { continue };
            let Ok(tasks) = docker.list_tasks(None::<ListTasksOptions>).await else { continue };
            let mut now: HashMap<String, (String, String, Option<String>)> = HashMap::new();
            for t in tasks {
                let labels = t.spec.as_ref().and_then(|s| s.container_spec.as_ref()).and_then(|c| c.labels.as_ref());
                let Some(labels) = labels.filter(|l| l.contains_key(LABEL_SWARM)) else { continue };
                let (Some(user), Some(server), Some(service)) =
                    (labels.get(LABEL_USER), labels.get(LABEL_SERVER), t.service_id.clone())
                else {
                    continue;
                };
                let entry = now.entry(service).or_insert_with(|| (user.clone(), server.clone(), None));
                if task_state(&t) == Some(TaskState::RUNNING) && t.desired_state == Some(TaskState::RUNNING) {
                    entry.2 = t.id.clone();
                }
            }
            for (service, (user, server, task)) in &running {
                // Its running task changed, or it has none (being moved, or
                // waiting for a node): checked every round until settled.
                let now_task = now.get(service).map(|(_, _, t)| t);
                let unsettled = match now_task {
                    Some(t) => t != task || t.is_none(),
                    None => task.is_some(),
                };
                if unsettled && exits.send((user.clone(), server.clone())).is_err() {
                    return;
                }
            }
            running = now;
        }
    }
}

/// How long a starting task may wait for a node that can take it before
/// the start fails with Swarm's reason.
const UNPLACEABLE_FOR: Duration = Duration::from_secs(15);

/// How often the Swarm spawner looks at its services' tasks.
const TASK_WATCH_INTERVAL: Duration = Duration::from_secs(3);

/// An error from a node's own engine, saying which node.
fn on_node(node: &SwarmNode, e: SpawnError) -> SpawnError {
    if node.own {
        return e;
    }
    match e {
        SpawnError::Failed(m) => SpawnError::Failed(format!("node {}: {m}", node.hostname)),
        other => other,
    }
}

/// A service's task once it runs.
#[derive(Debug, Clone)]
pub(crate) struct Running {
    pub task: String,
    pub container: String,
    pub ip: String,
    pub node: SwarmNode,
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

    fn stops_vanished(&self) -> bool {
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
                let engine = self.engine_for(state)?;
                self.wait_gone(&engine, &c, grace.interrupt + grace.terminate + Duration::from_secs(10)).await;
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
            let saved = match docker.inspect_task(task).await {
                Ok(t) => {
                    if task_state(&t) == Some(TaskState::RUNNING) && t.desired_state == Some(TaskState::RUNNING) {
                        return Ok(Status::Running);
                    }
                    Some(t)
                }
                Err(e) if is_not_found(&e) => None,
                Err(e) => return Err(engine_error(e)),
            };
            let ended = match &saved {
                Some(t) => {
                    let st = task_state(t).map(|s| s.to_string()).unwrap_or_else(|| "unknown".into());
                    let why = task_error(t);
                    if why.is_empty() {
                        format!("the server's task is {st}")
                    } else {
                        format!("the server's task is {st}: {why}")
                    }
                }
                None => "the server's task is gone".to_string(),
            };
            // Swarm may have put a new task in its place (its node was
            // drained or lost, and the service may run elsewhere).
            let nodes = self.nodes().await?;
            let tasks: Vec<Task> =
                self.tasks(service).await?.into_iter().filter(|t| t.id.as_deref() != Some(task)).collect();
            if let Some(run) = self.running_task(&tasks, &nodes).await? {
                let port = self.target(state).and_then(|t| t.rsplit(':').next().map(str::to_string));
                let target = format!("http://{}:{}", run.ip, port.unwrap_or_else(|| CONTAINER_PORT.to_string()));
                let name = state_field(state, "service_name").unwrap_or(service).to_string();
                let gpus: Vec<String> =
                    state.get("gpus").and_then(|g| serde_json::from_value(g.clone()).ok()).unwrap_or_default();
                let from = saved
                    .as_ref()
                    .and_then(|t| nodes.iter().find(|n| Some(&n.id) == t.node_id.as_ref()))
                    .map(|n| format!(" on node {} ({}, {})", n.hostname, n.state, n.availability))
                    .unwrap_or_default();
                let why = format!("{ended}{from}; Swarm runs it on node {} now", run.node.hostname);
                return Ok(Status::Moved {
                    started: Started { state: self.state_of(service, &name, &run, &target, &gpus), target },
                    why,
                });
            }
            // A replacement no node can take ("no suitable node"): the
            // server cannot come back by itself.
            let waiting =
                tasks.iter().find(|t| t.desired_state == Some(TaskState::RUNNING) && !is_failed(task_state(t)));
            match waiting {
                Some(t) if task_state(t) == Some(TaskState::PENDING) && !task_error(t).is_empty() => {
                    Ok(Status::Exited(format!("{ended}; its replacement cannot run: {}", task_error(t))))
                }
                // Being scheduled or started elsewhere: the next check sees it.
                Some(_) => Ok(Status::Running),
                // Being shut down, its replacement not made yet.
                None if saved.as_ref().and_then(task_state) == Some(TaskState::RUNNING) => Ok(Status::Running),
                None => Ok(Status::Exited(ended)),
            }
        })
    }

    fn exec<'a>(
        &'a self,
        _user: &'a str,
        state: &'a serde_json::Value,
        req: berth_spawner::ExecRequest,
    ) -> BoxFuture<'a, Result<berth_spawner::ExecProcess, SpawnError>> {
        // Through the engine of the task's node.
        Box::pin(async move { self.engine_for(state)?.exec_in(state_field(state, "container_id")?, req).await })
    }

    fn connect<'a>(
        &'a self,
        state: &'a serde_json::Value,
        port: u16,
    ) -> BoxFuture<'a, Result<tokio::net::TcpStream, SpawnError>> {
        Box::pin(async move {
            if state.get("node").is_none() {
                return self.docker.connect_in(state_field(state, "container_id")?, port).await;
            }
            // On another node: the container's own address, which the hub
            // reaches (docs/swarm.md, routes to the nodes' networks).
            let target = self.target(state).ok_or_else(|| SpawnError::BadState(format!("no target in {state}")))?;
            let host =
                target.trim_start_matches("http://").rsplit_once(':').map(|(h, _)| h.to_string()).unwrap_or_default();
            tokio::net::TcpStream::connect((host.as_str(), port))
                .await
                .map_err(|e| SpawnError::Failed(format!("cannot connect to port {port} of the server at {host}: {e}")))
        })
    }

    fn list_managed(&self) -> BoxFuture<'_, Vec<(String, String, String)>> {
        // The tasks' containers carry berth's labels as the Docker
        // spawner's do (the GPU sampler attributes processes by them).
        Spawner::list_managed(&*self.docker)
    }

    fn watch_exits(&self, exits: tokio::sync::mpsc::UnboundedSender<(String, String)>) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            // Containers on berth's node as they exit; tasks on every node
            // as they change (a node drained or lost, a task moved).
            let local = self.docker.watch_container_exits(exits.clone());
            let tasks = self.watch_tasks(exits);
            futures_util::future::join(local, tasks).await;
        })
    }

    fn data_node<'a>(&'a self, owner_id: &'a str) -> BoxFuture<'a, Option<Option<String>>> {
        Box::pin(async move {
            if self.cfg.volumes == "shared" || self.cfg.nodes != "labelled" {
                return None;
            }
            let nodes = self.nodes().await.ok()?;
            let home = crate::own_volume(owner_id, berth_spawner::DataRole::Home);
            let node = self.node_with_volume(&nodes, &home).await?;
            Some(node.gpu_key().map(str::to_string))
        })
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
            // The newest of the server's task containers on any node berth
            // uses (a failed one is kept until its service goes).
            let mut engines = vec![self.docker.clone()];
            for n in self.nodes().await.unwrap_or_default().iter().filter(|n| !n.own && self.may_use(n)) {
                engines.extend(self.engine_of(n).ok());
            }
            let filters = HashMap::from([(
                "label".to_string(),
                vec![format!("{LABEL_USER}={user}"), format!("{LABEL_SWARM}=true")],
            )]);
            let mut newest: Option<(i64, Arc<DockerSpawner>, String)> = None;
            for engine in engines {
                let Ok(docker) = engine.client() else { continue };
                let opts = ListContainersOptions { all: true, filters: Some(filters.clone()), ..Default::default() };
                let Ok(list) = docker.list_containers(Some(opts)).await else { continue };
                for c in list {
                    if c.labels.as_ref().and_then(|l| l.get(LABEL_SERVER)).map(String::as_str) != Some(server) {
                        continue;
                    }
                    let created = c.created.unwrap_or(0);
                    if let Some(id) = c.id.filter(|_| newest.as_ref().is_none_or(|(t, _, _)| created > *t)) {
                        newest = Some((created, engine.clone(), id));
                    }
                }
            }
            let (_, engine, id) = newest?;
            self.output_tail(&engine, &id, 400).await
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

    fn node_address(&self) -> BoxFuture<'_, Result<Option<String>, SpawnError>> {
        Box::pin(async move {
            if self.cfg.nodes != "labelled" || !self.docker.config().hub_connect_url.is_empty() {
                return Ok(None);
            }
            self.hub_address().await.map(Some)
        })
    }

    fn node_gpus(&self) -> BoxFuture<'_, Vec<(String, String)>> {
        Box::pin(async move {
            if self.cfg.nodes != "labelled" {
                return Vec::new();
            }
            match SwarmSpawner::node_gpus(self).await {
                Ok(g) => g,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the swarm nodes' GPUs");
                    Vec::new()
                }
            }
        })
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

    fn pinned(node: &str, gpu_kind: Option<&str>) -> Placement {
        Placement {
            constraint: format!("node.id=={node}"),
            gpu_kind: gpu_kind.map(str::to_string),
            shared_volumes: false,
        }
    }

    fn env(s: &ServiceSpec) -> Vec<String> {
        s.task_template.clone().unwrap().container_spec.unwrap().env.unwrap()
    }

    #[test]
    fn a_service_carries_the_containers_spec_pinned_to_berths_node() {
        let node = pinned("n0de", None);
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
        let plain = pinned("n1", None);
        let s = swarm().service_spec(&spec(&["GPU-1", "GPU-3"]), "http://x/hub/api", &plain);
        let gpu_env: Vec<String> = env(&s).into_iter().filter(|e| e.starts_with("NVIDIA_VISIBLE_DEVICES=")).collect();
        assert_eq!(gpu_env, ["NVIDIA_VISIBLE_DEVICES=GPU-1,GPU-3"], "berth's ids, once, whatever the template said");
        assert_eq!(s.task_template.unwrap().resources.unwrap().reservations, None);

        let advertised = pinned("n1", Some("NVIDIA-GPU"));
        let s = swarm().service_spec(&spec(&["GPU-1", "GPU-3"]), "http://x/hub/api", &advertised);
        let generic = s.task_template.unwrap().resources.unwrap().reservations.unwrap().generic_resources.unwrap();
        let d = generic[0].discrete_resource_spec.clone().unwrap();
        assert_eq!((d.kind.as_deref(), d.value), (Some("NVIDIA-GPU"), Some(2)));

        // Another node's GPUs: the hub's ids name the node, the runtime
        // gets the device ids, the service the node's constraint.
        let s = swarm().service_spec(&spec(&["w1:GPU-a", "w1:GPU-b"]), "http://x/hub/api", &pinned("w1id", None));
        let gpu_env: Vec<String> = env(&s).into_iter().filter(|e| e.starts_with("NVIDIA_VISIBLE_DEVICES=")).collect();
        assert_eq!(gpu_env, ["NVIDIA_VISIBLE_DEVICES=GPU-a,GPU-b"]);
        assert_eq!(s.task_template.unwrap().placement.unwrap().constraints.unwrap(), ["node.id==w1id"]);
    }

    #[test]
    fn shared_volumes_carry_the_driver_every_node_makes_them_with() {
        let d = DockerSpawner::connect(Config::default(), "/").unwrap();
        let cfg = SwarmConfig {
            volumes: "shared".into(),
            volume_driver: "local".into(),
            volume_opts: "type=nfs;o=addr=10.0.0.5,rw;device=:/export/{volume}".into(),
            ..SwarmConfig::default()
        };
        let sw = SwarmSpawner::new(d, cfg, StopGrace::default());
        let place = Placement { shared_volumes: true, ..pinned("x", None) };
        let s = sw.service_spec(&spec(&[]), "http://x/hub/api", &place);
        let mounts = s.task_template.unwrap().container_spec.unwrap().mounts.unwrap();
        let home = mounts.iter().find(|m| m.source.as_deref() == Some("berth-1abc-home")).unwrap();
        let dc = home.volume_options.clone().unwrap().driver_config.unwrap();
        assert_eq!(dc.name.as_deref(), Some("local"));
        let o = dc.options.unwrap();
        assert_eq!(o["device"], ":/export/berth-1abc-home");
        assert_eq!(o["o"], "addr=10.0.0.5,rw");
        // The one shared volume keeps its own driver ([docker] shared_volume_*).
        let shared = mounts.iter().find(|m| m.source.as_deref() == Some("berth-shared")).unwrap();
        assert!(shared.volume_options.as_ref().and_then(|v| v.driver_config.as_ref()).is_none());
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
