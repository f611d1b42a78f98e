//! A session channel's process: started through the spawner once the
//! server runs, its input queued without blocking the connection, its
//! output batched into SSH packets, its exit status reported; and berth's
//! own notices on the client's terminal.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use berth_spawner::exec::{ExecControl, BATCH_BYTES};
use berth_spawner::{ExecKind, ExecRequest, Output};
use bytes::Bytes;
use russh::server::Handle;
use russh::{ChannelId, Sig};
use tokio::sync::{mpsc, Notify};

use crate::chan::{ChanShared, Login, Traffic};
use crate::Gateway;

pub(crate) fn sig_name(s: &Sig) -> String {
    match s {
        Sig::ABRT => "ABRT".into(),
        Sig::ALRM => "ALRM".into(),
        Sig::FPE => "FPE".into(),
        Sig::HUP => "HUP".into(),
        Sig::ILL => "ILL".into(),
        Sig::INT => "INT".into(),
        Sig::KILL => "KILL".into(),
        Sig::PIPE => "PIPE".into(),
        Sig::QUIT => "QUIT".into(),
        Sig::SEGV => "SEGV".into(),
        Sig::TERM => "TERM".into(),
        Sig::USR1 => "USR1".into(),
        Sig::Custom(n) => n.clone(),
    }
}

/// Messages from berth itself on the client's terminal (or stderr without one).
pub(crate) struct Notices {
    handle: Handle,
    channel: ChannelId,
    tty: bool,
}

impl Notices {
    pub(crate) async fn say(&self, msg: &str) {
        if self.tty {
            let _ = self.handle.data(self.channel, Bytes::from(format!("{msg}\r\n"))).await;
        } else {
            let _ = self.handle.extended_data(self.channel, 1, Bytes::from(format!("{msg}\n"))).await;
        }
    }

    pub(crate) async fn fail(&self, msg: &str, status: u32) {
        self.say(&format!("berth: {msg}")).await;
        let _ = self.handle.exit_status_request(self.channel, status).await;
        let _ = self.handle.eof(self.channel).await;
        let _ = self.handle.close(self.channel).await;
    }
}

/// Runs one session channel's process to its end.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn run_process(
    gw: Arc<Gateway>,
    handle: Handle,
    channel: ChannelId,
    login: Login,
    req: ExecRequest,
    stdin_rx: mpsc::UnboundedReceiver<Bytes>,
    queue: (Arc<AtomicUsize>, Arc<Notify>, Arc<AtomicBool>),
    shared: Arc<ChanShared>,
    traffic: Arc<Traffic>,
) {
    let notices = Notices { handle: handle.clone(), channel, tty: req.pty.is_some() };
    let state = match gw.running_state(&login, Some(&notices)).await {
        Ok(s) => s,
        Err(msg) => return notices.fail(&msg, 255).await,
    };
    let what = match &req.kind {
        ExecKind::Shell => "shell".to_string(),
        ExecKind::Sftp => "sftp".to_string(),
        ExecKind::Command(c) => format!("command ({} bytes)", c.len()),
    };
    let started = match gw.upstream.spawner() {
        Some(sp) => sp.exec(&login.user, &state, req).await,
        None => Err(berth_spawner::SpawnError::Failed("no spawner".into())),
    };
    let mut proc = match started {
        Ok(p) => p,
        Err(e) => return notices.fail(&format!("cannot run a {what} in {}: {e}", login.describe()), 255).await,
    };
    tracing::debug!(user = %login.user, server = %login.server, %what, "SSH channel started");
    let control: &dyn ExecControl = shared.control.get_or_init(|| proc.control).as_ref();
    let size = shared.size.lock().ok().and_then(|s| *s);
    if let Some((cols, rows)) = size {
        let _ = control.resize(cols, rows).await;
    }
    // Input: from the unbounded queue into the process, counting it down.
    let stdin = proc.stdin;
    let (queued, drained, closed) = queue;
    gw.tasks.spawn(async move {
        let mut rx = stdin_rx;
        while let Some(chunk) = rx.recv().await {
            let n = chunk.len();
            let ok = stdin.send(chunk).await.is_ok();
            queued.fetch_sub(n, Ordering::Relaxed);
            drained.notify_waiters();
            if !ok {
                break;
            }
        }
        closed.store(true, Ordering::Relaxed);
        drained.notify_waiters();
    });
    let mut pending: Option<Output> = None;
    loop {
        let out = match pending.take() {
            Some(o) => o,
            None => match proc.output.recv().await {
                Some(o) => o,
                None => break,
            },
        };
        // Output already waiting joins this message (fewer, fuller SSH packets).
        let out = match out {
            Output::Stdout(first) => {
                let mut joined: Option<bytes::BytesMut> = None;
                while joined.as_ref().map_or(first.len(), |j| j.len()) < BATCH_BYTES {
                    match proc.output.try_recv() {
                        Ok(Output::Stdout(more)) => {
                            joined.get_or_insert_with(|| bytes::BytesMut::from(&first[..])).extend_from_slice(&more)
                        }
                        Ok(other) => {
                            pending = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                Output::Stdout(joined.map(|j| j.freeze()).unwrap_or(first))
            }
            other => other,
        };
        let sent = match out {
            Output::Stdout(b) => {
                traffic.to_client.fetch_add(b.len() as u64, Ordering::Relaxed);
                handle.data(channel, b).await.is_ok()
            }
            Output::Stderr(b) => {
                traffic.to_client.fetch_add(b.len() as u64, Ordering::Relaxed);
                handle.extended_data(channel, 1, b).await.is_ok()
            }
        };
        if !sent {
            // The client is gone: no one to tell the status to. A shell gets
            // a hang-up as its terminal closes; commands see their pipes close.
            if notices.tty {
                let _ = control.signal("HUP").await;
            }
            return;
        }
    }
    let status = match control.wait().await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(user = %login.user, error = %e, "no exit status");
            255
        }
    };
    let _ = handle.exit_status_request(channel, status).await;
    let _ = handle.eof(channel).await;
    let _ = handle.close(channel).await;
}
