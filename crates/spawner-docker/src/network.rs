//! The Docker network the containers join, and the hub's address on it.
//!
//! berth's network is a bridge with inter-container traffic off (the bridge
//! driver's `com.docker.network.bridge.enable_icc=false`): a user's
//! container cannot open connections to another's, while the hub, on the
//! host side of the bridge (its gateway), reaches them and they reach it.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use berth_spawner::SpawnError;
use bollard::models::{ContainerSummaryStateEnum as State, Ipam, Network, NetworkCreateRequest};
use bollard::query_parameters::{InspectNetworkOptions, ListContainersOptions};

use crate::{engine_error, is_not_found, DockerSpawner, LABEL_MANAGED};

/// The bridge driver's option for traffic between the network's containers.
pub(crate) const ICC_OPTION: &str = "com.docker.network.bridge.enable_icc";

/// Whether containers on a network can open connections to each other.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Icc {
    Off,
    On,
    /// Not a bridge network (the driver): berth cannot tell or change it.
    NotBridge(String),
}

/// What the engine reports of a network, as [`Icc`].
pub(crate) fn icc(net: &Network) -> Icc {
    let driver = net.driver.clone().unwrap_or_default();
    if driver != "bridge" {
        return Icc::NotBridge(driver);
    }
    // Go's strconv.ParseBool, as the engine reads it; absent means on.
    match net.options.as_ref().and_then(|o| o.get(ICC_OPTION)).map(String::as_str) {
        Some("0" | "f" | "F" | "false" | "FALSE" | "False") => Icc::Off,
        _ => Icc::On,
    }
}

fn is_ours(labels: Option<&HashMap<String, String>>) -> bool {
    labels.is_some_and(|l| l.get(LABEL_MANAGED).is_some_and(|v| v == "true"))
}

impl DockerSpawner {
    /// Creates the network unless it exists; returns its gateway address.
    /// A network of berth's that lets containers reach each other is
    /// re-created with that off when no container needs it; otherwise it is
    /// used as it is, with a warning.
    pub async fn ensure_network(&self) -> Result<String, SpawnError> {
        if let Some(gateway) = self.network_checked.lock().ok().and_then(|g| g.clone()) {
            return Ok(gateway);
        }
        let _one_at_a_time = self.network_lock.lock().await;
        if let Some(gateway) = self.network_checked.lock().ok().and_then(|g| g.clone()) {
            return Ok(gateway);
        }
        let name = &self.cfg.network;
        let net = match self.inspect_network(name).await? {
            None => self.create_network(None).await?,
            Some(net) => match icc(&net) {
                Icc::Off => net,
                Icc::On => self.replace_open_network(net).await?,
                Icc::NotBridge(driver) => {
                    self.warn_once(format!(
                        "the Docker network {name} uses the {driver} driver, so berth cannot turn off traffic \
                         between containers on it: users' servers may be able to reach each other. Set \
                         docker.network to a name that does not exist and berth creates a bridge network with \
                         that traffic off"
                    ));
                    net
                }
            },
        };
        let settled = icc(&net) == Icc::Off;
        let gateway = net
            .ipam
            .and_then(|i| i.config)
            .and_then(|c| c.into_iter().find_map(|c| c.gateway))
            .ok_or_else(|| SpawnError::Failed(format!("the Docker network {name} has no gateway address")))?;
        // Only a network as berth makes it is taken as settled: one kept
        // with a warning is looked at again at the next start.
        if settled {
            if let Ok(mut g) = self.network_checked.lock() {
                *g = Some(gateway.clone());
            }
        }
        Ok(gateway)
    }

    /// Forgets the checked network: the next start inspects it again.
    pub(crate) fn forget_network(&self) {
        if let Ok(mut g) = self.network_checked.lock() {
            *g = None;
        }
    }

    async fn inspect_network(&self, name: &str) -> Result<Option<Network>, SpawnError> {
        match self.client()?.inspect_network(name, None::<InspectNetworkOptions>).await {
            Ok(n) => Ok(Some(n)),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(engine_error(e)),
        }
    }

    /// Creates berth's network, with the address plan `ipam` when given.
    async fn create_network(&self, ipam: Option<Ipam>) -> Result<Network, SpawnError> {
        let name = &self.cfg.network;
        let req = NetworkCreateRequest {
            name: name.clone(),
            driver: Some("bridge".into()),
            ipam,
            options: Some(HashMap::from([(ICC_OPTION.to_string(), "false".to_string())])),
            labels: Some(HashMap::from([(LABEL_MANAGED.to_string(), "true".to_string())])),
            ..Default::default()
        };
        match self.client()?.create_network(req).await {
            Ok(_) => {}
            // Created meanwhile by someone else.
            Err(bollard::errors::Error::DockerResponseServerError { status_code: 409, .. }) => {}
            Err(e) => return Err(engine_error(e)),
        }
        self.inspect_network(name)
            .await?
            .ok_or_else(|| SpawnError::Failed(format!("the Docker network {name} vanished right after its creation")))
    }

    /// A bridge network with inter-container traffic on (made by a berth
    /// from before it turned that off, or by hand): re-created when it is
    /// berth's and no container is attached, else kept, with a warning.
    async fn replace_open_network(&self, net: Network) -> Result<Network, SpawnError> {
        let name = &self.cfg.network;
        let open = format!(
            "the Docker network {name} lets containers connect to each other ({ICC_OPTION} is not false), so \
             users' servers can reach one another"
        );
        if !is_ours(net.labels.as_ref()) {
            self.warn_once(format!(
                "{open}. It was not made by berth, so berth leaves it alone: re-create it with \
                 `docker network create -o {ICC_OPTION}=false {name}`, or set docker.network to a name that does \
                 not exist and berth creates it so"
            ));
            return Ok(net);
        }
        let users = self.containers_needing(&net).await?;
        if !users.is_empty() {
            self.warn_once(format!(
                "{open}; an older berth made it so. Remove it when no container uses it (`docker network rm \
                 {name}`; attached now: {}) and berth re-creates it with that traffic off",
                users.join(", ")
            ));
            return Ok(net);
        }
        tracing::warn!(
            network = %name,
            "{open}; an older berth made it so. No container uses it: re-creating it with that traffic off"
        );
        match self.client()?.remove_network(name).await {
            Ok(()) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => {
                self.warn_once(format!(
                    "{open}, and removing it failed ({e}). Remove it when no container uses it \
                     (`docker network rm {name}`) and berth re-creates it with that traffic off"
                ));
                return Ok(net);
            }
        }
        // The same subnet and gateway, so the hub's listener on the gateway
        // (bound before) still serves the containers of the new network.
        let ipam = net.ipam.as_ref().and_then(|i| i.config.clone()).filter(|c| !c.is_empty());
        match self.create_network(ipam.map(|config| Ipam { config: Some(config), ..Default::default() })).await {
            Ok(n) => Ok(n),
            Err(e) => {
                tracing::warn!(
                    network = %name,
                    error = %e,
                    "cannot re-create the network with its former subnet; creating it with one the engine picks"
                );
                self.create_network(None).await
            }
        }
    }

    /// Containers that would lose the network if it were removed: every one
    /// on it that is not stopped, and stopped ones that are not berth's
    /// (berth replaces its own stopped containers when their servers start).
    async fn containers_needing(&self, net: &Network) -> Result<Vec<String>, SpawnError> {
        let name = &self.cfg.network;
        let mut users: Vec<String> = net
            .containers
            .iter()
            .flatten()
            .map(|(id, c)| c.name.clone().unwrap_or_else(|| id.chars().take(12).collect()))
            .collect();
        let filters = HashMap::from([("network".to_string(), vec![name.clone()])]);
        let opts = ListContainersOptions { all: true, filters: Some(filters), ..Default::default() };
        let listed = self.client()?.list_containers(Some(opts)).await.map_err(engine_error)?;
        for c in listed {
            let stopped = matches!(c.state, Some(State::CREATED | State::EXITED | State::DEAD));
            if !stopped || !is_ours(c.labels.as_ref()) {
                let n = c.names.and_then(|n| n.into_iter().next()).unwrap_or_default();
                let n = n.trim_start_matches('/').to_string();
                if !users.contains(&n) {
                    users.push(n);
                }
            }
        }
        Ok(users)
    }

    fn warn_once(&self, msg: String) {
        if !self.network_warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(network = %self.cfg.network, "{msg}");
        }
    }

    /// The hub's API as containers reach it.
    pub(crate) fn hub_api_url(&self, gateway: &str) -> String {
        if !self.cfg.hub_connect_url.is_empty() {
            return self.cfg.hub_connect_url.trim_end_matches('/').to_string();
        }
        let port = self.hub_port.load(std::sync::atomic::Ordering::Relaxed);
        format!("http://{gateway}:{port}{}hub/api", self.base_url)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(driver: &str, opts: &[(&str, &str)]) -> Network {
        Network {
            driver: Some(driver.into()),
            options: Some(opts.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
            ..Default::default()
        }
    }

    #[test]
    fn inter_container_traffic() {
        assert_eq!(icc(&net("bridge", &[(ICC_OPTION, "false")])), Icc::Off);
        assert_eq!(icc(&net("bridge", &[(ICC_OPTION, "0")])), Icc::Off);
        assert_eq!(icc(&net("bridge", &[(ICC_OPTION, "true")])), Icc::On);
        // An older berth's network: no options at all.
        assert_eq!(icc(&net("bridge", &[])), Icc::On);
        assert_eq!(icc(&Network { driver: Some("bridge".into()), ..Default::default() }), Icc::On);
        assert_eq!(icc(&net("overlay", &[(ICC_OPTION, "false")])), Icc::NotBridge("overlay".into()));
    }
}
