//! The local-process spawner: runs the single-user command as a child process
//! on a free loopback port, its output in a log file, detached into its own
//! process group so it outlives a hub that is killed (and is re-adopted by
//! pid, checked against the process's start time so a reused pid is not
//! mistaken for it).
//!
//! When berth runs as root, each user's processes run under that user's own
//! Unix account (`account.rs`), so they cannot read berth's data or each
//! other's homes.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_core::UserName;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::json;
use tokio::process::Command;

use crate::{BoxFuture, Progress, ProgressTx, SpawnError, SpawnSpec, Spawner, Started, Status, StopGrace};

pub(crate) mod account;
#[cfg(test)]
mod isolation_tests;
mod process;
#[cfg(test)]
mod tests;

use account::Account;
use process::{alive, end_group, start_time};

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
    /// When berth runs as root, run each user's server and SSH sessions under
    /// the user's own Unix account (`berth-<user>`, made on first use). Off,
    /// they run as root and can read berth's data: for a single-user machine.
    pub isolate_users: bool,
    /// The uids (and gids) of the accounts berth makes; an account berth did
    /// not make is never used, whatever its uid.
    pub uid_min: u32,
    pub uid_max: u32,
}

impl Default for LocalConfig {
    fn default() -> Self {
        LocalConfig {
            cmd: vec!["jupyterhub-singleuser".into()],
            data_dir: PathBuf::from("./berth-data"),
            provision: true,
            provision_packages: vec!["jupyterhub".into(), "jupyterlab".into()],
            isolate_users: true,
            uid_min: 20000,
            uid_max: 29999,
        }
    }
}

pub struct LocalSpawner {
    cfg: LocalConfig,
    /// Whether berth runs as root.
    root: bool,
    /// Exit reasons of children this process started (it reaps them).
    exited: Arc<Mutex<HashMap<u32, String>>>,
    /// Children this process started and has not yet reaped.
    children: Arc<Mutex<std::collections::HashSet<u32>>>,
    provision_lock: tokio::sync::Mutex<()>,
}

impl LocalSpawner {
    /// Removes the Unix account berth made for `name`, when it makes them.
    async fn remove_account(&self, name: &UserName) -> Result<(), SpawnError> {
        if !self.isolating() {
            return Ok(());
        }
        let (user, uids) = (name.as_str().to_string(), self.cfg.uid_min..=self.cfg.uid_max);
        tokio::task::spawn_blocking(move || account::remove(&user, uids))
            .await
            .map_err(|e| SpawnError::Failed(format!("removing {name}'s Unix account failed: {e}")))??;
        Ok(())
    }

    pub fn new(cfg: LocalConfig) -> LocalSpawner {
        LocalSpawner::with_root(cfg, nix::unistd::geteuid().is_root())
    }

    /// As [`LocalSpawner::new`], with berth's privilege given (tests).
    pub(crate) fn with_root(mut cfg: LocalConfig, root: bool) -> LocalSpawner {
        // Homes go into the passwd database and HOME: they must be absolute.
        if let Ok(abs) = std::path::absolute(&cfg.data_dir) {
            cfg.data_dir = abs;
        }
        if root && !cfg.isolate_users {
            tracing::warn!("local servers and SSH sessions run as root: every user can read berth's data");
        }
        LocalSpawner {
            cfg,
            root,
            exited: Arc::default(),
            children: Arc::default(),
            provision_lock: tokio::sync::Mutex::new(()),
        }
    }

    /// Whether users' processes run under their own accounts.
    fn isolating(&self) -> bool {
        self.root && self.cfg.isolate_users
    }

    /// The user's home, made if missing, and (when isolating) the account
    /// their processes run under, made on first use.
    pub(crate) async fn prepare_user(&self, user: &str) -> Result<(PathBuf, Option<Account>), SpawnError> {
        let home = self.home(user);
        if !self.isolating() {
            std::fs::create_dir_all(&home)?;
            return Ok((home, None));
        }
        let (name, uids) = (user.to_string(), self.cfg.uid_min..=self.cfg.uid_max);
        let path = home.clone();
        let account = tokio::task::spawn_blocking(move || account::ensure(&name, &path, uids))
            .await
            .map_err(|e| SpawnError::Failed(format!("preparing {user}'s account failed: {e}")))??;
        Ok((home, Some(account)))
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
        if !provided.is_file() {
            return Err(SpawnError::Failed(format!("pip finished but {} is missing", provided.display())));
        }
        self.open_venv(true).await?;
        Ok(provided)
    }

    /// Makes the provided virtualenv readable and runnable by every user's
    /// account (berth made it as root, maybe under a strict umask).
    async fn open_venv(&self, always: bool) -> Result<(), SpawnError> {
        let venv = self.venv();
        let open = std::fs::metadata(&venv).map(|m| m.mode() & 0o755 == 0o755).unwrap_or(true);
        if open && !always {
            return Ok(());
        }
        let path = venv.clone();
        tokio::task::spawn_blocking(move || account::open_to_all(&path))
            .await
            .map_err(|e| SpawnError::Failed(format!("opening {} failed: {e}", venv.display())))??;
        Ok(())
    }

    /// The log file: berth writes it (the server gets its descriptor), in a
    /// directory only berth can read.
    fn open_log(&self, path: &Path) -> Result<std::fs::File, SpawnError> {
        if let Some(dir) = path.parent() {
            std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
            if self.isolating() && std::fs::metadata(dir)?.mode() & 0o077 != 0 {
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
            }
        }
        Ok(std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(path)?)
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

/// The server's pid, its start time and its account's uid, from its saved state.
fn state_pid(state: &serde_json::Value) -> Result<(u32, Option<u64>, Option<u32>), SpawnError> {
    let pid = state
        .get("pid")
        .and_then(|p| p.as_u64())
        .filter(|p| *p > 1 && *p < i32::MAX as u64)
        .ok_or_else(|| SpawnError::BadState(format!("no pid in {state}")))?;
    let uid = state.get("uid").and_then(|u| u.as_u64()).and_then(|u| u32::try_from(u).ok());
    Ok((pid as u32, state.get("start_time").and_then(|s| s.as_u64()), uid))
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
            let (home, account) = self.prepare_user(&spec.user).await?;
            if let Some(a) = &account {
                if exe.starts_with(self.venv()) {
                    self.open_venv(false).await?;
                }
                account::runnable(&exe, a).map_err(|why| {
                    SpawnError::Failed(format!(
                        "{} cannot run the server command {}: {why}; install it where every user can run it",
                        a.name,
                        exe.display()
                    ))
                })?;
            }
            let log_path = self.log_path(&spec.user, &spec.server);
            let log = self.open_log(&log_path)?;
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
            let login = account.as_ref().map_or(spec.user.as_str(), |a| a.name.as_str());
            env.insert("USER".into(), login.to_string());
            env.insert("LOGNAME".into(), login.to_string());
            env.insert("HOME".into(), home.display().to_string());
            let shell = account.as_ref().map_or_else(|| "/bin/bash".into(), |a| a.shell.display().to_string());
            env.insert("SHELL".into(), shell);
            if !spec.gpus.is_empty() {
                env.insert("CUDA_VISIBLE_DEVICES".into(), spec.gpus.join(","));
            }

            let mut cmd = Command::new(&exe);
            cmd.args(cmdline[1..].iter().map(|a| a.replace("{port}", &port.to_string())));
            let is_singleuser = Path::new(program).file_name().is_some_and(|n| n == "jupyterhub-singleuser");
            if is_singleuser && self.root && account.is_none() && !cmdline.iter().any(|a| a == "--allow-root") {
                // jupyter_server refuses root without it; with isolation off
                // the operator chose to run servers as root already.
                cmd.arg("--allow-root");
            }
            if let Some(a) = &account {
                // std drops root's supplementary groups when it sets the uid.
                cmd.uid(a.uid).gid(a.gid);
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
            let (uid, login) = (account.as_ref().map(|a| a.uid), account.as_ref().map(|a| a.name.clone()));
            tracing::info!(user = %spec.user, server = %spec.server, pid, port, ?uid, log = %log_path.display(), "started local server");
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
                state: json!({"pid": pid, "port": port, "start_time": started, "target": format!("http://127.0.0.1:{port}"), "log": log_path, "uid": uid, "account": login}),
            })
        })
    }

    fn stop<'a>(&'a self, state: &'a serde_json::Value, grace: StopGrace) -> BoxFuture<'a, Result<(), SpawnError>> {
        Box::pin(async move {
            let (pid, started, uid) = state_pid(state)?;
            if !alive(pid, started, uid) {
                return Ok(());
            }
            let target = Pid::from_raw(pid as i32);
            for (signal, wait) in [(Signal::SIGINT, grace.interrupt), (Signal::SIGTERM, grace.terminate)] {
                let _ = kill(target, signal);
                let deadline = tokio::time::Instant::now() + wait;
                while tokio::time::Instant::now() < deadline {
                    if !alive(pid, started, uid) {
                        // What the server left in its group (it was alive a
                        // moment ago, so the group's id is still its own).
                        end_group(pid, grace.terminate).await;
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

    fn isolates_users(&self) -> bool {
        self.isolating()
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
            let (pid, started, uid) = state_pid(state)?;
            if alive(pid, started, uid) {
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

    /// Removes the user's home (`<data_dir>/home/<user>`) and, when isolating,
    /// the Unix account berth made for them; the logs stay.
    /// The local home stays named by the user; a deleted user's is moved
    /// to `home/.retired/` (0700), where a new account of that name cannot
    /// reach it, and their Unix account removed.
    fn retire_user_data<'a>(&'a self, user: &'a str, _owner_id: &'a str) -> BoxFuture<'a, Result<(), SpawnError>> {
        Box::pin(async move {
            let name = UserName::parse(user)
                .map_err(|e| SpawnError::Failed(format!("not retiring the home of {user:?}: {e}")))?;
            let home = self.home(name.as_str());
            let retired = self.cfg.data_dir.join("home").join(".retired");
            let to = retired.join(format!("{}-{}", name, now_millis()));
            let shown = home.display().to_string();
            let moved = {
                let to = to.clone();
                tokio::task::spawn_blocking(move || -> std::io::Result<bool> {
                    if std::fs::symlink_metadata(&home).map(|m| !m.is_dir()).unwrap_or(true) {
                        return Ok(false);
                    }
                    std::fs::create_dir_all(&retired)?;
                    #[cfg(unix)]
                    {
                        use std::os::unix::fs::PermissionsExt;
                        std::fs::set_permissions(&retired, std::fs::Permissions::from_mode(0o700))?;
                    }
                    std::fs::rename(&home, &to)?;
                    Ok(true)
                })
                .await
                .map_err(|e| SpawnError::Failed(format!("retiring {shown} failed: {e}")))??
            };
            if moved {
                tracing::info!(user = %name, kept = %to.display(), "kept a deleted user's home out of reach");
            }
            self.remove_account(&name).await
        })
    }

    fn remove_user_data<'a>(&'a self, user: &'a str, _owner_id: &'a str) -> BoxFuture<'a, Result<(), SpawnError>> {
        Box::pin(async move {
            let name = UserName::parse(user)
                .map_err(|e| SpawnError::Failed(format!("not removing the home of {user:?}: {e}")))?;
            let home = self.home(name.as_str());
            let path = home.clone();
            tokio::task::spawn_blocking(move || remove_home(&path))
                .await
                .map_err(|e| SpawnError::Failed(format!("removing {} failed: {e}", home.display())))??;
            tracing::info!(user = %name, home = %home.display(), "removed the local home");
            self.remove_account(&name).await
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

fn now_millis() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0)
}
