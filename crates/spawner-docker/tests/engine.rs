//! Against the real Docker engine: what a GPU server's container carries,
//! and GPU detection (on a machine without GPUs, and on one with them).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test
use std::collections::BTreeMap;
use std::process::Command;

use berth_spawner::SpawnSpec;
use berth_spawner_docker::{Config, DockerSpawner};

fn image() -> String {
    std::env::var("BERTH_TEST_IMAGE").unwrap_or_else(|_| "berth-test-singleuser:latest".into())
}

struct Cleanup {
    user: String,
    network: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let run = |args: &[&str]| {
            let _ = Command::new("docker").args(args).output();
        };
        run(&["rm", "-f", &format!("berth-{}", self.user)]);
        for v in ["home", "workspace", "cache"] {
            run(&["volume", "rm", "-f", &format!("berth-{}-{v}", self.user)]);
        }
        run(&["network", "rm", &self.network]);
    }
}

#[tokio::test]
async fn gpu_servers_carry_device_requests() {
    let suffix = format!("{:x}", std::process::id());
    let guard = Cleanup { user: format!("gpu{suffix}"), network: format!("berth-test-gpu-{suffix}") };
    let cfg =
        Config { network: guard.network.clone(), shared_volume: String::new(), image: image(), ..Config::default() };
    let spawner = DockerSpawner::connect(cfg, "/").unwrap();
    let spec = SpawnSpec {
        user: guard.user.clone(),
        server: String::new(),
        env: BTreeMap::from([("JUPYTERHUB_API_URL".to_string(), "x".to_string())]),
        cmd: vec![],
        prefix: format!("/user/{}/", guard.user),
        template: "pytorch".into(),
        image: None,
        gpus: vec!["GPU-1".into(), "GPU-3".into()],
        port: None,
    };
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let id = spawner.create(&spec, &tx).await.unwrap();
    let out = Command::new("docker").args(["inspect", &id]).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let req = &v[0]["HostConfig"]["DeviceRequests"];
    assert_eq!(
        req,
        &serde_json::json!([{"Driver": "nvidia", "Count": 0, "DeviceIDs": ["GPU-1", "GPU-3"], "Capabilities": [["gpu"]], "Options": null}]),
        "{req}"
    );
    assert_eq!(v[0]["Config"]["Labels"]["berth.template"], "pytorch");
    let env: Vec<String> = serde_json::from_value(v[0]["Config"]["Env"].clone()).unwrap();
    assert!(env.contains(&"NVIDIA_VISIBLE_DEVICES=GPU-1,GPU-3".to_string()), "{env:?}");
}

/// Whether the engine lists the nvidia runtime, asked through the docker CLI
/// (independently of the code under test).
fn engine_has_nvidia_runtime() -> bool {
    let out = Command::new("docker").args(["info", "--format", "{{json .Runtimes}}"]).output().unwrap();
    assert!(out.status.success(), "docker info failed: {}", String::from_utf8_lossy(&out.stderr));
    let runtimes: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    runtimes.contains_key("nvidia")
}

#[tokio::test]
async fn detection_on_a_machine_without_gpus_finds_none() {
    if engine_has_nvidia_runtime() {
        eprintln!("skipped: the Docker engine has the nvidia runtime, so this is not a machine without GPUs");
        return;
    }
    let spawner = DockerSpawner::connect(Config::default(), "/").unwrap();
    let d = spawner.detect_gpus("no-such-probe-image:never").await;
    assert!(d.devices.is_empty(), "{d:?}");
    assert!(d.how.contains("no nvidia runtime"), "{}", d.how);
}

#[tokio::test]
async fn detection_on_a_machine_with_gpus_finds_them() {
    if !engine_has_nvidia_runtime() {
        eprintln!("skipped: the Docker engine has no nvidia runtime, so there are no GPUs to detect");
        return;
    }
    let spawner = DockerSpawner::connect(Config::default(), "/").unwrap();
    // The nvidia runtime mounts nvidia-smi into the probe container, so the
    // test image serves as the probe.
    let d = spawner.detect_gpus(&image()).await;
    assert!(!d.devices.is_empty(), "the nvidia runtime is there but detection found no GPU: {}", d.how);
    assert!(d.devices.iter().all(|g| !g.id.is_empty() && !g.name.is_empty()), "{d:?}");
}
