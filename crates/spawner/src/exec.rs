//! Running a process inside a user's environment, for the SSH gateway: a
//! login shell, a command, or the `sftp` subsystem, with or without a
//! terminal. Each spawner implements [`crate::Spawner::exec`] its own way (the
//! Docker engine's exec API, a local process); the gateway sees only this.

use bytes::Bytes;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::BoxFuture;

/// What to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecKind {
    /// The user's login shell.
    Shell,
    /// `<login shell> -c <command>`, as sshd runs it.
    Command(String),
    /// The environment's `sftp-server`.
    Sftp,
}

/// A terminal the client asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PtySpec {
    pub term: String,
    pub cols: u16,
    pub rows: u16,
}

#[derive(Debug, Clone)]
pub struct ExecRequest {
    pub kind: ExecKind,
    /// Variables the client sent that the gateway allows.
    pub env: Vec<(String, String)>,
    pub pty: Option<PtySpec>,
}

/// A piece of the process's output.
#[derive(Debug, Clone)]
pub enum Output {
    Stdout(Bytes),
    /// Not used under a terminal (it merges both streams).
    Stderr(Bytes),
}

/// Control over a running process.
pub trait ExecControl: Send + Sync {
    /// Tells the process's terminal its new size.
    fn resize(&self, cols: u16, rows: u16) -> BoxFuture<'_, Result<(), String>>;
    /// Sends a signal (`INT`, `TERM`, `HUP`, `KILL`, …, SSH's names without `SIG`).
    fn signal<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), String>>;
    /// Waits for the exit status (a signal death is 128 + its number). Call it
    /// after the output has ended.
    fn wait(&self) -> BoxFuture<'_, Result<u32, String>>;
}

/// A started process: send its input (dropping the sender closes it), read
/// its output until the channel closes, then ask `control.wait()` for the status.
pub struct ExecProcess {
    pub stdin: mpsc::Sender<Bytes>,
    pub output: mpsc::Receiver<Output>,
    pub control: Box<dyn ExecControl>,
}

/// Input chunks queued per process before the SSH session waits (flow control
/// then falls back on the channel window).
pub const STDIN_QUEUE: usize = 64;

/// Copies queued input into `sink` until the sender is dropped, then closes
/// the sink (end of input).
pub async fn pump_stdin<W: AsyncWrite + Unpin>(mut rx: mpsc::Receiver<Bytes>, mut sink: W) {
    let mut batch = Vec::new();
    while let Some(chunk) = rx.recv().await {
        // Whatever else is queued goes in the same write (SSH delivers 32 KiB
        // packets; one write per packet costs a system call each).
        let result = match rx.try_recv() {
            Err(_) => sink.write_all(&chunk).await,
            Ok(next) => {
                batch.clear();
                batch.extend_from_slice(&chunk);
                batch.extend_from_slice(&next);
                while batch.len() < BATCH_BYTES {
                    match rx.try_recv() {
                        Ok(more) => batch.extend_from_slice(&more),
                        Err(_) => break,
                    }
                }
                sink.write_all(&batch).await
            }
        };
        if result.is_err() {
            return;
        }
    }
    let _ = sink.shutdown().await;
}

/// Largest batch of queued input or output moved at once.
pub const BATCH_BYTES: usize = 256 * 1024;

/// The environment variables a client may set: the locale and `TERM`-like
/// settings OpenSSH's default `AcceptEnv` lets through, and nothing that
/// changes how programs are found or loaded.
pub fn env_allowed(name: &str) -> bool {
    name == "LANG" || name.starts_with("LC_") || name == "COLORTERM" || name == "TZ" || name == "NO_COLOR"
}

/// Finds and runs the environment's sftp-server, or says clearly that it has none.
pub const SFTP_SCRIPT: &str = "for p in /usr/lib/openssh/sftp-server /usr/libexec/openssh/sftp-server \
/usr/lib/ssh/sftp-server /usr/libexec/sftp-server /usr/lib/sftp-server; do \
[ -x \"$p\" ] && exec \"$p\"; done; \
echo 'berth: this environment has no sftp-server (install the openssh-sftp-server package)' >&2; exit 127";

/// Runs the user's login shell from the passwd database (else `/bin/sh`);
/// `$1`, when given, is the command for `-c`.
pub const SHELL_SCRIPT: &str = "s=$(getent passwd \"$(id -un)\" 2>/dev/null | cut -d: -f7); \
[ -n \"$s\" ] && [ -x \"$s\" ] || s=/bin/sh; \
if [ $# -gt 0 ]; then exec \"$s\" -c \"$1\"; else cd \"${HOME:-/}\" 2>/dev/null; exec \"$s\" -l; fi";

/// The command line (`/bin/sh -c …`) a spawner runs for `kind`.
pub fn command_line(kind: &ExecKind) -> Vec<String> {
    let mut v = vec!["/bin/sh".to_string(), "-c".to_string()];
    match kind {
        ExecKind::Shell => v.extend([SHELL_SCRIPT.to_string(), "berth-ssh".to_string()]),
        ExecKind::Command(c) => v.extend([SHELL_SCRIPT.to_string(), "berth-ssh".to_string(), c.clone()]),
        ExecKind::Sftp => v.push(SFTP_SCRIPT.to_string()),
    }
    v
}

/// Signal number for SSH's signal names.
pub fn signal_number(name: &str) -> Option<i32> {
    Some(match name {
        "ABRT" => 6,
        "ALRM" => 14,
        "FPE" => 8,
        "HUP" => 1,
        "ILL" => 4,
        "INT" => 2,
        "KILL" => 9,
        "PIPE" => 13,
        "QUIT" => 3,
        "SEGV" => 11,
        "TERM" => 15,
        "USR1" => 10,
        "USR2" => 12,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_allow_list_keeps_locale_and_refuses_loader_variables() {
        assert!(env_allowed("LANG"));
        assert!(env_allowed("LC_ALL"));
        for bad in ["LD_PRELOAD", "PATH", "HOME", "BASH_ENV", "SHELL"] {
            assert!(!env_allowed(bad), "{bad}");
        }
    }

    #[tokio::test]
    async fn shell_script_runs_the_command_and_keeps_its_status() {
        let line = command_line(&ExecKind::Command("echo \"$0\"; exit 3".into()));
        let out = tokio::process::Command::new(&line[0]).args(&line[1..]).output().await.unwrap();
        assert_eq!(out.status.code(), Some(3));
        let shell = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(shell.ends_with("sh"), "the command ran under a shell: {shell}");
    }
}
