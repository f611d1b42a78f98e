//! The composition root: the configuration tree, [`App::build`] (the one
//! place every part is wired together, shared by the binary and the tests),
//! the listener, and the background jobs.
#![forbid(unsafe_code)]

pub mod config;
mod jobs;

use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use berth_auth::Secret;
use berth_store::Store;
use berth_web::{Hub, SharedHub};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

pub use config::{Config, ConfigError, Sources};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("the data directory {path} is not usable: {message}")]
    DataDir { path: String, message: String },
    #[error("the cookie secret {path} is damaged ({message}); delete it to generate a new one (this logs everyone out)")]
    Secret { path: String, message: String },
    #[error(transparent)]
    Store(#[from] berth_store::StoreError),
    #[error("cannot listen on {addr}: {message}")]
    Bind { addr: SocketAddr, message: String },
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
            let mut f = opts.open(&path).map_err(|e| StartError::DataDir { path: shown.clone(), message: e.to_string() })?;
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
    router: Router,
}

impl App {
    pub async fn build(config: Config) -> Result<App, StartError> {
        let store = open_store(&config).await?;
        let secret = load_cookie_secret(&config.data_dir)?;
        let mut hub_cfg = config.hub.clone();
        hub_cfg.base_url = config.hub.base_url.clone();
        let hub = Arc::new(Hub::new(hub_cfg, config.auth.clone(), store, &secret));
        let router = berth_web::router(hub.clone());
        Ok(App { config, hub, router })
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
    /// writes what is buffered.
    pub async fn serve(self, listener: TcpListener, shutdown: CancellationToken) -> Result<(), StartError> {
        let local = listener.local_addr().map_err(|e| StartError::Bind { addr: self.config.bind, message: e.to_string() })?;
        let tasks = TaskTracker::new();
        jobs::spawn_all(&tasks, self.hub.clone(), shutdown.clone());

        // The one line scripts and tests wait for.
        println!("berth listening on http://{local}");
        tracing::info!(%local, "listening");

        loop {
            let (stream, peer) = tokio::select! {
                _ = shutdown.cancelled() => break,
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
            let router = self.router.clone();
            let svc = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
                req.extensions_mut().insert(ConnectInfo(peer));
                let router = router.clone();
                async move { Ok::<_, Infallible>(router.oneshot(req.map(axum::body::Body::new)).await.unwrap_or_else(|e| match e {})) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(30))
                .serve_connection(TokioIo::new(stream), svc)
                .with_upgrades();
            let stop = shutdown.clone();
            tasks.spawn(async move {
                let mut conn = std::pin::pin!(conn);
                let result = tokio::select! {
                    r = conn.as_mut() => r,
                    _ = stop.cancelled() => {
                        // Finish the request in flight, then close.
                        conn.as_mut().graceful_shutdown();
                        conn.await
                    }
                };
                if let Err(e) = result {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
            });
        }
        tracing::info!("shutting down: draining connections");
        drop(listener);
        tasks.close();
        if tokio::time::timeout(Duration::from_secs(10), tasks.wait()).await.is_err() {
            tracing::warn!("some connections did not finish within 10 s; closing them");
        }
        if let Err(e) = self.hub.activity.flush(&self.hub.store).await {
            tracing::warn!(error = %e, "could not write the last activity times");
        }
        self.hub.store.close().await;
        tracing::info!("stopped");
        Ok(())
    }
}
