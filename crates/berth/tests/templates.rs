//! Issue 5's catalog acceptance: `berth templates check` and `export` on the
//! real binary, and `berth up` running a template on the real Docker engine
//! (image made here from nothing pulled) reached with the real OpenSSH client.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test
mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use berth_catalog::{Catalog, TemplateConfig};
use common::*;

fn berth(args: &[&str]) -> (i32, String, String) {
    run_cli(args, None, None)
}

fn repo_templates() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../templates")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            copy_dir(&p, &to.join(e.file_name()));
        } else {
            std::fs::copy(&p, to.join(e.file_name())).unwrap();
        }
    }
}

#[test]
fn check_passes_on_the_catalog_and_names_file_and_line_of_seeded_violations() {
    let (code, out, err) = berth(&["templates", "check"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("18 templates, no violations"), "{out}");
    let (code, _, err) = berth(&["templates", "check", repo_templates().to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");

    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&repo_templates(), tmp.path());
    // App on 8080, password SSH on, no GPU: in specs and in rendered files.
    let spec = tmp.path().join("ollama/template.toml");
    let text = std::fs::read_to_string(&spec).unwrap().replace("port = 27015", "port = 8080");
    std::fs::write(&spec, &text).unwrap();
    let port_line = text.lines().position(|l| l == "port = 8080").unwrap() + 1;
    let spec2 = tmp.path().join("mlops/template.toml");
    let text2 = std::fs::read_to_string(&spec2)
        .unwrap()
        .replace("password_authentication = false", "password_authentication = true");
    std::fs::write(&spec2, &text2).unwrap();
    let pw_line = text2.lines().position(|l| l.starts_with("password_authentication")).unwrap() + 1;
    let compose = tmp.path().join("pytorch/docker-compose.yml");
    let c = std::fs::read_to_string(&compose).unwrap().replace("capabilities: [gpu]", "capabilities: [compute]");
    std::fs::write(&compose, &c).unwrap();
    let gpu_line = c.lines().position(|l| l.contains("capabilities:")).unwrap() + 1;
    let dockerfile = tmp.path().join("comfyui/Dockerfile");
    let d = std::fs::read_to_string(&dockerfile).unwrap().replace("EXPOSE 22 27015", "EXPOSE 22 27015 8888");
    std::fs::write(&dockerfile, &d).unwrap();
    let expose_line = d.lines().position(|l| l.starts_with("EXPOSE")).unwrap() + 1;

    let (code, _, err) = berth(&["templates", "check", tmp.path().to_str().unwrap()]);
    assert_ne!(code, 0, "violations make check fail");
    for want in [
        format!("{}:{port_line}: the app listens on 8080", spec.display()),
        format!("{}:{pw_line}: SSH password authentication must be off", spec2.display()),
        format!("{}:{gpu_line}: GPUs are not passed through", compose.display()),
        format!("{}:{expose_line}: port 8888 is exposed", dockerfile.display()),
    ] {
        assert!(err.contains(&want), "missing {want:?} in:\n{err}");
    }
}

#[test]
fn export_round_trips_to_the_catalog() {
    let (code, out, err) = berth(&["templates", "export", "--format", "json"]);
    assert_eq!(code, 0, "{err}");
    let exported: TemplateConfig = serde_json::from_str(&out).expect("template_config.json parses");
    let catalog = Catalog::load(&repo_templates()).unwrap();
    assert_eq!(exported, catalog.config(), "export, re-read, equals the catalog");
    assert_eq!(exported.templates.len(), 18);
    let comfy = exported.templates.iter().find(|t| t.id == "comfyui").unwrap();
    assert_eq!(comfy.base_image, "python:3.10-slim");
    assert_eq!(comfy.directory, "templates/comfyui");
    // Written back, it reads the same again.
    let again: TemplateConfig = serde_json::from_str(&serde_json::to_string(&exported).unwrap()).unwrap();
    assert_eq!(again, exported);
    let (code, _, err) = berth(&["templates", "export", "--format", "yaml"]);
    assert_ne!(code, 0);
    assert!(err.contains("unknown format"), "{err}");
    let (code, _, err) = berth(&["templates", "show", "nope"]);
    assert_ne!(code, 0);
    assert!(err.contains("no template \"nope\""), "{err}");
}

/// Removes what `berth up` made, whatever happens.
struct UpScope {
    id: String,
}

impl Drop for UpScope {
    fn drop(&mut self) {
        let _ = Command::new("docker").args(["rm", "-f", &format!("berth-up-{}", self.id)]).output();
        let _ = Command::new("docker").args(["volume", "rm", "-f", &format!("berth-up-{}-app", self.id)]).output();
        let _ = Command::new("docker")
            .args(["rmi", "-f", "--no-prune", &format!("berth-template-{}:latest", self.id)])
            .output();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[tokio::test]
async fn berth_up_runs_a_template_reached_by_ssh_key_and_http() {
    let image = test_image();
    let tmp = tempfile::tempdir().unwrap();
    let id = format!("uptest{}", std::process::id());
    let _scope = UpScope { id: id.clone() };
    write_test_template(&tmp.path().join("catalog"), &id, &image);
    let catalog = tmp.path().join("catalog");
    let (code, out, err) = berth(&["templates", "render", catalog.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, _, err) = berth(&["templates", "check", catalog.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");

    let key = tmp.path().join("id");
    assert!(Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&key)
        .status()
        .unwrap()
        .success());
    let pubkey = key.with_extension("pub");
    let (ssh_port, http_port) = (free_port(), free_port());
    let out = Command::new("timeout")
        .arg("600")
        .arg(BIN)
        .args(["up", &id, "--catalog", catalog.to_str().unwrap(), "--ssh-key", pubkey.to_str().unwrap()])
        .args(["--gpus", "0", "--address", "127.0.0.1", "--timeout", "120"])
        .args(["--ssh-port", &ssh_port.to_string(), "--http-port", &http_port.to_string()])
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "berth up failed:\n{stdout}\n{stderr}");
    assert!(stderr.contains("built berth-template-"), "build progress shown: {stderr}");
    assert!(stdout.contains(&format!("ssh -p {ssh_port} root@")), "{stdout}");

    // The real OpenSSH client logs in with the key …
    let ssh = |extra: &[&str], cmd: &str| {
        Command::new("timeout")
            .arg("60")
            .arg("ssh")
            .args(["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "IdentityAgent=none"])
            .args(["-o", "IdentitiesOnly=yes", "-o", "LogLevel=ERROR", "-p", &ssh_port.to_string()])
            .args(extra)
            .arg("root@127.0.0.1")
            .arg(cmd)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let o = ssh(&["-o", "BatchMode=yes", "-i", key.to_str().unwrap()], "pwd; test -d /app && echo has-app");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "/root\nhas-app\n");
    // … and is refused with a password (the server offers none).
    let o = ssh_with_password(tmp.path(), ssh_port, "root", "root");
    assert_eq!(o.status.code(), Some(255));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("Permission denied (publickey)"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    // HTTP on the app port answers.
    let r = api_client().get(format!("http://127.0.0.1:{http_port}/")).send().await.unwrap();
    assert_eq!(r.status(), 200);

    // ps lists it; a second up is refused; down removes it.
    let (code, out, _) = berth(&["ps"]);
    assert_eq!(code, 0);
    assert!(out.contains(&format!("berth-up-{id}")), "{out}");
    let (code, _, err) = berth(&["up", &id, "--catalog", catalog.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(err.contains("exists already"), "{err}");
    let (code, out, err) = berth(&["down", &id, "--volumes"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&format!("removed berth-up-{id}")), "{out}");
    let container = format!("berth-up-{id}");
    eventually(&format!("docker to no longer know {container} after berth down"), Duration::from_secs(10), || async {
        docker_inspect(&container).is_none()
    })
    .await;
}

fn docker(args: &[&str]) -> bool {
    Command::new("docker").args(args).output().map(|o| o.status.success()).unwrap_or(false)
}

/// Removes the images and the container the prune test made.
struct PruneScope {
    tags: Vec<String>,
    container: String,
}

impl Drop for PruneScope {
    fn drop(&mut self) {
        let _ = Command::new("docker").args(["rm", "-f", &self.container]).output();
        for t in &self.tags {
            let _ = Command::new("docker").args(["rmi", "--no-prune", t]).output();
        }
    }
}

/// `berth templates prune` removes an older build of a template, keeps the
/// current one and one a container still uses (naming the container), and
/// `images` shows which container uses what.
#[test]
fn prune_removes_older_builds_and_keeps_the_current_and_the_used() {
    let image = test_image();
    let tmp = tempfile::tempdir().unwrap();
    let id = format!("prunetest{}", std::process::id());
    let catalog = tmp.path().join("catalog");
    write_test_template(&catalog, &id, &image);
    let cat = catalog.to_str().unwrap();

    // The current tag, as the hub would run it.
    let (code, out, err) = berth(&["templates", "images", &id, "--catalog", cat]);
    assert_ne!(code, 0, "images takes no ids: {out}{err}");
    let (code, out, err) = berth(&["templates", "images", "--catalog", cat]);
    assert_eq!(code, 0, "{out}{err}");
    let current = out
        .split_whitespace()
        .find(|w| w.starts_with(&format!("berth-template-{id}:")))
        .unwrap_or_else(|| panic!("no image named for {id}: {out}"))
        .to_string();
    assert!(out.lines().any(|l| l.starts_with(&id) && l.contains(" no ")), "{out}");

    let old = format!("berth-template-{id}:000000000000");
    let used = format!("berth-template-{id}:111111111111");
    let container = format!("berth-prunetest-{}", std::process::id());
    let _scope = PruneScope { tags: vec![current.clone(), old.clone(), used.clone()], container: container.clone() };
    for t in [&current, &old, &used] {
        assert!(docker(&["tag", &image, t]), "tag {t}");
    }
    assert!(docker(&["create", "--name", &container, &used, "true"]));

    let (code, out, err) = berth(&["templates", "images", "--catalog", cat]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.lines().any(|l| l.starts_with(&id) && l.contains(" yes ")), "{out}");
    let older = out.split("older images").nth(1).unwrap_or_else(|| panic!("no older images listed: {out}"));
    assert!(older.lines().any(|l| l.contains(&old) && l.trim_end().ends_with(" -")), "{out}");
    assert!(older.lines().any(|l| l.contains(&used) && l.contains(&container)), "{out}");
    assert!(!older.contains(&current), "{out}");

    let (code, out, err) = berth(&["templates", "prune", &id, "--dry-run", "--catalog", cat]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(&format!("would remove {old}")), "{out}");
    assert!(docker(&["image", "inspect", &old]), "a dry run removed {old}");

    let (code, out, err) = berth(&["templates", "prune", &id, "--catalog", cat]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(&format!("removed {old}")), "{out}");
    assert!(out.contains(&format!("kept {used}: in use by {container}")), "{out}");
    assert!(!docker(&["image", "inspect", &old]), "{old} is still there");
    assert!(docker(&["image", "inspect", &used]), "{used} was removed while in use");
    assert!(docker(&["image", "inspect", &current]), "the current {current} was removed");
    assert!(docker(&["image", "inspect", &image]), "the base image went with its tag");

    // --all takes the current one too, once nothing uses it.
    let (code, out, err) = berth(&["templates", "prune", &id, "--all", "--catalog", cat]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(&format!("removed {current}")), "{out}");
    assert!(!docker(&["image", "inspect", &current]));
}
