//! Issue 14, item 3: image updates against a real local registry (Debian's
//! `docker-registry` on a loopback port, with its own config and storage),
//! the real berth binary, the Docker engine and the real
//! `jupyterhub-singleuser`. v1 and v2 of a tiny image (the test image plus
//! a file naming its version) are pushed under one tag.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test
mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

const PW: &str = "images-pass-42x";
const REGISTRY_PASSWORD: &str = "reg-secret-Zq81vX";

/// A `docker-registry` on `127.0.0.1:<port>`, killed and its storage removed on drop.
struct Registry {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Registry {
    fn start() -> Registry {
        Registry::start_in(tempfile::tempdir().unwrap(), None, None)
    }

    /// On `dir`'s storage and `port` (a free one when `None`), with basic
    /// auth for (user, password) when given.
    fn start_in(dir: tempfile::TempDir, port: Option<u16>, login: Option<(&str, &str)>) -> Registry {
        let port =
            port.unwrap_or_else(|| std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port());
        let config = dir.path().join("config.yml");
        let auth = match login {
            Some((user, password)) => {
                let file = dir.path().join("htpasswd");
                std::fs::write(&file, format!("{user}:{}\n", bcrypt::hash(password, 5).unwrap())).unwrap();
                format!("auth:\n  htpasswd:\n    realm: berth-test\n    path: {}\n", file.display())
            }
            None => String::new(),
        };
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n{auth}",
                dir.path().join("storage").display()
            ),
        )
        .unwrap();
        let child = Command::new("/usr/bin/docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run docker-registry (scripts/test installs it)");
        let r = Registry { child, port, _dir: dir };
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(start.elapsed() < Duration::from_secs(30), "the registry did not listen on {port}");
            std::thread::sleep(Duration::from_millis(100));
        }
        r
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Stops it and hands back its storage.
    fn into_storage(mut self) -> (tempfile::TempDir, u16) {
        self.stop();
        let port = self.port;
        let dir = std::mem::replace(&mut self._dir, tempfile::tempdir().unwrap());
        (dir, port)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

fn docker(args: &[&str]) -> String {
    let out = Command::new("docker").args(args).output().expect("docker");
    assert!(out.status.success(), "docker {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Builds `tag` from `base` plus the Dockerfile line `run`.
fn build_image(base: &str, tag: &str, run: &str) {
    let dockerfile = format!("FROM {base}\n{run}\n");
    let mut child = Command::new("docker")
        .args(["build", "-q", "-t", tag, "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(dockerfile.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "build {tag}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Builds `tag` from the test image plus `/berth-version` saying `version`.
fn build_version(base: &str, tag: &str, version: &str) {
    build_image(base, tag, &format!("RUN echo {version} > /berth-version"));
}

/// Makes the registry's `stable` the image `local` while the engine's own
/// `stable` stays what it was (as when someone else pushes a new version).
fn push_as_stable(repo: &str, version: &str) {
    let keep = docker(&["image", "inspect", "-f", "{{.Id}}", &format!("{repo}:stable")]);
    docker(&["tag", &format!("{repo}:{version}"), &format!("{repo}:stable")]);
    docker(&["push", "-q", &format!("{repo}:stable")]);
    docker(&["tag", &keep, &format!("{repo}:stable")]);
}

fn running_version(container: &str) -> String {
    docker(&["exec", container, "cat", "/berth-version"])
}

fn image_id(name: &str) -> String {
    docker(&["image", "inspect", "-f", "{{.Id}}", name])
}

/// Waits (two minutes at most) for the engine to have template `id`'s
/// image (`berth-template-<id>:<hash>`), which it returns.
async fn wait_for_template_image(id: &str) -> String {
    let start = Instant::now();
    loop {
        let list = docker(&["images", "--format", "{{.Repository}}:{{.Tag}}", &format!("berth-template-{id}")]);
        if let Some(t) = list.lines().find(|t| !t.ends_with(":berth-previous")) {
            return t.to_string();
        }
        assert!(start.elapsed() < Duration::from_secs(120), "template {id} was not built");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// `/berth-version` in `image`.
fn version_in(image: &str) -> String {
    docker(&["run", "--rm", "--entrypoint", "cat", image, "/berth-version"])
}

fn docker_inspect_image(name: &str) -> Option<String> {
    let out = Command::new("docker").args(["image", "inspect", "-f", "{{.Id}}", name]).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

async fn start_server(b: &Berth, u: &Browser, name: &str) -> Value {
    let r = u.api(Method::POST, &format!("/hub/api/users/{name}/server")).json(&json!({})).send().await.unwrap();
    let status = r.status();
    if status == StatusCode::CREATED {
        return json!({"ready": true});
    }
    assert_eq!(status, StatusCode::ACCEPTED, "start {name}: {}\n{}", r.text().await.unwrap_or_default(), b.log());
    wait_progress(u, &format!("/hub/api/users/{name}/server/progress")).await
}

async fn stop_server(b: &Berth, u: &Browser, name: &str) {
    let r = u.api(Method::DELETE, &format!("/hub/api/users/{name}/server")).send().await.unwrap();
    assert!(r.status().is_success(), "stop {name}: {}", r.status());
    let start = Instant::now();
    loop {
        let v: Value =
            u.api(Method::GET, &format!("/hub/api/users/{name}")).send().await.unwrap().json().await.unwrap();
        if v["servers"].get("").is_none() {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(90), "{name}'s server did not stop: {v}\n{}", b.log());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The admin's templates page after pressing "Check for updates": the
/// status of `template`'s row, and the row.
async fn check_from_page(admin: &Browser, template: &str) -> (String, String) {
    let r = admin.submit("/hub/admin/templates", "/hub/admin/templates/check", &[]).await;
    assert!(r.status().is_redirection(), "check: {}", r.status());
    let (status, page) = admin.get_text("/hub/admin/templates").await;
    assert_eq!(status, StatusCode::OK);
    let row = page
        .split(r#"<tr class="image-check""#)
        .skip(1)
        .find(|r| r.contains(&format!("<td>{template}</td>")))
        .unwrap_or_else(|| panic!("no image-check row of {template} on the page:\n{page}"))
        .to_string();
    let status = row.split(r#"data-status=""#).nth(1).and_then(|s| s.split('"').next()).unwrap_or("").to_string();
    (status, row)
}

async fn events(data_dir: &Path) -> Vec<berth_store::Event> {
    let s = berth_store::Store::open_in_dir(data_dir).await.unwrap();
    let e = s.recent_events(200).await.unwrap();
    s.close().await;
    e
}

/// `berth images check --json` on `b`'s data directory with `extra` env.
fn cli_check(b: &Berth, extra: &[(&str, &str)]) -> (i32, Value, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(["images", "check", "--json", "--data-dir"]).arg(&b.data_dir).env_remove("BERTH_CONFIG");
    for (k, v) in &b.env {
        cmd.env(k, v);
    }
    for (k, v) in extra {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let v = serde_json::from_str(&stdout).unwrap_or_else(|_| panic!("not JSON: {stdout}\n{stderr}"));
    (out.status.code().unwrap_or(-1), v, stderr)
}

#[tokio::test(flavor = "multi_thread")]
async fn image_updates_against_a_real_registry() {
    let base = test_image();
    let mut registry = Registry::start();
    let scope = DockerScope::new();
    let repo = format!("127.0.0.1:{}/berth-upd-{}", registry.port, scope.suffix);
    for v in ["v1", "v2"] {
        build_version(&base, &format!("{repo}:{v}"), v);
        scope.extra_images.lock().unwrap().push(format!("{repo}:{v}"));
    }
    for t in ["stable", "berth-previous"] {
        scope.extra_images.lock().unwrap().push(format!("{repo}:{t}"));
    }
    docker(&["tag", &format!("{repo}:v1"), &format!("{repo}:stable")]);
    docker(&["push", "-q", &format!("{repo}:stable")]);
    let v1 = image_id(&format!("{repo}:v1"));

    // One catalog template built on the same image (the base its
    // Dockerfile starts FROM), built ahead at start-up.
    let tdir = tempfile::tempdir().unwrap();
    let tid = format!("upd{}", scope.suffix);
    write_test_template(tdir.path(), &tid, &format!("{repo}:stable"));
    let (code, out, err) = run_cli(&["templates", "render", tdir.path().to_str().unwrap()], None, None);
    assert_eq!(code, 0, "{out}{err}");
    let mut env = scope.env(&format!("{repo}:stable"));
    env.push(("BERTH_TEMPLATES_DIR".into(), tdir.path().display().to_string()));
    env.push(("BERTH_TEMPLATES_PREBUILD".into(), tid.clone()));
    env.push(("BERTH_IMAGES_CHECK_AT".into(), String::new()));
    env.push(("BERTH_REGISTRY_USERNAME".into(), "berth".into()));
    env.push(("BERTH_REGISTRY_PASSWORD".into(), REGISTRY_PASSWORD.into()));
    let env_ref: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let b = Berth::start_with(&env_ref, &[]);
    let name = scope.user("up");
    let (admin, u) = admin_and_user(&b, &name, PW).await;
    let container = format!("berth-{name}");
    let ready = start_server(&b, &u, &name).await;
    assert_eq!(ready["ready"], true, "{ready}\n{}", b.log());
    assert_eq!(running_version(&container), "v1");
    let built = wait_for_template_image(&tid).await;
    for t in [built.clone(), format!("berth-template-{tid}:berth-previous")] {
        scope.extra_images.lock().unwrap().push(t);
    }
    assert_eq!(version_in(&built), "v1");

    // Nothing pushed since: up to date.
    let (status, row) = check_from_page(&admin, "docker.image").await;
    assert_eq!(status, "current", "{row}");
    let (status, row) = check_from_page(&admin, &tid).await;
    assert_eq!(status, "current", "the template's base: {row}");

    // v2 pushed: with the default policy (notify) the check says so, to the
    // admins on the page and in the event log and to the owner; nothing moves.
    push_as_stable(&repo, "v2");
    let before = docker_inspect(&container).unwrap()["Id"].clone();
    let (status, row) = check_from_page(&admin, "docker.image").await;
    assert_eq!(status, "available", "{row}");
    assert!(row.contains("update available") && row.contains("notify"), "{row}");
    let (status, row) = check_from_page(&admin, &tid).await;
    assert_eq!(status, "available", "the template's base: {row}");
    let ev = events(&b.data_dir).await;
    assert!(
        ev.iter().any(|e| e.kind == "image-update-available" && e.subject == "docker.image" && e.actor == "admin"),
        "an event for the admins: {ev:?}"
    );
    assert!(
        ev.iter().any(|e| e.kind == "image-update-available" && e.actor == name && e.subject == name),
        "an event for the owner of the running server: {ev:?}"
    );
    assert_eq!(docker_inspect(&container).unwrap()["Id"], before, "notify touches no server");
    assert_eq!(image_id(&format!("{repo}:stable")), v1, "notify pulls nothing");

    // next-start (`berth images check`): the tag is pulled, v1 kept as
    // berth-previous; the running server keeps v1, the next start runs v2.
    let (code, checks, stderr) = cli_check(&b, &[("BERTH_IMAGES_POLICY", "next-start")]);
    assert_eq!(code, 0, "{checks}\n{stderr}");
    assert_eq!(checks[0]["template"], "docker.image");
    assert_eq!(checks[0]["status"], "updated", "{checks}");
    assert_eq!(checks[1]["template"], tid.as_str());
    assert_eq!(checks[1]["status"], "updated", "{checks}");
    assert_eq!(image_id(&format!("{repo}:berth-previous")), v1, "the previous image is kept");
    assert_eq!(image_id(&format!("{repo}:stable")), image_id(&format!("{repo}:v2")));
    assert_eq!(running_version(&container), "v1", "a running server is never interrupted");
    stop_server(&b, &u, &name).await;
    let ready = start_server(&b, &u, &name).await;
    assert_eq!(ready["ready"], true, "{ready}\n{}", b.log());
    assert_eq!(running_version(&container), "v2", "the next start runs v2");
    let ev = events(&b.data_dir).await;
    assert!(ev.iter().any(|e| e.kind == "image-updated" && e.actor == "berth images check"), "{ev:?}");
    // The template built on v1 is kept as berth-previous and rebuilt on v2
    // (the CLI waits for the rebuild before it exits).
    assert_eq!(version_in(&format!("berth-template-{tid}:berth-previous")), "v1");
    assert!(docker_inspect_image(&built).is_some(), "{built} is rebuilt by the check");
    assert_eq!(wait_for_template_image(&tid).await, built, "the same template, the same tag");
    assert_eq!(version_in(&built), "v2", "rebuilt on the new base");

    // A registry that does not answer: reported on the page and in the
    // event log; no server touched.
    registry.stop();
    let before = docker_inspect(&container).unwrap()["Id"].clone();
    let (status, row) = check_from_page(&admin, "docker.image").await;
    assert_eq!(status, "failed", "{row}");
    assert!(row.contains("check failed") && row.contains("no server touched"), "{row}");
    let ev = events(&b.data_dir).await;
    assert!(ev.iter().any(|e| e.kind == "image-check-failed" && e.subject == "docker.image"), "{ev:?}");
    assert_eq!(docker_inspect(&container).unwrap()["Id"], before);
    assert_eq!(running_version(&container), "v2");

    // The registry password never reaches berth's log (nor the CLI's).
    assert!(!b.log().contains(REGISTRY_PASSWORD), "the registry password is in berth's log");
    assert!(!stderr.contains(REGISTRY_PASSWORD));
}

/// A registry that wants credentials: the wrong password is a failed check
/// on the page and in the event log (nothing pulled); the configured one
/// is used, and appears in no log.
#[tokio::test(flavor = "multi_thread")]
async fn registry_credentials_come_from_configuration() {
    let base = test_image();
    let scope = DockerScope::new();
    let open = Registry::start();
    let repo = format!("127.0.0.1:{}/berth-auth-{}", open.port, scope.suffix);
    build_version(&base, &format!("{repo}:stable"), "v1");
    scope.extra_images.lock().unwrap().push(format!("{repo}:stable"));
    docker(&["push", "-q", &format!("{repo}:stable")]);
    let (storage, port) = open.into_storage();
    let _registry = Registry::start_in(storage, Some(port), Some(("berth", REGISTRY_PASSWORD)));

    // Only images on this registry are checked: a template on the same image.
    let tdir = tempfile::tempdir().unwrap();
    write_test_template(tdir.path(), &format!("au{}", scope.suffix), &format!("{repo}:stable"));
    let (code, out, err) = run_cli(&["templates", "render", tdir.path().to_str().unwrap()], None, None);
    assert_eq!(code, 0, "{out}{err}");
    let mut env = scope.env(&format!("{repo}:stable"));
    env.push(("BERTH_TEMPLATES_DIR".into(), tdir.path().display().to_string()));
    env.push(("BERTH_IMAGES_CHECK_AT".into(), String::new()));
    env.push(("BERTH_IMAGES_POLICY".into(), "next-start".into()));
    env.push(("BERTH_REGISTRY_USERNAME".into(), "berth".into()));
    env.push(("BERTH_REGISTRY_PASSWORD".into(), format!("{REGISTRY_PASSWORD}-wrong")));
    let env_ref: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let b = Berth::start_with(&env_ref, &[]);
    let admin = b.first_admin().await;
    let id = image_id(&format!("{repo}:stable"));

    let (status, row) = check_from_page(&admin, "docker.image").await;
    assert_eq!(status, "failed", "{row}");
    assert!(row.contains("401") && row.contains("no server touched"), "{row}");
    let ev = events(&b.data_dir).await;
    assert!(ev.iter().any(|e| e.kind == "image-check-failed" && e.detail.contains("401")), "{ev:?}");
    assert_eq!(image_id(&format!("{repo}:stable")), id, "nothing pulled");

    // The right password (from the environment, as configuration).
    let (code, checks, stderr) = cli_check(&b, &[("BERTH_REGISTRY_PASSWORD", REGISTRY_PASSWORD)]);
    assert_eq!(code, 0, "{checks}\n{stderr}");
    assert_eq!(checks[0]["status"], "current", "{checks}");
    for log in [b.log(), stderr] {
        assert!(!log.contains(REGISTRY_PASSWORD), "a registry password is in a log:\n{log}");
    }
}

/// Uploads `body` as a blob of `name` through the Registry HTTP API; its digest.
async fn put_blob(http: &reqwest::Client, registry: &str, name: &str, body: Vec<u8>) -> String {
    use sha2::Digest;
    let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&body)));
    let r = http.post(format!("{registry}/v2/{name}/blobs/uploads/")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED, "start an upload");
    let location = r.headers()["location"].to_str().unwrap().to_string();
    let url = if location.starts_with("http") { location } else { format!("{registry}{location}") };
    let sep = if url.contains('?') { '&' } else { '?' };
    let r = http.put(format!("{url}{sep}digest={digest}")).body(body).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::CREATED, "finish the upload");
    digest
}

/// The registry serves the tag only for linux/arm64 (a manifest put
/// through the Registry HTTP API): the check is refused with both platforms
/// named, on the page and in the event log, and nothing is pulled.
#[tokio::test(flavor = "multi_thread")]
async fn a_manifest_for_another_platform_is_refused() {
    let base = test_image();
    let scope = DockerScope::new();
    let registry = Registry::start();
    let name = format!("berth-plat-{}", scope.suffix);
    let repo = format!("127.0.0.1:{}/{name}", registry.port);
    let url = format!("http://127.0.0.1:{}", registry.port);
    let http = reqwest::Client::new();
    let config = serde_json::to_vec(&json!({
        "architecture": "arm64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": []}, "config": {}
    }))
    .unwrap();
    let layer = b"a layer for another platform".to_vec();
    let (config_len, layer_len) = (config.len(), layer.len());
    let config_digest = put_blob(&http, &url, &name, config).await;
    let layer_digest = put_blob(&http, &url, &name, layer).await;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "size": config_len, "digest": config_digest},
        "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "size": layer_len, "digest": layer_digest}]
    });
    let r = http
        .put(format!("{url}/v2/{name}/manifests/stable"))
        .header("content-type", "application/vnd.docker.distribution.manifest.v2+json")
        .body(serde_json::to_vec(&manifest).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED, "put the manifest: {}", r.text().await.unwrap_or_default());
    // The engine's own copy: v1 of this machine's platform.
    build_version(&base, &format!("{repo}:stable"), "v1");
    scope.extra_images.lock().unwrap().push(format!("{repo}:stable"));
    let id = image_id(&format!("{repo}:stable"));

    let tdir = tempfile::tempdir().unwrap();
    write_test_template(tdir.path(), &format!("pl{}", scope.suffix), &format!("{repo}:stable"));
    let (code, out, err) = run_cli(&["templates", "render", tdir.path().to_str().unwrap()], None, None);
    assert_eq!(code, 0, "{out}{err}");
    let mut env = scope.env(&format!("{repo}:stable"));
    env.push(("BERTH_TEMPLATES_DIR".into(), tdir.path().display().to_string()));
    env.push(("BERTH_IMAGES_CHECK_AT".into(), String::new()));
    env.push(("BERTH_IMAGES_POLICY".into(), "next-start".into()));
    let env_ref: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let b = Berth::start_with(&env_ref, &[]);
    let admin = b.first_admin().await;

    // Only admins check: a user's press is refused and records nothing.
    let u = authorized_user(&b, &admin, &scope.user("pu"), PW).await;
    let r = u.submit("/hub/home", "/hub/admin/templates/check", &[]).await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN, "a user may not run the check");
    let (status, page) = admin.get_text("/hub/admin/templates").await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains("No check has run yet."), "{page}");

    let (status, row) = check_from_page(&admin, "docker.image").await;
    assert_eq!(status, "failed", "{row}");
    assert!(row.contains("linux/arm64") && row.contains("no server touched"), "{row}");
    let ev = events(&b.data_dir).await;
    assert!(ev.iter().any(|e| e.kind == "image-check-failed" && e.detail.contains("linux/arm64")), "{ev:?}");
    assert_eq!(image_id(&format!("{repo}:stable")), id, "nothing pulled");
}

/// Builds `tag` as the test image whose single-user server never answers
/// (its `jupyterhub-singleuser` only sleeps): an update that never becomes ready.
fn build_never_ready(base: &str, tag: &str, version: &str) {
    build_image(
        base,
        tag,
        &format!(
            "RUN echo {version} > /berth-version && printf '#!/bin/sh\\nexec sleep 100000\\n' > /opt/venv/bin/jupyterhub-singleuser"
        ),
    );
}

/// `/berth-version` in the container, or "" while it has none running.
fn version_now(container: &str) -> String {
    let out = Command::new("docker").args(["exec", container, "cat", "/berth-version"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Waits (`secs` at most) until the event log has an event satisfying `f`.
async fn wait_event(b: &Berth, what: &str, secs: u64, f: impl Fn(&berth_store::Event) -> bool) -> berth_store::Event {
    let start = Instant::now();
    loop {
        if let Some(e) = events(&b.data_dir).await.into_iter().find(|e| f(e)) {
            return e;
        }
        assert!(start.elapsed() < Duration::from_secs(secs), "no {what} within {secs} s\n{}", b.log());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The image-update banner on `u`'s home page, if any.
async fn update_banner(u: &Browser) -> Option<String> {
    let (_, home) = u.get_text("/hub/home").await;
    let at = home.find(r#"id="image-update-""#)?;
    Some(home[at..].split("</div>").next().unwrap_or("").to_string())
}

/// `when-idle` against the real registry: an idle server is recreated on
/// v2 while a busy one (a real kernel running a cell) keeps v1 and its
/// owner is told; v3 never becomes ready, so the server that moved to it
/// is put back on v2, with the reason in the event log, and v3 is not
/// applied again; v4 (never ready either) is cut off by `kill -9` of
/// berth in the middle of its move, and the restarted berth finishes the
/// job: the server ends on v2 with a container, never without one.
#[tokio::test(flavor = "multi_thread")]
async fn when_idle_moves_idle_servers_keeps_busy_ones_and_rolls_back_a_broken_update() {
    let base = test_image();
    let registry = Registry::start();
    let scope = DockerScope::new();
    let repo = format!("127.0.0.1:{}/berth-idle-{}", registry.port, scope.suffix);
    for v in ["v1", "v2"] {
        build_version(&base, &format!("{repo}:{v}"), v);
    }
    for v in ["v3", "v4"] {
        build_never_ready(&base, &format!("{repo}:{v}"), v);
    }
    for t in ["v1", "v2", "v3", "v4", "stable", "berth-previous"] {
        scope.extra_images.lock().unwrap().push(format!("{repo}:{t}"));
    }
    docker(&["tag", &format!("{repo}:v1"), &format!("{repo}:stable")]);
    docker(&["push", "-q", &format!("{repo}:stable")]);

    let mut env = scope.env(&format!("{repo}:stable"));
    env.retain(|(k, _)| k != "BERTH_START_TIMEOUT");
    for (k, v) in [
        ("BERTH_IMAGES_CHECK_AT", ""),
        ("BERTH_IMAGES_POLICY", "when-idle"),
        ("BERTH_IMAGES_IDLE_SECONDS", "5"),
        ("BERTH_CULL_INTERVAL", "2"),
        ("BERTH_START_TIMEOUT", "30"),
    ] {
        env.push((k.into(), v.into()));
    }
    let env_ref: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut b = Berth::start_with(&env_ref, &[]);
    let idle = scope.user("idl");
    let busy = scope.user("bsy");
    let (admin, iu) = admin_and_user(&b, &idle, PW).await;
    let bu = authorized_user(&b, &admin, &busy, PW).await;
    let (ic, bc) = (format!("berth-{idle}"), format!("berth-{busy}"));
    for (u, name) in [(&iu, &idle), (&bu, &busy)] {
        let ready = start_server(&b, u, name).await;
        assert_eq!(ready["ready"], true, "{ready}\n{}", b.log());
    }
    assert_eq!((running_version(&ic), running_version(&bc)), ("v1".into(), "v1".into()));
    // The busy one: a real kernel in the middle of a long cell.
    oauth_login(&bu, &busy).await;
    let kernel = kernel::start(&bu, &busy).await;
    kernel::execute_nowait(&bu, &busy, &kernel, "import time; time.sleep(900)").await;
    let busy_container = docker_inspect(&bc).unwrap()["Id"].clone();

    // v2: pulled (v1 kept); the idle server is recreated on it.
    push_as_stable(&repo, "v2");
    let (status, row) = check_from_page(&admin, "docker.image").await;
    assert_eq!(status, "updated", "{row}");
    assert!(row.contains("when-idle") && row.contains("once idle"), "{row}");
    let moved = wait_event(&b, "move of the idle server", 120, |e| e.kind == "image-moved" && e.subject == idle).await;
    assert!(moved.detail.contains("runs") && moved.detail.contains(&repo), "{moved:?}");
    assert_eq!(running_version(&ic), "v2", "the idle server runs v2");
    let ev = events(&b.data_dir).await;
    assert!(
        ev.iter().any(|e| e.kind == "image-move" && e.subject == idle && e.detail.contains("idle for at least 5 s")),
        "{ev:?}"
    );
    // A moved server is still the owner's, reachable through the proxy.
    oauth_login(&iu, &idle).await;
    let r = iu.get(&format!("/user/{idle}/api/status")).await;
    assert_eq!(r.status(), StatusCode::OK, "the moved server answers");

    // The busy one is never interrupted, however many rounds go by; its
    // owner sees why it still runs v1.
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert_eq!(docker_inspect(&bc).unwrap()["Id"], busy_container, "a busy server is not recreated");
    assert_eq!(running_version(&bc), "v1");
    let banner = update_banner(&bu).await.expect("the busy server's owner sees the update");
    assert!(banner.contains("was updated") && banner.contains("idle for 5 s"), "{banner}");
    assert!(update_banner(&iu).await.is_none(), "nothing to say to the owner of the moved server");
    let ev = events(&b.data_dir).await;
    assert!(!ev.iter().any(|e| e.kind.starts_with("image-move") && e.subject == busy), "{ev:?}");

    // v3 never becomes ready: the server that moves to it is put back on v2.
    push_as_stable(&repo, "v3");
    let v3_digest = {
        let (status, row) = check_from_page(&admin, "docker.image").await;
        assert_eq!(status, "updated", "{row}");
        docker(&["image", "inspect", "-f", "{{index .RepoDigests 0}}", &format!("{repo}:stable")])
            .split('@')
            .nth(1)
            .unwrap()
            .to_string()
    };
    let rolled = wait_event(&b, "rollback from v3", 240, |e| e.kind == "image-rolled-back" && e.subject == idle).await;
    assert!(rolled.detail.contains(&v3_digest), "the event names the failed update: {rolled:?}");
    assert!(rolled.detail.contains("put back on the previous image"), "{rolled:?}");
    assert!(rolled.detail.contains("30 s") || rolled.detail.contains("did not"), "and why it failed: {rolled:?}");
    assert_eq!(running_version(&ic), "v2", "the server ends on v2");
    oauth_login(&iu, &idle).await;
    let r = iu.get(&format!("/user/{idle}/api/status")).await;
    assert_eq!(r.status(), StatusCode::OK, "and answers");
    assert_eq!(image_id(&format!("{repo}:stable")), image_id(&format!("{repo}:v2")), "the tag is back on v2");
    assert_eq!(running_version(&bc), "v1", "the busy server was left alone throughout");
    // The check knows: rolled back, and v3 is not pulled again.
    let (status, row) = check_from_page(&admin, "docker.image").await;
    assert_eq!(status, "rolled-back", "{row}");
    assert!(row.contains("rolled back") && row.contains(&v3_digest), "{row}");
    assert_eq!(image_id(&format!("{repo}:stable")), image_id(&format!("{repo}:v2")), "v3 not applied again");

    // v4 (never ready either), and berth killed in the middle of the move.
    push_as_stable(&repo, "v4");
    let (status, row) = check_from_page(&admin, "docker.image").await;
    assert_eq!(status, "updated", "{row}");
    let start = Instant::now();
    while version_now(&ic) != "v4" {
        assert!(start.elapsed() < Duration::from_secs(120), "the move to v4 did not begin\n{}", b.log());
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    b.kill9_and_restart();
    let resumed = wait_event(&b, "the move taken up after the restart", 60, |e| {
        e.kind == "image-move" && e.subject == idle && e.detail.contains("berth restarted")
    })
    .await;
    assert!(resumed.detail.contains(&repo), "{resumed:?}");
    wait_event(&b, "rollback from v4 after the restart", 240, |e| {
        e.kind == "image-rolled-back" && e.subject == idle && !e.detail.contains(&v3_digest)
    })
    .await;
    assert_eq!(running_version(&ic), "v2", "after the restart the server ends on v2, with a container");
    assert_eq!(running_version(&bc), "v1", "and the busy server was re-adopted as it was");
    let iu = Browser::new(&b.url);
    iu.login_ok(&idle, PW).await;
    let v: Value = iu.api(Method::GET, &format!("/hub/api/users/{idle}")).send().await.unwrap().json().await.unwrap();
    assert_eq!(v["servers"][""]["ready"], true, "{v}");
    assert!(!b.log().contains("panicked"), "{}", b.log());
}
