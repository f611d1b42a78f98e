//! Test harness: runs the real `berth` binary on a loopback port with its
//! own data directory, and a cookie-keeping HTTP client that acts like a
//! browser (no automatic redirects, so tests see each hop).
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::cookie::{CookieStore, Jar};
use reqwest::redirect::Policy;
use reqwest::{Client, Response, StatusCode, Url};

pub const BIN: &str = env!("CARGO_BIN_EXE_berth");

/// A running `berth serve`; killed (SIGKILL) when dropped.
pub struct Berth {
    pub child: Child,
    pub url: String,
    pub data_dir: PathBuf,
    pub env: Vec<(String, String)>,
    pub args: Vec<String>,
    _tmp: Option<tempfile::TempDir>,
    pub stderr_log: PathBuf,
}

impl Berth {
    pub fn start() -> Berth {
        Berth::start_with(&[], &[])
    }

    pub fn start_with(env: &[(&str, &str)], args: &[&str]) -> Berth {
        let tmp = tempfile::tempdir().expect("temp dir");
        let data_dir = tmp.path().join("data");
        let mut b = Berth::spawn_in(&data_dir, env, args);
        b._tmp = Some(tmp);
        b
    }

    /// Starts berth on an existing data directory (for restarts).
    pub fn spawn_in(data_dir: &Path, env: &[(&str, &str)], args: &[&str]) -> Berth {
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
            .env("BERTH_LOG", "info")
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
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            while let Some(Ok(line)) = lines.next() {
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
        Berth { child, url, data_dir: data_dir.to_path_buf(), env, args, _tmp: None, stderr_log }
    }

    /// kill -9, then start again on the same data directory.
    pub fn kill9_and_restart(&mut self) {
        self.child.kill().expect("kill -9");
        let _ = self.child.wait();
        let env: Vec<(&str, &str)> = self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let args: Vec<&str> = self.args.iter().map(|s| s.as_str()).collect();
        let next = Berth::spawn_in(&self.data_dir, &env, &args);
        let old = std::mem::replace(self, next);
        self._tmp = old.take_tmp();
    }

    fn take_tmp(mut self) -> Option<tempfile::TempDir> {
        self._tmp.take()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_log).unwrap_or_default()
    }

    /// Runs `berth <args>` against this data directory; (exit code, stdout, stderr).
    pub fn cli(&self, args: &[&str], stdin: Option<&str>) -> (i32, String, String) {
        run_cli(args, Some(&self.data_dir), stdin)
    }
}

impl Drop for Berth {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn run_cli(args: &[&str], data_dir: Option<&Path>, stdin: Option<&str>) -> (i32, String, String) {
    use std::io::Write;
    let mut cmd = Command::new(BIN);
    cmd.args(args);
    if let Some(d) = data_dir {
        cmd.arg("--data-dir").arg(d);
    }
    cmd.env_remove("BERTH_CONFIG")
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
pub struct Browser {
    pub base: String,
    pub jar: Arc<Jar>,
    pub client: Client,
}

impl Browser {
    pub fn new(base: &str) -> Browser {
        let jar = Arc::new(Jar::default());
        let client = Client::builder()
            .cookie_provider(jar.clone())
            .redirect(Policy::none())
            .timeout(Duration::from_secs(60))
            .build()
            .expect("client");
        Browser { base: base.trim_end_matches('/').to_string(), jar, client }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub async fn get(&self, path: &str) -> Response {
        self.client.get(self.url(path)).send().await.expect("GET")
    }

    pub async fn get_text(&self, path: &str) -> (StatusCode, String) {
        let r = self.get(path).await;
        let s = r.status();
        (s, r.text().await.expect("body"))
    }

    /// The `_xsrf` cookie for `path`, as the page's forms embed it.
    pub fn xsrf(&self, path: &str) -> Option<String> {
        let url = Url::parse(&self.url(path)).ok()?;
        let header = self.jar.cookies(&url)?;
        header.to_str().ok()?.split("; ").find_map(|c| c.strip_prefix("_xsrf=").map(str::to_string))
    }

    pub fn cookie(&self, path: &str, name: &str) -> Option<String> {
        let url = Url::parse(&self.url(path)).ok()?;
        let header = self.jar.cookies(&url)?;
        let prefix = format!("{name}=");
        header.to_str().ok()?.split("; ").find_map(|c| c.strip_prefix(prefix.as_str()).map(str::to_string))
    }

    /// GETs the page (for its `_xsrf`), then POSTs the form with the token.
    pub async fn submit(&self, page: &str, action: &str, fields: &[(&str, &str)]) -> Response {
        let (status, body) = self.get_text(page).await;
        assert!(status.is_success(), "GET {page}: {status}");
        let token = form_xsrf(&body).unwrap_or_else(|| panic!("no _xsrf field on {page}"));
        let mut form: Vec<(&str, &str)> = fields.to_vec();
        form.push(("_xsrf", &token));
        self.client.post(self.url(action)).form(&form).send().await.expect("POST")
    }

    pub async fn signup(&self, name: &str, password: &str) -> String {
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

    pub async fn login(&self, name: &str, password: &str) -> Response {
        self.submit("/hub/login", "/hub/login?next=", &[("username", name), ("password", password)]).await
    }

    pub async fn login_ok(&self, name: &str, password: &str) {
        let r = self.login(name, password).await;
        let status = r.status();
        let body = r.text().await.unwrap_or_default();
        assert_eq!(status, StatusCode::FOUND, "login of {name} failed: {}", alert_text(&body));
    }

    /// Calls the API with cookies and the `X-XSRFToken` header, as the hub's pages do.
    pub fn api(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut rb = self.client.request(method, self.url(path));
        if let Some(x) = self.xsrf("/hub/") {
            rb = rb.header("X-XSRFToken", x);
        }
        rb
    }
}

/// The `_xsrf` hidden field of a page.
pub fn form_xsrf(html: &str) -> Option<String> {
    let i = html.find(r#"name="_xsrf" value=""#)? + r#"name="_xsrf" value=""#.len();
    let end = html[i..].find('"')?;
    Some(html[i..i + end].replace("&amp;", "&"))
}

/// The text of the first alert or login error on a page.
pub fn alert_text(html: &str) -> String {
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

/// Polls `f` until it returns true, or fails after `timeout`.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut f: F)
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

pub fn api_client() -> Client {
    Client::builder().redirect(Policy::none()).timeout(Duration::from_secs(60)).build().expect("client")
}
