//! The composition root: the configuration tree, [`App::build`] (the one
//! place every part is wired together, shared by the binary and the tests;
//! [`App::build_with`] takes a spawner, for the failure-mode fakes), the
//! one edge every request passes (`edge`), the listeners (`listen`), the
//! hub as the SSH gateway's upstream, and the background jobs.
//!
//! It may depend on every other berth crate; none may depend on it but the
//! binary.
#![forbid(unsafe_code)]

pub mod config;
pub mod doctor;
mod edge;
mod jobs;
mod listen;
mod parts;
mod ssh_upstream;

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use berth_auth::Secret;
use berth_hub::activity::Activity;
use berth_hub::gpus::Gpus;
use berth_hub::{Hub, Servers};
use berth_proxy::tls::{CertSource, TlsState};
use berth_proxy::{Forwarder, ForwarderConfig, RouteTable};
use berth_spawner::Spawner;
use berth_store::Store;
use berth_web::SharedHub;
use http::HeaderValue;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

pub use config::{Config, ConfigError, Sources};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("the data directory {path} is not usable: {message}")]
    DataDir { path: String, message: String },
    #[error(
        "the cookie secret {path} is damaged ({message}); delete it to generate a new one (this logs everyone out)"
    )]
    Secret { path: String, message: String },
    #[error(transparent)]
    Store(#[from] berth_store::StoreError),
    #[error("cannot listen on {addr}: {message}")]
    Bind { addr: SocketAddr, message: String },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("cannot re-adopt recorded servers: {0}")]
    Reconcile(String),
    #[error("SSH gateway: {0}")]
    Ssh(String),
    #[error("templates: {0}")]
    Templates(String),
}

/// Prepares the data directory: exists, is writable.
pub fn prepare_data_dir(dir: &Path) -> Result<(), StartError> {
    let err = |message: String| StartError::DataDir { path: dir.display().to_string(), message };
    std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
    let probe = dir.join(".write-test");
    std::fs::write(&probe, b"ok").map_err(|e| err(format!("cannot write into it: {e}")))?;
    let _ = std::fs::remove_file(&probe);
    // Users' processes (the local spawner's accounts) may pass through to
    // their homes under `home/`, but not list or read anything here.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))
            .map_err(|e| err(format!("cannot set its permissions: {e}")))?;
    }
    Ok(())
}

/// The SQLite database and its journal files: readable by berth alone.
fn protect_database(config: &Config) {
    if !config.database_url.is_empty() {
        return;
    }
    #[cfg(unix)]
    for suffix in ["", "-wal", "-shm"] {
        use std::os::unix::fs::PermissionsExt;
        let p = config.data_dir.join(format!("berth.sqlite{suffix}"));
        if p.exists() {
            if let Err(e) = std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)) {
                tracing::warn!(path = %p.display(), error = %e, "cannot make the database readable by berth alone");
            }
        }
    }
}

/// Reads the cookie secret, generating it (mode 0600) on first start.
pub fn load_cookie_secret(dir: &Path) -> Result<Secret, StartError> {
    let path: PathBuf = dir.join("cookie_secret");
    let shown = path.display().to_string();
    match std::fs::read_to_string(&path) {
        Ok(s) => {
            let s = s.trim();
            if s.len() < 32 || !s.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err(StartError::Secret { path: shown, message: "expected at least 32 hex characters".into() });
            }
            Ok(Secret::new(s))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let secret = berth_auth::new_signing_key();
            let mut opts = std::fs::OpenOptions::new();
            opts.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
            let mut f =
                opts.open(&path).map_err(|e| StartError::DataDir { path: shown.clone(), message: e.to_string() })?;
            f.write_all(secret.expose().as_bytes())
                .and_then(|_| f.sync_all())
                .map_err(|e| StartError::DataDir { path: shown.clone(), message: e.to_string() })?;
            tracing::info!(path = %shown, "generated a new cookie secret");
            Ok(secret)
        }
        Err(e) => Err(StartError::Secret { path: shown, message: e.to_string() }),
    }
}

/// Opens the database the configuration names, preparing the data directory.
pub async fn open_store(config: &Config) -> Result<Store, StartError> {
    prepare_data_dir(&config.data_dir)?;
    let store = Store::open(&config.database_url()).await?;
    protect_database(config);
    Ok(store)
}

/// The hub alone, on the configured store and spawner, without listening:
/// what `berth user …` works through, so the CLI follows the same account
/// rules as the API and the pages.
pub async fn offline_hub(config: &Config) -> Result<SharedHub, StartError> {
    let store = open_store(config).await?;
    let secret = load_cookie_secret(&config.data_dir)?;
    let (spawner, _, _) = parts::build_spawner(config).await?;
    build_hub(config, store, &secret, spawner)
}

fn build_hub(
    config: &Config,
    store: Store,
    secret: &Secret,
    spawner: Arc<dyn Spawner>,
) -> Result<SharedHub, StartError> {
    let activity = Arc::new(Activity::default());
    let templates = parts::load_templates(config, spawner.runs_images())?;
    let mut servers = Servers::new(
        config.spawner.clone(),
        store.clone(),
        spawner,
        Arc::new(RouteTable::new()),
        activity.clone(),
        &config.hub.base_url,
        Gpus::new(config.gpu.clone(), store.clone()),
        templates,
    )
    .with_usage(config.usage.clone());
    // Checked with the configuration already; this is the same rule.
    servers.culler = berth_hub::cull::Culler::new(config.cull.clone())
        .map_err(|m| StartError::Unsupported(format!("cull.template_timeouts: {m}")))?;
    servers.updates = berth_hub::updates::Updates::new(&config.images, &config.docker.image)
        .map_err(|(k, m)| StartError::Unsupported(format!("{k}: {m}")))?;
    // Checked when the configuration was loaded.
    let allowed =
        config.metrics.parse().map_err(|m| StartError::Unsupported(format!("metrics.allowed_addresses: {m}")))?;
    let hub = Hub::new(config.hub.clone(), config.auth.clone(), store, secret, Arc::new(servers), activity)
        .with_metrics_allowed(allowed);
    Ok(Arc::new(hub))
}

/// Everything berth runs, wired together.
pub struct App {
    pub config: Config,
    pub hub: SharedHub,
    shared: Arc<Shared>,
    /// The network servers reach the hub on (Docker and Swarm spawners).
    hub_network: Option<Arc<dyn berth_spawner_docker::HubNetwork>>,
    /// The SSH gateway, unless `ssh.bind` is off.
    pub ssh: Option<Arc<berth_ssh::Gateway>>,
    /// berth's own machine's GPUs (configured or detected at start-up);
    /// the inventory adds other swarm nodes' to them.
    own_gpus: Vec<berth_hub::gpus::Gpu>,
}

/// berth's own GPUs and other nodes' (`node:device`, model).
fn with_node_gpus(own: &[berth_hub::gpus::Gpu], nodes: Vec<(String, String)>) -> Vec<berth_hub::gpus::Gpu> {
    let mut all = own.to_vec();
    all.extend(nodes.into_iter().map(|(id, name)| berth_hub::gpus::Gpu { id, name }));
    all
}

/// What each connection needs.
pub(crate) struct Shared {
    hub: SharedHub,
    router: Router,
    forwarder: Forwarder,
    routes: Arc<RouteTable>,
    user_prefix: String,
    hub_api_prefix: String,
    tls: Option<Arc<TlsState>>,
    hsts: Option<HeaderValue>,
    /// Open connections, capped.
    conns: Arc<listen::Conns>,
    /// TLS handshake and request-header time-out.
    client_timeout: Duration,
    /// The hub's own runtime: hub pages and the API run there (their
    /// tasks outlive the connection thread's request), proxied requests on
    /// the connection's thread.
    hub_runtime: tokio::runtime::Handle,
}

impl App {
    /// Builds berth from its configuration: the spawner it names.
    pub async fn build(config: Config) -> Result<App, StartError> {
        App::build_with(config, None).await
    }

    /// Builds berth with `spawner` instead of the configured one (tests hand
    /// in the failure-mode spawners this way).
    pub async fn build_with(mut config: Config, spawner: Option<Arc<dyn Spawner>>) -> Result<App, StartError> {
        let store = open_store(&config).await?;
        let secret = load_cookie_secret(&config.data_dir)?;
        let tls = if config.tls.enabled() {
            let source = if config.tls.cert.is_empty() {
                CertSource::Auto { dir: config.data_dir.join("tls"), names: parts::tls_names(&config) }
            } else {
                CertSource::Files { cert: config.tls.cert.clone().into(), key: config.tls.key.clone().into() }
            };
            let state = TlsState::load(source).map_err(|e| StartError::Tls(e.to_string()))?;
            config.hub.secure_cookies = true;
            Some(Arc::new(state))
        } else {
            None
        };
        let (spawner, docker, hub_network) = match spawner {
            Some(s) => (s, None, None),
            None => parts::build_spawner(&config).await?,
        };
        let hub = build_hub(&config, store, &secret, spawner)?;
        let own_gpus = parts::gpu_inventory(&config, docker.as_ref()).await;
        let node_gpus = match &hub_network {
            Some(n) if config.gpu.mode != 0 => n.node_gpus().await,
            _ => Vec::new(),
        };
        if !node_gpus.is_empty() {
            tracing::info!(count = node_gpus.len(), "GPUs on other swarm nodes");
        }
        hub.servers.gpus.set_inventory(with_node_gpus(&own_gpus, node_gpus));
        let ssh = if config.ssh.enabled() {
            let upstream = ssh_upstream::HubUpstream { hub: hub.clone(), auto_start: config.ssh.auto_start };
            let gw = berth_ssh::Gateway::new(config.ssh.clone(), &config.data_dir, Arc::new(upstream))
                .map_err(StartError::Ssh)?;
            Some(gw)
        } else {
            None
        };
        let router = berth_web::router(hub.clone());
        let forwarder = Forwarder::new(ForwarderConfig {
            connect_timeout: config.proxy.connect_timeout_seconds,
            response_timeout: config.proxy.response_timeout_seconds,
            ..ForwarderConfig::default()
        });
        let hsts = (tls.is_some() && config.tls.hsts_seconds > 0)
            .then(|| HeaderValue::from_str(&format!("max-age={}", config.tls.hsts_seconds)).ok())
            .flatten();
        let shared = Arc::new(Shared {
            routes: hub.servers.routes.clone(),
            hub: hub.clone(),
            router,
            forwarder,
            user_prefix: format!("{}user/", config.hub.base_url),
            hub_api_prefix: format!("{}hub/api", config.hub.base_url),
            tls,
            hsts,
            conns: listen::Conns::new(config.proxy.max_connections, config.proxy.max_connections_per_address),
            client_timeout: config.proxy.client_timeout_seconds,
            hub_runtime: tokio::runtime::Handle::current(),
        });
        Ok(App { config, hub, shared, hub_network, ssh, own_gpus })
    }

    /// The TLS certificate's fingerprint and CA (auto mode), when TLS is on.
    pub fn tls_info(&self) -> Option<(String, Option<String>)> {
        self.shared.tls.as_ref().map(|t| (t.fingerprint.clone(), t.ca_pem.clone()))
    }

    /// Binds the configured address, with a clear error when it is taken.
    pub async fn bind(&self) -> Result<TcpListener, StartError> {
        let addr = self.config.bind;
        TcpListener::bind(addr).await.map_err(|e| StartError::Bind {
            addr,
            message: match e.kind() {
                std::io::ErrorKind::AddrInUse => {
                    "the address is already in use (another berth or another program holds the port; pick another with --bind)".into()
                }
                std::io::ErrorKind::PermissionDenied => {
                    "permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)".into()
                }
                _ => e.to_string(),
            },
        })
    }

    /// Serves until `shutdown` is cancelled, then drains connections and
    /// writes what is buffered. Recorded servers are re-adopted and their
    /// routes restored before the first connection is accepted.
    pub async fn serve(self, listener: TcpListener, shutdown: CancellationToken) -> Result<(), StartError> {
        let local =
            listener.local_addr().map_err(|e| StartError::Bind { addr: self.config.bind, message: e.to_string() })?;
        let hub = self.hub.clone();
        hub.servers.set_api_url(format!("http://127.0.0.1:{}{}hub/api", local.port(), self.config.hub.base_url));
        hub.servers.templates.set_origin(self.shared.tls.is_some(), local.port());
        let (adopted, vanished) = hub.servers.reconcile().await.map_err(|e| StartError::Reconcile(e.to_string()))?;
        if adopted + vanished > 0 {
            tracing::info!(adopted, vanished, "servers reconciled");
        }
        let tasks = TaskTracker::new();
        jobs::spawn_all(&tasks, hub.clone(), self.shared.tls.clone(), shutdown.clone());

        let scheme = if self.shared.tls.is_some() { "https" } else { "http" };
        if let Some(t) = &self.shared.tls {
            let what = if t.ca_pem.is_some() {
                format!("certificate authority {}", self.config.data_dir.join("tls").join("ca.pem").display())
            } else {
                "certificate".to_string()
            };
            println!("berth TLS {what}, SHA-256 fingerprint {}", t.fingerprint);
        }
        if let Some(gw) = &self.ssh {
            let l = gw.bind().await.map_err(StartError::Ssh)?;
            let addr = l.local_addr().map_err(|e| StartError::Ssh(e.to_string()))?;
            println!("berth ssh listening on {addr}");
            tracing::info!(%addr, host_keys = %gw.host_key_summary(), "SSH gateway listening");
            let (gw, stop) = (gw.clone(), shutdown.clone());
            tasks.spawn(gw.serve(l, stop, Duration::from_secs(10)).instrument(tracing::info_span!("ssh-gateway")));
        }
        // Until the hub has had an admin: the one-time link that makes one.
        match hub.setup_code().await {
            Ok(Some(code)) => {
                let host =
                    if local.ip().is_unspecified() { format!("localhost:{}", local.port()) } else { local.to_string() };
                let url = format!("{scheme}://{host}{}setup?code={code}", hub.hub_prefix());
                println!("berth setup: no admin yet; open {url} to make one (or run `berth user add NAME --admin`)");
                tracing::warn!("no admin yet: open the setup link printed on standard output to make one");
            }
            Ok(None) => {}
            Err(e) => tracing::error!(error = %e, "cannot prepare the setup link"),
        }
        // The one line scripts and tests wait for.
        println!("berth listening on {scheme}://{local}");
        tracing::info!(%local, spawner = hub.servers.spawner_kind(), "listening");

        // Containers reach the hub through their network's gateway; when berth
        // listens on loopback only, it listens there too (once the engine answers).
        if let Some(d) = &self.hub_network {
            d.set_hub_port(local.port());
            if local.ip().is_loopback() && self.config.docker.hub_connect_url.is_empty() {
                let (d, shared, stop, t2) = (d.clone(), self.shared.clone(), shutdown.clone(), tasks.clone());
                tasks.spawn(
                    listen::gateway_listener(d.clone(), shared, stop, t2, local.port(), false)
                        .instrument(tracing::info_span!("gateway-listener")),
                );
                let (shared, stop, t2) = (self.shared.clone(), shutdown.clone(), tasks.clone());
                tasks.spawn(
                    listen::gateway_listener(d.clone(), shared, stop, t2, local.port(), true)
                        .instrument(tracing::info_span!("node-listener")),
                );
            }
            // Swarm nodes come and go, and with them their GPUs.
            if self.config.gpu.mode != 0 && self.config.spawner.kind == "swarm" && self.config.swarm.nodes == "labelled"
            {
                let (d, hub, stop, own) = (d.clone(), hub.clone(), shutdown.clone(), self.own_gpus.clone());
                tasks.spawn(async move {
                    loop {
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            _ = tokio::time::sleep(Duration::from_secs(30)) => {}
                        }
                        hub.servers.gpus.set_inventory(with_node_gpus(&own, d.node_gpus().await));
                    }
                });
            }
        }
        let mut threads = listen::ConnectionThreads::start(
            listener,
            self.config.proxy.threads,
            self.shared.clone(),
            shutdown.clone(),
            tasks.clone(),
            local.port(),
        )
        .map_err(|e| StartError::Bind { addr: self.config.bind, message: e })?;
        threads.accepting().await;
        tracing::info!("shutting down: draining connections");
        tasks.close();
        if tokio::time::timeout(Duration::from_secs(10), tasks.wait()).await.is_err() {
            tracing::warn!("some connections did not finish within 10 s; closing them");
        }
        if !hub.servers.drain(Duration::from_secs(10)).await {
            tracing::warn!("some server starts or stops did not finish within 10 s");
        }
        if self.config.spawner.stop_on_shutdown {
            tracing::info!("stopping every server (spawner.stop_on_shutdown)");
            hub.servers.stop_all().await;
        }
        if let Err(e) = hub.activity.flush(&hub.store).await {
            tracing::warn!(error = %e, "could not write the last activity times");
        }
        hub.store.close().await;
        threads.stop().await;
        tracing::info!("stopped");
        Ok(())
    }
}
