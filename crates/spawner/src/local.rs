//! The local-process spawner: runs the single-user command as a child process
//! on a free loopback port, its output in a log file, detached into its own
//! process group so it outlives a hub that is killed (and is re-adopted by
//! pid, checked against the process's start time so a reused pid is not
//! mistaken for it).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_core::UserName;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::json;
use tokio::process::Command;

use crate::{BoxFuture, Progress, ProgressTx, SpawnError, SpawnSpec, Spawner, Started, Status, StopGrace};

/// Variables kept from berth's own environment (JupyterHub's `env_keep`).
const ENV_KEEP: &[&str] = &[
    "PATH",
    "PYTHONPATH",
    "VIRTUAL_ENV",
    "LANG",
    "LC_ALL",
    "CONDA_ROOT",
    "CONDA_DEFAULT_ENV",
    "JUPYTERHUB_SINGLEUSER_APP",
    "TZ",
];

#[derive(Debug, Clone)]
pub struct LocalConfig {
    /// Command line; the first word is looked up on PATH.
    pub cmd: Vec<String>,
    /// Where homes (`home/<user>`), logs (`logs/`) and the provided virtualenv live.
    pub data_dir: PathBuf,
    /// When the command is `jupyterhub-singleuser` and not on PATH, make a
    /// virtualenv with JupyterLab under the data directory on first start.
    pub provision: bool,
    /// Packages for that virtualenv.
    pub provision_packages: Vec<String>,
}

pub struct LocalSpawner {
    cfg: LocalConfig,
    /// Exit reasons of children this process started (it reaps them).
    exited: Arc<Mutex<HashMap<u32, String>>>,
    /// Children this process started and has not yet reaped.
    children: Arc<Mutex<std::collections::HashSet<u32>>>,
    provision_lock: tokio::sync::Mutex<()>,
}

impl LocalSpawner {
    pub fn new(cfg: LocalConfig) -> LocalSpawner {
        LocalSpawner {
            cfg,
            exited: Arc::default(),
            children: Arc::default(),
            provision_lock: tokio::sync::Mutex::new(()),
        }
    }

    fn log_path(&self, user: &str, server: &str) -> PathBuf {
        let name = if server.is_empty() { user.to_string() } else { format!("{user}--{server}") };
        self.cfg.data_dir.join("logs").join(format!("{name}.log"))
    }

    /// The user's home: the working directory of their servers and SSH sessions.
    pub(crate) fn home(&self, user: &str) -> PathBuf {
        self.cfg.data_dir.join("home").join(user)
    }

    /// The environment every local process starts from: what berth keeps of
    /// its own, with a provided virtualenv first on PATH.
    pub(crate) fn base_env(&self) -> BTreeMap<String, String> {
        let mut env: BTreeMap<String, String> =
            ENV_KEEP.iter().filter_map(|k| std::env::var(k).ok().map(|v| (k.to_string(), v))).collect();
        let bin = self.venv().join("bin");
        if bin.is_dir() {
            let path = env.get("PATH").cloned().unwrap_or_default();
            env.insert("PATH".into(), format!("{}:{path}", bin.display()));
        }
        env
    }

    fn venv(&self) -> PathBuf {
        self.cfg.data_dir.join("singleuser-venv")
    }

    /// Finds the program, providing it when allowed.
    async fn resolve(&self, program: &str, progress: &ProgressTx) -> Result<PathBuf, SpawnError> {
        if program.contains('/') {
            let p = PathBuf::from(program);
            return if p.is_file() {
                Ok(p)
            } else {
                Err(SpawnError::Failed(format!("the server command {program} does not exist")))
            };
        }
        if let Some(p) = which(program) {
            return Ok(p);
        }
        let provided = self.venv().join("bin").join(program);
        if provided.is_file() {
            return Ok(provided);
        }
        if !(self.cfg.provision && program == "jupyterhub-singleuser") {
            return Err(SpawnError::Failed(format!(
                "the server command {program:?} was not found on PATH; install it (pip install jupyterhub jupyterlab) or set BERTH_LOCAL_CMD"
            )));
        }
        let _guard = self.provision_lock.lock().await;
        if provided.is_file() {
            return Ok(provided);
        }
        let _ = progress.send(Progress {
            progress: 10,
            message: "Installing JupyterLab into berth's data directory (first start only; a minute or two)…".into(),
        });
        let venv = self.venv();
        let python = which("python3").ok_or_else(|| {
            SpawnError::Failed("python3 is not installed, so berth cannot provide jupyterhub-singleuser".into())
        })?;
        run_step(Command::new(&python).arg("-m").arg("venv").arg(&venv), "creating the virtualenv").await?;
        let pip = venv.join("bin").join("pip");
        run_step(
            Command::new(&pip)
                .arg("install")
                .arg("--disable-pip-version-check")
                .arg("-q")
                .args(&self.cfg.provision_packages),
            "installing JupyterLab with pip",
        )
        .await?;
        if provided.is_file() {
            Ok(provided)
        } else {
            Err(SpawnError::Failed(format!("pip finished but {} is missing", provided.display())))
        }
    }
}

async fn run_step(cmd: &mut Command, what: &str) -> Result<(), SpawnError> {
    let out = cmd.output().await.map_err(|e| SpawnError::Failed(format!("{what} failed: {e}")))?;
    if out.status.success() {
        return Ok(());
    }
    let err = String::from_utf8_lossy(&out.stderr);
    let tail: Vec<&str> = err.lines().rev().take(5).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    Err(SpawnError::Failed(format!("{what} failed ({}): {}", out.status, tail.join(" | "))))
}

/// Looks a program up on PATH.
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(program)).find(|p| p.is_file())
}

/// A free loopback port (the OS picks; released just before the server binds it).
fn free_port() -> std::io::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// The kernel's start time of a process (field 22 of /proc/<pid>/stat), to
/// tell a re-used pid from ours.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain spaces.
    let after = &stat[stat.rfind(')')? + 2..];
    after.split_whitespace().nth(19)?.parse().ok()
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rfind(')').map(|i| s[i + 2..].starts_with('Z')))
        .unwrap_or(false)
}

fn alive(pid: u32, started: Option<u64>) -> bool {
    if kill(Pid::from_raw(pid as i32), None).is_err() || is_zombie(pid) {
        return false;
    }
    match (started, start_time(pid)) {
        (Some(a), Some(b)) => a == b,
        _ => true,
    }
}

/// Removes a user's home if it exists. Only a plain directory goes: a
/// symlink (or anything else) in its place is refused, and links inside it
/// are removed, not followed.
fn remove_home(home: &Path) -> Result<(), SpawnError> {
    let meta = match std::fs::symlink_metadata(home) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    if !meta.file_type().is_dir() {
        return Err(SpawnError::Failed(format!(
            "{} is not a plain directory (a symlink or a file); berth does not remove it",
            home.display()
        )));
    }
    std::fs::remove_dir_all(home)?;
    Ok(())
}

fn state_pid(state: &serde_json::Value) -> Result<(u32, Option<u64>), SpawnError> {
    let pid = state
        .get("pid")
        .and_then(|p| p.as_u64())
        .filter(|p| *p > 1 && *p < i32::MAX as u64)
        .ok_or_else(|| SpawnError::BadState(format!("no pid in {state}")))?;
    Ok((pid as u32, state.get("start_time").and_then(|s| s.as_u64())))
}

impl Spawner for LocalSpawner {
    fn kind(&self) -> &'static str {
        "local"
    }

    fn start(&self, spec: SpawnSpec, progress: ProgressTx) -> BoxFuture<'_, Result<Started, SpawnError>> {
        Box::pin(async move {
            let cmdline = if spec.cmd.is_empty() { self.cfg.cmd.clone() } else { spec.cmd.clone() };
            let Some(program) = cmdline.first() else {
                return Err(SpawnError::Failed("the server command is empty".into()));
            };
            let exe = self.resolve(program, &progress).await?;
            let port = free_port()?;
            let home = self.home(&spec.user);
            std::fs::create_dir_all(&home)?;
            let log_path = self.log_path(&spec.user, &spec.server);
            if let Some(d) = log_path.parent() {
                std::fs::create_dir_all(d)?;
            }
            let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path)?;
            let log2 = log.try_clone()?;

            let mut env: BTreeMap<String, String> =
                ENV_KEEP.iter().filter_map(|k| std::env::var(k).ok().map(|v| (k.to_string(), v))).collect();
            // A provided virtualenv comes first on PATH so kernels find ipykernel.
            if let Some(bin) = exe.parent().filter(|b| b.starts_with(self.venv())) {
                let path = env.get("PATH").cloned().unwrap_or_default();
                env.insert("PATH".into(), format!("{}:{path}", bin.display()));
            }
            env.extend(spec.env.clone());
            let url = format!("http://127.0.0.1:{port}{}", spec.prefix);
            env.insert("JUPYTERHUB_SERVICE_URL".into(), url);
            env.insert("USER".into(), spec.user.clone());
            env.insert("HOME".into(), home.display().to_string());
            env.insert("SHELL".into(), "/bin/bash".into());
            if !spec.gpus.is_empty() {
                env.insert("CUDA_VISIBLE_DEVICES".into(), spec.gpus.join(","));
            }

            let mut cmd = Command::new(&exe);
            cmd.args(cmdline[1..].iter().map(|a| a.replace("{port}", &port.to_string())));
            let is_singleuser = Path::new(program).file_name().is_some_and(|n| n == "jupyterhub-singleuser");
            if is_singleuser && nix::unistd::geteuid().is_root() && !cmdline.iter().any(|a| a == "--allow-root") {
                // jupyter_server refuses root without it; berth runs every local
                // server as its own user, so this is the operator's choice already.
                cmd.arg("--allow-root");
            }
            cmd.env_clear()
                .envs(&env)
                .current_dir(&home)
                .stdin(std::process::Stdio::null())
                .stdout(log)
                .stderr(log2)
                .process_group(0)
                .kill_on_drop(false);
            let _ = progress.send(Progress { progress: 40, message: format!("Starting {}", exe.display()) });
            let mut child =
                cmd.spawn().map_err(|e| SpawnError::Failed(format!("cannot run {}: {e}", exe.display())))?;
            let pid = child.id().ok_or_else(|| SpawnError::Failed("the server exited at once".into()))?;
            let started = start_time(pid);
            tracing::info!(user = %spec.user, server = %spec.server, pid, port, log = %log_path.display(), "started local server");
            // Reap the child when it exits, and remember why.
            let exited = self.exited.clone();
            let children = self.children.clone();
            if let Ok(mut c) = children.lock() {
                c.insert(pid);
            }
            tokio::spawn(async move {
                let why = match child.wait().await {
                    Ok(status) => format!("the server exited ({status})"),
                    Err(e) => format!("the server could not be waited for: {e}"),
                };
                if let Ok(mut m) = exited.lock() {
                    m.insert(pid, why);
                }
                if let Ok(mut c) = children.lock() {
                    c.remove(&pid);
                }
            });
            Ok(Started {
                target: format!("http://127.0.0.1:{port}"),
                state: json!({"pid": pid, "port": port, "start_time": started, "target": format!("http://127.0.0.1:{port}"), "log": log_path}),
            })
        })
    }

    fn stop<'a>(&'a self, state: &'a serde_json::Value, grace: StopGrace) -> BoxFuture<'a, Result<(), SpawnError>> {
        Box::pin(async move {
            let (pid, started) = state_pid(state)?;
            if !alive(pid, started) {
                return Ok(());
            }
            let target = Pid::from_raw(pid as i32);
            for (signal, wait) in [(Signal::SIGINT, grace.interrupt), (Signal::SIGTERM, grace.terminate)] {
                let _ = kill(target, signal);
                let deadline = tokio::time::Instant::now() + wait;
                while tokio::time::Instant::now() < deadline {
                    if !alive(pid, started) {
                        return Ok(());
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                tracing::warn!(pid, ?signal, "the server did not stop in time; escalating");
            }
            // The whole process group: kernels started by the server go too.
            let _ = nix::sys::signal::killpg(target, Signal::SIGKILL);
            let _ = kill(target, Signal::SIGKILL);
            Ok(())
        })
    }

    fn exec<'a>(
        &'a self,
        user: &'a str,
        _state: &'a serde_json::Value,
        req: crate::ExecRequest,
    ) -> BoxFuture<'a, Result<crate::ExecProcess, SpawnError>> {
        Box::pin(self.exec_local(user, req))
    }

    fn connect<'a>(
        &'a self,
        state: &'a serde_json::Value,
        port: u16,
    ) -> BoxFuture<'a, Result<tokio::net::TcpStream, SpawnError>> {
        Box::pin(async move {
            // Local servers share this machine's network with everything
            // else, so only the server's own port counts as inside it.
            let own = state.get("port").and_then(|p| p.as_u64());
            if own != Some(u64::from(port)) {
                let own = own.map(|p| format!(" (its server listens on {p})")).unwrap_or_default();
                return Err(SpawnError::Failed(format!(
                    "the local spawner forwards only to the server's own port{own}, not to {port}"
                )));
            }
            Ok(tokio::net::TcpStream::connect(("127.0.0.1", port)).await?)
        })
    }

    fn poll<'a>(&'a self, state: &'a serde_json::Value) -> BoxFuture<'a, Result<Status, SpawnError>> {
        Box::pin(async move {
            let (pid, started) = state_pid(state)?;
            if alive(pid, started) {
                return Ok(Status::Running);
            }
            // Our own child: give the reaper a moment to record its exit status.
            for _ in 0..100 {
                let ours = self.children.lock().map(|c| c.contains(&pid)).unwrap_or(false);
                if !ours {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let why = self.exited.lock().ok().and_then(|m| m.get(&pid).cloned());
            Ok(Status::Exited(why.unwrap_or_else(|| "the server process is gone".into())))
        })
    }

    /// Removes the user's home (`<data_dir>/home/<user>`); the logs stay.
    fn remove_user_data<'a>(&'a self, user: &'a str) -> BoxFuture<'a, Result<(), SpawnError>> {
        Box::pin(async move {
            let name = UserName::parse(user)
                .map_err(|e| SpawnError::Failed(format!("not removing the home of {user:?}: {e}")))?;
            let home = self.home(name.as_str());
            let path = home.clone();
            tokio::task::spawn_blocking(move || remove_home(&path))
                .await
                .map_err(|e| SpawnError::Failed(format!("removing {} failed: {e}", home.display())))??;
            tracing::info!(user = %name, home = %home.display(), "removed the local home");
            Ok(())
        })
    }

    fn logs<'a>(&'a self, user: &'a str, server: &'a str) -> BoxFuture<'a, Option<String>> {
        Box::pin(async move {
            let data = tokio::fs::read(self.log_path(user, server)).await.ok()?;
            let start = data.len().saturating_sub(64 * 1024);
            Some(String::from_utf8_lossy(&data[start..]).into_owned())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(prefix: &str) -> SpawnSpec {
        SpawnSpec {
            user: "al".into(),
            server: String::new(),
            env: BTreeMap::new(),
            cmd: vec![],
            prefix: prefix.into(),
            template: String::new(),
            image: None,
            gpus: vec![],
            port: None,
        }
    }

    #[test]
    fn own_start_time_is_readable() {
        let me = std::process::id();
        assert!(start_time(me).is_some());
        assert!(alive(me, start_time(me)));
        assert!(!alive(me, start_time(me).map(|t| t + 1)), "a different start time is another process");
    }

    #[tokio::test]
    async fn start_poll_stop_a_real_process() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalSpawner::new(LocalConfig {
            cmd: vec!["sleep".into(), "30".into()],
            data_dir: dir.path().to_path_buf(),
            provision: false,
            provision_packages: vec![],
        });
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let spec = spec("/user/al/");
        let started = s.start(spec, tx).await.unwrap();
        assert_eq!(s.poll(&started.state).await.unwrap(), Status::Running);
        s.stop(&started.state, StopGrace::default()).await.unwrap();
        let mut status = s.poll(&started.state).await.unwrap();
        for _ in 0..50 {
            if status != Status::Running {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            status = s.poll(&started.state).await.unwrap();
        }
        assert!(matches!(status, Status::Exited(_)), "{status:?}");
        assert!(matches!(s.poll(&json!({})).await, Err(SpawnError::BadState(_))));
    }

    #[tokio::test]
    async fn removing_user_data_removes_only_the_plain_home() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("keep.txt"), "precious").unwrap();
        let s = LocalSpawner::new(LocalConfig {
            cmd: vec![],
            data_dir: data.clone(),
            provision: false,
            provision_packages: vec![],
        });

        // No home (not even `home/`) is not an error.
        s.remove_user_data("al").await.unwrap();

        // A home with files, a subdirectory and a link out: the home goes, the
        // link's target and the logs stay.
        let home = data.join("home").join("al");
        std::fs::create_dir_all(home.join("work")).unwrap();
        std::fs::write(home.join("work").join("notes.txt"), "x").unwrap();
        std::os::unix::fs::symlink(&outside, home.join("link-out")).unwrap();
        std::fs::create_dir_all(data.join("logs")).unwrap();
        std::fs::write(data.join("logs").join("al.log"), "log").unwrap();
        s.remove_user_data("al").await.unwrap();
        assert!(!home.exists());
        assert!(data.join("home").is_dir(), "only the user's home goes");
        assert!(data.join("logs").join("al.log").is_file(), "logs stay");
        assert!(outside.join("keep.txt").is_file());

        // A home that is a symlink out of `home/` is refused, not followed.
        let linked = data.join("home").join("bo");
        std::os::unix::fs::symlink(&outside, &linked).unwrap();
        let err = s.remove_user_data("bo").await.unwrap_err().to_string();
        assert!(err.contains("not a plain directory"), "{err}");
        assert!(outside.join("keep.txt").is_file(), "the link's target survives");
        assert!(std::fs::symlink_metadata(&linked).unwrap().file_type().is_symlink());

        // A name that is not a user name never becomes a path.
        assert!(s.remove_user_data("../outside").await.is_err());
        assert!(s.remove_user_data("").await.is_err());
        assert!(outside.join("keep.txt").is_file());
    }

    #[tokio::test]
    async fn missing_command_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalSpawner::new(LocalConfig {
            cmd: vec!["no-such-program-berth".into()],
            data_dir: dir.path().to_path_buf(),
            provision: false,
            provision_packages: vec![],
        });
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let spec = spec("/");
        let err = s.start(spec, tx).await.unwrap_err().to_string();
        assert!(err.contains("no-such-program-berth") && err.contains("not found"), "{err}");
    }
}
