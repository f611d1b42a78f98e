//! Issue 16's placement and multi-node acceptance on a real two-node Docker
//! Swarm made on this machine: the local engine is the manager (advertised
//! on a veth pair to a network namespace), and a second `dockerd` in that
//! namespace, with its own data root, socket and hostname, joins it as a
//! worker carrying two stand-in GPUs as generic resources
//! (`scripts/swarm-worker`). The hub reaches the worker's servers through a
//! route to the worker's networks and the worker's DOCKER-USER rule, as
//! docs/swarm.md asks of a real deployment. Everything runs in one test, in
//! order; it and `swarm.rs` never run at once (the `swarm` test group in
//! .config/nextest.toml), since each may make and leave the swarm.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test
mod common;

use std::time::{Duration, Instant};

use common::swarm::*;
use common::*;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

const PW: &str = "nodes-pass-42x";

/// The local engine as a swarm manager advertised on the host side of the
/// worker's veth pair; left on drop only if the test made it.
struct Manager {
    made: bool,
    node_id: String,
}

impl Manager {
    fn init_on(addr: &str) -> Manager {
        let state = docker_text(&["info", "--format", "{{.Swarm.LocalNodeState}}"]);
        let made = state != "active";
        if made {
            let listen = format!("{addr}:2377");
            let o = docker(&["swarm", "init", "--advertise-addr", addr, "--listen-addr", &listen]);
            assert!(o.status.success(), "docker swarm init: {}", String::from_utf8_lossy(&o.stderr));
        }
        let node_id = docker_text(&["info", "--format", "{{.Swarm.NodeID}}"]);
        Manager { made, node_id }
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        if self.made {
            let _ = docker(&["swarm", "leave", "--force"]);
        } else {
            let _ = docker(&["node", "update", "--label-rm", "berth.servers", &self.node_id]);
        }
    }
}

fn label(node: &str) {
    let o = docker(&["node", "update", "--label-add", "berth.servers=true", node]);
    assert!(o.status.success(), "label {node}: {}", String::from_utf8_lossy(&o.stderr));
}

fn availability(node: &str, a: &str) {
    let o = docker(&["node", "update", "--availability", a, node]);
    assert!(o.status.success(), "{a} {node}: {}", String::from_utf8_lossy(&o.stderr));
}

/// The running container of a service on the engine at `socket`.
fn container_at(socket: &str, service: &str) -> String {
    docker_at_text(
        socket,
        &["ps", "-q", "--no-trunc", "--filter", &format!("label=com.docker.swarm.service.name={service}")],
    )
}

fn env_of(c: &Value) -> Vec<String> {
    c["Config"]["Env"].as_array().unwrap().iter().filter_map(|e| e.as_str()).map(str::to_string).collect()
}

async fn start(b: &Browser, user: &str, body: Value) -> reqwest::Response {
    b.api(Method::POST, &format!("/hub/api/users/{user}/server")).json(&body).send().await.unwrap()
}

async fn stop_and_wait(b: &Browser, user: &str) {
    let r = b.api(Method::DELETE, &format!("/hub/api/users/{user}/server")).send().await.unwrap();
    assert!(r.status().is_success(), "stop {user}: {}", r.status());
    let deadline = Instant::now() + Duration::from_secs(60);
    while server_model(b, user).await["servers"].get("").is_some() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(server_model(b, user).await["servers"].get("").is_none(), "{user}'s server stopped");
}

async fn ready(b: &Browser, user: &str, log: impl Fn() -> String) {
    let last = wait_progress(b, &format!("/hub/api/users/{user}/server/progress")).await;
    assert_eq!(last["ready"], true, "{user}: {last}\n{}", log());
}

/// The events of one kind about `user`'s default server, newest first.
async fn events_of(admin: &Browser, kind: &str, user: &str) -> Vec<Value> {
    let v: Value = admin
        .api(Method::GET, &format!("/hub/api/events?kind={kind}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap_or(Value::Null);
    v["items"].as_array().cloned().unwrap_or_default().into_iter().filter(|e| e["subject"] == user).collect()
}

/// The account id a user's volumes are named by, from berth's own store.
fn account_id(b: &Berth, user: &str) -> String {
    let db = b.data_dir.join("berth.sqlite");
    let o = std::process::Command::new("python3")
        .args(["-c", "import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute('select account_id from users where name=?', (sys.argv[2],)).fetchone()[0])"])
        .arg(&db)
        .arg(user)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

#[tokio::test]
async fn servers_are_placed_on_the_node_with_their_gpus_or_data_and_follow_a_drained_node() {
    let image = test_image();
    let scope = DockerScope::new();
    let wname = format!("bw{}", std::process::id() % 100_000);
    Worker::down(&wname);
    let net = Worker::net(&wname);
    let manager = Manager::init_on(&net["host_addr"]);
    // berth speaks to the worker's engine over TLS, as to a real node's.
    let tls = tempfile::tempdir().unwrap();
    make_tls(tls.path(), &net["ns_addr"]);
    let worker = Worker::up(&wname, &["GPU-w-a", "GPU-w-b"], &[&image], Some(tls.path()));
    let socket = worker.fact("socket").to_string();
    let engine = worker.fact("tcp").to_string();
    assert!(engine.starts_with("tcp://"), "{:?}", worker.facts);
    let worker_id = worker.fact("node_id").to_string();
    label(&manager.node_id);
    label(&worker_id);

    let pool = worker.fact("address_pool").to_string();
    let upper_half = pool.replace(".0.0/16", ".128.0/17");
    assert_ne!(upper_half, pool, "a /16: {pool}");
    let tmp = tempfile::tempdir().unwrap();
    let names: Vec<String> = ["na", "nb", "nc", "nd", "ne"].iter().map(|n| scope.user(n)).collect();
    let [alice_name, bob_name, carol_name, dave_name, erin_name] = <[String; 5]>::try_from(names.clone()).unwrap();
    let network = format!("berth-test-{}-nodes", scope.suffix);
    let _services = Services { users: names.clone(), network: network.clone() };
    let mut env = scope.env(&image);
    env.extend(
        [
            ("BERTH_SWARM_NETWORK", network.as_str()),
            ("BERTH_SWARM_NODES", "labelled"),
            ("BERTH_SWARM_ENGINES", &format!("{wname}={engine}")),
            ("BERTH_SWARM_ENGINE_TLS_DIR", tls.path().to_str().unwrap()),
            // The upper half of what the host routes to the worker: the
            // worker's engine gives its own networks (docker_gwbridge, made
            // with the first task) /24s from the bottom of it.
            ("BERTH_SWARM_NODE_SUBNETS", &upper_half),
            ("BERTH_SSH_BIND", "127.0.0.1:0"),
            ("BERTH_SSH_HOST_KEY_TYPES", "ed25519"),
            // berth's own node has no GPU; the worker advertises two.
            ("BERTH_GPU_MODE", "1"),
            ("BERTH_GPU_DEVICES", ""),
            ("BERTH_GPU_SAMPLER", "off"),
            ("BERTH_GPU_WHEN_FULL", "queue"),
            ("BERTH_STOP_GRACE", "2"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    let env_ref: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut b = Berth::start_with(&env_ref, &["--spawner", "swarm"]);
    let admin = b.first_admin().await;

    // The inventory holds the worker's GPUs under its name.
    let gpus: Value = admin.api(Method::GET, "/hub/api/gpus").send().await.unwrap().json().await.unwrap();
    let mut ids: Vec<&str> = gpus["gpus"].as_array().unwrap().iter().filter_map(|g| g["id"].as_str()).collect();
    ids.sort();
    assert_eq!(ids, [format!("{wname}:GPU-w-a"), format!("{wname}:GPU-w-b")], "{gpus}\n{}", b.log());

    // A start that needs two GPUs goes to the node that has them, pinned
    // there, and its container sees exactly those (the device ids).
    let alice = authorized_user(&b, &admin, &alice_name, PW).await;
    let r = start(&alice, &alice_name, json!({"gpus": 2})).await;
    assert!(r.status().is_success(), "GPU start: {} {}", r.status(), r.text().await.unwrap_or_default());
    ready(&alice, &alice_name, || b.log()).await;
    let svc_name = format!("berth-{alice_name}");
    let svc = service(&svc_name).expect("alice's service");
    let task = &svc["Spec"]["TaskTemplate"];
    assert_eq!(task["Placement"]["Constraints"], json!([format!("node.id=={worker_id}")]), "{task}");
    let generic = &task["Resources"]["Reservations"]["GenericResources"][0]["DiscreteResourceSpec"];
    assert_eq!((&generic["Kind"], &generic["Value"]), (&json!("NVIDIA-GPU"), &json!(2)), "{task}");
    assert!(task_container(&svc_name).is_empty(), "nothing of alice's runs on berth's node");
    let container = container_at(&socket, &svc_name);
    assert!(!container.is_empty(), "alice's task runs on the worker");
    let c: Value =
        serde_json::from_slice::<Value>(&docker_at(&socket, &["inspect", &container]).stdout).unwrap()[0].clone();
    let visible: Vec<String> = env_of(&c).into_iter().filter(|e| e.starts_with("NVIDIA_VISIBLE_DEVICES=")).collect();
    assert_eq!(visible, ["NVIDIA_VISIBLE_DEVICES=GPU-w-a,GPU-w-b"]);
    // Through the proxy to the worker: OAuth, a kernel runs 1+1, a file.
    oauth_login(&alice, &alice_name).await;
    let kernel = kernel::start(&alice, &alice_name).await;
    assert_eq!(kernel::run(&alice, &alice_name, &kernel, "1+1", None).await, "2");
    let write = "open('/home/keep.txt','w').write('on the worker')";
    assert_eq!(kernel::run(&alice, &alice_name, &kernel, write, None).await, "13");
    // SSH through the gateway lands in the task's container on the worker.
    let key = keygen(tmp.path(), "alice");
    let r = alice
        .api(Method::POST, &format!("/hub/api/users/{alice_name}/keys"))
        .json(&json!({"key": key.public}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let o = ssh(&b, &key, &alice_name, "cat /etc/hostname /home/keep.txt");
    assert!(o.status.success(), "{}\n{}", String::from_utf8_lossy(&o.stderr), b.log());
    let hostname = c["Config"]["Hostname"].as_str().unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout), format!("{hostname}\non the worker"));

    // `berth doctor` on the same configuration names each node.
    let mut cmd = std::process::Command::new(BIN);
    cmd.arg("doctor").arg("--data-dir").arg(&b.data_dir).env_remove("BERTH_CONFIG");
    for (k, v) in &b.env {
        cmd.env(k, v);
    }
    cmd.env("BERTH_SPAWNER", "swarm");
    let o = cmd.output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    let line = out.lines().find(|l| l.contains(&format!("Swarm node {wname}"))).unwrap_or_default().to_string();
    assert!(line.contains("2 GPU(s) from its generic resource NVIDIA-GPU"), "{out}");
    assert!(line.contains(&format!("engine at {engine} (TLS) answers")), "{out}");
    assert!(
        line.contains(&format!("its part of the network is {}", upper_half.trim_end_matches(".128.0/17"))),
        "{out}"
    );
    assert!(line.contains("its default runtime is runc") && line.contains("services see no GPU"), "{out}");
    assert!(out.lines().any(|l| l.contains("Swarm node") && l.contains("(berth's)")), "{out}");
    assert_ne!(o.status.code(), Some(0), "a node with GPUs but no NVIDIA runtime is a problem: {out}");

    // None free: a GPU start waits in the queue; one without GPUs goes to
    // the node running fewest servers (berth's own).
    let bob = authorized_user(&b, &admin, &bob_name, PW).await;
    let r = start(&bob, &bob_name, json!({"gpus": 1})).await;
    assert!(r.status().is_success(), "{}", r.status());
    let model = server_model(&bob, &bob_name).await["servers"][""].clone();
    assert_eq!((&model["pending"], &model["ready"]), (&json!("spawn"), &json!(false)), "bob waits: {model}");
    let carol = authorized_user(&b, &admin, &carol_name, PW).await;
    assert!(start(&carol, &carol_name, json!({})).await.status().is_success());
    ready(&carol, &carol_name, || b.log()).await;
    let carol_svc = service(&format!("berth-{carol_name}")).unwrap();
    assert_eq!(
        carol_svc["Spec"]["TaskTemplate"]["Placement"]["Constraints"],
        json!([format!("node.id=={}", manager.node_id)])
    );
    assert!(!task_container(&format!("berth-{carol_name}")).is_empty(), "carol runs on berth's node");

    // alice stops: bob gets a GPU on the worker.
    stop_and_wait(&alice, &alice_name).await;
    ready(&bob, &bob_name, || b.log()).await;
    let bob_c = container_at(&socket, &format!("berth-{bob_name}"));
    assert!(!bob_c.is_empty(), "bob's task runs on the worker");
    oauth_login(&bob, &bob_name).await;

    // kill -9 and a restart, now refusing starts that find no GPU free:
    // bob's server on the worker is adopted and reachable again.
    for (k, v) in b.env.iter_mut() {
        if k == "BERTH_GPU_WHEN_FULL" {
            *v = "refuse".into();
        }
    }
    b.kill9_and_restart();
    let admin = admin_after_restart(&b, &admin);
    let bob = admin_after_restart(&b, &bob);
    let r = bob.get(&format!("/user/{bob_name}/api/status")).await;
    assert_eq!(r.status(), StatusCode::OK, "bob's server on the worker after the restart\n{}", b.log());
    assert_eq!(container_at(&socket, &format!("berth-{bob_name}")), bob_c, "the same container");
    let dave = authorized_user(&b, &admin, &dave_name, PW).await;
    let r = start(&dave, &dave_name, json!({"gpus": 2})).await;
    let body = r.text().await.unwrap_or_default();
    assert!(body.contains("not enough free GPUs") && body.contains("1 of 2 free"), "refused: {body}");

    // alice again, without GPUs: to the node her volumes are on, the worker.
    let alice = admin_after_restart(&b, &alice);
    assert!(start(&alice, &alice_name, json!({})).await.status().is_success());
    ready(&alice, &alice_name, || b.log()).await;
    assert!(!container_at(&socket, &svc_name).is_empty(), "alice's volumes are on the worker, so is she");
    oauth_login(&alice, &alice_name).await;
    let kernel = kernel::start(&alice, &alice_name).await;
    assert_eq!(
        kernel::run(&alice, &alice_name, &kernel, "open('/home/keep.txt').read()", None).await,
        "'on the worker'"
    );

    // The worker is drained: alice's and bob's servers cannot go anywhere
    // else (their volumes are there); berth stops them and says why.
    availability(&worker_id, "drain");
    let deadline = Instant::now() + Duration::from_secs(90);
    while server_model(&alice, &alice_name).await["servers"].get("").is_some() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(server_model(&alice, &alice_name).await["servers"].get("").is_none(), "stopped\n{}", b.log());
    let gone = events_of(&admin, "vanished", &alice_name).await;
    let detail = gone.first().map(|e| e["detail"].to_string()).unwrap_or_default();
    assert!(detail.contains("no suitable node"), "the event says why: {gone:?}");
    assert!(service(&svc_name).is_none(), "and the service is gone");
    let r = start(&alice, &alice_name, json!({})).await;
    let message = if r.status().is_success() {
        wait_progress(&alice, &format!("/hub/api/users/{alice_name}/server/progress")).await["message"].to_string()
    } else {
        r.text().await.unwrap_or_default()
    };
    assert!(message.contains(&format!("volumes are on node {wname}")) && message.contains("drain"), "{message}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while server_model(&bob, &bob_name).await["servers"].get("").is_some() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // A GPU start while the GPUs' node is drained fails saying so, holds
    // nothing, and works once the node is back.
    let dave = admin_after_restart(&b, &dave);
    let r = start(&dave, &dave_name, json!({"gpus": 1})).await;
    let message = if r.status().is_success() {
        wait_progress(&dave, &format!("/hub/api/users/{dave_name}/server/progress")).await["message"].to_string()
    } else {
        r.text().await.unwrap_or_default()
    };
    assert!(message.contains(&format!("GPUs are on node {wname}, which is ready (drain)")), "{message}");
    let report: Value = admin.api(Method::GET, "/hub/api/gpus").send().await.unwrap().json().await.unwrap();
    assert_eq!(report["held"], 0, "nothing held after the failed start: {report}");
    assert!(service(&format!("berth-{dave_name}")).is_none());
    availability(&worker_id, "active");
    assert!(start(&dave, &dave_name, json!({"gpus": 1})).await.status().is_success());
    ready(&dave, &dave_name, || b.log()).await;
    assert!(!container_at(&socket, &format!("berth-{dave_name}")).is_empty(), "dave runs on the worker");
    stop_and_wait(&dave, &dave_name).await;

    let carol = admin_after_restart(&b, &carol);
    stop_and_wait(&carol, &carol_name).await;

    // Shared volumes (a bind of one host directory per volume, the stand-in
    // for an NFS export both nodes mount): Swarm places the server among the
    // labelled nodes and moves it when its node is drained; berth follows.
    let shared_root = tmp.path().join("exports");
    let erin = authorized_user(&b, &admin, &erin_name, PW).await;
    let owner = account_id(&b, &erin_name);
    for role in ["home", "workspace", "cache"] {
        std::fs::create_dir_all(shared_root.join(format!("berth-{owner}-{role}"))).unwrap();
    }
    for (k, v) in [
        ("BERTH_SWARM_VOLUMES", "shared".to_string()),
        ("BERTH_SWARM_VOLUME_DRIVER", "local".to_string()),
        ("BERTH_SWARM_VOLUME_OPTS", format!("type=none;o=bind;device={}/{{volume}}", shared_root.display())),
    ] {
        b.env.push((k.to_string(), v));
    }
    b.kill9_and_restart();
    let admin = admin_after_restart(&b, &admin);
    let erin = admin_after_restart(&b, &erin);
    // Only the worker can take it at first.
    availability(&manager.node_id, "drain");
    let erin_svc = format!("berth-{erin_name}");
    assert!(start(&erin, &erin_name, json!({})).await.status().is_success());
    ready(&erin, &erin_name, || b.log()).await;
    let svc = service(&erin_svc).unwrap();
    assert_eq!(svc["Spec"]["TaskTemplate"]["Placement"]["Constraints"], json!(["node.labels.berth.servers==true"]));
    assert!(!container_at(&socket, &erin_svc).is_empty(), "erin runs on the worker");
    oauth_login(&erin, &erin_name).await;
    let kernel = kernel::start(&erin, &erin_name).await;
    let write = "open('/home/moved.txt','w').write('follows me')";
    assert_eq!(kernel::run(&erin, &erin_name, &kernel, write, None).await, "10");
    // The worker is drained: Swarm runs erin's task on berth's node, and
    // berth routes there and says so.
    availability(&manager.node_id, "active");
    availability(&worker_id, "drain");
    let deadline = Instant::now() + Duration::from_secs(90);
    while task_container(&erin_svc).is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(!task_container(&erin_svc).is_empty(), "Swarm moved erin's task to berth's node\n{}", b.log());
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut moved = Vec::new();
    while moved.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        moved = events_of(&admin, "server-moved", &erin_name).await;
    }
    let detail = moved.first().map(|e| e["detail"].to_string()).unwrap_or_default();
    assert!(detail.contains(&format!("on node {wname}")) && detail.contains("drain"), "{moved:?}\n{}", b.log());
    assert_eq!(server_model(&erin, &erin_name).await["servers"][""]["ready"], true);
    // The new container's server answers through the route once it is up
    // (and asks its user to log in to it again: it is a new process).
    let deadline = Instant::now() + Duration::from_secs(60);
    while follow(&erin, &format!("/user/{erin_name}/api")).await.0.status() != StatusCode::OK
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    oauth_login(&erin, &erin_name).await;
    let kernel = kernel::start(&erin, &erin_name).await;
    let read = "open('/home/moved.txt').read()";
    assert_eq!(kernel::run(&erin, &erin_name, &kernel, read, None).await, "'follows me'", "the data followed");
    availability(&worker_id, "active");
    stop_and_wait(&erin, &erin_name).await;
    drop(b);
    drop(worker);
}
