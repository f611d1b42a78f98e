//! JupyterHub's browser flows through berth, as a browser-like client goes
//! through them on JupyterHub: `GET /hub/spawn` starts the default server,
//! `/hub/user-redirect/<path>` reaches one's own server at `<path>`, and
//! `next` after log-in lands where it points.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test
mod common;

use common::*;
use reqwest::{Method, StatusCode};
use serde_json::Value;

const PW: &str = "flows-pass-42x";
const HTTP_SERVER: &str = "python3 -m http.server {port} --bind 127.0.0.1";

fn location(r: &reqwest::Response) -> String {
    r.headers().get("location").and_then(|v| v.to_str().ok()).unwrap_or("").to_string()
}

async fn state(admin: &Browser, user: &str) -> Value {
    let u: Value =
        admin.api(Method::GET, &format!("/hub/api/users/{user}")).send().await.unwrap().json().await.unwrap();
    u["servers"].clone()
}

#[tokio::test]
async fn get_hub_spawn_starts_the_default_server_unless_another_site_sent_the_browser() {
    let b = Berth::start_with(&[("BERTH_LOCAL_CMD", HTTP_SERVER), ("BERTH_START_TIMEOUT", "60")], &[]);
    let (admin, alice) = admin_and_user(&b, "alice", PW).await;
    // A link on another site shows the form and starts nothing.
    let r = alice.client.get(alice.url("/hub/spawn")).header("Sec-Fetch-Site", "cross-site").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.text().await.unwrap().contains(r#"id="start""#), "the start form");
    assert_eq!(state(&admin, "alice").await, serde_json::json!({}), "nothing started");
    // From the hub itself (or a typed URL) it starts, as JupyterHub does.
    let r = alice.client.get(alice.url("/hub/spawn")).header("Sec-Fetch-Site", "same-origin").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::FOUND);
    assert_eq!(location(&r), "/hub/spawn-pending/alice");
    let ready = wait_progress(&alice, "/hub/api/users/alice/server/progress").await;
    assert_eq!(ready["ready"], true, "{ready}\n{}", b.log());
}

#[tokio::test]
async fn user_redirect_reaches_a_path_on_ones_own_server_starting_it_first() {
    let b = Berth::start_with(&[("BERTH_LOCAL_CMD", HTTP_SERVER), ("BERTH_START_TIMEOUT", "60")], &[]);
    let (_admin, alice) = admin_and_user(&b, "alice", PW).await;
    let r = alice.get("/hub/user-redirect/tree/notes.txt?x=1").await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER, "{}", r.status());
    let to = location(&r);
    assert!(to.starts_with("/hub/spawn-pending/alice?next="), "{to}");
    let (status, page) = alice.get_text(&to).await;
    assert!(status.is_success() || status.is_redirection(), "{status}");
    if status.is_success() {
        assert!(page.contains(r#"data-next-url="/user/alice/tree/notes.txt?x=1""#), "lands on the path: {page}");
    }
    let ready = wait_progress(&alice, "/hub/api/users/alice/server/progress").await;
    assert_eq!(ready["ready"], true, "{ready}");
    // Running: straight to the path on alice's own server.
    let r = alice.get("/hub/user-redirect/tree/notes.txt?x=1").await;
    assert_eq!(location(&r), "/user/alice/tree/notes.txt?x=1");
    // A next that leaves the server is not followed.
    let r = alice.get("/hub/spawn-pending/alice?next=%2Fhub%2Ftoken").await;
    assert_eq!(location(&r), "/user/alice/", "only paths on that server");
}

#[tokio::test]
async fn after_log_in_next_lands_where_it_points() {
    let b = Berth::start();
    let _admin = b.first_admin().await;
    let v = Browser::new(&b.url);
    let r = v.get("/hub/token").await;
    assert!(r.status().is_redirection());
    let to = location(&r);
    assert_eq!(to, "/hub/login?next=%2Fhub%2Ftoken", "next keeps the hub's prefix");
    let (_, page) = v.get_text(&to).await;
    let x = form_xsrf(&page).unwrap();
    let r = v
        .client
        .post(v.url("/hub/login?next=%2Fhub%2Ftoken"))
        .form(&[("username", "admin"), ("password", ADMIN_PW), ("_xsrf", x.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FOUND);
    assert_eq!(location(&r), "/hub/token");
    assert_eq!(v.get("/hub/token").await.status(), StatusCode::OK);
}
