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
mod readiness;
pub mod spec;
mod wait;

use std::collections::{HashMap, HashSet};
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
use tokio_util::task::TaskTracker;
use tracing::Instrument;

pub use config::Config;
pub use spec::{StartPlan, UserOptions};

use crate::activity::Activity;
use crate::error::{HubError, HubResult};
use crate::gpus::Gpus;
use crate::progress::{ProgressEvent, ProgressLog};
use crate::templates::Templates;

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
    /// The templates users may start, and how their apps are routed.
    pub templates: Templates,
    /// Starts, stops and checks under way, drained on shutdown.
    tasks: TaskTracker,
    /// Builds asked for ahead of a start, by template id.
    image_builds: Mutex<HashMap<String, images::BuildState>>,
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
            culler: crate::cull::Culler::default(),
            templates,
            tasks: TaskTracker::new(),
            image_builds: Mutex::new(HashMap::new()),
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
    async fn admit(self: &Arc<Self>, id: &ServerId, mut options: UserOptions) -> HubResult<Admission> {
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
        if self.cfg.max_running > 0 && self.store.count_active_servers().await? >= self.cfg.max_running as i64 {
            return Err(HubError::HubFull { limit: self.cfg.max_running });
        }
        let permit = self
            .starts
            .clone()
            .try_acquire_owned()
            .map_err(|_| HubError::TooManyStarting { limit: self.cfg.max_concurrent_starts })?;
        let gpus = self.gpus.allocate(id, options.gpus.unwrap_or(0) as usize).await?;
        Ok(Admission { id: id.clone(), owner_id: owner.account_id, record, options, gpus, permit, claim })
    }

    /// Steps 2 and 3: the server's credentials, the plan, the record, and
    /// the tracked task that runs it.
    async fn plan_and_launch(self: &Arc<Self>, a: Admission) -> HubResult<()> {
        let Admission { id, owner_id, mut record, options, gpus, permit, claim } = a;
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

    async fn run_start(
        &self,
        id: ServerId,
        mut record: Server,
        mode: RoutingMode,
        plan: StartPlan,
        log: Arc<ProgressLog>,
    ) {
        match self.spawn_and_wait(&mut record, plan, &log).await {
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

    // -------------------------------------------------- the one teardown

    /// Everything that must happen when a server goes away, whatever the
    /// reason: no route, the spawner's process or container gone, the
    /// server's credentials revoked, its GPUs freed, the record stopped
    /// (with the reason for a failure or a vanish), an event.
    pub(super) async fn teardown(&self, id: &ServerId, mut record: Server, ending: Ending, reason: &str) {
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
        let task = self
            .tasks
            .spawn(async move { me.stop_now(&target, "").await }.instrument(tracing::info_span!("stop", server = %id)));
        match tokio::time::timeout(wait, task).await {
            Ok(Ok(r)) => r.map(|_| true),
            Ok(Err(e)) => Err(HubError::internal(format!("stopping {id} failed: {e}"))),
            Err(_) => Ok(false),
        }
    }

    async fn stop_now(&self, id: &ServerId, reason: &str) -> HubResult<()> {
        let Some(record) = self.store.get_server(id.user(), id.server()).await? else { return Ok(()) };
        if record.state == ServerState::Stopped {
            return Ok(());
        }
        self.teardown(id, record, Ending::Stop, reason).await;
        Ok(())
    }

    /// Stops a running server for a reason recorded with its stop event (the
    /// culler's), unless a start or stop of it is under way.
    pub(crate) async fn stop_because(&self, id: &ServerId, reason: &str) -> HubResult<()> {
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
    pub async fn stop_all(&self) {
        let Ok(records) = self.store.list_servers(None).await else { return };
        for r in records.into_iter().filter(|r| r.state.is_active()) {
            if let Ok(id) = ServerId::parse(&r.user, &r.name) {
                let _ = self.stop_now(&id, "").await;
            }
        }
    }

    /// Stops every server of one user (before the account is deleted or
    /// unauthorized); their GPUs are freed on the way.
    pub async fn stop_all_of(&self, user: &str) -> HubResult<()> {
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

    pub async fn logs(&self, id: &ServerId) -> Option<String> {
        self.spawner.logs(id.user(), id.server()).await
    }
}
