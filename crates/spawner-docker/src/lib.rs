//! The Docker spawner: each server in its own container, talking to the
//! engine through its API (bollard; never the `docker` CLI).
//!
//! Containers are named `berth-<user>[--<server>]` and labelled with owner,
//! server and template, so a restarted hub finds them again; per-user named
//! volumes (home, workspace, cache) and one shared volume are created on
//! first use and kept. GPUs arrive as explicit device ids (allocated by the
//! hub) and become `DeviceRequests`. The network keeps containers from
//! connecting to each other, and every container runs hardened (no new
//! privileges, fewer capabilities, process and memory limits).
//!
//! `swarm`: the same containers as Swarm services (one replica each).
//!
//! Must not know the store or HTTP.
#![forbid(unsafe_code)]

pub mod build;
mod config;
mod container;
mod events;
mod exec;
pub mod gpu;
mod hardening;
mod image;
mod network;
pub mod nodes;
pub mod single;
mod spawner;
pub mod swarm;
mod volumes;

use std::collections::HashMap;
use std::sync::Arc;

use berth_spawner::{BoxFuture, SpawnError};
use bollard::Docker;

pub use config::{parse_pairs, Config};
pub use container::own_volume;
pub use image::split_image;
pub use swarm::{SwarmConfig, SwarmSpawner};
pub use volumes::VolumeInfo;

pub const LABEL_MANAGED: &str = "berth.managed";
pub const LABEL_USER: &str = "berth.user";
pub const LABEL_SERVER: &str = "berth.server";
pub const LABEL_TEMPLATE: &str = "berth.template";

/// The port the single-user server listens on inside its container.
pub const CONTAINER_PORT: u16 = 8888;

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
    /// Which engine: the local one, or a Swarm node's (`swarm.engines`).
    endpoint: Endpoint,
    cfg: Config,
    /// The hub's port, for the derived `hub_connect_url`.
    hub_port: std::sync::atomic::AtomicU16,
    base_url: String,
    /// One pull or build per image at a time: concurrent starts of a
    /// template share its build, other images go on meanwhile.
    image_locks: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// The engine does not refuse a second network of the same name, so
    /// creation is one at a time.
    network_lock: tokio::sync::Mutex<()>,
    /// The network's gateway once it was checked (or made) in this process:
    /// later starts skip the engine round trip and the lock. Forgotten when a
    /// container cannot be created, so a network removed meanwhile is made again.
    network_checked: std::sync::Mutex<Option<String>>,
    /// Whether the network's warning (containers can reach each other on
    /// it) was logged: once per process.
    network_warned: std::sync::atomic::AtomicBool,
}

/// Where an engine answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// `DOCKER_HOST` or the default socket: berth's own engine.
    Local,
    /// `unix:///path/to/docker.sock`.
    Unix(String),
    /// `tcp://host:port`, with the directory holding `ca.pem`, `cert.pem`
    /// and `key.pem` (Docker's own TLS layout), or plain HTTP without one.
    Tcp { addr: String, tls: Option<std::path::PathBuf> },
}

impl Endpoint {
    /// `unix:///…` or `tcp://host:port`; `tls` is used for `tcp://`.
    pub fn parse(s: &str, tls: Option<&std::path::Path>) -> Result<Endpoint, String> {
        if let Some(path) = s.strip_prefix("unix://") {
            if !path.starts_with('/') {
                return Err(format!("{s:?}: a unix socket's path must be absolute (unix:///run/docker.sock)"));
            }
            return Ok(Endpoint::Unix(path.to_string()));
        }
        if let Some(addr) = s.strip_prefix("tcp://") {
            let ok = addr.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
            if !ok {
                return Err(format!("{s:?}: expected tcp://HOST:PORT"));
            }
            return Ok(Endpoint::Tcp { addr: addr.to_string(), tls: tls.map(std::path::Path::to_path_buf) });
        }
        Err(format!("{s:?}: an engine address is unix:///path or tcp://host:port"))
    }

    fn connect(&self) -> Result<Docker, bollard::errors::Error> {
        const TIMEOUT_S: u64 = 120;
        match self {
            Endpoint::Local => Docker::connect_with_local_defaults(),
            Endpoint::Unix(p) => Docker::connect_with_unix(p, TIMEOUT_S, bollard::API_DEFAULT_VERSION),
            Endpoint::Tcp { addr, tls: None } => {
                Docker::connect_with_http(addr, TIMEOUT_S, bollard::API_DEFAULT_VERSION)
            }
            Endpoint::Tcp { addr, tls: Some(dir) } => Docker::connect_with_ssl(
                addr,
                &dir.join("key.pem"),
                &dir.join("cert.pem"),
                &dir.join("ca.pem"),
                TIMEOUT_S,
                bollard::API_DEFAULT_VERSION,
            ),
        }
    }

    /// " at …" for messages; nothing for the local engine.
    pub fn describe(&self) -> String {
        match self {
            Endpoint::Local => String::new(),
            Endpoint::Unix(p) => format!(" at unix://{p}"),
            Endpoint::Tcp { addr, tls } => {
                format!(" at tcp://{addr}{}", if tls.is_some() { " (TLS)" } else { "" })
            }
        }
    }
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
    /// The lock that one pull or build of `image` holds (entries no one
    /// holds any more are dropped as others are made).
    pub(crate) fn image_lock(&self, image: &str) -> Arc<tokio::sync::Mutex<()>> {
        let Ok(mut m) = self.image_locks.lock() else { return Arc::new(tokio::sync::Mutex::new(())) };
        m.retain(|_, l| Arc::strong_count(l) > 1);
        m.entry(image.to_string()).or_default().clone()
    }

    /// Connects to the local engine (DOCKER_HOST or the default socket).
    pub fn connect(cfg: Config, base_url: &str) -> Result<Arc<DockerSpawner>, SpawnError> {
        Ok(DockerSpawner::connect_to(cfg, base_url, Endpoint::Local))
    }

    /// The same over another engine: a Swarm node's (its images, volumes,
    /// containers and networks are that node's).
    pub fn connect_to(cfg: Config, base_url: &str, endpoint: Endpoint) -> Arc<DockerSpawner> {
        let docker = endpoint.connect().ok();
        Arc::new(DockerSpawner {
            docker: std::sync::Mutex::new(docker),
            endpoint,
            cfg,
            hub_port: std::sync::atomic::AtomicU16::new(0),
            base_url: base_url.to_string(),
            image_locks: std::sync::Mutex::new(HashMap::new()),
            network_lock: tokio::sync::Mutex::new(()),
            network_checked: std::sync::Mutex::new(None),
            network_warned: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Which engine this is.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    pub(crate) fn base_url(&self) -> &str {
        &self.base_url
    }

    pub(crate) fn hub_port(&self) -> u16 {
        self.hub_port.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The engine client, connecting if needed.
    pub fn client(&self) -> Result<Docker, SpawnError> {
        let mut slot = self.docker.lock().map_err(|_| SpawnError::Failed("Docker client lock poisoned".into()))?;
        if let Some(d) = slot.as_ref() {
            return Ok(d.clone());
        }
        let d = self.endpoint.connect().map_err(|e| {
            SpawnError::Failed(format!(
                "the Docker engine{} does not answer ({e}); is it running? Starts work again once it is back",
                self.endpoint.describe()
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
}

/// The network a spawner's servers reach the hub on: berth listens on its
/// gateway (when bound to loopback) and tells the servers that address.
pub trait HubNetwork: Send + Sync + 'static {
    /// Tells the spawner the hub's port once it is bound.
    fn set_hub_port(&self, port: u16);
    /// Makes the network unless it exists; returns its gateway address.
    fn gateway(&self) -> BoxFuture<'_, Result<String, SpawnError>>;
    /// Another address servers reach the hub at (Swarm servers on other
    /// nodes: the hub's address in the swarm), where berth listens too.
    fn node_address(&self) -> BoxFuture<'_, Result<Option<String>, SpawnError>> {
        Box::pin(async { Ok(None) })
    }
    /// GPUs on other machines the spawner places servers on (Swarm nodes):
    /// (`node:device`, model), added to the hub's inventory.
    fn node_gpus(&self) -> BoxFuture<'_, Vec<(String, String)>> {
        Box::pin(async { Vec::new() })
    }
}

impl HubNetwork for DockerSpawner {
    fn set_hub_port(&self, port: u16) {
        DockerSpawner::set_hub_port(self, port);
    }

    fn gateway(&self) -> BoxFuture<'_, Result<String, SpawnError>> {
        Box::pin(self.ensure_network())
    }
}

/// The container id a started server's state records.
pub(crate) fn state_id(state: &serde_json::Value) -> Result<String, SpawnError> {
    state
        .get("container_id")
        .and_then(|v| v.as_str())
        .map(str::to_string)
        .ok_or_else(|| SpawnError::BadState(format!("no container_id in {state}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(container_name("alice", ""), "berth-alice");
        assert_eq!(container_name("alice", "lab"), "berth-alice--lab");
    }
}
