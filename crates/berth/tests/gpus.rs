//! Issue 13, telemetry and where it is shown, without a GPU: a stand-in
//! `nvidia-smi` on berth's `PATH` prints what the real tool prints for the
//! sampler's two queries (`--format=csv,noheader,nounits`), reading its lines
//! from files the test writes. The processes it reports are real: host PIDs
//! of processes in real containers, so attribution (PID → cgroup →
//! container → labels → user and server) runs for real.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test
mod common;

use std::time::Duration;

use common::nvidia::*;
use common::*;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

const PW: &str = "gpus-pass-42x";
async fn api_json(b: &Browser, path: &str) -> Value {
    let r = b.api(Method::GET, path).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK, "{path}");
    r.json().await.unwrap()
}

/// Polls `GET /hub/api/gpus` as `b` until `ok` holds (30 s at most).
async fn gpus_until(b: &Browser, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let start = std::time::Instant::now();
    loop {
        let v = api_json(b, "/hub/api/gpus").await;
        if ok(&v) {
            return v;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "timed out waiting for {what}: {v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn gpu<'a>(v: &'a Value, id: &str) -> &'a Value {
    v["gpus"].as_array().unwrap().iter().find(|g| g["id"] == id).unwrap_or_else(|| panic!("{id} in {v}"))
}

/// Starts `name`'s default server through the API and waits until it runs.
async fn start_server(b: &Berth, u: &Browser, name: &str) {
    let r = u.api(Method::POST, &format!("/hub/api/users/{name}/server")).json(&json!({})).send().await.unwrap();
    let status = r.status();
    if status != StatusCode::CREATED {
        assert_eq!(status, StatusCode::ACCEPTED, "start {name}: {}", r.text().await.unwrap_or_default());
        let ready = wait_progress(u, &format!("/hub/api/users/{name}/server/progress")).await;
        assert_eq!(ready["ready"], true, "{name}'s server did not start: {ready}\n{}", b.log());
    }
}

#[tokio::test]
async fn gpu_memory_of_container_processes_is_attributed_to_their_user_and_server() {
    let image = test_image();
    let scope = DockerScope::new();
    let standin = Standin::new(&three_gpus(87), "");
    let mut env = scope.env(&image);
    env.extend([
        ("PATH".to_string(), standin.path()),
        // Ids to hand out, as on a machine whose engine has no nvidia runtime;
        // the servers here ask for none, so no device request reaches the engine.
        ("BERTH_GPU_DEVICES".to_string(), format!("{GPU0},{GPU1},{GPU2}")),
        ("BERTH_GPU_SAMPLE_INTERVAL".to_string(), "1".to_string()),
    ]);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let b = Berth::start_with(&env, &[]);
    let alice_name = scope.user("al");
    let bob_name = scope.user("bo");
    let (admin, alice) = admin_and_user(&b, &alice_name, PW).await;
    let bob = authorized_user(&b, &admin, &bob_name, PW).await;
    start_server(&b, &alice, &alice_name).await;
    start_server(&b, &bob, &bob_name).await;
    let alice_pid = host_pid(&format!("berth-{alice_name}"));
    let bob_pid = host_pid(&format!("berth-{bob_name}"));
    // A process of the host, outside any container: reported, owned by nobody.
    let host = std::process::id();
    standin
        .write(&three_gpus(87), &format!("{GPU0}, {alice_pid}, 20480\n{GPU1}, {bob_pid}, 1024\n{GPU1}, {host}, 77\n"));

    let report = gpus_until(&admin, "the sampler attributes both containers' processes", |r| {
        gpu(r, GPU1)["processes"].as_array().is_some_and(|p| p.len() == 2)
            && gpu(r, GPU0)["processes"][0]["user"] == alice_name.as_str()
    })
    .await;
    assert_eq!(report["sampler"]["state"], "ok", "{report}");
    assert_eq!(report["sampler"]["source"], "nvidia-smi");
    let g0 = gpu(&report, GPU0);
    assert_eq!(
        (&g0["utilization_percent"], &g0["memory_used_mib"], &g0["memory_total_mib"], &g0["temperature_c"]),
        (&json!(87), &json!(40536), &json!(81920), &json!(61)),
        "{g0}"
    );
    assert_eq!(g0["power_w"], 312.45);
    assert_eq!(g0["processes"], json!([{"pid": alice_pid, "memory_mib": 20480, "user": alice_name, "server": ""}]));
    let g1 = gpu(&report, GPU1);
    let procs = g1["processes"].as_array().unwrap();
    assert!(procs.contains(&json!({"pid": bob_pid, "memory_mib": 1024, "user": bob_name, "server": ""})), "{g1}");
    assert!(procs.contains(&json!({"pid": host, "memory_mib": 77, "user": null, "server": null})), "{g1}");
    assert_eq!(gpu(&report, GPU2)["power_w"], Value::Null, "[N/A] is no reading");
    assert_eq!(report["holders_visible"], true);

    // alice sees her own process, and bob's memory but neither his PID nor his name.
    let mine = api_json(&alice, "/hub/api/gpus").await;
    assert_eq!(mine["holders_visible"], false);
    assert_eq!(gpu(&mine, GPU0)["processes"][0]["user"], alice_name.as_str());
    assert_eq!(gpu(&mine, GPU0)["processes"][0]["pid"], alice_pid);
    let others: Vec<&Value> = gpu(&mine, GPU1)["processes"].as_array().unwrap().iter().collect();
    assert_eq!(others.len(), 2);
    assert!(others.iter().all(|p| p["user"].is_null() && p["pid"].is_null()), "{others:?}");
    assert!(!mine.to_string().contains(&bob_name), "alice's view names bob: {mine}");
    assert_eq!(gpu(&mine, GPU0)["utilization_percent"], 87, "everyone sees utilisation");
}

#[tokio::test]
async fn users_see_counts_and_their_own_gpus_admins_see_every_holder() {
    let standin = Standin::new(
        // One malformed line among the good ones: skipped and logged.
        &format!("{}0, GPU-broken, Tesla T4, lots, 1, 2, 3, 4\n", three_gpus(87)),
        "",
    );
    let b = Berth::start_with(
        &[
            // Local processes that never listen hold their GPUs while "starting".
            ("BERTH_LOCAL_CMD", "sleep 607"),
            ("BERTH_START_TIMEOUT", "120"),
            ("BERTH_GPU_DEVICES", &format!("{GPU0},{GPU1},{GPU2}")),
            ("BERTH_GPU_SAMPLE_INTERVAL", "1"),
            ("PATH", &standin.path()),
        ],
        &[],
    );
    let (admin, alice) = admin_and_user(&b, "alice", PW).await;
    let bob = authorized_user(&b, &admin, "bob", PW).await;
    let carol = authorized_user(&b, &admin, "carol", PW).await;
    for (u, name) in [(&alice, "alice"), (&bob, "bob")] {
        let r = u.api(Method::POST, &format!("/hub/api/users/{name}/server")).json(&json!({"gpus": 1})).send().await;
        assert_eq!(r.unwrap().status(), StatusCode::ACCEPTED, "{name} starts with a GPU");
    }
    gpus_until(&admin, "a sample", |v| v["sampler"]["state"] == "ok").await;

    let all = api_json(&admin, "/hub/api/gpus").await;
    assert_eq!((&all["total"], &all["free"], &all["held"]), (&json!(3), &json!(1), &json!(2)), "{all}");
    let mut holders: Vec<String> = all["gpus"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["holders"].as_array().unwrap().iter().map(|h| h.as_str().unwrap().to_string()))
        .collect();
    holders.sort();
    assert_eq!(holders, ["alice", "bob"]);
    assert_eq!(all["gpus"].as_array().unwrap().len(), 3, "the malformed line is no GPU: {all}");
    assert!(b.log().contains("skipped a malformed line from nvidia-smi"), "{}", b.log());
    assert!(b.log().contains("GPU-broken"), "the log names the line");

    // alice: counts and utilisation for all, her own holder name only.
    let mine = api_json(&alice, "/hub/api/gpus").await;
    assert_eq!((&mine["free"], &mine["held"]), (&json!(1), &json!(2)));
    let held: Vec<&Value> = mine["gpus"].as_array().unwrap().iter().filter(|g| g["held"] == true).collect();
    assert_eq!(held.len(), 2);
    let names: Vec<&Value> = held.iter().flat_map(|g| g["holders"].as_array().unwrap()).collect();
    assert_eq!(names, [&json!("alice")], "{mine}");
    assert!(held.iter().all(|g| g["holder_count"] == 1));
    assert!(!mine.to_string().contains("bob"), "{mine}");
    // A token sees holders as far as its scopes let it read servers: one that
    // inherits alice's (no scopes asked: JupyterHub's `inherit`) sees hers; one
    // that may only report activity sees the counts and no holder at all.
    let view_with = |scopes: Value| {
        let (alice, url) = (&alice, b.url.clone());
        async move {
            let t = alice.api(Method::POST, "/hub/api/users/alice/tokens").json(&json!({"scopes": scopes})).send();
            let token = t.await.unwrap().json::<Value>().await.unwrap()["token"].as_str().unwrap().to_string();
            let r = api_client()
                .get(format!("{url}/hub/api/gpus"))
                .header("Authorization", format!("token {token}"))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), StatusCode::OK);
            r.json::<Value>().await.unwrap()
        }
    };
    let holders = |v: &Value| -> Vec<String> {
        v["gpus"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|g| g["holders"].as_array().unwrap().clone())
            .map(|h| h.as_str().unwrap().to_string())
            .collect()
    };
    let inherited = view_with(json!([])).await;
    assert_eq!(holders(&inherited), ["alice"], "{inherited}");
    let narrow = view_with(json!(["users:activity!user=alice"])).await;
    assert_eq!((&narrow["free"], &narrow["held"]), (&json!(1), &json!(2)), "{narrow}");
    assert!(holders(&narrow).is_empty() && !narrow.to_string().contains("bob"), "{narrow}");
    assert_eq!(
        api_client().get(format!("{}/hub/api/gpus", b.url)).send().await.unwrap().status(),
        StatusCode::FORBIDDEN
    );

    // Pages: carol's start page counts before she picks; alice's server card
    // shows its GPU's readings; the admin card shows holders, use and idleness.
    let (_, page) = carol.get_text("/hub/home").await;
    assert!(page.contains(r#"<p id="gpu-counts">GPUs: <b>1 free</b>, 2 held, of 3."#), "{page}");
    let (_, page) = alice.get_text("/hub/home").await;
    let card = page.split(r#"id="gpus-""#).nth(1).expect("alice's server card lists its GPUs");
    assert!(card.contains("NVIDIA A100-SXM4-80GB") && card.contains("81920 MiB"), "{card}");
    assert!(!page.contains("bob"));
    let (_, page) = admin.get_text("/hub/authorize").await;
    assert!(page.contains("87 % · 40536 / 81920 MiB · 61 °C · 312 W"), "{page}");
    assert!(page.contains(">alice<") && page.contains(">bob<"), "{page}");
    assert!(page.contains("Utilisation from nvidia-smi"), "{page}");
    // GPU-1 reads 0 %: idle, for a time the page shows; GPU-0 at 87 % is not.
    let row = |id: &str| {
        page.split(&format!(r#"<tr id="gpu-{id}">"#)).nth(1).unwrap().split("</tr>").next().unwrap().to_string()
    };
    assert!(row(GPU1).contains(" s</td>"), "{}", row(GPU1));
    assert!(row(GPU0).contains("<td>—</td>"), "{}", row(GPU0));
    assert!(row(GPU0).contains("exclusive"));
}

#[tokio::test]
async fn a_missing_or_failing_nvidia_smi_means_unknown_and_berth_keeps_serving() {
    let standin = Standin::new(&three_gpus(50), "");
    let b = Berth::start_with(
        &[
            ("BERTH_GPU_DEVICES", &format!("{GPU0},{GPU1},{GPU2}")),
            ("BERTH_GPU_SAMPLE_INTERVAL", "1"),
            ("PATH", &standin.path()),
        ],
        &[],
    );
    let admin = b.first_admin().await;
    let state = |v: &Value| v["sampler"]["state"].as_str().unwrap_or("").to_string();
    gpus_until(&admin, "a sample", |v| state(v) == "ok").await;

    // The driver goes away: nvidia-smi fails as it then does.
    std::fs::write(standin.dir().join("fail"), "").unwrap();
    let v = gpus_until(&admin, "utilisation unknown", |v| state(v) == "unknown").await;
    assert!(v["sampler"]["reason"].as_str().unwrap().contains("couldn't communicate with the NVIDIA driver"), "{v}");
    assert!(v["gpus"].as_array().unwrap().iter().all(|g| g["utilization_percent"].is_null()), "{v}");
    assert_eq!(v["total"], 3, "the inventory stays");
    let (status, page) = admin.get_text("/hub/authorize").await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains("utilisation unknown") && page.contains("Utilisation unknown (nvidia-smi)"), "{page}");

    // nvidia-smi vanishes altogether.
    std::fs::remove_file(standin.dir().join("fail")).unwrap();
    std::fs::remove_file(standin.script()).unwrap();
    gpus_until(&admin, "no nvidia-smi", |v| {
        v["sampler"]["reason"].as_str().is_some_and(|r| r.contains("no nvidia-smi on PATH"))
    })
    .await;
    assert_eq!(admin.get("/hub/home").await.status(), StatusCode::OK, "berth keeps serving");
    assert_eq!(api_json(&admin, "/hub/api/user").await["name"], "admin");

    // It comes back: so do the readings.
    standin.install();
    gpus_until(&admin, "readings again", |v| state(v) == "ok" && gpu(v, GPU0)["utilization_percent"] == 50).await;
    assert!(b.log().contains("GPU utilisation unknown") && b.log().contains("GPU telemetry is back"), "{}", b.log());
}

const MIG_A: &str = "MIG-1f2e3d4c-5b6a-5980-a1b2-c3d4e5f60718";
const MIG_B: &str = "MIG-9a8b7c6d-5e4f-5321-b0a1-f2e3d4c5b6a7";

/// Builds the NVML stand-in (`tests/fixtures/fake_nvml.c`: NVML's ABI,
/// readings from the file `BERTH_FAKE_NVML_DATA` names) into `dir`.
fn fake_nvml(dir: &std::path::Path) -> std::path::PathBuf {
    let so = dir.join("libnvidia-ml.so.1");
    let src = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/fake_nvml.c");
    let out = std::process::Command::new("cc")
        .args(["-shared", "-fPIC", "-O1", "-Wall", "-Werror", "-o"])
        .arg(&so)
        .arg(src)
        .output()
        .expect("cc");
    assert!(out.status.success(), "building the NVML stand-in: {}", String::from_utf8_lossy(&out.stderr));
    so
}

fn write_atomically(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test]
async fn the_nvml_sampler_reads_the_library_with_mig_instances_and_attributes_processes() {
    let image = test_image();
    let scope = DockerScope::new();
    let dir = tempfile::tempdir().unwrap();
    let so = fake_nvml(dir.path());
    let data = dir.path().join("nvml.txt");
    // GPU 0 whole; GPU 1 in MIG mode with two instances (the units handed out).
    let devices = format!(
        "gpu {GPU0} 87 42505076736 85899345920 61 312450 NVIDIA A100-SXM4-80GB\n\
         gpu {GPU1} 0 0 85899345920 33 58020 NVIDIA A100-SXM4-80GB\n\
         mig 1 {MIG_A} 1073741824 42949672960 NVIDIA A100-SXM4-80GB MIG 3g.40gb\n\
         mig 1 {MIG_B} 0 42949672960 NVIDIA A100-SXM4-80GB MIG 3g.40gb\n"
    );
    write_atomically(&data, &devices);
    let mut env = scope.env(&image);
    env.extend([
        // `auto` (the default) loads NVML when it can; no nvidia-smi is on PATH.
        ("BERTH_NVML_LIBRARY".to_string(), so.display().to_string()),
        ("BERTH_FAKE_NVML_DATA".to_string(), data.display().to_string()),
        ("BERTH_GPU_DEVICES".to_string(), format!("{GPU0},{MIG_A},{MIG_B}")),
        ("BERTH_GPU_SAMPLE_INTERVAL".to_string(), "1".to_string()),
    ]);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let b = Berth::start_with(&env, &[]);
    let alice_name = scope.user("al");
    let (admin, alice) = admin_and_user(&b, &alice_name, PW).await;
    start_server(&b, &alice, &alice_name).await;
    let pid = host_pid(&format!("berth-{alice_name}"));
    let host = std::process::id();
    write_atomically(
        &data,
        &format!("{devices}app {GPU0} {pid} 21474836480\napp {MIG_A} {pid} 1073741824\napp {GPU0} {host} 80740352\n"),
    );

    let r = gpus_until(&admin, "NVML's processes attributed", |r| {
        gpu(r, MIG_A)["processes"][0]["user"] == alice_name.as_str()
            && gpu(r, GPU0)["processes"].as_array().is_some_and(|p| p.len() == 2)
    })
    .await;
    assert_eq!((&r["sampler"]["source"], &r["sampler"]["state"]), (&json!("nvml"), &json!("ok")), "{r}");
    let g0 = gpu(&r, GPU0);
    assert_eq!(
        (&g0["utilization_percent"], &g0["memory_used_mib"], &g0["memory_total_mib"], &g0["temperature_c"]),
        (&json!(87), &json!(40536), &json!(81920), &json!(61)),
        "{g0}"
    );
    assert_eq!(g0["power_w"], 312.45);
    let procs = g0["processes"].as_array().unwrap();
    assert!(procs.contains(&json!({"pid": pid, "memory_mib": 20480, "user": alice_name, "server": ""})), "{g0}");
    assert!(procs.contains(&json!({"pid": host, "memory_mib": 77, "user": null, "server": null})), "{g0}");
    let a = gpu(&r, MIG_A);
    assert_eq!(a["name"], "NVIDIA A100-SXM4-80GB MIG 3g.40gb", "{a}");
    assert_eq!((&a["memory_used_mib"], &a["memory_total_mib"]), (&json!(1024), &json!(40960)), "{a}");
    assert_eq!(a["utilization_percent"], Value::Null, "NVML reports no utilisation for a MIG instance");
    assert_eq!(a["idle_seconds"], Value::Null, "so it is never taken for idle");
    assert_eq!(gpu(&r, MIG_B)["processes"], json!([]));

    // The driver goes away: unknown, with NVML's reason; berth keeps serving; back again after.
    std::fs::remove_file(&data).unwrap();
    let r = gpus_until(&admin, "unknown", |r| r["sampler"]["state"] == "unknown").await;
    assert!(r["sampler"]["reason"].as_str().unwrap().contains("NVIDIA driver is not loaded"), "NVML's own reason: {r}");
    assert_eq!(gpu(&r, GPU0)["utilization_percent"], Value::Null);
    write_atomically(&data, &devices);
    gpus_until(&admin, "readings again", |r| gpu(r, GPU0)["utilization_percent"] == 87).await;
}

#[tokio::test]
async fn an_nvml_sampler_without_the_library_says_why_and_berth_serves() {
    let b = Berth::start_with(
        &[
            ("BERTH_GPU_SAMPLER", "nvml"),
            ("BERTH_NVML_LIBRARY", "/nonexistent/libnvidia-ml.so.1"),
            ("BERTH_GPU_DEVICES", GPU0),
            ("BERTH_GPU_SAMPLE_INTERVAL", "1"),
        ],
        &[],
    );
    let admin = b.first_admin().await;
    let r = gpus_until(&admin, "unknown", |r| r["sampler"]["state"] == "unknown").await;
    assert_eq!(r["sampler"]["source"], "nvml");
    let why = r["sampler"]["reason"].as_str().unwrap();
    assert!(why.starts_with("NVML could not be loaded from /nonexistent/libnvidia-ml.so.1"), "{why}");
    assert_eq!((&r["total"], &r["free"]), (&json!(1), &json!(1)), "the inventory still counts");
}

/// `berth gpus sample` (what scripts/gpu-check compares on a GPU machine):
/// the same readings through NVML and through nvidia-smi, and a clear
/// error when the library is missing.
#[test]
fn berth_gpus_sample_reads_through_nvml_and_nvidia_smi() {
    let dir = tempfile::tempdir().unwrap();
    let so = fake_nvml(dir.path());
    let data = dir.path().join("nvml.txt");
    write_atomically(&data, &format!("gpu {GPU0} 87 42505076736 85899345920 61 312450 NVIDIA A100-SXM4-80GB\n"));
    let standin = Standin::new(&format!("0, {GPU0}, NVIDIA A100-SXM4-80GB, 87, 40536, 81920, 61, 312.45\n"), "");
    let data_dir = tempfile::tempdir().unwrap();
    let run = |sampler: &str, library: &str| {
        std::process::Command::new(BIN)
            .args(["gpus", "sample", "--json", "--sampler", sampler, "--data-dir"])
            .arg(data_dir.path())
            .env("BERTH_NVML_LIBRARY", library)
            .env("BERTH_FAKE_NVML_DATA", &data)
            .env("PATH", standin.path())
            .output()
            .unwrap()
    };
    let mut seen = Vec::new();
    for sampler in ["nvml", "nvidia-smi"] {
        let out = run(sampler, &so.display().to_string());
        assert!(out.status.success(), "{sampler}: {}", String::from_utf8_lossy(&out.stderr));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["source"], sampler);
        seen.push(v["gpus"].clone());
    }
    assert_eq!(seen[0], seen[1], "NVML and nvidia-smi read the same");
    assert_eq!(seen[0][0]["memory_total_mib"], 81920);
    let out = run("nvml", "/nonexistent/libnvidia-ml.so.1");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("NVML could not be loaded from /nonexistent/libnvidia-ml.so.1"), "{err}");
}
