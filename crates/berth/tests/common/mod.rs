//! Test harness: runs the real `berth` binary on a loopback port with its
//! own data directory, and a cookie-keeping HTTP client that acts like a
//! browser (no automatic redirects, so tests see each hop).
#![allow(dead_code)]

pub(crate) mod nvidia;
pub(crate) mod swarm;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::cookie::{CookieStore, Jar};
use reqwest::redirect::Policy;
use reqwest::{Client, Response, StatusCode, Url};

pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_berth");

/// berth closes a keep-alive connection idle for `proxy.client_timeout_seconds`
/// (15 s); a client that reuses one at that moment sees it closed under its
/// request (as browsers do, and then retry). The tests' clients let idle
/// connections go before that.
const POOL_IDLE: Duration = Duration::from_secs(10);

/// A running `berth serve`; killed (SIGKILL) when dropped.
pub(crate) struct Berth {
    pub child: Child,
    pub url: String,
    /// The SSH gateway's address, when the test enabled it.
    pub ssh_addr: Option<String>,
    /// The one-time link to make the first admin, when berth printed one.
    pub setup_url: Option<String>,
    pub data_dir: PathBuf,
    pub env: Vec<(String, String)>,
    pub args: Vec<String>,
    _tmp: Option<tempfile::TempDir>,
    pub stderr_log: PathBuf,
    /// Kill the servers this berth started when dropped (off for the
    /// instance a restart replaces: its servers belong to the next one).
    cleanup: bool,
}

impl Berth {
    pub(crate) fn start() -> Berth {
        Berth::start_with(&[], &[])
    }

    pub(crate) fn start_with(env: &[(&str, &str)], args: &[&str]) -> Berth {
        let tmp = tempfile::tempdir().expect("temp dir");
        let data_dir = tmp.path().join("data");
        let mut b = Berth::spawn_in(&data_dir, env, args);
        b._tmp = Some(tmp);
        b
    }

    /// Starts berth on an existing data directory (for restarts).
    pub(crate) fn spawn_in(data_dir: &Path, env: &[(&str, &str)], args: &[&str]) -> Berth {
        let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        std::fs::create_dir_all(data_dir).expect("data dir");
        let stderr_log = data_dir.with_extension("stderr.log");
        let stderr = std::fs::OpenOptions::new().create(true).append(true).open(&stderr_log).expect("log file");
        let mut cmd = Command::new(BIN);
        cmd.arg("serve")
            .arg("--bind")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(data_dir)
            .args(&args)
            .env_remove("BERTH_CONFIG")
            .env("BERTH_LOG", std::env::var("BERTH_TEST_LOG").unwrap_or_else(|_| "info".into()))
            // The local-process spawner unless a test asks for Docker, running
            // servers as berth itself unless a test asks for accounts of their own.
            .env("BERTH_SPAWNER", "local")
            .env("BERTH_LOCAL_ISOLATE_USERS", "false")
            // No SSH gateway unless a test asks (BERTH_SSH_BIND=127.0.0.1:0).
            .env("BERTH_SSH_BIND", "off")
            // No scheduled image-update check (it would ask registries off
            // this machine at midnight) unless a test asks.
            .env("BERTH_IMAGES_CHECK_AT", "")
            // Keep password hashing cheap in tests; the bench measures the real cost.
            .env("BERTH_ARGON2_MEMORY_KIB", "1024")
            .env("BERTH_ARGON2_ITERATIONS", "1")
            .stdout(Stdio::piped())
            .stderr(stderr);
        for (k, v) in &env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn berth");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        let (ssh_tx, ssh_rx) = std::sync::mpsc::channel::<String>();
        let (setup_tx, setup_rx) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            while let Some(Ok(line)) = lines.next() {
                if let Some(rest) = line.strip_prefix("berth ssh listening on ") {
                    let _ = ssh_tx.send(rest.trim().to_string());
                }
                if let Some(rest) = line.strip_prefix("berth setup: no admin yet; open ") {
                    let _ = setup_tx.send(rest.split_whitespace().next().unwrap_or("").to_string());
                }
                if let Some(rest) = line.strip_prefix("berth listening on ") {
                    let _ = tx.send(rest.trim().to_string());
                }
            }
        });
        let url = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(u) => u,
            Err(_) => {
                let _ = child.kill();
                let log = std::fs::read_to_string(&stderr_log).unwrap_or_default();
                panic!("berth did not start listening within 60 s; its log:\n{log}");
            }
        };
        // Printed before the HTTP line, so they are there already when printed.
        let ssh_addr = ssh_rx.try_recv().ok();
        let setup_url = setup_rx.try_recv().ok();
        Berth {
            child,
            url,
            ssh_addr,
            setup_url,
            data_dir: data_dir.to_path_buf(),
            env,
            args,
            _tmp: None,
            stderr_log,
            cleanup: true,
        }
    }

    /// kill -9, then start again on the same data directory.
    pub(crate) fn kill9_and_restart(&mut self) {
        self.child.kill().expect("kill -9");
        let _ = self.child.wait();
        let env: Vec<(&str, &str)> = self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let args: Vec<&str> = self.args.iter().map(|s| s.as_str()).collect();
        let next = Berth::spawn_in(&self.data_dir, &env, &args);
        let mut old = std::mem::replace(self, next);
        old.cleanup = false;
        self._tmp = old.take_tmp();
    }

    fn take_tmp(mut self) -> Option<tempfile::TempDir> {
        self._tmp.take()
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_log).unwrap_or_default()
    }

    /// Runs `berth <args>` against this data directory; (exit code, stdout, stderr).
    pub(crate) fn cli(&self, args: &[&str], stdin: Option<&str>) -> (i32, String, String) {
        run_cli(args, Some(&self.data_dir), stdin)
    }
}

impl Drop for Berth {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if self.cleanup {
            kill_processes_under(&self.data_dir);
        }
    }
}

/// Kills every process whose working directory is under `dir`: the servers
/// (and their kernels) a test's berth started, which outlive berth by design.
pub(crate) fn kill_processes_under(dir: &Path) {
    let Ok(dir) = dir.canonicalize() else { return };
    let Ok(entries) = std::fs::read_dir("/proc") else { return };
    for e in entries.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        if let Ok(cwd) = std::fs::read_link(e.path().join("cwd")) {
            if cwd.starts_with(&dir) {
                let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
            }
        }
    }
}

pub(crate) fn run_cli(args: &[&str], data_dir: Option<&Path>, stdin: Option<&str>) -> (i32, String, String) {
    use std::io::Write;
    let mut cmd = Command::new(BIN);
    cmd.args(args);
    if let Some(d) = data_dir {
        cmd.arg("--data-dir").arg(d);
    }
    cmd.env_remove("BERTH_CONFIG")
        .env("BERTH_SPAWNER", "local")
        .env("BERTH_LOCAL_ISOLATE_USERS", "false")
        .env("BERTH_ARGON2_MEMORY_KIB", "1024")
        .env("BERTH_ARGON2_ITERATIONS", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn berth cli");
    if let Some(s) = stdin {
        child.stdin.take().expect("stdin").write_all(s.as_bytes()).expect("write stdin");
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().expect("berth cli output");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A browser-like client: keeps cookies, does not follow redirects.
#[derive(Clone)]
pub(crate) struct Browser {
    pub base: String,
    pub jar: Arc<Jar>,
    pub client: Client,
}

impl Browser {
    pub(crate) fn new(base: &str) -> Browser {
        let jar = Arc::new(Jar::default());
        let client = Client::builder()
            .cookie_provider(jar.clone())
            .redirect(Policy::none())
            .timeout(Duration::from_secs(60))
            .pool_idle_timeout(POOL_IDLE)
            .build()
            .expect("client");
        Browser { base: base.trim_end_matches('/').to_string(), jar, client }
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub(crate) async fn get(&self, path: &str) -> Response {
        self.client.get(self.url(path)).send().await.expect("GET")
    }

    pub(crate) async fn get_text(&self, path: &str) -> (StatusCode, String) {
        let r = self.get(path).await;
        let s = r.status();
        (s, r.text().await.expect("body"))
    }

    /// The `_xsrf` cookie for `path`, as the page's forms embed it.
    pub(crate) fn xsrf(&self, path: &str) -> Option<String> {
        let url = Url::parse(&self.url(path)).ok()?;
        let header = self.jar.cookies(&url)?;
        header.to_str().ok()?.split("; ").find_map(|c| c.strip_prefix("_xsrf=").map(str::to_string))
    }

    pub(crate) fn cookie(&self, path: &str, name: &str) -> Option<String> {
        let url = Url::parse(&self.url(path)).ok()?;
        let header = self.jar.cookies(&url)?;
        let prefix = format!("{name}=");
        header.to_str().ok()?.split("; ").find_map(|c| c.strip_prefix(prefix.as_str()).map(str::to_string))
    }

    /// GETs the page (for its `_xsrf`), then POSTs the form with the token.
    pub(crate) async fn submit(&self, page: &str, action: &str, fields: &[(&str, &str)]) -> Response {
        let (status, body) = self.get_text(page).await;
        assert!(status.is_success(), "GET {page}: {status}");
        let token = form_xsrf(&body).unwrap_or_else(|| panic!("no _xsrf field on {page}"));
        let mut form: Vec<(&str, &str)> = fields.to_vec();
        form.push(("_xsrf", &token));
        self.client.post(self.url(action)).form(&form).send().await.expect("POST")
    }

    pub(crate) async fn signup(&self, name: &str, password: &str) -> String {
        let r = self
            .submit(
                "/hub/signup",
                "/hub/signup",
                &[("username", name), ("signup_password", password), ("signup_password_confirmation", password)],
            )
            .await;
        assert_eq!(r.status(), StatusCode::OK);
        r.text().await.expect("body")
    }

    pub(crate) async fn login(&self, name: &str, password: &str) -> Response {
        self.submit("/hub/login", "/hub/login?next=", &[("username", name), ("password", password)]).await
    }

    pub(crate) async fn login_ok(&self, name: &str, password: &str) {
        let r = self.login(name, password).await;
        let status = r.status();
        let body = r.text().await.unwrap_or_default();
        assert_eq!(status, StatusCode::FOUND, "login of {name} failed: {}", alert_text(&body));
    }

    /// Calls the API with cookies and the `X-XSRFToken` header, as the hub's pages do.
    pub(crate) fn api(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut rb = self.client.request(method, self.url(path));
        if let Some(x) = self.xsrf("/hub/") {
            rb = rb.header("X-XSRFToken", x);
        }
        rb
    }
}

/// The `_xsrf` hidden field of a page.
pub(crate) fn form_xsrf(html: &str) -> Option<String> {
    let i = html.find(r#"name="_xsrf" value=""#)? + r#"name="_xsrf" value=""#.len();
    let end = html[i..].find('"')?;
    Some(html[i..i + end].replace("&amp;", "&"))
}

/// The text of the first alert or login error on a page.
pub(crate) fn alert_text(html: &str) -> String {
    for marker in [r#"class="login_error"#, r#"class="alert"#] {
        if let Some(i) = html.find(marker) {
            let rest = &html[i..];
            let start = rest.find('>').map(|j| j + 1).unwrap_or(0);
            let text = &rest[start..];
            let end = text.find("</div>").or_else(|| text.find("</p>")).unwrap_or(text.len().min(300));
            return text[..end].replace("<p>", "").replace("</p>", "").trim().to_string();
        }
    }
    String::new()
}

/// A Docker engine that answers again: socat relays `sock` to the real
/// engine's socket (tests point berth's `DOCKER_HOST` at `sock`, where
/// nothing answers at first). Waits until the socket exists; ended on drop.
pub(crate) struct EngineRelay(Child);

impl EngineRelay {
    pub(crate) async fn start(sock: &Path) -> EngineRelay {
        let relay = EngineRelay(
            Command::new("socat")
                .arg(format!("UNIX-LISTEN:{},fork", sock.display()))
                .arg("UNIX-CONNECT:/var/run/docker.sock")
                .spawn()
                .expect("socat is installed (scripts/test installs it)"),
        );
        let start = Instant::now();
        while !sock.exists() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "socat never created the relay socket {}",
                sock.display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        relay
    }
}

impl Drop for EngineRelay {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls `f` until it returns true, or fails after `timeout`.
pub(crate) async fn eventually<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if f().await {
            return;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub(crate) fn api_client() -> Client {
    Client::builder()
        .redirect(Policy::none())
        .timeout(Duration::from_secs(60))
        .pool_idle_timeout(POOL_IDLE)
        .build()
        .expect("client")
}

/// The virtualenv with the real `jupyterhub-singleuser` (scripts/test makes it).
pub(crate) fn singleuser_cmd() -> String {
    let venv = std::env::var("BERTH_TEST_VENV")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../../.build/venv").to_string());
    let cmd = format!("{venv}/bin/jupyterhub-singleuser");
    assert!(
        Path::new(&cmd).is_file(),
        "{cmd} is missing: run the tests through scripts/test, which installs jupyterhub from PyPI"
    );
    cmd
}

pub(crate) fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

pub(crate) const ADMIN_PW: &str = "admin-pass-42x";

impl Berth {
    /// Makes the first admin `admin` through the setup link berth printed,
    /// and returns a browser logged in as them.
    pub(crate) async fn first_admin(&self) -> Browser {
        let admin = Browser::new(&self.url);
        self.make_first_admin(&admin).await;
        admin
    }

    /// The same with a browser of the test's (one that trusts berth's CA, say).
    pub(crate) async fn make_first_admin(&self, admin: &Browser) {
        let link = self.setup_url.clone().expect("berth printed a setup link (no admin yet)");
        let path = link.split_once("/hub/").map(|(_, p)| format!("/hub/{p}")).expect("a hub path");
        let code = path.split("code=").nth(1).unwrap_or("").to_string();
        let fields = [
            ("code", code.as_str()),
            ("username", "admin"),
            ("password", ADMIN_PW),
            ("password_confirmation", ADMIN_PW),
        ];
        let r = admin.submit(&path, "/hub/setup", &fields).await;
        assert_eq!(r.status(), StatusCode::FOUND, "setup: {}", r.status());
        assert_eq!(admin.get("/hub/api/user").await.status(), StatusCode::OK, "logged in as the new admin");
    }
}

/// Makes the first admin, signs up `user`, authorizes `user`, logs both in.
pub(crate) async fn admin_and_user(b: &Berth, user: &str, password: &str) -> (Browser, Browser) {
    let admin = b.first_admin().await;
    let u = Browser::new(&b.url);
    u.signup(user, password).await;
    let r = admin.submit("/hub/authorize", &format!("/hub/authorize/{user}"), &[("action", "authorize")]).await;
    assert!(r.status().is_redirection(), "authorize {user}: {}", r.status());
    u.login_ok(user, password).await;
    (admin, u)
}

/// Signs `name` up with `password`, has `admin` authorize them, logs them in.
pub(crate) async fn authorized_user(b: &Berth, admin: &Browser, name: &str, password: &str) -> Browser {
    let u = Browser::new(&b.url);
    u.signup(name, password).await;
    let r = admin.submit("/hub/authorize", &format!("/hub/authorize/{name}"), &[("action", "authorize")]).await;
    assert!(r.status().is_redirection(), "authorize {name}: {}", r.status());
    u.login_ok(name, password).await;
    u
}

/// Starts `user`'s default server through the pages and waits for the
/// progress stream's final event, which it returns.
pub(crate) async fn start_via_pages(b: &Browser, user: &str) -> serde_json::Value {
    let r = b.submit("/hub/home", &format!("/hub/spawn/{user}"), &[]).await;
    assert_eq!(r.status(), StatusCode::FOUND, "spawn: {}", r.status());
    assert_eq!(r.headers()["location"], format!("/hub/spawn-pending/{user}").as_str());
    let (status, page) = b.get_text(&format!("/hub/spawn-pending/{user}")).await;
    assert!(status.is_success() || status.is_redirection(), "{status}");
    if status.is_success() {
        assert!(
            page.contains("data-progress-url=") && page.contains("pending.js"),
            "the pending page follows the progress stream"
        );
    }
    wait_progress(b, &format!("/hub/api/users/{user}/server/progress")).await
}

/// Reads a progress event stream to its end and returns the last event.
pub(crate) async fn wait_progress(b: &Browser, path: &str) -> serde_json::Value {
    use futures_util::StreamExt;
    let r = b.api(reqwest::Method::GET, path).send().await.expect("progress");
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let mut stream = r.bytes_stream();
    let mut buf = String::new();
    let mut last = serde_json::Value::Null;
    let deadline = Instant::now() + Duration::from_secs(180);
    while let Ok(Some(chunk)) = tokio::time::timeout_at(deadline.into(), stream.next()).await {
        buf.push_str(&String::from_utf8_lossy(&chunk.expect("chunk")));
        while let Some(i) = buf.find("\n\n") {
            let frame: String = buf.drain(..i + 2).collect();
            for line in frame.lines() {
                if let Some(data) = line.strip_prefix("data:") {
                    last = serde_json::from_str(data.trim()).expect("event JSON");
                }
            }
        }
        if last.get("ready").is_some() || last.get("failed").is_some() {
            break;
        }
    }
    last
}

/// Follows redirects by hand (so each hop's cookies land in the jar) until a
/// non-redirect answer; returns it and the final path.
pub(crate) async fn follow(b: &Browser, path: &str) -> (Response, String) {
    let mut url = b.url(path);
    for _ in 0..10 {
        let r = b.client.get(&url).header("Accept", "text/html").send().await.expect("GET");
        if !r.status().is_redirection() {
            return (r, url);
        }
        let loc = r.headers()["location"].to_str().unwrap().to_string();
        url = if loc.starts_with("http") { loc } else { b.url(&loc) };
    }
    panic!("too many redirects from {path}");
}

/// The resident memory of a process, in KiB.
pub(crate) fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

impl Browser {
    /// A browser that trusts the given certificate authority (for HTTPS tests).
    pub(crate) fn with_ca(base: &str, ca_pem: &str) -> Browser {
        let jar = Arc::new(Jar::default());
        let client = Client::builder()
            .cookie_provider(jar.clone())
            .redirect(Policy::none())
            .timeout(Duration::from_secs(60))
            .pool_idle_timeout(POOL_IDLE)
            .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes()).expect("CA PEM"))
            .build()
            .expect("client");
        Browser { base: base.trim_end_matches('/').to_string(), jar, client }
    }
}

/// A Jupyter kernel driven over its WebSocket channels through berth.
pub(crate) mod kernel {
    use super::*;
    use futures_util::{SinkExt, StreamExt};
    use reqwest::Method;
    use serde_json::{json, Value};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message;

    /// Starts a kernel through `/user/<user>/api/kernels` (cookie + XSRF header).
    pub(crate) async fn start(b: &Browser, user: &str) -> String {
        let prefix = format!("/user/{user}/");
        let xsrf = b.cookie(&prefix, "_xsrf").expect("the single-user server's _xsrf cookie");
        let r = b
            .client
            .request(Method::POST, b.url(&format!("{prefix}api/kernels")))
            .header("X-XSRFToken", xsrf)
            .json(&json!({"name": "python3"}))
            .send()
            .await
            .expect("POST kernels");
        assert_eq!(r.status(), StatusCode::CREATED, "start kernel: {}", r.text().await.unwrap_or_default());
        let v: Value = r.json().await.expect("kernel JSON");
        v["id"].as_str().expect("kernel id").to_string()
    }

    /// Sends `code` to the kernel and returns without waiting for it to finish
    /// (the kernel goes on after the WebSocket closes).
    pub(crate) async fn execute_nowait(b: &Browser, user: &str, kernel: &str, code: &str) {
        let url =
            Url::parse(&b.url(&format!("/user/{user}/api/kernels/{kernel}/channels?session_id=culltest"))).unwrap();
        let cookie = b.jar_cookie_header(url.path());
        let mut req = url.as_str().replacen("http", "ws", 1).into_client_request().unwrap();
        req.headers_mut().insert("Cookie", cookie.parse().unwrap());
        let tcp = tokio::net::TcpStream::connect((url.host_str().unwrap(), url.port().unwrap())).await.unwrap();
        let (mut ws, _) = tokio_tungstenite::client_async(req, tcp).await.expect("websocket handshake");
        let msg_id = "cull-test-exec";
        let request = json!({
            "header": {"msg_id": msg_id, "msg_type": "execute_request", "session": "culltest", "username": user, "version": "5.3", "date": "2026-11-22T00:00:00Z"},
            "parent_header": {}, "metadata": {},
            "content": {"code": code, "silent": false, "store_history": false, "user_expressions": {}, "allow_stdin": false, "stop_on_error": true},
            "channel": "shell", "buffers": []
        });
        ws.send(Message::Text(request.to_string())).await.unwrap();
        // Wait for the kernel to say it is busy with it, then hang up.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let Ok(Some(Ok(Message::Text(t)))) = tokio::time::timeout_at(deadline.into(), ws.next()).await else {
                panic!("the kernel never went busy")
            };
            let v: Value = serde_json::from_str(t.as_ref()).unwrap();
            if v["parent_header"]["msg_id"] == msg_id && v["content"]["execution_state"] == "busy" {
                break;
            }
        }
        let _ = ws.close(None).await;
    }

    /// Runs `code` in the kernel and returns its `text/plain` result.
    /// `tls`: the CA to trust when the base URL is https.
    pub(crate) async fn run(b: &Browser, user: &str, kernel: &str, code: &str, tls: Option<&str>) -> String {
        let prefix = format!("/user/{user}/");
        let url = Url::parse(&b.url(&format!("{prefix}api/kernels/{kernel}/channels?session_id=berthtest"))).unwrap();
        let cookie = b.jar.cookies(&url).expect("cookies for the server");
        let ws_url = url.as_str().replacen("http", "ws", 1);
        let mut req = ws_url.into_client_request().expect("ws request");
        req.headers_mut().insert("Cookie", cookie);
        let host = url.host_str().unwrap().to_string();
        let port = url.port().unwrap();
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await.expect("tcp");
        let msg_id = format!("berth-{}", std::process::id());
        let request = json!({
            "header": {"msg_id": msg_id, "msg_type": "execute_request", "session": "berthtest", "username": user, "version": "5.3", "date": "2026-11-22T00:00:00Z"},
            "parent_header": {}, "metadata": {},
            "content": {"code": code, "silent": false, "store_history": true, "user_expressions": {}, "allow_stdin": false, "stop_on_error": true},
            "channel": "shell", "buffers": []
        });
        match tls {
            None => {
                let (ws, resp) = tokio_tungstenite::client_async(req, tcp).await.expect("websocket handshake");
                assert_eq!(resp.status().as_u16(), 101);
                exchange(ws, request, &msg_id).await
            }
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in rustls_pemfile::certs(&mut ca.as_bytes()) {
                    roots.add(c.expect("CA cert")).expect("add CA");
                }
                let provider = Arc::new(rustls::crypto::ring::default_provider());
                let cfg = rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .unwrap()
                    .with_root_certificates(roots)
                    .with_no_client_auth();
                let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
                let name = rustls::pki_types::ServerName::try_from(host.clone()).unwrap();
                let tls_stream = connector.connect(name, tcp).await.expect("TLS handshake");
                let (ws, resp) = tokio_tungstenite::client_async(req, tls_stream).await.expect("websocket handshake");
                assert_eq!(resp.status().as_u16(), 101);
                exchange(ws, request, &msg_id).await
            }
        }
    }

    async fn exchange<S>(mut ws: tokio_tungstenite::WebSocketStream<S>, request: Value, msg_id: &str) -> String
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        ws.send(Message::Text(request.to_string())).await.expect("send");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let msg = tokio::time::timeout_at(deadline.into(), ws.next()).await.expect("no result within 60 s");
            let Some(Ok(Message::Text(t))) = msg else { continue };
            let v: Value = serde_json::from_str(t.as_ref()).expect("kernel JSON");
            if v["parent_header"]["msg_id"] != msg_id {
                continue;
            }
            match v["msg_type"].as_str() {
                Some("execute_result") => {
                    let _ = ws.close(None).await;
                    return v["content"]["data"]["text/plain"].as_str().unwrap_or_default().to_string();
                }
                Some("error") => panic!("kernel error: {}", v["content"]),
                _ => {}
            }
        }
    }
}

impl Browser {
    /// The `Cookie` header this browser would send to `path`.
    pub(crate) fn jar_cookie_header(&self, path: &str) -> String {
        let url = Url::parse(&self.url(path)).expect("url");
        self.jar.cookies(&url).and_then(|h| h.to_str().ok().map(str::to_string)).unwrap_or_default()
    }
}

/// Sends a GET with the path exactly as given (no normalization) and returns the status.
pub(crate) async fn raw_get(base: &str, path: &str, cookie: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base.trim_start_matches("http://").trim_end_matches('/').to_string();
    let mut s = tokio::net::TcpStream::connect(&addr).await.expect("connect");
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nCookie: {cookie}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf);
    text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
}

/// Docker resources a test creates, removed when dropped (pass or fail).
pub(crate) struct DockerScope {
    pub suffix: String,
    pub network: String,
    pub shared: String,
    pub users: std::sync::Mutex<Vec<String>>,
    pub extra_images: std::sync::Mutex<Vec<String>>,
}

impl DockerScope {
    pub(crate) fn new() -> DockerScope {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
        let suffix = format!("{:x}{:x}{}", std::process::id() % 4096, nanos % 65536, N.fetch_add(1, Ordering::Relaxed));
        DockerScope {
            network: format!("berth-test-{suffix}"),
            shared: format!("berth-test-{suffix}-shared"),
            suffix,
            users: Default::default(),
            extra_images: Default::default(),
        }
    }

    /// A user name unique to this test, remembered for clean-up.
    pub(crate) fn user(&self, base: &str) -> String {
        let name = format!("{base}{}", self.suffix);
        self.users.lock().unwrap().push(name.clone());
        name
    }

    pub(crate) fn env(&self, image: &str) -> Vec<(String, String)> {
        vec![
            ("BERTH_SPAWNER".into(), "docker".into()),
            ("BERTH_DOCKER_IMAGE".into(), image.into()),
            ("BERTH_DOCKER_NETWORK".into(), self.network.clone()),
            ("BERTH_SHARED_VOLUME".into(), self.shared.clone()),
            ("BERTH_DOCKER_CACHE_DIR".into(), "/root/.cache".into()),
            ("BERTH_SHM_SIZE_MIB".into(), "2048".into()),
            ("BERTH_START_TIMEOUT".into(), "120".into()),
        ]
    }
}

impl Drop for DockerScope {
    fn drop(&mut self) {
        let docker = |args: &[&str]| {
            let _ = Command::new("docker").args(args).stdout(Stdio::null()).stderr(Stdio::null()).status();
        };
        for u in self.users.lock().map(|u| u.clone()).unwrap_or_default() {
            let out = Command::new("docker")
                .args(["ps", "-aq", "--filter", &format!("label=berth.user={u}")])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            for id in out.split_whitespace() {
                docker(&["rm", "-f", id]);
            }
            // Volumes are named by the account's id and labelled with the user.
            let vols = Command::new("docker")
                .args(["volume", "ls", "-q", "--filter", &format!("label=berth.user={u}")])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            for v in vols.split_whitespace() {
                docker(&["volume", "rm", "-f", v]);
            }
        }
        docker(&["volume", "rm", "-f", &self.shared]);
        docker(&["network", "rm", &self.network]);
        for i in self.extra_images.lock().map(|i| i.clone()).unwrap_or_default() {
            docker(&["rmi", "-f", "--no-prune", &i]);
        }
    }
}

/// A key pair made with ssh-keygen for one test user.
pub(crate) struct Key {
    pub private: PathBuf,
    pub public: String,
}

/// A fresh ed25519 key pair `dir/name` (no passphrase).
pub(crate) fn keygen(dir: &Path, name: &str) -> Key {
    let private = dir.join(name);
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", &format!("{name}@test"), "-f"])
        .arg(&private)
        .status()
        .expect("ssh-keygen");
    assert!(st.success());
    let public = std::fs::read_to_string(private.with_extension("pub")).expect("public key").trim().to_string();
    Key { private, public }
}

/// A container's mounts (`docker inspect`) as `volume:destination`.
pub(crate) fn mounts_of(c: &serde_json::Value) -> Vec<String> {
    c["Mounts"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|m| format!("{}:{}", m["Name"].as_str().unwrap_or(""), m["Destination"].as_str().unwrap_or("")))
                .collect()
        })
        .unwrap_or_default()
}

/// The test image (built from nothing pulled by scripts/build-test-image).
pub(crate) fn test_image() -> String {
    if let Ok(i) = std::env::var("BERTH_TEST_IMAGE") {
        return i;
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/build-test-image");
    let out = Command::new(script).stderr(Stdio::inherit()).output().expect("run scripts/build-test-image");
    assert!(out.status.success(), "scripts/build-test-image failed");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// `docker inspect` of a container, as JSON.
pub(crate) fn docker_inspect(name: &str) -> Option<serde_json::Value> {
    let out = Command::new("docker").args(["inspect", name]).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v.get(0).cloned()
}

/// Logs a user in to their running server (OAuth round trip) at `prefix`.
pub(crate) async fn oauth_login(b: &Browser, user: &str) {
    let (r, last) = follow(b, &format!("/user/{user}/files/nothing-here")).await;
    assert!(last.ends_with("/files/nothing-here"), "ended at {last} with {}", r.status());
    assert!(
        b.cookie(&format!("/user/{user}/"), &format!("jupyterhub-user-{user}")).is_some(),
        "no server cookie for {user}"
    );
}

/// The real OpenSSH client trying `login@127.0.0.1` on `port` with only a
/// password, typed by an SSH_ASKPASS script (written into `dir`).
pub(crate) fn ssh_with_password(dir: &Path, port: u16, login: &str, password: &str) -> std::process::Output {
    let askpass = dir.join("askpass.sh");
    std::fs::write(&askpass, format!("#!/bin/sh\necho '{password}'\n")).expect("askpass");
    std::fs::set_permissions(&askpass, std::os::unix::fs::PermissionsExt::from_mode(0o700)).expect("chmod");
    Command::new("timeout")
        .arg("60")
        .arg("ssh")
        .args(["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "IdentityAgent=none"])
        .args(["-o", "ConnectTimeout=20", "-o", "BatchMode=no"])
        .args(["-o", "PubkeyAuthentication=no", "-o", "PreferredAuthentications=password,keyboard-interactive"])
        .args(["-p", &port.to_string(), &format!("{login}@127.0.0.1"), "true"])
        .env("SSH_ASKPASS", &askpass)
        .env("SSH_ASKPASS_REQUIRE", "force")
        .env("DISPLAY", ":0")
        .stdin(Stdio::null())
        .output()
        .expect("ssh")
}

/// Every event of a progress stream.
pub(crate) async fn all_progress(b: &Browser, path: &str) -> Vec<serde_json::Value> {
    all_progress_within(b, path, Duration::from_secs(240)).await
}

/// The same, waiting up to `limit` for the final event (first builds are slow).
pub(crate) async fn all_progress_within(b: &Browser, path: &str, limit: Duration) -> Vec<serde_json::Value> {
    use futures_util::StreamExt;
    let r = b.api(reqwest::Method::GET, path).timeout(limit).send().await.unwrap();
    let mut stream = r.bytes_stream();
    let mut buf = String::new();
    let mut events = Vec::new();
    let deadline = tokio::time::Instant::now() + limit;
    while let Ok(Some(Ok(chunk))) = tokio::time::timeout_at(deadline, stream.next()).await {
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(i) = buf.find("\n\n") {
            let frame: String = buf.drain(..i + 2).collect();
            for line in frame.lines() {
                if let Some(d) = line.strip_prefix("data:") {
                    events.push(serde_json::from_str::<serde_json::Value>(d.trim()).unwrap());
                }
            }
        }
        if events.last().is_some_and(|e: &serde_json::Value| e.get("ready").is_some() || e.get("failed").is_some()) {
            break;
        }
    }
    events
}

/// Writes `<dir>/<id>/template.toml`: a catalog template on the test image
/// (a web server on its app port, sshd already in the image).
pub(crate) fn write_test_template(dir: &Path, id: &str, image: &str) {
    let d = dir.join(id);
    std::fs::create_dir_all(&d).expect("template dir");
    std::fs::write(
        d.join("template.toml"),
        format!(
            r#"id = "{id}"
name = "Test template"
description = "A web server and sshd on the test image."
category = "Test"
base_image = "{image}"
estimated_size = "1 GB"
use_case = "berth's own tests"
start_mode = "app"

[app]
command = "python3 -m http.server {{port}} --bind 0.0.0.0"
port = 27015
routing = ["strip"]

[gpus]
min = 0
default = 0
max = 1

[ssh]
password_authentication = false
pubkey_authentication = true

[build]
sshd = "present"
workdir = "/app"
expose = [22, 27015]
"#
        ),
    )
    .expect("template.toml");
}
