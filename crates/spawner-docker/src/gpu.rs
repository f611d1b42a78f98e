//! GPU inventory: what the engine offers (nvidia runtime, probed with
//! `nvidia-smi -L` in a container), or a configured list.

use std::collections::HashMap;

use bollard::models::{ContainerCreateBody, DeviceRequest, HostConfig};
use bollard::query_parameters::{
    CreateContainerOptions, LogsOptions, RemoveContainerOptions, StartContainerOptions, WaitContainerOptions,
};
use futures_util::StreamExt;
use serde::Serialize;

use crate::DockerSpawner;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GpuDevice {
    pub id: String,
    pub name: String,
}

/// What detection found, and how.
#[derive(Debug, Clone, Serialize)]
pub struct Detection {
    pub devices: Vec<GpuDevice>,
    pub how: String,
}

/// Parses `nvidia-smi -L`: `GPU 0: NVIDIA A100-SXM4-80GB (UUID: GPU-5b2…)`.
pub fn parse_nvidia_smi_list(text: &str) -> Vec<GpuDevice> {
    text.lines()
        .filter_map(|l| {
            let l = l.trim();
            let rest = l.strip_prefix("GPU ")?;
            let (_, after) = rest.split_once(": ")?;
            let (name, uuid) = after.rsplit_once(" (UUID: ")?;
            Some(GpuDevice { id: uuid.trim_end_matches(')').to_string(), name: name.to_string() })
        })
        .collect()
}

impl DockerSpawner {
    /// Detects GPUs: none unless the engine has the nvidia runtime; then
    /// `nvidia-smi -L` in a probe container from `probe_image`.
    pub async fn detect_gpus(&self, probe_image: &str) -> Detection {
        let docker = match self.client() {
            Ok(d) => d,
            Err(e) => return Detection { devices: vec![], how: e.to_string() },
        };
        let info = match docker.info().await {
            Ok(i) => i,
            Err(e) => return Detection { devices: vec![], how: format!("the Docker engine does not answer: {e}") },
        };
        let runtimes: Vec<String> = info.runtimes.map(|r| r.into_keys().collect()).unwrap_or_default();
        if !runtimes.iter().any(|r| r == "nvidia") {
            return Detection {
                devices: vec![],
                how: format!("no nvidia runtime in the Docker engine (runtimes: {})", runtimes.join(", ")),
            };
        }
        match self.probe(probe_image).await {
            Ok(text) => {
                let devices = parse_nvidia_smi_list(&text);
                Detection { how: format!("nvidia-smi -L in {probe_image}: {} GPU(s)", devices.len()), devices }
            }
            Err(e) => {
                Detection { devices: vec![], how: format!("the nvidia runtime is present but probing failed: {e}") }
            }
        }
    }

    async fn probe(&self, image: &str) -> Result<String, String> {
        let body = ContainerCreateBody {
            image: Some(image.to_string()),
            cmd: Some(vec!["nvidia-smi".into(), "-L".into()]),
            labels: Some(HashMap::from([(crate::LABEL_MANAGED.to_string(), "probe".to_string())])),
            host_config: Some(HostConfig {
                device_requests: Some(vec![DeviceRequest {
                    driver: Some(self.cfg.gpu_driver.clone()),
                    count: Some(-1),
                    capabilities: Some(vec![vec!["gpu".into()]]),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        };
        let docker = self.client().map_err(|e| e.to_string())?;
        let c = docker.create_container(None::<CreateContainerOptions>, body).await.map_err(|e| e.to_string())?;
        let result = async {
            docker.start_container(&c.id, None::<StartContainerOptions>).await.map_err(|e| e.to_string())?;
            let mut wait = docker.wait_container(&c.id, None::<WaitContainerOptions>);
            while wait.next().await.is_some() {}
            let mut logs = docker.logs(&c.id, Some(LogsOptions { stdout: true, stderr: true, ..Default::default() }));
            let mut out = String::new();
            while let Some(Ok(chunk)) = logs.next().await {
                out.push_str(&chunk.to_string());
            }
            Ok(out)
        }
        .await;
        let _ =
            docker.remove_container(&c.id, Some(RemoveContainerOptions { force: true, ..Default::default() })).await;
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_nvidia_smi() {
        let text = "GPU 0: NVIDIA A100-SXM4-80GB (UUID: GPU-5b2c1e2a-1111)\nGPU 1: NVIDIA A100-SXM4-80GB (UUID: GPU-77aa)\n\nnoise\n";
        let d = parse_nvidia_smi_list(text);
        assert_eq!(d.len(), 2);
        assert_eq!(d[0], GpuDevice { id: "GPU-5b2c1e2a-1111".into(), name: "NVIDIA A100-SXM4-80GB".into() });
        assert!(parse_nvidia_smi_list("No devices were found").is_empty());
    }
}
