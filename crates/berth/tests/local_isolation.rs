//! The local-process spawner as root: a user's server and SSH sessions run
//! under a Unix account of their own (`berth-<user>`), so what they run
//! cannot read berth's secrets, its database, its logs or other users' homes.
//! Needs root (it makes real accounts, removed again when the test ends).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test
mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::*;
use reqwest::{Method, StatusCode};
use serde_json::json;

const PW: &str = "isolation-pass-42x";
/// The system's Python: one under /root (pyenv, say) is not for other users.
const HTTP_SERVER: &str = "/usr/bin/python3 -m http.server {port} --bind 127.0.0.1";

/// The Unix accounts this test's users get, removed when it ends (pass or
/// fail): their processes killed by pid, then `userdel`. Declare it before
/// the `Berth` so that berth goes first.
struct Accounts(Vec<String>);

impl Drop for Accounts {
    fn drop(&mut self) {
        for name in &self.0 {
            if let Some(uid) = passwd(name).map(|(uid, _, _)| uid) {
                for pid in processes(|pid| uid_of(pid) == Some(uid)) {
                    let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
                }
                let _ = Command::new("userdel").arg("-f").arg(name).output();
            }
            let _ = Command::new("groupdel").arg(name).output();
        }
    }
}

/// uid, home and shell of an account, from the passwd database.
fn passwd(name: &str) -> Option<(u32, String, String)> {
    let out = Command::new("getent").args(["passwd", name]).output().ok()?;
    let line = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let f: Vec<&str> = line.split(':').collect();
    if f.len() != 7 {
        return None;
    }
    Some((f[2].parse().ok()?, f[5].to_string(), f[6].to_string()))
}

fn uid_of(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("Uid:"))?.split_whitespace().next()?.parse().ok()
}

fn processes(keep: impl Fn(u32) -> bool) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| keep(*pid))
        .collect()
}

/// `ssh -i key login@127.0.0.1 cmd` with the real OpenSSH client.
fn ssh(b: &Berth, key: &Path, login: &str, cmd: &str) -> Output {
    let port = b.ssh_addr.as_ref().expect("the SSH gateway is on").rsplit(':').next().unwrap().to_string();
    Command::new("timeout")
        .arg("120")
        .arg("ssh")
        .args(["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR"])
        .args(["-o", "IdentityAgent=none", "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes"])
        .args(["-o", "ConnectTimeout=20", "-p", &port, "-i"])
        .arg(key)
        .arg(format!("{login}@127.0.0.1"))
        .arg(cmd)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// Whether `cmd` run by alice over SSH is refused with "Permission denied".
fn refused(b: &Berth, key: &Path, login: &str, cmd: &str) -> Result<(), String> {
    let o = ssh(b, key, login, cmd);
    if !o.status.success() && err(&o).contains("Permission denied") {
        Ok(())
    } else {
        let shown: String = format!("{}{}", out(&o), err(&o)).chars().filter(|c| !c.is_control()).take(120).collect();
        Err(format!("`{cmd}` was not refused ({}): {shown}", o.status))
    }
}

#[tokio::test]
async fn a_local_users_server_and_shell_cannot_read_berths_data() {
    if !running_as_root() {
        eprintln!("skipped: the local spawner gives users accounts of their own only when berth runs as root");
        return;
    }
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    let suffix = format!("{:x}{:x}", std::process::id() % 4096, nanos % 65536);
    let (alice, bob) = (format!("alice{suffix}"), format!("bob{suffix}"));
    let (alice_login, bob_login) = (format!("berth-{alice}"), format!("berth-{bob}"));
    let _accounts = Accounts(vec![alice_login.clone(), bob_login.clone()]);
    let tmp = tempfile::tempdir().unwrap();
    let b = Berth::start_with(
        &[
            ("BERTH_LOCAL_ISOLATE_USERS", "true"),
            ("BERTH_LOCAL_CMD", HTTP_SERVER),
            ("BERTH_START_TIMEOUT", "60"),
            ("BERTH_SSH_BIND", "127.0.0.1:0"),
            ("BERTH_SSH_HOST_KEY_TYPES", "ed25519"),
        ],
        &[],
    );
    let (admin, alice_web) = admin_and_user(&b, &alice, PW).await;
    let bob_web = authorized_user(&b, &admin, &bob, PW).await;

    // alice's server runs under her own account, not as root.
    let r = alice_web.api(Method::POST, &format!("/hub/api/users/{alice}/server")).json(&json!({})).send().await;
    assert_eq!(r.unwrap().status(), StatusCode::CREATED, "alice's start\n{}", b.log());
    let (uid, home, _shell) = passwd(&alice_login).expect("berth made alice's account");
    assert_ne!(uid, 0);
    let alice_home = b.data_dir.join("home").join(&alice);
    assert_eq!(Path::new(&home), alice_home, "her account's home is her berth home");
    let cwd = alice_home.canonicalize().unwrap();
    let servers = processes(|pid| {
        std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|c| c == cwd)
            && std::fs::read_to_string(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c.contains("http.server"))
    });
    assert_eq!(servers.len(), 1, "alice's server process: {servers:?}");
    assert_eq!(uid_of(servers[0]), Some(uid), "alice's server runs as {alice_login}");
    let meta = std::fs::metadata(&alice_home).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o777), (uid, 0o700), "her home is hers alone");

    // Her SSH sessions run as that account too.
    let Key { private: alice_key, public: alice_pub } = keygen(tmp.path(), "alice");
    let Key { private: bob_key, public: bob_pub } = keygen(tmp.path(), "bob");
    for (who, name, key) in [(&alice_web, &alice, &alice_pub), (&bob_web, &bob, &bob_pub)] {
        let r = who.api(Method::POST, &format!("/hub/api/users/{name}/keys")).json(&json!({"key": key})).send().await;
        assert_eq!(r.unwrap().status(), StatusCode::CREATED);
    }
    let o = ssh(&b, &alice_key, &alice, "id -u; id -un; echo \"$HOME\"; echo mine > notes && cat notes");
    assert!(o.status.success(), "{}\n{}", err(&o), b.log());
    assert_eq!(out(&o), format!("{uid}\n{alice_login}\n{}\nmine", alice_home.display()), "{}", err(&o));
    // bob's first session makes his account (and starts his server).
    let o = ssh(&b, &bob_key, &bob, "id -u");
    assert!(o.status.success(), "{}\n{}", err(&o), b.log());
    let bob_uid = passwd(&bob_login).expect("bob's account").0;
    assert_eq!(out(&o), bob_uid.to_string());
    assert_ne!(bob_uid, uid);

    // What berth keeps is out of her reach: the cookie secret, the database,
    // the logs, the listing of the data directory, bob's home.
    let data = b.data_dir.display().to_string();
    let mut leaks = Vec::new();
    for cmd in [
        format!("cat {data}/cookie_secret"),
        format!("cat {data}/logs/{alice}.log"),
        format!("ls {data}/home/{bob}"),
        format!("touch {data}/planted"),
        format!("ls {data}"),
        format!("cat {data}/berth.sqlite"),
    ] {
        if let Err(e) = refused(&b, &alice_key, &alice, &cmd) {
            leaks.push(e);
        }
    }
    let modes: Vec<String> = std::fs::read_dir(&b.data_dir)
        .unwrap()
        .flatten()
        .map(|e| format!("{:o} {}", e.metadata().unwrap().mode() & 0o7777, e.file_name().to_string_lossy()))
        .collect();
    let top = std::fs::metadata(&b.data_dir).unwrap().mode() & 0o7777;
    assert!(leaks.is_empty(), "alice reached berth's data:\n{}\n(data directory {top:o}: {modes:?})", leaks.join("\n"));
}

fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("Uid:")).map(|u| u.split_whitespace().nth(1) == Some("0")))
        .unwrap_or(false)
}
