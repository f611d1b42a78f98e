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
        owner_id: String::new(),
        build: Vec::new(),
        user: guard.user.clone(),
        server: String::new(),
        env: BTreeMap::from([("JUPYTERHUB_API_URL".to_string(), "x".to_string())]),
        cmd: vec![],
        prefix: format!("/user/{}/", guard.user),
        template: "pytorch".into(),
        image: None,
        gpus: vec!["GPU-1".into(), "GPU-3".into()],
        port: None,
        volumes: Vec::new(),
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

/// The warnings logged on this thread while the guard lives.
struct Logs {
    buf: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    _guard: tracing::subscriber::DefaultGuard,
}

impl Logs {
    fn capture() -> Logs {
        struct W(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for W {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let b = buf.clone();
        let sub = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_ansi(false)
            .with_writer(move || W(b.clone()))
            .finish();
        Logs { buf, _guard: tracing::subscriber::set_default(sub) }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.buf.lock().unwrap()).into_owned()
    }
}

/// Removes the containers and networks named when dropped.
struct Gone(Vec<(&'static str, String)>);

impl Drop for Gone {
    fn drop(&mut self) {
        for (kind, name) in self.0.iter().rev() {
            let args: &[&str] = if *kind == "container" { &["rm", "-f", name] } else { &["network", "rm", name] };
            let _ = Command::new("docker").args(args).output();
        }
    }
}

fn docker(args: &[&str]) -> String {
    let out = Command::new("docker").args(args).output().unwrap();
    assert!(out.status.success(), "docker {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn network_json(name: &str) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_str(&docker(&["network", "inspect", name])).unwrap();
    v[0].clone()
}

/// A network as a berth from before inter-container traffic was turned off made it.
fn old_berth_network(name: &str) -> serde_json::Value {
    docker(&["network", "create", "--label", "berth.managed=true", name]);
    let net = network_json(name);
    assert!(net["Options"].get("com.docker.network.bridge.enable_icc").is_none(), "{net}");
    net
}

#[tokio::test]
async fn a_new_network_keeps_containers_apart() {
    let name = format!("berth-test-icc-new-{:x}", std::process::id());
    let _gone = Gone(vec![("network", name.clone())]);
    let spawner = DockerSpawner::connect(Config { network: name.clone(), ..Config::default() }, "/").unwrap();
    let gateway = spawner.ensure_network().await.unwrap();
    let net = network_json(&name);
    assert_eq!(net["Options"]["com.docker.network.bridge.enable_icc"], "false", "{net}");
    assert_eq!(net["Driver"], "bridge");
    assert_eq!(net["Labels"]["berth.managed"], "true");
    assert_eq!(net["IPAM"]["Config"][0]["Gateway"], gateway.as_str());
    // Again: the same network.
    assert_eq!(spawner.ensure_network().await.unwrap(), gateway);
    assert_eq!(network_json(&name)["Id"], net["Id"]);
}

#[tokio::test]
async fn an_older_berths_unused_network_is_recreated_with_containers_apart() {
    let name = format!("berth-test-icc-old-{:x}", std::process::id());
    let _gone = Gone(vec![("network", name.clone())]);
    let before = old_berth_network(&name);
    let logs = Logs::capture();
    let spawner = DockerSpawner::connect(Config { network: name.clone(), ..Config::default() }, "/").unwrap();
    let gateway = spawner.ensure_network().await.unwrap();
    let after = network_json(&name);
    assert_ne!(after["Id"], before["Id"], "re-created");
    assert_eq!(after["Options"]["com.docker.network.bridge.enable_icc"], "false", "{after}");
    assert_eq!(after["Labels"]["berth.managed"], "true");
    // Same addresses, so a hub listening on the old gateway still serves.
    assert_eq!(gateway, before["IPAM"]["Config"][0]["Gateway"].as_str().unwrap());
    assert_eq!(after["IPAM"]["Config"][0]["Subnet"], before["IPAM"]["Config"][0]["Subnet"]);
    let log = logs.text();
    assert!(log.contains(&name) && log.contains("re-creating"), "{log}");
}

#[tokio::test]
async fn an_older_berths_network_in_use_is_kept_and_named_in_a_warning() {
    let suffix = format!("{:x}", std::process::id());
    let name = format!("berth-test-icc-busy-{suffix}");
    let holder = format!("berth-test-icc-holder-{suffix}");
    let _gone = Gone(vec![("network", name.clone()), ("container", holder.clone())]);
    let before = old_berth_network(&name);
    docker(&["run", "-d", "--name", &holder, "--network", &name, &image(), "sleep", "300"]);
    let logs = Logs::capture();
    let spawner = DockerSpawner::connect(Config { network: name.clone(), ..Config::default() }, "/").unwrap();
    let gateway = spawner.ensure_network().await.unwrap();
    assert_eq!(gateway, before["IPAM"]["Config"][0]["Gateway"].as_str().unwrap());
    assert_eq!(network_json(&name)["Id"], before["Id"], "kept: a container uses it");
    let log = logs.text();
    assert!(log.contains("WARN"), "{log}");
    assert!(log.contains(&name) && log.contains(&holder), "names the network and who uses it: {log}");
    assert!(log.contains(&format!("docker network rm {name}")) && log.contains("re-creates"), "says what to do: {log}");
    // Said once, not at every start.
    spawner.ensure_network().await.unwrap();
    assert_eq!(logs.text().matches("WARN").count(), 1, "{}", logs.text());

    // Once nobody uses it, the next start re-creates it.
    docker(&["rm", "-f", &holder]);
    let spawner = DockerSpawner::connect(Config { network: name.clone(), ..Config::default() }, "/").unwrap();
    spawner.ensure_network().await.unwrap();
    assert_eq!(network_json(&name)["Options"]["com.docker.network.bridge.enable_icc"], "false");
}
