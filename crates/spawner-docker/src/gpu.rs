//! GPU inventory: what the engine offers (nvidia runtime, probed with
//! `nvidia-smi -L` in a container), or a configured list.

use std::collections::HashMap;

use bollard::models::{ContainerCreateBody, DeviceRequest, HostConfig, SystemInfo};
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
/// A GPU in MIG mode is followed by its instances,
/// `  MIG 1g.10gb     Device  0: (UUID: MIG-…)`; those are the units berth
/// hands out (a process cannot use the parent GPU while it is split), named
/// after the parent and their profile.
pub fn parse_nvidia_smi_list(text: &str) -> Vec<GpuDevice> {
    let mut out: Vec<GpuDevice> = Vec::new();
    // The last GPU line, and whether MIG lines replaced it already.
    let mut parent: Option<(String, bool)> = None;
    for l in text.lines().map(str::trim) {
        if let Some(rest) = l.strip_prefix("GPU ") {
            let Some((_, after)) = rest.split_once(": ") else { continue };
            let Some((name, uuid)) = after.rsplit_once(" (UUID: ") else { continue };
            out.push(GpuDevice { id: uuid.trim_end_matches(')').to_string(), name: name.to_string() });
            parent = Some((name.to_string(), false));
        } else if let Some(rest) = l.strip_prefix("MIG ") {
            let Some((profile, after)) = rest.split_once(" Device") else { continue };
            let Some((_, uuid)) = after.rsplit_once("(UUID: ") else { continue };
            let Some((pname, replaced)) = parent.as_mut() else { continue };
            if !*replaced {
                out.pop();
                *replaced = true;
            }
            out.push(GpuDevice {
                id: uuid.trim_end_matches(')').to_string(),
                name: format!("{pname} MIG {}", profile.trim()),
            });
        }
    }
    out
}

/// The runtime names the engine's `info` lists (the keys of its `Runtimes`
/// map), sorted so the reason a detection gives reads the same every time.
fn runtime_names(info: &SystemInfo) -> Vec<String> {
    let mut names: Vec<String> = info.runtimes.as_ref().map(|r| r.keys().cloned().collect()).unwrap_or_default();
    names.sort();
    names
}

/// The first half of the decision: with no nvidia runtime in the engine
/// there is nothing to probe, and the detection is none, with the reason.
/// `None` means the runtime is there and the probe decides.
fn without_nvidia_runtime(runtimes: &[String]) -> Option<Detection> {
    if runtimes.iter().any(|r| r == "nvidia") {
        return None;
    }
    Some(Detection {
        devices: vec![],
        how: format!("no nvidia runtime in the Docker engine (runtimes: {})", runtimes.join(", ")),
    })
}

/// The second half: what the probe's `nvidia-smi -L` printed, or why it failed.
fn from_probe(probe_image: &str, probe: Result<String, String>) -> Detection {
    match probe {
        Ok(text) => {
            let devices = parse_nvidia_smi_list(&text);
            Detection { how: format!("nvidia-smi -L in {probe_image}: {} GPU(s)", devices.len()), devices }
        }
        Err(e) => Detection { devices: vec![], how: format!("the nvidia runtime is present but probing failed: {e}") },
    }
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
        if let Some(none) = without_nvidia_runtime(&runtime_names(&info)) {
            return none;
        }
        from_probe(probe_image, self.probe(probe_image).await)
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

    /// The `Runtimes` of `GET /info` on an engine without GPUs (recorded
    /// from Docker 20.10 here; 25+ adds a `status` map to each runtime).
    const INFO_WITHOUT_NVIDIA: &str = r#"{
        "DefaultRuntime": "runc",
        "Runtimes": {
            "io.containerd.runc.v2": {"path": "runc"},
            "io.containerd.runtime.v1.linux": {"path": "runc"},
            "runc": {"path": "runc", "status": {"org.opencontainers.runtime-spec.features": "{\"ociVersionMin\":\"1.0.0\"}"}}
        }
    }"#;

    /// The same with the NVIDIA Container Toolkit configured
    /// (`nvidia-ctk runtime configure --runtime=docker`).
    const INFO_WITH_NVIDIA: &str = r#"{
        "DefaultRuntime": "runc",
        "Runtimes": {
            "io.containerd.runc.v2": {"path": "runc"},
            "nvidia": {"path": "nvidia-container-runtime"},
            "runc": {"path": "runc"}
        }
    }"#;

    /// `nvidia-smi -L` on a machine with two GPUs.
    const SMI_TWO_GPUS: &str = "GPU 0: NVIDIA A100-SXM4-80GB (UUID: GPU-5b2c7e0e-3f1d-2a4b-9c8e-1d2f3a4b5c6d)\n\
                                GPU 1: NVIDIA A100-SXM4-80GB (UUID: GPU-77aa01b2-c3d4-e5f6-a7b8-c9d0e1f2a3b4)\n";

    /// What the probe returns when the runtime is configured but no driver
    /// is loaded: bollard's rendering of the engine's refusal to start.
    const PROBE_FAILURE: &str = "Docker responded with status code 500: failed to create task for container: \
        failed to create shim task: OCI runtime create failed: runc create failed: unable to start container \
        process: error during container init: error running hook #0: error running hook: exit status 1, stdout: , \
        stderr: Auto-detected mode as 'legacy'\nnvidia-container-cli: initialization error: nvml error: driver not \
        loaded: unknown";

    fn runtimes(info: &str) -> Vec<String> {
        runtime_names(&serde_json::from_str::<SystemInfo>(info).unwrap())
    }

    #[test]
    fn parses_nvidia_smi() {
        let text = "GPU 0: NVIDIA A100-SXM4-80GB (UUID: GPU-5b2c1e2a-1111)\nGPU 1: NVIDIA A100-SXM4-80GB (UUID: GPU-77aa)\n\nnoise\n";
        let d = parse_nvidia_smi_list(text);
        assert_eq!(d.len(), 2);
        assert_eq!(d[0], GpuDevice { id: "GPU-5b2c1e2a-1111".into(), name: "NVIDIA A100-SXM4-80GB".into() });
        assert!(parse_nvidia_smi_list("No devices were found").is_empty());
    }

    #[test]
    fn mig_instances_are_units_of_their_own() {
        let text = "GPU 0: NVIDIA A100-SXM4-40GB (UUID: GPU-5d5b)\n\
                    \x20 MIG 3g.20gb     Device  0: (UUID: MIG-c6d4)\n\
                    \x20 MIG 3g.20gb     Device  1: (UUID: MIG-77e1)\n\
                    GPU 1: NVIDIA A100-SXM4-40GB (UUID: GPU-9a9a)\n";
        let d = parse_nvidia_smi_list(text);
        let got: Vec<(&str, &str)> = d.iter().map(|g| (g.id.as_str(), g.name.as_str())).collect();
        assert_eq!(
            got,
            [
                ("MIG-c6d4", "NVIDIA A100-SXM4-40GB MIG 3g.20gb"),
                ("MIG-77e1", "NVIDIA A100-SXM4-40GB MIG 3g.20gb"),
                ("GPU-9a9a", "NVIDIA A100-SXM4-40GB"),
            ]
        );
        assert!(parse_nvidia_smi_list("  MIG 1g.5gb Device 0: (UUID: MIG-orphan)").is_empty(), "no parent");
    }

    #[test]
    fn no_nvidia_runtime_means_none_with_the_reason() {
        let rt = runtimes(INFO_WITHOUT_NVIDIA);
        assert_eq!(rt, ["io.containerd.runc.v2", "io.containerd.runtime.v1.linux", "runc"]);
        let d = without_nvidia_runtime(&rt).expect("no nvidia runtime: decided without probing");
        assert!(d.devices.is_empty(), "{d:?}");
        assert_eq!(
            d.how,
            "no nvidia runtime in the Docker engine (runtimes: io.containerd.runc.v2, io.containerd.runtime.v1.linux, runc)"
        );
        let none = serde_json::from_str::<SystemInfo>("{}").unwrap();
        let d = without_nvidia_runtime(&runtime_names(&none)).expect("no runtimes at all: none");
        assert!(d.devices.is_empty() && d.how.contains("no nvidia runtime"), "{d:?}");
    }

    #[test]
    fn nvidia_runtime_and_two_gpus_probed_gives_both() {
        let rt = runtimes(INFO_WITH_NVIDIA);
        assert!(without_nvidia_runtime(&rt).is_none(), "the nvidia runtime is there: the probe decides");
        let d = from_probe("probe:latest", Ok(SMI_TWO_GPUS.to_string()));
        assert_eq!(
            d.devices,
            [
                GpuDevice {
                    id: "GPU-5b2c7e0e-3f1d-2a4b-9c8e-1d2f3a4b5c6d".into(),
                    name: "NVIDIA A100-SXM4-80GB".into()
                },
                GpuDevice {
                    id: "GPU-77aa01b2-c3d4-e5f6-a7b8-c9d0e1f2a3b4".into(),
                    name: "NVIDIA A100-SXM4-80GB".into()
                },
            ]
        );
        assert_eq!(d.how, "nvidia-smi -L in probe:latest: 2 GPU(s)");
    }

    #[test]
    fn nvidia_runtime_and_a_failed_probe_gives_none_with_the_reason() {
        let rt = runtimes(INFO_WITH_NVIDIA);
        assert!(without_nvidia_runtime(&rt).is_none(), "the nvidia runtime is there: the probe decides");
        let d = from_probe("probe:latest", Err(PROBE_FAILURE.to_string()));
        assert!(d.devices.is_empty(), "{d:?}");
        assert!(d.how.starts_with("the nvidia runtime is present but probing failed: "), "{}", d.how);
        assert!(d.how.contains("driver not loaded"), "{}", d.how);
    }
}
