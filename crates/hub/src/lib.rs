//! The hub core: everything berth decides about users and their servers,
//! in one place, for every front end. The server lifecycle (start as admit
//! → plan → launch, one teardown, one wait), GPUs, the template registry,
//! idle culling, progress, activity, identity (token or session → caller with scopes),
//! log-in, accounts, tokens, SSH keys, the OAuth provider's rules, and the
//! admin console (servers, sessions, the event log, the announcement).
//!
//! It must not know axum, hyper's server side or russh: the REST API and
//! pages (`berth-web`) and the SSH gateway (`berth-ssh`, through the server
//! crate) call in here, so each rule is written once.
#![forbid(unsafe_code)]

pub mod accounts;
pub mod activity;
pub mod adopted;
pub mod console;
pub mod cull;
pub mod error;
pub mod gpus;
pub mod identity;
pub mod keys;
pub mod login;
pub mod metrics;
pub mod nvml;
pub mod oauth;
pub mod progress;
pub mod servers;
pub mod setup;
pub mod telemetry;
pub mod templates;
pub mod tokens;
pub mod updates;
pub mod usage;

use std::sync::Arc;

use berth_auth::{Secret, Signer};
use berth_store::Store;
use serde::{Deserialize, Serialize};

pub use error::{HubError, HubResult, SelfAction};
pub use identity::{Actor, Caller, Identity, Via};
pub use progress::{ProgressEvent, ProgressLog};
pub use servers::{Servers, Settled, SpawnerState, UserOptions};

/// The `[hub]` section of berth's configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// URL prefix of everything berth serves; the hub lives at `<base_url>hub/`.
    pub base_url: String,
    /// The name the first admin's setup page suggests (nobody becomes admin
    /// by signing up with it: see `berth_hub::setup`).
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

/// The hub: what the front ends share.
pub struct Hub {
    pub cfg: Config,
    pub auth: berth_auth::Config,
    pub store: Store,
    pub activity: Arc<activity::Activity>,
    pub servers: Arc<Servers>,
    pub identity: Identity,
    pub login: login::Login,
    /// Visitors who agreed to log in to another user's server.
    pub consents: oauth::Consents,
    /// `<base>hub/` and `<base>hub/api`, made once.
    prefixes: (String, String),
    /// Addresses that may read `/hub/metrics` without a credential.
    metrics_allowed: Vec<berth_core::net::Cidr>,
    /// The announcement as last read or set (`None`: not read yet), so a
    /// page costs no database read for it; only this hub sets it.
    announcement: std::sync::RwLock<Option<Option<console::Announcement>>>,
}

impl Hub {
    pub fn new(
        cfg: Config,
        auth: berth_auth::Config,
        store: Store,
        cookie_secret: &Secret,
        servers: Arc<Servers>,
        activity: Arc<activity::Activity>,
    ) -> Hub {
        let prefixes = (format!("{}hub/", cfg.base_url), format!("{}hub/api", cfg.base_url));
        let identity =
            Identity::new(store.clone(), Signer::new(cookie_secret), activity.clone(), auth.session_max_age_seconds);
        Hub {
            prefixes,
            login: login::Login::new(auth.clone(), store.clone()),
            consents: oauth::Consents::default(),
            cfg,
            auth,
            store,
            activity,
            servers,
            identity,
            announcement: std::sync::RwLock::new(None),
            metrics_allowed: Vec::new(),
        }
    }

    /// `metrics.allowed_addresses`, parsed.
    pub fn with_metrics_allowed(mut self, allowed: Vec<berth_core::net::Cidr>) -> Hub {
        self.metrics_allowed = allowed;
        self
    }

    pub fn signer(&self) -> &Signer {
        self.identity.signer()
    }

    /// `<base_url>hub/`
    pub fn hub_prefix(&self) -> &str {
        &self.prefixes.0
    }

    /// `<base_url>hub/api`
    pub fn api_prefix(&self) -> &str {
        &self.prefixes.1
    }
}
