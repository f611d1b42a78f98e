//! The multi-user boundary, tried as an attacker would, on the built binary.
//! Mallory runs `fixtures/attacker.py` as her server: it logs every request
//! and environment it gets and tosses cookies at the hub. Each test is named
//! for the attack it tries; next to each, the legitimate flow still works.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test
mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

const PW: &str = "mallory-pass-42x";

fn attacker_berth(extra: &[(&str, &str)]) -> Berth {
    let cmd = format!("python3 {} {{port}}", fixture("attacker.py"));
    let mut env = vec![("BERTH_LOCAL_CMD", cmd.as_str()), ("BERTH_START_TIMEOUT", "60")];
    env.extend_from_slice(extra);
    Berth::start_with(&env, &[])
}

/// What mallory's server logged, one JSON object a line.
fn attacker_log(b: &Berth, user: &str) -> Vec<Value> {
    let path: PathBuf = b.data_dir.join("home").join(user).join("attacker.log");
    std::fs::read_to_string(path).unwrap_or_default().lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

async fn start(b: &Browser, user: &str) {
    let r = b.api(Method::POST, &format!("/hub/api/users/{user}/server")).json(&json!({})).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::CREATED, "{user}'s start: {}", r.text().await.unwrap_or_default());
}

async fn token(b: &Browser, user: &str, scopes: Value) -> String {
    let r = b.api(Method::POST, &format!("/hub/api/users/{user}/tokens")).json(&json!({"scopes": scopes})).send();
    let v: Value = r.await.unwrap().json().await.unwrap();
    v["token"].as_str().unwrap_or_else(|| panic!("no token: {v}")).to_string()
}

async fn is_admin(admin: &Browser, user: &str) -> bool {
    let u: Value =
        admin.api(Method::GET, &format!("/hub/api/users/{user}")).send().await.unwrap().json().await.unwrap();
    u["admin"] == true
}

#[tokio::test]
async fn a_narrow_admin_token_gains_nothing_on_the_pages() {
    let b = attacker_berth(&[]);
    let (admin, _alice) = admin_and_user(&b, "alice", PW).await;
    let narrow = token(&admin, "admin", json!(["read:users:name!user=admin"])).await;
    let c = api_client();
    let with = |m: Method, path: &str| {
        c.request(m, format!("{}{path}", b.url)).header("Authorization", format!("token {narrow}"))
    };
    // Make alice admin, set the admin's password, add a key to alice: all refused.
    let r = with(Method::POST, "/hub/authorize/alice").form(&[("action", "make-admin")]).send().await.unwrap();
    assert!(r.status().is_client_error(), "{}", r.status());
    let r = with(Method::POST, "/hub/change-password/admin")
        .form(&[("new_password", "taken-over-42x"), ("new_password_confirmation", "taken-over-42x")])
        .send()
        .await
        .unwrap();
    assert!(r.status().is_client_error(), "{}", r.status());
    let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDrD+pwPLnX4GFu1Z/HSG1b/m6hD8HOWaOTzvucTpb88 evil";
    let r = with(Method::POST, "/hub/keys/alice").form(&[("key", key)]).send().await.unwrap();
    assert!(r.status().is_client_error(), "{}", r.status());
    // A page with only a token is a page for nobody: off to log in.
    let r = with(Method::GET, "/hub/authorize").send().await.unwrap();
    assert!(r.status().is_redirection(), "{}", r.status());
    assert!(!is_admin(&admin, "alice").await, "alice is not admin");
    Browser::new(&b.url).login_ok("admin", ADMIN_PW).await;
    let keys: Value = admin.api(Method::GET, "/hub/api/users/alice/keys").send().await.unwrap().json().await.unwrap();
    assert_eq!(keys, json!([]), "no key was added");
    // The admin's own session does all three.
    let r = admin.submit("/hub/authorize", "/hub/authorize/alice", &[("action", "make-admin")]).await;
    assert!(r.status().is_redirection());
    assert!(is_admin(&admin, "alice").await);
}

#[tokio::test]
async fn a_users_server_never_sees_a_visitors_credentials() {
    let b = attacker_berth(&[]);
    let (admin, mallory) = admin_and_user(&b, "mallory", PW).await;
    start(&mallory, "mallory").await;
    let wide = token(&admin, "admin", json!([])).await;
    // The admin visits mallory's server with a session, a header token and a query token.
    let r = admin
        .client
        .get(format!("{}/user/mallory/look?token={wide}&x=1", b.url))
        .header("Authorization", format!("token {wide}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK, "admins reach the server");
    let seen = attacker_log(&b, "mallory");
    let req = seen.iter().rev().find(|e| e["kind"] == "request" && e["path"] == "/user/mallory/look").expect("logged");
    let text = req.to_string();
    assert!(!text.contains(&wide), "the admin's token reached mallory's server: {text}");
    assert!(!text.contains("berth-session"), "the hub's session cookie reached it: {text}");
    assert_eq!(req["query"], "x=1", "the rest of the query is kept");
    // Her server's own hub API calls work (with its own token).
    let own = seen.iter().find(|e| e["kind"] == "own-identity").expect("logged its own identity call");
    assert_eq!((&own["status"], &own["name"]), (&json!(200), &json!("mallory")), "{own}");
    // A token made for her server alone is forwarded, so the server can identify a visitor.
    let scoped = token(&admin, "admin", json!(["access:servers!server=mallory/"])).await;
    api_client()
        .get(format!("{}/user/mallory/scoped", b.url))
        .header("Authorization", format!("token {scoped}"))
        .send()
        .await
        .unwrap();
    let seen = attacker_log(&b, "mallory");
    let req = seen.iter().rev().find(|e| e["path"] == "/user/mallory/scoped").expect("logged");
    assert!(req.to_string().contains(&scoped), "a token for this server alone reaches it");
}

#[tokio::test]
async fn a_users_server_cannot_set_the_hubs_cookies() {
    let b = attacker_berth(&[]);
    let (admin, mallory) = admin_and_user(&b, "mallory", PW).await;
    start(&mallory, "mallory").await;
    let r = admin.client.get(format!("{}/user/mallory/toss-cookies", b.url)).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let set: Vec<String> = r.headers().get_all("set-cookie").iter().map(|v| v.to_str().unwrap().to_string()).collect();
    let joined = set.join(" | ");
    for bad in ["berth-session=stolen", "__Host-berth-session", "berth-app=stolen", "Domain="] {
        assert!(!joined.contains(bad), "{bad} got through: {joined}");
    }
    assert!(set.iter().any(|c| c.starts_with("tossed=1; Path=/user/mallory/")), "moved under her prefix: {joined}");
    assert!(set.iter().any(|c| c.starts_with("mine=1; Path=/user/mallory/")), "{joined}");
    // The admin's session still works.
    assert_eq!(admin.get("/hub/api/user").await.status(), StatusCode::OK);
}

#[tokio::test]
async fn the_oauth_token_a_server_gets_for_an_admin_is_confined_and_revoked() {
    let b = attacker_berth(&[]);
    let (admin, mallory) = admin_and_user(&b, "mallory", PW).await;
    start(&mallory, "mallory").await;
    let env = attacker_log(&b, "mallory").into_iter().find(|e| e["kind"] == "env").expect("env logged");
    let secret = env["env"]["JUPYTERHUB_API_TOKEN"].as_str().unwrap().to_string();
    let client_id = env["env"]["JUPYTERHUB_CLIENT_ID"].as_str().unwrap().to_string();
    let callback = env["env"]["JUPYTERHUB_OAUTH_CALLBACK_URL"].as_str().unwrap().to_string();
    // The admin's browser is sent through the authorize step for mallory's server …
    let q = format!("client_id={client_id}&redirect_uri={callback}&response_type=code&state=s");
    let (status, page) = admin.get_text(&format!("/hub/api/oauth2/authorize?{q}")).await;
    // … and is asked first, naming the owner.
    assert_eq!(status, StatusCode::OK, "{page}");
    assert!(page.contains("mallory") && page.contains("consent"), "a consent page: {page}");
    let x = form_xsrf(&page).unwrap();
    let fields = [
        ("client_id", client_id.as_str()),
        ("redirect_uri", callback.as_str()),
        ("response_type", "code"),
        ("state", "s"),
        ("_xsrf", x.as_str()),
    ];
    let r = admin.client.post(admin.url("/hub/api/oauth2/authorize")).form(&fields).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::FOUND);
    let location = r.headers()["location"].to_str().unwrap().to_string();
    let code = location.split("code=").nth(1).unwrap().split('&').next().unwrap().to_string();
    // Mallory's server trades the code, as JupyterHub's single-user server does.
    let r = api_client()
        .post(format!("{}/hub/api/oauth2/token", b.url))
        .form(&[
            ("grant_type", "authorization_code"),
            ("code", code.as_str()),
            ("client_id", client_id.as_str()),
            ("client_secret", secret.as_str()),
            ("redirect_uri", callback.as_str()),
        ])
        .send()
        .await
        .unwrap();
    let grant: Value = r.json().await.unwrap();
    let access = grant["access_token"].as_str().unwrap().to_string();
    assert!(grant["expires_in"].as_i64().unwrap() <= 14 * 24 * 3600);
    let c = api_client();
    let call = |m: Method, path: &str| {
        c.request(m, format!("{}{path}", b.url)).header("Authorization", format!("token {access}"))
    };
    // It identifies the admin to mallory's server …
    let me: Value = call(Method::GET, "/hub/api/user").send().await.unwrap().json().await.unwrap();
    assert_eq!(me["name"], "admin");
    // … and does nothing else.
    assert_eq!(call(Method::GET, "/hub/api/users").send().await.unwrap().status(), StatusCode::FORBIDDEN);
    let r = call(Method::PATCH, "/hub/api/users/mallory").json(&json!({"admin": true})).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = call(Method::POST, "/hub/authorize/mallory").form(&[("action", "make-admin")]).send().await.unwrap();
    assert!(r.status().is_client_error() || r.status().is_redirection());
    assert!(!is_admin(&admin, "mallory").await);
    // The admin logs out: the token dies with the session.
    let r = admin.submit("/hub/logout", "/hub/logout", &[]).await;
    assert!(r.status().is_redirection());
    eventually("the OAuth token to be revoked at log-out", Duration::from_secs(10), || async {
        call(Method::GET, "/hub/api/user").send().await.unwrap().status() == StatusCode::FORBIDDEN
    })
    .await;
}

#[tokio::test]
async fn the_admins_name_cannot_be_claimed() {
    let b = attacker_berth(&[]);
    // Before anyone made the admin: signing up with the configured name gives nothing.
    let eve = Browser::new(&b.url);
    let msg = eve.signup("admin", "claimed-pass-42x").await;
    assert!(alert_text(&msg).contains("sent to the admin"), "{}", alert_text(&msg));
    let r = eve.login("admin", "claimed-pass-42x").await;
    assert!(alert_text(&r.text().await.unwrap()).contains("has not been authorized"));
    // The setup link makes the admin (under another name, as the name is taken).
    let root = Browser::new(&b.url);
    let link = b.setup_url.clone().expect("a setup link");
    let path = format!("/hub/{}", link.split_once("/hub/").unwrap().1);
    let code = path.split("code=").nth(1).unwrap().to_string();
    let fields =
        [("code", code.as_str()), ("username", "root"), ("password", ADMIN_PW), ("password_confirmation", ADMIN_PW)];
    let r = root.submit(&path, "/hub/setup", &fields).await;
    assert_eq!(r.status(), StatusCode::FOUND);
    // The link works once.
    let (status, _) = Browser::new(&b.url).get_text(&path).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // Deleting the admin does not reopen setup, even after a restart.
    let (code, out, err) = b.cli(&["user", "add", "second", "--admin", "--password-stdin"], Some("second-pass-42x\n"));
    assert_eq!(code, 0, "{out}{err}");
    let r = root.api(Method::PATCH, "/hub/api/users/root").json(&json!({"name": "renamed"})).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let (code, out, err) = b.cli(&["user", "delete", "renamed"], None);
    assert_eq!(code, 0, "{out}{err}");
    let mut b = b;
    b.kill9_and_restart();
    assert!(b.setup_url.is_none(), "no new setup link once an admin existed");
    let eve2 = Browser::new(&b.url);
    eve2.signup("root", "claimed-pass-42x").await;
    let r = eve2.login("root", "claimed-pass-42x").await;
    assert!(alert_text(&r.text().await.unwrap()).contains("has not been authorized"), "a new root is pending");
}

#[tokio::test]
async fn start_options_are_a_closed_set() {
    let b = attacker_berth(&[]);
    let (_admin, mallory) = admin_and_user(&b, "mallory", PW).await;
    for (body, says) in [
        (json!({"image": "evil.example/evil:latest"}), "image"),
        (json!({"routing": "host"}), "routing"),
        (json!({"cmd": ["sh", "-c", "id"]}), "cmd"),
    ] {
        let r = mallory.api(Method::POST, "/hub/api/users/mallory/server").json(&body).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{body}");
        let m: Value = r.json().await.unwrap();
        assert!(m["message"].as_str().unwrap().contains(says), "{body}: {m}");
    }
    start(&mallory, "mallory").await;
}

#[tokio::test]
async fn logout_takes_a_post_and_next_stays_on_the_hub() {
    let b = attacker_berth(&[]);
    let (_admin, mallory) = admin_and_user(&b, "mallory", PW).await;
    let r = mallory.get("/hub/logout").await;
    assert_eq!(r.status(), StatusCode::OK, "a GET shows a button");
    assert_eq!(mallory.get("/hub/api/user").await.status(), StatusCode::OK, "and logs nobody out");
    for next in [
        "//evil.example/",
        "/\\evil.example",
        "https://evil.example/",
        "/%2F%2Fevil.example",
        "/hub/x%0d%0aSet-Cookie:a=b",
    ] {
        let v = Browser::new(&b.url);
        let enc = percent_encoding::utf8_percent_encode(next, percent_encoding::NON_ALPHANUMERIC).to_string();
        let r = v
            .submit("/hub/login", &format!("/hub/login?next={enc}"), &[("username", "mallory"), ("password", PW)])
            .await;
        assert_eq!(r.status(), StatusCode::FOUND, "{next}");
        assert_eq!(r.headers()["location"], "/hub/home", "next={next:?}");
    }
    let r = mallory.submit("/hub/logout", "/hub/logout", &[]).await;
    assert!(r.status().is_redirection());
    assert_eq!(mallory.get("/hub/api/user").await.status(), StatusCode::FORBIDDEN, "a POST logs out");
}

#[tokio::test]
async fn strangers_cannot_lock_the_admin_out() {
    let b = attacker_berth(&[]);
    let _admin = b.first_admin().await;
    // A stranger guesses from another address (loopback has 127.0.0.0/8 to pick from).
    let stranger = reqwest::Client::builder()
        .local_address(std::net::IpAddr::from([127, 0, 0, 2]))
        .redirect(reqwest::redirect::Policy::none())
        .cookie_store(true)
        .build()
        .unwrap();
    let s = Browser { base: b.url.clone(), jar: std::sync::Arc::default(), client: stranger };
    for _ in 0..8 {
        s.login("admin", "wrong-guess-000").await;
    }
    let r = s.login("admin", ADMIN_PW).await;
    assert!(alert_text(&r.text().await.unwrap()).contains("Too many failed"), "the stranger's address is locked");
    // The admin, from their own address, still gets in.
    Browser::new(&b.url).login_ok("admin", ADMIN_PW).await;
}

#[tokio::test]
async fn over_the_connection_cap_clients_get_a_clear_503() {
    let b = attacker_berth(&[("BERTH_MAX_CONNECTIONS", "3"), ("BERTH_CLIENT_TIMEOUT", "30")]);
    let addr = b.url.trim_start_matches("http://").to_string();
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(std::net::TcpStream::connect(&addr).unwrap());
    }
    let r = api_client().get(format!("{}/hub/api/", b.url)).send().await;
    let r = r.unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(r.text().await.unwrap().contains("maximum of connections"));
    drop(held);
    eventually("a place to free up", Duration::from_secs(10), || async {
        api_client().get(format!("{}/hub/api/", b.url)).send().await.is_ok_and(|r| r.status() == StatusCode::OK)
    })
    .await;
}

#[tokio::test]
async fn a_silent_client_is_cut_off() {
    use std::io::{Read, Write};
    let b = attacker_berth(&[("BERTH_CLIENT_TIMEOUT", "2")]);
    let addr = b.url.trim_start_matches("http://").to_string();
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(b"GET /hub/api/ HTTP/1.1\r\nHost: x\r\n").unwrap(); // and never the end of the headers
    let t0 = std::time::Instant::now();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let waited = t0.elapsed();
    assert!(waited < Duration::from_secs(15), "closed by berth, not by our read time-out ({waited:?})");
    assert!(waited >= Duration::from_millis(1500), "after the client time-out, not at once ({waited:?})");
}

#[tokio::test]
async fn berths_files_are_its_own() {
    use std::os::unix::fs::PermissionsExt;
    let b = Berth::start_with(&[("BERTH_TLS", "auto")], &[]);
    let mode = |p: PathBuf| std::fs::metadata(&p).map(|m| m.permissions().mode() & 0o777).unwrap_or(0);
    assert_eq!(mode(b.data_dir.join("berth.sqlite")), 0o600);
    assert_eq!(mode(b.data_dir.join("cookie_secret")), 0o600);
    assert_eq!(mode(b.data_dir.clone()), 0o711);
    assert!(!b.data_dir.join("tls").join("ca-key.pem").exists(), "the authority's key is not kept");
    let out = std::process::Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in"])
        .arg(b.data_dir.join("tls").join("ca.pem"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Name Constraints") && text.contains("DNS:localhost"), "{text}");
}

#[tokio::test]
async fn withdrawing_an_account_or_its_password_revokes_its_tokens() {
    let b = attacker_berth(&[]);
    let (admin, mallory) = admin_and_user(&b, "mallory", PW).await;
    let alice = authorized_user(&b, &admin, "alice", "alice-pass-42x").await;
    let works = |t: String| {
        let url = format!("{}/hub/api/user", b.url);
        async move {
            api_client().get(url).header("Authorization", format!("token {t}")).send().await.unwrap().status()
                == StatusCode::OK
        }
    };
    // Unauthorized: every token of mallory's stops working.
    let t = token(&mallory, "mallory", json!([])).await;
    assert!(works(t.clone()).await);
    let r =
        admin.api(Method::PATCH, "/hub/api/users/mallory").json(&json!({"authorized": false})).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = admin.api(Method::PATCH, "/hub/api/users/mallory").json(&json!({"authorized": true})).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(!works(t).await, "revoked, not only suspended");
    // alice changes her password: her tokens go, the session she did it from stays.
    let t = token(&alice, "alice", json!([])).await;
    let r = alice
        .submit(
            "/hub/change-password",
            "/hub/change-password",
            &[
                ("old_password", "alice-pass-42x"),
                ("new_password", "alice-new-pass-77"),
                ("new_password_confirmation", "alice-new-pass-77"),
            ],
        )
        .await;
    assert!(alert_text(&r.text().await.unwrap()).contains("changed successfully"));
    assert!(!works(t).await, "a password change revokes the tokens");
    assert_eq!(alice.get("/hub/api/user").await.status(), StatusCode::OK, "this session stays");
}

/// The edge remembers a verified credential for a few seconds, so a proxied
/// request costs no database round trip; a revocation made in berth (a token
/// deleted, a log-out) ends that at once: the revoked token and the ended
/// session's cookie, replayed, reach the server no more on the very next
/// request. (Changes made by another process, the CLI, take effect within
/// the cache's 5 s; see docs/security.md.)
#[tokio::test]
async fn a_revoked_token_or_ended_session_reaches_the_server_no_more() {
    let b = attacker_berth(&[]);
    let (_admin, mallory) = admin_and_user(&b, "mallory", PW).await;
    start(&mallory, "mallory").await;
    let reached = |path: &str| attacker_log(&b, "mallory").iter().any(|e| e["kind"] == "request" && e["path"] == path);
    let r = mallory.api(Method::POST, "/hub/api/users/mallory/tokens").json(&json!({"note": "edge"})).send();
    let v: Value = r.await.unwrap().json().await.unwrap();
    let (t, id) = (v["token"].as_str().unwrap().to_string(), v["id"].as_str().unwrap().to_string());
    let with_token =
        |path: &str| api_client().get(format!("{}{path}", b.url)).header("Authorization", format!("token {t}")).send();
    for _ in 0..3 {
        assert_eq!(with_token("/user/mallory/token-before").await.unwrap().status(), StatusCode::OK);
    }
    assert!(reached("/user/mallory/token-before"));
    let r = mallory.api(Method::DELETE, &format!("/hub/api/users/mallory/tokens/{id}")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let r = with_token("/user/mallory/token-after").await.unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN, "a revoked token is refused on the next request");
    assert!(!reached("/user/mallory/token-after"), "and its request never reaches the server");

    // The session: its cookie works through the proxy, then mallory logs out
    // and someone replays the cookie she had.
    for _ in 0..3 {
        assert_eq!(mallory.get("/user/mallory/session-before").await.status(), StatusCode::OK);
    }
    let session = mallory.cookie("/hub/", "berth-session").expect("a session cookie");
    let r = mallory.submit("/hub/logout", "/hub/logout", &[]).await;
    assert!(r.status().is_redirection());
    let r = api_client()
        .get(format!("{}/user/mallory/session-after", b.url))
        .header("Cookie", format!("berth-session={session}"))
        .header("Accept", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN, "an ended session's cookie is refused on the next request");
    assert!(reached("/user/mallory/session-before"));
    assert!(!reached("/user/mallory/session-after"), "and its request never reaches the server");
}
