//! The Docker network the containers join, and the hub's address on it.

use std::collections::HashMap;

use berth_spawner::SpawnError;
use bollard::models::NetworkCreateRequest;

use crate::{engine_error, is_not_found, DockerSpawner, LABEL_MANAGED};

impl DockerSpawner {
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

    /// The hub's API as containers reach it.
    pub(crate) fn hub_api_url(&self, gateway: &str) -> String {
        if !self.cfg.hub_connect_url.is_empty() {
            return self.cfg.hub_connect_url.trim_end_matches('/').to_string();
        }
        let port = self.hub_port.load(std::sync::atomic::Ordering::Relaxed);
        format!("http://{gateway}:{port}{}hub/api", self.base_url)
    }
}
