//! Issue 6's acceptance: the SSH gateway with the real OpenSSH client
//! (ssh, scp, sftp from Debian's packages), against the local-process
//! spawner and the Docker spawner.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test
mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

const PW: &str = "ssh-pass-42x";

fn fingerprint(key: &Key) -> String {
    let out = Command::new("ssh-keygen").arg("-lf").arg(key.private.with_extension("pub")).output().unwrap();
    String::from_utf8_lossy(&out.stdout).split_whitespace().nth(1).unwrap().to_string()
}

/// What every client call shares: no known_hosts, no agent, no prompts.
fn client_opts(port: &str) -> Vec<String> {
    [
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "LogLevel=ERROR",
        "-o",
        "IdentityAgent=none",
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "BatchMode=yes",
        "-o",
        "ConnectTimeout=20",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain(["-p".to_string(), port.to_string()])
    .collect()
}

/// The same, logging at INFO: OpenSSH reports a refused channel's reason there.
fn client_opts_info(port: &str) -> Vec<String> {
    client_opts(port).into_iter().map(|o| if o == "LogLevel=ERROR" { "LogLevel=INFO".into() } else { o }).collect()
}

fn port_of(b: &Berth) -> String {
    b.ssh_addr.as_ref().expect("the SSH gateway is on").rsplit(':').next().unwrap().to_string()
}

/// `ssh -i key login@127.0.0.1 cmd`, with a time limit.
fn ssh(b: &Berth, key: &Key, login: &str, cmd: &str, stdin: Option<&[u8]>) -> Output {
    let mut c = Command::new("timeout");
    c.arg("300").arg("ssh").args(client_opts(&port_of(b))).arg("-i").arg(&key.private);
    c.arg(format!("{login}@127.0.0.1")).arg(cmd);
    run_with_stdin(c, stdin)
}

fn run_with_stdin(mut c: Command, stdin: Option<&[u8]>) -> Output {
    use std::io::Write;
    c.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() }).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    if let Some(data) = stdin {
        let mut s = child.stdin.take().unwrap();
        let data = data.to_vec();
        std::thread::spawn(move || {
            let _ = s.write_all(&data);
        });
    }
    child.wait_with_output().unwrap()
}

/// The log without terminal colour codes.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

fn errtext(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

async fn add_key(user: &Browser, name: &str, key: &str) -> reqwest::Response {
    user.api(Method::POST, &format!("/hub/api/users/{name}/keys")).json(&json!({"key": key})).send().await.unwrap()
}

async fn authorized(b: &Berth, admin: &Browser, name: &str) -> Browser {
    authorized_user(b, admin, name, PW).await
}

/// Drives an interactive `ssh -tt` under tmux: types a command, reads the
/// screen, resizes the window and reads `stty size` again.
fn pty_session(b: &Berth, key: &Key, login: &str) {
    let session = format!("berth-ssh-{}", std::process::id());
    let ssh_cmd =
        format!("ssh {} -i {} -tt {login}@127.0.0.1", client_opts(&port_of(b)).join(" "), key.private.display());
    let tmux = |args: &[&str]| Command::new("tmux").args(args).output().unwrap();
    let st = tmux(&["new-session", "-d", "-s", &session, "-x", "90", "-y", "30", &ssh_cmd]);
    assert!(st.status.success(), "{}", errtext(&st));
    let screen = || text(&tmux(&["capture-pane", "-p", "-t", &session]));
    // Whether `want` shows on the screen within `within`.
    let appears = |want: &str, within: Duration| {
        let start = Instant::now();
        loop {
            if screen().contains(want) {
                return true;
            }
            if start.elapsed() > within {
                return false;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let give_up = |want: &str| {
        let s = screen();
        let _ = tmux(&["kill-session", "-t", &session]);
        panic!("{want:?} never appeared on the terminal:\n{s}\n{}", b.log());
    };
    let wait_for = |want: &str| {
        if !appears(want, Duration::from_secs(30)) {
            give_up(want);
        }
    };
    // A command typed at the prompt shows its output.
    tmux(&["send-keys", "-t", &session, "echo typed-$((6*7))", "Enter"]);
    wait_for("typed-42");
    tmux(&["send-keys", "-t", &session, "stty size", "Enter"]);
    wait_for("30 90");
    // The window changes; the shell's terminal follows. The change travels
    // tmux -> ssh -> berth -> the pty on its own: ask again until it is there.
    tmux(&["resize-window", "-t", &session, "-x", "120", "-y", "40"]);
    let start = Instant::now();
    loop {
        tmux(&["send-keys", "-t", &session, "stty size", "Enter"]);
        if appears("40 120", Duration::from_secs(1)) {
            break;
        }
        if start.elapsed() > Duration::from_secs(30) {
            give_up("40 120");
        }
    }
    // A background job holding the terminal does not keep the session open.
    tmux(&["send-keys", "-t", &session, "sleep 300 &", "Enter"]);
    tmux(&["send-keys", "-t", &session, "exit", "Enter"]);
    for _ in 0..100 {
        if !tmux(&["has-session", "-t", &session]).status.success() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = tmux(&["kill-session", "-t", &session]);
    panic!("the session did not end after exit");
}

/// 100 MiB up with scp and back, byte for byte; `sftp` lists the directory.
fn transfers(b: &Berth, key: &Key, login: &str, tmp: &Path) {
    let src = tmp.join("big.bin");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&src).unwrap();
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut buf = vec![0u8; 1 << 20];
        for _ in 0..100 {
            for chunk in buf.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                chunk.copy_from_slice(&x.to_le_bytes());
            }
            f.write_all(&buf).unwrap();
        }
    }
    let port = port_of(b);
    let scp = |from: &str, to: &str| {
        let o = Command::new("timeout")
            .arg("300")
            .arg("scp")
            .args(client_opts(&port).iter().map(|s| if s == "-p" { "-P".to_string() } else { s.clone() }))
            .arg("-i")
            .arg(&key.private)
            .arg(from)
            .arg(to)
            .output()
            .unwrap();
        assert!(o.status.success(), "scp {from} {to}: {}\n{}", errtext(&o), b.log());
    };
    scp(src.to_str().unwrap(), &format!("{login}@127.0.0.1:big.bin"));
    let back = tmp.join("back.bin");
    scp(&format!("{login}@127.0.0.1:big.bin"), back.to_str().unwrap());
    assert_eq!(std::fs::metadata(&back).unwrap().len(), 100 << 20);
    assert!(std::fs::read(&src).unwrap() == std::fs::read(&back).unwrap(), "the file came back changed");

    let o = run_with_stdin(
        {
            let mut c = Command::new("timeout");
            c.arg("120")
                .arg("sftp")
                .args(client_opts(&port).iter().map(|s| if s == "-p" { "-P".to_string() } else { s.clone() }))
                .arg("-i")
                .arg(&key.private)
                .arg("-b")
                .arg("-")
                .arg(format!("{login}@127.0.0.1"));
            c
        },
        Some(b"pwd\nls -1\n"),
    );
    assert!(o.status.success(), "sftp: {}", errtext(&o));
    assert!(text(&o).contains("big.bin"), "sftp lists the working directory: {}", text(&o));
    let o = ssh(b, key, login, "rm big.bin", None);
    assert!(o.status.success());
}

/// The refusals every spawner shares: another user's key, passwords, a
/// pending user, a removed key.
async fn refusals(b: &Berth, admin: &Browser, alice: &Browser, alice_key: &Key, bob_key: &Key, tmp: &Path) {
    // bob's key does not open alice's environment.
    let o = ssh(b, bob_key, "alice", "true", None);
    assert_eq!(o.status.code(), Some(255), "{}", errtext(&o));
    assert!(errtext(&o).contains("Permission denied"), "{}", errtext(&o));

    // A password is never accepted, not even alice's own (given by SSH_ASKPASS).
    let o = ssh_with_password(tmp, port_of(b).parse().unwrap(), "alice", PW);
    assert_eq!(o.status.code(), Some(255), "{}", errtext(&o));
    assert!(errtext(&o).contains("Permission denied (publickey)"), "only keys are offered: {}", errtext(&o));

    // A pending user's key is refused (the admin registered it for her).
    let carol = Browser::new(&b.url);
    carol.signup("carol", PW).await;
    let carol_key = keygen(tmp, "carol");
    let r = add_key(admin, "carol", &carol_key.public).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let o = ssh(b, &carol_key, "carol", "true", None);
    assert_eq!(o.status.code(), Some(255), "a pending user is refused: {}", errtext(&o));

    // A key removed through the API is refused on the next connection.
    let fp = fingerprint(alice_key);
    let path = format!("/hub/api/users/alice/keys/{}", fp.replace('/', "%2F").replace('+', "%2B"));
    let r = alice.api(Method::DELETE, &path).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let o = ssh(b, alice_key, "alice", "true", None);
    assert_eq!(o.status.code(), Some(255), "a removed key is refused: {}", errtext(&o));
    let r = add_key(alice, "alice", &alice_key.public).await;
    assert_eq!(r.status(), StatusCode::CREATED, "the key can be registered again");
}

#[tokio::test]
async fn keys_api_validates_lists_and_scopes() {
    let tmp = tempfile::tempdir().unwrap();
    let b = Berth::start();
    let (admin, alice) = admin_and_user(&b, "alice", PW).await;
    let bob = authorized(&b, &admin, "bob").await;
    let key = keygen(tmp.path(), "alice");

    let r = add_key(&alice, "alice", &key.public).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let created: Value = r.json().await.unwrap();
    assert_eq!(created["fingerprint"], fingerprint(&key).as_str(), "the fingerprint ssh-keygen -l prints");
    assert_eq!(created["comment"], "alice@test");

    // Duplicates (for anyone) and malformed keys are refused with a reason.
    let r = add_key(&alice, "alice", &key.public).await;
    assert_eq!(r.status(), StatusCode::CONFLICT);
    let r = add_key(&bob, "bob", &key.public).await;
    assert_eq!(r.status(), StatusCode::CONFLICT);
    let msg: Value = r.json().await.unwrap();
    assert!(msg["message"].as_str().unwrap().contains("already registered"), "{msg}");
    let private = std::fs::read_to_string(&key.private).unwrap();
    for (bad, why) in
        [("ssh-ed25519 AAAAnot-a-key", "cannot be read"), (private.as_str(), "private key"), ("", "empty")]
    {
        let r = add_key(&alice, "alice", bad).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        let m: Value = r.json().await.unwrap();
        assert!(m["message"].as_str().unwrap().contains(why), "{m}");
    }
    let r = alice.api(Method::POST, "/hub/api/users/alice/keys").json(&json!({"nope": 1})).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);

    // Listing: alice sees hers, bob cannot see them, the admin can.
    let list: Value = alice.api(Method::GET, "/hub/api/users/alice/keys").send().await.unwrap().json().await.unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["key"], key.public.rsplit_once(' ').unwrap().0);
    let r = bob.api(Method::GET, "/hub/api/users/alice/keys").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = bob.api(Method::DELETE, &format!("/hub/api/users/alice/keys/{}", created["id"].as_str().unwrap()));
    assert_eq!(r.send().await.unwrap().status(), StatusCode::FORBIDDEN);
    let r = admin.api(Method::GET, "/hub/api/users/alice/keys").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    // The keys page shows the key; an admin removes it by id.
    let (status, page) = alice.get_text("/hub/keys").await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains(created["fingerprint"].as_str().unwrap()));
    let r = admin.api(Method::DELETE, &format!("/hub/api/users/alice/keys/{}", created["id"].as_str().unwrap()));
    assert_eq!(r.send().await.unwrap().status(), StatusCode::NO_CONTENT);
    let r = admin.api(Method::DELETE, &format!("/hub/api/users/alice/keys/{}", created["id"].as_str().unwrap()));
    assert_eq!(r.send().await.unwrap().status(), StatusCode::NOT_FOUND);

    // Adding through the page works the same way.
    let r = alice.submit("/hub/keys", "/hub/keys/alice", &[("key", &key.public)]).await;
    let body = r.text().await.unwrap();
    assert!(body.contains("Added SHA256:"), "{}", alert_text(&body));
    let r = alice.submit("/hub/keys", "/hub/keys/alice", &[("key", "garbage")]).await;
    assert!(alert_text(&r.text().await.unwrap()).contains("not an OpenSSH public key"));
}

#[tokio::test]
async fn local_spawner_shell_exec_pty_sftp_and_refusals() {
    let tmp = tempfile::tempdir().unwrap();
    let cmd = singleuser_cmd();
    let b = Berth::start_with(
        &[
            ("BERTH_SSH_BIND", "127.0.0.1:0"),
            ("BERTH_SSH_HOST_KEY_TYPES", "ed25519,ecdsa"),
            ("BERTH_SSH_MAX_AUTH_FAILURES", "8"),
            ("BERTH_LOCAL_CMD", &cmd),
        ],
        &[],
    );
    let (admin, alice) = admin_and_user(&b, "alice", PW).await;
    let bob = authorized(&b, &admin, "bob").await;
    let alice_key = keygen(tmp.path(), "alice");
    let bob_key = keygen(tmp.path(), "bob");
    assert_eq!(add_key(&alice, "alice", &alice_key.public).await.status(), StatusCode::CREATED);
    assert_eq!(add_key(&bob, "bob", &bob_key.public).await.status(), StatusCode::CREATED);

    // The first connection starts alice's stopped server, showing progress.
    let o = ssh(&b, &alice_key, "alice", "id -un; pwd; echo $0", None);
    assert!(o.status.success(), "{}\n{}", errtext(&o), b.log());
    let out = text(&o);
    let lines: Vec<&str> = out.lines().collect();
    let home = b.data_dir.join("home").join("alice");
    assert_eq!(lines[1], home.to_str().unwrap(), "the session starts in alice's home: {out}");
    assert!(lines[2].ends_with("sh"), "the command ran under her shell: {out}");
    assert!(errtext(&o).contains("starting alice"), "progress shown: {}", errtext(&o));
    let r = alice.get("/hub/api/users/alice").await;
    let model: Value = r.json().await.unwrap();
    assert_eq!(model["servers"][""]["ready"], true, "the server runs now: {model}");

    // Exit status, stdin with its end, and an allowed environment variable.
    assert_eq!(ssh(&b, &alice_key, "alice", "exit 3", None).status.code(), Some(3));
    let o = ssh(&b, &alice_key, "alice", "tr a-z A-Z", Some(b"piped through\n"));
    assert_eq!(text(&o), "PIPED THROUGH\n");
    let o = Command::new("ssh")
        .args(client_opts(&port_of(&b)))
        .arg("-i")
        .arg(&alice_key.private)
        .args(["-o", "SetEnv=LC_BERTH=kept LD_PRELOAD=/nope", "alice@127.0.0.1", "echo \"$LC_BERTH:$LD_PRELOAD\""])
        .output()
        .unwrap();
    assert_eq!(text(&o).trim(), "kept:", "LC_* passes, LD_PRELOAD does not: {}", errtext(&o));

    pty_session(&b, &alice_key, "alice");
    transfers(&b, &alice_key, "alice", tmp.path());

    // A named server: alice+lab is started on demand too.
    let o = ssh(&b, &alice_key, "alice+lab", "echo $JUPYTERHUB_SERVER_NAME; pwd", None);
    assert!(o.status.success(), "{}", errtext(&o));
    let r = alice.get("/hub/api/users/alice").await;
    let model: Value = r.json().await.unwrap();
    assert_eq!(model["servers"]["lab"]["ready"], true, "{model}");

    // Forwarding with the local spawner reaches only the server's own port.
    let o = ssh(&b, &alice_key, "alice", "true", None);
    assert!(o.status.success());
    let o = run_with_stdin(
        {
            let mut c = Command::new("timeout");
            c.arg("60").arg("ssh").args(client_opts_info(&port_of(&b))).arg("-i").arg(&alice_key.private);
            c.args(["-W", "localhost:1", "alice@127.0.0.1"]);
            c
        },
        Some(b""),
    );
    assert_ne!(o.status.code(), Some(0));
    assert!(errtext(&o).contains("forwards only to the server's own port"), "{}", errtext(&o));

    refusals(&b, &admin, &alice, &alice_key, &bob_key, tmp.path()).await;

    // Audit: the log has each session's user, peer, duration and bytes; the
    // admin view counts sessions.
    let log = strip_ansi(&b.log());
    let ended = log.lines().find(|l| l.contains("SSH session ended") && l.contains("user=alice")).expect(&log);
    for field in ["peer=127.0.0.1", "duration_s=", "bytes_to_client=", "bytes_from_client="] {
        assert!(ended.contains(field), "{field} in {ended}");
    }
    let (_, page) = admin.get_text("/hub/authorize").await;
    let row = page.split("<tr id=\"alice\">").nth(1).unwrap().split("</tr>").next().unwrap();
    assert!(row.contains("ssh-sessions"), "{row}");

    // Too many failures from one address: refused outright, with the reason.
    // (So far: bob's key, carol's, the removed key; the password client got
    // no further than asking which methods exist.)
    for _ in 0..5 {
        let _ = ssh(&b, &bob_key, "alice", "true", None);
    }
    // The last failure is counted as its connection closes: allow a moment.
    let attempt = || {
        Command::new("timeout")
            .arg("60")
            .arg("ssh")
            .args(client_opts_info(&port_of(&b)))
            .arg("-i")
            .arg(&alice_key.private)
            .args(["alice@127.0.0.1", "true"])
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let mut o = attempt();
    for _ in 0..20 {
        if o.status.code() == Some(255) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        o = attempt();
    }
    assert_eq!(o.status.code(), Some(255), "even alice's good key is refused from this address now");
    assert!(errtext(&o).contains("too many failed SSH log-ins"), "{}", errtext(&o));
}

#[tokio::test]
async fn docker_exec_forwarding_stays_inside_the_container() {
    let image = test_image();
    let tmp = tempfile::tempdir().unwrap();
    let scope = DockerScope::new();
    let mut env = scope.env(&image);
    env.push(("BERTH_SSH_BIND".into(), "127.0.0.1:0".into()));
    env.push(("BERTH_SSH_HOST_KEY_TYPES".into(), "ed25519".into()));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let b = Berth::start_with(&env, &[]);
    let admin = b.first_admin().await;
    let alice_name = scope.user("al");
    let bob_name = scope.user("bo");
    let alice = authorized(&b, &admin, &alice_name).await;
    let bob = authorized(&b, &admin, &bob_name).await;
    let alice_key = keygen(tmp.path(), "alice");
    let bob_key = keygen(tmp.path(), "bob");
    assert_eq!(add_key(&alice, &alice_name, &alice_key.public).await.status(), StatusCode::CREATED);
    assert_eq!(add_key(&bob, &bob_name, &bob_key.public).await.status(), StatusCode::CREATED);

    // The command runs inside alice's container (its hostname is the container's).
    let o = ssh(&b, &alice_key, &alice_name, "id -un; pwd; echo $0; cat /etc/hostname", None);
    assert!(o.status.success(), "{}\n{}", errtext(&o), b.log());
    let out = text(&o);
    let lines: Vec<&str> = out.lines().collect();
    let c = docker_inspect(&format!("berth-{alice_name}")).expect("alice's container");
    assert_eq!(lines[0], "root");
    assert_eq!(lines[3], c["Config"]["Hostname"].as_str().unwrap(), "inside the container: {out}");
    assert_eq!(ssh(&b, &alice_key, &alice_name, "exit 3", None).status.code(), Some(3));
    let o = ssh(&b, &alice_key, &alice_name, "tr a-z A-Z", Some(b"piped through\n"));
    assert_eq!(text(&o), "PIPED THROUGH\n");

    pty_session(&b, &alice_key, &alice_name);
    transfers(&b, &alice_key, &alice_name, tmp.path());

    // A web server inside alice's container, on its loopback only.
    let o = ssh(
        &b,
        &alice_key,
        &alice_name,
        "cd /tmp && echo inside-alice > marker.txt && (setsid python3 -m http.server 8765 --bind 127.0.0.1 >/dev/null 2>&1 &) ; \
         for i in $(seq 50); do python3 -c 'import socket; socket.create_connection((\"127.0.0.1\", 8765))' 2>/dev/null && exit 0; sleep 0.2; done; exit 1",
        None,
    );
    assert!(o.status.success(), "the test web server started: {}", errtext(&o));

    // ssh -L reaches it.
    let local_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut fwd = Command::new("ssh")
        .args(client_opts(&port_of(&b)))
        .arg("-i")
        .arg(&alice_key.private)
        .args(["-N", "-o", "ExitOnForwardFailure=yes", "-L", &format!("127.0.0.1:{local_port}:localhost:8765")])
        .arg(format!("{alice_name}@127.0.0.1"))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let http = api_client();
    let mut body = String::new();
    for _ in 0..100 {
        if let Ok(r) = http.get(format!("http://127.0.0.1:{local_port}/marker.txt")).send().await {
            body = r.text().await.unwrap_or_default();
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = fwd.kill();
    let _ = fwd.wait();
    assert_eq!(body.trim(), "inside-alice", "the forward reached alice's web server");

    // Forwards anywhere else are refused: bob's container, the host's own
    // services (berth itself), other addresses.
    let _ = ssh(&b, &bob_key, &bob_name, "true", None);
    let bob_c = docker_inspect(&format!("berth-{bob_name}")).expect("bob's container");
    let bob_ip = bob_c["NetworkSettings"]["Networks"].as_object().unwrap().values().next().unwrap()["IPAddress"]
        .as_str()
        .unwrap()
        .to_string();
    let berth_port = b.url.rsplit(':').next().unwrap().to_string();
    for (target, why) in [
        (format!("{bob_ip}:8888"), "is outside it"),
        ("10.0.0.1:80".to_string(), "is outside it"),
        (format!("localhost:{berth_port}"), "nothing answers"),
    ] {
        let o = run_with_stdin(
            {
                let mut c = Command::new("timeout");
                c.arg("60").arg("ssh").args(client_opts_info(&port_of(&b))).arg("-i").arg(&alice_key.private);
                c.args(["-W", &target]).arg(format!("{alice_name}@127.0.0.1"));
                c
            },
            Some(b"GET / HTTP/1.0\r\n\r\n"),
        );
        assert_ne!(o.status.code(), Some(0), "{target} must not be reachable: {}", text(&o));
        assert!(errtext(&o).contains(why), "{target}: {}", errtext(&o));
        assert!(!text(&o).contains("HTTP/1."), "{target} answered: {}", text(&o));
    }

    // bob's key does not open alice's container.
    let o = ssh(&b, &bob_key, &alice_name, "true", None);
    assert_eq!(o.status.code(), Some(255));
}

#[tokio::test]
async fn a_removed_key_ends_its_open_sessions_and_silent_clients_are_cut_off() {
    let tmp = tempfile::tempdir().unwrap();
    let b = Berth::start_with(
        &[
            ("BERTH_SSH_BIND", "127.0.0.1:0"),
            ("BERTH_SSH_HOST_KEY_TYPES", "ed25519"),
            ("BERTH_SSH_RECHECK", "1"),
            ("BERTH_SSH_LOGIN_GRACE", "2"),
            ("BERTH_LOCAL_CMD", "python3 -m http.server {port} --bind 127.0.0.1"),
        ],
        &[],
    );
    let (_admin, alice) = admin_and_user(&b, "alice", PW).await;
    let key = keygen(tmp.path(), "alice");
    assert_eq!(add_key(&alice, "alice", &key.public).await.status(), StatusCode::CREATED);
    // A long session with the key …
    let mut c = Command::new("timeout");
    c.arg("120").arg("ssh").args(client_opts(&port_of(&b))).arg("-i").arg(&key.private);
    c.arg("alice@127.0.0.1").arg("echo started; sleep 100");
    let mut child = c.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut first = [0u8; 8];
    std::io::Read::read_exact(&mut out, &mut first).unwrap();
    assert_eq!(&first, b"started\n", "the session runs");
    // … ends soon after the key is removed.
    // By id: a fingerprint's base64 may hold a '/', which a path segment cannot.
    let keys: Value = alice.api(Method::GET, "/hub/api/users/alice/keys").send().await.unwrap().json().await.unwrap();
    assert_eq!(keys[0]["fingerprint"], fingerprint(&key));
    let id = keys[0]["id"].as_str().unwrap().to_string();
    let r = alice.api(Method::DELETE, &format!("/hub/api/users/alice/keys/{id}")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "the session outlived its key\n{}", b.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(!status.success(), "ended by berth, not by the command");
    assert!(t0.elapsed() < Duration::from_secs(30));
    assert!(b.log().contains("its key or account was withdrawn"), "{}", b.log());

    // A client that connects and never logs in is closed after the grace time.
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(b.ssh_addr.clone().unwrap()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let t0 = Instant::now();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    assert!(t0.elapsed() < Duration::from_secs(20), "closed by the log-in grace time");
    assert!(String::from_utf8_lossy(&buf).starts_with("SSH-2.0-berth"), "it was berth's SSH server");
}

/// The SSH-only PyTorch template through the gateway (issue 12, item 5):
/// `ssh alice+pytorch@host python3 -c 'print(1)'` starts alice's `pytorch`
/// server from the catalog's template (its image built on first use, on the
/// stand-in for its base that scripts/test makes), shows the start's
/// progress on the terminal and runs the command inside that container; the
/// next log-in finds it running.
#[tokio::test]
async fn ssh_user_plus_pytorch_starts_the_pytorch_template_and_runs_python() {
    let base = "pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime";
    let have = Command::new("docker").args(["image", "inspect", base]).output().unwrap();
    assert!(have.status.success(), "no {base} here: run the tests through scripts/test, which makes a stand-in");
    let image = test_image();
    let tmp = tempfile::tempdir().unwrap();
    let scope = DockerScope::new();
    let mut env = scope.env(&image);
    env.push(("BERTH_SSH_BIND".into(), "127.0.0.1:0".into()));
    env.push(("BERTH_SSH_HOST_KEY_TYPES".into(), "ed25519".into()));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let b = Berth::start_with(&env, &[]);
    let admin = b.first_admin().await;
    let alice_name = scope.user("pt");
    let alice = authorized(&b, &admin, &alice_name).await;
    let key = keygen(tmp.path(), "alice");
    assert_eq!(add_key(&alice, &alice_name, &key.public).await.status(), StatusCode::CREATED);

    // No image before the first log-in (its layers kept under another name
    // so the build, which must still happen, is quick after the first run).
    let (code, out, err) = run_cli(&["templates", "images"], None, None);
    assert_eq!(code, 0, "{out}{err}");
    let row = out.lines().find(|l| l.split_whitespace().next() == Some("pytorch")).unwrap_or_else(|| panic!("{out}"));
    let want = row.split_whitespace().find(|w| w.starts_with("berth-template-pytorch:")).unwrap().to_string();
    let docker =
        |args: &[&str]| Command::new("docker").args(args).output().map(|o| o.status.success()).unwrap_or(false);
    if docker(&["image", "inspect", &want]) {
        assert!(docker(&["tag", &want, "berth-test-cache/pytorch:layers"]) && docker(&["rmi", "--no-prune", &want]));
    }

    let login = format!("{alice_name}+pytorch");
    let run = |cmd: &str| {
        let mut c = Command::new("timeout");
        // A first log-in builds the template's image: minutes, not seconds.
        c.arg("1500").arg("ssh").args(client_opts(&port_of(&b))).arg("-i").arg(&key.private);
        c.arg(format!("{login}@127.0.0.1")).arg(cmd);
        run_with_stdin(c, None)
    };
    let o = run("python3 -c 'print(1)'; cat /etc/hostname");
    assert!(o.status.success(), "{}\n{}", errtext(&o), b.log());
    let out = text(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.first(), Some(&"1"), "{out}");
    let c = docker_inspect(&format!("berth-{alice_name}--pytorch")).expect("alice's pytorch container");
    assert_eq!(lines.get(1).copied(), c["Config"]["Hostname"].as_str(), "inside the pytorch container: {out}");
    assert_eq!(c["Config"]["Labels"]["berth.template"], "pytorch");
    assert_eq!(c["Config"]["Image"].as_str(), Some(want.as_str()));
    let _ = docker(&["tag", &want, "berth-test-cache/pytorch:layers"]);
    let err = errtext(&o);
    assert!(err.contains("berth: starting") && err.contains("Building berth-template-pytorch:"), "{err}");
    // The template's tools are there (git, tmux from its packages).
    let o = run("command -v git tmux");
    assert!(o.status.success() && text(&o).lines().count() == 2, "{}{}", text(&o), errtext(&o));
    assert!(!errtext(&o).contains("starting"), "running already: {}", errtext(&o));
    // The server's record says what it runs.
    let v: serde_json::Value =
        alice.api(Method::GET, &format!("/hub/api/users/{alice_name}")).send().await.unwrap().json().await.unwrap();
    assert_eq!(v["servers"]["pytorch"]["user_options"]["template"], "pytorch", "{v}");
}
