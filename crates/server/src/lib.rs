//! The composition root: the configuration tree, [`App::build`] (the one
//! place every part is wired together, shared by the binary and the tests),
//! the listener, and the background jobs.
#![forbid(unsafe_code)]

pub mod config;
pub mod doctor;
mod jobs;

use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::Router;
use berth_auth::Secret;
use berth_proxy::tls::{CertSource, TlsState};
use berth_proxy::{contains_dot_segments, strip_cookies, Forwarder, ForwarderConfig, Peer, ProxyError, RouteTable};
use berth_spawner::local::LocalConfig;
use berth_spawner::{LocalSpawner, Spawner};
use berth_spawner_docker::DockerSpawner;
use berth_store::Store;
use berth_web::activity::Activity;
use berth_web::servers::{Gpu, Servers};
use berth_web::{Hub, SharedHub};
use http::{HeaderValue, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

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
    Ok(())
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
    Ok(Store::open(&config.database_url()).await?)
}

/// Everything berth runs, wired together.
pub struct App {
    pub config: Config,
    pub hub: SharedHub,
    shared: Arc<Shared>,
    docker: Option<Arc<DockerSpawner>>,
    /// The SSH gateway, unless `ssh.bind` is off.
    pub ssh: Option<Arc<berth_ssh::Gateway>>,
}

/// What each connection needs.
struct Shared {
    hub: SharedHub,
    router: Router,
    forwarder: Forwarder,
    routes: Arc<RouteTable>,
    user_prefix: String,
    hub_api_prefix: String,
    tls: Option<Arc<TlsState>>,
    hsts: Option<HeaderValue>,
}

/// The spawner the configuration asks for: `docker`, `local`, or `auto`
/// (Docker when its engine answers, else local).
async fn build_spawner(config: &Config) -> Result<(Arc<dyn Spawner>, Option<Arc<DockerSpawner>>), StartError> {
    let local = || -> Arc<dyn Spawner> {
        let cmd: Vec<String> = config.spawner.local_cmd.split_whitespace().map(str::to_string).collect();
        Arc::new(LocalSpawner::new(LocalConfig {
            cmd,
            data_dir: config.data_dir.clone(),
            provision: config.spawner.provision,
            provision_packages: vec!["jupyterhub".into(), "jupyterlab".into()],
        }))
    };
    match config.spawner.kind.as_str() {
        "local" => Ok((local(), None)),
        kind => {
            let docker = DockerSpawner::connect(config.docker.clone(), &config.hub.base_url);
            let answer = match &docker {
                Ok(d) => tokio::time::timeout(Duration::from_secs(5), d.ping()).await.unwrap_or_else(|_| {
                    Err(berth_spawner::SpawnError::Failed("the Docker engine did not answer within 5 s".into()))
                }),
                Err(e) => Err(berth_spawner::SpawnError::Failed(e.to_string())),
            };
            match (kind, docker, answer) {
                (_, Ok(d), Ok(version)) => {
                    tracing::info!(%version, "using the Docker spawner");
                    Ok((d.clone() as Arc<dyn Spawner>, Some(d)))
                }
                ("docker", Ok(d), Err(e)) => {
                    // Asked for explicitly: start anyway; spawns fail with a clear
                    // message until the engine answers.
                    tracing::warn!(error = %e, "the Docker engine does not answer now; servers cannot start until it does");
                    Ok((d.clone() as Arc<dyn Spawner>, Some(d)))
                }
                ("docker", Err(e), _) => Err(StartError::Unsupported(format!("cannot use the Docker spawner: {e}"))),
                (_, _, Err(e)) | (_, Err(e), _) => {
                    tracing::info!(reason = %e, "no Docker engine answers; using the local-process spawner");
                    Ok((local(), None))
                }
            }
        }
    }
}

/// The GPUs the hub may hand out: configured ids, or what detection finds.
async fn gpu_inventory(config: &Config, docker: Option<&Arc<DockerSpawner>>) -> Vec<Gpu> {
    let gpu = &config.gpu;
    if gpu.mode == 0 {
        return Vec::new();
    }
    let configured: Vec<Gpu> = gpu
        .devices
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .map(|d| Gpu { id: d.to_string(), name: "configured".into() })
        .collect();
    if !configured.is_empty() {
        tracing::info!(count = configured.len(), "GPUs from the configuration");
        return configured;
    }
    let (found, how) = match docker {
        Some(d) => {
            let det = d.detect_gpus(&gpu.probe_image).await;
            (det.devices.into_iter().map(|g| Gpu { id: g.id, name: g.name }).collect::<Vec<_>>(), det.how)
        }
        None => match tokio::process::Command::new("nvidia-smi").arg("-L").output().await {
            Ok(out) if out.status.success() => {
                let devs = berth_spawner_docker::gpu::parse_nvidia_smi_list(&String::from_utf8_lossy(&out.stdout));
                let n = devs.len();
                (
                    devs.into_iter().map(|g| Gpu { id: g.id, name: g.name }).collect(),
                    format!("nvidia-smi -L on the host: {n} GPU(s)"),
                )
            }
            _ => (Vec::new(), "no nvidia-smi on the host".to_string()),
        },
    };
    if found.is_empty() && gpu.mode == 1 {
        tracing::error!(%how, "GPU support is on (gpu.mode = 1) but no GPU was found; servers asking for GPUs will be refused");
    } else {
        tracing::info!(count = found.len(), %how, "GPU detection");
    }
    found
}

fn tls_names(config: &Config) -> Vec<String> {
    let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()];
    if let Ok(h) = std::fs::read_to_string("/etc/hostname") {
        let h = h.trim();
        if !h.is_empty() {
            names.push(h.to_string());
        }
    }
    let ip = config.bind.ip();
    if !ip.is_unspecified() {
        names.push(ip.to_string());
    }
    names.extend(config.tls.names.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_string));
    names.sort();
    names.dedup();
    names
}

/// The templates the hub offers: `templates.dir`, or the built-in catalog.
fn load_templates(config: &Config) -> Result<berth_web::apps::Apps, StartError> {
    let catalog = if config.templates.dir.is_empty() {
        berth_catalog::Catalog::builtin()
    } else {
        berth_catalog::Catalog::load(std::path::Path::new(&config.templates.dir))
    };
    let catalog =
        catalog.map_err(|p| StartError::Templates(p.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("; ")))?;
    let problems = berth_catalog::check::check(&catalog);
    if !problems.is_empty() {
        return Err(StartError::Templates(problems.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("; ")));
    }
    Ok(berth_web::apps::Apps::new(config.templates.clone(), catalog.hub_templates()))
}

impl App {
    pub async fn build(mut config: Config) -> Result<App, StartError> {
        let store = open_store(&config).await?;
        let secret = load_cookie_secret(&config.data_dir)?;
        let tls = if config.tls.enabled() {
            let source = if config.tls.cert.is_empty() {
                CertSource::Auto { dir: config.data_dir.join("tls"), names: tls_names(&config) }
            } else {
                CertSource::Files { cert: config.tls.cert.clone().into(), key: config.tls.key.clone().into() }
            };
            let state = TlsState::load(source).map_err(|e| StartError::Tls(e.to_string()))?;
            config.hub.secure_cookies = true;
            Some(Arc::new(state))
        } else {
            None
        };
        let (spawner, docker) = build_spawner(&config).await?;
        let routes = Arc::new(RouteTable::new());
        let activity = Arc::new(Activity::default());
        let servers = Servers::new(
            config.spawner.clone(),
            store.clone(),
            spawner,
            routes.clone(),
            activity.clone(),
            &config.hub.base_url,
        )
        .with_gpu_config(config.gpu.clone())
        .with_apps(load_templates(&config)?);
        servers.set_gpu_inventory(gpu_inventory(&config, docker.as_ref()).await);
        let servers = Arc::new(servers);
        let ssh = if config.ssh.enabled() {
            let gw = berth_ssh::Gateway::new(
                config.ssh.clone(),
                &config.data_dir,
                store.clone(),
                servers.clone(),
                config.hub.base_url.clone(),
            )
            .map_err(StartError::Ssh)?;
            Some(gw)
        } else {
            None
        };
        let hub = Arc::new(Hub::new(config.hub.clone(), config.auth.clone(), store, &secret, servers, activity));
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
            hub: hub.clone(),
            router,
            forwarder,
            routes,
            user_prefix: format!("{}user/", config.hub.base_url),
            hub_api_prefix: format!("{}hub/api", config.hub.base_url),
            tls,
            hsts,
        });
        Ok(App { config, hub, shared, docker, ssh })
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
        hub.servers.apps.set_origin(self.shared.tls.is_some(), local.port());
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
            tasks.spawn(async move {
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = gw.serve(l) => {}
                }
            });
        }
        // The one line scripts and tests wait for.
        println!("berth listening on {scheme}://{local}");
        tracing::info!(%local, spawner = hub.servers.spawner_kind(), "listening");

        // Containers reach the hub through their network's gateway; when berth
        // listens on loopback only, it listens there too (once the engine answers).
        if let Some(d) = &self.docker {
            d.set_hub_port(local.port());
            if local.ip().is_loopback() && self.config.docker.hub_connect_url.is_empty() {
                let (d, shared, stop, t2) = (d.clone(), self.shared.clone(), shutdown.clone(), tasks.clone());
                tasks.spawn(gateway_listener(d, shared, stop, t2, local.port()));
            }
        }
        accept_loop(listener, self.shared.clone(), shutdown.clone(), tasks.clone(), local.port(), false).await;
        tracing::info!("shutting down: draining connections");
        tasks.close();
        if tokio::time::timeout(Duration::from_secs(10), tasks.wait()).await.is_err() {
            tracing::warn!("some connections did not finish within 10 s; closing them");
        }
        if self.config.spawner.stop_on_shutdown {
            tracing::info!("stopping every server (spawner.stop_on_shutdown)");
            hub.servers.stop_all().await;
        }
        if let Err(e) = hub.activity.flush(&hub.store).await {
            tracing::warn!(error = %e, "could not write the last activity times");
        }
        hub.store.close().await;
        tracing::info!("stopped");
        Ok(())
    }
}

/// Listens on the Docker network's gateway (retrying until the engine
/// answers), then accepts there until shutdown.
async fn gateway_listener(
    d: Arc<DockerSpawner>,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    port: u16,
) {
    let mut warned = false;
    loop {
        let attempt = async {
            let gw = d.ensure_network().await.map_err(|e| e.to_string())?;
            let addr: SocketAddr = format!("{gw}:{port}").parse().map_err(|e| format!("gateway {gw}: {e}"))?;
            TcpListener::bind(addr).await.map(|l| (l, addr)).map_err(|e| format!("cannot listen on {addr}: {e}"))
        };
        match attempt.await {
            Ok((listener, addr)) => {
                tracing::info!(%addr, "also listening on the Docker network's gateway for containers");
                return accept_loop(listener, shared, shutdown, tasks, port, true).await;
            }
            Err(e) => {
                if !warned {
                    tracing::warn!(error = %e, "containers cannot reach the hub yet; retrying every 5 s");
                    warned = true;
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
}

/// Accepts until shutdown. `internal`: the listener for containers (on the
/// Docker gateway), whose hub API calls are served over plain HTTP under TLS.
async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    port: u16,
    internal: bool,
) {
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let (shared, stop) = (shared.clone(), shutdown.clone());
        tasks.spawn(async move {
            if let Err(e) = serve_connection(shared, stream, peer, port, stop, internal).await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
}

async fn serve_connection(
    shared: Arc<Shared>,
    stream: TcpStream,
    peer: SocketAddr,
    local_port: u16,
    stop: CancellationToken,
    internal: bool,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    match &shared.tls {
        Some(tls) if berth_proxy::tls::peek_is_tls(&stream).await? => {
            let acceptor = tls.acceptor();
            let stream = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await??;
            let p = Peer { addr: peer, tls: true, local_port };
            drive(shared, TokioIo::new(stream), p, stop, internal).await
        }
        _ => {
            let p = Peer { addr: peer, tls: false, local_port };
            drive(shared, TokioIo::new(stream), p, stop, internal).await
        }
    }
}

async fn drive<I>(
    shared: Arc<Shared>,
    io: I,
    peer: Peer,
    stop: CancellationToken,
    internal: bool,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let shared = shared.clone();
        async move { Ok::<_, Infallible>(handle(shared, req, peer, internal).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        // Bounded buffers keep memory flat with many streaming connections.
        .max_buf_size(64 * 1024)
        .header_read_timeout(Duration::from_secs(30))
        .serve_connection(io, svc)
        .with_upgrades();
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => r?,
        _ = stop.cancelled() => {
            // Finish the request in flight, then close.
            conn.as_mut().graceful_shutdown();
            conn.await?
        }
    }
    Ok(())
}

/// Where plain HTTP goes when TLS is on: the same URL over https. Loopback
/// calls to the hub API (local single-user servers) are served as they are.
fn https_redirect(req: &hyper::Request<Incoming>, local_port: u16) -> Response<Body> {
    let host = req
        .headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .unwrap_or_else(|| format!("localhost:{local_port}"));
    let path = req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let location = format!("https://{host}{path}");
    Response::builder()
        .status(StatusCode::PERMANENT_REDIRECT)
        .header(http::header::LOCATION, location.clone())
        .header(http::header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Body::from(format!("berth serves HTTPS on this port: {location}\n")))
        .unwrap_or_else(|_| Response::new(Body::empty()))
}

/// `internal`: the connection came in on the listener for containers.
async fn handle(shared: Arc<Shared>, mut req: hyper::Request<Incoming>, peer: Peer, internal: bool) -> Response<Body> {
    if shared.tls.is_some() && !peer.tls {
        let api_call =
            (internal || peer.addr.ip().is_loopback()) && req.uri().path().starts_with(&shared.hub_api_prefix);
        if !api_call {
            return https_redirect(&req, peer.local_port);
        }
    }
    let app_host = shared
        .hub
        .servers
        .apps
        .host_mode()
        .then(|| req.headers().get(http::header::HOST).and_then(|h| h.to_str().ok()).map(str::to_string))
        .flatten()
        .and_then(|h| shared.hub.servers.apps.parse_host(&h));
    let mut resp = if let Some((owner, server)) = app_host {
        host_proxy(&shared, req, peer, owner, server).await
    } else if req.uri().path().starts_with(&shared.user_prefix) {
        proxy(&shared, req, peer).await
    } else {
        req.extensions_mut().insert(ConnectInfo(peer.addr));
        shared.router.clone().oneshot(req.map(Body::new)).await.unwrap_or_else(|e| match e {})
    };
    if let (Some(h), true) = (&shared.hsts, peer.tls) {
        resp.headers_mut().insert(http::header::STRICT_TRANSPORT_SECURITY, h.clone());
    }
    resp
}

/// A request on an app's own host name (`host` routing).
async fn host_proxy(
    shared: &Arc<Shared>,
    req: hyper::Request<Incoming>,
    peer: Peer,
    owner: String,
    server: String,
) -> Response<Body> {
    let apps = &shared.hub.servers.apps;
    let host = apps.host_for(&owner, &server);
    if contains_dot_segments(req.uri().path()) {
        return berth_web::edge::bad_path();
    }
    let Some(route) = shared.routes.lookup_host(&host) else {
        let hub = apps.origin_of(&apps.cfg.app_domain);
        let body = format!("{server} of {owner} is not running; start it at {hub}{}home\n", shared.hub.hub_prefix());
        return Response::builder()
            .status(http::StatusCode::NOT_FOUND)
            .header(http::header::CONTENT_TYPE, "text/plain; charset=utf-8")
            .body(Body::from(body))
            .unwrap_or_else(|_| Response::new(Body::empty()));
    };
    let (parts, body) = req.into_parts();
    if parts.headers.contains_key(http::header::AUTHORIZATION) {
        // API clients with a token: the same check as on paths.
        if let Err(denied) = berth_web::edge::authorize(&shared.hub, &parts, &route.user, &route.server).await {
            return denied;
        }
    } else {
        let pq = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        match berth_web::apps::app_host_access(&shared.hub, &host, &owner, &server, pq, &parts.headers, peer.tls).await
        {
            berth_web::apps::AppHostAccess::Allowed(_) => {}
            berth_web::apps::AppHostAccess::Respond(r) => return r,
        }
    }
    let now = berth_store::now_ms();
    if route.touch(now) {
        shared.hub.activity.server(&route.user, &route.server, now);
    }
    let mut req = hyper::Request::from_parts(parts, body);
    strip_cookies(req.headers_mut(), berth_web::edge::STRIPPED_COOKIES);
    strip_cookies(req.headers_mut(), &[berth_web::apps::APP_COOKIE]);
    match shared.forwarder.forward(req, &route, peer).await {
        Ok(resp) => resp.map(Body::new),
        Err(e) => {
            tracing::warn!(user = %route.user, server = %route.server, error = %e, "proxy error");
            let body = serde_json::json!({"status": e.status().as_u16(), "message": e.to_string()}).to_string();
            Response::builder()
                .status(e.status())
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(Body::from(body))
                .unwrap_or_else(|_| Response::new(Body::empty()))
        }
    }
}

async fn proxy(shared: &Arc<Shared>, mut req: hyper::Request<Incoming>, peer: Peer) -> Response<Body> {
    let path = req.uri().path().to_string();
    if contains_dot_segments(&path) {
        return berth_web::edge::bad_path();
    }
    let Some(route) = shared.routes.lookup(&path) else {
        // No route: the hub answers (the server is not running).
        req.extensions_mut().insert(ConnectInfo(peer.addr));
        return shared.router.clone().oneshot(req.map(Body::new)).await.unwrap_or_else(|e| match e {});
    };
    let (parts, body) = req.into_parts();
    if let Err(denied) = berth_web::edge::authorize(&shared.hub, &parts, &route.user, &route.server).await {
        return denied;
    }
    let now = berth_store::now_ms();
    if route.touch(now) {
        shared.hub.activity.server(&route.user, &route.server, now);
    }
    let mut req = hyper::Request::from_parts(parts, body);
    strip_cookies(req.headers_mut(), berth_web::edge::STRIPPED_COOKIES);
    match shared.forwarder.forward(req, &route, peer).await {
        Ok(resp) => resp.map(Body::new),
        Err(e) => {
            if matches!(e, ProxyError::Refused { .. }) {
                let hub = shared.hub.clone();
                let (u, s) = (route.user.clone(), route.server.clone());
                tokio::spawn(async move { hub.servers.check(&u, &s).await });
            }
            tracing::warn!(user = %route.user, server = %route.server, error = %e, "proxy error");
            let status = e.status();
            let message = match &e {
                ProxyError::Refused { .. } => {
                    format!("{}'s server is not answering; berth is checking on it. Reload in a moment.", route.user)
                }
                other => other.to_string(),
            };
            let body = serde_json::json!({"status": status.as_u16(), "message": message}).to_string();
            Response::builder()
                .status(status)
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(Body::from(body))
                .unwrap_or_else(|_| Response::new(Body::empty()))
        }
    }
}
