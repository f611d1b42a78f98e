//! The server lifecycle: start, readiness, stop, re-adoption and polling,
//! recorded in the store as one state machine (`berth_core::ServerState`)
//! and mirrored into the proxy's route table.
//!
//! Every transition goes through [`Servers::transition`], which checks the
//! move against the state machine and writes the record, so the store never
//! holds a state the machine does not allow.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use berth_auth::{hash_token, new_token};
use berth_core::{AppProtocol, RoutingMode, ScopeSet, ServerState, Transition};
use berth_proxy::{Route, RouteTable};
use berth_spawner::{Progress, SpawnSpec, Spawner, Status, StopGrace};
use berth_store::{now_ms, NewToken, OAuthClient, Server, Store, TokenKind};
use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::{broadcast, Semaphore};

use crate::activity::Activity;
use crate::model::server_url;

/// The `[spawner]` section of berth's configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `auto` (Docker when its engine answers, else local), `local` or `docker`.
    pub kind: String,
    /// The local spawner's command line.
    pub local_cmd: String,
    /// Provide `jupyterhub-singleuser` in a virtualenv under the data directory when it is not installed.
    pub provision: bool,
    /// Time from a start request until the server must answer.
    #[serde(with = "berth_core::serde_secs")]
    pub start_timeout_seconds: Duration,
    /// Seconds between SIGINT and SIGTERM, and between SIGTERM and SIGKILL, when stopping.
    #[serde(with = "berth_core::serde_secs")]
    pub stop_grace_seconds: Duration,
    /// Servers that may be starting at once.
    pub max_concurrent_starts: u32,
    /// Servers that may run at once on this hub; 0 means no limit.
    pub max_running: u32,
    /// Named servers a user may have besides the default one.
    pub max_named_servers: u32,
    /// Stop every server when berth shuts down (otherwise they keep running and are re-adopted).
    pub stop_on_shutdown: bool,
    /// Seconds between checks that running servers are still alive.
    #[serde(with = "berth_core::serde_secs")]
    pub poll_interval_seconds: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            kind: "auto".into(),
            local_cmd: "jupyterhub-singleuser".into(),
            provision: true,
            start_timeout_seconds: Duration::from_secs(120),
            stop_grace_seconds: Duration::from_secs(10),
            max_concurrent_starts: 20,
            max_running: 0,
            max_named_servers: 5,
            stop_on_shutdown: false,
            poll_interval_seconds: Duration::from_secs(30),
        }
    }
}

/// The `[gpu]` section of berth's configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GpuConfig {
    /// 0 off, 1 on, 2 auto-detect (ENABLE_GPU_SUPPORT).
    pub mode: u32,
    /// Comma-separated device ids to use instead of detection.
    pub devices: String,
    /// Image that runs `nvidia-smi -L` to detect GPUs (NVIDIA_AUTODETECT_IMAGE).
    pub probe_image: String,
    /// Most GPUs one server may ask for.
    pub max_per_server: u32,
}

impl Default for GpuConfig {
    fn default() -> Self {
        GpuConfig {
            mode: 2,
            devices: String::new(),
            probe_image: "nvidia/cuda:12.4.1-base-ubuntu22.04".into(),
            max_per_server: 8,
        }
    }
}

/// A GPU the hub may hand out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Gpu {
    pub id: String,
    pub name: String,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Refused(String),
    /// The server already runs (the page then sends the browser to it).
    #[error("{0}")]
    AlreadyRunning(String),
    /// A start is under way (the page then shows its progress).
    #[error("{0}")]
    PendingSpawn(String),
    /// Not enough GPUs: what users see, and what admins see.
    #[error("{public}")]
    NoGpus { public: String, detail: String },
    #[error("{0}")]
    Limit(String),
    #[error("{0}")]
    NotFound(String),
    /// The request itself is wrong (an unknown template, a GPU count out of range).
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] berth_store::StoreError),
}

/// One server's progress events, replayed to late subscribers.
pub struct ProgressLog {
    events: Mutex<Vec<Value>>,
    tx: broadcast::Sender<Value>,
}

impl ProgressLog {
    fn new() -> Arc<ProgressLog> {
        let (tx, _) = broadcast::channel(256);
        Arc::new(ProgressLog { events: Mutex::new(Vec::new()), tx })
    }

    fn push(&self, ev: Value) {
        if let Ok(mut e) = self.events.lock() {
            e.push(ev.clone());
        }
        let _ = self.tx.send(ev);
    }

    /// Events so far, and a receiver for the ones after them.
    pub fn subscribe(&self) -> (Vec<Value>, broadcast::Receiver<Value>) {
        let rx = self.tx.subscribe();
        let past = self.events.lock().map(|e| e.clone()).unwrap_or_default();
        (past, rx)
    }

    pub fn is_finished(ev: &Value) -> bool {
        ev.get("ready").and_then(|v| v.as_bool()).unwrap_or(false)
            || ev.get("failed").and_then(|v| v.as_bool()).unwrap_or(false)
    }
}

pub fn client_id(user: &str, server: &str) -> String {
    if server.is_empty() {
        format!("jupyterhub-user-{user}")
    } else {
        format!("jupyterhub-user-{user}-{server}")
    }
}

fn key(user: &str, server: &str) -> (String, String) {
    (user.to_string(), server.to_string())
}

fn describe(user: &str, server: &str) -> String {
    if server.is_empty() {
        user.to_string()
    } else {
        format!("{user}/{server}")
    }
}

pub struct Servers {
    pub cfg: Config,
    store: Store,
    spawner: Arc<dyn Spawner>,
    pub routes: Arc<RouteTable>,
    activity: Arc<Activity>,
    base_url: String,
    /// `http://127.0.0.1:<port><base>hub/api`, known once the listener is bound.
    api_url: RwLock<String>,
    busy: Mutex<HashSet<(String, String)>>,
    progress: Mutex<HashMap<(String, String), Arc<ProgressLog>>>,
    starts: Arc<Semaphore>,
    http: Client<HttpConnector, Empty<Bytes>>,
    pub gpu_cfg: GpuConfig,
    gpus: RwLock<Vec<Gpu>>,
    /// Serializes allocation, so concurrent starts never share an exclusive GPU.
    gpu_lock: tokio::sync::Mutex<()>,
    /// The templates users may start, and how their apps are routed.
    pub apps: crate::apps::Apps,
}

impl Servers {
    pub fn new(
        cfg: Config,
        store: Store,
        spawner: Arc<dyn Spawner>,
        routes: Arc<RouteTable>,
        activity: Arc<Activity>,
        base_url: &str,
    ) -> Servers {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        let starts = Arc::new(Semaphore::new(cfg.max_concurrent_starts.max(1) as usize));
        Servers {
            cfg,
            store,
            spawner,
            routes,
            activity,
            base_url: base_url.to_string(),
            api_url: RwLock::new(String::new()),
            busy: Mutex::new(HashSet::new()),
            progress: Mutex::new(HashMap::new()),
            starts,
            http: Client::builder(TokioExecutor::new()).build(connector),
            gpu_cfg: GpuConfig::default(),
            gpus: RwLock::new(Vec::new()),
            gpu_lock: tokio::sync::Mutex::new(()),
            apps: crate::apps::Apps::new(Default::default(), Vec::new()),
        }
    }

    pub fn with_apps(mut self, apps: crate::apps::Apps) -> Servers {
        self.apps = apps;
        self
    }

    /// The routing mode recorded for a server (in its user options).
    fn mode_of(user_options: &Value) -> RoutingMode {
        match user_options.get("routing").and_then(|r| r.as_str()) {
            Some("strip") => RoutingMode::Strip,
            Some("host") => RoutingMode::Host,
            _ => RoutingMode::Prefix,
        }
    }

    /// The route for a server that answers at `target`, and its public URL.
    fn route_for(&self, user: &str, server: &str, user_options: &Value, target: String) -> (Route, String) {
        let prefix = self.prefix(user, server);
        match Self::mode_of(user_options) {
            RoutingMode::Host => {
                let host = self.apps.host_for(user, server);
                let url = format!("{}/", self.apps.origin_of(&host));
                (Route::new(host, target, user.into(), server.into()).with_mode(RoutingMode::Host), url)
            }
            mode => (Route::new(prefix.clone(), target, user.into(), server.into()).with_mode(mode), prefix),
        }
    }

    fn remove_routes(&self, user: &str, server: &str) {
        self.routes.remove(&self.prefix(user, server));
        if self.apps.host_mode() {
            self.routes.remove(&self.apps.host_for(user, server));
        }
    }

    /// Checks a template choice in `user_options` and fills in its GPU count
    /// and routing mode.
    async fn plan_template(&self, user: &str, user_options: &mut Value) -> Result<(), StartError> {
        let Some(id) = user_options.get("template").and_then(|t| t.as_str()).map(str::to_string) else {
            return Ok(());
        };
        if let Some(allowed) = self.store.user_limits(user).await?.templates {
            if !allowed.contains(&id) {
                return Err(StartError::Refused(format!(
                    "{user} may not start the template {id:?}; allowed: {}",
                    if allowed.is_empty() { "none".to_string() } else { allowed.join(", ") }
                )));
            }
        }
        let t = self.apps.get(&id).ok_or_else(|| {
            let ids: Vec<&str> = self.apps.templates().iter().map(|t| t.id.as_str()).collect();
            StartError::Invalid(format!("no template {id:?} here; the choices are: {}", ids.join(", ")))
        })?;
        let gpus = match user_options.get("gpus") {
            // Unasked, the template's default — or its minimum on a hub without GPUs.
            None | Some(Value::Null) if self.gpu_inventory().is_empty() => t.gpus.min as u64,
            None | Some(Value::Null) => t.gpus.default as u64,
            Some(g) => g.as_u64().ok_or_else(|| StartError::Invalid("gpus must be a whole number".into()))?,
        };
        if gpus < t.gpus.min as u64 || gpus > t.gpus.max as u64 {
            return Err(StartError::Invalid(format!(
                "{} takes between {} and {} GPUs, not {gpus}",
                t.name, t.gpus.min, t.gpus.max
            )));
        }
        let mode = self.apps.mode_for(t).map_err(StartError::Invalid)?;
        if let Some(o) = user_options.as_object_mut() {
            o.insert("gpus".into(), json!(gpus));
            o.insert("routing".into(), json!(mode.as_str()));
        }
        Ok(())
    }

    pub fn with_gpu_config(mut self, cfg: GpuConfig) -> Servers {
        self.gpu_cfg = cfg;
        self
    }

    pub fn set_gpu_inventory(&self, gpus: Vec<Gpu>) {
        if let Ok(mut g) = self.gpus.write() {
            *g = gpus;
        }
    }

    pub fn gpu_inventory(&self) -> Vec<Gpu> {
        self.gpus.read().map(|g| g.clone()).unwrap_or_default()
    }

    /// Allocates `want` GPUs to a server, or says why not.
    async fn allocate_gpus(&self, user: &str, server: &str, want: usize) -> Result<Vec<String>, StartError> {
        if want == 0 {
            return Ok(Vec::new());
        }
        if self.gpu_cfg.mode == 0 {
            return Err(StartError::Refused(
                "GPUs are turned off on this hub (gpu.mode / ENABLE_GPU_SUPPORT is 0)".into(),
            ));
        }
        if want > self.gpu_cfg.max_per_server as usize {
            return Err(StartError::Refused(format!(
                "a server may ask for at most {} GPUs",
                self.gpu_cfg.max_per_server
            )));
        }
        let _one_at_a_time = self.gpu_lock.lock().await;
        let devices: Vec<String> = self.gpu_inventory().into_iter().map(|g| g.id).collect();
        let shared: std::collections::HashSet<String> = self.store.shared_gpus().await?.into_iter().collect();
        let held: Vec<(String, String)> =
            self.store.gpu_allocations().await?.into_iter().map(|(d, u, s)| (d, describe(&u, &s))).collect();
        match berth_core::gpu::allocate(&devices, &shared, &held, want) {
            Ok(ids) => {
                self.store.add_gpu_allocations(user, server, &ids).await?;
                Ok(ids)
            }
            Err(shortage) => Err(StartError::NoGpus { public: shortage.for_users(), detail: shortage.for_admins() }),
        }
    }

    async fn free_gpus(&self, user: &str, server: &str) {
        match self.store.free_gpus(user, server).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(server = %describe(user, server), count = n, "freed GPUs"),
            Err(e) => tracing::error!(server = %describe(user, server), error = %e, "could not free GPUs"),
        }
    }

    pub fn spawner_kind(&self) -> &'static str {
        self.spawner.kind()
    }

    pub fn set_api_url(&self, url: String) {
        if let Ok(mut u) = self.api_url.write() {
            *u = url;
        }
    }

    fn api_url(&self) -> String {
        self.api_url.read().map(|u| u.clone()).unwrap_or_default()
    }

    pub fn prefix(&self, user: &str, server: &str) -> String {
        server_url(&self.base_url, user, server)
    }

    pub fn progress_log(&self, user: &str, server: &str) -> Option<Arc<ProgressLog>> {
        self.progress.lock().ok().and_then(|m| m.get(&key(user, server)).cloned())
    }

    fn new_progress(&self, user: &str, server: &str) -> Arc<ProgressLog> {
        let log = ProgressLog::new();
        if let Ok(mut m) = self.progress.lock() {
            m.insert(key(user, server), log.clone());
        }
        log
    }

    fn claim(&self, user: &str, server: &str) -> bool {
        self.busy.lock().map(|mut b| b.insert(key(user, server))).unwrap_or(false)
    }

    fn release(&self, user: &str, server: &str) {
        if let Ok(mut b) = self.busy.lock() {
            b.remove(&key(user, server));
        }
    }

    /// Applies a transition and writes the record; illegal moves are refused.
    async fn transition(&self, s: &mut Server, t: Transition) -> Result<(), StartError> {
        let next = s.state.apply(t).map_err(|e| StartError::Refused(e.to_string()))?;
        s.state = next;
        self.store.put_server(s).await?;
        Ok(())
    }

    /// Requests a start. Returns once the start is under way; progress goes
    /// to the server's progress log, the outcome to the store.
    pub async fn start(self: &Arc<Self>, user: &str, server: &str, user_options: Value) -> Result<(), StartError> {
        let t0 = std::time::Instant::now();
        let r = self.start_inner(user, server, user_options).await;
        tracing::debug!(server = %describe(user, server), prepare_ms = t0.elapsed().as_secs_f64() * 1000.0, "start prepared");
        r
    }

    async fn start_inner(self: &Arc<Self>, user: &str, server: &str, user_options: Value) -> Result<(), StartError> {
        let what = describe(user, server);
        let mut user_options = if user_options.is_object() { user_options } else { json!({}) };
        self.plan_template(user, &mut user_options).await?;
        let owner =
            self.store.get_user(user).await?.ok_or_else(|| StartError::NotFound(format!("No such user: {user}")))?;
        if !owner.authorized {
            return Err(StartError::Refused(format!("{user} is not authorized")));
        }
        if !self.claim(user, server) {
            return Err(StartError::Refused(format!("{what} is pending, try again once it has finished")));
        }
        let result = self.start_claimed(user, server, user_options).await;
        if result.is_err() {
            self.release(user, server);
        }
        result
    }

    async fn start_claimed(self: &Arc<Self>, user: &str, server: &str, user_options: Value) -> Result<(), StartError> {
        let what = describe(user, server);
        let record = self.store.get_server(user, server).await?.unwrap_or_else(|| Server::new(user, server));
        match record.state {
            ServerState::Running => return Err(StartError::AlreadyRunning(format!("{what} is already running"))),
            ServerState::Starting => return Err(StartError::PendingSpawn(format!("{what} is pending spawn"))),
            ServerState::Stopping => return Err(StartError::Refused(format!("{what} is pending stop"))),
            ServerState::Stopped => {}
        }
        if !server.is_empty() && self.store.get_server(user, server).await?.is_none() {
            let servers = self.store.list_servers(Some(user)).await?;
            let named: Vec<&str> = servers.iter().filter(|s| !s.name.is_empty()).map(|s| s.name.as_str()).collect();
            let limit = self.store.user_limits(user).await?.max_named_servers.unwrap_or(self.cfg.max_named_servers);
            if named.len() as u32 >= limit {
                return Err(StartError::Limit(format!(
                    "{user} already has {} named servers ({}; the limit is {limit}); delete one first",
                    named.len(),
                    named.join(", ")
                )));
            }
        }
        if self.cfg.max_running > 0 && self.store.count_active_servers().await? >= self.cfg.max_running as i64 {
            return Err(StartError::Limit(format!(
                "this hub runs its maximum of {} servers; try again when one stops",
                self.cfg.max_running
            )));
        }
        let permit = self.starts.clone().try_acquire_owned().map_err(|_| {
            StartError::Limit(format!(
                "{} servers are starting at once, the most this hub allows; try again in a moment",
                self.cfg.max_concurrent_starts
            ))
        })?;

        let want = user_options.get("gpus").and_then(|g| g.as_u64()).unwrap_or(0) as usize;
        let gpus = self.allocate_gpus(user, server, want).await?;
        match self.prepare_start(user, server, record, user_options, gpus.clone(), permit).await {
            Ok(()) => Ok(()),
            Err(e) => {
                self.free_gpus(user, server).await;
                Err(e)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn prepare_start(
        self: &Arc<Self>,
        user: &str,
        server: &str,
        mut record: Server,
        user_options: Value,
        gpus: Vec<String>,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) -> Result<(), StartError> {
        let what = describe(user, server);
        // The server's own credentials: an API token and an OAuth client.
        let secret = new_token();
        let cid = client_id(user, server);
        self.store.delete_server_tokens(user, server, &cid).await?;
        self.store
            .create_token(&NewToken {
                hash: hash_token(secret.expose()),
                user: user.to_string(),
                kind: TokenKind::Server,
                server: Some(server.to_string()),
                scopes: ScopeSet::for_server(user, server).to_strings(),
                note: format!("server {what}"),
                expires_at: None,
                session_id: None,
                oauth_client: None,
            })
            .await?;
        let prefix = self.prefix(user, server);
        self.store
            .put_oauth_client(&OAuthClient {
                id: cid.clone(),
                secret_hash: hash_token(secret.expose()),
                redirect_uri: format!("{prefix}oauth_callback"),
                user: user.to_string(),
                server: server.to_string(),
            })
            .await?;

        record.last_error = None;
        record.started = Some(now_ms());
        record.last_activity = None;
        record.url = None;
        record.spawner_state = "{}".into();
        record.user_options = user_options.to_string();
        if let Some(t) = user_options.get("template").and_then(|t| t.as_str()) {
            record.template = t.to_string();
        }
        self.transition(&mut record, Transition::Start).await?;
        let log = self.new_progress(user, server);
        log.push(json!({"progress": 0, "message": "Server requested"}));
        let _ = self.store.add_event(user, "start", &what, "").await;

        let api = self.api_url();
        let access = json!([format!("access:servers!server={user}/{server}"), format!("access:servers!user={user}")])
            .to_string();
        let mut env = BTreeMap::new();
        for (k, v) in [
            ("JUPYTERHUB_API_TOKEN", secret.expose().to_string()),
            ("JPY_API_TOKEN", secret.expose().to_string()),
            ("JUPYTERHUB_CLIENT_ID", cid),
            ("JUPYTERHUB_API_URL", api.clone()),
            ("JUPYTERHUB_ACTIVITY_URL", format!("{api}/users/{user}/activity")),
            ("JUPYTERHUB_BASE_URL", self.base_url.clone()),
            ("JUPYTERHUB_SERVICE_PREFIX", prefix.clone()),
            ("JUPYTERHUB_USER", user.to_string()),
            ("JUPYTERHUB_SERVER_NAME", server.to_string()),
            ("JUPYTERHUB_OAUTH_CALLBACK_URL", format!("{prefix}oauth_callback")),
            ("JUPYTERHUB_OAUTH_ACCESS_SCOPES", access.clone()),
            ("JUPYTERHUB_OAUTH_SCOPES", access),
            ("JUPYTERHUB_OAUTH_CLIENT_ALLOWED_SCOPES", "[]".into()),
            ("JUPYTERHUB_HOST", String::new()),
            ("JUPYTERHUB_PUBLIC_URL", String::new()),
            ("JUPYTERHUB_PUBLIC_HUB_URL", String::new()),
            ("JUPYTERHUB_COOKIE_HOST_PREFIX_ENABLED", "0".into()),
        ] {
            env.insert(k.to_string(), v);
        }
        let mut spec = SpawnSpec {
            user: user.to_string(),
            server: server.to_string(),
            env,
            cmd: Vec::new(),
            prefix: prefix.clone(),
            template: record.template.clone(),
            image: user_options.get("image").and_then(|i| i.as_str()).map(str::to_string),
            gpus,
            port: None,
        };
        // The single-user server answers under its prefix at `<prefix>api`.
        let mut probe = Some(format!("{prefix}api"));
        let template = user_options.get("template").and_then(|t| t.as_str()).and_then(|id| self.apps.get(id));
        if let Some(t) = template {
            let mode = Self::mode_of(&user_options);
            let base = if mode == RoutingMode::Prefix { prefix.clone() } else { "/".to_string() };
            spec.template = t.id.clone();
            spec.image = Some(t.image.clone());
            spec.cmd = t.cmd.iter().map(|a| a.replace("{base_url}", &base)).collect();
            spec.port = Some(t.port);
            if t.protocol != AppProtocol::Jupyter {
                // Plain apps get no hub credentials, only who and where they are.
                spec.env.retain(|k, _| matches!(k.as_str(), "JUPYTERHUB_USER" | "JUPYTERHUB_SERVER_NAME"));
                spec.env.insert("BERTH_BASE_URL".into(), base.clone());
            }
            for (k, v) in &t.env {
                spec.env.insert(k.clone(), v.replace("{base_url}", &base));
            }
            probe = match t.protocol {
                AppProtocol::Jupyter => Some(format!("{prefix}api")),
                AppProtocol::Http => Some(base),
                AppProtocol::None => None,
            };
        }
        let me = self.clone();
        tokio::spawn(async move {
            let _permit = permit;
            me.run_start(record, spec, probe, log).await;
        });
        Ok(())
    }

    async fn run_start(
        self: Arc<Self>,
        mut record: Server,
        spec: SpawnSpec,
        probe: Option<String>,
        log: Arc<ProgressLog>,
    ) {
        let user = record.user.clone();
        let server = record.name.clone();
        let what = describe(&user, &server);
        let deadline = tokio::time::Instant::now() + self.cfg.start_timeout_seconds;
        let outcome = self.spawn_and_wait(&mut record, spec, probe, &log, deadline).await;
        match outcome {
            Ok(target) => {
                let t_finish = std::time::Instant::now();
                let opts: Value = serde_json::from_str(&record.user_options).unwrap_or(Value::Null);
                let (route, url) = self.route_for(&user, &server, &opts, target);
                self.routes.insert(route);
                record.url = Some(url.clone());
                if let Err(e) = self.transition(&mut record, Transition::Ready).await {
                    tracing::error!(server = %what, error = %e, "could not record the ready server");
                }
                log.push(json!({
                    "progress": 100,
                    "ready": true,
                    "message": format!("Server ready at {url}"),
                    "html_message": format!("Server ready at <a href=\"{url}\">{url}</a>"),
                    "url": url,
                }));
                tracing::info!(server = %what, finish_ms = t_finish.elapsed().as_secs_f64() * 1000.0, "server ready");
            }
            Err(reason) => {
                tracing::warn!(server = %what, %reason, "server failed to start");
                if let Ok(state) = serde_json::from_str::<Value>(&record.spawner_state) {
                    if state.as_object().is_some_and(|o| !o.is_empty()) {
                        let _ = self.spawner.stop(&state, self.grace()).await;
                    }
                }
                let _ = self.store.delete_server_tokens(&user, &server, &client_id(&user, &server)).await;
                let _ = self.store.delete_oauth_client(&client_id(&user, &server)).await;
                self.free_gpus(&user, &server).await;
                record.last_error = Some(reason.clone());
                record.url = None;
                if let Err(e) = self.transition(&mut record, Transition::Fail).await {
                    tracing::error!(server = %what, error = %e, "could not record the failed start");
                }
                let _ = self.store.add_event(&user, "start-failed", &what, &reason).await;
                log.push(json!({"progress": 100, "failed": true, "message": format!("Spawn failed: {reason}")}));
            }
        }
        self.release(&user, &server);
    }

    async fn spawn_and_wait(
        &self,
        record: &mut Server,
        spec: SpawnSpec,
        probe: Option<String>,
        log: &Arc<ProgressLog>,
        deadline: tokio::time::Instant,
    ) -> Result<String, String> {
        let timeout = self.cfg.start_timeout_seconds.as_secs();
        let (ptx, mut prx) = tokio::sync::mpsc::unbounded_channel::<Progress>();
        let fwd_log = log.clone();
        let forwarder = tokio::spawn(async move {
            while let Some(p) = prx.recv().await {
                fwd_log.push(json!({"progress": p.progress.min(99), "message": p.message}));
            }
        });
        log.push(json!({"progress": 10, "message": "Spawning server..."}));
        let started = match tokio::time::timeout_at(deadline, self.spawner.start(spec.clone(), ptx)).await {
            Err(_) => return Err(format!("the server did not start within {timeout} s")),
            Ok(Err(e)) => return Err(e.to_string()),
            Ok(Ok(s)) => s,
        };
        forwarder.abort();
        record.spawner_state = started.state.to_string();
        if let Err(e) = self.store.put_server(record).await {
            return Err(format!("could not record the server: {e}"));
        }
        log.push(json!({"progress": 50, "message": "Waiting for the server to answer..."}));
        let Some(probe) = probe else {
            // Nothing answers HTTP (an SSH-only environment): running is ready.
            return match self.spawner.poll(&started.state).await {
                Ok(Status::Running) => Ok(started.target),
                Ok(Status::Exited(why)) => Err(why),
                Err(e) => Err(e.to_string()),
            };
        };
        let probe = format!("{}{probe}", started.target);
        let mut delay = Duration::from_millis(100);
        loop {
            if let Ok(Ok(resp)) = tokio::time::timeout(
                Duration::from_secs(5),
                self.http.get(probe.parse().map_err(|e| format!("bad target {probe}: {e}"))?),
            )
            .await
            {
                if resp.status().as_u16() < 500 {
                    return Ok(started.target);
                }
            }
            match self.spawner.poll(&started.state).await {
                Ok(Status::Exited(why)) => {
                    let tail = self
                        .spawner
                        .logs(&spec.user, &spec.server)
                        .await
                        .map(|l| last_lines(&l, 3))
                        .unwrap_or_default();
                    return Err(if tail.is_empty() { why } else { format!("{why}; its last output: {tail}") });
                }
                Ok(Status::Running) => {}
                Err(e) => return Err(e.to_string()),
            }
            if tokio::time::Instant::now() + delay > deadline {
                return Err(format!("the server did not answer at {probe} within {timeout} s"));
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(1));
        }
    }

    fn grace(&self) -> StopGrace {
        StopGrace { interrupt: self.cfg.stop_grace_seconds, terminate: self.cfg.stop_grace_seconds }
    }

    /// Stops a server. Returns `true` when it finished within `wait`, `false`
    /// when it goes on in the background.
    pub async fn stop(self: &Arc<Self>, user: &str, server: &str, wait: Duration) -> Result<bool, StartError> {
        let what = describe(user, server);
        let record = self
            .store
            .get_server(user, server)
            .await?
            .ok_or_else(|| StartError::NotFound(format!("{what} has no server")))?;
        match record.state {
            ServerState::Stopped => return Ok(true),
            ServerState::Stopping => return Ok(false),
            ServerState::Starting | ServerState::Running => {}
        }
        let me = self.clone();
        let user_s = user.to_string();
        let server_s = server.to_string();
        let task = tokio::spawn(async move { me.stop_now(&user_s, &server_s, "stop").await });
        match tokio::time::timeout(wait, task).await {
            Ok(Ok(r)) => r.map(|_| true),
            Ok(Err(e)) => Err(StartError::Refused(format!("stopping {what} failed: {e}"))),
            Err(_) => Ok(false),
        }
    }

    async fn stop_now(&self, user: &str, server: &str, why: &str) -> Result<(), StartError> {
        let what = describe(user, server);
        let Some(mut record) = self.store.get_server(user, server).await? else { return Ok(()) };
        if record.state == ServerState::Stopped {
            return Ok(());
        }
        // The route goes first: nothing reaches a server that is going away.
        self.remove_routes(user, server);
        if record.state != ServerState::Stopping {
            self.transition(&mut record, Transition::Stop).await?;
        }
        if let Ok(state) = serde_json::from_str::<Value>(&record.spawner_state) {
            if state.as_object().is_some_and(|o| !o.is_empty()) {
                if let Err(e) = self.spawner.stop(&state, self.grace()).await {
                    tracing::warn!(server = %what, error = %e, "stopping failed; marking it stopped anyway");
                }
            }
        }
        self.store.delete_server_tokens(user, server, &client_id(user, server)).await?;
        self.store.delete_oauth_client(&client_id(user, server)).await?;
        self.free_gpus(user, server).await;
        record.url = None;
        self.transition(&mut record, Transition::Stopped).await?;
        self.activity.server(user, server, now_ms());
        let _ = self.store.add_event(user, why, &what, "").await;
        tracing::info!(server = %what, "server stopped");
        Ok(())
    }

    /// Records a server found dead, with the reason.
    async fn mark_vanished(&self, mut record: Server, reason: &str) {
        let what = describe(&record.user, &record.name);
        self.remove_routes(&record.user, &record.name);
        let cid = client_id(&record.user, &record.name);
        let _ = self.store.delete_server_tokens(&record.user, &record.name, &cid).await;
        let _ = self.store.delete_oauth_client(&cid).await;
        self.free_gpus(&record.user, &record.name).await;
        record.last_error = Some(reason.to_string());
        record.url = None;
        if let Err(e) = self.transition(&mut record, Transition::Vanished).await {
            tracing::warn!(server = %what, error = %e, "could not record the vanished server");
        }
        let _ = self.store.add_event(&record.user, "vanished", &what, reason).await;
        tracing::warn!(server = %what, %reason, "server is gone");
    }

    /// The spawner, for the SSH gateway's sessions and forwards.
    pub fn spawner(&self) -> Arc<dyn Spawner> {
        self.spawner.clone()
    }

    /// The server's lifecycle state and saved spawner state (`None` when it has no record).
    pub async fn state_of(&self, user: &str, server: &str) -> Result<Option<(ServerState, Value)>, StartError> {
        Ok(self.store.get_server(user, server).await?.map(|r| {
            let state = serde_json::from_str(&r.spawner_state).unwrap_or(Value::Null);
            (r.state, state)
        }))
    }

    /// Checks one server now (the proxy found its target refusing connections).
    pub async fn check(&self, user: &str, server: &str) {
        if self.busy.lock().map(|b| b.contains(&key(user, server))).unwrap_or(true) {
            return;
        }
        let Ok(Some(record)) = self.store.get_server(user, server).await else { return };
        if record.state != ServerState::Running {
            return;
        }
        let Ok(state) = serde_json::from_str::<Value>(&record.spawner_state) else { return };
        if let Ok(Status::Exited(why)) = self.spawner.poll(&state).await {
            self.mark_vanished(record, &why).await;
        }
    }

    /// At start-up, before the listener accepts: re-adopt what still runs,
    /// restore its routes, and mark what vanished as stopped.
    pub async fn reconcile(self: &Arc<Self>) -> Result<(usize, usize), StartError> {
        let (mut adopted, mut vanished) = (0, 0);
        for record in self.store.list_servers(None).await? {
            if record.state == ServerState::Stopped {
                continue;
            }
            let state: Value = serde_json::from_str(&record.spawner_state).unwrap_or_else(|_| json!({}));
            tracing::debug!(server = %describe(&record.user, &record.name), state = %record.state, "reconciling");
            let status = if state.as_object().is_some_and(|o| !o.is_empty()) {
                self.spawner.poll(&state).await.unwrap_or_else(|e| Status::Exited(e.to_string()))
            } else {
                Status::Exited("it had not started when berth stopped".into())
            };
            match (status, self.spawner.target(&state)) {
                (Status::Running, Some(target)) if record.state != ServerState::Stopping => {
                    let opts: Value = serde_json::from_str(&record.user_options).unwrap_or(Value::Null);
                    let (route, url) = self.route_for(&record.user, &record.name, &opts, target);
                    self.routes.insert(route);
                    let mut record = record;
                    if record.state == ServerState::Starting {
                        record.url = Some(url);
                        let _ = self.transition(&mut record, Transition::Ready).await;
                    }
                    tracing::info!(server = %describe(&record.user, &record.name), "re-adopted a running server");
                    adopted += 1;
                }
                (Status::Running, _) => {
                    // It was stopping: finish the job.
                    let _ = self.stop_now(&record.user, &record.name, "stop").await;
                    vanished += 1;
                }
                (Status::Exited(why), _) => {
                    self.mark_vanished(record, &format!("stopped while berth was not running: {why}")).await;
                    vanished += 1;
                }
            }
        }
        // Containers labelled as berth's that no active record claims are
        // reported, never deleted: they may hold someone's work.
        let active: std::collections::HashSet<(String, String)> = self
            .store
            .list_servers(None)
            .await?
            .into_iter()
            .filter(|s| s.state.is_active())
            .map(|s| (s.user, s.name))
            .collect();
        for (user, server, handle) in self.spawner.list_managed().await {
            if !active.contains(&(user.clone(), server.clone())) {
                tracing::warn!(
                    server = %describe(&user, &server),
                    handle = %handle,
                    "found a server berth started but has no record of; left as it is (remove it by hand if it is not needed)"
                );
            }
        }
        Ok((adopted, vanished))
    }

    /// One round of the poll job: running servers that died are marked stopped.
    pub async fn poll_all(&self) {
        let Ok(records) = self.store.list_servers(None).await else { return };
        for r in records.into_iter().filter(|r| r.state == ServerState::Running) {
            self.check(&r.user, &r.name).await;
        }
    }

    /// Stops every active server (on shutdown, when configured).
    pub async fn stop_all(&self) {
        let Ok(records) = self.store.list_servers(None).await else { return };
        for r in records.into_iter().filter(|r| r.state.is_active()) {
            let _ = self.stop_now(&r.user, &r.name, "stop").await;
        }
    }

    /// Stops every server of one user (before the account is deleted or unauthorized).
    pub async fn stop_all_of(&self, user: &str) {
        let Ok(records) = self.store.list_servers(Some(user)).await else { return };
        for r in records.into_iter().filter(|r| r.state.is_active()) {
            let _ = self.stop_now(&r.user, &r.name, "stop").await;
        }
    }

    /// Deletes a stopped named server's record.
    pub async fn remove(&self, user: &str, server: &str) -> Result<(), StartError> {
        if let Some(r) = self.store.get_server(user, server).await? {
            if r.state != ServerState::Stopped {
                return Err(StartError::Refused(format!("{} is not stopped", describe(user, server))));
            }
            self.store.delete_server(user, server).await?;
        }
        Ok(())
    }

    /// Deletes what the user's servers kept (volumes) through the spawner.
    pub async fn remove_user_data(&self, user: &str) -> Result<(), String> {
        self.spawner.remove_user_data(user).await.map_err(|e| e.to_string())
    }

    /// The inventory with who holds each GPU.
    pub async fn gpu_report(&self) -> Result<Vec<Value>, StartError> {
        let allocations = self.store.gpu_allocations().await?;
        let shared: std::collections::HashSet<String> = self.store.shared_gpus().await?.into_iter().collect();
        Ok(self
            .gpu_inventory()
            .into_iter()
            .map(|g| {
                let holders: Vec<String> =
                    allocations.iter().filter(|(d, _, _)| *d == g.id).map(|(_, u, s)| describe(u, s)).collect();
                json!({"id": g.id, "name": g.name, "shared": shared.contains(&g.id), "holders": holders})
            })
            .collect())
    }

    pub async fn set_gpu_shared(&self, id: &str, shared: bool) -> Result<(), StartError> {
        if !self.gpu_inventory().iter().any(|g| g.id == id) {
            return Err(StartError::NotFound(format!("no GPU {id} in the inventory")));
        }
        self.store.set_gpu_shared(id, shared).await?;
        Ok(())
    }

    pub async fn logs(&self, user: &str, server: &str) -> Option<String> {
        self.spawner.logs(user, server).await
    }
}

fn last_lines(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}
