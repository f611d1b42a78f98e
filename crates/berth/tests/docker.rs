//! Issue 4's acceptance against the real Docker engine: servers in
//! containers built from an image made here from nothing pulled.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test
mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

const PW: &str = "docker-pass-42x";

fn docker_berth(scope: &DockerScope, image: &str, extra: &[(&str, &str)]) -> Berth {
    let mut env = scope.env(image);
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    Berth::start_with(&env, &[])
}

async fn user(b: &Berth, admin: &Browser, name: &str) -> Browser {
    authorized_user(b, admin, name, PW).await
}

async fn admin(b: &Berth) -> Browser {
    b.first_admin().await
}

#[tokio::test]
async fn containers_run_jupyter_keep_work_and_share_a_volume() {
    let image = test_image();
    let scope = DockerScope::new();
    let b = docker_berth(&scope, &image, &[]);
    let admin = admin(&b).await;
    let alice_name = scope.user("al");
    let bob_name = scope.user("bo");
    let alice = user(&b, &admin, &alice_name).await;
    let bob = user(&b, &admin, &bob_name).await;

    let ready = start_via_pages(&alice, &alice_name).await;
    assert_eq!(ready["ready"], true, "{ready}\n{}", b.log());
    oauth_login(&alice, &alice_name).await;
    let r = alice.get(&format!("/user/{alice_name}/api/status")).await;
    assert_eq!(r.status(), StatusCode::OK);
    let kernel = kernel::start(&alice, &alice_name).await;
    assert_eq!(kernel::run(&alice, &alice_name, &kernel, "1+1", None).await, "2");

    // The container as berth made it.
    let c = docker_inspect(&format!("berth-{alice_name}")).expect("the container exists");
    assert_eq!(c["Config"]["Labels"]["berth.user"], alice_name.as_str());
    // DOCKER_NOTEBOOK_IMAGE (here BERTH_DOCKER_IMAGE) names the image: the
    // default server runs it as it is, not the default template.
    assert_eq!(c["Config"]["Image"], image.as_str());
    assert_eq!(c["Config"]["Labels"]["berth.template"], "");
    assert_eq!(c["HostConfig"]["ShmSize"], 2048i64 * 1024 * 1024);
    assert!(
        c["HostConfig"]["DeviceRequests"].is_null() || c["HostConfig"]["DeviceRequests"] == json!([]),
        "no GPU here: no device requests"
    );
    let mounts = mounts_of(&c);
    // Per-user volumes are named by the account's immutable id, not the name.
    let owner = mounts
        .iter()
        .find_map(|m| m.strip_suffix("-workspace:/home/lab/workspace").and_then(|v| v.strip_prefix("berth-")))
        .unwrap_or_else(|| panic!("a workspace volume in {mounts:?}"))
        .to_string();
    assert!(owner != alice_name && owner.starts_with('1'), "named by the account id: {owner}");
    for want in [
        format!("berth-{owner}-workspace:/home/lab/workspace"),
        format!("berth-{owner}-home:/home"),
        format!("{}:/mnt/shared", scope.shared),
    ] {
        assert!(mounts.contains(&want), "{want} not in {mounts:?}");
    }

    // A file in the workspace survives stop and start.
    let xsrf = alice.cookie(&format!("/user/{alice_name}/"), "_xsrf").unwrap();
    let r = alice
        .client
        .put(alice.url(&format!("/user/{alice_name}/api/contents/keep.txt")))
        .header("X-XSRFToken", &xsrf)
        .json(&json!({"type": "file", "format": "text", "content": "still here"}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    assert_eq!(
        kernel::run(&alice, &alice_name, &kernel, "open('/mnt/shared/from-alice.txt','w').write('hello bob')", None)
            .await,
        "9"
    );
    let r = alice.api(Method::DELETE, &format!("/hub/api/users/{alice_name}/server")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert!(docker_inspect(&format!("berth-{alice_name}")).is_none(), "the container is removed on stop");
    let ready = start_via_pages(&alice, &alice_name).await;
    assert_eq!(ready["ready"], true, "{ready}");
    oauth_login(&alice, &alice_name).await;
    let r: Value =
        alice.get(&format!("/user/{alice_name}/api/contents/keep.txt?content=1")).await.json().await.unwrap();
    assert_eq!(r["content"], "still here");

    // bob reads what alice left in the shared volume.
    assert_eq!(start_via_pages(&bob, &bob_name).await["ready"], true);
    oauth_login(&bob, &bob_name).await;
    let k = kernel::start(&bob, &bob_name).await;
    assert_eq!(
        kernel::run(&bob, &bob_name, &k, "open('/mnt/shared/from-alice.txt').read()", None).await,
        "'hello bob'"
    );
    // ...and cannot reach alice's server.
    assert_eq!(
        bob.client.get(bob.url(&format!("/user/{alice_name}/api/status"))).send().await.unwrap().status(),
        StatusCode::FORBIDDEN
    );

    // Deleting bob keeps his volumes unless asked; asked, they go.
    let volume_exists =
        |v: &str| Command::new("docker").args(["volume", "inspect", v]).output().unwrap().status.success();
    let bobs = docker_inspect(&format!("berth-{bob_name}")).expect("bob's container")["Mounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["Destination"] == "/home/lab/workspace")
        .and_then(|m| m["Name"].as_str().map(str::to_string))
        .expect("bob's workspace volume");
    assert!(volume_exists(&bobs));
    let r = admin.api(Method::DELETE, &format!("/hub/api/users/{bob_name}?remove_volumes=true")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT, "{}", r.text().await.unwrap_or_default());
    assert!(docker_inspect(&format!("berth-{bob_name}")).is_none(), "bob's container was stopped and removed");
    assert!(!volume_exists(&bobs), "bob's volumes were removed");
    assert!(volume_exists(&format!("berth-{owner}-workspace")), "alice's stay");
}

#[tokio::test]
async fn kill9_hub_with_two_containers_running() {
    let image = test_image();
    let scope = DockerScope::new();
    let mut b = docker_berth(&scope, &image, &[]);
    let admin = admin(&b).await;
    let names = [scope.user("ca"), scope.user("da")];
    let mut browsers = Vec::new();
    for n in &names {
        let u = user(&b, &admin, n).await;
        assert_eq!(start_via_pages(&u, n).await["ready"], true, "{}", b.log());
        oauth_login(&u, n).await;
        browsers.push(u);
    }
    let started: Vec<Value> =
        names.iter().map(|n| docker_inspect(&format!("berth-{n}")).unwrap()["State"]["StartedAt"].clone()).collect();

    b.kill9_and_restart();
    for (i, n) in names.iter().enumerate() {
        let u = Browser { base: b.url.clone(), ..browsers[i].clone() };
        let r = u.get(&format!("/user/{n}/api/status")).await;
        assert_eq!(r.status(), StatusCode::OK, "{n} after the restart\n{}", b.log());
        let me: Value = u.api(Method::GET, &format!("/hub/api/users/{n}")).send().await.unwrap().json().await.unwrap();
        assert_eq!(me["servers"][""]["ready"], true);
        assert_eq!(docker_inspect(&format!("berth-{n}")).unwrap()["State"]["StartedAt"], started[i], "not restarted");
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A local registry from Debian's docker-registry package, on loopback.
struct Registry {
    child: std::process::Child,
    _dir: tempfile::TempDir,
    addr: String,
}

impl Registry {
    fn start() -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let cfg = dir.path().join("config.yml");
        std::fs::write(
            &cfg,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        let bin = ["/usr/bin/docker-registry", "/usr/sbin/docker-registry"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .expect("docker-registry is installed (scripts/test installs it)");
        let child = Command::new(bin)
            .arg("serve")
            .arg(&cfg)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Built first, so a registry that never listens is still stopped.
        let registry = Registry { child, _dir: dir, addr };
        let start = std::time::Instant::now();
        while std::net::TcpStream::connect(&registry.addr).is_err() {
            assert!(start.elapsed() < Duration::from_secs(10), "the test registry never listened on {}", registry.addr);
            std::thread::sleep(Duration::from_millis(50));
        }
        registry
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sh(args: &[&str]) {
    let st = Command::new(args[0]).args(&args[1..]).status().unwrap();
    assert!(st.success(), "{args:?} failed");
}

#[tokio::test]
async fn images_only_in_a_registry_are_pulled_with_progress() {
    let image = test_image();
    let scope = DockerScope::new();
    let reg = Registry::start();
    // An image the engine does not have: the test image plus a layer of noise.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("Dockerfile"),
        format!("FROM {image}\nRUN head -c 8000000 /dev/urandom > /opt/noise\n"),
    )
    .unwrap();
    let remote = format!("{}/berth-pull-{}:v1", reg.addr, scope.suffix);
    scope.extra_images.lock().unwrap().push(remote.clone());
    sh(&["docker", "build", "-q", "-t", &remote, dir.path().to_str().unwrap()]);
    sh(&["docker", "push", "-q", &remote]);
    sh(&["docker", "rmi", "-f", "--no-prune", &remote]);

    // Users may name an image only where the admin allows it.
    let missing = format!("{}/berth-pull-{}:nope", reg.addr, scope.suffix);
    let allowed = format!("{remote},{missing}");
    let b = docker_berth(&scope, &image, &[("BERTH_ALLOWED_IMAGES", allowed.as_str())]);
    let admin = admin(&b).await;
    let name = scope.user("ed");
    let u = user(&b, &admin, &name).await;
    let r = u
        .api(Method::POST, &format!("/hub/api/users/{name}/server"))
        .json(&json!({"image": remote}))
        .send()
        .await
        .unwrap();
    assert!(r.status() == StatusCode::CREATED || r.status() == StatusCode::ACCEPTED, "{}", r.status());
    let events = all_progress(&u, &format!("/hub/api/users/{name}/server/progress")).await;
    let last = events.last().cloned().unwrap_or_default();
    assert_eq!(last["ready"], true, "{events:?}\n{}", b.log());
    assert!(
        events.iter().any(|e| e["message"].as_str().unwrap_or("").contains("MiB downloaded")),
        "progress reports bytes: {events:?}"
    );
    u.api(Method::DELETE, &format!("/hub/api/users/{name}/server")).send().await.unwrap();

    // A missing tag is a clear error, and the server is stopped again.
    let r = u
        .api(Method::POST, &format!("/hub/api/users/{name}/server"))
        .json(&json!({"image": missing}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let msg = r.json::<Value>().await.unwrap()["message"].as_str().unwrap().to_string();
    assert!(msg.contains("cannot pull") && msg.contains(&missing), "{msg}");
    let me: Value = u.api(Method::GET, &format!("/hub/api/users/{name}")).send().await.unwrap().json().await.unwrap();
    assert_eq!(me["servers"], json!({}));
}

#[tokio::test]
async fn engine_away_then_back_without_restarting_berth() {
    let image = test_image();
    let scope = DockerScope::new();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("docker.sock");
    let host = format!("unix://{}", sock.display());
    let b = docker_berth(&scope, &image, &[("DOCKER_HOST", host.as_str())]);
    let admin = admin(&b).await;
    let name = scope.user("fe");
    let u = user(&b, &admin, &name).await;
    let r = u.api(Method::POST, &format!("/hub/api/users/{name}/server")).json(&json!({})).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let msg = r.json::<Value>().await.unwrap()["message"].as_str().unwrap().to_string();
    assert!(msg.contains("Docker engine does not answer"), "{msg}");

    // The engine comes back (a relay to the real socket appears).
    let _relay = EngineRelay::start(&sock).await;
    // berth notices on its own: it listens on the network's gateway once it can.
    let start = std::time::Instant::now();
    while !b.log().contains("also listening on the Docker network's gateway") {
        assert!(start.elapsed() < Duration::from_secs(30), "berth never reconnected:\n{}", b.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let r = u.api(Method::POST, &format!("/hub/api/users/{name}/server")).json(&json!({})).send().await.unwrap();
    let status = r.status();
    let last = if status == StatusCode::CREATED {
        json!({"ready": true})
    } else {
        wait_progress(&u, &format!("/hub/api/users/{name}/server/progress")).await
    };
    assert_eq!(last["ready"], true, "{status} {last}\n{}", b.log());
    u.api(Method::DELETE, &format!("/hub/api/users/{name}/server")).send().await.unwrap();
}

#[tokio::test]
async fn eight_concurrent_starts_share_four_gpus() {
    // The allocator is the spawner's business only at the end: local
    // processes that never listen hold their GPUs while "starting".
    let b = Berth::start_with(
        &[
            ("BERTH_LOCAL_CMD", "sleep 603"),
            ("BERTH_START_TIMEOUT", "120"),
            ("BERTH_GPU_DEVICES", "GPU-a,GPU-b,GPU-c,GPU-d"),
            // Refused, not queued: this is about the allocator (the queue is gpu_queue.rs).
            ("BERTH_GPU_WHEN_FULL", "refuse"),
        ],
        &[],
    );
    let admin = admin(&b).await;
    let t = admin.api(Method::POST, "/hub/api/users/admin/tokens").json(&json!({})).send().await.unwrap();
    let token = t.json::<Value>().await.unwrap()["token"].as_str().unwrap().to_string();
    let c = api_client();
    let names: Vec<String> = (0..8).map(|i| format!("gpu{i}")).collect();
    let r = c
        .post(format!("{}/hub/api/users", b.url))
        .header("Authorization", format!("token {token}"))
        .json(&json!({"usernames": names}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let starts = names.iter().map(|n| {
        let (c, url, token) = (c.clone(), format!("{}/hub/api/users/{n}/server", b.url), token.clone());
        async move {
            let r = c
                .post(url)
                .header("Authorization", format!("token {token}"))
                .json(&json!({"gpus": 1}))
                .timeout(Duration::from_secs(60))
                .send()
                .await
                .unwrap();
            let status = r.status();
            (status, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    });
    let results = futures_util::future::join_all(starts).await;
    let refused: Vec<&Value> = results.iter().filter(|(s, _)| *s == StatusCode::CONFLICT).map(|(_, v)| v).collect();
    let accepted = results.iter().filter(|(s, _)| *s == StatusCode::ACCEPTED).count();
    assert_eq!((accepted, refused.len()), (4, 4), "{results:?}");
    for v in &refused {
        let m = v["message"].as_str().unwrap();
        assert!(m.contains("not enough free GPUs: 1 wanted, 0 of 4 free") && m.contains("held by"), "{m}");
    }
    // The four running processes see four different devices.
    let mut seen = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cwd) = std::fs::read_link(e.path().join("cwd")) {
            if cwd.starts_with(b.data_dir.canonicalize().unwrap()) {
                let env = std::fs::read(e.path().join("environ")).unwrap_or_default();
                for var in env.split(|b| *b == 0) {
                    if let Some(v) = String::from_utf8_lossy(var).strip_prefix("CUDA_VISIBLE_DEVICES=") {
                        seen.push(v.to_string());
                    }
                }
            }
        }
    }
    seen.sort();
    assert_eq!(seen, ["GPU-a", "GPU-b", "GPU-c", "GPU-d"]);

    // A user (not an admin) is told how many are free, not who holds them.
    let ninth = Browser::new(&b.url);
    ninth.signup("nine", PW).await;
    admin.submit("/hub/authorize", "/hub/authorize/nine", &[("action", "authorize")]).await;
    ninth.login_ok("nine", PW).await;
    let r = ninth.api(Method::POST, "/hub/api/users/nine/server").json(&json!({"gpus": 1})).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::CONFLICT);
    let m = r.json::<Value>().await.unwrap()["message"].as_str().unwrap().to_string();
    assert!(m.contains("0 of 4 free") && !m.contains("held by"), "{m}");

    // Admins see the inventory and who holds what; they can share a GPU.
    let report: Value = admin.api(Method::GET, "/hub/api/gpus").send().await.unwrap().json().await.unwrap();
    let gpus = report["gpus"].as_array().unwrap();
    assert_eq!(gpus.len(), 4);
    assert!(gpus.iter().all(|g| g["holders"].as_array().unwrap().len() == 1), "{report}");
    // A user sees the counts, not who holds them (issue 13: `read:gpus`).
    let theirs: Value = ninth.api(Method::GET, "/hub/api/gpus").send().await.unwrap().json().await.unwrap();
    assert_eq!((&theirs["free"], &theirs["held"]), (&json!(0), &json!(4)), "{theirs}");
    assert!(theirs["gpus"].as_array().unwrap().iter().all(|g| g["holders"] == json!([])), "{theirs}");
    let (_, page) = admin.get_text("/hub/authorize").await;
    assert!(page.contains("GPU-a") && page.contains(">Share</button>"));

    // Stopping frees the devices.
    let holder =
        results.iter().zip(&names).find(|((s, _), _)| *s == StatusCode::ACCEPTED).map(|(_, n)| n.clone()).unwrap();
    let r = c
        .delete(format!("{}/hub/api/users/{holder}/server", b.url))
        .header("Authorization", format!("token {token}"))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    let r = ninth.api(Method::POST, "/hub/api/users/nine/server").json(&json!({"gpus": 1})).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED, "a freed GPU can be had again");
}
