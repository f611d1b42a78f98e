//! One SSH connection: authentication by registered key, then channels —
//! shell, exec and sftp through the spawner, `direct-tcpip` into the user's
//! own environment only.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use berth_core::{ServerName, ServerState, UserName};
use berth_spawner::exec::{env_allowed, ExecControl, BATCH_BYTES};
use berth_spawner::{ExecKind, ExecRequest, Output, PtySpec};
use berth_web::servers::{ProgressLog, StartError};
use bytes::Bytes;
use russh::keys::HashAlg;
use russh::server::{Auth, ChannelOpenHandle, Handle, Msg, PublicKeyOffer, Session, VerifiedPublicKey};
use russh::{Channel, ChannelId, ChannelOpenFailure, MethodKind, MethodSet, Pty, Sig};
use serde_json::{json, Value};
use tokio::sync::{mpsc, Notify};

use crate::Gateway;

/// Input queued for a process before the SSH session waits for it to drain.
/// The queue itself never blocks the session (a blocked session could not
/// take the client's window updates, and a process writing output while we
/// wait for it to read input would then never finish).
const STDIN_HIGH: usize = 32 * 1024 * 1024;
const STDIN_LOW: usize = 8 * 1024 * 1024;

/// How long the gateway waits for a server it started.
const START_WAIT: Duration = Duration::from_secs(600);

#[derive(Debug, Clone)]
struct Login {
    user: String,
    server: String,
    key_id: String,
    fingerprint: String,
}

impl Login {
    fn describe(&self) -> String {
        if self.server.is_empty() {
            self.user.clone()
        } else {
            format!("{}/{}", self.user, self.server)
        }
    }
}

/// `alice` → (alice, ""), `alice+lab` → (alice, lab).
pub(crate) fn parse_login(name: &str) -> Option<(String, String)> {
    let Some((user, server)) = name.split_once('+') else {
        return Some((UserName::parse(name).ok()?.to_string(), String::new()));
    };
    let user = UserName::parse(user).ok()?;
    if server.is_empty() {
        return None;
    }
    let server = ServerName::parse(server).ok()?;
    Some((user.to_string(), server.to_string()))
}

/// What a channel shares with the task running its process.
#[derive(Default)]
struct ChanShared {
    control: OnceLock<Box<dyn ExecControl>>,
    /// The latest terminal size, applied once the process runs.
    size: Mutex<Option<(u16, u16)>>,
}

/// Input on its way to a process, counted so the session can wait when a
/// process stops reading.
struct StdinQueue {
    tx: mpsc::UnboundedSender<Bytes>,
    queued: Arc<AtomicUsize>,
    drained: Arc<Notify>,
    closed: Arc<AtomicBool>,
}

struct Chan {
    env: Vec<(String, String)>,
    pty: Option<PtySpec>,
    started: bool,
    stdin: Option<StdinQueue>,
    /// Created with the channel, handed to the process task when it starts.
    stdin_rx: Option<mpsc::UnboundedReceiver<Bytes>>,
    shared: Arc<ChanShared>,
}

impl Chan {
    fn new() -> Chan {
        let (tx, rx) = mpsc::unbounded_channel();
        Chan {
            env: Vec::new(),
            pty: None,
            started: false,
            stdin: Some(StdinQueue {
                tx,
                queued: Arc::new(AtomicUsize::new(0)),
                drained: Arc::new(Notify::new()),
                closed: Arc::new(AtomicBool::new(false)),
            }),
            stdin_rx: Some(rx),
            shared: Arc::new(ChanShared::default()),
        }
    }
}

/// Bytes moved, for the audit line.
#[derive(Default)]
struct Traffic {
    to_client: AtomicU64,
    from_client: AtomicU64,
}

pub(crate) struct Conn {
    gw: Arc<Gateway>,
    peer: SocketAddr,
    login: Option<Login>,
    /// An authentication was tried (a connection that never tried is not a failure).
    tried: bool,
    channels: HashMap<ChannelId, Chan>,
    since: Instant,
    traffic: Arc<Traffic>,
    /// Seconds until this address may try again, when it is refused now.
    blocked: Option<u64>,
    /// The last key offered and accepted `(login name, fingerprint, login)`:
    /// the signature that follows it needs no second look-up.
    offered: Option<(String, String, Login)>,
}

impl Conn {
    pub(crate) fn new(gw: Arc<Gateway>, peer: SocketAddr, blocked: Option<u64>) -> Conn {
        Conn {
            gw,
            peer,
            blocked,
            offered: None,
            login: None,
            tried: false,
            channels: HashMap::new(),
            since: Instant::now(),
            traffic: Arc::new(Traffic::default()),
        }
    }

    fn reject() -> Auth {
        Auth::Reject {
            proceed_with_methods: Some(MethodSet::from(&[MethodKind::PublicKey][..])),
            partial_success: false,
        }
    }

    /// Whether `name` may log in with the key of this fingerprint: the user
    /// exists, is authorized, and registered the key. Reads the database, so
    /// a removed key or a deleted user is refused on the next connection.
    async fn check(&self, name: &str, fingerprint: &str) -> Option<Login> {
        if self.blocked.is_some() {
            return None;
        }
        let (user, server) = parse_login(name)?;
        let record = self.gw.store.get_user_uncached(&user).await.ok()??;
        if !record.authorized {
            return None;
        }
        let key = self.gw.store.find_ssh_key(&user, fingerprint).await.ok()??;
        Some(Login { user, server, key_id: key.id, fingerprint: key.fingerprint })
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        // Terminals of a dropped connection hang up, as with sshd.
        let shells: Vec<Arc<ChanShared>> =
            self.channels.values().filter(|c| c.pty.is_some()).map(|c| c.shared.clone()).collect();
        if !shells.is_empty() {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    for s in shells {
                        if let Some(c) = s.control.get() {
                            let _ = c.signal("HUP").await;
                        }
                    }
                });
            }
        }
        match &self.login {
            Some(login) => {
                let secs = self.since.elapsed().as_secs_f64();
                let to_client = self.traffic.to_client.load(Ordering::Relaxed);
                let from_client = self.traffic.from_client.load(Ordering::Relaxed);
                tracing::info!(
                    user = %login.user,
                    server = %login.server,
                    peer = %self.peer,
                    duration_s = format!("{secs:.1}"),
                    bytes_to_client = to_client,
                    bytes_from_client = from_client,
                    "SSH session ended"
                );
                let store = self.gw.store.clone();
                let user = login.user.clone();
                let detail = json!({
                    "server": login.server, "peer": self.peer.to_string(), "seconds": secs,
                    "bytes_to_client": to_client, "bytes_from_client": from_client, "key": login.fingerprint,
                })
                .to_string();
                if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    rt.spawn(async move {
                        let _ = store.add_event(&user, "ssh-session", &user, &detail).await;
                    });
                }
            }
            None if self.tried && self.blocked.is_none() => {
                self.gw.record_failure(self.peer.ip());
                tracing::info!(peer = %self.peer, "SSH log-in failed");
            }
            None => {}
        }
    }
}

fn sig_name(s: &Sig) -> String {
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
struct Notices {
    handle: Handle,
    channel: ChannelId,
    tty: bool,
}

impl Notices {
    async fn say(&self, msg: &str) {
        if self.tty {
            let _ = self.handle.data(self.channel, Bytes::from(format!("{msg}\r\n"))).await;
        } else {
            let _ = self.handle.extended_data(self.channel, 1, Bytes::from(format!("{msg}\n"))).await;
        }
    }

    async fn fail(&self, msg: &str, status: u32) {
        self.say(&format!("berth: {msg}")).await;
        let _ = self.handle.exit_status_request(self.channel, status).await;
        let _ = self.handle.eof(self.channel).await;
        let _ = self.handle.close(self.channel).await;
    }
}

impl Gateway {
    /// The running server's spawner state, starting the server first when
    /// allowed and showing its progress through `notices`.
    async fn ensure_running(&self, login: &Login, notices: Option<&Notices>) -> Result<Value, String> {
        let what = login.describe();
        let deadline = Instant::now() + START_WAIT;
        let mut started_here = false;
        for _ in 0..50 {
            let state = self.servers.state_of(&login.user, &login.server).await.map_err(|e| e.to_string())?;
            match state {
                Some((ServerState::Running, s)) => return Ok(s),
                Some((ServerState::Stopping, _)) => {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
                Some((ServerState::Starting, _)) => {}
                Some((ServerState::Stopped, _)) | None => {
                    if started_here {
                        return Err(format!("{what} did not start; see {}hub/home", self.hub_url));
                    }
                    if !self.cfg.auto_start {
                        return Err(format!(
                            "{what} is not running; start it at {}hub/home, then connect again",
                            self.hub_url
                        ));
                    }
                    if let Some(n) = notices {
                        n.say(&format!("berth: starting {what} …")).await;
                    }
                    match self.servers.start(&login.user, &login.server, json!({})).await {
                        Ok(()) | Err(StartError::AlreadyRunning(_)) | Err(StartError::PendingSpawn(_)) => {}
                        Err(e) => return Err(format!("cannot start {what}: {e}")),
                    }
                    started_here = true;
                }
            }
            // Starting: follow its progress until it finishes.
            if let Some(log) = self.servers.progress_log(&login.user, &login.server) {
                let (past, mut rx) = log.subscribe();
                let mut finished = None;
                for ev in &past {
                    if ProgressLog::is_finished(ev) {
                        finished = Some(ev.clone());
                    }
                }
                if let (Some(n), Some(last)) = (notices, past.last()) {
                    n.say(&progress_line(last)).await;
                }
                while finished.is_none() {
                    let left = deadline.saturating_duration_since(Instant::now());
                    match tokio::time::timeout(left, rx.recv()).await {
                        Ok(Ok(ev)) => {
                            if let Some(n) = notices {
                                n.say(&progress_line(&ev)).await;
                            }
                            if ProgressLog::is_finished(&ev) {
                                finished = Some(ev);
                            }
                        }
                        Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => continue,
                        Ok(Err(_)) => break,
                        Err(_) => return Err(format!("{what} did not become ready in time")),
                    }
                }
                if let Some(ev) = finished {
                    if ev.get("failed").and_then(|v| v.as_bool()).unwrap_or(false) {
                        let msg = ev.get("message").and_then(|m| m.as_str()).unwrap_or("it failed");
                        return Err(format!("{what} failed to start: {msg}"));
                    }
                }
            } else {
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            if Instant::now() > deadline {
                return Err(format!("{what} did not become ready in time"));
            }
        }
        Err(format!("{what} is not running"))
    }
}

fn progress_line(ev: &Value) -> String {
    let pct = ev.get("progress").and_then(|p| p.as_u64()).unwrap_or(0);
    let msg = ev.get("message").and_then(|m| m.as_str()).unwrap_or("");
    format!("berth: [{pct:>3}%] {msg}")
}

/// Runs one session channel's process to its end.
#[allow(clippy::too_many_arguments)]
async fn run_process(
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
    let state = match gw.ensure_running(&login, Some(&notices)).await {
        Ok(s) => s,
        Err(msg) => return notices.fail(&msg, 255).await,
    };
    let what = match &req.kind {
        ExecKind::Shell => "shell".to_string(),
        ExecKind::Sftp => "sftp".to_string(),
        ExecKind::Command(c) => format!("command ({} bytes)", c.len()),
    };
    let mut proc = match gw.servers.spawner().exec(&login.user, &state, req).await {
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
    tokio::spawn(async move {
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

impl Conn {
    /// Starts the process for a session channel (shell, exec or subsystem).
    fn start(&mut self, channel: ChannelId, kind: ExecKind, session: &mut Session) -> Result<(), russh::Error> {
        let Some(login) = self.login.clone() else {
            return session.channel_failure(channel);
        };
        let Some(chan) = self.channels.get_mut(&channel) else {
            return session.channel_failure(channel);
        };
        if chan.started {
            return session.channel_failure(channel);
        }
        let (Some(stdin_rx), Some(q)) = (chan.stdin_rx.take(), chan.stdin.as_ref()) else {
            return session.channel_failure(channel);
        };
        chan.started = true;
        let queue = (q.queued.clone(), q.drained.clone(), q.closed.clone());
        let req = ExecRequest { kind, env: chan.env.clone(), pty: chan.pty.clone() };
        session.channel_success(channel)?;
        tokio::spawn(run_process(
            self.gw.clone(),
            session.handle(),
            channel,
            login,
            req,
            stdin_rx,
            queue,
            chan.shared.clone(),
            self.traffic.clone(),
        ));
        Ok(())
    }
}

impl russh::server::Handler for Conn {
    type Error = russh::Error;

    async fn authentication_banner(&mut self) -> Result<Option<String>, Self::Error> {
        Ok(self.blocked.map(|secs| {
            format!("berth: too many failed SSH log-ins from {}; try again in {secs} s\r\n", self.peer.ip())
        }))
    }

    async fn auth_none(&mut self, _user: &str) -> Result<Auth, Self::Error> {
        Ok(Conn::reject())
    }

    async fn auth_password(&mut self, user: &str, _password: &str) -> Result<Auth, Self::Error> {
        self.tried = true;
        tracing::info!(peer = %self.peer, user = %user.chars().take(64).collect::<String>(), "SSH password refused: keys only");
        Ok(Conn::reject())
    }

    async fn auth_keyboard_interactive<'a>(
        &'a mut self,
        _user: &str,
        _submethods: &str,
        _response: Option<russh::server::Response<'a>>,
    ) -> Result<Auth, Self::Error> {
        self.tried = true;
        Ok(Conn::reject())
    }

    async fn auth_publickey_offered(&mut self, user: &str, offer: PublicKeyOffer<'_>) -> Result<Auth, Self::Error> {
        self.tried = true;
        let fp = offer.public_key.fingerprint(HashAlg::Sha256).to_string();
        match self.check(user, &fp).await {
            Some(login) => {
                self.offered = Some((user.to_string(), fp, login));
                Ok(Auth::Accept)
            }
            None => Ok(Conn::reject()),
        }
    }

    async fn auth_publickey(&mut self, user: &str, key: VerifiedPublicKey<'_>) -> Result<Auth, Self::Error> {
        self.tried = true;
        let fp = key.public_key.fingerprint(HashAlg::Sha256).to_string();
        let known = match self.offered.take() {
            Some((u, f, login)) if u == user && f == fp => Some(login),
            _ => self.check(user, &fp).await,
        };
        match known {
            Some(login) => {
                let _ = self.gw.store.touch_ssh_key(&login.key_id).await;
                tracing::info!(user = %login.user, server = %login.server, peer = %self.peer, key = %fp, "SSH log-in");
                self.login = Some(login);
                Ok(Auth::Accept)
            }
            None => Ok(Conn::reject()),
        }
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if self.login.is_none() || self.channels.len() >= 64 {
            reply.reject(ChannelOpenFailure::AdministrativelyProhibited).await;
            return Ok(());
        }
        self.channels.insert(channel.id(), Chan::new());
        // The handler's callbacks carry this channel's traffic; the channel
        // object itself is not read.
        drop(channel);
        reply.accept().await;
        Ok(())
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host: &str,
        port: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(login) = self.login.clone() else {
            reply.reject(ChannelOpenFailure::AdministrativelyProhibited).await;
            return Ok(());
        };
        // Only the inside of the user's own environment: its loopback.
        let inside = matches!(host, "localhost" | "127.0.0.1" | "::1" | "[::1]" | "ip6-localhost");
        let port16 = u16::try_from(port).ok().filter(|p| *p > 0);
        let (true, Some(port16)) = (inside, port16) else {
            tracing::warn!(user = %login.user, peer = %self.peer, %host, port, "SSH forward refused: outside the environment");
            reply
                .reject(ChannelOpenFailure::Other {
                    code: 1,
                    reason: format!(
                        "berth forwards only to localhost:PORT inside {}'s environment; {host}:{port} is outside it",
                        login.describe()
                    ),
                })
                .await;
            return Ok(());
        };
        let state = match self.gw.ensure_running(&login, None).await {
            Ok(s) => s,
            Err(msg) => {
                reply.reject(ChannelOpenFailure::Other { code: 2, reason: msg }).await;
                return Ok(());
            }
        };
        let mut tcp = match self.gw.servers.spawner().connect(&state, port16).await {
            Ok(s) => s,
            Err(e) => {
                reply.reject(ChannelOpenFailure::Other { code: 2, reason: e.to_string() }).await;
                return Ok(());
            }
        };
        reply.accept().await;
        let traffic = self.traffic.clone();
        let user = login.user.clone();
        tokio::spawn(async move {
            let mut stream = channel.into_stream();
            match tokio::io::copy_bidirectional(&mut stream, &mut tcp).await {
                Ok((up, down)) => {
                    traffic.from_client.fetch_add(up, Ordering::Relaxed);
                    traffic.to_client.fetch_add(down, Ordering::Relaxed);
                    tracing::debug!(%user, port = port16, up, down, "SSH forward closed");
                }
                Err(e) => tracing::debug!(%user, port = port16, error = %e, "SSH forward ended"),
            }
        });
        Ok(())
    }

    async fn channel_close(&mut self, channel: ChannelId, _session: &mut Session) -> Result<(), Self::Error> {
        if let Some(chan) = self.channels.remove(&channel) {
            // The client went away: end the process's input; a shell whose
            // terminal closes gets a hang-up.
            if chan.pty.is_some() {
                if let Some(c) = chan.shared.control.get() {
                    let _ = c.signal("HUP").await;
                }
            }
        }
        Ok(())
    }

    async fn channel_eof(&mut self, channel: ChannelId, _session: &mut Session) -> Result<(), Self::Error> {
        if let Some(chan) = self.channels.get_mut(&channel) {
            chan.stdin = None;
        }
        Ok(())
    }

    async fn data(&mut self, channel: ChannelId, data: &[u8], _session: &mut Session) -> Result<(), Self::Error> {
        let Some(q) = self.channels.get(&channel).and_then(|c| c.stdin.as_ref()) else {
            return Ok(());
        };
        self.traffic.from_client.fetch_add(data.len() as u64, Ordering::Relaxed);
        if q.closed.load(Ordering::Relaxed) {
            return Ok(());
        }
        let queued = q.queued.fetch_add(data.len(), Ordering::Relaxed) + data.len();
        let _ = q.tx.send(Bytes::copy_from_slice(data));
        if queued > STDIN_HIGH {
            // The process is not reading: wait (bounded steps) for it to catch up.
            let (queued, drained, closed) = (q.queued.clone(), q.drained.clone(), q.closed.clone());
            while queued.load(Ordering::Relaxed) > STDIN_LOW && !closed.load(Ordering::Relaxed) {
                let _ = tokio::time::timeout(Duration::from_millis(100), drained.notified()).await;
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn pty_request(
        &mut self,
        channel: ChannelId,
        term: &str,
        col_width: u32,
        row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        _modes: &[(Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(chan) = self.channels.get_mut(&channel).filter(|c| !c.started) else {
            return session.channel_failure(channel);
        };
        let term: String = term.chars().filter(|c| c.is_ascii_graphic()).take(64).collect();
        let cols = col_width.clamp(1, u16::MAX as u32) as u16;
        let rows = row_height.clamp(1, u16::MAX as u32) as u16;
        chan.pty = Some(PtySpec { term: if term.is_empty() { "xterm".into() } else { term }, cols, rows });
        session.channel_success(channel)
    }

    async fn window_change_request(
        &mut self,
        channel: ChannelId,
        col_width: u32,
        row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(chan) = self.channels.get(&channel) {
            let cols = col_width.clamp(1, u16::MAX as u32) as u16;
            let rows = row_height.clamp(1, u16::MAX as u32) as u16;
            if let Ok(mut s) = chan.shared.size.lock() {
                *s = Some((cols, rows));
            }
            if let Some(c) = chan.shared.control.get() {
                if let Err(e) = c.resize(cols, rows).await {
                    tracing::debug!(error = %e, "terminal resize failed");
                }
            }
        }
        Ok(())
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        value: &str,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        // OpenSSH sends these without asking for a reply; refused ones are dropped.
        if let Some(chan) = self.channels.get_mut(&channel) {
            if env_allowed(name) && value.len() <= 4096 && chan.env.len() < 64 && !value.contains('\0') {
                chan.env.push((name.to_string(), value.to_string()));
            }
        }
        Ok(())
    }

    async fn shell_request(&mut self, channel: ChannelId, session: &mut Session) -> Result<(), Self::Error> {
        self.start(channel, ExecKind::Shell, session)
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        match std::str::from_utf8(data) {
            Ok(cmd) if !cmd.contains('\0') => self.start(channel, ExecKind::Command(cmd.to_string()), session),
            _ => session.channel_failure(channel),
        }
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if name == "sftp" {
            self.start(channel, ExecKind::Sftp, session)
        } else {
            session.channel_failure(channel)
        }
    }

    async fn signal(&mut self, channel: ChannelId, signal: Sig, _session: &mut Session) -> Result<(), Self::Error> {
        if let Some(c) = self.channels.get(&channel).and_then(|c| c.shared.control.get()) {
            let name = sig_name(&signal);
            if let Err(e) = c.signal(&name).await {
                tracing::debug!(error = %e, signal = %name, "signal not delivered");
            }
        }
        Ok(())
    }

    async fn tcpip_forward(
        &mut self,
        _address: &str,
        _port: &mut u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        // Remote forwarding (`ssh -R`) would open ports on the host: refused.
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn login_names_select_user_and_server() {
        assert_eq!(parse_login("alice"), Some(("alice".into(), String::new())));
        assert_eq!(parse_login("alice+comfyui"), Some(("alice".into(), "comfyui".into())));
        for bad in ["", "Alice", "alice+", "alice+Bad", "+x", "a b", "alice+x+y", "../alice"] {
            assert_eq!(parse_login(bad), None, "{bad}");
        }
    }
}
