//! Issue 13, item 4: culling built in, against the real berth binary and
//! real servers (the real `jupyterhub-singleuser` and its kernels, the real
//! OpenSSH client, the Docker engine), with the GPU signal from the stand-in
//! `nvidia-smi`. Timeouts are seconds, so each test takes a minute or less;
//! every wait is bounded.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test
mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::nvidia::*;
use common::*;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

const PW: &str = "cull-pass-42x";
/// Idle timeout and warning (seconds) the tests configure; checks every second.
const TIMEOUT: u64 = 6;
const WARNING: u64 = 4;

fn cull_env() -> Vec<(String, String)> {
    vec![
        ("BERTH_CULL_IDLE_TIMEOUT".into(), TIMEOUT.to_string()),
        ("BERTH_CULL_WARNING".into(), WARNING.to_string()),
        ("BERTH_CULL_INTERVAL".into(), "1".into()),
    ]
}

fn start_berth(env: &[(String, String)]) -> Berth {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    Berth::start_with(&env, &[])
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

fn parse_iso(s: &str) -> i64 {
    berth_web::model::parse_iso(s).unwrap_or_else(|| panic!("not a time: {s}"))
}

/// The user's model of their server `name` (`None`: not running).
async fn server_model(u: &Browser, user: &str, name: &str) -> Option<Value> {
    let r = u.api(Method::GET, &format!("/hub/api/users/{user}")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let v: Value = r.json().await.unwrap();
    v["servers"].get(name).cloned()
}

/// Polls the server's model until `ok` holds on it (or `None` once it stopped), 90 s at most.
async fn model_until(
    b: &Berth,
    u: &Browser,
    user: &str,
    what: &str,
    ok: impl Fn(Option<&Value>) -> bool,
) -> Option<Value> {
    let start = Instant::now();
    loop {
        let m = server_model(u, user, "").await;
        if ok(m.as_ref()) {
            return m;
        }
        assert!(start.elapsed() < Duration::from_secs(90), "timed out waiting for {what}: {m:?}\n{}", b.log());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn cull(m: Option<&Value>) -> Option<&Value> {
    m.map(|m| &m["berth"]["cull"]).filter(|c| c.is_object())
}

/// Waits until the culler has checked the server at least one whole idle
/// timeout and warning after `since` (unix ms): had it been idle since
/// then, it would have been warned and culled by that check.
async fn checked_past_the_window(b: &Berth, u: &Browser, user: &str, since: i64) -> Value {
    let due = since + ((TIMEOUT + WARNING + 2) * 1000) as i64;
    model_until(b, u, user, "a check after the whole window", |m| {
        m.is_none() || cull(m).is_some_and(|c| parse_iso(c["checked_at"].as_str().unwrap()) >= due)
    })
    .await
    .expect("the server still runs")
}

async fn start_default(b: &Berth, u: &Browser, user: &str, options: Value) {
    let r = u.api(Method::POST, &format!("/hub/api/users/{user}/server")).json(&options).send().await.unwrap();
    let status = r.status();
    assert!(status == StatusCode::CREATED || status == StatusCode::ACCEPTED, "{status}: {}", r.text().await.unwrap());
    let ready = wait_progress(u, &format!("/hub/api/users/{user}/server/progress")).await;
    assert_eq!(ready["ready"], true, "{user}'s server did not start: {ready}\n{}", b.log());
}

fn gpus_at(util: u32) -> String {
    format!(
        "0, {GPU0}, NVIDIA A100-SXM4-80GB, {util}, 40536, 81920, 61, 312.45\n\
         1, {GPU1}, NVIDIA A100-SXM4-80GB, {util}, 1101, 81920, 33, 58.02\n"
    )
}

/// Every event of a progress stream, to its end (past the start's final one).
async fn whole_progress(b: &Browser, path: &str) -> Vec<Value> {
    let r = b.api(Method::GET, path).timeout(Duration::from_secs(30)).send().await.unwrap();
    let text = r.text().await.unwrap();
    text.lines().filter_map(|l| l.strip_prefix("data:")).map(|d| serde_json::from_str(d.trim()).unwrap()).collect()
}

#[tokio::test]
async fn a_busy_or_unknown_gpu_is_never_culled_an_idle_one_is_after_a_warning_and_extend() {
    let standin = Standin::new(&gpus_at(87), "");
    let mut env = cull_env();
    env.extend([
        ("BERTH_LOCAL_CMD".to_string(), singleuser_cmd()),
        ("BERTH_GPU_DEVICES".to_string(), format!("{GPU0},{GPU1}")),
        ("BERTH_GPU_SAMPLE_INTERVAL".to_string(), "1".to_string()),
        ("PATH".to_string(), standin.path()),
    ]);
    let b = start_berth(&env);
    let (admin, alice) = admin_and_user(&b, "alice", PW).await;
    start_default(&b, &alice, "alice", json!({"gpus": 1})).await;
    let started = now_ms();

    // Busy at 87 %: no warning however long nothing else happens.
    let m = checked_past_the_window(&b, &alice, "alice", started).await;
    let c = cull(Some(&m)).unwrap();
    assert_eq!(c["cull_at"], Value::Null, "{m}");
    assert!(c["active"].to_string().contains("at 87 %"), "{c}");
    assert_eq!(c["idle_timeout_seconds"], TIMEOUT);
    assert_eq!(m["ready"], true);

    // The driver goes away: utilisation unknown, which is no idleness.
    std::fs::write(standin.dir().join("fail"), "").unwrap();
    let failed = now_ms();
    model_until(&b, &alice, "alice", "the GPU signal unknown", |m| {
        cull(m).is_some_and(|c| c["unknown"].to_string().contains("utilisation unknown"))
    })
    .await;
    let m = checked_past_the_window(&b, &alice, "alice", failed).await;
    let c = cull(Some(&m)).unwrap();
    assert_eq!(c["cull_at"], Value::Null, "missing GPU data never leads to a cull: {m}");
    assert!(c["unknown"].to_string().contains("couldn't communicate with the NVIDIA driver"), "{c}");

    // Back, and idle: the owner is warned, on the model, the pages and the progress stream.
    standin.write(&gpus_at(0), "");
    std::fs::remove_file(standin.dir().join("fail")).unwrap();
    let m = model_until(&b, &alice, "alice", "a cull warning", |m| cull(m).is_some_and(|c| c["cull_at"].is_string()))
        .await
        .unwrap();
    let c = cull(Some(&m)).unwrap();
    assert!(c["reason"].as_str().unwrap().starts_with("idle for"), "{c}");
    assert_eq!(c["extendable"], true);
    assert_eq!(c["extend_url"], "/hub/api/users/alice/server/extend");
    let (_, home) = alice.get_text("/hub/home").await;
    assert!(home.contains(r#"id="cull-warning-""#) && home.contains("will be stopped at"), "{home}");
    assert!(home.contains(r#"action="/hub/extend/alice""#) && home.contains(">Extend</button>"), "{home}");
    let (_, tokens) = alice.get_text("/hub/token").await;
    assert!(tokens.contains(r#"id="cull-warning-""#), "the banner is on every hub page of the owner's");
    let (_, admin_home) = admin.get_text("/hub/home").await;
    assert!(!admin_home.contains("cull-warning"), "and nobody else's");
    let events = whole_progress(&alice, "/hub/api/users/alice/server/progress").await;
    let warning = events.iter().find(|e| e.get("cull_at_ms").is_some()).unwrap_or_else(|| panic!("{events:?}"));
    assert!(warning["message"].as_str().unwrap().contains("berth stops this server in"), "{warning}");

    // Extend (the API call) ends the warning; the page's button does the same.
    let r = alice.api(Method::POST, "/hub/api/users/alice/server/extend").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["cull"]["cull_at"], Value::Null, "{v}");
    let extended = now_ms();
    let m = server_model(&alice, "alice", "").await.unwrap();
    assert_eq!(cull(Some(&m)).unwrap()["cull_at"], Value::Null, "{m}");
    // Someone else may not extend it.
    let bob = authorized_user(&b, &admin, "bob", PW).await;
    let r = bob.api(Method::POST, "/hub/api/users/alice/server/extend").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);

    // Idle again: warned again, then culled; stopped through the normal stop.
    let m = model_until(&b, &alice, "alice", "the next warning", |m| cull(m).is_some_and(|c| c["cull_at"].is_string()))
        .await
        .unwrap();
    let warned_at = parse_iso(cull(Some(&m)).unwrap()["checked_at"].as_str().unwrap());
    assert!(warned_at >= extended + ((TIMEOUT - WARNING) * 1000) as i64 - 1500, "Extend pushed the cull back");
    model_until(&b, &alice, "alice", "the cull", |m| m.is_none()).await;
    let stopped = now_ms();
    assert!(stopped >= warned_at + (WARNING * 1000) as i64 - 1500, "the whole warning was given");
    let gpus: Value = admin.api(Method::GET, "/hub/api/gpus").send().await.unwrap().json().await.unwrap();
    assert_eq!(gpus["held"], 0, "its GPU is free again: {gpus}");
    let (_, home) = alice.get_text("/hub/home").await;
    assert!(home.contains(r#"id="culled-""#) && home.contains("idle for"), "{home}");
    let (_, users) = admin.get_text("/hub/authorize").await;
    let culls = users.split(r#"id="culls""#).nth(1).expect("the admin page lists culls");
    assert!(culls.contains("<td>alice</td>") && culls.contains("idle for"), "{culls}");
    assert!(b.log().contains("culling the server"), "{}", b.log());
}

#[tokio::test]
async fn a_busy_kernel_keeps_its_server_and_once_idle_the_server_is_culled() {
    let mut env = cull_env();
    env.push(("BERTH_LOCAL_CMD".into(), singleuser_cmd()));
    let b = start_berth(&env);
    let (_admin, alice) = admin_and_user(&b, "alice", PW).await;
    start_default(&b, &alice, "alice", json!({})).await;
    oauth_login(&alice, "alice").await;
    let kernel = kernel::start(&alice, "alice").await;
    let sleep = TIMEOUT + WARNING + 8;
    kernel::execute_nowait(&alice, "alice", &kernel, &format!("import time; time.sleep({sleep})")).await;
    let sent = now_ms();

    let m = checked_past_the_window(&b, &alice, "alice", sent).await;
    let c = cull(Some(&m)).unwrap();
    assert_eq!(c["cull_at"], Value::Null, "a busy kernel keeps its server: {m}");
    assert!(c["active"].to_string().contains("a kernel is busy"), "{c}");
    assert_eq!(c["unknown"], json!([]), "the kernels were read: {c}");
    // berth's last_activity counts the kernel too (what an external culler reads).
    assert!(parse_iso(m["last_activity"].as_str().unwrap()) > sent, "{m}");

    // The cell ends; with nothing else going on the server is culled.
    model_until(&b, &alice, "alice", "the cull after the kernel went idle", |m| m.is_none()).await;
    assert!(now_ms() >= sent + (sleep * 1000) as i64, "not before the kernel was done");
    let (_, home) = alice.get_text("/hub/home").await;
    assert!(home.contains(r#"id="culled-""#), "{home}");
}

/// A child process killed when dropped.
struct Kill(std::process::Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn an_open_ssh_session_keeps_its_server_and_closing_it_lets_the_culler_act() {
    let mut env = cull_env();
    env.push(("BERTH_LOCAL_CMD".into(), singleuser_cmd()));
    env.push(("BERTH_SSH_BIND".into(), "127.0.0.1:0".into()));
    let b = start_berth(&env);
    let (_admin, alice) = admin_and_user(&b, "alice", PW).await;
    let tmp = tempfile::tempdir().unwrap();
    let Key { private: key, public } = keygen(tmp.path(), "id_cull");
    let r = alice.api(Method::POST, "/hub/api/users/alice/keys").json(&json!({"key": public})).send().await.unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    start_default(&b, &alice, "alice", json!({})).await;

    let port = b.ssh_addr.as_ref().expect("the SSH gateway is on").rsplit(':').next().unwrap().to_string();
    // ssh itself (no `timeout` wrapper, whose kill would leave ssh running);
    // the guard kills it if the test fails first, `sleep 100` bounds it anyway.
    let mut ssh = Kill(
        Command::new("ssh")
            .args(["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"])
            .args([
                "-o",
                "LogLevel=ERROR",
                "-o",
                "IdentityAgent=none",
                "-o",
                "IdentitiesOnly=yes",
                "-o",
                "BatchMode=yes",
            ])
            .arg("-i")
            .arg(&key)
            .args(["-p", &port, "alice@127.0.0.1", "sleep 100"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let opened = now_ms();
    model_until(&b, &alice, "alice", "the SSH session counted", |m| {
        cull(m).is_some_and(|c| c["active"].to_string().contains("an SSH session is open"))
    })
    .await;
    let m = checked_past_the_window(&b, &alice, "alice", opened).await;
    let c = cull(Some(&m)).unwrap();
    assert_eq!(c["cull_at"], Value::Null, "an open SSH session keeps its server: {m}");
    assert!(c["active"].to_string().contains("an SSH session is open"), "{c}");

    // The session ends: the idle window starts then, and the server is culled.
    let _ = ssh.0.kill();
    let _ = ssh.0.wait();
    let closed = now_ms();
    model_until(&b, &alice, "alice", "the SSH session gone", |m| {
        cull(m).is_some_and(|c| !c["active"].to_string().contains("SSH"))
    })
    .await;
    model_until(&b, &alice, "alice", "the cull", |m| m.is_none()).await;
    assert!(now_ms() >= closed + (TIMEOUT * 1000) as i64 - 1500, "counted from the session's end");
}

#[tokio::test]
async fn a_culled_container_is_stopped_gracefully_and_keeps_its_volumes() {
    let image = test_image();
    let scope = DockerScope::new();
    let mut env = scope.env(&image);
    env.extend(cull_env());
    let b = start_berth(&env);
    let name = scope.user("cu");
    let (admin, u) = admin_and_user(&b, &name, PW).await;
    start_default(&b, &u, &name, json!({})).await;
    let container = format!("berth-{name}");
    let st = Command::new("docker")
        .args(["exec", &container, "sh", "-c", "echo kept-through-the-cull > /home/kept.txt"])
        .status()
        .unwrap();
    assert!(st.success());

    model_until(&b, &u, &name, "the cull", |m| m.is_none()).await;
    let inspect = docker_inspect(&container);
    assert!(inspect.as_ref().is_none_or(|c| c["State"]["Running"] == false), "the container is stopped: {inspect:?}");
    let vols = Command::new("docker")
        .args(["volume", "ls", "-q", "--filter", &format!("label=berth.user={name}")])
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&vols.stdout).trim().is_empty(), "the volumes are kept");
    let (_, users) = admin.get_text("/hub/authorize").await;
    assert!(users.split(r#"id="culls""#).nth(1).unwrap().contains("idle for"), "{users}");

    // Started again, the file is there.
    start_default(&b, &u, &name, json!({})).await;
    let out = Command::new("docker").args(["exec", &container, "cat", "/home/kept.txt"]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "kept-through-the-cull");
}

#[tokio::test]
async fn jupyterhub_idle_culler_stops_idle_servers_through_the_rest_api() {
    let venv = Path::new(&singleuser_cmd()).parent().unwrap().parent().unwrap().to_path_buf();
    let python = venv.join("bin/python");
    let has = Command::new(&python).args(["-c", "import jupyterhub_idle_culler"]).status().unwrap();
    assert!(has.success(), "jupyterhub-idle-culler is not in {}: run the tests through scripts/test", venv.display());
    // berth's own culler stays off: the external one does the work.
    let b = Berth::start_with(&[("BERTH_LOCAL_CMD", &singleuser_cmd())], &[]);
    let (admin, alice) = admin_and_user(&b, "alice", PW).await;
    let bob = authorized_user(&b, &admin, "bob", PW).await;
    start_default(&b, &alice, "alice", json!({})).await;
    start_default(&b, &bob, "bob", json!({})).await;
    // The scopes its documentation asks for, and no more.
    let scopes = ["list:users", "read:users:activity", "read:servers", "delete:servers"];
    let r =
        admin.api(Method::POST, "/hub/api/users/admin/tokens").json(&json!({"scopes": scopes})).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let token = r.json::<Value>().await.unwrap()["token"].as_str().unwrap().to_string();

    let log = tempfile::NamedTempFile::new().unwrap();
    let mut culler = Command::new("timeout")
        .arg("120")
        .arg(&python)
        .args(["-m", "jupyterhub_idle_culler", &format!("--url={}/hub/api", b.url)])
        // One user per page: the pagination's next links are followed.
        .args(["--timeout=4", "--cull-every=2", "--api-page-size=1"])
        .env("JUPYTERHUB_API_TOKEN", &token)
        .stdout(Stdio::null())
        .stderr(log.reopen().unwrap())
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        let a = server_model(&alice, "alice", "").await;
        let bo = server_model(&bob, "bob", "").await;
        if a.is_none() && bo.is_none() {
            break;
        }
        let text = std::fs::read_to_string(log.path()).unwrap_or_default();
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "not culled: {a:?} {bo:?}\nculler:\n{text}\nberth:\n{}",
            b.log()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let _ = culler.kill();
    let _ = culler.wait();
    let text = std::fs::read_to_string(log.path()).unwrap();
    assert!(text.contains("Culling server alice") && text.contains("Culling server bob"), "{text}");
    assert!(text.contains("Fetching page 2"), "it followed the next page: {text}");
    assert!(!text.contains("Traceback") && !text.contains("Error processing"), "{text}");
}
