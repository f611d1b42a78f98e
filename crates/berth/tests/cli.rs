//! The command line: configuration errors, start-up failures, and account
//! management while berth runs.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test
mod common;

use std::net::TcpListener;

use common::*;
use reqwest::StatusCode;

#[test]
fn invalid_configuration_exits_64_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("berth.toml");
    std::fs::write(&cfg, "[hub]\nadmn = \"x\"\n").unwrap();
    let (code, _, err) = run_cli(&["config", "check", "--config", cfg.to_str().unwrap()], None, None);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("hub.admn"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");

    std::fs::write(&cfg, "[auth]\nlockout_seconds = \"ten\"\n").unwrap();
    let (code, _, err) = run_cli(&["serve", "--config", cfg.to_str().unwrap()], None, None);
    assert_eq!(code, 64);
    assert!(err.contains("auth.lockout_seconds"), "{err}");

    let (code, out, _) = run_cli(&["config", "defaults"], None, None);
    assert_eq!(code, 0);
    std::fs::write(&cfg, &out).unwrap();
    let (code, out, err) = run_cli(&["config", "check", "--config", cfg.to_str().unwrap()], None, None);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("0.0.0.0:27015"));
    let (code, _, err) = run_cli(&["serve", "--bind", "nowhere"], None, None);
    assert_eq!(code, 64);
    assert!(err.contains("`bind`"), "{err}");
}

#[test]
fn port_in_use_is_one_line_and_nonzero() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let (code, _, err) = run_cli(&["serve", "--bind", &addr], Some(dir.path()), None);
    assert_ne!(code, 0);
    assert!(err.contains("already in use") && err.contains(&addr), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(err.lines().filter(|l| l.starts_with("berth:")).count(), 1, "{err}");
}

#[test]
fn corrupt_database_and_unwritable_dir_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("berth.sqlite"), vec![7u8; 10_000]).unwrap();
    let (code, _, err) = run_cli(&["serve", "--bind", "127.0.0.1:0"], Some(dir.path()), None);
    assert_ne!(code, 0);
    assert!(err.contains("damaged") && err.contains("berth.sqlite"), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    let file = dir.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    let (code, _, err) = run_cli(&["serve", "--bind", "127.0.0.1:0"], Some(&file.join("sub")), None);
    assert_ne!(code, 0);
    assert!(err.contains("data directory"), "{err}");
}

#[tokio::test]
async fn user_commands_work_while_serving() {
    let b = Berth::start();
    let _admin = b.first_admin().await;
    let bob = Browser::new(&b.url);
    bob.signup("bob", "bob-pass-42xy").await;
    let (code, out, err) = b.cli(&["user", "list", "--pending"], None);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("bob") && !out.contains("admin "), "{out}");
    let (code, _, err) = b.cli(&["user", "approve", "bob"], None);
    assert_eq!(code, 0, "{err}");
    bob.login_ok("bob", "bob-pass-42xy").await;

    let (code, out, err) = b.cli(&["user", "add", "carol"], None);
    assert_eq!(code, 0, "{err}");
    let pw = out.lines().find_map(|l| l.strip_prefix("password: ")).expect("generated password").to_string();
    Browser::new(&b.url).login_ok("carol", &pw).await;

    let (code, _, err) = b.cli(&["user", "add", "Bad Name"], None);
    assert_ne!(code, 0);
    assert!(err.contains("space"), "{err}");
    let (code, _, err) = b.cli(&["user", "delete", "ghost"], None);
    assert_ne!(code, 0);
    assert!(err.contains("ghost") && err.contains("not found"), "{err}");

    let (code, _, err) = b.cli(&["user", "delete", "bob"], None);
    assert_eq!(code, 0, "{err}");
    assert_eq!(bob.get("/hub/home").await.status(), StatusCode::SEE_OTHER, "a deleted user's session ends");
}

#[tokio::test]
async fn import_nativeauth_accounts() {
    // A JupyterHub database with NativeAuthenticator's table, as it stores it.
    let dir = tempfile::tempdir().unwrap();
    let jh = dir.path().join("jupyterhub.sqlite");
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(&format!("sqlite://{}?mode=rwc", jh.display())).await.unwrap();
    for stmt in [
        "CREATE TABLE users (id INTEGER PRIMARY KEY, name VARCHAR(255) UNIQUE, admin BOOLEAN)",
        "CREATE TABLE users_info (id INTEGER PRIMARY KEY, username VARCHAR(128) NOT NULL, password BLOB NOT NULL, is_authorized BOOLEAN, email VARCHAR(128), has_2fa BOOLEAN, otp_secret VARCHAR(16))",
    ] {
        sqlx::query(stmt).execute(&pool).await.unwrap();
    }
    let users =
        [("dora", "dora-secret-pw1", 1, 1), ("eli", "eli-secret-pw12", 0, 0), ("Bad.Name", "whatever-pw-123", 1, 0)];
    for (name, pw, authorized, admin) in users {
        let hash = bcrypt::hash(pw, 4).unwrap();
        sqlx::query("INSERT INTO users_info (username, password, is_authorized) VALUES ($1, $2, $3)")
            .bind(name)
            .bind(hash.into_bytes())
            .bind(authorized as i64)
            .execute(&pool)
            .await
            .unwrap();
        sqlx::query("INSERT INTO users (name, admin) VALUES ($1, $2)")
            .bind(name)
            .bind(admin as i64)
            .execute(&pool)
            .await
            .unwrap();
    }
    pool.close().await;

    let b = Berth::start();
    let (code, out, err) = b.cli(&["user", "import-nativeauth", jh.to_str().unwrap()], None);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("2 account(s) imported, 1 skipped"), "{out}");
    assert!(out.contains("Bad.Name"), "the skipped name is reported: {out}");

    let dora = Browser::new(&b.url);
    dora.login_ok("dora", "dora-secret-pw1").await;
    let me: serde_json::Value =
        dora.api(reqwest::Method::GET, "/hub/api/user").send().await.unwrap().json().await.unwrap();
    assert_eq!(me["admin"], true);
    let eli = Browser::new(&b.url);
    let r = eli.login("eli", "eli-secret-pw12").await;
    assert!(alert_text(&r.text().await.unwrap()).contains("not been authorized"));
    // dora's bcrypt hash was replaced by argon2id at log-in.
    let (code, out, _) = b.cli(&["user", "list"], None);
    assert_eq!(code, 0);
    assert!(out.contains("dora"));
    let db = std::fs::read(b.data_dir.join("berth.sqlite-wal")).unwrap_or_default();
    let db = [db, std::fs::read(b.data_dir.join("berth.sqlite")).unwrap()].concat();
    assert!(String::from_utf8_lossy(&db).contains("$argon2id$"));
}

#[test]
fn doctor_reports_each_check() {
    let dir = tempfile::tempdir().unwrap();
    let (code, out, err) = run_cli(&["doctor", "--bind", "127.0.0.1:0"], Some(dir.path()), None);
    let _ = err;
    // --bind is a serve flag; doctor takes the configuration's bind instead.
    assert_ne!(code, 0);
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let cfg = dir.path().join("berth.toml");
    std::fs::write(&cfg, format!("bind = \"{addr}\"\n[spawner]\nkind = \"local\"\n")).unwrap();
    let (code, out2, _) = run_cli(&["doctor", "--config", cfg.to_str().unwrap()], Some(dir.path()), None);
    assert_ne!(code, 0, "the port is taken: {out2}");
    assert!(out2.contains("OK  data directory") && out2.contains("OK  database"), "{out2}");
    assert!(out2.lines().any(|l| l.starts_with("FIX port")), "{out2}");
    drop(taken);
    let (code, out3, _) = run_cli(&["doctor", "--config", cfg.to_str().unwrap()], Some(dir.path()), None);
    assert_eq!(code, 0, "{out3}");
    assert!(out3.contains("OK  spawner: local processes"), "{out3}");
    let _ = out;
}

/// docs/configuration.md is what `berth config reference` prints: a key
/// added without regenerating it fails here, not in a reader's hands.
#[test]
fn the_configuration_reference_in_docs_is_current() {
    let out = std::process::Command::new(BIN).args(["config", "reference"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let docs = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/configuration.md")).unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout) == docs,
        "docs/configuration.md is out of date: run `berth config reference > docs/configuration.md`"
    );
}

/// A reader that goes away (`berth templates list | head -1`) ends berth
/// quietly with SIGPIPE's shell status, never with a panic.
#[test]
fn output_into_a_closed_pipe_is_not_a_panic() {
    for args in [&["templates", "list"][..], &["config", "reference"], &["templates", "show", "jupyterlab"]] {
        // A pipe whose reading end is closed before berth starts.
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = std::process::Command::new(BIN)
            .args(args)
            .env_remove("BERTH_CONFIG")
            .stdout(writer)
            .stderr(std::process::Stdio::piped())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert_eq!(out.status.code(), Some(141), "{args:?}: {stderr}");
    }
}
