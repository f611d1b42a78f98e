//! The local-process spawner's side of the SSH gateway: a shell or command
//! runs on this machine as the user the local servers run as (the user's own
//! Unix account when berth isolates users, else berth's own), in the user's
//! home under the data directory, with a terminal from `pty-process` when
//! the client asked for one.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::Arc;

use bytes::Bytes;
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, watch, Mutex};

use crate::exec::{
    command_line, pump_stdin, signal_number, ExecControl, ExecProcess, ExecRequest, Output, STDIN_QUEUE,
};
use crate::local::account::Account;
use crate::local::LocalSpawner;
use crate::{BoxFuture, SpawnError};

const READ_CHUNK: usize = 64 * 1024;

struct LocalControl {
    pid: u32,
    status: watch::Receiver<Option<u32>>,
    pty: Option<Arc<Mutex<pty_process::OwnedWritePty>>>,
}

impl ExecControl for LocalControl {
    fn resize(&self, cols: u16, rows: u16) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            match &self.pty {
                Some(p) => p.lock().await.resize(pty_process::Size::new(rows, cols)).map_err(|e| e.to_string()),
                None => Ok(()),
            }
        })
    }

    fn signal<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let n = signal_number(name).ok_or_else(|| format!("unknown signal {name}"))?;
            let sig = nix::sys::signal::Signal::try_from(n).map_err(|e| e.to_string())?;
            if self.status.borrow().is_some() {
                return Ok(());
            }
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid as i32), sig).map_err(|e| e.to_string())
        })
    }

    fn wait(&self) -> BoxFuture<'_, Result<u32, String>> {
        Box::pin(async move {
            let mut rx = self.status.clone();
            let status = rx.wait_for(|s| s.is_some()).await.map_err(|_| "the process was lost".to_string())?;
            Ok(status.unwrap_or(255))
        })
    }
}

fn exit_code(status: std::io::Result<std::process::ExitStatus>) -> u32 {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(c), _) => c as u32,
            (None, Some(sig)) => 128 + sig as u32,
            _ => 255,
        },
        Err(_) => 255,
    }
}

async fn pump_output<R: tokio::io::AsyncRead + Unpin>(mut r: R, tx: mpsc::Sender<Output>, stderr: bool) {
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        match r.read(&mut buf).await {
            // A terminal whose last writer closed reads EIO: that is its end.
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let b = Bytes::copy_from_slice(&buf[..n]);
                let out = if stderr { Output::Stderr(b) } else { Output::Stdout(b) };
                if tx.send(out).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Reads a terminal until the shell has exited and its output has drained:
/// background jobs that keep the terminal open do not hold the session (as
/// with sshd, which closes the terminal when the shell exits).
async fn pump_terminal<R: tokio::io::AsyncRead + Unpin>(
    mut r: R,
    tx: mpsc::Sender<Output>,
    mut status: watch::Receiver<Option<u32>>,
) {
    let mut buf = vec![0u8; READ_CHUNK];
    let mut exited = false;
    loop {
        let read = async {
            if exited {
                tokio::time::timeout(std::time::Duration::from_millis(100), r.read(&mut buf)).await.unwrap_or(Ok(0))
            } else {
                r.read(&mut buf).await
            }
        };
        let n = tokio::select! {
            n = read => match n {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            _ = status.wait_for(|s| s.is_some()), if !exited => {
                exited = true;
                continue;
            }
        };
        if tx.send(Output::Stdout(Bytes::copy_from_slice(&buf[..n]))).await.is_err() {
            return;
        }
    }
}

/// Makes the terminal the account's, as sshd does (owner read-write, group
/// write), so programs that check who owns their terminal accept it.
fn give_terminal(pts: &pty_process::Pts, a: &Account) -> Result<(), SpawnError> {
    use std::os::fd::AsRawFd;
    std::os::unix::fs::fchown(pts, Some(a.uid), None)
        .map_err(|e| SpawnError::Failed(format!("cannot give the terminal to {}: {e}", a.name)))?;
    nix::sys::stat::fchmod(pts.as_raw_fd(), nix::sys::stat::Mode::from_bits_truncate(0o620))
        .map_err(|e| SpawnError::Failed(format!("cannot set the terminal's mode: {e}")))
}

impl LocalSpawner {
    /// Runs `req` as this user's session process.
    pub(crate) async fn exec_local(&self, user: &str, req: ExecRequest) -> Result<ExecProcess, SpawnError> {
        let (home, account) = self.prepare_user(user).await?;
        let mut env: BTreeMap<String, String> = self.base_env();
        let login = account.as_ref().map_or(user, |a| a.name.as_str());
        env.insert("USER".into(), login.to_string());
        env.insert("LOGNAME".into(), login.to_string());
        env.insert("HOME".into(), home.display().to_string());
        if let Some(a) = &account {
            // The login shell itself comes from the passwd entry (SHELL_SCRIPT).
            env.insert("SHELL".into(), a.shell.display().to_string());
        }
        env.extend(req.env.iter().cloned());
        let line = command_line(&req.kind);
        let (out_tx, out_rx) = mpsc::channel(32);
        let (in_tx, in_rx) = mpsc::channel::<Bytes>(STDIN_QUEUE);
        let (status_tx, status_rx) = watch::channel(None);

        let (mut child, pty) = if let Some(p) = &req.pty {
            env.insert("TERM".into(), p.term.clone());
            let (pty, pts) =
                pty_process::open().map_err(|e| SpawnError::Failed(format!("cannot open a terminal: {e}")))?;
            pty.resize(pty_process::Size::new(p.rows.max(1), p.cols.max(1)))
                .map_err(|e| SpawnError::Failed(format!("cannot size the terminal: {e}")))?;
            let mut cmd =
                pty_process::Command::new(&line[0]).args(&line[1..]).env_clear().envs(&env).current_dir(&home);
            if let Some(a) = &account {
                give_terminal(&pts, a)?;
                cmd = cmd.uid(a.uid).gid(a.gid);
            }
            let child = cmd.spawn(pts).map_err(|e| SpawnError::Failed(format!("cannot start a shell: {e}")))?;
            let (read, write) = pty.into_split();
            let write = Arc::new(Mutex::new(write));
            tokio::spawn(pump_terminal(read, out_tx, status_rx.clone()));
            let w = write.clone();
            tokio::spawn(async move {
                let mut rx = in_rx;
                while let Some(chunk) = rx.recv().await {
                    let mut guard = w.lock().await;
                    if tokio::io::AsyncWriteExt::write_all(&mut *guard, &chunk).await.is_err() {
                        return;
                    }
                }
            });
            (child, Some(write))
        } else {
            let mut cmd = tokio::process::Command::new(&line[0]);
            if let Some(a) = &account {
                // std drops root's supplementary groups when it sets the uid.
                cmd.uid(a.uid).gid(a.gid);
            }
            let mut child = cmd
                .args(&line[1..])
                .env_clear()
                .envs(&env)
                .current_dir(&home)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .process_group(0)
                .kill_on_drop(false)
                .spawn()
                .map_err(|e| SpawnError::Failed(format!("cannot start a shell: {e}")))?;
            if let Some(stdin) = child.stdin.take() {
                tokio::spawn(pump_stdin(in_rx, stdin));
            }
            if let Some(out) = child.stdout.take() {
                tokio::spawn(pump_output(out, out_tx.clone(), false));
            }
            if let Some(err) = child.stderr.take() {
                tokio::spawn(pump_output(err, out_tx, true));
            }
            (child, None)
        };
        let pid = child.id().ok_or_else(|| SpawnError::Failed("the shell exited at once".into()))?;
        tokio::spawn(async move {
            let status = exit_code(child.wait().await);
            let _ = status_tx.send(Some(status));
        });
        Ok(ExecProcess {
            stdin: in_tx,
            output: out_rx,
            control: Box::new(LocalControl { pid, status: status_rx, pty }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::{ExecKind, PtySpec};
    use crate::local::LocalConfig;

    fn spawner(dir: &std::path::Path) -> LocalSpawner {
        LocalSpawner::new(LocalConfig {
            cmd: vec!["true".into()],
            data_dir: dir.to_path_buf(),
            provision: false,
            provision_packages: vec![],
            isolate_users: false,
            ..LocalConfig::default()
        })
    }

    async fn collect(p: &mut ExecProcess) -> String {
        let mut out = String::new();
        while let Some(o) = p.output.recv().await {
            let (Output::Stdout(b) | Output::Stderr(b)) = o;
            out.push_str(&String::from_utf8_lossy(&b));
        }
        out
    }

    // OpenSSH's client never sends signal requests, so the gateway's
    // forwarding of them is checked here, on the control it calls.
    #[tokio::test]
    async fn a_signal_ends_the_command_with_its_status() {
        let tmp = tempfile::tempdir().unwrap();
        let s = spawner(tmp.path());
        let req = ExecRequest { kind: ExecKind::Command("echo up; exec sleep 60".into()), env: vec![], pty: None };
        let mut p = s.exec_local("alice", req).await.unwrap();
        let first = p.output.recv().await;
        assert!(matches!(first, Some(Output::Stdout(ref b)) if b.starts_with(b"up")), "{first:?}");
        p.control.signal("TERM").await.unwrap();
        let _ = collect(&mut p).await;
        assert_eq!(p.control.wait().await.unwrap(), 128 + 15);
        assert!(p.control.signal("NOPE").await.is_err());
    }

    #[tokio::test]
    async fn a_terminal_session_reports_its_size_and_ends_with_the_shell() {
        let tmp = tempfile::tempdir().unwrap();
        let s = spawner(tmp.path());
        let pty = Some(PtySpec { term: "xterm".into(), cols: 77, rows: 21 });
        // The background job keeps the terminal open; the session still ends.
        let req = ExecRequest { kind: ExecKind::Command("stty size; sleep 30 & exit 4".into()), env: vec![], pty };
        let mut p = s.exec_local("alice", req).await.unwrap();
        let out = tokio::time::timeout(std::time::Duration::from_secs(10), collect(&mut p)).await.unwrap();
        assert!(out.contains("21 77"), "{out:?}");
        assert_eq!(p.control.wait().await.unwrap(), 4);
    }
}
