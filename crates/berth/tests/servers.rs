//! Issue 3's acceptance: servers started through the hub and reached through
//! berth's own proxy, with the real `jupyterhub-singleuser` from PyPI.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test
mod common;

use std::time::{Duration, Instant};

use common::*;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

const ALICE_PW: &str = "alice-pass-42x";

fn jupyter_berth(extra_env: &[(&str, &str)], args: &[&str]) -> Berth {
    let cmd = singleuser_cmd();
    let mut env = vec![("BERTH_LOCAL_CMD", cmd.as_str()), ("BERTH_START_TIMEOUT", "120")];
    env.extend_from_slice(extra_env);
    Berth::start_with(&env, args)
}

/// Logs alice into her running server through the OAuth round trip and
/// checks `/user/alice/api/status` answers.
async fn oauth_into_server(alice: &Browser) {
    // The API answers 403 (and never redirects) without the server's cookie.
    let r = alice.get("/user/alice/api/status").await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    // An authenticated page starts the OAuth exchange with the hub.
    let (r, last) = follow(alice, "/user/alice/files/nothing-here").await;
    assert!(last.ends_with("/user/alice/files/nothing-here"), "ended at {last}");
    assert_eq!(r.status(), StatusCode::NOT_FOUND, "jupyter answered for the missing file");
    assert!(alice.cookie("/user/alice/", "jupyterhub-user-alice").is_some(), "the server set its cookie");
    let r = alice.get("/user/alice/api/status").await;
    assert_eq!(r.status(), StatusCode::OK);
    let status: Value = r.json().await.unwrap();
    assert!(status.get("started").is_some(), "{status}");
}

#[tokio::test]
async fn alice_starts_her_server_and_runs_code_through_berth() {
    let b = jupyter_berth(&[], &[]);
    let (admin, alice) = admin_and_user(&b, "alice", ALICE_PW).await;
    let ready = start_via_pages(&alice, "alice").await;
    assert_eq!(ready["ready"], true, "progress ended with {ready}\nlog:\n{}", b.log());
    assert_eq!(ready["url"], "/user/alice/");

    oauth_into_server(&alice).await;
    let kernel = kernel::start(&alice, "alice").await;
    assert_eq!(kernel::run(&alice, "alice", &kernel, "1+1", None).await, "2");

    // The hub's view agrees, in JupyterHub's shapes.
    let me: Value = admin.api(Method::GET, "/hub/api/users/alice").send().await.unwrap().json().await.unwrap();
    assert_eq!(me["server"], "/user/alice/");
    assert_eq!(me["servers"][""]["ready"], true);
    // berth's session cookie never reaches the server.
    let h: Value = alice.get("/user/alice/api/me").await.json().await.unwrap_or(json!({}));
    assert!(!h.to_string().contains("berth-session"));

    // A second start is refused with a message; stop answers 204.
    let r = alice.api(Method::POST, "/hub/api/users/alice/server").json(&json!({})).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert!(r.json::<Value>().await.unwrap()["message"].as_str().unwrap().contains("already running"));
    let r = alice.api(Method::DELETE, "/hub/api/users/alice/server").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    // The stopped server's URL offers a start (HTML) or says 424 (API).
    let r = alice.client.get(alice.url("/user/alice/lab")).header("Accept", "text/html").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(r.text().await.unwrap().contains("Start it"));
    let r = alice.get("/user/alice/api/status").await;
    assert_eq!(r.status().as_u16(), 424);
    let me: Value = admin.api(Method::GET, "/hub/api/users/alice").send().await.unwrap().json().await.unwrap();
    assert_eq!(me["server"], Value::Null);
}

#[tokio::test]
async fn no_cross_user_access_through_the_proxy() {
    let b = jupyter_berth(&[], &[]);
    let (admin, alice) = admin_and_user(&b, "alice", ALICE_PW).await;
    let bob = Browser::new(&b.url);
    bob.signup("bob", "bob-pass-42xy").await;
    admin.submit("/hub/authorize", "/hub/authorize/bob", &[("action", "authorize")]).await;
    bob.login_ok("bob", "bob-pass-42xy").await;
    assert_eq!(start_via_pages(&alice, "alice").await["ready"], true);
    oauth_into_server(&alice).await;

    // bob, logged in, is refused at alice's server.
    for path in ["/user/alice/", "/user/alice/api/status", "/user/alice/files/x"] {
        let r = bob.client.get(bob.url(path)).header("Accept", "text/html").send().await.unwrap();
        assert_eq!(r.status(), StatusCode::FORBIDDEN, "{path}");
    }
    // Dot segments never reach anything.
    // (Sent raw: HTTP clients would normalize the path before sending it.)
    let cookie = alice.jar_cookie_header("/user/alice/");
    assert_eq!(raw_get(&b.url, "/user/alice/api/status", &cookie).await, 200, "the raw client works");
    for path in [
        "/user/bob/../alice/api/status",
        "/user/bob/%2e%2e/alice/api/status",
        "/user/alice/../alice/api/status",
        "/user/bob/..%2Falice/api/status",
    ] {
        assert_eq!(raw_get(&b.url, path, &cookie).await, 400, "{path}");
    }
    // Tokens: bob's own token has no access to alice's server; alice's has.
    let t = bob.api(Method::POST, "/hub/api/users/bob/tokens").json(&json!({})).send().await.unwrap();
    let bob_token = t.json::<Value>().await.unwrap()["token"].as_str().unwrap().to_string();
    let r = api_client()
        .get(format!("{}/user/alice/api/status", b.url))
        .header("Authorization", format!("token {bob_token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let t = alice
        .api(Method::POST, "/hub/api/users/alice/tokens")
        .json(&json!({"scopes": ["read:users!user=alice"]}))
        .send()
        .await
        .unwrap();
    let narrow = t.json::<Value>().await.unwrap()["token"].as_str().unwrap().to_string();
    let r = api_client()
        .get(format!("{}/user/alice/api/status", b.url))
        .header("Authorization", format!("token {narrow}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN, "a token without access:servers");
    let t = alice
        .api(Method::POST, "/hub/api/users/alice/tokens")
        .json(&json!({"scopes": ["access:servers!server=alice/"]}))
        .send()
        .await
        .unwrap();
    let access = t.json::<Value>().await.unwrap()["token"].as_str().unwrap().to_string();
    let r = api_client()
        .get(format!("{}/user/alice/api/status", b.url))
        .header("Authorization", format!("token {access}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK, "a token with access:servers for alice's server");
    // Admins pass berth's edge, but a wide token of theirs never reaches
    // alice's server (it could use it as the admin): the server sees no
    // credential and refuses on its own ...
    let t = admin.api(Method::POST, "/hub/api/users/admin/tokens").json(&json!({})).send().await.unwrap();
    let admin_token = t.json::<Value>().await.unwrap()["token"].as_str().unwrap().to_string();
    let r = api_client()
        .get(format!("{}/user/alice/api/status", b.url))
        .header("Authorization", format!("token {admin_token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN, "the admin's wide token is not forwarded");
    // ... while an admin token scoped to that one server is.
    let t = admin
        .api(Method::POST, "/hub/api/users/admin/tokens")
        .json(&json!({"scopes": ["access:servers!server=alice/"]}))
        .send()
        .await
        .unwrap();
    let scoped = t.json::<Value>().await.unwrap()["token"].as_str().unwrap().to_string();
    let r = api_client()
        .get(format!("{}/user/alice/api/status", b.url))
        .header("Authorization", format!("token {scoped}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK, "admins hold access:servers, with a token made for it");
    // A visitor without a session is sent to log in.
    let anon = Browser::new(&b.url);
    let r = anon.client.get(anon.url("/user/alice/lab")).header("Accept", "text/html").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert!(r.headers()["location"].to_str().unwrap().starts_with("/hub/login?next=%2Fuser%2Falice%2Flab"));
}

#[tokio::test]
async fn kill9_berth_then_restart_keeps_the_server_and_its_kernel() {
    let mut b = jupyter_berth(&[], &[]);
    let (_admin, alice) = admin_and_user(&b, "alice", ALICE_PW).await;
    assert_eq!(start_via_pages(&alice, "alice").await["ready"], true);
    oauth_into_server(&alice).await;
    let kernel = kernel::start(&alice, "alice").await;
    assert_eq!(kernel::run(&alice, "alice", &kernel, "x = 40; x + 1", None).await, "41");
    let pid_before: Value = {
        let me: Value = alice.api(Method::GET, "/hub/api/users/alice").send().await.unwrap().json().await.unwrap();
        me["servers"][""]["started"].clone()
    };

    b.kill9_and_restart();
    let alice = Browser { base: b.url.clone(), ..alice };
    let r = alice.get("/user/alice/api/status").await;
    let status = r.status();
    let body = r.text().await.unwrap_or_default();
    assert_eq!(status, StatusCode::OK, "the re-adopted server answers through the restored route: {body}\n{}", b.log());
    assert_eq!(kernel::run(&alice, "alice", &kernel, "x + 1", None).await, "41", "same kernel, same state");
    let me: Value = alice.api(Method::GET, "/hub/api/users/alice").send().await.unwrap().json().await.unwrap();
    assert_eq!(me["servers"][""]["started"], pid_before, "not restarted");
    let r = alice.api(Method::DELETE, "/hub/api/users/alice/server").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn failing_servers_end_stopped_with_the_reason() {
    // A command that exits at once.
    let b = Berth::start_with(&[("BERTH_LOCAL_CMD", "false"), ("BERTH_START_TIMEOUT", "20")], &[]);
    let (_admin, alice) = admin_and_user(&b, "alice", ALICE_PW).await;
    let t0 = Instant::now();
    let last = start_via_pages(&alice, "alice").await;
    assert_eq!(last["failed"], true, "{last}");
    assert!(last["message"].as_str().unwrap().contains("exited"), "{last}");
    assert!(t0.elapsed() < Duration::from_secs(20), "failed fast, before the timeout");
    let me: Value = alice.api(Method::GET, "/hub/api/users/alice").send().await.unwrap().json().await.unwrap();
    assert_eq!(me["servers"], json!({}), "no active server");
    let (_, home) = alice.get_text("/hub/home").await;
    assert!(home.contains("Last start failed") && home.contains("exited"), "the reason is shown");
    drop(b);

    // A command that never listens: stopped with the reason at the timeout.
    let b = Berth::start_with(&[("BERTH_LOCAL_CMD", "sleep 601"), ("BERTH_START_TIMEOUT", "4")], &[]);
    let (_admin, alice) = admin_and_user(&b, "alice", ALICE_PW).await;
    let t0 = Instant::now();
    let last = start_via_pages(&alice, "alice").await;
    assert_eq!(last["failed"], true, "{last}");
    assert!(last["message"].as_str().unwrap().contains("did not answer"), "{last}");
    assert!(t0.elapsed() < Duration::from_secs(4 + 20), "within the timeout (plus stopping)");
    let r = alice.api(Method::GET, "/hub/api/users/alice").send().await.unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["servers"], json!({}));
    // The process that never listened was stopped.
    let out = std::process::Command::new("pgrep").args(["-f", "^sleep 601$"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "sleep 601 still runs: {}", String::from_utf8_lossy(&out.stdout));
    // Starting again is allowed (the state machine is back at stopped) and fails the same way.
    let r = alice.api(Method::POST, "/hub/api/users/alice/server").json(&json!({})).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert!(r.json::<Value>().await.unwrap()["message"].as_str().unwrap().contains("did not answer"));
}

#[tokio::test]
async fn https_on_the_same_port() {
    let b = jupyter_berth(&[], &["--tls", "auto"]);
    assert!(b.url.starts_with("https://"), "{}", b.url);
    let ca = std::fs::read_to_string(b.data_dir.join("tls").join("ca.pem")).expect("the generated CA");
    let base = b.url.replace("https://127.0.0.1", "https://localhost");

    // Plain HTTP to the same port is redirected to HTTPS.
    let plain = b.url.replace("https://", "http://");
    let r = api_client().get(format!("{plain}/hub/login")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::PERMANENT_REDIRECT);
    assert!(r.headers()["location"].to_str().unwrap().starts_with("https://"));

    let admin = Browser::with_ca(&base, &ca);
    b.make_first_admin(&admin).await;
    let alice = Browser::with_ca(&base, &ca);
    alice.signup("alice", ALICE_PW).await;
    admin.submit("/hub/authorize", "/hub/authorize/alice", &[("action", "authorize")]).await;
    let r = alice.login("alice", ALICE_PW).await;
    assert_eq!(r.status(), StatusCode::FOUND);
    let set_cookie: Vec<String> =
        r.headers().get_all("set-cookie").iter().map(|v| v.to_str().unwrap().to_string()).collect();
    assert!(set_cookie.iter().all(|c| c.contains("Secure")), "cookies are Secure under TLS: {set_cookie:?}");

    assert_eq!(start_via_pages(&alice, "alice").await["ready"], true, "log:\n{}", b.log());
    oauth_into_server(&alice).await;
    let kernel = kernel::start(&alice, "alice").await;
    assert_eq!(kernel::run(&alice, "alice", &kernel, "1+1", Some(&ca)).await, "2");
}

#[tokio::test]
async fn one_gib_up_and_down_without_buffering() {
    let cmd = format!("python3 {}", fixture("stream_server.py"));
    let b = Berth::start_with(&[("BERTH_LOCAL_CMD", cmd.as_str()), ("BERTH_START_TIMEOUT", "30")], &[]);
    let (_admin, alice) = admin_and_user(&b, "alice", ALICE_PW).await;
    assert_eq!(start_via_pages(&alice, "alice").await["ready"], true, "log:\n{}", b.log());
    let pid = b.child.id();
    let baseline = rss_kib(pid);
    const GIB: u64 = 1 << 30;

    // Sample berth's memory while the transfers run.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sampler = {
        let (stop, peak) = (stop.clone(), peak.clone());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                peak.fetch_max(rss_kib(pid), std::sync::atomic::Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };

    // Upload: a streamed body of pattern bytes, hashed on both sides.
    use sha2::Digest;
    let chunk: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 253) as u8).collect();
    let chunk = bytes::Bytes::from(chunk);
    let mut expected = sha2::Sha256::new();
    for _ in 0..1024 {
        expected.update(&chunk);
    }
    let expected = hex::encode(expected.finalize());
    let body_stream = futures_util::stream::iter((0..1024).map({
        let chunk = chunk.clone();
        move |_| Ok::<_, std::io::Error>(chunk.clone())
    }));
    let r = alice
        .client
        .post(alice.url("/user/alice/upload"))
        .header("Content-Length", GIB.to_string())
        .body(reqwest::Body::wrap_stream(body_stream))
        .timeout(Duration::from_secs(600))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["bytes"], GIB);
    assert_eq!(v["sha256"], expected.as_str(), "the upload arrived byte for byte");

    // Download: the server's pattern, checked as it streams.
    use futures_util::StreamExt;
    let r = alice
        .client
        .get(alice.url(&format!("/user/alice/download?n={GIB}")))
        .timeout(Duration::from_secs(600))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let mut stream = r.bytes_stream();
    let mut pos: u64 = 0;
    while let Some(c) = stream.next().await {
        let c = c.unwrap();
        for (i, byte) in c.iter().enumerate() {
            let want = ((pos + i as u64) % 251) as u8;
            if *byte != want {
                panic!("byte {} is {byte}, want {want}", pos + i as u64);
            }
        }
        pos += c.len() as u64;
    }
    assert_eq!(pos, GIB);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    sampler.join().unwrap();
    let peak = peak.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!("berth RSS: {baseline} KiB before, {peak} KiB peak during 2 GiB of transfers");
    assert!(peak < baseline + 64 * 1024, "berth's memory grew from {baseline} KiB to {peak} KiB: it buffers");
}
