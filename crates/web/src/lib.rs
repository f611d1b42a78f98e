//! berth's web front: the hub's pages (server-rendered), its REST API in
//! JupyterHub's shapes, the OAuth2 provider single-user servers log in
//! through, and the server lifecycle those call into.
//!
//! It must not know SQL (it goes through `berth_store::Store`). Requests are
//! authenticated once, in [`caller::authenticate`], which also enforces the
//! XSRF rules; handlers receive a resolved [`caller::Caller`].
#![forbid(unsafe_code)]

pub mod accounts;
pub mod activity;
pub mod api;
pub mod apps;
pub mod caller;
pub mod cookies;
pub mod edge;
pub mod error;
pub mod html;
pub mod keys;
pub mod model;
pub mod oauth;
pub mod servers;
pub mod spawn;
pub mod tokens;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use berth_auth::{Secret, Signer};
use berth_store::Store;
use serde::{Deserialize, Serialize};

pub use error::{ApiError, ApiResult};

/// Failed log-ins of a name that does not exist: (count, last failure, locked until).
type UnknownFailures = (i64, Option<i64>, Option<i64>);

/// The `[hub]` section of berth's configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// URL prefix of everything berth serves; the hub lives at `<base_url>hub/`.
    pub base_url: String,
    /// The admin's user name: their own sign-up is authorized and made admin at once.
    pub admin: String,
    /// Largest request body the hub accepts, in bytes (proxied bodies are streamed and not limited).
    pub max_body_bytes: u64,
    /// Set `Secure` on cookies (berth turns this on when it serves TLS).
    pub secure_cookies: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config { base_url: "/".into(), admin: "admin".into(), max_body_bytes: 1024 * 1024, secure_cookies: false }
    }
}

/// Everything request handlers share.
pub struct Hub {
    pub cfg: Config,
    pub auth: berth_auth::Config,
    pub store: Store,
    pub signer: Signer,
    pub activity: Arc<activity::Activity>,
    pub servers: Arc<servers::Servers>,
    /// Password hashing threads: fewer than the cores, so a login storm
    /// leaves a core for every other request; few and long-lived, so their
    /// 19 MiB working memory is reused instead of piling up per thread.
    hashers: HashPool,
    /// `<base>hub/` and `<base>hub/api`, made once.
    prefixes: (String, String),
    /// Recently authenticated callers, by credential hash (see `caller::cached`).
    pub auth_cache: caller::AuthCache,
    /// Failed log-ins for names that do not exist, so they lock like real ones.
    unknown_failures: Mutex<HashMap<String, UnknownFailures>>,
}

pub type SharedHub = Arc<Hub>;

impl Hub {
    pub fn new(
        cfg: Config,
        auth: berth_auth::Config,
        store: Store,
        cookie_secret: &Secret,
        servers: Arc<servers::Servers>,
        activity: Arc<activity::Activity>,
    ) -> Hub {
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        let prefixes = (format!("{}hub/", cfg.base_url), format!("{}hub/api", cfg.base_url));
        Hub {
            prefixes,
            cfg,
            auth,
            store,
            signer: Signer::new(cookie_secret),
            activity,
            servers,
            hashers: HashPool::new(cores.saturating_sub(1).max(1)),
            unknown_failures: Mutex::new(HashMap::new()),
            auth_cache: caller::AuthCache::default(),
        }
    }

    /// `<base_url>hub/`
    pub fn hub_prefix(&self) -> &str {
        &self.prefixes.0
    }

    /// `<base_url>hub/api`
    pub fn api_prefix(&self) -> &str {
        &self.prefixes.1
    }

    /// Hashes a password off the async runtime.
    pub async fn hash_password(&self, password: String) -> ApiResult<String> {
        let cost = self.auth.hash_cost();
        self.hashers.run(move || berth_auth::password::hash(&password, cost)).await
    }

    /// Verifies a password off the async runtime; `None` hash spends the same time.
    pub async fn verify_password(&self, stored: Option<String>, password: String) -> ApiResult<berth_auth::Verified> {
        let cost = self.auth.hash_cost();
        self.hashers
            .run(move || match stored {
                Some(h) => berth_auth::password::verify(&h, &password, cost),
                None => {
                    berth_auth::password::verify_dummy(&password, cost);
                    berth_auth::Verified::Wrong
                }
            })
            .await
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// A few dedicated threads for password hashing.
struct HashPool {
    tx: Mutex<std::sync::mpsc::Sender<Job>>,
}

impl HashPool {
    fn new(threads: usize) -> HashPool {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new().name(format!("berth-hash-{i}")).spawn(move || loop {
                let job = match rx.lock() {
                    Ok(r) => r.recv_timeout(std::time::Duration::from_secs(10)),
                    Err(_) => return,
                };
                match job {
                    Ok(job) => job(),
                    // Idle: give the working memory back until the next log-in.
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => berth_auth::password::release_memory(),
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
                }
            });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start a password hashing thread");
            }
        }
        HashPool { tx: Mutex::new(tx) }
    }

    async fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> ApiResult<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(f());
        });
        self.tx
            .lock()
            .map_err(|_| ApiError::internal("hashing pool poisoned"))?
            .send(job)
            .map_err(|_| ApiError::internal("no password hashing thread is running"))?;
        rx.await.map_err(|_| ApiError::internal("a password hashing thread failed"))
    }
}

/// The hub's routes, under `<base_url>hub/`.
pub fn router(hub: SharedHub) -> Router {
    let max_body = hub.cfg.max_body_bytes as usize;
    let hub_routes = Router::new()
        .route("/", get(accounts::root))
        .route("/home", get(accounts::home))
        .route("/signup", get(accounts::signup_page).post(accounts::signup))
        .route("/login", get(accounts::login_page).post(accounts::login))
        .route("/logout", get(accounts::logout).post(accounts::logout))
        .route("/change-password", get(accounts::change_password_page).post(accounts::change_password))
        .route("/change-password/{name}", get(accounts::admin_password_page).post(accounts::admin_password))
        .route("/authorize", get(accounts::authorize_page))
        .route("/authorize/{name}", post(accounts::authorize_action))
        .route("/admin", get(accounts::admin_redirect))
        .route("/gpus/{id}", post(accounts::gpu_action))
        .route("/app-login", get(apps::app_login))
        .route("/keys", get(keys::page_own))
        .route("/keys/{user}", get(keys::page_user).post(keys::page_add))
        .route("/keys/{user}/{id}/delete", post(keys::page_delete))
        .route("/token", get(tokens::token_page).post(tokens::token_create))
        .route("/token/{id}/revoke", post(tokens::token_revoke))
        .route("/spawn", get(spawn::spawn_page).post(spawn::spawn_post))
        .route("/spawn/{user}", get(spawn::spawn_page_user).post(spawn::spawn_post_user))
        .route("/spawn/{user}/{server}", get(spawn::spawn_page_named).post(spawn::spawn_post_named))
        .route("/spawn-named", post(spawn::spawn_named_form))
        .route("/spawn-template", post(spawn::spawn_template_form))
        .route("/spawn-pending/{user}", get(spawn::pending_page))
        .route("/spawn-pending/{user}/{server}", get(spawn::pending_page_named))
        .route("/stop/{user}", post(spawn::stop_post))
        .route("/stop/{user}/{server}", post(spawn::stop_post_named))
        .route("/logs/{user}", get(spawn::logs_page))
        .route("/logs/{user}/{server}", get(spawn::logs_page_named))
        .route("/user/{*rest}", axum::routing::any(spawn::hub_user_redirect))
        .route("/api/", get(api::version))
        .nest("/api", api::router());
    let base = hub.cfg.base_url.clone();
    let mount = format!("{}hub", base);
    let mut app = Router::new()
        .nest(&mount, hub_routes)
        // Reached only when the proxy has no route: the server is not running.
        .route(&format!("{base}user/{{*rest}}"), axum::routing::any(spawn::not_running));
    if base != "/" {
        // `<base>` alone goes to the hub too.
        app = app.route(&base, get(accounts::root));
    } else {
        app = app.route("/", get(accounts::root));
    }
    app.fallback(api::not_found)
        .layer(axum::middleware::from_fn_with_state(hub.clone(), caller::authenticate))
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(hub)
}
