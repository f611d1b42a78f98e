//! Issue 13 item 5: GPU-hours and server-hours from the real berth, with the
//! real `jupyterhub-singleuser` (local spawner) holding a configured GPU id.
//! The arithmetic over periods is unit-tested in `berth_hub::usage`; here
//! seconds of real usage, a quota of 0.0003 GPU-hours (1.08 s), crashes.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test
mod common;

use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

const PW: &str = "usage-pass-42x";
const GPU: &str = "GPU-0a1b2c3d-0000-4000-8000-00000000usage";

fn now_s() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

fn env() -> Vec<(String, String)> {
    vec![
        ("BERTH_LOCAL_CMD".into(), singleuser_cmd()),
        ("BERTH_START_TIMEOUT".into(), "120".into()),
        ("BERTH_GPU_DEVICES".into(), GPU.into()),
    ]
}

fn refs(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

async fn usage(b: &Browser, user: &str) -> Value {
    let r = b.api(Method::GET, &format!("/hub/api/users/{user}/usage")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    r.json().await.unwrap()
}

/// This period's GPU and server seconds.
fn seconds(u: &Value) -> (f64, f64) {
    let p = &u["periods"][0];
    assert_eq!(p["current"], true, "{u}");
    (p["gpu_hours"].as_f64().unwrap() * 3600.0, p["server_hours"].as_f64().unwrap() * 3600.0)
}

/// Starts `user`'s default server with `gpus` and waits until it runs.
async fn start(b: &Berth, u: &Browser, user: &str, gpus: u32) {
    let r = u
        .api(Method::POST, &format!("/hub/api/users/{user}/server"))
        .json(&json!({"gpus": gpus}))
        .send()
        .await
        .unwrap();
    let status = r.status();
    assert!(
        status == StatusCode::ACCEPTED || status == StatusCode::CREATED,
        "start: {status} {}",
        r.text().await.unwrap()
    );
    let ready = wait_progress(u, &format!("/hub/api/users/{user}/server/progress")).await;
    assert_eq!(ready["ready"], true, "{ready}\n{}", b.log());
}

async fn stop(u: &Browser, user: &str) {
    let r = u.api(Method::DELETE, &format!("/hub/api/users/{user}/server")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
}

/// Unix seconds of an RFC 3339 time, by the system's `date`.
fn epoch_s(iso: &str) -> f64 {
    let out = Command::new("date").args(["-u", "-d", iso, "+%s.%N"]).output().unwrap();
    String::from_utf8(out.stdout).unwrap().trim().parse().unwrap()
}

/// `2027-01-01`: the first day of next month (UTC), by the system's `date`.
fn first_of_next_month() -> String {
    let this = Command::new("date").args(["-u", "+%Y-%m-01"]).output().unwrap();
    let this = String::from_utf8(this.stdout).unwrap();
    let next =
        Command::new("date").args(["-u", "-d", &format!("{} +1 month", this.trim()), "+%Y-%m-%d"]).output().unwrap();
    String::from_utf8(next.stdout).unwrap().trim().to_string()
}

/// Hours as berth's messages print them: four decimals at most, trailing zeros dropped.
fn shown(h: f64) -> String {
    let s = format!("{:.4}", (h * 10_000.0).round() / 10_000.0);
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

#[tokio::test]
async fn gpu_hours_accrue_and_a_used_quota_refuses_the_next_gpu_start_with_the_numbers() {
    let mut env = env();
    env.push(("BERTH_GPU_HOURS_PER_PERIOD".into(), "0.0003".into()));
    let b = Berth::start_with(&refs(&env), &[]);
    let (admin, alice) = admin_and_user(&b, "alice", PW).await;
    let bob = authorized_user(&b, &admin, "bob", PW).await;

    let fresh = usage(&alice, "alice").await;
    assert_eq!(fresh["period"], "month");
    assert_eq!(fresh["periods"].as_array().unwrap().len(), 3, "this month and the two before");
    assert_eq!(seconds(&fresh), (0.0, 0.0));
    let renews = format!("{}T00:00:00Z", first_of_next_month());
    assert_eq!(fresh["quota"]["renews"], renews.as_str());
    assert_eq!(fresh["periods"][0]["end"], renews.as_str());
    assert_eq!(fresh["quota"]["gpu_hours"], 0.0003);
    assert_eq!(fresh["quota"]["source"], "hub");

    let before_start = now_s();
    start(&b, &alice, "alice", 1).await;
    let after_start = now_s();
    // Usage accrues while the server holds its GPU, up to now.
    let start_wait = Instant::now();
    let mut during = usage(&alice, "alice").await;
    while seconds(&during).0 < 1.2 {
        assert!(start_wait.elapsed() < Duration::from_secs(30), "no GPU time accrued: {during}");
        tokio::time::sleep(Duration::from_millis(200)).await;
        during = usage(&alice, "alice").await;
    }
    let before_stop = now_s();
    stop(&alice, "alice").await;
    let after_stop = now_s();

    let done = usage(&alice, "alice").await;
    let (gpu_s, server_s) = seconds(&done);
    assert!(gpu_s >= before_stop - after_start && gpu_s <= after_stop - before_start, "{gpu_s} s of GPU time: {done}");
    assert!(server_s >= gpu_s - 0.5 && server_s <= after_stop - before_start, "{server_s} s of server time: {done}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(seconds(&usage(&alice, "alice").await), (gpu_s, server_s), "a stopped server accrues nothing");

    // The quota is used: a start with a GPU is refused with what was used, what is left and when it renews.
    let used_h = done["periods"][0]["gpu_hours"].as_f64().unwrap();
    assert_eq!(done["quota"]["left_gpu_hours"], 0.0);
    let r = alice.api(Method::POST, "/hub/api/users/alice/server").json(&json!({"gpus": 1})).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let message = r.json::<Value>().await.unwrap()["message"].as_str().unwrap().to_string();
    let mut used = shown(used_h);
    if !used.contains('.') {
        used.push_str(".0");
    }
    assert_eq!(
        message,
        format!(
            "alice has used {used} of 0.0003 GPU-hours this month; 0 left; renews {} 00:00 UTC",
            first_of_next_month()
        )
    );
    let gpus: Value = admin.api(Method::GET, "/hub/api/gpus").send().await.unwrap().json().await.unwrap();
    assert_eq!(gpus["free"], 1, "the refused start holds no GPU");
    // Without GPUs she may start; the quota is about GPU time.
    start(&b, &alice, "alice", 0).await;
    stop(&alice, "alice").await;
    assert_eq!(seconds(&usage(&alice, "alice").await).0, gpu_s, "no GPU, no GPU time");

    // An admin gives alice an hour of her own; taking it back restores the hub's quota.
    let put = |limits: Value| admin.api(Method::PUT, "/hub/api/users/alice/limits").json(&limits).send();
    assert_eq!(put(json!({"gpu_hours_per_period": -1})).await.unwrap().status(), StatusCode::BAD_REQUEST);
    assert_eq!(put(json!({"gpu_hours_per_period": 1})).await.unwrap().status(), StatusCode::OK);
    let l: Value = admin.api(Method::GET, "/hub/api/users/alice/limits").send().await.unwrap().json().await.unwrap();
    assert_eq!((&l["gpu_hours_per_period"], &l["effective_gpu_hours_per_period"]), (&json!(1.0), &json!(1.0)), "{l}");
    let r = alice
        .api(Method::PUT, "/hub/api/users/alice/limits")
        .json(&json!({"gpu_hours_per_period": 100}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN, "users do not set their own quota");
    let own = usage(&alice, "alice").await;
    assert_eq!((&own["quota"]["gpu_hours"], &own["quota"]["source"]), (&json!(1.0), &json!("user")));
    start(&b, &alice, "alice", 1).await;
    stop(&alice, "alice").await;
    // The Users page's form does the same: a bad number is refused, empty means the hub's.
    let r = admin.submit("/hub/authorize", "/hub/gpu-quota/alice", &[("gpu_hours", "lots")]).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let page = r.text().await.unwrap();
    assert!(page.contains("a GPU-hour quota is a number of hours") && page.contains("lots"), "{page}");
    let r = admin.submit("/hub/authorize", "/hub/gpu-quota/alice", &[("gpu_hours", "")]).await;
    assert!(r.status().is_redirection(), "{}", r.status());
    let l: Value = admin.api(Method::GET, "/hub/api/users/alice/limits").send().await.unwrap().json().await.unwrap();
    assert_eq!(
        (&l["gpu_hours_per_period"], &l["effective_gpu_hours_per_period"]),
        (&Value::Null, &json!(0.0003)),
        "{l}"
    );
    let r = alice.submit("/hub/home", "/hub/gpu-quota/alice", &[("gpu_hours", "100")]).await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN, "only admins use the form");
    let r = alice.api(Method::POST, "/hub/api/users/alice/server").json(&json!({"gpus": 1})).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS, "back to the hub's 0.0003");

    // Who sees what: alice and admins see alice's; bob sees his own only.
    assert_eq!(
        bob.api(Method::GET, "/hub/api/users/alice/usage").send().await.unwrap().status(),
        StatusCode::FORBIDDEN
    );
    assert_eq!(bob.api(Method::GET, "/hub/api/usage").send().await.unwrap().status(), StatusCode::FORBIDDEN);
    assert_eq!(seconds(&usage(&bob, "bob").await), (0.0, 0.0));
    assert_eq!(seconds(&usage(&admin, "alice").await).0, seconds(&usage(&alice, "alice").await).0);
    let r = alice.api(Method::GET, "/hub/api/users/alice/usage?periods=0").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let all: Value = admin.api(Method::GET, "/hub/api/usage?periods=1").send().await.unwrap().json().await.unwrap();
    let names: Vec<&str> = all.as_array().unwrap().iter().map(|u| u["user"].as_str().unwrap()).collect();
    assert_eq!(names, ["admin", "alice", "bob"]);
    assert!(all[1]["periods"][0]["gpu_hours"].as_f64().unwrap() > 0.0);
    assert_eq!(all[1]["periods"].as_array().unwrap().len(), 1);

    // The pages: alice's home page, the admin's users page.
    let (_, home) = alice.get_text("/hub/home").await;
    let card = home.split(r#"id="usage""#).nth(1).expect("a usage card");
    assert!(
        card.contains("GPU-hour quota:")
            && card.contains("<b>0 left</b>")
            && card.contains(&format!("renews {} 00:00 UTC", first_of_next_month())),
        "{card}"
    );
    assert!(!home.contains("bob"));
    let (_, users) = admin.get_text("/hub/authorize").await;
    let row = users.split(r#"<tr id="alice">"#).nth(1).unwrap().split("</tr>").next().unwrap();
    assert!(row.contains(r#"<td class="gpu-hours">"#) && row.contains(" of 0.0003</td>"), "{row}");
}

#[tokio::test]
async fn a_crash_neither_loses_nor_double_counts_gpu_time() {
    let env = env();
    let mut b = Berth::start_with(&refs(&env), &[]);
    let (_admin, alice) = admin_and_user(&b, "alice", PW).await;
    let before_start = now_s();
    start(&b, &alice, "alice", 1).await;
    let after_start = now_s();
    // When the start was recorded, just after its GPU was allocated.
    let me: Value = alice.api(Method::GET, "/hub/api/users/alice").send().await.unwrap().json().await.unwrap();
    let started = epoch_s(me["servers"][""]["started"].as_str().unwrap());
    assert!(started >= before_start - 1.0 && started <= after_start, "{started}");

    // kill -9 while the server holds its GPU; it keeps running, so its
    // time while berth was down counts, once.
    b.kill9_and_restart();
    let alice = Browser::new(&b.url);
    alice.login_ok("alice", PW).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t0 = now_s();
    let u = usage(&alice, "alice").await;
    let t1 = now_s();
    let (gpu_s, _) = seconds(&u);
    assert!(
        gpu_s >= t0 - after_start && gpu_s <= t1 - before_start,
        "{gpu_s} s, not within [{}, {}]",
        t0 - after_start,
        t1 - before_start
    );

    // kill -9 again, and the server dies while berth is down: its time ends
    // at berth's last heartbeat, not when berth comes back.
    b.child.kill().unwrap();
    b.child.wait().unwrap();
    let killed = now_s();
    kill_processes_under(&b.data_dir);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let b2 = Berth::spawn_in(&b.data_dir, &refs(&env), &[]);
    let alice = Browser::new(&b2.url);
    alice.login_ok("alice", PW).await;
    let u = usage(&alice, "alice").await;
    let (gpu_s, server_s) = seconds(&u);
    // Allocated a few milliseconds before `started`; berth was down 3 s after `killed`.
    let most = killed - started + 0.2;
    assert!(gpu_s <= most, "{gpu_s} s: counted past the crash (at most {most} s)");
    assert!(gpu_s >= t0 - after_start, "{gpu_s} s: lost what was counted before");
    assert!(server_s <= most, "{server_s} s of server time, at most {most}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(seconds(&usage(&alice, "alice").await).0, gpu_s, "the vanished server accrues nothing");
    let me: Value = alice.api(Method::GET, "/hub/api/users/alice").send().await.unwrap().json().await.unwrap();
    assert!(me["servers"].get("").is_none() || me["servers"][""]["ready"] != true, "{me}");
    drop(b2);
}
