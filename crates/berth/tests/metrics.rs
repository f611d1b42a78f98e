//! Issue 13 item 6: `GET /hub/metrics` in Prometheus' text format, checked
//! by the real `promtool`, from the real berth with the real
//! `jupyterhub-singleuser` (local spawner) and the stand-in `nvidia-smi`
//! (tests/common/nvidia.rs) for the GPU readings.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test
mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::nvidia::*;
use common::*;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

const PW: &str = "metrics-pass-42x";

/// `promtool check metrics` on a scrape: (passed, what it said).
fn promtool(text: &str) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; scripts/test installs it)");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

async fn scrape(b: &Browser) -> String {
    let r = b.get("/hub/metrics").await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/plain; version=0.0.4"));
    r.text().await.unwrap()
}

/// The value of the sample whose name and labels are exactly `series`
/// (`name{a="b",c="d"}` as berth writes it).
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')).map(|v| v.parse().unwrap()))
}

fn must(text: &str, series: &str) -> f64 {
    value(text, series).unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

async fn scrape_until(b: &Browser, what: &str, ok: impl Fn(&str) -> bool) -> String {
    let start = std::time::Instant::now();
    loop {
        let t = scrape(b).await;
        if ok(&t) {
            return t;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "timed out waiting for {what}:\n{t}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn metrics_pass_promtool_and_follow_servers_gpus_and_requests() {
    let cmd = singleuser_cmd();
    // GPU-1's name carries the characters the text format must escape.
    let gpus_csv = three_gpus(87).replace(
        "1, GPU-77aa01b2-c3d4-e5f6-a7b8-c9d0e1f2a3b4, NVIDIA A100-SXM4-80GB",
        &format!(r#"1, {GPU1}, NVIDIA "Quoted" \ Board"#),
    );
    assert!(gpus_csv.contains("Quoted"));
    let standin = Standin::new(&gpus_csv, "");
    let b = Berth::start_with(
        &[
            ("BERTH_LOCAL_CMD", &cmd),
            ("BERTH_START_TIMEOUT", "120"),
            ("BERTH_GPU_DEVICES", &format!("{GPU0},{GPU1}")),
            ("BERTH_GPU_SAMPLE_INTERVAL", "1"),
            ("PATH", &standin.path()),
        ],
        &[],
    );
    let (admin, alice) = admin_and_user(&b, "alice", PW).await;

    // Who may read: read:metrics (admins), by session or token; nobody else.
    assert_eq!(
        api_client().get(format!("{}/hub/metrics", b.url)).send().await.unwrap().status(),
        StatusCode::FORBIDDEN
    );
    let r = alice.get("/hub/metrics").await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert!(r.text().await.unwrap().contains("read:metrics"));
    let token_with = |b: &Browser, user: &str, scopes: Value| {
        let b = b.clone();
        let user = user.to_string();
        async move {
            let r = b
                .api(Method::POST, &format!("/hub/api/users/{user}/tokens"))
                .json(&json!({"scopes": scopes}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), StatusCode::CREATED);
            r.json::<Value>().await.unwrap()["token"].as_str().unwrap().to_string()
        }
    };
    let alice_token = token_with(&alice, "alice", json!([])).await;
    let metrics_token = token_with(&admin, "admin", json!(["read:metrics"])).await;
    let with_token =
        |t: &str| api_client().get(format!("{}/hub/metrics", b.url)).header("Authorization", format!("token {t}"));
    assert_eq!(with_token(&alice_token).send().await.unwrap().status(), StatusCode::FORBIDDEN);
    let r = with_token(&metrics_token).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK, "a token with read:metrics alone reads them");

    let before =
        scrape_until(&admin, "a GPU sample", |t| value(t, "berth_gpu_sampler_up").is_some_and(|v| v == 1.0)).await;
    let (ok, said) = promtool(&before);
    assert!(ok, "promtool: {said}\n{before}");
    assert_eq!(must(&before, "jupyterhub_total_users"), 2.0);
    assert_eq!(must(&before, "jupyterhub_running_servers"), 0.0);
    assert!(must(&before, r#"jupyterhub_active_users{period="24h"}"#) >= 1.0, "the admin was just active");
    assert_eq!(must(&before, r#"berth_gpus{state="free"}"#), 2.0);
    let ok_spawns = r#"jupyterhub_server_spawn_duration_seconds_count{status="success",reason=""}"#;
    assert_eq!(must(&before, ok_spawns), 0.0);
    assert_eq!(must(&before, "berth_gpu_queue_length"), 0.0);
    // No holder yet: the readings carry empty holder labels; the quoted name is escaped.
    assert_eq!(
        must(
            &before,
            &format!(r#"berth_gpu_utilization_ratio{{gpu="{GPU0}",name="NVIDIA A100-SXM4-80GB",user="",server=""}}"#)
        ),
        0.87
    );
    assert!(before.contains(r#"name="NVIDIA \"Quoted\" \\ Board""#), "{before}");

    // alice starts with a GPU: the counts move, and the GPU names her.
    let r = alice.api(Method::POST, "/hub/api/users/alice/server").json(&json!({"gpus": 1})).send().await.unwrap();
    assert!(r.status() == StatusCode::ACCEPTED || r.status() == StatusCode::CREATED, "{}", r.status());
    let ready = wait_progress(&alice, "/hub/api/users/alice/server/progress").await;
    assert_eq!(ready["ready"], true, "{ready}\n{}", b.log());
    let gpus: Value = admin.api(Method::GET, "/hub/api/gpus").send().await.unwrap().json().await.unwrap();
    let held = gpus["gpus"].as_array().unwrap().iter().find(|g| g["held"] == true).unwrap();
    let (id, name, util) = if held["id"] == GPU0 {
        (GPU0, "NVIDIA A100-SXM4-80GB", 0.87)
    } else {
        (GPU1, r#"NVIDIA \"Quoted\" \\ Board"#, 0.0)
    };
    let labels = format!(r#"{{gpu="{id}",name="{name}",user="alice",server=""}}"#);
    let during = scrape(&admin).await;
    let (ok, said) = promtool(&during);
    assert!(ok, "promtool: {said}\n{during}");
    assert_eq!(must(&during, "jupyterhub_running_servers"), 1.0);
    assert_eq!(must(&during, ok_spawns), 1.0, "one spawn, observed once");
    assert!(must(&during, r#"jupyterhub_server_spawn_duration_seconds_sum{status="success",reason=""}"#) > 0.0);
    assert_eq!(must(&during, r#"berth_gpus{state="held"}"#), 1.0);
    assert_eq!(must(&during, &format!("berth_gpu_utilization_ratio{labels}")), util, "{during}");
    let (used, total) = if id == GPU0 { (40536.0, 81920.0) } else { (1101.0, 81920.0) };
    assert_eq!(must(&during, &format!("berth_gpu_memory_used_bytes{labels}")), used * 1_048_576.0);
    assert_eq!(must(&during, &format!("berth_gpu_memory_total_bytes{labels}")), total * 1_048_576.0);

    // Requests through the proxy are counted, each once.
    let proxied = must(&during, "berth_proxied_requests_total");
    for _ in 0..3 {
        alice.get("/user/alice/api/status").await;
    }
    let after = scrape(&admin).await;
    assert_eq!(must(&after, "berth_proxied_requests_total"), proxied + 3.0);

    // Stopped: not running, the GPU free again, its readings without a holder.
    let r = alice.api(Method::DELETE, "/hub/api/users/alice/server").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let stopped = scrape(&admin).await;
    assert_eq!(must(&stopped, "jupyterhub_running_servers"), 0.0);
    assert_eq!(must(&stopped, r#"berth_gpus{state="held"}"#), 0.0);
    assert!(value(&stopped, &format!("berth_gpu_utilization_ratio{labels}")).is_none(), "alice no longer holds {id}");
    assert_eq!(must(&stopped, ok_spawns), 1.0);
    let (ok, said) = promtool(&stopped);
    assert!(ok, "promtool: {said}");

    // The driver goes away: no readings (never zeros), the sampler says so.
    std::fs::write(standin.dir().join("fail"), "").unwrap();
    let gone = scrape_until(&admin, "the sampler down", |t| value(t, "berth_gpu_sampler_up") == Some(0.0)).await;
    assert!(!gone.contains("berth_gpu_utilization_ratio{"), "{gone}");
    assert!(promtool(&gone).0);
}

#[tokio::test]
async fn an_allowed_address_reads_without_a_credential_and_headers_do_not_count() {
    // Loopback is not in this list: berth sees the test's 127.0.0.1, whatever it claims.
    let b = Berth::start_with(&[("BERTH_METRICS_ALLOWED_ADDRESSES", "10.0.0.0/8, 192.168.0.0/16")], &[]);
    let c = api_client();
    let r = c
        .get(format!("{}/hub/metrics", b.url))
        .header("X-Forwarded-For", "10.1.2.3")
        .header("X-Real-IP", "10.1.2.3")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    drop(b);

    let b = Berth::start_with(&[("BERTH_METRICS_ALLOWED_ADDRESSES", "10.0.0.0/8,127.0.0.1/32")], &[]);
    let r = c.get(format!("{}/hub/metrics", b.url)).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let text = r.text().await.unwrap();
    assert!(text.contains("# TYPE jupyterhub_running_servers gauge"), "{text}");
    assert!(promtool(&text).0);
    // The same address gets nothing else for it.
    assert_eq!(c.get(format!("{}/hub/api/users", b.url)).send().await.unwrap().status(), StatusCode::FORBIDDEN);

    // A bad list stops berth with exit code 64, naming the key.
    let out = Command::new(BIN)
        .args(["config", "check"])
        .env_remove("BERTH_CONFIG")
        .env("BERTH_METRICS_ALLOWED_ADDRESSES", "10.0.0.0/8,prometheus.internal")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("metrics.allowed_addresses") && err.contains("prometheus.internal"), "{err}");
}
