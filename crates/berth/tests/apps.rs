//! Issue 5's hub acceptance: templates as named servers side by side, the
//! named-server limit, and the three routing modes through berth's proxy
//! with real apps from PyPI (jupyter_server for `prefix`, httpbin for
//! `strip` and `host`), run by the local-process spawner.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test
mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use reqwest::cookie::{CookieStore, Jar};
use reqwest::{Method, StatusCode, Url};
use serde_json::{json, Value};

const PW: &str = "apps-pass-42x";

fn venv() -> String {
    let cmd = singleuser_cmd();
    Path::new(&cmd).parent().unwrap().to_str().unwrap().to_string()
}

/// A catalog of test templates running apps from the test virtualenv.
fn catalog(dir: &Path) {
    let bin = venv();
    let templates = [
        (
            "jserver",
            format!(
                "{bin}/jupyter-server --ServerApp.ip=127.0.0.1 --ServerApp.port={{port}} --ServerApp.base_url={{base_url}} \
                 --IdentityProvider.token= --ServerApp.password= --ServerApp.open_browser=False --allow-root --ServerApp.root_dir=/tmp"
            ),
            r#"["prefix"]"#,
        ),
        ("hbstrip", format!("{bin}/python -m httpbin.core --host 127.0.0.1 --port {{port}}"), r#"["strip"]"#),
        ("hbhost", format!("{bin}/python -m httpbin.core --host 127.0.0.1 --port {{port}}"), r#"["host"]"#),
    ];
    for (id, cmd, routing) in templates {
        // hbstrip wants a GPU by default; on this hub without GPUs a start
        // that does not ask takes the template's minimum instead.
        let default_gpus = if id == "hbstrip" { 1 } else { 0 };
        let d = dir.join(id);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(
            d.join("template.toml"),
            format!(
                r#"id = "{id}"
name = "Test {id}"
description = "{id} from the test virtualenv"
category = "Tests"
base_image = "unused-by-the-local-spawner"
estimated_size = "1 MB"
use_case = "tests"
start_mode = "app"

[app]
command = {cmd:?}
port = 27015
routing = {routing}

[gpus]
min = 0
default = {default_gpus}
max = 1

[ssh]
password_authentication = false
pubkey_authentication = true

[build]
workdir = "/app"
expose = [22, 27015]
"#
            ),
        )
        .unwrap();
    }
    let (code, out, err) = run_cli(&["templates", "render", dir.to_str().unwrap()], None, None);
    assert_eq!(code, 0, "{out}{err}");
}

/// `POST /hub/api/users/<user>/servers/<server>` with `body`.
async fn post_server(b: &Browser, user: &str, server: &str, body: Value) -> reqwest::Response {
    b.api(Method::POST, &format!("/hub/api/users/{user}/servers/{server}")).json(&body).send().await.unwrap()
}

async fn start_template(b: &Browser, user: &str, server: &str, template: &str) -> Value {
    let r = post_server(b, user, server, json!({"template": template})).await;
    assert!(r.status().is_success(), "start {server}: {} {}", r.status(), r.text().await.unwrap());
    wait_progress(b, &format!("/hub/api/users/{user}/servers/{server}/progress")).await
}

#[tokio::test]
async fn templates_side_by_side_prefix_and_strip_modes_and_the_server_limit() {
    let tmp = tempfile::tempdir().unwrap();
    let cat = tmp.path().join("catalog");
    catalog(&cat);
    let b = Berth::start_with(&[("BERTH_TEMPLATES_DIR", cat.to_str().unwrap()), ("BERTH_MAX_NAMED_SERVERS", "2")], &[]);
    let (admin, alice) = admin_and_user(&b, "alice", PW).await;
    let bob = authorized_user(&b, &admin, "bob", PW).await;

    // The start page offers the templates by category; the host-only one
    // says it needs host routing.
    let (_, home) = alice.get_text("/hub/home").await;
    assert!(home.contains("Start an environment") && home.contains(r#"<optgroup label="Tests">"#), "{home}");
    let row = home.split(r#"<tr id="template-hbhost">"#).nth(1).unwrap().split("</tr>").next().unwrap();
    assert!(row.contains("app_domain"), "{row}");

    // Bad choices are refused with a reason.
    for (body, want) in [
        (json!({"template": "nope"}), "no template"),
        (json!({"template": "jserver", "gpus": 5}), "between 0 and 1 GPUs"),
        (json!({"template": "hbhost"}), "only on its own host name"),
    ] {
        let r = post_server(&alice, "alice", "x", body.clone()).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{body}");
        let m: Value = r.json().await.unwrap();
        assert!(m["message"].as_str().unwrap().contains(want), "{m}");
    }

    // prefix: jupyter_server, told its base URL, emits absolute URLs under it.
    let ev = start_template(&alice, "alice", "jserver", "jserver").await;
    assert_eq!(ev["ready"], true, "{ev}\n{}", b.log());
    let (status, page) = alice.get_text("/user/alice/jserver/").await;
    assert_eq!(status, StatusCode::OK);
    let css = page.split(r#"rel="stylesheet" href=""#).nth(1).unwrap().split('"').next().unwrap().to_string();
    assert!(css.starts_with("/user/alice/jserver/static/"), "absolute URL under the prefix: {css}");
    assert_eq!(alice.get(&css).await.status(), StatusCode::OK, "following it works");
    let r = alice.get("/user/alice/jserver/api/status").await;
    assert_eq!(r.status(), StatusCode::OK);
    let status: Value = r.json().await.unwrap();
    assert!(status.get("started").is_some(), "{status}");

    // strip: httpbin answers at / and its redirects and cookies come back under the prefix.
    // Started from the page, as a user would.
    let r = alice.submit("/hub/home", "/hub/spawn-template", &[("template", "hbstrip"), ("gpus", "")]).await;
    assert_eq!(r.status(), StatusCode::FOUND);
    assert_eq!(r.headers()["location"], "/hub/spawn-pending/alice/hbstrip");
    let ev = wait_progress(&alice, "/hub/api/users/alice/servers/hbstrip/progress").await;
    assert_eq!(ev["ready"], true, "{ev}\n{}", b.log());
    let r = alice.get("/user/alice/hbstrip/redirect-to?url=/get").await;
    assert_eq!(r.status(), StatusCode::FOUND);
    assert_eq!(r.headers()["location"], "/user/alice/hbstrip/get", "the redirect was rewritten");
    let r = alice.get("/user/alice/hbstrip/get?x=1").await;
    assert_eq!(r.status(), StatusCode::OK);
    let got: Value = r.json().await.unwrap();
    assert_eq!(got["args"]["x"], "1", "{got}");
    let r = alice.get("/user/alice/hbstrip/cookies/set?flavour=oat").await;
    let set = r.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(set.contains("Path=/user/alice/hbstrip/"), "cookie path rewritten: {set}");
    assert!(alice.cookie("/user/alice/hbstrip/cookies", "flavour").is_some());
    assert!(alice.cookie("/hub/home", "flavour").is_none(), "the app's cookie stays under its prefix");

    // Both run at once, each at its own prefix; bob may enter neither.
    let model: Value = alice.api(Method::GET, "/hub/api/users/alice").send().await.unwrap().json().await.unwrap();
    assert_eq!(model["servers"]["jserver"]["ready"], true, "{model}");
    assert_eq!(model["servers"]["hbstrip"]["ready"], true, "{model}");
    assert_eq!(bob.get("/user/alice/hbstrip/get").await.status(), StatusCode::FORBIDDEN);

    // The limit (2 named servers) refuses a third, saying why.
    let r = post_server(&alice, "alice", "third", json!({"template": "hbstrip"})).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let m: Value = r.json().await.unwrap();
    assert!(m["message"].as_str().unwrap().contains("the limit is 2"), "{m}");
    let r = alice.submit("/hub/home", "/hub/spawn-template", &[("template", "hbhost")]).await;
    assert!(!r.status().is_success() && !r.status().is_redirection(), "{}", r.status());

    // An admin limits bob to one template and one named server.
    let r =
        bob.api(Method::PUT, "/hub/api/users/bob/limits").json(&json!({"max_named_servers": 9})).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN, "users cannot lift their own limits");
    let r = admin
        .api(Method::PUT, "/hub/api/users/bob/limits")
        .json(&json!({"max_named_servers": 1, "templates": ["hbstrip"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK, "{}", r.text().await.unwrap());
    let r =
        admin.api(Method::PUT, "/hub/api/users/bob/limits").json(&json!({"templates": ["nope"]})).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let (_, bob_home) = bob.get_text("/hub/home").await;
    assert!(
        bob_home.contains(r#"value="hbstrip""#) && !bob_home.contains(r#"value="jserver""#),
        "only his template is offered"
    );
    let r = post_server(&bob, "bob", "jserver", json!({"template": "jserver"})).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let m: Value = r.json().await.unwrap();
    assert!(m["message"].as_str().unwrap().contains("may not start the template"), "{m}");
    let ev = start_template(&bob, "bob", "hbstrip", "hbstrip").await;
    assert_eq!(ev["ready"], true, "{ev}");
    let r = post_server(&bob, "bob", "two", json!({"template": "hbstrip"})).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let m: Value = r.json().await.unwrap();
    assert!(m["message"].as_str().unwrap().contains("the limit is 1"), "{m}");
}

/// A browser that resolves the hub's and the apps' host names to loopback.
fn browser_for(port: u16, hosts: &[&str]) -> (reqwest::Client, Arc<Jar>) {
    let jar = Arc::new(Jar::default());
    let mut b = reqwest::Client::builder()
        .cookie_provider(jar.clone())
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(60));
    for h in hosts {
        b = b.resolve(h, std::net::SocketAddr::from(([127, 0, 0, 1], port)));
    }
    (b.build().unwrap(), jar)
}

#[tokio::test]
async fn host_mode_serves_the_app_at_root_on_its_own_host_with_its_own_cookie() {
    let tmp = tempfile::tempdir().unwrap();
    let cat = tmp.path().join("catalog");
    catalog(&cat);
    let b =
        Berth::start_with(&[("BERTH_TEMPLATES_DIR", cat.to_str().unwrap()), ("BERTH_APP_DOMAIN", "apps.test")], &[]);
    let port: u16 = b.url.rsplit(':').next().unwrap().parse().unwrap();
    let (admin, alice_b) = admin_and_user(&b, "alice", PW).await;
    let _bob = authorized_user(&b, &admin, "bob", PW).await;
    let ev = start_template(&alice_b, "alice", "hbhost", "hbhost").await;
    assert_eq!(ev["ready"], true, "{ev}\n{}", b.log());
    let app_url = format!("http://hbhost--alice.apps.test:{port}/");
    assert_eq!(ev["url"], app_url.as_str(), "the server's URL is its own host");

    // alice in a browser that reaches the hub at apps.test.
    let hub = format!("http://apps.test:{port}");
    let (client, jar) = browser_for(port, &["apps.test", "hbhost--alice.apps.test"]);
    let login = Browser { base: hub.clone(), jar: jar.clone(), client: client.clone() };
    login.login_ok("alice", PW).await;

    // First visit: to the hub and back with a one-time code.
    let r = client.get(format!("{app_url}get?x=2")).send().await.unwrap();
    assert!(r.status().is_redirection(), "{}", r.status());
    let to_hub = r.headers()["location"].to_str().unwrap().to_string();
    assert!(to_hub.starts_with(&format!("{hub}/hub/app-login?host=hbhost--alice.apps.test")), "{to_hub}");
    let r = client.get(&to_hub).send().await.unwrap();
    assert!(r.status().is_redirection(), "{}", r.status());
    let with_code = r.headers()["location"].to_str().unwrap().to_string();
    assert!(with_code.starts_with(&format!("{app_url}_berth/auth?code=")), "{with_code}");
    let r = client.get(&with_code).send().await.unwrap();
    assert!(r.status().is_redirection());
    let set = r.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(set.starts_with("berth-app=") && !set.to_ascii_lowercase().contains("domain="), "host-only: {set}");
    assert_eq!(r.headers()["location"], "/get?x=2");
    // The code works once.
    assert_eq!(client.get(&with_code).send().await.unwrap().status(), StatusCode::FORBIDDEN);

    // The app at / on its own host.
    let r = client.get(format!("{app_url}get?x=2")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let got: Value = r.json().await.unwrap();
    assert_eq!(got["args"]["x"], "2");
    let cookie_seen = got["headers"]["Cookie"].as_str().unwrap_or("");
    assert!(!cookie_seen.contains("berth-session") && !cookie_seen.contains("berth-app"), "{cookie_seen}");

    // The app's cookie stays on the app's host; the hub's never goes there.
    let r = client.get(format!("{app_url}cookies/set?appcookie=1")).send().await.unwrap();
    assert!(r.status().is_redirection());
    let hub_cookies = jar.cookies(&Url::parse(&format!("{hub}/hub/")).unwrap()).unwrap();
    assert!(!hub_cookies.to_str().unwrap().contains("appcookie"), "{hub_cookies:?}");
    let app_cookies = jar.cookies(&Url::parse(&app_url).unwrap()).unwrap();
    let app_cookies = app_cookies.to_str().unwrap();
    assert!(app_cookies.contains("appcookie=1") && !app_cookies.contains("berth-session"), "{app_cookies}");

    // bob cannot get a code for alice's app, nor use hers.
    let (bob_client, bob_jar) = browser_for(port, &["apps.test", "hbhost--alice.apps.test"]);
    Browser { base: hub.clone(), jar: bob_jar, client: bob_client.clone() }.login_ok("bob", PW).await;
    let r = bob_client.get(&to_hub).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = bob_client.get(format!("{app_url}get")).send().await.unwrap();
    assert!(r.status().is_redirection(), "no cookie: sent to log in");
    // Unknown app hosts are not served.
    let (c3, _) = browser_for(port, &["nope--alice.apps.test"]);
    let r = c3.get(format!("http://nope--alice.apps.test:{port}/")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
}

/// Visits `url` on an app host the way a browser does: to the hub and back
/// with a one-time code when it has no app cookie yet. The final status.
async fn host_visit(client: &reqwest::Client, url: &str) -> StatusCode {
    let mut next = url.to_string();
    for _ in 0..4 {
        let r = client.get(&next).send().await.unwrap();
        if !r.status().is_redirection() {
            return r.status();
        }
        let to = r.headers()["location"].to_str().unwrap().to_string();
        next = if to.starts_with('/') {
            format!("{}{to}", url.split("/get").next().unwrap().trim_end_matches('/'))
        } else {
            to
        };
    }
    panic!("too many redirects from {url}");
}

#[tokio::test]
async fn host_and_path_routed_servers_admit_the_same_callers() {
    let tmp = tempfile::tempdir().unwrap();
    let cat = tmp.path().join("catalog");
    catalog(&cat);
    let b =
        Berth::start_with(&[("BERTH_TEMPLATES_DIR", cat.to_str().unwrap()), ("BERTH_APP_DOMAIN", "apps.test")], &[]);
    let port: u16 = b.url.rsplit(':').next().unwrap().parse().unwrap();
    let (admin, alice) = admin_and_user(&b, "alice", PW).await;
    let bob = authorized_user(&b, &admin, "bob", PW).await;
    for t in ["hbstrip", "hbhost"] {
        let ev = start_template(&alice, "alice", t, t).await;
        assert_eq!(ev["ready"], true, "{ev}\n{}", b.log());
    }
    let path_url = format!("{}/user/alice/hbstrip/get", b.url);
    let host_url = format!("http://hbhost--alice.apps.test:{port}/get");
    let hub = format!("http://apps.test:{port}");

    // Sessions: each visitor's browser, logged in at the hub.
    for (who, password, admitted) in [("alice", PW, true), ("admin", "admin-pass-42x", true), ("bob", PW, false)] {
        let (client, jar) = browser_for(port, &["apps.test", "hbhost--alice.apps.test"]);
        let browser = Browser { base: hub.clone(), jar, client: client.clone() };
        browser.login_ok(who, password).await;
        let on_path = browser.client.get(path_url.replace(&b.url, &hub)).send().await.unwrap().status();
        let on_host = host_visit(&client, &host_url).await;
        assert_eq!(on_path.is_success(), admitted, "{who} by path: {on_path}");
        assert_eq!(on_host.is_success(), admitted, "{who} by host: {on_host}");
    }

    // Tokens, in the Authorization header of both.
    let token = |b: Browser, user: &'static str, scopes: Value| async move {
        let r = b.api(Method::POST, &format!("/hub/api/users/{user}/tokens")).json(&json!({"scopes": scopes})).send();
        r.await.unwrap().json::<Value>().await.unwrap()["token"].as_str().unwrap().to_string()
    };
    let cases = [
        ("alice, all of hers", token(alice.clone(), "alice", json!([])).await, true),
        ("alice, read-only", token(alice.clone(), "alice", json!(["read:users!user=alice"])).await, false),
        (
            "alice, this one server",
            token(
                alice.clone(),
                "alice",
                json!(["access:servers!server=alice/hbhost", "access:servers!server=alice/hbstrip"]),
            )
            .await,
            true,
        ),
        ("bob", token(bob.clone(), "bob", json!([])).await, false),
        ("admin", token(admin.clone(), "admin", json!([])).await, true),
    ];
    let (client, _) = browser_for(port, &["hbhost--alice.apps.test"]);
    for (who, t, admitted) in cases {
        let auth = format!("token {t}");
        let on_path = client.get(&path_url).header("Authorization", &auth).send().await.unwrap().status();
        let on_host = client.get(&host_url).header("Authorization", &auth).send().await.unwrap().status();
        assert_eq!(
            (on_path.is_success(), on_host.is_success()),
            (admitted, admitted),
            "{who}: path {on_path}, host {on_host}"
        );
    }
}
