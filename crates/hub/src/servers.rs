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

pub mod spec;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use berth_auth::{hash_token, new_token};
use berth_core::{RoutingMode, ScopeSet, ServerId, ServerState, Transition};
use berth_proxy::{Route, RouteTable};
use berth_spawner::{Progress, Spawner, Status, StopGrace};
use berth_store::{now_ms, NewToken, OAuthClient, Server, Store, TokenKind};
use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

pub use spec::{StartPlan, UserOptions};

use crate::activity::Activity;
use crate::error::{HubError, HubResult};
use crate::gpus::Gpus;
use crate::progress::{ProgressEvent, ProgressLog};
use crate::templates::Templates;

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
    Running { url: Option<String>, state: SpawnerState },
    Stopped { error: Option<String> },
    /// Still starting or stopping at the deadline.
    Pending,
}

/// Why a server goes away: one teardown for each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    Failed,
    Stop,
    Vanished,
}

/// A start admitted: the server is claimed (released on drop), limits
/// passed, GPUs held.
struct Admission {
    id: ServerId,
    record: Server,
    options: UserOptions,
    gpus: Vec<String>,
    permit: OwnedSemaphorePermit,
    claim: Claim,
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
    store: Store,
    spawner: Arc<dyn Spawner>,
    pub routes: Arc<RouteTable>,
    activity: Arc<Activity>,
    base_url: String,
    /// `http://…<base>hub/api` as servers reach it, known once the listener is bound.
    api_url: RwLock<String>,
    busy: Mutex<HashSet<ServerId>>,
    checking: Mutex<HashSet<ServerId>>,
    progress: Mutex<HashMap<ServerId, Arc<ProgressLog>>>,
    starts: Arc<Semaphore>,
    http: Client<HttpConnector, Empty<Bytes>>,
    pub gpus: Gpus,
    /// The templates users may start, and how their apps are routed.
    pub templates: Templates,
    /// Starts, stops and checks under way, drained on shutdown.
    tasks: TaskTracker,
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
            http: Client::builder(TokioExecutor::new()).build(connector),
            gpus,
            templates,
            tasks: TaskTracker::new(),
        }
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
    fn route_for(&self, id: &ServerId, mode: RoutingMode, target: String) -> (Route, String) {
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
    async fn transition(&self, s: &mut Server, t: Transition) -> HubResult<()> {
        s.state = s.state.apply(t)?;
        self.store.put_server(s).await?;
        Ok(())
    }

    // ------------------------------------------------------------- start

    /// Requests a start. Returns once the start is under way; progress goes
    /// to the server's progress log, the outcome to the store.
    pub async fn start(self: &Arc<Self>, id: &ServerId, options: UserOptions) -> HubResult<()> {
        let admission = self.admit(id, options).await?;
        let held = admission.id.clone();
        match self.plan_and_launch(admission).await {
            Ok(()) => Ok(()),
            Err(e) => {
                self.gpus.free(&held).await;
                Err(e)
            }
        }
    }

    /// Step 1: whether this start may happen now — the owner, the template,
    /// the claim, the state, the limits — and the GPUs it holds.
    async fn admit(self: &Arc<Self>, id: &ServerId, mut options: UserOptions) -> HubResult<Admission> {
        let (user, server) = (id.user(), id.server());
        if let Some(tid) = options.template.clone() {
            if let Some(allowed) = self.store.user_limits(user).await?.templates {
                if !allowed.contains(&tid) {
                    return Err(HubError::TemplateNotAllowed { user: user.into(), template: tid, allowed });
                }
            }
            let t = self.templates.get(&tid).ok_or_else(|| HubError::UnknownTemplate {
                template: tid.clone(),
                choices: self.templates.templates().iter().map(|t| t.id.clone()).collect(),
            })?;
            let mode = self.templates.mode_for(t)?;
            spec::resolve_template(&mut options, t, mode, !self.gpus.inventory().is_empty())?;
        }
        let owner = self.store.get_user(user).await?.ok_or_else(|| HubError::NoSuchUser { user: user.into() })?;
        if !owner.authorized {
            return Err(HubError::NotAuthorized { user: user.into() });
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
        if self.cfg.max_running > 0 && self.store.count_active_servers().await? >= self.cfg.max_running as i64 {
            return Err(HubError::HubFull { limit: self.cfg.max_running });
        }
        let permit = self
            .starts
            .clone()
            .try_acquire_owned()
            .map_err(|_| HubError::TooManyStarting { limit: self.cfg.max_concurrent_starts })?;
        let gpus = self.gpus.allocate(id, options.gpus.unwrap_or(0) as usize).await?;
        Ok(Admission { id: id.clone(), record, options, gpus, permit, claim })
    }

    /// Steps 2 and 3: the server's credentials, the plan, the record, and
    /// the tracked task that runs it.
    async fn plan_and_launch(self: &Arc<Self>, a: Admission) -> HubResult<()> {
        let Admission { id, mut record, options, gpus, permit, claim } = a;
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
        let template = options.template.as_deref().and_then(|t| self.templates.get(t));
        let plan = spec::plan(&id, env, &self.base_url, &options, template, gpus);

        record.last_error = None;
        record.started = Some(now_ms());
        record.last_activity = None;
        record.url = None;
        record.spawner_state = "{}".into();
        record.user_options = options.to_record();
        if let Some(t) = &options.template {
            record.template = t.clone();
        }
        self.transition(&mut record, Transition::Start).await?;
        let log = ProgressLog::new();
        if let Ok(mut m) = self.progress.lock() {
            m.insert(id.clone(), log.clone());
        }
        log.push(ProgressEvent::step(0, "Server requested"));
        let _ = self.store.add_event(user, "start", &id.to_string(), "").await;

        let me = self.clone();
        let span = tracing::info_span!("start", server = %id);
        self.tasks.spawn(
            async move {
                let _permit = permit;
                let _claim = claim;
                me.run_start(id, record, options.routing_mode(), plan, log).await;
            }
            .instrument(span),
        );
        Ok(())
    }

    async fn run_start(&self, id: ServerId, mut record: Server, mode: RoutingMode, plan: StartPlan, log: Arc<ProgressLog>) {
        let deadline = Instant::now() + self.cfg.start_timeout_seconds;
        match self.spawn_and_wait(&mut record, plan, &log, deadline).await {
            Ok(target) => {
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
                tracing::warn!(server = %id, %reason, "server failed to start");
                self.teardown(&id, record, Ending::Failed, &reason).await;
                log.push(ProgressEvent::failed(&reason));
            }
        }
    }

    async fn spawn_and_wait(
        &self,
        record: &mut Server,
        plan: StartPlan,
        log: &Arc<ProgressLog>,
        deadline: Instant,
    ) -> Result<String, String> {
        let timeout = self.cfg.start_timeout_seconds.as_secs();
        let (ptx, mut prx) = mpsc::unbounded_channel::<Progress>();
        let fwd_log = log.clone();
        let forwarder = tokio::spawn(async move {
            while let Some(p) = prx.recv().await {
                fwd_log.push(ProgressEvent::step(p.progress.min(99), p.message));
            }
        });
        let stop_forwarding = forwarder.abort_handle();
        log.push(ProgressEvent::step(10, "Spawning server..."));
        let (user, server) = (plan.spec.user.clone(), plan.spec.server.clone());
        let started = tokio::time::timeout_at(deadline, self.spawner.start(plan.spec, ptx)).await;
        // Events the spawner sent before returning are still delivered; a
        // spawner that keeps its sender gets no more say after that.
        let _ = tokio::time::timeout(Duration::from_millis(200), forwarder).await;
        stop_forwarding.abort();
        let started = match started {
            Err(_) => return Err(format!("the server did not start within {timeout} s")),
            Ok(Err(e)) => return Err(e.to_string()),
            Ok(Ok(s)) => s,
        };
        record.spawner_state = started.state.to_string();
        if let Err(e) = self.store.put_server(record).await {
            return Err(format!("could not record the server: {e}"));
        }
        log.push(ProgressEvent::step(50, "Waiting for the server to answer..."));
        let Some(probe) = plan.probe else {
            // Nothing answers HTTP (an SSH-only environment): running is ready.
            return match self.spawner.poll(&started.state).await {
                Ok(Status::Running) => Ok(started.target),
                Ok(Status::Exited(why)) => Err(why),
                Err(e) => Err(e.to_string()),
            };
        };
        let probe = format!("{}{probe}", started.target);
        let uri: http::Uri = probe.parse().map_err(|e| format!("bad target {probe}: {e}"))?;
        let mut delay = Duration::from_millis(100);
        loop {
            if let Ok(Ok(resp)) = tokio::time::timeout(Duration::from_secs(5), self.http.get(uri.clone())).await {
                if resp.status().as_u16() < 500 {
                    return Ok(started.target);
                }
            }
            match self.spawner.poll(&started.state).await {
                Ok(Status::Exited(why)) => {
                    let tail = self.spawner.logs(&user, &server).await.map(|l| last_lines(&l, 3)).unwrap_or_default();
                    return Err(if tail.is_empty() { why } else { format!("{why}; its last output: {tail}") });
                }
                Ok(Status::Running) => {}
                Err(e) => return Err(e.to_string()),
            }
            if Instant::now() + delay > deadline {
                return Err(format!("the server did not answer at {probe} within {timeout} s"));
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(1));
        }
    }

    // -------------------------------------------------- the one teardown

    /// Everything that must happen when a server goes away, whatever the
    /// reason: no route, the spawner's process or container gone, the
    /// server's credentials revoked, its GPUs freed, the record stopped
    /// (with the reason for a failure or a vanish), an event.
    async fn teardown(&self, id: &ServerId, mut record: Server, ending: Ending, reason: &str) {
        // The route goes first: nothing reaches a server that is going away.
        self.remove_routes(id);
        if ending == Ending::Stop && record.state != ServerState::Stopping {
            if let Err(e) = self.transition(&mut record, Transition::Stop).await {
                tracing::warn!(server = %id, error = %e, "could not record the stop");
            }
        }
        let state = SpawnerState::from_record(&record.spawner_state);
        if ending != Ending::Vanished && state.is_started() {
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
        self.gpus.free(id).await;
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
        let task = self.tasks.spawn(
            async move { me.stop_now(&target).await }.instrument(tracing::info_span!("stop", server = %id)),
        );
        match tokio::time::timeout(wait, task).await {
            Ok(Ok(r)) => r.map(|_| true),
            Ok(Err(e)) => Err(HubError::internal(format!("stopping {id} failed: {e}"))),
            Err(_) => Ok(false),
        }
    }

    async fn stop_now(&self, id: &ServerId) -> HubResult<()> {
        let Some(record) = self.store.get_server(id.user(), id.server()).await? else { return Ok(()) };
        if record.state == ServerState::Stopped {
            return Ok(());
        }
        self.teardown(id, record, Ending::Stop, "").await;
        Ok(())
    }

    /// Stops every active server (on shutdown, when configured).
    pub async fn stop_all(&self) {
        let Ok(records) = self.store.list_servers(None).await else { return };
        for r in records.into_iter().filter(|r| r.state.is_active()) {
            if let Ok(id) = ServerId::parse(&r.user, &r.name) {
                let _ = self.stop_now(&id).await;
            }
        }
    }

    /// Stops every server of one user (before the account is deleted or
    /// unauthorized); their GPUs are freed on the way.
    pub async fn stop_all_of(&self, user: &str) -> HubResult<()> {
        for r in self.store.list_servers(Some(user)).await?.into_iter().filter(|r| r.state.is_active()) {
            if let Ok(id) = ServerId::parse(&r.user, &r.name) {
                self.stop_now(&id).await?;
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

    // ------------------------------------------------------------ waiting

    /// Waits until `id` is running or stopped, or `deadline` passes. With
    /// `progress`, every event of the current start (the ones so far, then
    /// each new one) is sent there as well; the wait ends early when that
    /// receiver goes away.
    pub async fn wait_settled(
        &self,
        id: &ServerId,
        deadline: Instant,
        progress: Option<&mpsc::UnboundedSender<ProgressEvent>>,
    ) -> HubResult<Settled> {
        let mut followed = false;
        loop {
            if !followed {
                if let Some(log) = self.progress_log(id) {
                    followed = true;
                    let mut watch = log.watch();
                    while let Ok(Some(ev)) = tokio::time::timeout_at(deadline, watch.next()).await {
                        if let Some(tx) = progress {
                            if tx.send(ev).is_err() {
                                return Ok(Settled::Pending);
                            }
                        }
                    }
                }
            }
            let record = self.store.get_server(id.user(), id.server()).await?;
            match record {
                None => return Ok(Settled::Stopped { error: None }),
                Some(r) if r.state == ServerState::Running => {
                    return Ok(Settled::Running { url: r.url, state: SpawnerState::from_record(&r.spawner_state) })
                }
                Some(r) if r.state == ServerState::Stopped => return Ok(Settled::Stopped { error: r.last_error }),
                Some(_) => {}
            }
            if Instant::now() >= deadline || progress.is_some_and(|tx| tx.is_closed()) {
                return Ok(Settled::Pending);
            }
            tokio::time::sleep(Duration::from_millis(100).min(deadline.saturating_duration_since(Instant::now())))
                .await;
        }
    }

    /// The server's lifecycle state and saved spawner state (`None` when it has no record).
    pub async fn state_of(&self, id: &ServerId) -> HubResult<Option<(ServerState, SpawnerState)>> {
        Ok(self
            .store
            .get_server(id.user(), id.server())
            .await?
            .map(|r| (r.state, SpawnerState::from_record(&r.spawner_state))))
    }

    // ------------------------------------------------ checks and re-adoption

    /// Checks one server now: a running one whose process or container is
    /// gone is torn down as vanished.
    pub async fn check(&self, id: &ServerId) {
        if self.busy.lock().map(|b| b.contains(id)).unwrap_or(true) {
            return;
        }
        let Ok(Some(record)) = self.store.get_server(id.user(), id.server()).await else { return };
        if record.state != ServerState::Running {
            return;
        }
        let state = SpawnerState::from_record(&record.spawner_state);
        if let Ok(Status::Exited(why)) = self.spawner.poll(state.value()).await {
            self.teardown(id, record, Ending::Vanished, &why).await;
        }
    }

    /// [`Servers::check`] in the background, at most one at a time per
    /// server (the proxy calls this when a server refuses connections).
    pub fn check_soon(self: &Arc<Self>, id: ServerId) {
        let first = self.checking.lock().map(|mut c| c.insert(id.clone())).unwrap_or(false);
        if !first {
            return;
        }
        let me = self.clone();
        let span = tracing::info_span!("check", server = %id);
        self.tasks.spawn(
            async move {
                me.check(&id).await;
                if let Ok(mut c) = me.checking.lock() {
                    c.remove(&id);
                }
            }
            .instrument(span),
        );
    }

    /// At start-up, before the listener accepts: re-adopt what still runs,
    /// restore its routes, and mark what vanished as stopped. Returns
    /// (adopted, vanished).
    pub async fn reconcile(&self) -> HubResult<(usize, usize)> {
        let (mut adopted, mut vanished) = (0, 0);
        for mut record in self.store.list_servers(None).await? {
            if record.state == ServerState::Stopped {
                continue;
            }
            let Ok(id) = ServerId::parse(&record.user, &record.name) else { continue };
            let state = SpawnerState::from_record(&record.spawner_state);
            let status = if state.is_started() {
                self.spawner.poll(state.value()).await.unwrap_or_else(|e| Status::Exited(e.to_string()))
            } else {
                Status::Exited("it had not started when berth stopped".into())
            };
            match (status, self.spawner.target(state.value())) {
                (Status::Running, Some(target)) if record.state != ServerState::Stopping => {
                    let mode = UserOptions::from_record(&record.user_options).routing_mode();
                    let (route, url) = self.route_for(&id, mode, target);
                    self.routes.insert(route);
                    if record.state == ServerState::Starting {
                        record.url = Some(url);
                        let _ = self.transition(&mut record, Transition::Ready).await;
                    }
                    tracing::info!(server = %id, "re-adopted a running server");
                    adopted += 1;
                }
                (Status::Running, _) => {
                    // It was stopping: finish the job.
                    self.teardown(&id, record, Ending::Stop, "").await;
                    vanished += 1;
                }
                (Status::Exited(why), _) => {
                    let reason = format!("stopped while berth was not running: {why}");
                    self.teardown(&id, record, Ending::Vanished, &reason).await;
                    vanished += 1;
                }
            }
        }
        // Containers labelled as berth's that no active record claims are
        // reported, never deleted: they may hold someone's work.
        let active: HashSet<(String, String)> = self
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
                    user = %user, server = %server, handle = %handle,
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
            if let Ok(id) = ServerId::parse(&r.user, &r.name) {
                self.check(&id).await;
            }
        }
    }

    /// Waits (up to `timeout`) for the starts, stops and checks under way.
    pub async fn drain(&self, timeout: Duration) -> bool {
        self.tasks.close();
        let done = tokio::time::timeout(timeout, self.tasks.wait()).await.is_ok();
        self.tasks.reopen();
        done
    }

    /// Deletes what the user's servers kept (volumes, home) through the spawner.
    pub async fn remove_user_data(&self, user: &str) -> HubResult<()> {
        self.spawner.remove_user_data(user).await.map_err(|e| HubError::Spawner { message: e.to_string() })
    }

    pub async fn logs(&self, id: &ServerId) -> Option<String> {
        self.spawner.logs(id.user(), id.server()).await
    }
}

fn last_lines(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}
