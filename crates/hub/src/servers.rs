//! The server lifecycle: start, readiness, stop, re-adoption and polling,
//! recorded in the store as one state machine (`berth_core::ServerState`)
//! and mirrored into the proxy's route table.
//!
//! A start is three steps — [`Servers::admit`] (claim, limits, GPUs), plan
//! (the pure [`spec::plan`]) and launch (a tracked task) — and every way a
//! server ends (a failed start, a stop, a server found dead) goes through
//! the one [`Servers::teardown`]. Every state change goes through
//! [`Servers::transition`], so the store never holds a state the machine
//! does not allow. [`Servers::wait_settled`] is the one wait for a start or
//! stop to finish, used by the REST API, the progress stream and SSH.

mod adopt;
mod config;
pub mod images;
pub mod moves;
pub mod queue;
mod readiness;
pub mod spec;
mod wait;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use berth_auth::{hash_token, new_token};
use berth_core::{RoutingMode, ScopeSet, ServerId, ServerState, Transition};
use berth_proxy::{Route, RouteTable};
use berth_spawner::{Spawner, StopGrace};
use berth_store::{now_ms, NewToken, OAuthClient, Server, Store, TokenKind};
use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

pub use config::Config;
pub use spec::{StartPlan, UserOptions};

use crate::activity::Activity;
use crate::error::{HubError, HubResult};
use crate::gpus::Gpus;
use crate::metrics::{Counters, SpawnOutcome};
use crate::progress::{ProgressEvent, ProgressLog};
use crate::templates::Templates;
use crate::usage::{Usage, UsageConfig};

/// The spawner's saved state for a server, as recorded: empty until the
/// spawner returned from `start`.
#[derive(Debug, Clone, PartialEq)]
pub struct SpawnerState(Value);

impl SpawnerState {
    pub fn from_record(s: &str) -> SpawnerState {
        SpawnerState(serde_json::from_str(s).unwrap_or_else(|_| Value::Object(Default::default())))
    }

    /// Whether a spawner returned it (there is something to stop or poll).
    pub fn is_started(&self) -> bool {
        self.0.as_object().is_some_and(|o| !o.is_empty())
    }

    pub fn value(&self) -> &Value {
        &self.0
    }
}

/// How a start or stop ended, or that it has not yet.
#[derive(Debug, Clone, PartialEq)]
pub enum Settled {
    Running {
        url: Option<String>,
        state: SpawnerState,
    },
    Stopped {
        error: Option<String>,
    },
    /// Still starting or stopping at the deadline.
    Pending,
}

/// Why a server goes away: one teardown for each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ending {
    Failed,
    Stop,
    Vanished,
}

/// A start admitted: the server is claimed (released on drop), limits
/// passed, GPUs held.
struct Admission {
    id: ServerId,
    /// The owner's immutable account id (what their data is named by).
    owner_id: String,
    record: Server,
    options: UserOptions,
    gpus: Vec<String>,
    /// A start slot; `None` for a start that left the GPU queue, which
    /// waits for one in its task.
    permit: Option<OwnedSemaphorePermit>,
    claim: Option<Claim>,
    /// The progress so far (a start that waited in the queue keeps its log).
    log: Option<Arc<ProgressLog>>,
}

/// What `admit` decided: start now, or wait in the GPU queue.
enum Admitted {
    Now(Box<Admission>),
    Queued,
}

/// Marks a server busy (a start or stop under way) until dropped.
struct Claim {
    servers: Arc<Servers>,
    id: ServerId,
}

impl Drop for Claim {
    fn drop(&mut self) {
        if let Ok(mut b) = self.servers.busy.lock() {
            b.remove(&self.id);
        }
    }
}

pub struct Servers {
    pub cfg: Config,
    pub(crate) store: Store,
    pub(crate) spawner: Arc<dyn Spawner>,
    pub routes: Arc<RouteTable>,
    pub(crate) activity: Arc<Activity>,
    base_url: String,
    /// `http://…<base>hub/api` as servers reach it, known once the listener is bound.
    api_url: RwLock<String>,
    busy: Mutex<HashSet<ServerId>>,
    checking: Mutex<HashSet<ServerId>>,
    progress: Mutex<HashMap<ServerId, Arc<ProgressLog>>>,
    starts: Arc<Semaphore>,
    pub(crate) http: Client<HttpConnector, Empty<Bytes>>,
    pub gpus: Gpus,
    /// Idle culling (off until configured: see [`crate::cull`]).
    pub culler: crate::cull::Culler,
    /// Image updates (`[images]`: see [`crate::updates`]).
    pub updates: crate::updates::Updates,
    /// The templates users may start, and how their apps are routed.
    pub templates: Templates,
    /// Starts, stops and checks under way, drained on shutdown.
    tasks: TaskTracker,
    /// Builds asked for ahead of a start, by template id.
    image_builds: Mutex<HashMap<String, images::BuildState>>,
    /// Serialises every change to the GPU queue with the allocations it
    /// leads to (lock order: this, then the GPUs' own).
    queue: tokio::sync::Mutex<queue::Announced>,
    /// Entries in the GPU queue when it was last read (for metrics).
    queue_len: AtomicUsize,
    /// Set while `reconcile` runs: the queue is handed GPUs only after it.
    queue_paused: AtomicBool,
    /// GPU-hours and server-hours, and the quota a start with GPUs must pass.
    pub usage: Usage,
    /// Spawn durations and proxied requests, for `/hub/metrics`.
    pub counters: Counters,
    /// Starts under way in this process: a stop asks the start's own task
    /// to end it (`Starting::stop`), so a server is torn down once.
    starting: Mutex<HashMap<ServerId, Arc<Starting>>>,
    /// Image moves under way in this process (see [`moves`]).
    moving: Mutex<HashSet<ServerId>>,
    /// What owners are told about updates of the images their running
    /// servers run: by user, (server, text) sorted; refreshed by checks
    /// and moves, read on every page.
    notices: Mutex<HashMap<String, Vec<(String, String)>>>,
}

/// A start's task as a stop sees it.
struct Starting {
    /// Cancelled by a stop: the task stops waiting and tears the server down.
    stop: CancellationToken,
    /// Cancelled when the task has finished.
    done: CancellationToken,
}

impl Servers {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: Config,
        store: Store,
        spawner: Arc<dyn Spawner>,
        routes: Arc<RouteTable>,
        activity: Arc<Activity>,
        base_url: &str,
        gpus: Gpus,
        templates: Templates,
    ) -> Servers {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        let starts = Arc::new(Semaphore::new(cfg.max_concurrent_starts.max(1) as usize));
        Servers {
            usage: Usage::new(UsageConfig::default(), store.clone()),
            counters: Counters::default(),
            cfg,
            store,
            spawner,
            routes,
            activity,
            base_url: base_url.to_string(),
            api_url: RwLock::new(String::new()),
            busy: Mutex::new(HashSet::new()),
            checking: Mutex::new(HashSet::new()),
            progress: Mutex::new(HashMap::new()),
            starts,
            // Readiness probes and the culler's activity checks: a few
            // requests per server now and then, so no idle connection is
            // kept (with 1,000 servers, one kept per server was ~1,000
            // connections and their buffers, held for 90 s).
            http: Client::builder(TokioExecutor::new()).pool_max_idle_per_host(0).build(connector),
            gpus,
            culler: crate::cull::Culler::default(),
            updates: crate::updates::Updates::default(),
            templates,
            tasks: TaskTracker::new(),
            image_builds: Mutex::new(HashMap::new()),
            queue: tokio::sync::Mutex::new(queue::Announced::default()),
            queue_len: AtomicUsize::new(0),
            queue_paused: AtomicBool::new(false),
            starting: Mutex::new(HashMap::new()),
            moving: Mutex::new(HashSet::new()),
            notices: Mutex::new(HashMap::new()),
        }
    }

    /// The `[usage]` section (periods, the GPU-hour quota) in place of the defaults.
    pub fn with_usage(mut self, cfg: UsageConfig) -> Servers {
        self.usage = Usage::new(cfg, self.store.clone());
        self
    }

    pub fn spawner_kind(&self) -> &'static str {
        self.spawner.kind()
    }

    /// The spawner, for the SSH gateway's sessions and forwards.
    pub fn spawner(&self) -> Arc<dyn Spawner> {
        self.spawner.clone()
    }

    pub fn set_api_url(&self, url: String) {
        if let Ok(mut u) = self.api_url.write() {
            *u = url;
        }
    }

    fn api_url(&self) -> String {
        self.api_url.read().map(|u| u.clone()).unwrap_or_default()
    }

    pub fn prefix(&self, id: &ServerId) -> String {
        spec::server_prefix(&self.base_url, id)
    }

    pub fn progress_log(&self, id: &ServerId) -> Option<Arc<ProgressLog>> {
        self.progress.lock().ok().and_then(|m| m.get(id).cloned())
    }

    fn grace(&self) -> StopGrace {
        StopGrace { interrupt: self.cfg.stop_grace_seconds, terminate: self.cfg.stop_grace_seconds }
    }

    /// The route for a server that answers at `target`, and its public URL.
    pub(super) fn route_for(&self, id: &ServerId, mode: RoutingMode, target: String) -> (Route, String) {
        let (user, server) = (id.user().to_string(), id.server().to_string());
        match mode {
            RoutingMode::Host => {
                let host = self.templates.host_for(id);
                let url = format!("{}/", self.templates.origin_of(&host));
                (Route::new(host, target, user, server).with_mode(RoutingMode::Host), url)
            }
            mode => {
                let prefix = self.prefix(id);
                (Route::new(prefix.clone(), target, user, server).with_mode(mode), prefix)
            }
        }
    }

    fn remove_routes(&self, id: &ServerId) {
        self.routes.remove(&self.prefix(id));
        if self.templates.host_mode() {
            self.routes.remove(&self.templates.host_for(id));
        }
    }

    /// Applies a transition and writes the record; illegal moves are refused.
    pub(super) async fn transition(&self, s: &mut Server, t: Transition) -> HubResult<()> {
        s.state = s.state.apply(t)?;
        self.store.put_server(s).await?;
        Ok(())
    }

    // ------------------------------------------------------------- start

    /// Requests a start. Returns once the start is under way; progress goes
    /// to the server's progress log, the outcome to the store.
    ///
    /// A start that asks for more GPUs than are free waits in the GPU
    /// queue (`gpu.when_full = "queue"`): it is accepted, its record is
    /// starting (JupyterHub's pending spawn), and it starts by itself when
    /// it is first in line and GPUs are free.
    pub async fn start(self: &Arc<Self>, id: &ServerId, options: UserOptions) -> HubResult<()> {
        self.start_as(id, options, false).await
    }

    /// [`Servers::start`]; a `recreate` (a server berth itself stopped a
    /// moment ago to run it on an updated image) is not held to the limits
    /// on running servers and GPU time that a new start must pass, and
    /// waits for a start slot instead of being refused one.
    async fn start_as(self: &Arc<Self>, id: &ServerId, options: UserOptions, recreate: bool) -> HubResult<()> {
        let asked = tokio::time::Instant::now();
        let admission = match self.admit(id, options, recreate).await {
            Ok(Admitted::Now(a)) => *a,
            Ok(Admitted::Queued) => return Ok(()),
            Err(e) => {
                if let Some(outcome) = SpawnOutcome::of_refusal(&e) {
                    self.counters.spawn(outcome, asked.elapsed());
                }
                return Err(e);
            }
        };
        let held = admission.id.clone();
        match self.plan_and_launch(admission).await {
            Ok(()) => Ok(()),
            Err(e) => {
                self.gpus.free(&held).await;
                Err(e)
            }
        }
    }

    /// What a start asked for without options (an SSH log-in that starts
    /// the server) runs: what the server ran last time, or, for a named
    /// server never started, the template of its name if the hub offers one
    /// (`ssh alice+pytorch@host` starts the PyTorch template).
    pub async fn implicit_options(&self, id: &ServerId) -> HubResult<UserOptions> {
        if let Some(s) = self.store.get_server(id.user(), id.server()).await? {
            let mut o = UserOptions::from_record(&s.user_options);
            // The mode is chosen again (the hub's routing may have changed);
            // what older records carry beyond the known options is dropped.
            o.routing = None;
            o.extra.clear();
            if o.template.is_some() || o.image.is_some() || id.server.is_default() {
                return Ok(o);
            }
        }
        let name = id.server();
        if !id.server.is_default() && self.templates.get(name).is_some() {
            return Ok(UserOptions { template: Some(name.to_string()), ..UserOptions::default() });
        }
        Ok(UserOptions::default())
    }

    /// Step 1: whether this start may happen now — the owner, the template,
    /// the claim, the state, the limits — and the GPUs it holds.
    async fn admit(self: &Arc<Self>, id: &ServerId, mut options: UserOptions, recreate: bool) -> HubResult<Admitted> {
        let (user, server) = (id.user(), id.server());
        if let Some(image) = &options.image {
            if options.template.is_some() || !self.cfg.allowed_images.contains(image) {
                return Err(HubError::ImageNotAllowed { image: image.clone() });
            }
        }
        // A default server with nothing named runs the default template
        // (whatever `allowed` and the user's limits say of picking it).
        let template = match options.template.clone() {
            Some(tid) => {
                if let Some(allowed) = self.store.user_limits(user).await?.templates {
                    if !allowed.contains(&tid) {
                        return Err(HubError::TemplateNotAllowed { user: user.into(), template: tid, allowed });
                    }
                }
                Some(self.templates.require(&tid, true)?)
            }
            None if id.server.is_default() && options.image.is_none() => self.templates.default_template(),
            None => None,
        };
        if let Some(t) = template {
            options.template = Some(t.id.clone());
            let mode = self.templates.mode_for(t)?;
            spec::resolve_template(&mut options, t, mode, !self.gpus.inventory().is_empty())?;
        }
        let owner = self.store.get_user(user).await?.ok_or_else(|| HubError::NoSuchUser { user: user.into() })?;
        if !owner.authorized {
            return Err(HubError::NotAuthorized { user: user.into() });
        }
        if !owner.admin && self.cfg.local_isolate_users && !self.spawner.isolates_users() {
            return Err(HubError::NotIsolated { spawner: self.spawner.kind() });
        }
        let claimed = self.busy.lock().map(|mut b| b.insert(id.clone())).unwrap_or(false);
        if !claimed {
            return Err(HubError::Busy { server: id.to_string() });
        }
        let claim = Claim { servers: self.clone(), id: id.clone() };
        let existing = self.store.get_server(user, server).await?;
        let record = existing.clone().unwrap_or_else(|| Server::new(user, server));
        match record.state {
            ServerState::Running => return Err(HubError::AlreadyRunning { server: id.to_string() }),
            ServerState::Starting => return Err(HubError::PendingSpawn { server: id.to_string() }),
            ServerState::Stopping => return Err(HubError::PendingStop { server: id.to_string() }),
            ServerState::Stopped => {}
        }
        if !id.server.is_default() && existing.is_none() {
            let servers = self.store.list_servers(Some(user)).await?;
            let running: Vec<String> = servers.iter().filter(|s| !s.name.is_empty()).map(|s| s.name.clone()).collect();
            let limit = self.store.user_limits(user).await?.max_named_servers.unwrap_or(self.cfg.max_named_servers);
            if running.len() as u32 >= limit {
                return Err(HubError::NamedServerLimit { user: user.into(), limit, running });
            }
        }
        if !recreate
            && self.cfg.max_running > 0
            && self.store.count_active_servers().await? >= self.cfg.max_running as i64
        {
            return Err(HubError::HubFull { limit: self.cfg.max_running });
        }
        let permit = if recreate {
            self.starts.clone().acquire_owned().await.map_err(|_| HubError::internal("the start slots are closed"))?
        } else {
            self.starts
                .clone()
                .try_acquire_owned()
                .map_err(|_| HubError::TooManyStarting { limit: self.cfg.max_concurrent_starts })?
        };
        let want = options.gpus.unwrap_or(0) as usize;
        if want > 0 && !recreate {
            self.usage.check_quota(user, now_ms()).await?;
        }
        let Some(gpus) = self.take_or_queue(id, want, record.clone(), &options, &owner.account_id).await? else {
            // Waiting for GPUs holds no start slot, and the claim goes: the
            // record (starting) keeps other starts of it out.
            drop(permit);
            drop(claim);
            return Ok(Admitted::Queued);
        };
        Ok(Admitted::Now(Box::new(Admission {
            id: id.clone(),
            owner_id: owner.account_id,
            record,
            options,
            gpus,
            permit: Some(permit),
            claim: Some(claim),
            log: None,
        })))
    }

    /// Steps 2 and 3: the server's credentials, the plan, the record, and
    /// the tracked task that runs it.
    async fn plan_and_launch(self: &Arc<Self>, a: Admission) -> HubResult<()> {
        let Admission { id, owner_id, mut record, options, gpus, permit, claim, log } = a;
        let (user, server) = (id.user(), id.server());
        // The server's own credentials: an API token and an OAuth client.
        let secret = new_token();
        let cid = id.client_id();
        self.store.delete_server_tokens(user, server, &cid).await?;
        self.store
            .create_token(&NewToken {
                hash: hash_token(secret.expose()),
                user: user.to_string(),
                kind: TokenKind::Server,
                server: Some(server.to_string()),
                scopes: ScopeSet::for_server(user, server).to_strings(),
                note: format!("server {id}"),
                expires_at: None,
                session_id: None,
                oauth_client: None,
            })
            .await?;
        let prefix = self.prefix(&id);
        self.store
            .put_oauth_client(&OAuthClient {
                id: cid,
                secret_hash: hash_token(secret.expose()),
                redirect_uri: format!("{prefix}oauth_callback"),
                user: user.to_string(),
                server: server.to_string(),
            })
            .await?;
        let env = spec::jupyterhub_env(&id, secret.expose(), &self.api_url(), &self.base_url);
        let template = options.template.as_deref().and_then(|t| self.templates.lookup(t));
        let mut plan = spec::plan(&id, env, &self.base_url, &options, template, gpus);
        plan.spec.volumes = crate::adopted::mounts(&self.store, &owner_id).await?;
        plan.spec.owner_id = owner_id;

        record.last_error = None;
        record.started = Some(now_ms());
        record.last_activity = None;
        record.url = None;
        record.spawner_state = "{}".into();
        record.user_options = options.to_record();
        if let Some(t) = &options.template {
            record.template = t.clone();
        }
        let log = match log {
            // It waited in the GPU queue: already starting, with its log.
            Some(log) if record.state == ServerState::Starting => {
                self.store.put_server(&record).await?;
                log.push(ProgressEvent::step(8, format!("Got {}; starting", gpu_words(plan.spec.gpus.len()))));
                log
            }
            _ => {
                self.transition(&mut record, Transition::Start).await?;
                let log = ProgressLog::new();
                if let Ok(mut m) = self.progress.lock() {
                    m.insert(id.clone(), log.clone());
                }
                log.push(ProgressEvent::step(0, "Server requested"));
                log
            }
        };
        if let Err(e) = self.store.open_server_usage(user, server, record.started.unwrap_or_else(now_ms)).await {
            // Reconciled at the next start-up (`Store::reconcile_usage`).
            tracing::error!(server = %id, error = %e, "could not record the start in the usage ledger");
        }
        let _ = self.store.add_event(user, "start", &id.to_string(), "").await;

        let me = self.clone();
        let starts = self.starts.clone();
        let span = tracing::info_span!("start", server = %id);
        let handle = Arc::new(Starting { stop: CancellationToken::new(), done: CancellationToken::new() });
        if let Ok(mut m) = self.starting.lock() {
            m.insert(id.clone(), handle.clone());
        }
        self.tasks.spawn(
            async move {
                let _done = handle.done.clone().drop_guard();
                // A start that left the GPU queue waits here for a start slot.
                let _permit = match permit {
                    Some(p) => Some(p),
                    None => tokio::select! {
                        p = starts.acquire_owned() => p.ok(),
                        _ = handle.stop.cancelled() => None,
                    },
                };
                let _claim = claim;
                me.run_start(id.clone(), record, options.routing_mode(), plan, log, &handle.stop).await;
                if let Ok(mut m) = me.starting.lock() {
                    if m.get(&id).is_some_and(|h| Arc::ptr_eq(h, &handle)) {
                        m.remove(&id);
                    }
                }
            }
            .instrument(span),
        );
        Ok(())
    }

    async fn run_start(
        self: &Arc<Self>,
        id: ServerId,
        mut record: Server,
        mode: RoutingMode,
        plan: StartPlan,
        log: Arc<ProgressLog>,
        stop: &CancellationToken,
    ) {
        let began = record.started.unwrap_or_else(now_ms);
        let took = |now: i64| Duration::from_millis(now.saturating_sub(began).max(0) as u64);
        let result = if stop.is_cancelled() {
            Err(String::new())
        } else {
            self.spawn_and_wait(&mut record, plan, &log, stop).await
        };
        match result {
            // Stopped while it started: torn down here, once, as a stop.
            _ if stop.is_cancelled() => {
                tracing::info!(server = %id, "stopped while starting");
                self.teardown(&id, record, Ending::Stop, "").await;
                log.push(ProgressEvent::failed("the server was stopped before it was ready"));
            }
            Ok(target) => {
                self.counters.spawn(SpawnOutcome::Success, took(now_ms()));
                let (route, url) = self.route_for(&id, mode, target);
                self.routes.insert(route);
                record.url = Some(url.clone());
                if let Err(e) = self.transition(&mut record, Transition::Ready).await {
                    tracing::error!(server = %id, error = %e, "could not record the ready server");
                }
                log.push(ProgressEvent::ready(&url));
                tracing::info!(server = %id, "server ready");
            }
            Err(reason) => {
                self.counters.spawn(SpawnOutcome::Failure, took(now_ms()));
                tracing::warn!(server = %id, %reason, "server failed to start");
                self.teardown(&id, record, Ending::Failed, &reason).await;
                log.push(ProgressEvent::failed(&reason));
            }
        }
    }

    // -------------------------------------------------- the one teardown

    /// Everything that must happen when a server goes away, whatever the
    /// reason: no route, the spawner's process or container gone, the
    /// server's credentials revoked, its GPUs freed, the record stopped
    /// (with the reason for a failure or a vanish), an event.
    pub(super) async fn teardown(self: &Arc<Self>, id: &ServerId, record: Server, ending: Ending, reason: &str) {
        self.teardown_at(id, record, ending, reason, now_ms()).await
    }

    /// [`Servers::teardown`], ending its usage at `ended_at` (a server found
    /// gone at start-up was last seen alive at berth's last heartbeat).
    pub(super) async fn teardown_at(
        self: &Arc<Self>,
        id: &ServerId,
        mut record: Server,
        ending: Ending,
        reason: &str,
        ended_at: i64,
    ) {
        // The route goes first: nothing reaches a server that is going away.
        self.remove_routes(id);
        if ending == Ending::Stop && record.state != ServerState::Stopping {
            if let Err(e) = self.transition(&mut record, Transition::Stop).await {
                tracing::warn!(server = %id, error = %e, "could not record the stop");
            }
        }
        let state = SpawnerState::from_record(&record.spawner_state);
        if (ending != Ending::Vanished || self.spawner.stops_vanished()) && state.is_started() {
            if let Err(e) = self.spawner.stop(state.value(), self.grace()).await {
                tracing::warn!(server = %id, error = %e, "stopping failed; marking it stopped anyway");
            }
        }
        let (user, server) = (id.user(), id.server());
        if let Err(e) = self.store.delete_server_tokens(user, server, &id.client_id()).await {
            tracing::error!(server = %id, error = %e, "could not revoke the server's tokens");
        }
        if let Err(e) = self.store.delete_oauth_client(&id.client_id()).await {
            tracing::error!(server = %id, error = %e, "could not remove the server's OAuth client");
        }
        let freed = self.gpus.free_at(id, ended_at).await;
        if let Err(e) = self.store.close_server_usage(user, server, ended_at).await {
            tracing::error!(server = %id, error = %e, "could not record the stop in the usage ledger");
        }
        record.url = None;
        let (transition, event) = match ending {
            Ending::Failed => (Transition::Fail, "start-failed"),
            Ending::Stop => (Transition::Stopped, "stop"),
            Ending::Vanished => (Transition::Vanished, "vanished"),
        };
        if ending != Ending::Stop {
            record.last_error = Some(reason.to_string());
        }
        if let Err(e) = self.transition(&mut record, transition).await {
            tracing::error!(server = %id, error = %e, "could not record the server as stopped");
        }
        if ending == Ending::Stop {
            self.activity.server(user, server, now_ms());
        }
        let _ = self.store.add_event(user, event, &id.to_string(), reason).await;
        match ending {
            Ending::Stop => tracing::info!(server = %id, "server stopped"),
            _ => tracing::warn!(server = %id, %reason, "server is gone"),
        }
        // Freed GPUs go to the first in line (only this process adds to
        // the queue, so its count says whether anyone waits).
        if freed > 0 && self.queue_len() > 0 {
            self.dispatch_boxed().await;
        }
    }

    /// [`Servers::dispatch_queue`] behind a named future type: a teardown
    /// may start the next in line, whose failure is a teardown again.
    fn dispatch_boxed(self: &Arc<Self>) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        Box::pin(self.dispatch_queue())
    }

    // -------------------------------------------------------------- stop

    /// Stops a server. Returns `true` when it finished within `wait`, `false`
    /// when it goes on in the background.
    pub async fn stop(self: &Arc<Self>, id: &ServerId, wait: Duration) -> HubResult<bool> {
        let record = self
            .store
            .get_server(id.user(), id.server())
            .await?
            .ok_or_else(|| HubError::NoSuchServer { user: id.user().into(), server: id.server().into() })?;
        match record.state {
            ServerState::Stopped => return Ok(true),
            ServerState::Stopping => return Ok(false),
            ServerState::Starting | ServerState::Running => {}
        }
        let me = self.clone();
        let target = id.clone();
        let task = self
            .tasks
            .spawn(async move { me.stop_now(&target, "").await }.instrument(tracing::info_span!("stop", server = %id)));
        match tokio::time::timeout(wait, task).await {
            Ok(Ok(r)) => r.map(|_| true),
            Ok(Err(e)) => Err(HubError::internal(format!("stopping {id} failed: {e}"))),
            Err(_) => Ok(false),
        }
    }

    async fn stop_now(self: &Arc<Self>, id: &ServerId, reason: &str) -> HubResult<()> {
        let Some(record) = self.store.get_server(id.user(), id.server()).await? else { return Ok(()) };
        if record.state == ServerState::Stopped {
            return Ok(());
        }
        // A start waiting for GPUs is called off: nothing runs yet.
        if record.state == ServerState::Starting && self.cancel_queued(id, "").await? {
            return Ok(());
        }
        // A start under way is ended by its own task, which knows what it
        // has made so far; this waits for that.
        let under_way = self.starting.lock().ok().and_then(|m| m.get(id).cloned());
        let mut record = record;
        if let Some(h) = under_way.filter(|h| !h.done.is_cancelled()) {
            if record.state == ServerState::Starting {
                h.stop.cancel();
                h.done.cancelled().await;
                // It may have become ready just before it saw the stop.
                match self.store.get_server(id.user(), id.server()).await? {
                    Some(r) if r.state != ServerState::Stopped => record = r,
                    _ => return Ok(()),
                }
            }
        }
        self.teardown(id, record, Ending::Stop, reason).await;
        Ok(())
    }

    /// Stops a running server for a reason recorded with its stop event (the
    /// culler's), unless a start or stop of it is under way.
    pub(crate) async fn stop_because(self: &Arc<Self>, id: &ServerId, reason: &str) -> HubResult<()> {
        let claimed = self.busy.lock().map(|mut b| b.insert(id.clone())).unwrap_or(false);
        if !claimed {
            return Err(HubError::Busy { server: id.to_string() });
        }
        let result = match self.store.get_server(id.user(), id.server()).await {
            Ok(Some(r)) if r.state == ServerState::Running => {
                self.teardown(id, r, Ending::Stop, reason).await;
                Ok(())
            }
            Ok(_) => Ok(()),
            Err(e) => Err(e.into()),
        };
        if let Ok(mut b) = self.busy.lock() {
            b.remove(id);
        }
        result
    }

    /// Stops every active server (on shutdown, when configured).
    /// Starts waiting for GPUs keep their place for berth's next run, and
    /// nothing leaves the queue while berth shuts down.
    pub async fn stop_all(self: &Arc<Self>) {
        self.queue_paused.store(true, std::sync::atomic::Ordering::SeqCst);
        let queued: HashSet<(String, String)> =
            self.store.gpu_queue().await.unwrap_or_default().into_iter().map(|e| (e.user, e.server)).collect();
        let Ok(records) = self.store.list_servers(None).await else { return };
        for r in
            records.into_iter().filter(|r| r.state.is_active() && !queued.contains(&(r.user.clone(), r.name.clone())))
        {
            if let Ok(id) = ServerId::parse(&r.user, &r.name) {
                let _ = self.stop_now(&id, "").await;
            }
        }
    }

    /// Stops every server of one user (before the account is deleted or
    /// unauthorized); their GPUs are freed on the way.
    pub async fn stop_all_of(self: &Arc<Self>, user: &str) -> HubResult<()> {
        for r in self.store.list_servers(Some(user)).await?.into_iter().filter(|r| r.state.is_active()) {
            if let Ok(id) = ServerId::parse(&r.user, &r.name) {
                self.stop_now(&id, "").await?;
            }
        }
        Ok(())
    }

    /// Deletes a stopped named server's record.
    pub async fn remove(&self, id: &ServerId) -> HubResult<()> {
        if let Some(r) = self.store.get_server(id.user(), id.server()).await? {
            if r.state != ServerState::Stopped {
                return Err(HubError::NotStopped { server: id.to_string() });
            }
            self.store.delete_server(id.user(), id.server()).await?;
        }
        Ok(())
    }

    /// Runs `fut` as one of the hub's tasks (drained on shutdown), in `span`:
    /// for the front ends' own waits, such as a progress stream's.
    pub fn track<F>(&self, fut: F, span: tracing::Span) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tasks.spawn(fut.instrument(span))
    }

    /// Waits (up to `timeout`) for the starts, stops and checks under way.
    pub async fn drain(&self, timeout: Duration) -> bool {
        self.queue_paused.store(true, std::sync::atomic::Ordering::SeqCst);
        self.tasks.close();
        let done = tokio::time::timeout(timeout, self.tasks.wait()).await.is_ok();
        self.tasks.reopen();
        done
    }

    /// Deletes what the user's servers kept (volumes, home) through the spawner.
    pub async fn remove_user_data(&self, user: &str, owner_id: &str) -> HubResult<()> {
        self.spawner.remove_user_data(user, owner_id).await.map_err(|e| HubError::Spawner { message: e.to_string() })
    }

    /// Puts a deleted user's kept data out of reach of a new account of that name.
    pub async fn retire_user_data(&self, user: &str, owner_id: &str) -> HubResult<()> {
        self.spawner.retire_user_data(user, owner_id).await.map_err(|e| HubError::Spawner { message: e.to_string() })
    }

    /// Marks a GPU shared or exclusive; one made shared may be what the
    /// first in the GPU queue waits for.
    pub async fn set_gpu_shared(self: &Arc<Self>, id: &str, shared: bool) -> HubResult<()> {
        self.gpus.set_shared(id, shared).await?;
        if shared {
            self.dispatch_queue().await;
        }
        Ok(())
    }

    pub async fn logs(&self, id: &ServerId) -> Option<String> {
        self.spawner.logs(id.user(), id.server()).await
    }
}

/// "a GPU", "2 GPUs".
pub(crate) fn gpu_words(n: usize) -> String {
    if n == 1 {
        "a GPU".to_string()
    } else {
        format!("{n} GPUs")
    }
}
