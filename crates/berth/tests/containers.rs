//! The containers item of the security review, against the real Docker
//! engine: a user's container cannot open connections to another user's
//! container but still reaches the hub's API, and containers run hardened.
//! Each test is named after the attack it tries.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test
mod common;

use std::process::{Command, Output};
use std::time::Duration;

use common::*;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

const PW: &str = "containers-pass-42x";

fn docker_berth(scope: &DockerScope, image: &str) -> Berth {
    let env = scope.env(image);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    Berth::start_with(&env, &[])
}

/// Starts `name`'s default server and checks it serves its owner.
async fn running_server(b: &Berth, u: &Browser, name: &str) {
    let r = u.api(Method::POST, &format!("/hub/api/users/{name}/server")).json(&json!({})).send().await.unwrap();
    let status = r.status();
    let ready = if status == StatusCode::CREATED {
        json!({"ready": true})
    } else {
        assert_eq!(status, StatusCode::ACCEPTED, "start {name}: {}", r.text().await.unwrap_or_default());
        wait_progress(u, &format!("/hub/api/users/{name}/server/progress")).await
    };
    assert_eq!(ready["ready"], true, "{name}'s server did not start: {ready}\n{}", b.log());
    oauth_login(u, name).await;
    assert_eq!(u.get(&format!("/user/{name}/api/status")).await.status(), StatusCode::OK);
}

/// `docker exec` of `python3 -c <code> <args>` in a container (as `user` when given).
fn exec_python(container: &str, user: Option<&str>, code: &str, args: &[&str]) -> Output {
    let mut cmd = Command::new("timeout");
    cmd.args(["120", "docker", "exec"]);
    if let Some(u) = user {
        cmd.args(["-u", u]);
    }
    cmd.args([container, "python3", "-c", code]).args(args).output().expect("docker exec")
}

/// The JSON a script printed on its last line.
fn json_out(out: &Output) -> Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "the script failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

/// Tries TCP connections to (host, port) pairs and the hub's API, from
/// inside a container; prints what happened as JSON.
const PROBE: &str = r#"
import json, os, socket, sys, time, urllib.request

def connect(host, port):
    t = time.monotonic()
    try:
        socket.create_connection((host, port), timeout=3).close()
        result = "connected"
    except Exception as e:
        result = type(e).__name__ + ": " + str(e)
    return {"result": result, "seconds": time.monotonic() - t}

def get(url, headers):
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(urllib.request.Request(url, headers=headers), timeout=10) as r:
            return {"status": r.status, "body": json.loads(r.read() or b"null")}
    except Exception as e:
        return {"status": None, "error": type(e).__name__ + ": " + str(e)}

api = os.environ["JUPYTERHUB_API_URL"]
token = {"Authorization": "token " + os.environ["JUPYTERHUB_API_TOKEN"]}
print(json.dumps({
    "by_ip": connect(sys.argv[1], int(sys.argv[2])),
    "by_name": connect(sys.argv[3], int(sys.argv[2])),
    "api_url": api,
    "api_root": get(api + "/", {}),
    "whoami": get(api + "/user", token),
}))
"#;

#[tokio::test]
async fn alices_container_cannot_reach_bobs_server_by_ip_or_name() {
    let image = test_image();
    let scope = DockerScope::new();
    let b = docker_berth(&scope, &image);
    let alice_name = scope.user("al");
    let bob_name = scope.user("bo");
    let (admin, alice) = admin_and_user(&b, &alice_name, PW).await;
    let bob = authorized_user(&b, &admin, &bob_name, PW).await;
    running_server(&b, &alice, &alice_name).await;
    running_server(&b, &bob, &bob_name).await;

    let bobs_container = format!("berth-{bob_name}");
    let c = docker_inspect(&bobs_container).expect("bob's container exists");
    let bobs_ip = c["NetworkSettings"]["Networks"][&scope.network]["IPAddress"].as_str().unwrap().to_string();
    assert!(!bobs_ip.is_empty(), "bob's container has an address on {}: {c}", scope.network);
    // bob's server does listen there: the hub, on the host side, reaches it.
    let from_host =
        tokio::time::timeout(Duration::from_secs(10), tokio::net::TcpStream::connect((bobs_ip.as_str(), 8888)))
            .await
            .expect("the host connects to bob's server in time");
    assert!(from_host.is_ok(), "bob's server listens on {bobs_ip}:8888: {from_host:?}");

    let out = exec_python(&format!("berth-{alice_name}"), None, PROBE, &[&bobs_ip, "8888", &bobs_container]);
    let probe = json_out(&out);
    for how in ["by_ip", "by_name"] {
        let attempt = &probe[how];
        assert_ne!(attempt["result"], "connected", "alice's container reached bob's server {how}: {probe}");
        assert!(
            attempt["seconds"].as_f64().unwrap() < 6.0,
            "the attempt {how} did not fail within a few seconds: {probe}"
        );
    }
    // ...while the hub's API answers her container, anonymous and with her server's token.
    let api_url = probe["api_url"].as_str().unwrap();
    assert!(api_url.starts_with("http://") && api_url.ends_with("/hub/api"), "{probe}");
    assert_eq!(probe["api_root"]["status"], 200, "{probe}\n{}", b.log());
    assert!(probe["api_root"]["body"]["version"].is_string(), "{probe}");
    assert_eq!(probe["whoami"]["status"], 200, "{probe}");
    assert_eq!(probe["whoami"]["body"]["name"], alice_name.as_str(), "{probe}");
}

/// What a process inside the container learns of its own limits.
const SELF_CHECK: &str = r#"
import json, os, socket

def first(*paths):
    for p in paths:
        if os.path.exists(p):
            return open(p).read().strip()
    return None

status = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines() if ":" in l)
try:
    socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP).close()
    raw = "opened"
except Exception as e:
    raw = type(e).__name__ + ": " + str(e)
print(json.dumps({
    "uid": os.getuid(),
    "no_new_privs": status.get("NoNewPrivs", "").strip(),
    "raw_socket": raw,
    "pids_max": first("/sys/fs/cgroup/pids.max", "/sys/fs/cgroup/pids/pids.max"),
    "memory_max": first("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"),
}))
"#;

/// Three quarters of this host's memory in whole MiB, as bytes.
fn three_quarters_of_host_memory() -> i64 {
    let info = std::fs::read_to_string("/proc/meminfo").unwrap();
    let kib: i64 = info
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .unwrap()
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap();
    kib * 1024 / 4 * 3 / (1 << 20) * (1 << 20)
}

#[tokio::test]
async fn containers_run_hardened() {
    let image = test_image();
    let scope = DockerScope::new();
    let b = docker_berth(&scope, &image);
    let name = scope.user("ha");
    let (_admin, u) = admin_and_user(&b, &name, PW).await;
    // The test image starts as root (jupyterhub-singleuser --allow-root) and still runs.
    running_server(&b, &u, &name).await;

    let container = format!("berth-{name}");
    let c = docker_inspect(&container).expect("the container exists");
    let hc = &c["HostConfig"];
    let security: Vec<&str> = hc["SecurityOpt"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    assert!(security.contains(&"no-new-privileges:true"), "{security:?}");
    let dropped: Vec<String> = hc["CapDrop"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .map(|s| s.trim_start_matches("CAP_").to_string())
        .collect();
    for cap in ["NET_RAW", "MKNOD", "AUDIT_WRITE", "SYS_CHROOT", "SETFCAP", "NET_BIND_SERVICE"] {
        assert!(dropped.iter().any(|d| d == cap), "{cap} is not dropped: {dropped:?}");
    }
    assert!(hc["CapAdd"].as_array().is_none_or(|a| a.is_empty()), "no capability added: {}", hc["CapAdd"]);
    assert_eq!(hc["Privileged"], false);
    assert_eq!(hc["PidsLimit"], 4096, "the default process limit");
    let memory = three_quarters_of_host_memory();
    assert_eq!(hc["Memory"], memory, "the default memory limit: three quarters of the host's");
    let env: Vec<&str> = c["Config"]["Env"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    let gpus: Vec<&&str> = env.iter().filter(|e| e.starts_with("NVIDIA_VISIBLE_DEVICES=")).collect();
    assert_eq!(gpus, [&"NVIDIA_VISIBLE_DEVICES=void"], "a server without GPUs sees none");

    // Inside, even as root: no raw sockets (no ping, no spoofing), no new
    // privileges, and the limits in force.
    let inside = json_out(&exec_python(&container, Some("0"), SELF_CHECK, &[]));
    assert_eq!(inside["uid"], 0, "{inside}");
    let raw = inside["raw_socket"].as_str().unwrap();
    assert!(raw.starts_with("PermissionError"), "a raw ICMP socket was not refused: {inside}");
    assert_eq!(inside["no_new_privs"], "1", "{inside}");
    assert_eq!(inside["pids_max"], "4096", "{inside}");
    assert_eq!(inside["memory_max"], memory.to_string().as_str(), "{inside}");
}

/// A container that dies loses its route at once (the engine's events), not
/// at the next poll: its address could be given to another user's container.
#[tokio::test]
async fn a_dead_containers_route_goes_before_its_address_can_be_reused() {
    let image = test_image();
    let scope = DockerScope::new();
    let mut env = scope.env(&image);
    // The poll would take five minutes: only the event can be this quick.
    env.push(("BERTH_POLL_INTERVAL".into(), "300".into()));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let b = Berth::start_with(&env, &[]);
    let name = scope.user("dd");
    let (_admin, u) = admin_and_user(&b, &name, PW).await;
    running_server(&b, &u, &name).await;
    let st = Command::new("docker").args(["kill", &format!("berth-{name}")]).output().unwrap();
    assert!(st.status.success());
    let t0 = std::time::Instant::now();
    eventually("the hub to mark the server stopped", Duration::from_secs(20), || async {
        let m: Value =
            u.api(Method::GET, &format!("/hub/api/users/{name}")).send().await.unwrap().json().await.unwrap();
        m["servers"] == json!({})
    })
    .await;
    assert!(t0.elapsed() < Duration::from_secs(20), "well before the poll");
    // Its URL is the hub's "not running" answer, not a proxy to a dead (or reused) address.
    let r = u.client.get(u.url(&format!("/user/{name}/api/status"))).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 424, "{}", r.text().await.unwrap_or_default());
}
