//! The local-process spawner's side of the SSH gateway: a shell or command
//! runs on this machine as berth's own user (the user the local servers run
//! as), in the user's home under the data directory, with a terminal from
//! `pty-process` when the client asked for one.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::Arc;

use bytes::Bytes;
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, watch, Mutex};

use crate::exec::{command_line, pump_stdin, signal_number, ExecControl, ExecProcess, ExecRequest, Output, STDIN_QUEUE};
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

impl LocalSpawner {
    /// Runs `req` as this user's session process.
    pub(crate) async fn exec_local(&self, user: &str, req: ExecRequest) -> Result<ExecProcess, SpawnError> {
        let home = self.home(user);
        std::fs::create_dir_all(&home)?;
        let mut env: BTreeMap<String, String> = self.base_env();
        env.insert("USER".into(), user.to_string());
        env.insert("LOGNAME".into(), user.to_string());
        env.insert("HOME".into(), home.display().to_string());
        env.extend(req.env.iter().cloned());
        let line = command_line(&req.kind);
        let (out_tx, out_rx) = mpsc::channel(32);
        let (in_tx, in_rx) = mpsc::channel::<Bytes>(STDIN_QUEUE);
        let (status_tx, status_rx) = watch::channel(None);

        let (mut child, pty) = if let Some(p) = &req.pty {
            env.insert("TERM".into(), p.term.clone());
            let (pty, pts) = pty_process::open().map_err(|e| SpawnError::Failed(format!("cannot open a terminal: {e}")))?;
            pty.resize(pty_process::Size::new(p.rows.max(1), p.cols.max(1)))
                .map_err(|e| SpawnError::Failed(format!("cannot size the terminal: {e}")))?;
            let child = pty_process::Command::new(&line[0])
                .args(&line[1..])
                .env_clear()
                .envs(&env)
                .current_dir(&home)
                .spawn(pts)
                .map_err(|e| SpawnError::Failed(format!("cannot start a shell: {e}")))?;
            let (read, write) = pty.into_split();
            let write = Arc::new(Mutex::new(write));
            tokio::spawn(pump_output(read, out_tx, false));
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
            let mut child = tokio::process::Command::new(&line[0])
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
        Ok(ExecProcess { stdin: in_tx, output: out_rx, control: Box::new(LocalControl { pid, status: status_rx, pty }) })
    }
}
