//! As root, each user's server and SSH sessions run under their own Unix
//! account. These tests make real accounts (removed again by [`Accounts`],
//! pass or fail, with names unique to the run) and skip themselves when not
//! run as root or without `useradd`.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::sync::atomic::{AtomicU32, Ordering};

use nix::unistd::User;

use super::*;
use crate::exec::{ExecKind, ExecProcess, ExecRequest, Output, PtySpec};

fn sbin(name: &str) -> PathBuf {
    which(name).unwrap_or_else(|| Path::new("/usr/sbin").join(name))
}

/// Whether accounts can be made here; says why not.
fn can_make_accounts() -> bool {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: making Unix accounts needs root");
        return false;
    }
    if !sbin("useradd").is_file() {
        eprintln!("skipped: useradd is not installed");
        return false;
    }
    true
}

/// The accounts a test makes, removed when it ends: their processes killed
/// (by pid), then `userdel`.
#[derive(Default)]
struct Accounts(Vec<String>);

impl Accounts {
    /// A berth user name unique to this run, whose account goes at the end.
    fn user(&mut self, base: &str) -> String {
        static N: AtomicU32 = AtomicU32::new(0);
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
        let name =
            format!("{base}-{:x}{:x}{}", std::process::id() % 4096, nanos % 4096, N.fetch_add(1, Ordering::Relaxed));
        self.0.push(format!("{}{name}", account::PREFIX));
        name
    }
}

impl Drop for Accounts {
    fn drop(&mut self) {
        for name in &self.0 {
            if let Ok(Some(u)) = User::from_name(name) {
                for pid in processes_of(u.uid.as_raw()) {
                    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
                }
                let _ = std::process::Command::new(sbin("userdel")).arg("-f").arg(name).output();
            }
            let _ = std::process::Command::new(sbin("groupdel")).arg(name).output();
        }
    }
}

fn processes_of(uid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| process::process_uid(*pid) == Some(uid))
        .collect()
}

/// A data directory other users can pass through (as berth's server makes it).
fn data_dir() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    tmp
}

fn isolated(dir: &Path, cmd: &[&str]) -> LocalSpawner {
    LocalSpawner::new(LocalConfig {
        cmd: cmd.iter().map(|s| s.to_string()).collect(),
        data_dir: dir.to_path_buf(),
        provision: false,
        ..LocalConfig::default()
    })
}

fn spec(user: &str) -> SpawnSpec {
    SpawnSpec {
        owner_id: String::new(),
        build: Vec::new(),
        user: user.into(),
        server: String::new(),
        env: BTreeMap::new(),
        cmd: vec![],
        prefix: format!("/user/{user}/"),
        template: String::new(),
        image: None,
        gpus: vec![],
        port: None,
        volumes: Vec::new(),
    }
}

async fn start(s: &LocalSpawner, user: &str) -> Result<Started, SpawnError> {
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    s.start(spec(user), tx).await
}

fn entry(user: &str) -> User {
    User::from_name(&account::account_name(user).unwrap()).unwrap().expect("the account exists")
}

/// A line of /proc/<pid>/status, its fields.
fn status_field(pid: u32, field: &str) -> Vec<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find_map(|l| l.strip_prefix(&format!("{field}:"))).unwrap().to_string();
    line.split_whitespace().map(str::to_string).collect()
}

async fn eventually(what: &str, f: impl Fn() -> bool) {
    for _ in 0..200 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn servers_run_under_their_own_accounts_with_private_homes() {
    if !can_make_accounts() {
        return;
    }
    let mut accounts = Accounts::default();
    let (alice, bob) = (accounts.user("alice"), accounts.user("bob"));
    let tmp = data_dir();
    // The server notes who it is, and leaves a background job in its group.
    let script = "id -u > who; echo \"$HOME:$USER:$LOGNAME\" >> who; sleep 300 & echo $! > job; wait";
    let s = isolated(tmp.path(), &["sh", "-c", script]);
    assert!(s.isolates_users());

    // A home from before isolation (berth's own) is handed over, except a
    // file with another hard link, which may be someone else's.
    let home = tmp.path().join("home").join(&alice);
    std::fs::create_dir_all(home.join("work")).unwrap();
    std::fs::write(home.join("work").join("old.txt"), "mine").unwrap();
    std::fs::write(tmp.path().join("berths"), "not hers").unwrap();
    std::fs::hard_link(tmp.path().join("berths"), home.join("linked")).unwrap();

    let started = start(&s, &alice).await.unwrap();
    let pid = started.state["pid"].as_u64().unwrap() as u32;
    let a = entry(&alice);
    let uid = a.uid.as_raw();
    assert!((20000..=29999).contains(&uid), "a uid from the default range: {uid}");
    assert_eq!(a.gid.as_raw(), uid, "its own group, of the same id");
    assert_eq!(a.gecos.to_str().unwrap(), format!("berth user {alice}"));
    assert_eq!(status_field(pid, "Uid"), vec![uid.to_string(); 4], "real, effective, saved and fs uid");
    assert_eq!(status_field(pid, "Gid"), vec![uid.to_string(); 4]);
    assert!(status_field(pid, "Groups").is_empty(), "root's groups are not kept");
    assert_eq!(started.state["uid"], uid);

    assert_eq!(a.dir, home);
    assert_eq!(std::fs::metadata(home.join("work").join("old.txt")).unwrap().uid(), uid);
    assert_eq!(std::fs::metadata(home.join("work")).unwrap().uid(), uid);
    assert_eq!(std::fs::metadata(tmp.path().join("berths")).unwrap().uid(), 0, "a hard link is not followed");
    let meta = std::fs::metadata(&home).unwrap();
    assert_eq!((meta.uid(), meta.gid(), meta.mode() & 0o7777), (uid, uid, 0o700), "alice's home is hers alone");
    assert_eq!(std::fs::metadata(tmp.path().join("home")).unwrap().mode() & 0o7777, 0o711, "home/ is not listable");
    eventually("the server to note who it is", || {
        std::fs::read_to_string(home.join("who")).is_ok_and(|w| w.lines().count() == 2)
    })
    .await;
    let who = std::fs::read_to_string(home.join("who")).unwrap();
    let login = format!("berth-{alice}");
    assert_eq!(who, format!("{uid}\n{}:{login}:{login}\n", home.display()));
    // The log is berth's: the server only holds its descriptor.
    let log = std::fs::metadata(tmp.path().join("logs").join(format!("{alice}.log"))).unwrap();
    assert_eq!((log.uid(), log.mode() & 0o777), (0, 0o600));
    assert_eq!(std::fs::metadata(tmp.path().join("logs")).unwrap().mode() & 0o777, 0o700);

    // A second user gets another account.
    let other = start(&s, &bob).await.unwrap();
    let b = entry(&bob).uid.as_raw();
    assert_ne!(b, uid);
    assert_eq!(process::process_uid(other.state["pid"].as_u64().unwrap() as u32), Some(b));
    s.stop(&other.state, StopGrace::default()).await.unwrap();

    // After a restart, another spawner adopts alice's server and stops its
    // whole group, the background job too.
    eventually("the job's pid", || {
        std::fs::read_to_string(home.join("job")).is_ok_and(|j| j.trim().parse::<u32>().is_ok())
    })
    .await;
    let job: u32 = std::fs::read_to_string(home.join("job")).unwrap().trim().parse().unwrap();
    let again = isolated(tmp.path(), &["sh", "-c", script]);
    assert_eq!(again.poll(&started.state).await.unwrap(), Status::Running);
    // A start that finds the account uses it again.
    assert_eq!(again.prepare_user(&alice).await.unwrap().1.unwrap().uid, uid);
    again
        .stop(&started.state, StopGrace { interrupt: Duration::from_secs(5), terminate: Duration::from_secs(5) })
        .await
        .unwrap();
    eventually("the server and its job to end", || !alive(pid, None, None) && !alive(job, None, None)).await;

    // Deleting alice's data removes her home and her account.
    again.remove_user_data(&alice, "").await.unwrap();
    assert!(!home.exists());
    assert!(User::from_name(&login).unwrap().is_none(), "the account is gone");
}

async fn collect(p: &mut ExecProcess) -> String {
    let mut out = String::new();
    while let Some(o) = tokio::time::timeout(Duration::from_secs(20), p.output.recv()).await.unwrap() {
        let (Output::Stdout(b) | Output::Stderr(b)) = o;
        out.push_str(&String::from_utf8_lossy(&b));
    }
    out
}

#[tokio::test]
async fn ssh_sessions_run_as_the_account_with_its_login_shell() {
    if !can_make_accounts() {
        return;
    }
    let mut accounts = Accounts::default();
    let alice = accounts.user("alice");
    let tmp = data_dir();
    let secret = tmp.path().join("cookie_secret");
    std::fs::write(&secret, "not for users").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let s = isolated(tmp.path(), &["true"]);

    let cmd = format!("id -u; id -G; echo \"$HOME:$USER:$LOGNAME:$SHELL:$0\"; pwd; cat {}", secret.display());
    let mut p =
        s.exec_local(&alice, ExecRequest { kind: ExecKind::Command(cmd), env: vec![], pty: None }).await.unwrap();
    let out = collect(&mut p).await;
    assert_ne!(p.control.wait().await.unwrap(), 0, "cat fails: {out}");
    let a = entry(&alice);
    let (uid, shell) = (a.uid.as_raw(), a.shell.display().to_string());
    let home = tmp.path().join("home").join(&alice);
    let login = format!("berth-{alice}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], uid.to_string(), "{out}");
    assert_eq!(lines[1], uid.to_string(), "only its own group: {out}");
    assert_eq!(lines[2], format!("{}:{login}:{login}:{shell}:{shell}", home.display()), "the passwd entry's shell");
    assert_eq!(lines[3], home.display().to_string());
    assert!(out.contains("Permission denied") && !out.contains("not for users"), "{out}");

    // A terminal: the shell runs as alice, and the terminal is hers.
    let pty = Some(PtySpec { term: "xterm".into(), cols: 80, rows: 24 });
    let req = ExecRequest { kind: ExecKind::Command("id -u; stat -c %u:%a $(tty)".into()), env: vec![], pty };
    let mut p = s.exec_local(&alice, req).await.unwrap();
    let out = collect(&mut p).await;
    assert_eq!(p.control.wait().await.unwrap(), 0, "{out}");
    assert_eq!(out.split_whitespace().collect::<Vec<_>>(), [uid.to_string(), format!("{uid}:620")], "{out}");
}

#[tokio::test]
async fn accounts_and_commands_berth_cannot_trust_are_refused() {
    if !can_make_accounts() {
        return;
    }
    let mut accounts = Accounts::default();
    let (carol, dave, erin, frank) =
        (accounts.user("carol"), accounts.user("dave"), accounts.user("erin"), accounts.user("frank"));
    let tmp = data_dir();
    let s = isolated(tmp.path(), &["sleep", "30"]);

    // An account of the same name that berth did not make.
    let useradd = |name: &str| {
        let st = std::process::Command::new(sbin("useradd")).args(["--system", "--no-create-home", name]).status();
        assert!(st.unwrap().success());
    };
    useradd(&format!("berth-{carol}"));
    let err = start(&s, &carol).await.unwrap_err().to_string();
    assert!(err.contains("berth did not make it"), "{err}");

    // A range whose only uid belongs to an account berth did not make.
    useradd(&format!("berth-{dave}"));
    let foreign = entry(&dave).uid.as_raw();
    let narrow = LocalSpawner::new(LocalConfig {
        cmd: vec!["sleep".into(), "30".into()],
        data_dir: tmp.path().to_path_buf(),
        provision: false,
        uid_min: foreign,
        uid_max: foreign,
        ..LocalConfig::default()
    });
    let err = start(&narrow, &erin).await.unwrap_err().to_string();
    assert!(err.contains("no free uid"), "{err}");
    assert!(User::from_name(&format!("berth-{erin}")).unwrap().is_none());

    // A command in a directory erin's account cannot enter.
    let private = tmp.path().join("private");
    std::fs::create_dir(&private).unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
    let prog = private.join("server");
    std::fs::write(&prog, "#!/bin/sh\nexec sleep 30\n").unwrap();
    std::fs::set_permissions(&prog, std::fs::Permissions::from_mode(0o755)).unwrap();
    let s = isolated(tmp.path(), &[prog.to_str().unwrap()]);
    let err = start(&s, &erin).await.unwrap_err().to_string();
    assert!(err.contains("cannot run the server command") && err.contains("is mode 0700"), "{err}");

    // erin's account is for this data directory; another one cannot use it.
    let elsewhere = data_dir();
    let err = start(&isolated(elsewhere.path(), &["sleep", "30"]), &erin).await.unwrap_err().to_string();
    assert!(err.contains("belongs to another berth data directory"), "{err}");

    // A data directory other users cannot pass through.
    let closed = tempfile::tempdir().unwrap();
    std::fs::set_permissions(closed.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let err = start(&isolated(closed.path(), &["sleep", "30"]), &frank).await.unwrap_err().to_string();
    assert!(err.contains("cannot reach its home") && err.contains("is mode 0700"), "{err}");
}

#[test]
fn only_root_with_isolation_on_isolates_users() {
    let cfg = LocalConfig { data_dir: "/nonexistent".into(), ..LocalConfig::default() };
    assert!(LocalSpawner::with_root(cfg.clone(), true).isolates_users());
    assert!(!LocalSpawner::with_root(cfg.clone(), false).isolates_users(), "not root: nothing to isolate with");
    let off = LocalConfig { isolate_users: false, ..cfg };
    assert!(!LocalSpawner::with_root(off, true).isolates_users(), "turned off");
}

#[tokio::test]
async fn without_isolation_processes_run_as_berths_own_user() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = LocalConfig { cmd: vec!["true".into()], data_dir: tmp.path().into(), ..LocalConfig::default() };
    let s = LocalSpawner::with_root(LocalConfig { isolate_users: false, ..cfg }, nix::unistd::geteuid().is_root());
    let req = ExecRequest { kind: ExecKind::Command("id -u; echo $USER".into()), env: vec![], pty: None };
    let mut p = s.exec_local("alice", req).await.unwrap();
    let out = collect(&mut p).await;
    assert_eq!(out, format!("{}\nalice\n", nix::unistd::geteuid()));
}
