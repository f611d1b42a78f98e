//! One SSH connection: authentication by registered key, then channels —
//! shell, exec and sftp through the spawner, `direct-tcpip` into the user's
//! own environment only.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_core::{ServerName, UserName};
use berth_spawner::exec::env_allowed;
use berth_spawner::{ExecKind, ExecRequest, PtySpec};
use bytes::Bytes;
use russh::keys::HashAlg;
use russh::server::{Auth, ChannelOpenHandle, Msg, PublicKeyOffer, Session, VerifiedPublicKey};
use russh::{Channel, ChannelId, ChannelOpenFailure, MethodKind, MethodSet, Pty, Sig};
use tokio::sync::{mpsc, Notify};

use crate::chan::{ChanShared, Login, Traffic};
use crate::process::{run_process, sig_name};
use crate::upstream::SessionRecord;
use crate::Gateway;

/// Input queued for a process before the SSH session waits for it to drain.
/// The queue itself never blocks the session (a blocked session could not
/// take the client's window updates, and a process writing output while we
/// wait for it to read input would then never finish).
const STDIN_HIGH: usize = 32 * 1024 * 1024;
const STDIN_LOW: usize = 8 * 1024 * 1024;

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

pub(crate) struct Conn {
    /// Who logged in, shared with the connection's watcher (which ends the
    /// connection when the key is removed or the account withdrawn).
    logged_in: Arc<std::sync::Mutex<Option<Login>>>,
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
    pub(crate) fn new(
        gw: Arc<Gateway>,
        peer: SocketAddr,
        blocked: Option<u64>,
        logged_in: Arc<std::sync::Mutex<Option<Login>>>,
    ) -> Conn {
        Conn {
            logged_in,
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
        let key = self.gw.upstream.authenticate(&user, fingerprint).await?;
        Some(Login { user, server, key_id: key.key_id, fingerprint: key.fingerprint })
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        // Terminals of a dropped connection hang up, as with sshd.
        let shells: Vec<Arc<ChanShared>> =
            self.channels.values().filter(|c| c.pty.is_some()).map(|c| c.shared.clone()).collect();
        if !shells.is_empty() {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                self.gw.tasks.spawn_on(
                    async move {
                        for s in shells {
                            if let Some(c) = s.control.get() {
                                let _ = c.signal("HUP").await;
                            }
                        }
                    },
                    &rt,
                );
            }
        }
        match &self.login {
            Some(login) => {
                self.gw.upstream.session_closed(&login.user, &login.server);
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
                let record = SessionRecord {
                    user: login.user.clone(),
                    server: login.server.clone(),
                    peer: self.peer.to_string(),
                    seconds: secs,
                    bytes_to_client: to_client,
                    bytes_from_client: from_client,
                    fingerprint: login.fingerprint.clone(),
                };
                let upstream = self.gw.upstream.clone();
                if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    self.gw.tasks.spawn_on(async move { upstream.session_ended(record).await }, &rt);
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
        self.gw.tasks.spawn(run_process(
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
                self.gw.upstream.key_used(&login.key_id).await;
                tracing::info!(user = %login.user, server = %login.server, peer = %self.peer, key = %fp, "SSH log-in");
                if let Ok(mut l) = self.logged_in.lock() {
                    *l = Some(login.clone());
                }
                if self.login.is_none() {
                    self.gw.upstream.session_opened(&login.user, &login.server);
                }
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
        let state = match self.gw.running_state(&login, None).await {
            Ok(s) => s,
            Err(msg) => {
                reply.reject(ChannelOpenFailure::Other { code: 2, reason: msg }).await;
                return Ok(());
            }
        };
        let connected = match self.gw.upstream.spawner() {
            Some(sp) => sp.connect(&state, port16).await,
            None => Err(berth_spawner::SpawnError::Failed("no spawner".into())),
        };
        let mut tcp = match connected {
            Ok(s) => s,
            Err(e) => {
                reply.reject(ChannelOpenFailure::Other { code: 2, reason: e.to_string() }).await;
                return Ok(());
            }
        };
        reply.accept().await;
        let traffic = self.traffic.clone();
        let user = login.user.clone();
        self.gw.tasks.spawn(async move {
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
