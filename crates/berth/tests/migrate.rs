//! Issue 17's acceptance: `berth migrate jupyterhub` against a real source
//! deployment's state — JupyterHub 6.1.1 with NativeAuthenticator 1.3.0
//! from PyPI (the test virtualenv; no configurable-http-proxy: a no-op proxy
//! class), accounts signed up and authorized through its own pages, and the
//! users' data in real Docker volumes named as DockerSpawner names them.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test
mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use reqwest::{Method, StatusCode};
use serde_json::Value;

const ADMIN_PASS: &str = "jh-admin-pass-1234";
const ALICE_PASS: &str = "alice-old-pass-5678";
const BOB_PASS: &str = "bob-old-pass-9012";

/// A real JupyterHub with NativeAuthenticator, on loopback; killed on drop.
struct JupyterHub {
    child: Option<Child>,
    url: String,
    dir: tempfile::TempDir,
}

impl JupyterHub {
    fn start() -> JupyterHub {
        let venv = std::env::var("BERTH_TEST_VENV")
            .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../../.build/venv").to_string());
        let bin = format!("{venv}/bin/jupyterhub");
        let has_native = Command::new(format!("{venv}/bin/python"))
            .args(["-c", "import nativeauthenticator"])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(
            Path::new(&bin).is_file() && has_native,
            "{bin} with nativeauthenticator is missing: run the tests through scripts/test, which installs them from PyPI"
        );
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let d = dir.path().display();
        // As the seed deployment configures it, minus Docker and the proxy.
        let config = format!(
            r#"
from jupyterhub.proxy import Proxy

class NoProxy(Proxy):
    should_start = False
    async def start(self): pass
    async def stop(self): pass
    async def add_route(self, routespec, target, data): pass
    async def delete_route(self, routespec): pass
    async def get_all_routes(self): return {{}}

# NativeAuthenticator 1.3.0's log-in handler times itself with
# `self.statsd`, which JupyterHub 6 no longer has: without this the admin
# cannot log in (500). A no-op timer, nothing else changed.
from nativeauthenticator.handlers import LoginHandler as _NativeLogin

class _Timer:
    def start(self): return self
    def stop(self, send=True): pass

class _Statsd:
    def timer(self, name): return _Timer()
    def incr(self, *a, **k): pass

_NativeLogin.statsd = _Statsd()

c.JupyterHub.proxy_class = NoProxy
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = {port}
c.JupyterHub.db_url = "sqlite:///{d}/jupyterhub.sqlite"
c.JupyterHub.cookie_secret_file = "{d}/jupyterhub_cookie_secret"
c.JupyterHub.pid_file = "{d}/jupyterhub.pid"
c.JupyterHub.log_level = "WARN"
c.JupyterHub.authenticator_class = "native"
c.Authenticator.admin_users = {{"admin"}}
# NativeAuthenticator decides who may log in (its authorization).
c.Authenticator.allow_all = True
c.NativeAuthenticator.open_signup = False
"#
        );
        std::fs::write(dir.path().join("jupyterhub_config.py"), config).unwrap();
        let log = std::fs::File::create(dir.path().join("jupyterhub.log")).unwrap();
        let child = Command::new(&bin)
            .arg("-f")
            .arg(dir.path().join("jupyterhub_config.py"))
            .current_dir(dir.path())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let jh = JupyterHub { child: Some(child), url: format!("http://127.0.0.1:{port}"), dir };
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let up = std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
            if up {
                break;
            }
            assert!(Instant::now() < deadline, "JupyterHub did not listen within 90 s:\n{}", jh.log());
            std::thread::sleep(Duration::from_millis(100));
        }
        jh
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("jupyterhub.log")).unwrap_or_default()
    }

    fn db(&self) -> PathBuf {
        self.dir.path().join("jupyterhub.sqlite")
    }

    /// Signs `name` up through NativeAuthenticator's own page.
    async fn signup(&self, name: &str, password: &str) {
        let b = Browser::new(&self.url);
        let r = b
            .submit(
                "/hub/signup",
                "/hub/signup",
                &[("username", name), ("signup_password", password), ("signup_password_confirmation", password)],
            )
            .await;
        let status = r.status();
        let body = r.text().await.unwrap();
        assert_eq!(status, StatusCode::OK, "JupyterHub signup of {name}: {body}\n{}", self.log());
        assert!(
            body.contains("information has been sent to the admin") || body.contains("The signup was successful"),
            "signup of {name}: {}",
            alert_text(&body)
        );
    }

    /// Stops the hub (as an operator does before moving), so its database is still.
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").arg("-INT").arg(c.id().to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for JupyterHub {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Volumes the test made for the source deployment; removed on drop.
struct Volumes(Vec<String>);

impl Drop for Volumes {
    fn drop(&mut self) {
        let quiet = |args: &[&str]| {
            let _ = Command::new("docker").args(args).stdout(Stdio::null()).stderr(Stdio::null()).status();
        };
        for v in &self.0 {
            // A container of a failed test may still hold it.
            let users = Command::new("docker")
                .args(["ps", "-aq", "--filter", &format!("volume={v}")])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            for id in users.split_whitespace() {
                quiet(&["rm", "-f", id]);
            }
            quiet(&["volume", "rm", "-f", v]);
        }
    }
}

fn docker(args: &[&str]) -> String {
    let out = Command::new("docker").args(args).output().unwrap();
    assert!(out.status.success(), "docker {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn volume_exists(v: &str) -> bool {
    Command::new("docker").args(["volume", "inspect", v]).output().unwrap().status.success()
}

/// Every file in a volume with its checksum, read by a throw-away container.
fn volume_listing(image: &str, volume: &str) -> String {
    docker(&[
        "run",
        "--rm",
        "--network",
        "none",
        "--entrypoint",
        "sh",
        "-v",
        &format!("{volume}:/v:ro"),
        image,
        "-c",
        "cd /v && find . -type f | sort | xargs -r md5sum",
    ])
}

/// The source deployment: accounts in JupyterHub's database, data in volumes.
struct Source {
    jh: JupyterHub,
    alice: String,
    bob: String,
    /// A name berth cannot take (a dot).
    odd: String,
    shared: String,
    /// Named like a user's home volume, but nobody's.
    ghost: String,
    volumes: Volumes,
}

impl Source {
    async fn make(scope: &DockerScope, image: &str) -> Source {
        let jh = JupyterHub::start();
        let alice = scope.user("alice");
        let bob = scope.user("bob");
        let odd = format!("carol.x{}", scope.suffix);
        jh.signup("admin", ADMIN_PASS).await;
        jh.signup(&alice, ALICE_PASS).await;
        jh.signup(&bob, BOB_PASS).await;
        jh.signup(&odd, "carol-old-pass-3456").await;
        // The admin authorizes alice on NativeAuthenticator's page; bob stays pending.
        let admin = Browser::new(&jh.url);
        let r = admin.submit("/hub/login", "/hub/login", &[("username", "admin"), ("password", ADMIN_PASS)]).await;
        assert_eq!(r.status(), StatusCode::FOUND, "JupyterHub admin login\n{}", jh.log());
        let r = admin.get(&format!("/hub/authorize/{alice}")).await;
        assert!(r.status().is_redirection(), "authorize {alice}: {}\n{}", r.status(), jh.log());

        let shared = format!("jhs{}_shared", scope.suffix);
        let ghost = format!("jupyterlab-ghost{}_home", scope.suffix);
        let names: Vec<String> = ["home", "workspace", "cache"]
            .iter()
            .map(|r| format!("jupyterlab-{alice}_{r}"))
            .chain([shared.clone(), ghost.clone()])
            .collect();
        let volumes = Volumes(names.clone());
        for v in &names {
            docker(&["volume", "create", v]);
        }
        let write = |volume: &str, script: &str| {
            docker(&[
                "run",
                "--rm",
                "--network",
                "none",
                "--entrypoint",
                "sh",
                "-v",
                &format!("{volume}:/v"),
                image,
                "-c",
                script,
            ])
        };
        write(&names[0], "mkdir -p /v/lab/workspace /v/lab/.cache && echo 'home of alice' > /v/home-note.txt && echo 'rc' > /v/lab/.bashrc");
        write(&names[1], "echo 'old notebook' > /v/notes.txt && mkdir -p /v/project && echo 'x=1' > /v/project/a.py");
        write(&names[2], "mkdir -p /v/pip && echo 'cached' > /v/pip/wheel.txt");
        write(&shared, "echo 'for everyone' > /v/shared-note.txt");
        write(&ghost, "echo 'nobody' > /v/ghost.txt");
        Source { jh, alice, bob, odd, shared, ghost, volumes }
    }

    fn alice_volume(&self, role: &str) -> String {
        format!("jupyterlab-{}_{role}", self.alice)
    }

    fn migrate_args(&self) -> Vec<String> {
        vec![
            "migrate".into(),
            "jupyterhub".into(),
            "--db".into(),
            self.jh.db().display().to_string(),
            "--shared-volume".into(),
            self.shared.clone(),
        ]
    }
}

fn sha256_file(p: &Path) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(std::fs::read(p).unwrap()))
}

fn cli(b: &Berth, args: &[String]) -> (i32, String, String) {
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    b.cli(&a, None)
}

#[tokio::test]
async fn migrates_accounts_and_volumes_from_a_real_jupyterhub() {
    let image = test_image();
    let scope = DockerScope::new();
    let mut src = Source::make(&scope, &image).await;
    src.jh.stop();
    let db_before = sha256_file(&src.jh.db());
    let listings: Vec<(String, String)> = ["home", "workspace", "cache"]
        .iter()
        .map(|r| src.alice_volume(r))
        .chain([src.shared.clone(), src.ghost.clone()])
        .map(|v| {
            let l = volume_listing(&image, &v);
            (v, l)
        })
        .collect();

    // berth serves (Docker spawner, the test image) while the migration runs.
    let env = scope.env(&image);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let b = Berth::start_with(&env, &[]);

    let t = Instant::now();
    let (code, out, err) = cli(&b, &src.migrate_args());
    let took = t.elapsed();
    assert_eq!(code, 0, "{out}{err}");
    eprintln!("first migration ({took:?}):\n{out}");
    let (alice, bob) = (&src.alice, &src.bob);
    for want in [
        format!("import {alice}\n"),
        format!("imported {alice}\n"),
        format!("imported {bob} (pending)"),
        "imported admin (admin)".to_string(),
        format!("skipped \"{}\": berth cannot take the name", src.odd),
        format!("adopted jupyterlab-{alice}_home as {alice}'s home at /home"),
        format!("adopted jupyterlab-{alice}_workspace as {alice}'s workspace at /home/lab/workspace"),
        format!("adopted jupyterlab-{alice}_cache as {alice}'s cache at /home/lab/.cache"),
        format!("adopted {} as the shared volume at /mnt/shared", src.shared),
    ] {
        assert!(out.contains(&want), "{want:?} not in:\n{out}");
    }
    let without_user = out.split("volumes with no matching user (left alone):").nth(1).unwrap_or("");
    assert!(without_user.contains(&src.ghost), "the ghost volume is listed as nobody's:\n{out}");
    assert!(out.contains("3 account(s) imported, 0 already imported, 1 skipped; 4 volume(s) adopted"), "{out}");

    // Running it again changes nothing, and says so (also as JSON).
    let (code, again, err) = cli(&b, &src.migrate_args());
    assert_eq!(code, 0, "{again}{err}");
    assert!(again.contains("nothing to do"), "{again}");
    assert!(again.contains(&format!("already imported {alice}")), "{again}");
    assert!(again.contains(&format!("already adopted jupyterlab-{alice}_workspace")), "{again}");
    assert!(!again.contains("Result:"), "nothing applied the second time: {again}");
    let mut json_args = src.migrate_args();
    json_args.push("--json".into());
    let (code, doc, err) = cli(&b, &json_args);
    assert_eq!(code, 0, "{doc}{err}");
    let doc: Value = serde_json::from_str(&doc).unwrap_or_else(|e| panic!("{e}: {doc}"));
    assert_eq!(doc["before"]["nothing_to_do"], true, "{doc}");
    assert_eq!(doc["after"], Value::Null, "{doc}");
    assert_eq!(doc["before"]["counts"]["already_imported"], 3, "{doc}");
    assert_eq!(doc["before"]["counts"]["volumes_already_adopted"], 4, "{doc}");

    // Nothing of the source changed: its database, its volumes.
    assert_eq!(sha256_file(&src.jh.db()), db_before, "JupyterHub's database is only read");
    for (v, l) in &listings {
        assert!(volume_exists(v), "{v} still exists");
        assert_eq!(&volume_listing(&image, v), l, "{v} is unchanged");
    }

    // bob is pending in berth too.
    let bob_b = Browser::new(&b.url);
    let r = bob_b.login(bob, BOB_PASS).await;
    assert!(alert_text(&r.text().await.unwrap()).contains("not been authorized"), "bob is pending");

    // alice logs in to berth with her old password, starts her server, and her data is there.
    let alice_b = Browser::new(&b.url);
    alice_b.login_ok(alice, ALICE_PASS).await;
    let ready = start_via_pages(&alice_b, alice).await;
    assert_eq!(ready["ready"], true, "{ready}\n{}", b.log());
    let c = docker_inspect(&format!("berth-{alice}")).expect("alice's container");
    let mounts = mounts_of(&c);
    for want in [
        format!("jupyterlab-{alice}_home:/home"),
        format!("jupyterlab-{alice}_workspace:/home/lab/workspace"),
        format!("jupyterlab-{alice}_cache:/home/lab/.cache"),
        format!("{}:/mnt/shared", src.shared),
    ] {
        assert!(mounts.contains(&want), "{want} not in {mounts:?}");
    }
    assert!(!mounts.iter().any(|m| m.starts_with("berth-")), "no berth volume of hers is mounted: {mounts:?}");
    oauth_login(&alice_b, alice).await;
    // The workspace file, through the Jupyter contents API behind berth's proxy.
    let r = alice_b.get(&format!("/user/{alice}/api/contents/notes.txt?content=1")).await;
    assert_eq!(r.status(), StatusCode::OK);
    let file: Value = r.json().await.unwrap();
    assert_eq!(file["content"], "old notebook\n");
    let r: Value = alice_b.get(&format!("/user/{alice}/api/contents/project")).await.json().await.unwrap();
    assert_eq!(r["content"][0]["name"], "a.py", "{r}");
    // The home file and the shared file, from her kernel.
    let k = kernel::start(&alice_b, alice).await;
    assert_eq!(
        kernel::run(&alice_b, alice, &k, "open('/home/home-note.txt').read()", None).await,
        "'home of alice\\n'"
    );
    assert_eq!(
        kernel::run(&alice_b, alice, &k, "open('/mnt/shared/shared-note.txt').read()", None).await,
        "'for everyone\\n'"
    );
    assert_eq!(
        kernel::run(&alice_b, alice, &k, "open('/home/lab/.cache/pip/wheel.txt').read()", None).await,
        "'cached\\n'"
    );
    // What she writes lands in the old volume.
    assert_eq!(
        kernel::run(&alice_b, alice, &k, "open('/home/lab/workspace/from-berth.txt','w').write('new')", None).await,
        "3"
    );
    let r = alice_b.api(Method::DELETE, &format!("/hub/api/users/{alice}/server")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let after = volume_listing(&image, &src.alice_volume("workspace"));
    assert!(after.contains("./from-berth.txt") && after.contains("./notes.txt"), "{after}");

    // Deleting her in berth, even with her data, leaves the adopted volumes.
    let (code, out, err) = b.cli(&["user", "delete", alice.as_str(), "--remove-volumes"], None);
    assert_eq!(code, 0, "{out}{err}");
    for r in ["home", "workspace", "cache"] {
        assert!(volume_exists(&src.alice_volume(r)), "{} was adopted: berth keeps it", src.alice_volume(r));
    }
    assert!(volume_exists(&src.shared));
    drop(src.volumes);
}

#[tokio::test]
async fn a_dry_run_writes_nothing_and_nobody_is_switched_silently() {
    let image = test_image();
    let scope = DockerScope::new();
    let mut src = Source::make(&scope, &image).await;
    src.jh.stop();
    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().join("data");
    let mut args = src.migrate_args();
    args.push("--dry-run".into());
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, out, err) = run_cli(&a, Some(&data_dir), None);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(&format!("import {}", src.alice)), "{out}");
    assert!(out.contains(&format!("adopt jupyterlab-{}_workspace as", src.alice)), "{out}");
    assert!(out.contains("dry run: nothing was written"), "{out}");
    assert!(!out.contains("Result:"), "{out}");
    assert!(!data_dir.join("berth.sqlite").exists(), "no berth database was made");

    // On an existing berth: still nothing written.
    let b = Berth::start();
    let (code, out, err) = cli(&b, &args);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("dry run: nothing was written"), "{out}");
    let (_, list, _) = b.cli(&["user", "list"], None);
    assert!(!list.contains(&src.alice) && !list.contains(&src.bob), "{list}");
    args.pop();

    // bob already has a berth account of his own: a duplicate, skipped.
    let (code, out, err) = b.cli(&["user", "add", src.bob.as_str(), "--password-stdin"], Some("bobs-berth-pass-77\n"));
    assert_eq!(code, 0, "{out}{err}");
    // alice came over with `berth user import-nativeauth` (the accounts part
    // of the same migration) and used berth since: she has berth volumes.
    let db = src.jh.db();
    let (code, out, err) = b.cli(&["user", "import-nativeauth", db.to_str().unwrap()], None);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(&format!("imported {}", src.alice)), "{out}");
    assert!(out.contains(&format!("skipped {}: a duplicate", src.bob)), "{out}");
    let account = {
        sqlx::any::install_default_drivers();
        let url = format!("sqlite://{}?mode=ro", b.data_dir.join("berth.sqlite").display());
        let pool = sqlx::AnyPool::connect(&url).await.unwrap();
        let id: String = sqlx::query_scalar("SELECT account_id FROM users WHERE name = $1")
            .bind(&src.alice)
            .fetch_one(&pool)
            .await
            .unwrap();
        pool.close().await;
        id
    };
    let own = format!("berth-{account}-home");
    let _own = Volumes(vec![own.clone()]);
    docker(&["volume", "create", &own]);

    let (code, out, err) = cli(&b, &args);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(&format!("already imported {}", src.alice)), "{out}");
    assert!(out.contains(&format!("skipped {}: a duplicate", src.bob)), "{out}");
    assert!(
        out.contains(&format!("not switched jupyterlab-{}_home", src.alice)) && out.contains("--switch-existing"),
        "{out}"
    );
    assert!(
        out.contains("1 volume(s) adopted, 0 already adopted, 3 not adopted"),
        "only the shared volume is adopted, none of hers: {out}"
    );
    let mut switch = args.clone();
    switch.push("--switch-existing".into());
    let (code, out, err) = cli(&b, &switch);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(&format!("adopted jupyterlab-{}_home as", src.alice)), "{out}");
    assert!(volume_exists(&own), "her berth volume stays (unmounted)");
    let (code, out, _) = cli(&b, &switch);
    assert_eq!(code, 0);
    assert!(out.contains("nothing to do"), "{out}");
    drop(src.volumes);
}

#[test]
fn bad_source_databases_are_refused_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let missing = dir.path().join("nope.sqlite");
    let corrupt = dir.path().join("corrupt.sqlite");
    std::fs::write(&corrupt, b"this is not a database, just some bytes that look like nothing\n".repeat(100)).unwrap();
    // A SQLite file, but not JupyterHub's.
    let other = dir.path().join("other.sqlite");
    {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            sqlx::any::install_default_drivers();
            let pool = sqlx::AnyPool::connect(&format!("sqlite://{}?mode=rwc", other.display())).await.unwrap();
            sqlx::query("CREATE TABLE something (id INTEGER)").execute(&pool).await.unwrap();
            pool.close().await;
        });
    }
    for (db, says) in [(&missing, "is not a file"), (&corrupt, "not a database"), (&other, "users_info")] {
        let before = std::fs::read(db).ok();
        let (code, out, err) = run_cli(&["migrate", "jupyterhub", "--db", db.to_str().unwrap()], Some(&data_dir), None);
        assert_eq!(code, 1, "{} refused: {out}{err}", db.display());
        assert!(err.contains(says) && err.contains(&db.display().to_string()), "{}: {err}", db.display());
        assert!(!err.contains("panicked"), "{err}");
        assert!(!data_dir.exists(), "nothing was written for {}", db.display());
        assert_eq!(std::fs::read(db).ok(), before, "the source is untouched");
    }
}
