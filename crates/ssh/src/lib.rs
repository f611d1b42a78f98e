//! The SSH gateway: one port where `ssh alice@host` lands in alice's own
//! environment. berth's own SSH server (russh) authenticates by the public
//! keys users registered (`/hub/api/users/<name>/keys`), then runs each
//! channel through the spawner: Docker exec into the container, or a local
//! process. No sshd inside images, no per-container ports, no passwords.
//!
//! Routing: the SSH user `alice` is alice's default server, `alice+NAME` her
//! named server NAME. A stopped server is started (unless `auto_start` is
//! off) with its progress on the terminal.
//!
//! Must not depend on berth's store, hub or web crates: everything it asks
//! of the hub goes through its own [`Upstream`] trait (which rejects by
//! default), implemented by the server crate; it knows `berth-core` and
//! `berth-spawner` only.
#![forbid(unsafe_code)]

mod chan;
mod hostkeys;
mod process;
mod session;
mod upstream;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use russh::server::Config as RusshConfig;
use russh::{MethodKind, MethodSet};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

pub use hostkeys::HostKeys;
pub use upstream::{KeyLogin, SessionRecord, Upstream};

/// The `[ssh]` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where the gateway listens (`ADDR:PORT`), or `off`.
    pub bind: String,
    /// Start a stopped server when its user connects (progress on the terminal).
    pub auto_start: bool,
    /// Failed log-ins from one address before it is refused for `failure_window_seconds`.
    pub max_auth_failures: u32,
    #[serde(with = "berth_core::serde_secs")]
    pub failure_window_seconds: Duration,
    /// Host key types offered: any of `ed25519`, `ecdsa`, `rsa`.
    pub host_key_types: Vec<String>,
    /// Flow-control window per channel, in bytes (large windows keep bulk transfers fast).
    pub window_bytes: u32,
    /// Close connections idle this long (0: never).
    #[serde(with = "berth_core::serde_secs")]
    pub idle_timeout_seconds: Duration,
    /// Time a client has to log in after connecting (as sshd's LoginGraceTime).
    #[serde(with = "berth_core::serde_secs")]
    pub login_grace_seconds: Duration,
    /// How often an open session's key and account are checked again: a
    /// removed key or a withdrawn account ends its sessions within this.
    #[serde(with = "berth_core::serde_secs")]
    pub recheck_seconds: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            bind: "0.0.0.0:2222".into(),
            auto_start: true,
            max_auth_failures: 10,
            failure_window_seconds: Duration::from_secs(600),
            host_key_types: vec!["ed25519".into(), "ecdsa".into(), "rsa".into()],
            window_bytes: 16 * 1024 * 1024,
            idle_timeout_seconds: Duration::from_secs(3600),
            login_grace_seconds: Duration::from_secs(60),
            recheck_seconds: Duration::from_secs(5),
        }
    }
}

impl Config {
    pub fn enabled(&self) -> bool {
        !matches!(self.bind.trim(), "" | "off" | "none" | "false")
    }

    /// Checks what can be checked before binding.
    pub fn validate(&self) -> Result<(), String> {
        if self.enabled() && self.bind.parse::<SocketAddr>().is_err() {
            return Err(format!("ssh.bind must be ADDR:PORT or off, not {:?}", self.bind));
        }
        for t in &self.host_key_types {
            if !matches!(t.as_str(), "ed25519" | "ecdsa" | "rsa") {
                return Err(format!("ssh.host_key_types: unknown type {t:?} (ed25519, ecdsa, rsa)"));
            }
        }
        if self.host_key_types.is_empty() {
            return Err("ssh.host_key_types must name at least one type".into());
        }
        if self.window_bytes < 64 * 1024 {
            return Err("ssh.window_bytes must be at least 65536".into());
        }
        Ok(())
    }
}

/// Failed log-ins per source address.
#[derive(Default)]
struct Failures {
    by_addr: Mutex<HashMap<IpAddr, (u32, Instant)>>,
}

impl Failures {
    /// Seconds until `ip` may try again, if it is refused now.
    fn blocked_for(&self, ip: IpAddr, max: u32, window: Duration, now: Instant) -> Option<u64> {
        let mut m = self.by_addr.lock().ok()?;
        let (count, since) = *m.get(&ip)?;
        let elapsed = now.saturating_duration_since(since);
        if elapsed >= window {
            m.remove(&ip);
            return None;
        }
        (count >= max).then(|| (window - elapsed).as_secs().max(1))
    }

    fn record(&self, ip: IpAddr, window: Duration, now: Instant) {
        if let Ok(mut m) = self.by_addr.lock() {
            let e = m.entry(ip).or_insert((0, now));
            if now.saturating_duration_since(e.1) >= window {
                *e = (0, now);
            }
            e.0 += 1;
            // Bounded: forget the oldest addresses under a flood of sources.
            if m.len() > 100_000 {
                m.retain(|_, (_, t)| now.saturating_duration_since(*t) < window);
            }
        }
    }
}

pub struct Gateway {
    cfg: Config,
    upstream: Arc<dyn Upstream>,
    ssh: RwLock<Arc<RusshConfig>>,
    failures: Failures,
    /// Connections and their channels' processes, drained on shutdown.
    tasks: TaskTracker,
}

impl Gateway {
    /// Loads (or creates, once) the host keys under `data_dir`.
    pub fn new(cfg: Config, data_dir: &Path, upstream: Arc<dyn Upstream>) -> Result<Arc<Gateway>, String> {
        cfg.validate()?;
        let keys = HostKeys::load_or_create(data_dir, &cfg.host_key_types)?;
        let gw = Arc::new(Gateway {
            ssh: RwLock::new(Arc::new(russh_config(&cfg, keys.ready()))),
            cfg,
            upstream,
            failures: Failures::default(),
            tasks: TaskTracker::new(),
        });
        // Slow key types (RSA) are made in the background the first time and
        // offered once ready; the fast ones serve from the start.
        if let Some(pending) = keys.pending() {
            let weak = Arc::downgrade(&gw);
            std::thread::Builder::new()
                .name("berth-hostkey".into())
                .spawn(move || {
                    let all = pending.finish();
                    if let Some(gw) = weak.upgrade() {
                        let cfg = Arc::new(russh_config(&gw.cfg, all));
                        if let Ok(mut slot) = gw.ssh.write() {
                            *slot = cfg;
                        }
                        tracing::info!("SSH host keys ready: {}", gw.host_key_summary());
                    }
                })
                .map_err(|e| format!("cannot start the host key thread: {e}"))?;
        }
        Ok(gw)
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// `type fingerprint` of each host key offered, for the start-up log.
    pub fn host_key_summary(&self) -> String {
        let cfg = self.ssh.read().map(|c| c.clone());
        match cfg {
            Ok(c) => c
                .keys
                .iter()
                .map(|k| {
                    format!("{} {}", k.algorithm().as_str(), k.public_key().fingerprint(russh::keys::HashAlg::Sha256))
                })
                .collect::<Vec<_>>()
                .join(", "),
            Err(_) => String::new(),
        }
    }

    /// Binds the configured address, with a clear message when it cannot.
    pub async fn bind(&self) -> Result<TcpListener, String> {
        let addr = &self.cfg.bind;
        TcpListener::bind(addr).await.map_err(|e| match e.kind() {
            std::io::ErrorKind::AddrInUse => {
                format!("the SSH port {addr} is in use; set ssh.bind (--ssh-bind) to another address, or off")
            }
            std::io::ErrorKind::PermissionDenied => {
                format!("no permission to listen on {addr} (ports below 1024 need root or CAP_NET_BIND_SERVICE)")
            }
            _ => format!("cannot listen for SSH on {addr}: {e}"),
        })
    }

    /// Accepts connections until `shutdown`, then waits (up to `drain`)
    /// for the open ones to end.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: CancellationToken, drain: Duration) {
        loop {
            let (stream, peer) = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of descriptors and the like: pause rather than spin.
                        tracing::warn!(error = %e, "SSH accept failed");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                },
            };
            // A blocked address still gets the handshake, so the client can
            // show why (as an authentication banner); every log-in is refused.
            let blocked = self.failures.blocked_for(
                peer.ip(),
                self.cfg.max_auth_failures,
                self.cfg.failure_window_seconds,
                Instant::now(),
            );
            if let Some(secs) = blocked {
                tracing::warn!(peer = %peer, retry_in_s = secs, "SSH connection refused: too many failed log-ins");
            }
            let _ = stream.set_nodelay(true);
            let cfg = match self.ssh.read() {
                Ok(c) => c.clone(),
                Err(_) => continue,
            };
            let logged_in = Arc::new(Mutex::new(None));
            let handler = session::Conn::new(self.clone(), peer, blocked, logged_in.clone());
            let stop = shutdown.clone();
            let span = tracing::info_span!("ssh", %peer);
            let gw = self.clone();
            self.tasks.spawn(
                async move {
                    let grace = tokio::time::sleep(gw.cfg.login_grace_seconds);
                    let session = tokio::select! {
                        s = russh::server::run_stream(cfg, stream, handler) => match s {
                            Ok(s) => s,
                            Err(e) => return tracing::debug!(error = %e, "SSH handshake failed"),
                        },
                        _ = tokio::time::sleep(gw.cfg.login_grace_seconds) => {
                            return tracing::info!("SSH connection closed: no handshake within the log-in grace time");
                        }
                    };
                    let handle = session.handle();
                    let mut session = std::pin::pin!(session);
                    let mut grace = std::pin::pin!(grace);
                    let mut recheck = tokio::time::interval(gw.cfg.recheck_seconds.max(Duration::from_secs(1)));
                    let bye = |why: &'static str| {
                        let handle = handle.clone();
                        async move {
                            let _ = handle.disconnect(russh::Disconnect::ByApplication, why.into(), "en".into()).await;
                        }
                    };
                    let mut grace_over = false;
                    let logged = || logged_in.lock().ok().and_then(|l| l.clone());
                    loop {
                        tokio::select! {
                            r = session.as_mut() => {
                                if let Err(e) = r {
                                    tracing::debug!(error = %e, "SSH connection ended with an error");
                                }
                                return;
                            }
                            _ = stop.cancelled() => return bye("berth is shutting down").await,
                            _ = grace.as_mut(), if !grace_over => {
                                grace_over = true;
                                if logged().is_none() {
                                    tracing::info!("SSH connection closed: no log-in within the grace time");
                                    return bye("no log-in within the grace time").await;
                                }
                            }
                            _ = recheck.tick() => {
                                let Some(l) = logged() else { continue };
                                if gw.upstream.authenticate(&l.user, &l.fingerprint).await.is_none() {
                                    tracing::info!(user = %l.user, key = %l.fingerprint, "SSH session ended: its key or account was withdrawn");
                                    return bye("your key or account was withdrawn").await;
                                }
                            }
                        }
                    }
                }
                .instrument(span),
            );
        }
        self.tasks.close();
        if tokio::time::timeout(drain, self.tasks.wait()).await.is_err() {
            tracing::warn!("some SSH sessions did not end within {} s", drain.as_secs());
        }
    }

    /// The running server's spawner state, with the upstream's progress
    /// lines shown through `notices` while it starts.
    async fn running_state(&self, login: &chan::Login, notices: Option<&process::Notices>) -> Result<Value, String> {
        let (tx, mut rx) = mpsc::unbounded_channel::<String>();
        let wait = self.upstream.ensure_running(&login.user, &login.server, tx);
        let show = async {
            while let Some(line) = rx.recv().await {
                if let Some(n) = notices {
                    n.say(&line).await;
                }
            }
        };
        let (state, ()) = tokio::join!(wait, show);
        state
    }

    fn record_failure(&self, ip: IpAddr) {
        self.failures.record(ip, self.cfg.failure_window_seconds, Instant::now());
    }
}

fn russh_config(cfg: &Config, keys: Vec<russh::keys::PrivateKey>) -> RusshConfig {
    RusshConfig {
        server_id: russh::SshId::Standard(format!("SSH-2.0-berth_{}", berth_core::VERSION).into()),
        methods: MethodSet::from(&[MethodKind::PublicKey][..]),
        auth_rejection_time: Duration::from_millis(300),
        auth_rejection_time_initial: Some(Duration::ZERO),
        keys,
        window_size: cfg.window_bytes,
        maximum_packet_size: 65535,
        channel_buffer_size: 128,
        event_buffer_size: 64,
        max_auth_attempts: 10,
        inactivity_timeout: (!cfg.idle_timeout_seconds.is_zero()).then_some(cfg.idle_timeout_seconds),
        keepalive_interval: Some(Duration::from_secs(60)),
        keepalive_max: 3,
        nodelay: true,
        ..RusshConfig::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_block_after_the_limit_and_expire() {
        let f = Failures::default();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let other: IpAddr = "10.0.0.2".parse().unwrap();
        let window = Duration::from_millis(200);
        let t0 = Instant::now();
        assert_eq!(f.blocked_for(ip, 2, window, t0), None);
        f.record(ip, window, t0);
        assert_eq!(f.blocked_for(ip, 2, window, t0), None);
        f.record(ip, window, t0);
        assert!(f.blocked_for(ip, 2, window, t0).is_some());
        assert_eq!(f.blocked_for(other, 2, window, t0), None, "another address is not affected");
        let later = t0 + window + Duration::from_millis(1);
        assert_eq!(f.blocked_for(ip, 2, window, later), None, "the block ends with the window");
    }

    #[test]
    fn config_rejects_bad_values() {
        let ok = Config { bind: "127.0.0.1:0".into(), ..Config::default() };
        assert!(ok.validate().is_ok());
        assert!(Config { bind: "off".into(), ..Config::default() }.validate().is_ok());
        assert!(Config { bind: "localhost".into(), ..Config::default() }.validate().is_err());
        assert!(Config { host_key_types: vec!["dsa".into()], ..ok.clone() }.validate().is_err());
        assert!(Config { window_bytes: 10, ..ok }.validate().is_err());
    }
}
