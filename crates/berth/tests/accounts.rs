//! Issue 2's acceptance, through real HTTP against `berth serve`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test
mod common;

use std::time::Duration;

use common::*;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

const ALICE_PW: &str = "alice-pass-42x";

async fn admin_and_alice(b: &Berth) -> (Browser, Browser) {
    let admin = b.first_admin().await;
    let alice = Browser::new(&b.url);
    let msg = alice.signup("alice", ALICE_PW).await;
    assert!(alert_text(&msg).contains("sent to the admin"), "{}", alert_text(&msg));
    (admin, alice)
}

async fn authorize(admin: &Browser, name: &str) {
    let r = admin.submit("/hub/authorize", &format!("/hub/authorize/{name}"), &[("action", "authorize")]).await;
    assert!(r.status().is_redirection(), "authorize: {}", r.status());
}

#[tokio::test]
async fn signup_approval_login_password_change_logout() {
    let b = Berth::start();
    let (admin, alice) = admin_and_alice(&b).await;

    // The admin is admin; alice is pending and cannot log in.
    let me: Value = admin.api(Method::GET, "/hub/api/user").send().await.unwrap().json().await.unwrap();
    assert_eq!((me["name"].as_str(), me["admin"].as_bool()), (Some("admin"), Some(true)));
    let r = alice.login("alice", ALICE_PW).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(alert_text(&r.text().await.unwrap()).contains("has not been authorized"));
    let (_, list) = admin.get_text("/hub/authorize").await;
    assert!(list.contains(r#"<tr id="alice">"#) && list.contains("pending"));

    // A GET cannot authorize (NativeAuthenticator's toggle is gone).
    let r = admin.get("/hub/authorize/alice").await;
    assert!(r.status().is_client_error(), "GET authorize answered {}", r.status());
    authorize(&admin, "alice").await;
    alice.login_ok("alice", ALICE_PW).await;
    let (status, home) = alice.get_text("/hub/home").await;
    assert_eq!(status, StatusCode::OK);
    assert!(home.contains("Welcome, alice") && home.contains("Log out"));

    // A second session of alice's, to see it revoked by the password change.
    let other = Browser::new(&b.url);
    other.login_ok("alice", ALICE_PW).await;

    let new_pw = "alice-new-pass-77";
    let r = alice
        .submit(
            "/hub/change-password",
            "/hub/change-password",
            &[("old_password", ALICE_PW), ("new_password", new_pw), ("new_password_confirmation", new_pw)],
        )
        .await;
    assert!(alert_text(&r.text().await.unwrap()).contains("changed successfully"));
    assert_eq!(alice.get("/hub/home").await.status(), StatusCode::OK, "the changing session stays");
    assert_eq!(other.get("/hub/home").await.status(), StatusCode::SEE_OTHER, "other sessions are logged out");

    // Log out; the old cookie, replayed, no longer works.
    let session = alice.cookie("/hub/", "berth-session").expect("session cookie");
    let r = alice.submit("/hub/home", "/hub/logout", &[]).await;
    assert!(r.status().is_redirection());
    let replay = api_client()
        .get(format!("{}/hub/api/user", b.url))
        .header("Cookie", format!("berth-session={session}"))
        .send()
        .await
        .unwrap();
    assert_eq!(replay.status(), StatusCode::FORBIDDEN);
    let replay = api_client()
        .get(format!("{}/hub/home", b.url))
        .header("Cookie", format!("berth-session={session}"))
        .send()
        .await
        .unwrap();
    assert_eq!(replay.status(), StatusCode::SEE_OTHER);
    assert!(replay.headers()["location"].to_str().unwrap().starts_with("/hub/login?next="));

    // The old password is gone, the new one works.
    assert_eq!(alice.login("alice", ALICE_PW).await.status(), StatusCode::OK);
    alice.login_ok("alice", new_pw).await;
}

#[tokio::test]
async fn lockout_says_when_to_retry() {
    let b = Berth::start_with(&[("BERTH_LOCKOUT_ATTEMPTS", "5"), ("BERTH_LOCKOUT_SECONDS", "600")], &[]);
    let (admin, alice) = admin_and_alice(&b).await;
    authorize(&admin, "alice").await;
    for i in 0..5 {
        let r = alice.login("alice", "wrong-password-1").await;
        let body = r.text().await.unwrap();
        assert!(alert_text(&body).contains("Invalid username or password"), "attempt {i}: {}", alert_text(&body));
    }
    let r = alice.login("alice", ALICE_PW).await;
    assert_eq!(r.status(), StatusCode::OK, "the right password is refused while locked");
    let msg = alert_text(&r.text().await.unwrap());
    assert!(msg.contains("Try again in 10 minutes"), "{msg}");
    assert!(msg.contains("UTC"), "{msg}");

    // Unknown names lock the same way, so the lock does not reveal who exists.
    let stranger = Browser::new(&b.url);
    for _ in 0..5 {
        stranger.login("nobody-here", "wrong-password-1").await;
    }
    let msg = alert_text(&stranger.login("nobody-here", "x").await.text().await.unwrap());
    assert!(msg.contains("Try again in"), "{msg}");

    // An operator can lift the lock from the command line.
    let (code, out, err) =
        b.cli(&["user", "reset-password", "alice", "--password-stdin"], Some("alice-reset-pass-9\n"));
    assert_eq!(code, 0, "{out}{err}");
    alice.login_ok("alice", "alice-reset-pass-9").await;
}

#[tokio::test]
async fn xsrf_is_required_for_changes() {
    let b = Berth::start();
    let (admin, _alice) = admin_and_alice(&b).await;

    // A form post without the token is refused...
    let r = admin.client.post(admin.url("/hub/authorize/alice")).form(&[("action", "authorize")]).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    // ...and with a token from another session too.
    let r = admin
        .client
        .post(admin.url("/hub/authorize/alice"))
        .form(&[("action", "authorize"), ("_xsrf", "abc:123:forged")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    // With it, it works.
    authorize(&admin, "alice").await;

    // API calls with the cookie need the header, even a GET from a script.
    let r = admin.client.post(admin.url("/hub/api/users/admin/tokens")).json(&json!({})).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["status"], 403);
    assert!(body["message"].as_str().unwrap().contains("_xsrf"));
    let r = admin.client.get(admin.url("/hub/api/users")).header("Sec-Fetch-Mode", "cors").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN, "a script's GET without the token");
    let r = admin.api(Method::GET, "/hub/api/users").header("Sec-Fetch-Mode", "cors").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = admin.api(Method::POST, "/hub/api/users/admin/tokens").json(&json!({"note": "x"})).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);

    // A login form posted without the anonymous cookie's token is refused.
    let r = api_client()
        .post(format!("{}/hub/login", b.url))
        .form(&[("username", "admin"), ("password", ADMIN_PW)])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
}

async fn token_for(admin: &Browser, user: &str, body: Value) -> String {
    let r = admin.api(Method::POST, &format!("/hub/api/users/{user}/tokens")).json(&body).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let v: Value = r.json().await.unwrap();
    v["token"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn tokens_scopes_revocation_and_storage() {
    let b = Berth::start();
    let (admin, _alice) = admin_and_alice(&b).await;
    let c = api_client();
    let reader = token_for(&admin, "admin", json!({"scopes": ["read:users"], "note": "reader"})).await;

    for scheme in ["token", "Bearer"] {
        let r = c
            .get(format!("{}/hub/api/users", b.url))
            .header("Authorization", format!("{scheme} {reader}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{scheme}");
        let users: Value = r.json().await.unwrap();
        assert_eq!(users.as_array().unwrap().len(), 2);
    }
    let r = c
        .delete(format!("{}/hub/api/users/alice", b.url))
        .header("Authorization", format!("token {reader}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let who: Value = c
        .get(format!("{}/hub/api/user", b.url))
        .header("Authorization", format!("token {reader}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(who["name"], "admin");
    assert!(who["scopes"].as_array().unwrap().iter().any(|s| s == "read:users"));
    assert!(!who["scopes"].as_array().unwrap().iter().any(|s| s == "admin:users"));

    // Listing shows tokens without their secret; revoking makes the token 403.
    let list: Value = admin.api(Method::GET, "/hub/api/users/admin/tokens").send().await.unwrap().json().await.unwrap();
    let tokens = list["api_tokens"].as_array().unwrap();
    let entry = tokens.iter().find(|t| t["note"] == "reader").unwrap();
    assert!(entry.get("token").is_none());
    assert!(!list.to_string().contains(&reader));
    let id = entry["id"].as_str().unwrap();
    let r = admin.api(Method::DELETE, &format!("/hub/api/users/admin/tokens/{id}")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let r = c
        .get(format!("{}/hub/api/users", b.url))
        .header("Authorization", format!("token {reader}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);

    // An expired token is refused.
    let short = token_for(&admin, "admin", json!({"expires_in": 1})).await;
    let url = format!("{}/hub/api/user", b.url);
    eventually("the 1 s token to expire", Duration::from_secs(10), || {
        let c = c.clone();
        let url = url.clone();
        let short = short.clone();
        async move {
            c.get(&url)
                .header("Authorization", format!("token {short}"))
                .send()
                .await
                .map(|r| r.status() == StatusCode::FORBIDDEN)
                .unwrap_or(false)
        }
    })
    .await;

    // A user cannot give a token more than they hold.
    let alice_admin = Browser::new(&b.url);
    authorize(&admin, "alice").await;
    alice_admin.login_ok("alice", ALICE_PW).await;
    let r = alice_admin
        .api(Method::POST, "/hub/api/users/alice/tokens")
        .json(&json!({"scopes": ["admin:users"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);

    // Nothing secret is in the database files in clear.
    let live = token_for(&admin, "admin", json!({"note": "live"})).await;
    let mut bytes = Vec::new();
    for f in ["berth.sqlite", "berth.sqlite-wal"] {
        if let Ok(b) = std::fs::read(b.data_dir.join(f)) {
            bytes.extend(b);
        }
    }
    assert!(bytes.len() > 4096, "database files were read");
    let hay = String::from_utf8_lossy(&bytes);
    for secret in [live.as_str(), short.as_str(), reader.as_str(), ADMIN_PW, ALICE_PW] {
        assert!(!hay.contains(secret), "{secret} is stored in clear");
    }
    let session = admin.cookie("/hub/", "berth-session").unwrap();
    let session_secret = session.split('.').next().unwrap();
    assert!(!hay.contains(session_secret), "the session secret is stored in clear");
    assert!(hay.contains("$argon2id$"), "passwords are argon2id hashes");
}

#[tokio::test]
async fn restart_after_kill9_keeps_users_sessions_and_tokens() {
    let mut b = Berth::start();
    let (admin, alice) = admin_and_alice(&b).await;
    authorize(&admin, "alice").await;
    alice.login_ok("alice", ALICE_PW).await;
    let token = token_for(&admin, "admin", json!({"note": "survives"})).await;

    b.kill9_and_restart();
    let admin = Browser { base: b.url.clone(), ..admin };
    let alice = Browser { base: b.url.clone(), ..alice };

    assert_eq!(alice.get("/hub/home").await.status(), StatusCode::OK, "alice's session survived");
    let r = api_client()
        .get(format!("{}/hub/api/users", b.url))
        .header("Authorization", format!("token {token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK, "the token survived");
    let users: Value = r.json().await.unwrap();
    let names: Vec<&str> = users.as_array().unwrap().iter().map(|u| u["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["admin", "alice"]);
    let me: Value = admin.api(Method::GET, "/hub/api/user").send().await.unwrap().json().await.unwrap();
    assert_eq!(me["admin"], true);
}

#[tokio::test]
async fn bad_input_gets_clear_errors() {
    let b = Berth::start_with(&[("BERTH_MAX_BODY_BYTES", "4096")], &[]);
    let (admin, _alice) = admin_and_alice(&b).await;
    let token = token_for(&admin, "admin", json!({})).await;
    let c = api_client();
    let auth = format!("token {token}");

    let r = c
        .post(format!("{}/hub/api/users", b.url))
        .header("Authorization", &auth)
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["status"], 400);
    assert!(v["message"].as_str().unwrap().contains("JSON"), "{v}");

    let r = c.get(format!("{}/hub/api/users/ghost", b.url)).header("Authorization", &auth).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["status"], 404);

    let big = json!({"usernames": vec!["x".repeat(50); 200]}).to_string();
    assert!(big.len() > 4096);
    let r = c.post(format!("{}/hub/api/users", b.url)).header("Authorization", &auth).body(big).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["status"], 413);

    let r = c
        .post(format!("{}/hub/api/users", b.url))
        .header("Authorization", &auth)
        .json(&json!({"usernames": ["Bad/Name"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = c.get(format!("{}/hub/api/users?limit=-3", b.url)).header("Authorization", &auth).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = c.get(format!("{}/hub/api/users?state=sleepy", b.url)).header("Authorization", &auth).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = c.delete(format!("{}/hub/api/users/admin", b.url)).header("Authorization", &auth).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(r.json::<Value>().await.unwrap()["message"], "Cannot delete yourself!");

    // An invalid name at sign-up shows the rule.
    let visitor = Browser::new(&b.url);
    let page = visitor.signup("bad/name", "a-good-pass-1").await;
    let msg = alert_text(&page);
    assert!(msg.contains("slash") && msg.contains("lower-case letters"), "{msg}");
    let msg = alert_text(&visitor.signup("carol", "password").await);
    assert!(msg.contains("at least 8") || msg.contains("too common"), "{msg}");
    let msg = alert_text(&visitor.signup("alice", "another-pass-1").await);
    assert!(msg.contains("already in use"), "{msg}");
    // Garbage in forms and paths is answered, not panicked on.
    let r = visitor
        .client
        .post(visitor.url("/hub/signup"))
        .body("%%%&&&==")
        .header("content-type", "application/x-www-form-urlencoded")
        .send()
        .await
        .unwrap();
    assert!(r.status().is_client_error());
    assert_eq!(visitor.get("/hub/api/users/%ff%fe").await.status(), StatusCode::FORBIDDEN);
    assert!(!b.log().contains("panicked"), "berth panicked:\n{}", b.log());
    assert_eq!(visitor.get("/hub/api/").await.status(), StatusCode::OK, "still serving");
}

#[tokio::test]
async fn api_shapes_and_pagination() {
    let b = Berth::start();
    let (admin, _alice) = admin_and_alice(&b).await;
    let token = token_for(&admin, "admin", json!({})).await;
    let c = api_client();
    let auth = format!("token {token}");
    let names: Vec<String> = (0..120).map(|i| format!("user{i:03}")).collect();
    let r = c
        .post(format!("{}/hub/api/users", b.url))
        .header("Authorization", &auth)
        .json(&json!({"usernames": names}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(r.json::<Value>().await.unwrap().as_array().unwrap().len(), 120);
    let r = c
        .post(format!("{}/hub/api/users", b.url))
        .header("Authorization", &auth)
        .json(&json!({"usernames": ["user000"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CONFLICT);
    assert_eq!(r.json::<Value>().await.unwrap()["message"], "All 1 users already exist");

    let page: Value = c
        .get(format!("{}/hub/api/users?offset=50&limit=50", b.url))
        .header("Authorization", &auth)
        .header("Accept", "application/jupyterhub-pagination+json")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(page["items"].as_array().unwrap().len(), 50);
    assert_eq!(page["_pagination"]["total"], 122);
    assert_eq!(page["_pagination"]["next"]["offset"], 100);
    let u = &page["items"][0];
    for field in
        ["kind", "name", "admin", "groups", "roles", "created", "last_activity", "server", "pending", "servers"]
    {
        assert!(u.get(field).is_some(), "user model lacks {field}: {u}");
    }
    let plain: Value = c
        .get(format!("{}/hub/api/users", b.url))
        .header("Authorization", &auth)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(plain.as_array().unwrap().len(), 122, "plain list, under the 200 cap");
    let filtered: Value = c
        .get(format!("{}/hub/api/users?name_filter=user11", b.url))
        .header("Authorization", &auth)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(filtered.as_array().unwrap().len(), 10);

    let r = c
        .patch(format!("{}/hub/api/users/user001", b.url))
        .header("Authorization", &auth)
        .json(&json!({"admin": true, "name": "renamed"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let v: Value = r.json().await.unwrap();
    assert_eq!((v["name"].as_str(), v["admin"].as_bool()), (Some("renamed"), Some(true)));
    let r = c.delete(format!("{}/hub/api/users/renamed", b.url)).header("Authorization", &auth).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let r = c.get(format!("{}/hub/api/users/renamed", b.url)).header("Authorization", &auth).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let v: Value = c.get(format!("{}/hub/api/", b.url)).send().await.unwrap().json().await.unwrap();
    assert!(v["version"].as_str().is_some());
}

/// The address the README gives (`http://<host>:27015/hub/`), with or
/// without the slash, and the bare root: a visitor is sent to log in, a
/// logged-in user home.
#[tokio::test]
async fn the_hubs_address_with_or_without_a_slash_leads_to_log_in_or_home() {
    let b = Berth::start();
    let admin = b.first_admin().await;
    let anon = Browser::new(&b.url);
    for path in ["/hub/", "/hub", "/"] {
        let r = anon.get(path).await;
        assert_eq!(r.status(), StatusCode::SEE_OTHER, "{path}");
        assert_eq!(r.headers()["location"], "/hub/login", "{path}");
        let r = admin.get(path).await;
        assert_eq!(r.status(), StatusCode::SEE_OTHER, "{path}");
        assert_eq!(r.headers()["location"], "/hub/home", "{path}");
    }
}
