//! In a real browser: headless Chromium (Debian's `chromium`), driven over
//! WebDriver by Debian's `chromium-driver` through `fantoccini`.
//!
//! Users' servers share the hub's origin, so what stops a page of theirs
//! from using the hub as its visitor is the browser obeying the hub's
//! headers (`X-Frame-Options`, `Content-Security-Policy`,
//! `Cross-Origin-Opener-Policy`). Only a browser can show that they hold,
//! and that the hub's own pages still work under them.
//!
//! The browser reaches 127.0.0.1 only: every host name resolves to nothing,
//! anything else goes to a proxy on a closed loopback port, and Chromium's
//! background services are off.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test
mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use fantoccini::{Client, ClientBuilder, Locator};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

/// A server that answers HTTP at once: Python's own, serving its working directory (the user's home).
const HTTP_SERVER: &str = "python3 -m http.server {port} --bind 127.0.0.1";
const MALLORY_PW: &str = "mallory-pass-42x";

fn chromium() -> String {
    std::env::var("BERTH_TEST_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into())
}

fn chromedriver() -> String {
    std::env::var("BERTH_TEST_CHROMEDRIVER").unwrap_or_else(|_| "/usr/bin/chromedriver".into())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A chromedriver on a free loopback port, in its own process group with
/// the browsers it starts; the group is killed when dropped.
struct Driver {
    child: Child,
    url: String,
    log: PathBuf,
    dir: tempfile::TempDir,
}

impl Driver {
    async fn start() -> Driver {
        for (path, package) in [(chromium(), "chromium"), (chromedriver(), "chromium-driver")] {
            assert!(
                Path::new(&path).is_file(),
                "{path} is missing: run the tests through scripts/test, which installs Debian's {package}"
            );
        }
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("chromedriver.log");
        let port = free_port();
        let child = std::os::unix::process::CommandExt::process_group(
            Command::new(chromedriver()).arg(format!("--port={port}")).arg(format!("--log-path={}", log.display())),
            0,
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromedriver");
        let mut d = Driver { child, url: format!("http://127.0.0.1:{port}"), log, dir };
        let status = format!("{}/status", d.url);
        let client = api_client();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = client.get(&status).send().await {
                if r.json::<Value>().await.is_ok_and(|v| v["value"]["ready"] == true) {
                    return d;
                }
            }
            if let Ok(Some(exit)) = d.child.try_wait() {
                panic!("chromedriver exited ({exit}); its log:\n{}", d.log());
            }
            assert!(Instant::now() < deadline, "chromedriver did not answer within 30 s; its log:\n{}", d.log());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A new headless browser session with a fresh profile.
    async fn browser(&self) -> Client {
        let profile = self.dir.path().join(format!("profile-{}", free_port()));
        let args = [
            "--headless=new",
            // Root in a container: Chromium's sandbox needs user namespaces it may not have.
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--window-size=1200,900",
            "--no-first-run",
            "--no-default-browser-check",
            "--password-store=basic",
            // 127.0.0.1 only: no name resolves, every other address goes to a closed port.
            "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
            "--proxy-server=http://127.0.0.1:9",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-client-side-phishing-detection",
            "--disable-domain-reliability",
            "--disable-sync",
            "--disable-default-apps",
            "--disable-extensions",
            "--no-pings",
            "--dns-prefetch-disable",
            "--metrics-recording-only",
            "--disable-features=Translate,OptimizationHints,MediaRouter,DialMediaRouteProvider,AutofillServerCommunication,CertificateTransparencyComponentUpdater,InterestFeedContentSuggestions",
        ];
        let mut args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        args.push(format!("--user-data-dir={}", profile.display()));
        let mut caps = serde_json::Map::new();
        caps.insert("browserName".into(), json!("chrome"));
        caps.insert("goog:chromeOptions".into(), json!({"binary": chromium(), "args": args}));
        ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&self.url)
            .await
            .unwrap_or_else(|e| panic!("no browser session: {e}; chromedriver's log:\n{}", self.log()))
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // The group: chromedriver and the Chromium processes it started.
        let _ = Command::new("kill").arg("-KILL").arg("--").arg(format!("-{}", self.child.id())).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `f` until it gives a value, or `None` after `timeout`.
async fn poll<T, F, Fut>(timeout: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Where the browser is and what it shows, for failure messages.
async fn where_is(c: &Client) -> String {
    let url = c.current_url().await.map(|u| u.to_string()).unwrap_or_default();
    let title = c.title().await.unwrap_or_default();
    let text = c.execute("return document.body ? document.body.innerText : '';", vec![]).await.unwrap_or_default();
    format!(
        "at {url} ({title:?}), showing:\n{}",
        text.as_str().unwrap_or_default().chars().take(3000).collect::<String>()
    )
}

/// Logs `name` into the hub through its log-in page.
async fn log_in(c: &Client, base: &str, name: &str, password: &str) {
    c.goto(&format!("{base}/hub/login")).await.unwrap();
    c.find(Locator::Css("#username_input")).await.unwrap().send_keys(name).await.unwrap();
    c.find(Locator::Css("#password_input")).await.unwrap().send_keys(password).await.unwrap();
    c.find(Locator::Css("#login_submit")).await.unwrap().click().await.unwrap();
    let home = format!("{base}/hub/home");
    let at_home = poll(Duration::from_secs(30), || async {
        c.current_url().await.ok().filter(|u| u.as_str() == home).map(|_| ())
    })
    .await;
    assert!(at_home.is_some(), "{name} did not reach the home page after logging in; {}", where_is(c).await);
}

/// The user's tokens through the API, by id: their notes.
async fn tokens(b: &Browser, user: &str) -> BTreeMap<String, String> {
    let r = b.api(Method::GET, &format!("/hub/api/users/{user}/tokens")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let v: Value = r.json().await.unwrap();
    v["api_tokens"]
        .as_array()
        .expect("api_tokens")
        .iter()
        .map(|t| (t["id"].as_str().unwrap().to_string(), t["note"].as_str().unwrap_or_default().to_string()))
        .collect()
}

/// What mallory's pages share: they report into the title (`evil: …`) and,
/// given a hub page's `_xsrf`, post the token form with it.
const EVIL_COMMON: &str = r#"
function report(s) { document.getElementById("result").textContent = s; document.title = "evil: " + s; }
function mint(xsrf, note) {
  var body = new URLSearchParams({_xsrf: xsrf, note: note, expires_in: "0", scopes: ""});
  fetch("/hub/token", {method: "POST", body: body, credentials: "same-origin"}).then(function (r) {
    return r.text().then(function (t) {
      report(t.indexOf('id="new-token"') >= 0 ? "minted a token" : "read the _xsrf, but the post was refused (" + r.status + ")");
    });
  }, function (e) { report("read the _xsrf, but the post failed: " + e); });
}
"#;

/// Frames `/hub/token`, reads its `_xsrf` field, posts the token form.
fn evil_frame_page() -> String {
    format!(
        r#"<!doctype html><html><head><meta charset="utf-8"><title>evil: running</title></head><body>
<p id="result">running</p><iframe id="hub" src="/hub/token" width="800" height="400"></iframe>
<script>{EVIL_COMMON}
var frame = document.getElementById("hub"), settled = false;
frame.addEventListener("load", function () {{
  settled = true;
  var doc = null, why = "";
  try {{ doc = frame.contentDocument; }} catch (e) {{ why = String(e); }}
  if (!doc) {{ report("blocked: the frame is out of reach " + why); return; }}
  var x = doc.querySelector('input[name="_xsrf"]');
  if (!x) {{ report("blocked: no _xsrf field in the frame (" + doc.URL + ")"); return; }}
  mint(x.value, "pwned-by-frame");
}});
setTimeout(function () {{ if (!settled) report("blocked: the frame never loaded"); }}, 10000);
</script></body></html>"#
    )
}

/// Opens `/hub/token` in a window of its own and tries the same through it.
fn evil_window_page() -> String {
    format!(
        r#"<!doctype html><html><head><meta charset="utf-8"><title>evil: running</title></head><body>
<p id="result">running</p>
<script>{EVIL_COMMON}
var w = window.open("/hub/token", "hub"), t0 = Date.now();
function look() {{
  if (!w) {{ report("blocked: no window opened"); return; }}
  var x = null;
  try {{
    var d = w.document;
    if (d && d.location.pathname === "/hub/token" && d.readyState === "complete") x = d.querySelector('input[name="_xsrf"]');
  }} catch (e) {{ report("blocked: the window is out of reach " + e); return; }}
  if (x) {{ mint(x.value, "pwned-by-window"); return; }}
  if (w.closed) {{ report("blocked: the window is out of reach (its handle is closed)"); return; }}
  if (Date.now() - t0 > 10000) {{ report("blocked: no hub page in the window"); return; }}
  setTimeout(look, 50);
}}
look();
</script></body></html>"#
    )
}

/// Opens mallory's page and waits for what it reports.
async fn run_evil_page(c: &Client, url: &str) -> String {
    c.goto(url).await.unwrap();
    let title = poll(Duration::from_secs(30), || async {
        c.title().await.ok().filter(|t| t.starts_with("evil: ") && t != "evil: running")
    })
    .await;
    match title {
        Some(t) => t,
        None => panic!("{url} reported nothing; {}", where_is(c).await),
    }
}

#[tokio::test]
async fn a_users_server_cannot_frame_the_hub_to_mint_a_token() {
    let b = Berth::start_with(&[("BERTH_LOCAL_CMD", HTTP_SERVER), ("BERTH_START_TIMEOUT", "60")], &[]);
    // mallory's server serves her home: these files are /user/mallory/evil-*.html.
    let pages = b.data_dir.join("home/mallory/user/mallory");
    std::fs::create_dir_all(&pages).unwrap();
    std::fs::write(pages.join("evil-frame.html"), evil_frame_page()).unwrap();
    std::fs::write(pages.join("evil-window.html"), evil_window_page()).unwrap();
    let (admin, mallory) = admin_and_user(&b, "mallory", MALLORY_PW).await;
    let r = mallory.api(Method::POST, "/hub/api/users/mallory/server").json(&json!({})).send().await.unwrap();
    assert!(r.status().is_success(), "mallory's start: {}\n{}", r.status(), b.log());
    let ready = wait_progress(&mallory, "/hub/api/users/mallory/server/progress").await;
    assert_eq!(ready["ready"], true, "mallory's server: {ready}\n{}", b.log());

    // The headers, as any client sees them.
    let r = admin.get("/hub/token").await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["x-frame-options"], "DENY");
    let csp = r.headers()["content-security-policy"].to_str().unwrap().to_string();
    assert!(csp.contains("frame-ancestors 'none'") && csp.contains("script-src 'self';"), "{csp}");
    // A page of mallory's carries none of them: her server's answers are hers.
    let r = admin.get("/user/mallory/evil-frame.html").await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.headers().get("x-frame-options").is_none() && r.headers().get("content-security-policy").is_none());

    let driver = Driver::start().await;
    let c = driver.browser().await;
    log_in(&c, &b.url, "admin", ADMIN_PW).await;
    let before = tokens(&admin, "admin").await;

    // The admin, logged in, opens mallory's pages.
    let framed = run_evil_page(&c, &format!("{}/user/mallory/evil-frame.html", b.url)).await;
    assert!(framed.starts_with("evil: blocked"), "the hub page loaded in mallory's frame: {framed}");
    let opened = run_evil_page(&c, &format!("{}/user/mallory/evil-window.html", b.url)).await;
    assert!(opened.starts_with("evil: blocked"), "mallory's page reached the hub window it opened: {opened}");
    let after = tokens(&admin, "admin").await;
    assert_eq!(after, before, "no token was minted for the admin");

    // The legitimate way still works, in the same browser: the token page, its form.
    c.goto(&format!("{}/hub/token", b.url)).await.unwrap();
    c.find(Locator::Css("#note")).await.unwrap().send_keys("made by the admin").await.unwrap();
    let create = r#"form[action="/hub/token"] button[type="submit"]"#;
    c.find(Locator::Css(create)).await.unwrap().click().await.unwrap();
    let secret = poll(Duration::from_secs(30), || async {
        let e = c.find(Locator::Css("#new-token")).await.ok()?;
        e.text().await.ok().filter(|t| !t.trim().is_empty())
    })
    .await;
    let Some(secret) = secret else { panic!("the token form made no token; {}", where_is(&c).await) };
    let after = tokens(&admin, "admin").await;
    let new: Vec<&String> = after.iter().filter(|(id, _)| !before.contains_key(*id)).map(|(_, note)| note).collect();
    assert_eq!(new, ["made by the admin"], "exactly the admin's own token is new: {after:?}");
    let me = api_client()
        .get(format!("{}/hub/api/user", b.url))
        .header("Authorization", format!("token {}", secret.trim()))
        .send()
        .await
        .unwrap();
    assert_eq!(me.status(), StatusCode::OK);
    assert_eq!(me.json::<Value>().await.unwrap()["name"], "admin");
    c.close().await.unwrap();
}

/// A server that answers only once `go` exists in its home: the test holds
/// it back until the pending page is seen following the progress.
const GATED_SERVER: &str = r#"import os, sys, time
while not os.path.exists("go"):
    time.sleep(0.05)
os.execvp(sys.executable, [sys.executable, "-m", "http.server", sys.argv[1], "--bind", "127.0.0.1"])
"#;

#[tokio::test]
async fn the_spawn_pending_page_follows_progress_without_inline_script() {
    // `gated.py` is looked up in the working directory: the user's home.
    let b = Berth::start_with(&[("BERTH_LOCAL_CMD", "python3 gated.py {port}"), ("BERTH_START_TIMEOUT", "90")], &[]);
    let home = b.data_dir.join("home/admin");
    std::fs::create_dir_all(home.join("user/admin")).unwrap();
    std::fs::write(home.join("gated.py"), GATED_SERVER).unwrap();
    std::fs::write(
        home.join("user/admin/index.html"),
        "<!doctype html><html><head><title>the admin's server</title></head><body>up</body></html>",
    )
    .unwrap();
    let admin = b.first_admin().await;

    let driver = Driver::start().await;
    let c = driver.browser().await;
    log_in(&c, &b.url, "admin", ADMIN_PW).await;
    c.find(Locator::Css(r#"button[id="start-"]"#)).await.unwrap().click().await.unwrap();

    // The pending page, its script a file of the hub's under the hub's policy …
    let pending = format!("{}/hub/spawn-pending/admin", b.url);
    let on_pending =
        poll(Duration::from_secs(30), || async { c.current_url().await.ok().filter(|u| u.as_str() == pending) }).await;
    assert!(on_pending.is_some(), "the start did not lead to the pending page; {}", where_is(&c).await);
    let src = c.find(Locator::Css("script")).await.unwrap().attr("src").await.unwrap().unwrap_or_default();
    assert!(src.starts_with("/hub/static/pending.js?v="), "{src}");
    assert!(!c.source().await.unwrap().contains("EventSource("), "no inline script on the page");
    let r = admin.get("/hub/home").await;
    let csp = r.headers()["content-security-policy"].to_str().unwrap().to_string();
    assert!(csp.split(';').any(|d| d.trim() == "script-src 'self'"), "no inline script allowed: {csp}");
    let js = admin.get(&src).await;
    assert_eq!(js.status(), StatusCode::OK);
    assert_eq!(js.headers()["content-type"], "text/javascript; charset=utf-8");

    // … follows the progress stream while the server is held back: the bar
    // moves and the messages are listed …
    let moved = poll(Duration::from_secs(30), || async {
        let root = c.find(Locator::Css("#spawn-progress")).await.ok()?;
        let pct: u32 = root.attr("data-progress").await.ok()??.parse().ok()?;
        let items = c.find_all(Locator::Css("#log li")).await.ok()?.len();
        (pct >= 50 && items >= 2).then_some(pct)
    })
    .await;
    assert!(moved.is_some(), "the pending page did not follow the progress; {}\n{}", where_is(&c).await, b.log());
    let width = c.find(Locator::Css("#bar")).await.unwrap().attr("style").await.unwrap().unwrap_or_default();
    assert!(width.contains("width"), "the bar moved: {width:?}");

    // … reaches 100 % when the server is ready (what the bar showed last
    // is kept in the tab's session storage, which outlives the navigation
    // to the server on the same origin) …
    c.execute(
        r#"var root = document.getElementById("spawn-progress");
        new MutationObserver(function () {
          sessionStorage.setItem("berth-bar", root.getAttribute("data-progress") + " " + document.getElementById("bar").style.width + " " + (root.getAttribute("data-state") || ""));
        }).observe(root, {attributes: true});"#,
        vec![],
    )
    .await
    .unwrap();

    // … and goes to the server once it is ready.
    std::fs::write(home.join("go"), "").unwrap();
    let server = format!("{}/user/admin/", b.url);
    let arrived =
        poll(Duration::from_secs(60), || async { c.current_url().await.ok().filter(|u| u.as_str() == server) }).await;
    assert!(arrived.is_some(), "the pending page did not go to the server; {}\n{}", where_is(&c).await, b.log());
    let title =
        poll(Duration::from_secs(30), || async { c.title().await.ok().filter(|t| t == "the admin's server") }).await;
    assert!(title.is_some(), "the server's page did not show; {}", where_is(&c).await);
    let bar = c.execute(r#"return sessionStorage.getItem("berth-bar");"#, vec![]).await.unwrap();
    assert_eq!(bar.as_str(), Some("100 100% ready"), "the bar's last state before it went to the server");
    c.close().await.unwrap();
}

/// mallory's server as above, but telling browsers that `sw.js` may control
/// the whole origin (`Service-Worker-Allowed: /`).
const SW_SERVER: &str = r#"import sys, http.server
class H(http.server.SimpleHTTPRequestHandler):
    def end_headers(self):
        if self.path.endswith("/sw.js"):
            self.send_header("Service-Worker-Allowed", "/")
        super().end_headers()
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"#;

/// Registers `sw.js` for the whole origin, then goes to the hub.
const EVIL_SW_PAGE: &str = r#"<!doctype html><html><head><meta charset="utf-8"><title>evil: running</title></head><body>
<p id="result">running</p><script>
function report(s) { document.getElementById("result").textContent = s; document.title = "evil: " + s; }
navigator.serviceWorker.register("/user/mallory/sw.js", {scope: "/"}).then(function (reg) {
  var sw = reg.installing || reg.waiting || reg.active;
  function go() { location.href = "/hub/home"; }
  if (reg.active) go(); else sw.addEventListener("statechange", function () { if (sw.state === "activated") go(); });
}, function (e) { report("blocked: no worker for the hub's paths (" + e + ")"); });
setTimeout(function () { report("blocked: no worker activated"); }, 10000);
</script></body></html>"#;

/// Answers the hub's navigations itself: fetches the page, mints a token with its `_xsrf`.
const EVIL_SW: &str = r#"self.addEventListener("install", function () { self.skipWaiting(); });
self.addEventListener("activate", function (e) { e.waitUntil(self.clients.claim()); });
self.addEventListener("fetch", function (e) {
  if (e.request.mode !== "navigate" || new URL(e.request.url).pathname.indexOf("/hub/") !== 0) return;
  e.respondWith(fetch(e.request).then(function (r) { return r.text(); }).then(function (page) {
    var m = page.match(/name="_xsrf" value="([^"]+)"/);
    if (!m) return "no _xsrf on the hub page";
    return fetch("/hub/api/users/admin/tokens", {method: "POST", body: JSON.stringify({note: "pwned-by-worker"}),
      headers: {"X-XSRFToken": m[1].replace(/&amp;/g, "&"), "Content-Type": "application/json"}})
      .then(function (t) { return "the worker posted for a token: " + t.status; });
  }).then(function (s) { return new Response("<title>evil: " + s + "</title>", {headers: {"Content-Type": "text/html"}}); }));
});
"#;

#[tokio::test]
async fn a_users_server_cannot_install_a_service_worker_over_the_hub() {
    let b =
        Berth::start_with(&[("BERTH_LOCAL_CMD", "python3 sw_server.py {port}"), ("BERTH_START_TIMEOUT", "60")], &[]);
    let home = b.data_dir.join("home/mallory");
    std::fs::create_dir_all(home.join("user/mallory")).unwrap();
    std::fs::write(home.join("sw_server.py"), SW_SERVER).unwrap();
    std::fs::write(home.join("user/mallory/evil-sw.html"), EVIL_SW_PAGE).unwrap();
    std::fs::write(home.join("user/mallory/sw.js"), EVIL_SW).unwrap();
    let (admin, mallory) = admin_and_user(&b, "mallory", MALLORY_PW).await;
    let r = mallory.api(Method::POST, "/hub/api/users/mallory/server").json(&json!({})).send().await.unwrap();
    assert!(r.status().is_success(), "mallory's start: {}\n{}", r.status(), b.log());
    let ready = wait_progress(&mallory, "/hub/api/users/mallory/server/progress").await;
    assert_eq!(ready["ready"], true, "mallory's server: {ready}\n{}", b.log());

    let driver = Driver::start().await;
    let c = driver.browser().await;
    log_in(&c, &b.url, "admin", ADMIN_PW).await;
    let before = tokens(&admin, "admin").await;
    let outcome = run_evil_page(&c, &format!("{}/user/mallory/evil-sw.html", b.url)).await;
    assert_eq!(tokens(&admin, "admin").await, before, "no token was minted for the admin ({outcome})");
    assert!(outcome.starts_with("evil: blocked"), "{outcome}");
    c.close().await.unwrap();
}

/// Where screenshots of the main pages go when a run asks for them
/// (`BERTH_TEST_SCREENSHOTS=docs/screenshots`, relative to the repository).
fn screenshot_dir() -> Option<PathBuf> {
    let dir = std::env::var("BERTH_TEST_SCREENSHOTS").ok().filter(|d| !d.is_empty())?;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").join(dir);
    std::fs::create_dir_all(&dir).ok()?;
    Some(dir)
}

async fn screenshot(c: &Client, name: &str) {
    if let Some(dir) = screenshot_dir() {
        let png = c.screenshot().await.unwrap();
        assert!(png.starts_with(b"\x89PNG"), "a PNG");
        std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
    }
}

/// Reloads until the element `css` shows `text`, or fails saying where the browser is.
async fn reload_until(c: &Client, url: &str, css: &str, text: &str) {
    let shown = poll(Duration::from_secs(60), || async {
        c.goto(url).await.ok()?;
        let t = c.find(Locator::Css(css)).await.ok()?.text().await.ok()?;
        t.contains(text).then_some(())
    })
    .await;
    assert!(shown.is_some(), "{css} never showed {text:?}; {}", where_is(c).await);
}

#[tokio::test]
async fn an_admin_approves_a_pending_user_in_the_browser() {
    let b = Berth::start();
    let admin = b.first_admin().await;
    let bob = Browser::new(&b.url);
    bob.signup("bob", MALLORY_PW).await;
    assert_eq!(bob.login("bob", MALLORY_PW).await.status(), StatusCode::OK, "pending: the log-in page again");

    let driver = Driver::start().await;
    let c = driver.browser().await;
    log_in(&c, &b.url, "admin", ADMIN_PW).await;
    let home = c.find(Locator::Css("main")).await.unwrap().text().await.unwrap();
    assert!(home.contains("1 account(s) wait for your approval"), "{home}");
    screenshot(&c, "home").await;
    c.goto(&format!("{}/hub/authorize?pending=1", b.url)).await.unwrap();
    let row = c.find(Locator::Css(r#"tr[id="bob"]"#)).await.unwrap();
    assert!(row.text().await.unwrap().contains("pending"));
    row.find(Locator::Css(r#"input[value="authorize"] ~ button"#)).await.unwrap().click().await.unwrap();
    let done = poll(Duration::from_secs(30), || async {
        let t = c.find(Locator::Css(".alert-success")).await.ok()?.text().await.ok()?;
        t.contains("bob is authorized").then_some(())
    })
    .await;
    assert!(done.is_some(), "no confirmation; {}", where_is(&c).await);
    let status = c.find(Locator::Css(r#"tr[id="bob"] .badge"#)).await.unwrap().text().await.unwrap();
    assert_eq!(status, "authorized");
    screenshot(&c, "admin-users").await;
    // bob logs in now, and the approval is in the event log under the admin's name.
    bob.login_ok("bob", MALLORY_PW).await;
    let v: Value =
        admin.api(Method::GET, "/hub/api/events?kind=user-authorize").send().await.unwrap().json().await.unwrap();
    assert_eq!(v["items"][0]["actor"], "admin");
    assert_eq!(v["items"][0]["subject"], "bob");
    c.goto(&format!("{}/hub/admin/events", b.url)).await.unwrap();
    let first = c.find(Locator::Css("#events tbody tr")).await.unwrap().text().await.unwrap();
    assert!(first.contains("user-authorize") && first.contains("bob"), "{first}");
    screenshot(&c, "events").await;
    c.close().await.unwrap();
}

#[tokio::test]
async fn an_admin_stops_and_starts_a_server_from_the_servers_page() {
    let b = Berth::start_with(&[("BERTH_LOCAL_CMD", HTTP_SERVER), ("BERTH_START_TIMEOUT", "60")], &[]);
    // alice's server serves her home: this is /user/alice/.
    let pages = b.data_dir.join("home/alice/user/alice");
    std::fs::create_dir_all(&pages).unwrap();
    std::fs::write(pages.join("index.html"), "<!doctype html><title>alice's server</title><p>up</p>").unwrap();
    let (_admin, alice) = admin_and_user(&b, "alice", MALLORY_PW).await;
    let r = alice.api(Method::POST, "/hub/api/users/alice/server").json(&json!({})).send().await.unwrap();
    assert!(r.status().is_success(), "alice's start: {}", r.status());
    let ready = wait_progress(&alice, "/hub/api/users/alice/server/progress").await;
    assert_eq!(ready["ready"], true, "{ready}\n{}", b.log());

    let driver = Driver::start().await;
    let c = driver.browser().await;
    log_in(&c, &b.url, "admin", ADMIN_PW).await;
    // Through the header's link.
    c.find(Locator::LinkText("Servers")).await.unwrap().click().await.unwrap();
    let page = format!("{}/hub/admin/servers", b.url);
    let row = r#"tr[data-server="alice/"]"#;
    let state = c.find(Locator::Css(&format!("{row} .state"))).await.unwrap().text().await.unwrap();
    assert_eq!(state, "running", "{}", where_is(&c).await);
    screenshot(&c, "servers").await;
    c.find(Locator::Css(&format!("{row} button.stop"))).await.unwrap().click().await.unwrap();
    reload_until(&c, &page, &format!("{row} .state"), "stopped").await;
    let r = alice.get("/user/alice/").await;
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE, "alice's server is gone");

    c.find(Locator::Css(&format!("{row} button.start"))).await.unwrap().click().await.unwrap();
    reload_until(&c, &page, &format!("{row} .state"), "running").await;
    let r = alice.get("/user/alice/").await;
    assert_eq!(r.status(), StatusCode::OK, "alice's server answers again");
    // Open leads to it.
    c.find(Locator::Css(&format!("{row} a.open"))).await.unwrap().click().await.unwrap();
    let there = poll(Duration::from_secs(30), || async {
        c.current_url().await.ok().filter(|u| u.as_str() == format!("{}/user/alice/", b.url))
    })
    .await;
    assert!(there.is_some(), "{}", where_is(&c).await);
    c.close().await.unwrap();
}

#[tokio::test]
async fn an_announcement_set_by_an_admin_shows_on_a_users_page() {
    let b = Berth::start();
    let (_admin, _alice) = admin_and_user(&b, "alice", MALLORY_PW).await;
    let driver = Driver::start().await;
    let admin = driver.browser().await;
    log_in(&admin, &b.url, "admin", ADMIN_PW).await;
    admin.goto(&format!("{}/hub/admin/announcement", b.url)).await.unwrap();
    // Markup in the message must arrive as text, never run.
    let message = r#"Maintenance at 18:00 <img src=x onerror="document.title='pwned'"> <b>bold?</b>"#;
    admin.find(Locator::Css("#message")).await.unwrap().send_keys(message).await.unwrap();
    admin.find(Locator::Css("#set-announcement")).await.unwrap().click().await.unwrap();
    let set = poll(Duration::from_secs(30), || async {
        let t = admin.find(Locator::Css("#current")).await.ok()?.text().await.ok()?;
        t.contains("set by admin").then_some(())
    })
    .await;
    assert!(set.is_some(), "{}", where_is(&admin).await);
    screenshot(&admin, "announcement").await;

    let user = driver.browser().await;
    log_in(&user, &b.url, "alice", MALLORY_PW).await;
    let banner = user.find(Locator::Css("#announcement")).await.unwrap();
    assert_eq!(banner.text().await.unwrap(), message, "the text as typed");
    let inner: Value =
        user.execute("return document.getElementById('announcement').children.length;", vec![]).await.unwrap();
    assert_eq!(inner, json!(0), "no element was made from the message");
    assert_ne!(user.title().await.unwrap(), "pwned");
    // On her other pages too, and gone once cleared.
    user.goto(&format!("{}/hub/token", b.url)).await.unwrap();
    assert_eq!(user.find(Locator::Css("#announcement")).await.unwrap().text().await.unwrap(), message);
    admin.goto(&format!("{}/hub/admin/announcement", b.url)).await.unwrap();
    admin.find(Locator::Css("#clear-announcement")).await.unwrap().click().await.unwrap();
    let cleared = poll(Duration::from_secs(30), || async {
        user.goto(&format!("{}/hub/home", b.url)).await.ok()?;
        user.find(Locator::Css("#announcement")).await.is_err().then_some(())
    })
    .await;
    assert!(cleared.is_some(), "{}", where_is(&user).await);
    user.close().await.unwrap();
    admin.close().await.unwrap();
}

#[tokio::test]
async fn the_home_page_keeps_gpu_readings_current_without_a_reload() {
    use common::nvidia::{three_gpus, Standin, GPU0};
    let standin = Standin::new(&three_gpus(87), "");
    let b = Berth::start_with(
        &[
            // A local process that never listens holds its GPU while "starting".
            ("BERTH_LOCAL_CMD", "sleep 607"),
            ("BERTH_START_TIMEOUT", "120"),
            ("BERTH_GPU_DEVICES", GPU0),
            ("BERTH_GPU_SAMPLE_INTERVAL", "1"),
            ("PATH", &standin.path()),
        ],
        &[],
    );
    let (_admin, alice) = admin_and_user(&b, "alice", MALLORY_PW).await;
    let r = alice.api(Method::POST, "/hub/api/users/alice/server").json(&json!({"gpus": 1})).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let sampled = poll(Duration::from_secs(30), || async {
        let v: Value = alice.api(Method::GET, "/hub/api/gpus").send().await.ok()?.json().await.ok()?;
        (v["sampler"]["state"] == "ok" && v["held"] == 1).then_some(())
    })
    .await;
    assert!(sampled.is_some(), "no sample with alice's GPU held");

    let driver = Driver::start().await;
    let c = driver.browser().await;
    log_in(&c, &b.url, "alice", MALLORY_PW).await;
    let reading = format!(r#"span[data-gpu="{GPU0}"]"#);
    let first = c.find(Locator::Css(&reading)).await.unwrap().text().await.unwrap();
    assert!(first.starts_with("87 % · 40536 / 81920 MiB"), "{first}; {}", where_is(&c).await);
    // A mark on the page: it is still there if the page was not reloaded.
    c.execute("window.__notReloaded = true;", vec![]).await.unwrap();
    standin.write(&three_gpus(12), "");
    let live = poll(Duration::from_secs(30), || async {
        let t = c.find(Locator::Css(&reading)).await.ok()?.text().await.ok()?;
        t.starts_with("12 %").then_some(t)
    })
    .await;
    assert!(live.is_some(), "the reading did not change on the page; {}", where_is(&c).await);
    let same_page: Value = c.execute("return window.__notReloaded === true;", vec![]).await.unwrap();
    assert_eq!(same_page, json!(true), "updated in place, not by a reload");
    // The driver going away shows as unknown, in place too.
    std::fs::write(standin.dir().join("fail"), "").unwrap();
    let unknown = poll(Duration::from_secs(30), || async {
        let t = c.find(Locator::Css(&reading)).await.ok()?.text().await.ok()?;
        (t == "utilisation unknown").then_some(())
    })
    .await;
    assert!(unknown.is_some(), "{}", where_is(&c).await);
    c.close().await.unwrap();
}
