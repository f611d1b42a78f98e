//! Issue 16's single-node acceptance on a real Docker Swarm: the test makes
//! one (`docker swarm init` on loopback) unless the engine is in one
//! already, and leaves it afterwards only if it made it. Everything runs in
//! one test, in order, so no second test of this file can leave the swarm
//! under a first one.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test
mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::swarm::*;
use common::*;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

const PW: &str = "swarm-pass-42x";

/// The engine in swarm mode for the test; left on drop only if the test
/// made it.
struct Swarm {
    made: bool,
    node_id: String,
}

impl Swarm {
    fn join_or_init() -> Swarm {
        let state = docker_text(&["info", "--format", "{{.Swarm.LocalNodeState}}"]);
        let made = state != "active";
        if made {
            let o = docker(&["swarm", "init", "--advertise-addr", "127.0.0.1", "--listen-addr", "127.0.0.1:2377"]);
            assert!(o.status.success(), "docker swarm init: {}", String::from_utf8_lossy(&o.stderr));
        }
        let node_id = docker_text(&["info", "--format", "{{.Swarm.NodeID}}"]);
        assert!(!node_id.is_empty(), "in a swarm now");
        Swarm { made, node_id }
    }
}

impl Drop for Swarm {
    fn drop(&mut self) {
        if self.made {
            let _ = docker(&["swarm", "leave", "--force"]);
        }
    }
}

#[tokio::test]
async fn swarm_services_run_the_hub_flow_survive_a_restart_and_fail_cleanly() {
    let image = test_image();
    let scope = DockerScope::new();
    if docker_text(&["info", "--format", "{{.Swarm.LocalNodeState}}"]) != "active" {
        // Only checkable before the test makes its swarm (CI's case).
        a_start_outside_a_swarm_is_refused_clearly(&scope, &image).await;
    }
    let swarm = Swarm::join_or_init();
    let tmp = tempfile::tempdir().unwrap();
    let alice_name = scope.user("sw");
    let gpu_name = scope.user("sg");
    let bad_name = scope.user("sb");
    let away_name = scope.user("sa");
    let network = format!("berth-test-{}-swarm", scope.suffix);
    let failing = FailingImage::build(&image, &scope.suffix);
    let _services = Services {
        users: vec![alice_name.clone(), gpu_name.clone(), bad_name.clone(), away_name.clone()],
        network: network.clone(),
    };
    a_manager_that_does_not_answer_fails_starts_clearly_until_it_does(&scope, &image, &network, &away_name).await;
    let mut env = scope.env(&image);
    env.extend(
        [
            ("BERTH_SWARM_NETWORK", network.as_str()),
            ("BERTH_SSH_BIND", "127.0.0.1:0"),
            ("BERTH_SSH_HOST_KEY_TYPES", "ed25519"),
            // Stand-in GPUs: this machine has none; what a service carries is checked.
            ("BERTH_GPU_MODE", "1"),
            ("BERTH_GPU_DEVICES", "GPU-sw-0,GPU-sw-1,GPU-sw-2"),
            ("BERTH_GPU_SAMPLER", "off"),
            ("BERTH_GPU_WHEN_FULL", "refuse"),
            ("BERTH_ALLOWED_IMAGES", failing.name.as_str()),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut b = Berth::start_with(&env, &["--spawner", "swarm"]);
    let admin = b.first_admin().await;
    let alice = authorized_user(&b, &admin, &alice_name, PW).await;

    // Start by API, OAuth through the proxy, a kernel runs 1+1.
    let r = alice.api(Method::POST, &format!("/hub/api/users/{alice_name}/server")).send().await.unwrap();
    assert!(
        r.status() == StatusCode::CREATED || r.status() == StatusCode::ACCEPTED,
        "start: {}\n{}",
        r.status(),
        b.log()
    );
    let ready = wait_progress(&alice, &format!("/hub/api/users/{alice_name}/server/progress")).await;
    assert_eq!(ready["ready"], true, "{ready}\n{}", b.log());
    oauth_login(&alice, &alice_name).await;
    let kernel = kernel::start(&alice, &alice_name).await;
    assert_eq!(kernel::run(&alice, &alice_name, &kernel, "1+1", None).await, "2");

    // It is a service of one replica, pinned to this node, labelled as berth's.
    let svc_name = format!("berth-{alice_name}");
    let svc = service(&svc_name).expect("alice's server is a Swarm service");
    assert_eq!(svc["Spec"]["Labels"]["berth.user"], alice_name.as_str());
    assert_eq!(svc["Spec"]["Mode"]["Replicated"]["Replicas"], 1);
    let task = &svc["Spec"]["TaskTemplate"];
    assert_eq!(task["Placement"]["Constraints"], json!([format!("node.id=={}", swarm.node_id)]));
    assert!(
        task["ContainerSpec"]["Env"].as_array().unwrap().iter().any(|e| e == "NVIDIA_VISIBLE_DEVICES=void"),
        "no GPU held, none visible: {task}"
    );
    let container = task_container(&svc_name);
    assert!(!container.is_empty(), "the task's container runs on this engine");
    let c = docker_inspect(&container).unwrap();
    let mounts = mounts_of(&c);
    assert!(mounts.iter().any(|m| m.ends_with("-home:/home")), "the home volume: {mounts:?}");

    // A file in the home volume survives stop and start.
    assert_eq!(
        kernel::run(&alice, &alice_name, &kernel, "open('/home/keep.txt','w').write('still here')", None).await,
        "10"
    );
    let r = alice.api(Method::DELETE, &format!("/hub/api/users/{alice_name}/server")).send().await.unwrap();
    assert!(r.status() == StatusCode::NO_CONTENT || r.status() == StatusCode::ACCEPTED, "stop: {}", r.status());
    let deadline = Instant::now() + Duration::from_secs(60);
    while server_model(&alice, &alice_name).await["servers"].get("").is_some() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(service(&svc_name).is_none(), "stop removes the service");
    assert!(docker_inspect(&container).is_none(), "and its container");
    let r = alice.api(Method::POST, &format!("/hub/api/users/{alice_name}/server")).send().await.unwrap();
    assert!(r.status().is_success(), "start again: {}", r.status());
    let ready = wait_progress(&alice, &format!("/hub/api/users/{alice_name}/server/progress")).await;
    assert_eq!(ready["ready"], true, "{ready}\n{}", b.log());
    oauth_login(&alice, &alice_name).await;
    let kernel = kernel::start(&alice, &alice_name).await;
    assert_eq!(kernel::run(&alice, &alice_name, &kernel, "open('/home/keep.txt').read()", None).await, "'still here'");
    let container = task_container(&svc_name);
    let task_id = service(&svc_name).unwrap()["ID"].clone();

    // SSH through the gateway lands in the task's container.
    let key = keygen(tmp.path(), "alice");
    let r = alice
        .api(Method::POST, &format!("/hub/api/users/{alice_name}/keys"))
        .json(&json!({"key": key.public}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let o = ssh(&b, &key, &alice_name, "cat /etc/hostname; cat /home/keep.txt");
    assert!(o.status.success(), "{}\n{}", String::from_utf8_lossy(&o.stderr), b.log());
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    let hostname = docker_inspect(&container).unwrap()["Config"]["Hostname"].as_str().unwrap().to_string();
    assert_eq!(out.lines().collect::<Vec<_>>(), [hostname.as_str(), "still here"], "in the task's container");

    // kill -9 of berth and a restart: the server stays reachable, not restarted.
    b.kill9_and_restart();
    let alice = Browser { base: b.url.clone(), ..alice.clone() };
    let r = alice.get(&format!("/user/{alice_name}/api/status")).await;
    assert_eq!(r.status(), StatusCode::OK, "after the restart\n{}", b.log());
    assert_eq!(server_model(&alice, &alice_name).await["servers"][""]["ready"], true);
    assert_eq!(service(&svc_name).unwrap()["ID"], task_id, "the same service");
    assert_eq!(task_container(&svc_name), container, "the same container");
    assert_eq!(kernel::run(&alice, &alice_name, &kernel, "1+1", None).await, "2");
    let o = ssh(&b, &key, &alice_name, "cat /etc/hostname");
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), hostname, "{}", String::from_utf8_lossy(&o.stderr));

    // GPUs: berth's ids in the environment, the service pinned to this node.
    let gpu = authorized_user(&b, &admin_after_restart(&b, &admin), &gpu_name, PW).await;
    let r = gpu.api(Method::POST, &format!("/hub/api/users/{gpu_name}/server")).json(&json!({"gpus": 2})).send().await;
    let r = r.unwrap();
    assert!(r.status().is_success(), "GPU start: {} {}", r.status(), r.text().await.unwrap_or_default());
    let ready = wait_progress(&gpu, &format!("/hub/api/users/{gpu_name}/server/progress")).await;
    assert_eq!(ready["ready"], true, "{ready}\n{}", b.log());
    // The GPUs berth allocated, as the admin's report names their holders.
    let report: Value =
        admin_after_restart(&b, &admin).api(Method::GET, "/hub/api/gpus").send().await.unwrap().json().await.unwrap();
    let mut held: Vec<String> = report["gpus"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|g| g["holders"].as_array().is_some_and(|h| h.iter().any(|h| h.as_str() == Some(gpu_name.as_str()))))
        .map(|g| g["id"].as_str().unwrap().to_string())
        .collect();
    held.sort();
    let svc = service(&format!("berth-{gpu_name}")).expect("the GPU server's service");
    let task = &svc["Spec"]["TaskTemplate"];
    let gpu_env: Vec<String> = task["ContainerSpec"]["Env"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e.as_str())
        .filter(|e| e.starts_with("NVIDIA_VISIBLE_DEVICES="))
        .map(str::to_string)
        .collect();
    assert_eq!(gpu_env.len(), 1, "{gpu_env:?}");
    let mut ids: Vec<&str> = gpu_env[0].trim_start_matches("NVIDIA_VISIBLE_DEVICES=").split(',').collect();
    ids.sort();
    assert_eq!(held.len(), 2, "{report}");
    assert_eq!(held, ids, "the service sees exactly the GPUs berth allocated to it");
    assert_eq!(task["Placement"]["Constraints"], json!([format!("node.id=={}", swarm.node_id)]));
    assert!(
        task["Resources"]["Reservations"]["GenericResources"].is_null(),
        "this node advertises no GPUs: no generic resource is reserved: {task}"
    );
    // Servers on the swarm network cannot reach each other; they reach the
    // hub. Probed from the GPU server (started by the restarted berth, so
    // its hub URL has berth's new port) towards alice's.
    let gpu_container = task_container(&format!("berth-{gpu_name}"));
    let ip_of = |c: &str| {
        docker_inspect(c).unwrap()["NetworkSettings"]["Networks"][&network]["IPAddress"].as_str().unwrap().to_string()
    };
    let alice_ip = ip_of(&container);
    let probe = format!(
        "import os, socket, urllib.request\n\
         print(urllib.request.urlopen(os.environ['JUPYTERHUB_API_URL']).status)\n\
         try:\n    socket.create_connection(('{alice_ip}', 8888), timeout=3); print('connected')\n\
         except OSError as e:\n    print('refused', e)\n"
    );
    let o = docker(&["exec", &gpu_container, "python3", "-c", &probe]);
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.first(), Some(&"200"), "a server reaches the hub: {out} {}", String::from_utf8_lossy(&o.stderr));
    assert!(lines.get(1).is_some_and(|l| l.starts_with("refused")), "but not another user's server: {out}");
    let from_host =
        tokio::time::timeout(Duration::from_secs(10), tokio::net::TcpStream::connect((alice_ip.as_str(), 8888)));
    assert!(from_host.await.is_ok_and(|c| c.is_ok()), "the hub's side reaches alice's server at {alice_ip}");

    let r = gpu.api(Method::DELETE, &format!("/hub/api/users/{gpu_name}/server")).send().await.unwrap();
    assert!(r.status().is_success(), "{}", r.status());

    // A task that keeps failing: a clear message, nothing left, and the
    // next start works.
    let bad = authorized_user(&b, &admin_after_restart(&b, &admin), &bad_name, PW).await;
    let r = bad
        .api(Method::POST, &format!("/hub/api/users/{bad_name}/servers/broken"))
        .json(&json!({"image": failing.name}))
        .send()
        .await
        .unwrap();
    let (status, message) =
        failed_start(&b, &bad, r, &format!("/hub/api/users/{bad_name}/servers/broken/progress")).await;
    assert!(status.is_success() || status == StatusCode::INTERNAL_SERVER_ERROR, "{status}");
    assert!(
        message.contains("the server's task failed 3 times")
            && message.contains("exit (3)")
            && message.contains("cannot start"),
        "the tries, the exit code and the server's own last words: {message}"
    );
    let model = server_model(&bad, &bad_name).await;
    assert!(model["servers"].get("broken").is_none(), "stopped, not half-started: {model}");
    assert!(service(&format!("berth-{bad_name}--broken")).is_none(), "the service is removed");
    let deadline = Instant::now() + Duration::from_secs(30);
    let leftover = || docker_text(&["ps", "-aq", "--filter", &format!("label=berth.user={bad_name}")]);
    while !leftover().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(leftover(), "", "no container is left");
    let r = bad.api(Method::POST, &format!("/hub/api/users/{bad_name}/servers/broken")).json(&json!({})).send().await;
    assert!(r.unwrap().status().is_success());
    let ready = wait_progress(&bad, &format!("/hub/api/users/{bad_name}/servers/broken/progress")).await;
    assert_eq!(ready["ready"], true, "the next start works: {ready}\n{}", b.log());
}

/// The outcome of a start that is to fail: the REST start waits a while
/// for it, so it reports the failure itself (its status and message), or
/// accepts and the progress stream at `progress` ends failed (the accepting
/// status and the last event's message).
async fn failed_start(b: &Berth, u: &Browser, r: reqwest::Response, progress: &str) -> (StatusCode, String) {
    let status = r.status();
    if status.is_success() {
        let last = wait_progress(u, progress).await;
        assert_eq!(last["failed"], true, "{last}\n{}", b.log());
        (status, last["message"].as_str().unwrap_or_default().to_string())
    } else {
        (status, r.json::<Value>().await.unwrap()["message"].as_str().unwrap_or_default().to_string())
    }
}

/// An image whose every container exits at once with an error, made here
/// from the test image and removed on drop (without pruning shared layers).
struct FailingImage {
    name: String,
}

impl FailingImage {
    fn build(base: &str, suffix: &str) -> FailingImage {
        use std::io::Write;
        let name = format!("berth-test-failing:{suffix}");
        let mut child = Command::new("docker")
            .args(["build", "-q", "-t", &name, "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let dockerfile = format!("FROM {base}\nENTRYPOINT [\"sh\", \"-c\", \"echo cannot start >&2; exit 3\"]\n");
        child.stdin.take().unwrap().write_all(dockerfile.as_bytes()).unwrap();
        assert!(child.wait().unwrap().success(), "building {name}");
        FailingImage { name }
    }
}

impl Drop for FailingImage {
    fn drop(&mut self) {
        let _ = docker(&["rmi", "--no-prune", &self.name]);
    }
}

/// On an engine in no swarm: a start fails saying what to do, and berth
/// makes nothing (no half of its network pair).
async fn a_start_outside_a_swarm_is_refused_clearly(scope: &DockerScope, image: &str) {
    let network = format!("berth-test-{}-noswarm", scope.suffix);
    let name = scope.user("sn");
    let mut env = scope.env(image);
    env.push(("BERTH_SWARM_NETWORK".into(), network.clone()));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let b = Berth::start_with(&env, &["--spawner", "swarm"]);
    let admin = b.first_admin().await;
    let u = authorized_user(&b, &admin, &name, PW).await;
    let r = u.api(Method::POST, &format!("/hub/api/users/{name}/server")).send().await.unwrap();
    let (_, message) = failed_start(&b, &u, r, &format!("/hub/api/users/{name}/server/progress")).await;
    assert!(message.contains("not in a swarm") && message.contains("docker swarm init"), "{message}\n{}", b.log());
    assert!(server_model(&u, &name).await["servers"].get("").is_none(), "the server is stopped");
    for n in [network.clone(), format!("{network}-config")] {
        assert!(!docker(&["network", "inspect", &n]).status.success(), "{n} was not made");
    }
}

/// The manager's engine does not answer (berth's `DOCKER_HOST` is a socket
/// no one serves yet): a start fails saying so, and nothing is left of it;
/// once the engine answers (a relay to the real socket appears), the next
/// start works without a restart of berth.
async fn a_manager_that_does_not_answer_fails_starts_clearly_until_it_does(
    scope: &DockerScope,
    image: &str,
    network: &str,
    name: &str,
) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("docker.sock");
    let host = format!("unix://{}", sock.display());
    let mut env = scope.env(image);
    env.push(("BERTH_SWARM_NETWORK".into(), network.to_string()));
    env.push(("DOCKER_HOST".into(), host));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let b = Berth::start_with(&env, &["--spawner", "swarm"]);
    let admin = b.first_admin().await;
    let u = authorized_user(&b, &admin, name, PW).await;
    let r = u.api(Method::POST, &format!("/hub/api/users/{name}/server")).send().await.unwrap();
    let (status, message) = failed_start(&b, &u, r, &format!("/hub/api/users/{name}/server/progress")).await;
    assert!(status.is_success() || status == StatusCode::INTERNAL_SERVER_ERROR, "{status}");
    assert!(
        message.contains("Docker engine") && message.contains("does not answer") && message.contains("is it running"),
        "{message}\n{}",
        b.log()
    );
    assert!(server_model(&u, name).await["servers"].get("").is_none(), "the server is stopped");
    assert!(service(&format!("berth-{name}")).is_none(), "no service was made");

    // The engine answers again: a relay to the real socket.
    let _relay = EngineRelay::start(&sock).await;
    // berth is not restarted: the next start reaches the engine (and its
    // listener on the swarm network's gateway opens once a task is there).
    let r = u.api(Method::POST, &format!("/hub/api/users/{name}/server")).send().await.unwrap();
    assert!(r.status().is_success(), "start: {}\n{}", r.status(), b.log());
    let ready = wait_progress(&u, &format!("/hub/api/users/{name}/server/progress")).await;
    assert_eq!(ready["ready"], true, "the next start works: {ready}\n{}", b.log());
    assert!(service(&format!("berth-{name}")).is_some(), "a service now");
    let r = u.api(Method::DELETE, &format!("/hub/api/users/{name}/server")).send().await.unwrap();
    assert!(r.status().is_success(), "stop: {}", r.status());
    let deadline = Instant::now() + Duration::from_secs(60);
    while service(&format!("berth-{name}")).is_some() {
        assert!(Instant::now() < deadline, "the stopped server's service is still there\n{}", b.log());
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}
