//! Catalog templates built on demand from the hub (issue 12, item 1): a
//! start whose image the engine lacks builds it from the rendered context,
//! tagged with the context's hash, with the build's steps as progress; the
//! next start reuses it. On the real Docker engine, with a template on the
//! test image (made here from nothing pulled).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test
mod common;

use common::*;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

const PW: &str = "builds-pass-42x";

/// How long a start on the test image may take (as `all_progress` waits).
const LIMIT: std::time::Duration = std::time::Duration::from_secs(240);

/// Starts `template` as `name`'s server of the same name through the REST
/// API and returns the start's progress events, to the end or `limit`.
async fn start_template(u: &Browser, name: &str, template: &str, limit: std::time::Duration) -> Vec<Value> {
    let r = u
        .api(Method::POST, &format!("/hub/api/users/{name}/servers/{template}"))
        .json(&json!({ "template": template }))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "start: {} {}", r.status(), r.text().await.unwrap_or_default());
    all_progress_within(u, &format!("/hub/api/users/{name}/servers/{template}/progress"), limit).await
}

#[tokio::test]
async fn a_template_without_an_image_is_built_on_its_first_start_and_reused() {
    let image = test_image();
    let scope = DockerScope::new();
    let tmp = tempfile::tempdir().unwrap();
    let id = format!("bt{}", scope.suffix);
    write_test_template(tmp.path(), &id, &image);
    let (code, out, err) = run_cli(&["templates", "render", tmp.path().to_str().unwrap()], None, None);
    assert_eq!(code, 0, "{out}{err}");
    let mut env = scope.env(&image);
    env.push(("BERTH_TEMPLATES_DIR".into(), tmp.path().to_str().unwrap().into()));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let b = Berth::start_with(&env, &[]);
    let admin = b.first_admin().await;
    let name = scope.user("bu");
    let u = authorized_user(&b, &admin, &name, PW).await;

    let start = || start_template(&u, &name, &id, LIMIT);
    let events = start().await;
    let messages: Vec<String> = events.iter().map(|e| e["message"].as_str().unwrap_or("").to_string()).collect();
    assert_eq!(events.last().unwrap()["ready"], true, "{messages:?}\n{}", b.log());
    let built =
        messages.iter().find_map(|m| m.strip_prefix("Built ")).expect("the build is in the progress").to_string();
    scope.extra_images.lock().unwrap().push(built.clone());
    assert!(built.starts_with(&format!("berth-template-{id}:")) && !built.ends_with(":latest"), "{built}");
    assert!(messages.iter().any(|m| m.contains("step 1/")), "the build's steps are shown: {messages:?}");
    // The app answers through berth.
    let r = u.get(&format!("/user/{name}/{id}/")).await;
    assert_eq!(r.status(), StatusCode::OK);
    // Stopped and started again: the same image, no build.
    let r = u.api(Method::DELETE, &format!("/hub/api/users/{name}/servers/{id}")).send().await.unwrap();
    assert!(r.status().is_success());
    let again = start().await;
    assert_eq!(again.last().unwrap()["ready"], true, "{again:?}");
    assert!(!again.iter().any(|e| e["message"].as_str().unwrap_or("").contains("Building")), "{again:?}");
    let c = docker_inspect(&format!("berth-{name}--{id}")).unwrap();
    assert_eq!(c["Config"]["Image"], Value::String(built.clone()));

    // The admin's view from the command line: built, and not built twice.
    let dir = tmp.path().to_str().unwrap();
    let (code, out, err) = run_cli(&["templates", "images", "--catalog", dir], None, None);
    assert_eq!(code, 0, "{out}{err}");
    let row = out.lines().find(|l| l.starts_with(&id)).unwrap_or_else(|| panic!("{out}"));
    assert!(row.contains(" yes ") && row.contains(&built), "{row}");
    let (code, out, err) = run_cli(&["templates", "build", &id, "--catalog", dir], None, None);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(&format!("{built} is built already")), "{out}");
    let (code, _, err) = run_cli(&["templates", "build", "nope", "--catalog", dir], None, None);
    assert_ne!(code, 0);
    assert!(err.contains("no template \"nope\""), "{err}");
}

/// The hub image of a catalog template, as `berth templates images` names it.
fn hub_image(id: &str) -> String {
    hub_image_of(&["templates", "images"], id)
}

/// The hub image of template `id` in catalog `dir`.
fn hub_image_in(dir: &str, id: &str) -> String {
    hub_image_of(&["templates", "images", "--catalog", dir], id)
}

fn hub_image_of(args: &[&str], id: &str) -> String {
    let (code, out, err) = run_cli(args, None, None);
    assert_eq!(code, 0, "{out}{err}");
    let row = out.lines().find(|l| l.split_whitespace().next() == Some(id)).unwrap_or_else(|| panic!("{out}"));
    row.split_whitespace().find(|w| w.starts_with("berth-template-")).unwrap().to_string()
}

fn docker(args: &[&str]) -> bool {
    std::process::Command::new("docker").args(args).output().map(|o| o.status.success()).unwrap_or(false)
}

/// A catalog template's base must be here: scripts/test makes stand-ins.
fn need_base(base: &str) {
    assert!(
        docker(&["image", "inspect", base]),
        "no {base} here: run the tests through scripts/test, which makes a stand-in from nothing pulled"
    );
}

/// No image `tag` before a start; its layers are kept under another name so
/// the build (which must still happen) is quick after the first run.
fn unbuild(tag: &str, id: &str) {
    if docker(&["image", "inspect", tag]) {
        assert!(docker(&["tag", tag, &format!("berth-test-cache/{id}:layers")]));
        assert!(docker(&["rmi", "--no-prune", tag]));
    }
}

/// The default environment (item 3): with no `docker.image`, a default
/// server runs the catalog's light JupyterLab template, built on its first
/// start (on the stand-in for its base); JupyterLab loads under the
/// server's prefix and a kernel runs `1+1`. A `templates.default` that is
/// not a single-user template, or that the catalog lacks, stops berth with
/// a clear error.
#[tokio::test]
async fn the_default_server_runs_the_jupyterlab_template_built_on_demand() {
    need_base("python:3.11-slim-bookworm");
    let image = test_image();
    let scope = DockerScope::new();
    let tag = hub_image("jupyterlab");
    unbuild(&tag, "jupyterlab");
    let mut env = scope.env(&image);
    env.retain(|(k, _)| k != "BERTH_DOCKER_IMAGE");
    // The build is not the start's to time: the default start timeout.

    for (default, says) in [("mlops", "not a JupyterHub single-user server"), ("nope", "does not have")] {
        let cfg = tempfile::tempdir().unwrap();
        let mut bad = env.clone();
        bad.push(("BERTH_TEMPLATES_DEFAULT".into(), default.into()));
        bad.push(("BERTH_SSH_BIND".into(), "off".into()));
        let out = std::process::Command::new("timeout")
            .args(["60", BIN, "serve", "--bind", "127.0.0.1:0", "--data-dir", cfg.path().to_str().unwrap()])
            .env_remove("BERTH_CONFIG")
            .envs(bad)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && out.status.code() != Some(124), "{:?} {err}", out.status);
        assert!(err.contains("templates.default") && err.contains(says) && !err.contains("panicked"), "{err}");
    }

    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let b = Berth::start_with(&env, &[]);
    let admin = b.first_admin().await;
    let name = scope.user("jl");
    let u = authorized_user(&b, &admin, &name, PW).await;
    // As a JupyterHub client starts it: the default server, no options.
    let r = u.api(Method::POST, &format!("/hub/api/users/{name}/server")).json(&json!({})).send().await.unwrap();
    assert!(r.status().is_success(), "start: {} {}", r.status(), r.text().await.unwrap_or_default());
    let events = all_progress_within(
        &u,
        &format!("/hub/api/users/{name}/server/progress"),
        std::time::Duration::from_secs(1500),
    )
    .await;
    let messages: Vec<&str> = events.iter().map(|e| e["message"].as_str().unwrap_or("")).collect();
    assert_eq!(events.last().unwrap()["ready"], true, "{messages:?}\n{}", b.log());
    assert!(messages.iter().any(|m| m.starts_with(&format!("Building {tag}"))), "{messages:?}");
    let _ = docker(&["tag", &tag, "berth-test-cache/jupyterlab:layers"]);
    let c = docker_inspect(&format!("berth-{name}")).unwrap();
    assert_eq!(c["Config"]["Image"], Value::String(tag.clone()));
    let v: Value = u.api(Method::GET, &format!("/hub/api/users/{name}")).send().await.unwrap().json().await.unwrap();
    assert_eq!(v["servers"][""]["user_options"]["template"], "jupyterlab", "{v}");

    // JupyterLab's page under the server's prefix, and a kernel.
    oauth_login(&u, &name).await;
    let (status, page) = u.get_text(&format!("/user/{name}/lab")).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert!(
        page.contains("JupyterLab") && page.contains(&format!("/user/{name}/")),
        "{}",
        &page[..page.len().min(600)]
    );
    let kernel = kernel::start(&u, &name).await;
    assert_eq!(kernel::run(&u, &name, &kernel, "1+1", None).await, "2");
}

/// The catalog's MLflow template from the hub, with no image built before:
/// built on the first start (on the stand-in for its base that
/// scripts/build-standin-base makes), MLflow's UI and REST API answer
/// through berth, the second start reuses the image.
#[tokio::test]
async fn mlflow_starts_from_the_hub_and_answers_through_berth() {
    need_base("python:3.11-slim-bookworm");
    let image = test_image();
    let scope = DockerScope::new();
    let tag = hub_image("mlops");
    unbuild(&tag, "mlops");
    let env = scope.env(&image);
    // The build is not the start's to time: the default start timeout.
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let b = Berth::start_with(&env, &[]);
    let admin = b.first_admin().await;
    let name = scope.user("ml");
    let u = authorized_user(&b, &admin, &name, PW).await;
    let start = || start_template(&u, &name, "mlops", std::time::Duration::from_secs(1500));
    let events = start().await;
    let messages: Vec<&str> = events.iter().map(|e| e["message"].as_str().unwrap_or("")).collect();
    assert_eq!(events.last().unwrap()["ready"], true, "{messages:?}\n{}", b.log());
    assert!(messages.iter().any(|m| m.starts_with(&format!("Building {tag}"))), "{messages:?}");
    let _ = docker(&["tag", &tag, "berth-test-cache/mlops:layers"]);
    // The UI and the REST API, through berth (strip routing on a hub without app hosts).
    let (status, page) = u.get_text(&format!("/user/{name}/mlops/")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains("MLflow"), "{}", &page[..page.len().min(300)]);
    let r = u.get(&format!("/user/{name}/mlops/api/2.0/mlflow/experiments/search?max_results=5")).await;
    assert_eq!(r.status(), StatusCode::OK);
    let v: Value = r.json().await.unwrap();
    assert!(v["experiments"].as_array().is_some_and(|e| e.iter().any(|x| x["name"] == "Default")), "{v}");
    // Stopped and started again: no build.
    let r = u.api(Method::DELETE, &format!("/hub/api/users/{name}/servers/mlops")).send().await.unwrap();
    assert!(r.status().is_success());
    let again = start().await;
    assert_eq!(again.last().unwrap()["ready"], true, "{again:?}");
    assert!(!again.iter().any(|e| e["message"].as_str().unwrap_or("").contains("Building")), "{again:?}");
}

/// `templates.prebuild`: once berth serves, the named template's image is
/// built in the background (its steps in the log), so the first start does
/// not build; an id the hub does not offer stops berth with a clear error.
#[tokio::test]
async fn prebuild_makes_the_image_before_anyone_starts_it() {
    let image = test_image();
    let scope = DockerScope::new();
    let tmp = tempfile::tempdir().unwrap();
    let id = format!("pb{}", scope.suffix);
    write_test_template(tmp.path(), &id, &image);
    let dir = tmp.path().to_str().unwrap();
    let (code, out, err) = run_cli(&["templates", "render", dir], None, None);
    assert_eq!(code, 0, "{out}{err}");

    // A name the catalog lacks: a one-line error naming it and what is offered.
    let cfg = tempfile::tempdir().unwrap();
    let file = cfg.path().join("berth.toml");
    std::fs::write(&file, format!("[templates]\ndir = {dir:?}\nprebuild = [\"nope\"]\n")).unwrap();
    let (code, _, err) =
        run_cli(&["serve", "--bind", "127.0.0.1:0", "--config", file.to_str().unwrap()], Some(cfg.path()), None);
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("templates.prebuild") && err.contains("\"nope\"") && err.contains(&id), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    let mut env = scope.env(&image);
    env.push(("BERTH_TEMPLATES_DIR".into(), dir.into()));
    env.push(("BERTH_TEMPLATES_PREBUILD".into(), id.clone()));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let b = Berth::start_with(&env, &[]);
    let prefix = format!("berth-template-{id}:");
    let mut built = String::new();
    for _ in 0..600 {
        let (code, out, _) = run_cli(&["templates", "images", "--catalog", dir], None, None);
        assert_eq!(code, 0, "{out}");
        if let Some(row) = out.lines().find(|l| l.starts_with(&id) && l.contains(" yes ")) {
            built = row.split_whitespace().find(|w| w.starts_with(&prefix)).unwrap().to_string();
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    assert!(!built.is_empty(), "not prebuilt within 300 s:\n{}", b.log());
    scope.extra_images.lock().unwrap().push(built.clone());
    eventually("the log says it was prebuilt", std::time::Duration::from_secs(10), || async {
        b.log().contains("prebuilt")
    })
    .await;
    assert!(b.log().contains("step 1/"), "the build's steps are logged:\n{}", b.log());

    // The first start finds the image.
    let admin = b.first_admin().await;
    let name = scope.user("pb");
    let u = authorized_user(&b, &admin, &name, PW).await;
    let events = start_template(&u, &name, &id, LIMIT).await;
    assert_eq!(events.last().unwrap()["ready"], true, "{events:?}");
    assert!(!events.iter().any(|e| e["message"].as_str().unwrap_or("").contains("Building")), "{events:?}");
}

/// The admin's templates page (item 2): each template's image, built or
/// not; the Build button builds it in the background, and the page then
/// shows it built with its size and, once a server runs it, who uses it.
/// Only admins see the page or build.
#[tokio::test]
async fn the_admin_templates_page_lists_images_and_builds_one() {
    let image = test_image();
    let scope = DockerScope::new();
    let tmp = tempfile::tempdir().unwrap();
    let id = format!("ap{}", scope.suffix);
    write_test_template(tmp.path(), &id, &image);
    let dir = tmp.path().to_str().unwrap();
    let (code, out, err) = run_cli(&["templates", "render", dir], None, None);
    assert_eq!(code, 0, "{out}{err}");
    let mut env = scope.env(&image);
    env.push(("BERTH_TEMPLATES_DIR".into(), dir.into()));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let b = Berth::start_with(&env, &[]);
    let admin = b.first_admin().await;
    let name = scope.user("ap");
    let u = authorized_user(&b, &admin, &name, PW).await;

    let row = |page: &str| -> String {
        let at = page.find(&format!(r#"<tr id="t-{id}">"#)).unwrap_or_else(|| panic!("no row for {id}: {page}"));
        page[at..].split("</tr>").next().unwrap().to_string()
    };
    let (status, page) = admin.get_text("/hub/admin/templates").await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let before = row(&page);
    assert!(before.contains("not built") && before.contains(&format!("berth-template-{id}:")), "{before}");
    let (status, _) = u.get_text("/hub/admin/templates").await;
    assert_eq!(status, StatusCode::FORBIDDEN, "a user does not see the admin's page");
    let r = u.submit("/hub/home", &format!("/hub/admin/templates/{id}/build"), &[]).await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN, "a user cannot build");

    let r = admin.submit("/hub/admin/templates", &format!("/hub/admin/templates/{id}/build"), &[]).await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let mut last = String::new();
    for _ in 0..600 {
        let (_, page) = admin.get_text("/hub/admin/templates").await;
        last = row(&page);
        if last.contains("built here in") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    assert!(last.contains("badge ok") && last.contains(" MB"), "built within 300 s: {last}\n{}", b.log());
    let tag = hub_image_in(dir, &id);
    scope.extra_images.lock().unwrap().push(tag.clone());

    // A start uses it (no build), and the page names the container.
    let events = start_template(&u, &name, &id, LIMIT).await;
    assert_eq!(events.last().unwrap()["ready"], true, "{events:?}");
    assert!(!events.iter().any(|e| e["message"].as_str().unwrap_or("").contains("Building")), "{events:?}");
    let (_, page) = admin.get_text("/hub/admin/templates").await;
    let after = row(&page);
    assert!(after.contains(&format!("berth-{name}--{id}")), "in use by the server's container: {after}");
}
