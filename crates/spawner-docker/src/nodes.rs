//! The swarm's nodes as the Swarm spawner sees them: which ones may run
//! servers (`swarm.nodes`), what GPUs each has, where each one's own engine
//! answers (`swarm.engines`), and the node a server is placed on.
//!
//! berth places servers itself and pins each service to its node with a
//! constraint: a server that holds GPUs runs on the node whose GPUs berth
//! allocated, one with volumes on a node (`swarm.volumes = "node"`) runs
//! where they are, and a new user's first server goes to the usable node
//! running the fewest of berth's servers. With `swarm.volumes = "shared"`
//! (volumes on a driver every node mounts, e.g. NFS) a server without GPUs
//! is left to Swarm among the usable nodes, which moves it when its node is
//! drained or lost.
//!
//! What only a node's own engine can do — its images and volumes, the
//! config-only network its part of the swarm network is made from, the
//! task's container (address, output, SSH) — goes through a Docker spawner
//! over that engine ([`DockerSpawner::connect_to`]).

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::sync::Arc;

use berth_spawner::SpawnError;
use bollard::models::{Node, NodeSpecAvailabilityEnum, NodeState, TaskState};
use bollard::query_parameters::{ListNodesOptions, ListTasksOptions};

use crate::swarm::{gpu_kind, SwarmSpawner, LABEL_SWARM};
use crate::{engine_error, is_not_found, Endpoint};

/// The node label that lets berth place servers on a node
/// (`swarm.nodes = "labelled"`).
pub const LABEL_SERVERS: &str = "berth.servers";
/// A node's GPUs when it does not advertise them as generic resources: a
/// count (`2`) or the device ids (`0,1` or `GPU-…,GPU-…`).
pub const LABEL_GPUS: &str = "berth.gpus";
/// The model of a node's GPUs, for the GPU pages.
pub const LABEL_GPU_MODEL: &str = "berth.gpu-model";

/// One node of the swarm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SwarmNode {
    pub id: String,
    pub hostname: String,
    /// Its address in the swarm.
    pub addr: String,
    /// berth's own node (the engine berth talks to).
    pub own: bool,
    /// `ready`, `down`, …
    pub state: String,
    /// `active`, `pause` or `drain`.
    pub availability: String,
    pub labels: BTreeMap<String, String>,
    /// The generic resource kind its GPUs are advertised as, if they are.
    pub gpu_kind: Option<String>,
    /// Its GPUs' device ids as the node's runtime knows them (from generic
    /// resources, else the `berth.gpus` label; none known for berth's own
    /// node, whose GPUs the hub detects or is configured with).
    pub gpus: Vec<String>,
    /// From the `berth.gpu-model` label.
    pub gpu_model: Option<String>,
}

impl SwarmNode {
    /// Ready and active: Swarm would run a task on it.
    pub fn is_up(&self) -> bool {
        self.state == "ready" && self.availability == "active"
    }

    /// The key its GPU ids carry in the hub's inventory: none for berth's
    /// own node (its ids are plain), the hostname for any other.
    pub fn gpu_key(&self) -> Option<&str> {
        (!self.own).then_some(self.hostname.as_str())
    }

    fn from_engine(n: Node, own_id: &str) -> SwarmNode {
        let id = n.id.unwrap_or_default();
        let spec = n.spec.unwrap_or_default();
        let labels: BTreeMap<String, String> = spec.labels.unwrap_or_default().into_iter().collect();
        let desc = n.description.unwrap_or_default();
        let generic = desc.resources.and_then(|r| r.generic_resources).unwrap_or_default();
        let kind = gpu_kind(&generic);
        let mut gpus: Vec<String> = Vec::new();
        if let Some(kind) = &kind {
            for g in &generic {
                if let Some(named) = &g.named_resource_spec {
                    if named.kind.as_deref() == Some(kind) {
                        gpus.extend(named.value.clone());
                    }
                }
                if let Some(d) = &g.discrete_resource_spec {
                    if d.kind.as_deref() == Some(kind) {
                        gpus.extend((0..d.value.unwrap_or(0).max(0)).map(|i| i.to_string()));
                    }
                }
            }
        }
        if gpus.is_empty() {
            gpus = labels.get(LABEL_GPUS).map(|l| gpus_of_label(l)).unwrap_or_default();
        }
        let status = n.status.unwrap_or_default();
        SwarmNode {
            own: id == own_id,
            id,
            hostname: desc.hostname.unwrap_or_default(),
            addr: status.addr.unwrap_or_default(),
            state: status.state.unwrap_or(NodeState::UNKNOWN).to_string(),
            availability: spec.availability.unwrap_or(NodeSpecAvailabilityEnum::ACTIVE).to_string(),
            gpu_model: labels.get(LABEL_GPU_MODEL).cloned(),
            labels,
            gpu_kind: kind,
            gpus,
        }
    }
}

/// `2` → `0`, `1`; `0,3` or `GPU-a,GPU-b` → those ids.
fn gpus_of_label(label: &str) -> Vec<String> {
    let label = label.trim();
    if let Ok(n) = label.parse::<u32>() {
        return (0..n.min(64)).map(|i| i.to_string()).collect();
    }
    label.split(',').map(str::trim).filter(|s| !s.is_empty() && !s.contains(':')).map(str::to_string).collect()
}

/// The node a GPU id of the hub's inventory is on: `node:device` is a Swarm
/// node's GPU, a plain id berth's own node's.
pub fn gpu_node(id: &str) -> Option<&str> {
    berth_core::gpu::node_of(id)
}

/// The device id without its node.
pub fn gpu_device(id: &str) -> &str {
    id.split_once(':').map(|(_, d)| d).unwrap_or(id)
}

/// `hostname=unix:///…;hostname=tcp://…` into endpoints.
pub fn parse_engines(s: &str, tls_dir: &str) -> Result<HashMap<String, Endpoint>, String> {
    let tls = (!tls_dir.is_empty()).then(|| std::path::Path::new(tls_dir));
    let mut out = HashMap::new();
    for (host, addr) in crate::config::parse_pairs(s) {
        // Each node's own certificates in <dir>/<hostname>/ when there is one.
        let dir = tls.map(|d| if d.join(&host).is_dir() { d.join(&host) } else { d.to_path_buf() });
        let e = Endpoint::parse(&addr, dir.as_deref()).map_err(|e| format!("node {host}: {e}"))?;
        out.insert(host, e);
    }
    Ok(out)
}

/// The first `/24` of `pool` that overlaps none of `taken`.
pub fn free_subnet_in(pool: &str, taken: &[String]) -> Option<(String, String)> {
    let (base, bits) = parse_cidr(pool)?;
    if bits > 24 {
        return None;
    }
    let taken: Vec<(u32, u8)> = taken.iter().filter_map(|t| parse_cidr(t)).collect();
    let count = 1u32 << (24 - bits);
    (0..count).find_map(|i| {
        let net = (base & mask(bits)) + (i << 8);
        let clash = taken.iter().any(|&(t, tb)| {
            let m = mask(tb.min(24));
            (net & m) == (t & m)
        });
        (!clash).then(|| (format!("{}/24", Ipv4Addr::from(net)), Ipv4Addr::from(net + 1).to_string()))
    })
}

fn mask(bits: u8) -> u32 {
    if bits == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(bits))
    }
}

fn parse_cidr(s: &str) -> Option<(u32, u8)> {
    let (ip, bits) = s.split_once('/')?;
    let ip: Ipv4Addr = ip.parse().ok()?;
    let bits: u8 = bits.parse().ok().filter(|b| *b <= 32)?;
    Some((u32::from(ip), bits))
}

impl SwarmSpawner {
    /// Every node of the swarm (berth's engine must be a manager).
    pub async fn nodes(&self) -> Result<Vec<SwarmNode>, SpawnError> {
        let facts = self.node_facts().await?;
        let docker = self.docker().client()?;
        let list = docker.list_nodes(None::<ListNodesOptions>).await.map_err(engine_error)?;
        let mut nodes: Vec<SwarmNode> = list.into_iter().map(|n| SwarmNode::from_engine(n, &facts.node_id)).collect();
        nodes.sort_by(|a, b| (!a.own, &a.hostname).cmp(&(!b.own, &b.hostname)));
        Ok(nodes)
    }

    /// Whether berth may place servers on `node`: berth's own node with
    /// `swarm.nodes = "self"`, a node labelled `berth.servers=true` with
    /// `"labelled"`.
    pub fn may_use(&self, node: &SwarmNode) -> bool {
        match self.config().nodes.as_str() {
            "labelled" => node.labels.get(LABEL_SERVERS).is_some_and(|v| v == "true"),
            _ => node.own,
        }
    }

    /// The GPUs of the usable nodes other than berth's own, as the hub's
    /// inventory holds them: (`hostname:device`, model). berth's own node's
    /// GPUs are the hub's own detection or `gpu.devices`.
    pub async fn node_gpus(&self) -> Result<Vec<(String, String)>, SpawnError> {
        Ok(self
            .nodes()
            .await?
            .into_iter()
            .filter(|n| !n.own && self.may_use(n))
            .flat_map(|n| {
                let model = n.gpu_model.clone().unwrap_or_else(|| "unknown".into());
                n.gpus.iter().map(|g| (format!("{}:{g}", n.hostname), model.clone())).collect::<Vec<_>>()
            })
            .collect())
    }

    /// The Docker spawner over `node`'s own engine: berth's for its own
    /// node, `swarm.engines`' entry for any other (made once).
    pub fn engine_of(&self, node: &SwarmNode) -> Result<Arc<crate::DockerSpawner>, SpawnError> {
        if node.own {
            return Ok(self.docker().clone());
        }
        let endpoint = self.engines().get(&node.hostname).cloned().ok_or_else(|| {
            SpawnError::Failed(format!(
                "berth has no address for node {}'s Docker engine: add `{}=tcp://ADDRESS:2376` to swarm.engines \
                 (with swarm.engine_tls_dir), or take the node's berth.servers label off",
                node.hostname, node.hostname
            ))
        })?;
        let mut cache = self.node_engines.lock().map_err(|_| SpawnError::Failed("node engine lock poisoned".into()))?;
        if let Some(e) = cache.get(&node.hostname) {
            return Ok(e.clone());
        }
        let e = crate::DockerSpawner::connect_to(self.docker().config().clone(), self.docker().base_url(), endpoint);
        e.set_hub_port(self.docker().hub_port());
        cache.insert(node.hostname.clone(), e.clone());
        Ok(e)
    }

    /// Where a node's servers reach the hub: the hub's address in the
    /// swarm (`swarm.hub_address`, else berth's node's swarm address).
    pub async fn hub_address(&self) -> Result<String, SpawnError> {
        if !self.config().hub_address.is_empty() {
            return Ok(self.config().hub_address.clone());
        }
        let info = self.docker().client()?.info().await.map_err(engine_error)?;
        info.swarm.and_then(|s| s.node_addr).filter(|a| !a.is_empty()).ok_or_else(|| {
            SpawnError::Failed("the swarm does not say berth's node's address; set swarm.hub_address".into())
        })
    }

    /// The running tasks of berth's services per node id.
    async fn load_by_node(&self) -> HashMap<String, usize> {
        let Ok(docker) = self.docker().client() else { return HashMap::new() };
        let filters = HashMap::from([("desired-state".to_string(), vec!["running".to_string()])]);
        let tasks = docker.list_tasks(Some(ListTasksOptions { filters: Some(filters) })).await.unwrap_or_default();
        let mut load = HashMap::new();
        for t in tasks {
            let ours = t
                .spec
                .as_ref()
                .and_then(|s| s.container_spec.as_ref())
                .and_then(|c| c.labels.as_ref())
                .is_some_and(|l| l.contains_key(LABEL_SWARM));
            if ours && t.status.as_ref().and_then(|s| s.state) != Some(TaskState::SHUTDOWN) {
                *load.entry(t.node_id.unwrap_or_default()).or_default() += 1;
            }
        }
        load
    }

    /// The usable node that holds `volume` (a user's home volume), if one does.
    pub async fn node_with_volume(&self, nodes: &[SwarmNode], volume: &str) -> Option<SwarmNode> {
        for n in nodes.iter().filter(|n| self.may_use(n)) {
            let Ok(engine) = self.engine_of(n) else { continue };
            let Ok(docker) = engine.client() else { continue };
            match docker.inspect_volume(volume).await {
                Ok(_) => return Some(n.clone()),
                Err(e) if is_not_found(&e) => {}
                Err(e) => tracing::warn!(node = %n.hostname, error = %e, "cannot ask the node for its volumes"),
            }
        }
        None
    }

    /// The node a server goes to. `gpus` are the hub's ids (their node
    /// decides); else where its home volume is (`swarm.volumes = "node"`);
    /// else the usable, up node with the fewest of berth's servers. `None`
    /// with `swarm.volumes = "shared"` and no GPUs: Swarm decides among the
    /// usable nodes.
    pub async fn place(&self, gpus: &[String], home_volume: &str) -> Result<Option<SwarmNode>, SpawnError> {
        let nodes = self.nodes().await?;
        let usable: Vec<&SwarmNode> = nodes.iter().filter(|n| self.may_use(n)).collect();
        if let Some(first) = gpus.first() {
            let want = gpu_node(first);
            let node = nodes.iter().find(|n| n.gpu_key() == want).ok_or_else(|| {
                SpawnError::Failed(format!(
                    "the server's GPUs are on node {}, which is not in the swarm",
                    want.unwrap_or("?")
                ))
            })?;
            if !node.is_up() {
                return Err(SpawnError::Failed(format!(
                    "the server's GPUs are on node {}, which is {} ({})",
                    node.hostname, node.state, node.availability
                )));
            }
            return Ok(Some(node.clone()));
        }
        if self.config().volumes == "shared" {
            return Ok(None);
        }
        if let Some(n) = self.node_with_volume(&nodes, home_volume).await {
            if !n.is_up() {
                return Err(SpawnError::Failed(format!(
                    "the user's volumes are on node {}, which is {} ({}); the server starts once the node is back \
                     (or move the volumes, or use swarm.volumes = \"shared\")",
                    n.hostname, n.state, n.availability
                )));
            }
            return Ok(Some(n));
        }
        let load = self.load_by_node().await;
        usable
            .iter()
            .filter(|n| n.is_up())
            .min_by_key(|n| (load.get(&n.id).copied().unwrap_or(0), !n.own))
            .map(|n| Some((*n).clone()))
            .ok_or_else(|| {
                SpawnError::Failed(if usable.is_empty() {
                    "no node of the swarm may run servers: label one with `docker node update --label-add \
                     berth.servers=true NODE` (swarm.nodes = \"labelled\")"
                        .to_string()
                } else {
                    let states: Vec<String> =
                        usable.iter().map(|n| format!("{} is {} ({})", n.hostname, n.state, n.availability)).collect();
                    format!("no node that may run servers is up: {}", states.join(", "))
                })
            })
    }
}

impl SwarmSpawner {
    /// What `berth doctor` says of a node berth may use: up, its GPUs and
    /// their runtime, its engine (other nodes) and its part of the network.
    pub async fn check_node(&self, n: &SwarmNode) -> (bool, String) {
        let mut facts = vec![format!("{}, {}", n.state, n.availability)];
        let mut good = n.is_up();
        if !n.gpus.is_empty() {
            let how = n
                .gpu_kind
                .as_ref()
                .map(|k| format!("generic resource {k}"))
                .unwrap_or_else(|| "label berth.gpus".into());
            facts.push(format!("{} GPU(s) from its {how}", n.gpus.len()));
        }
        let docker = match self.engine_of(n).and_then(|e| e.client().map(|d| (e, d))) {
            Ok(x) => x,
            Err(e) => {
                facts.push(e.to_string());
                return (false, facts.join("; "));
            }
        };
        let (engine, docker) = docker;
        match tokio::time::timeout(std::time::Duration::from_secs(5), docker.info()).await {
            Ok(Ok(info)) => {
                if !n.own {
                    facts.push(format!("engine{} answers", engine.endpoint().describe()));
                }
                let runtime = info.default_runtime.unwrap_or_default();
                let has_nvidia = info.runtimes.is_some_and(|r| r.contains_key("nvidia"));
                if !n.gpus.is_empty() {
                    if runtime == "nvidia" {
                        facts.push("default runtime nvidia".into());
                    } else {
                        facts.push(format!(
                            "its default runtime is {runtime}{}: services see no GPU unless it is nvidia \
                             (\"default-runtime\": \"nvidia\" in its daemon.json)",
                            if has_nvidia { "; nvidia is installed" } else { "" }
                        ));
                        good = false;
                    }
                }
                if !n.own {
                    let net = format!("{}-config", self.config().network);
                    match docker.inspect_network(&net, None::<bollard::query_parameters::InspectNetworkOptions>).await {
                        Ok(c) => {
                            let subnet = c
                                .ipam
                                .and_then(|i| i.config)
                                .and_then(|c| c.into_iter().find_map(|c| c.subnet))
                                .unwrap_or_default();
                            facts.push(format!("its part of the network is {subnet} (the hub must route to it)"));
                        }
                        Err(_) => facts.push("its part of the network is made with its first server".into()),
                    }
                }
            }
            Ok(Err(e)) => {
                facts.push(format!("its engine does not answer: {e}"));
                good = false;
            }
            Err(_) => {
                facts.push("its engine did not answer within 5 s".into());
                good = false;
            }
        }
        (good, facts.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets_come_from_the_pool_and_skip_taken_ones() {
        assert_eq!(free_subnet_in("10.213.0.0/16", &[]), Some(("10.213.0.0/24".into(), "10.213.0.1".into())));
        let taken = vec!["10.213.0.0/24".to_string(), "10.213.1.0/25".to_string(), "172.17.0.0/16".to_string()];
        assert_eq!(free_subnet_in("10.213.0.0/16", &taken), Some(("10.213.2.0/24".into(), "10.213.2.1".into())));
        // A wider network taken covers the whole pool.
        assert_eq!(free_subnet_in("10.213.0.0/16", &["10.0.0.0/8".to_string()]), None);
        assert_eq!(free_subnet_in("10.213.7.0/24", &[]), Some(("10.213.7.0/24".into(), "10.213.7.1".into())));
        assert_eq!(free_subnet_in("not a pool", &[]), None);
    }

    #[test]
    fn gpu_labels_and_ids() {
        assert_eq!(gpus_of_label("2"), vec!["0", "1"]);
        assert_eq!(gpus_of_label("GPU-a, GPU-b"), vec!["GPU-a", "GPU-b"]);
        assert_eq!(gpus_of_label(""), Vec::<String>::new());
        assert_eq!(gpu_node("w1:GPU-a"), Some("w1"));
        assert_eq!(gpu_node("0"), None);
        assert_eq!(gpu_device("w1:GPU-a"), "GPU-a");
        assert_eq!(gpu_device("3"), "3");
    }

    #[test]
    fn engines_parse_with_clear_errors() {
        let e = parse_engines("w1=unix:///run/w1/docker.sock; w2=tcp://10.0.0.2:2376", "").unwrap();
        assert_eq!(e["w1"], Endpoint::Unix("/run/w1/docker.sock".into()));
        assert_eq!(e["w2"], Endpoint::Tcp { addr: "10.0.0.2:2376".into(), tls: None });
        let err = parse_engines("w1=http://x", "").unwrap_err();
        assert!(err.contains("node w1") && err.contains("unix:///path or tcp://host:port"), "{err}");
        assert!(parse_engines("w1=tcp://nohost", "").is_err());
        assert!(parse_engines("w1=unix://relative.sock", "").is_err());
    }
}
