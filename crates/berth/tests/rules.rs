//! One rule for each account and access decision, whichever front end
//! asks: the REST API, the admin pages and the CLI agree (they used to
//! disagree on unauthorize and delete). That path-routed and host-routed
//! servers admit exactly the same callers is in `apps.rs`, beside the other
//! host-mode tests.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test
mod common;

use common::*;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

/// A server that answers HTTP at once: Python's own, on the port berth gives it.
const HTTP_SERVER: &str = "python3 -m http.server {port} --bind 127.0.0.1";

async fn holders(admin: &Browser) -> Vec<Value> {
    let gpus: Value = admin.api(Method::GET, "/hub/api/gpus").send().await.unwrap().json().await.unwrap();
    gpus["gpus"].as_array().unwrap().iter().flat_map(|g| g["holders"].as_array().cloned().unwrap_or_default()).collect()
}

#[tokio::test]
async fn unauthorizing_through_the_api_stops_servers_and_frees_gpus_as_the_page_does() {
    let b = Berth::start_with(
        &[("BERTH_LOCAL_CMD", HTTP_SERVER), ("BERTH_START_TIMEOUT", "60"), ("BERTH_GPU_DEVICES", "GPU-a,GPU-b")],
        &[],
    );
    let (admin, alice) = admin_and_user(&b, "alice", "alice-pass-42x").await;
    let bob = authorized_user(&b, &admin, "bob", "bob-pass-42xyz").await;
    for (who, name) in [(&alice, "alice"), (&bob, "bob")] {
        let r = who.api(Method::POST, &format!("/hub/api/users/{name}/server")).json(&json!({"gpus": 1})).send().await;
        assert_eq!(r.unwrap().status(), StatusCode::CREATED, "{name}'s start\n{}", b.log());
    }
    assert_eq!(holders(&admin).await.len(), 2);

    // Through the REST API …
    let r = admin.api(Method::PATCH, "/hub/api/users/alice").json(&json!({"authorized": false})).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // … and through the page, for bob.
    let r = admin.submit("/hub/authorize", "/hub/authorize/bob", &[("action", "unauthorize")]).await;
    assert!(r.status().is_redirection(), "{}", r.status());

    for name in ["alice", "bob"] {
        let u: Value =
            admin.api(Method::GET, &format!("/hub/api/users/{name}")).send().await.unwrap().json().await.unwrap();
        assert_eq!(u["authorized"], false, "{u}");
        assert_eq!(u["server"], Value::Null, "{name}'s server stopped: {u}");
        assert_eq!(u["servers"], json!({}), "{u}");
    }
    assert!(holders(&admin).await.is_empty(), "both GPUs are free");
    // Their sessions ended too.
    assert_eq!(alice.get("/hub/api/user").await.status(), StatusCode::FORBIDDEN);
    assert_eq!(bob.get("/hub/api/user").await.status(), StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn the_clis_delete_removes_data_through_the_configured_spawner() {
    let b = Berth::start_with(&[("BERTH_LOCAL_CMD", HTTP_SERVER), ("BERTH_START_TIMEOUT", "60")], &[]);
    let (admin, alice) = admin_and_user(&b, "alice", "alice-pass-42x").await;
    let r = alice.api(Method::POST, "/hub/api/users/alice/server").json(&json!({})).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::CREATED, "{}", b.log());
    let home = b.data_dir.join("home").join("alice");
    std::fs::write(home.join("notes.txt"), "alice's work").unwrap();

    // While it runs the CLI refuses (the serving berth owns its route) …
    let (code, _, err) = b.cli(&["user", "delete", "alice", "--remove-volumes"], None);
    assert_ne!(code, 0);
    assert!(err.contains("running servers"), "{err}");
    let r = alice.api(Method::DELETE, "/hub/api/users/alice/server").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);

    // … then deletes the account and, through the local spawner (not a
    // Docker engine this berth does not use), alice's home.
    let (code, out, err) = b.cli(&["user", "delete", "alice", "--remove-volumes"], None);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("deleted alice") && out.contains("local spawner"), "{out}");
    assert!(!home.exists(), "alice's home is gone");
    // The serving berth sees another process's change within its directory's refresh.
    eventually("the hub to forget alice", std::time::Duration::from_secs(10), || async {
        admin.api(Method::GET, "/hub/api/users/alice").send().await.unwrap().status() == StatusCode::NOT_FOUND
    })
    .await;
    // Without --remove-volumes a home stays.
    let bob = authorized_user(&b, &admin, "bob", "bob-pass-42xyz").await;
    let r = bob.api(Method::POST, "/hub/api/users/bob/server").json(&json!({})).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    bob.api(Method::DELETE, "/hub/api/users/bob/server").send().await.unwrap();
    let (code, out, err) = b.cli(&["user", "delete", "bob"], None);
    assert_eq!(code, 0, "{out}\n{err}");
    // Without --remove-volumes it is kept for the admin, out of reach of a new bob.
    assert!(!b.data_dir.join("home").join("bob").exists(), "a new bob does not get the old home");
    let retired: Vec<String> = std::fs::read_dir(b.data_dir.join("home").join(".retired"))
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    assert!(retired.iter().any(|n| n.starts_with("bob-")), "kept: {retired:?}");
}
