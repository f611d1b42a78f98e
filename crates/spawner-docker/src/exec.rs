//! The Docker spawner's side of the SSH gateway: sessions run through the
//! engine's exec API (the image needs no sshd), and port forwards connect
//! from inside the container's network namespace, so only the container's
//! own ports — its loopback included — are reachable.

use std::net::{Ipv4Addr, SocketAddr, TcpStream as StdTcpStream};
use std::time::Duration;

use berth_spawner::exec::{command_line, pump_stdin, signal_number, ExecControl, STDIN_QUEUE};
use berth_spawner::{BoxFuture, ExecProcess, ExecRequest, Output, SpawnError};
use bollard::container::LogOutput;
use bollard::exec::{CreateExecOptions, ResizeExecOptions, StartExecOptions, StartExecResults};
use bollard::Docker;
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::mpsc;

use crate::DockerSpawner;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

struct DockerControl {
    docker: Docker,
    exec_id: String,
}

impl ExecControl for DockerControl {
    fn resize(&self, cols: u16, rows: u16) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            self.docker
                .resize_exec(&self.exec_id, ResizeExecOptions { height: rows, width: cols })
                .await
                .map_err(|e| e.to_string())
        })
    }

    fn signal<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let n = signal_number(name).ok_or_else(|| format!("unknown signal {name}"))?;
            let sig = nix::sys::signal::Signal::try_from(n).map_err(|e| e.to_string())?;
            let info = self.docker.inspect_exec(&self.exec_id).await.map_err(|e| e.to_string())?;
            // The engine has no signal call for exec'd processes; its host pid
            // is known, and berth runs beside the engine.
            match (info.running, info.pid) {
                (Some(true), Some(pid)) if pid > 0 => {
                    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig).map_err(|e| e.to_string())
                }
                _ => Ok(()),
            }
        })
    }

    fn wait(&self) -> BoxFuture<'_, Result<u32, String>> {
        Box::pin(async move {
            // The output ends a moment before the engine records the exit.
            for _ in 0..200 {
                let info = self.docker.inspect_exec(&self.exec_id).await.map_err(|e| e.to_string())?;
                if info.running != Some(true) {
                    return Ok(info.exit_code.map(|c| c as u32).unwrap_or(255));
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            Err("the engine did not report the command's exit".into())
        })
    }
}

impl DockerSpawner {
    pub(crate) async fn exec_in(&self, container: &str, req: ExecRequest) -> Result<ExecProcess, SpawnError> {
        let docker = self.client()?;
        let tty = req.pty.is_some();
        let mut env: Vec<String> = req.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        if let Some(p) = &req.pty {
            env.push(format!("TERM={}", p.term));
        }
        let created = docker
            .create_exec(
                container,
                CreateExecOptions::<String> {
                    attach_stdin: Some(true),
                    attach_stdout: Some(true),
                    attach_stderr: Some(true),
                    tty: Some(tty),
                    env: Some(env),
                    cmd: Some(command_line(&req.kind)),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| SpawnError::Failed(format!("cannot run a command in the container: {e}")))?;
        let started = docker
            .start_exec(&created.id, Some(StartExecOptions { detach: false, tty, output_capacity: Some(256 * 1024) }))
            .await
            .map_err(|e| SpawnError::Failed(format!("cannot start the command in the container: {e}")))?;
        let StartExecResults::Attached { mut output, input } = started else {
            return Err(SpawnError::Failed("the engine detached the command".into()));
        };
        let control = DockerControl { docker, exec_id: created.id };
        if let Some(p) = &req.pty {
            let _ = control.resize(p.cols.max(1), p.rows.max(1)).await;
        }
        let (in_tx, in_rx) = mpsc::channel::<Bytes>(STDIN_QUEUE);
        tokio::spawn(pump_stdin(in_rx, input));
        let (out_tx, out_rx) = mpsc::channel(32);
        tokio::spawn(async move {
            while let Some(item) = output.next().await {
                let out = match item {
                    Ok(LogOutput::StdOut { message }) | Ok(LogOutput::Console { message }) => Output::Stdout(message),
                    Ok(LogOutput::StdErr { message }) => Output::Stderr(message),
                    Ok(LogOutput::StdIn { .. }) => continue,
                    Err(e) => {
                        tracing::debug!(error = %e, "exec output ended");
                        return;
                    }
                };
                if out_tx.send(out).await.is_err() {
                    return;
                }
            }
        });
        Ok(ExecProcess { stdin: in_tx, output: out_rx, control: Box::new(control) })
    }

    /// Connects to `port` on the container's loopback, from inside its
    /// network namespace.
    pub(crate) async fn connect_in(&self, container: &str, port: u16) -> Result<tokio::net::TcpStream, SpawnError> {
        let docker = self.client()?;
        let info = docker
            .inspect_container(container, None::<bollard::query_parameters::InspectContainerOptions>)
            .await
            .map_err(|e| SpawnError::Failed(format!("cannot inspect the container: {e}")))?;
        let pid = info
            .state
            .as_ref()
            .and_then(|s| s.pid)
            .filter(|p| *p > 0)
            .ok_or_else(|| SpawnError::Failed("the container is not running".into()))?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        // A thread of its own: it enters the container's namespace, connects,
        // and ends, so no other work ever runs in the wrong namespace.
        std::thread::Builder::new()
            .name("berth-netns".into())
            .spawn(move || {
                let _ = tx.send(connect_in_netns(pid, port));
            })
            .map_err(|e| SpawnError::Failed(format!("cannot start a thread: {e}")))?;
        let stream = rx.await.map_err(|_| SpawnError::Failed("the connecting thread failed".into()))??;
        stream.set_nonblocking(true)?;
        Ok(tokio::net::TcpStream::from_std(stream)?)
    }
}

fn connect_in_netns(pid: i64, port: u16) -> Result<StdTcpStream, SpawnError> {
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/net"))
        .map_err(|e| SpawnError::Failed(format!("cannot open the container's network namespace: {e}")))?;
    nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
        SpawnError::Failed(format!("cannot enter the container's network namespace (berth must run as root): {e}"))
    })?;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    StdTcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)
        .map_err(|e| SpawnError::Failed(format!("nothing answers on port {port} in the container: {e}")))
}

pub(crate) fn state_container(state: &serde_json::Value) -> Result<String, SpawnError> {
    crate::state_id(state)
}
