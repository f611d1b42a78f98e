//! Culling built in: running servers nobody uses are stopped — gracefully,
//! through the one teardown, volumes kept — after their owner was warned.
//!
//! A server is *idle* when, for the whole window, none of its signals showed
//! life: web traffic through the proxy (and the activity its single-user
//! server reports), its kernels as the Jupyter server lists them
//! (`execution_state` busy is life now, `last_activity` when it was), an
//! open SSH session, and GPU utilisation at or above `gpu.idle_below_percent`
//! on the GPUs it holds. A signal that cannot be read — GPU data missing or
//! stale, a Jupyter server whose kernels do not answer — proves nothing, so
//! such a server is never culled for idleness (the maximum age still
//! applies). Before a cull the owner is warned for `cull.warning_seconds`
//! (a banner on hub pages, `berth.cull` in the REST server model, a
//! progress event); *Extend* counts as activity and ends the warning.
//!
//! The kernel list is read with a credential made for that alone: a token of
//! the server's owner whose one scope is `access:servers!server=<user>/<name>`
//! (the least the single-user server accepts), kept in memory, expiring
//! within the hour and revoked with the server's other tokens when it stops.
//! The request carries `no_track_activity`, so reading does not count as use.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_auth::{hash_token, new_token};
use berth_core::{AppProtocol, ServerId, ServerState};
use berth_store::{now_ms, NewToken, Server, TokenKind};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use serde::{Deserialize, Serialize};
use tracing::Instrument;

use crate::error::{HubError, HubResult};
use crate::progress::ProgressEvent;
use crate::servers::{Servers, UserOptions};
use crate::telemetry::SampleState;

/// The `[cull]` section of berth's configuration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CullConfig {
    /// Stop servers idle this long; 0 turns idle culling off (the default).
    #[serde(with = "berth_core::serde_secs")]
    pub idle_timeout_seconds: Duration,
    /// Per-template idle timeouts, `id=seconds` (0: never idle-culled),
    /// over the template's own `idle_timeout_seconds` and the global one.
    pub template_timeouts: Vec<String>,
    /// Stop servers running this long, however busy; 0: no maximum age.
    #[serde(with = "berth_core::serde_secs")]
    pub max_age_seconds: Duration,
    /// How long the owner is warned before a cull.
    #[serde(with = "berth_core::serde_secs")]
    pub warning_seconds: Duration,
    /// Seconds between checks.
    #[serde(with = "berth_core::serde_secs")]
    pub interval_seconds: Duration,
}

impl Default for CullConfig {
    fn default() -> Self {
        CullConfig {
            idle_timeout_seconds: Duration::ZERO,
            template_timeouts: Vec::new(),
            max_age_seconds: Duration::ZERO,
            warning_seconds: Duration::from_secs(600),
            interval_seconds: Duration::from_secs(60),
        }
    }
}

impl CullConfig {
    /// `template_timeouts` read, or what is wrong with an entry.
    pub fn overrides(&self) -> Result<HashMap<String, Duration>, String> {
        let mut out = HashMap::new();
        for entry in self.template_timeouts.iter().map(|e| e.trim()).filter(|e| !e.is_empty()) {
            let Some((id, secs)) = entry.split_once('=') else {
                return Err(format!("{entry:?} is not `template=seconds`"));
            };
            let secs: u64 =
                secs.trim().parse().map_err(|_| format!("{entry:?}: {:?} is not a number of seconds", secs.trim()))?;
            let id = id.trim();
            if id.is_empty() {
                return Err(format!("{entry:?} names no template"));
            }
            out.insert(id.to_string(), Duration::from_secs(secs));
        }
        Ok(out)
    }
}

/// Statuses by user and server name, for lists.
#[derive(Debug, Default)]
pub struct CullStatuses(HashMap<String, HashMap<String, CullStatus>>);

impl CullStatuses {
    pub fn get(&self, user: &str, server: &str) -> Option<&CullStatus> {
        self.0.get(user)?.get(server)
    }
}

/// What the culler last found for one running server: shown to its owner
/// and in the REST model as `berth.cull`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CullStatus {
    /// The idle timeout that applies (0: not idle-culled).
    pub idle_timeout_seconds: u64,
    /// The maximum age that applies (0: none).
    pub max_age_seconds: u64,
    /// Unix ms of the check.
    pub checked_at_ms: i64,
    /// Unix ms of the latest sign of life seen on any signal.
    pub last_activity_ms: i64,
    /// Signals alive at the check ("a kernel is busy", "an SSH session is open", …).
    pub active: Vec<String>,
    /// Signals that could not be read; while any is, no idle cull.
    pub unknown: Vec<String>,
    /// When the server will be stopped, once its owner was warned.
    pub cull_at_ms: Option<i64>,
    /// Why it will be (`idle for 2 h`, `maximum age 12 h reached`).
    pub reason: Option<String>,
    /// Whether Extend can push the cull back (not for the maximum age).
    pub extendable: bool,
}

impl CullStatus {
    pub fn warned(&self) -> bool {
        self.cull_at_ms.is_some()
    }
}

/// The culler's memory of one running server.
#[derive(Debug, Clone)]
struct Watch {
    /// `started` of the run this is about (a new start forgets the old run).
    started: i64,
    /// The latest sign of life seen, never moving back.
    last_seen: i64,
    warned_at: Option<i64>,
    status: Option<CullStatus>,
}

/// A kernel-reading credential for one run of one server.
struct KernelToken {
    secret: String,
    started: i64,
    expires_at: i64,
}

/// What reading a server's kernels found.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Kernels {
    pub busy: usize,
    pub last_activity: Option<i64>,
}

/// What [`Servers::signals`] read of one running server.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Signals {
    /// Unix ms of the latest sign of life.
    pub last_activity: i64,
    /// Signals alive now.
    pub active: Vec<String>,
    /// Signals that could not be read.
    pub unknown: Vec<String>,
}

impl Signals {
    /// Nothing alive, nothing unknown, and no sign of life for `d`.
    pub(crate) fn idle_for(&self, d: Duration, now: i64) -> bool {
        self.active.is_empty() && self.unknown.is_empty() && now.saturating_sub(self.last_activity) >= ms(d)
    }
}

/// The culler's state: configuration, the servers it watches, SSH sessions
/// counted per server, and the kernel-reading tokens.
#[derive(Default)]
pub struct Culler {
    cfg: CullConfig,
    overrides: HashMap<String, Duration>,
    watches: Mutex<HashMap<ServerId, Watch>>,
    ssh: Mutex<HashMap<(String, String), u32>>,
    tokens: Mutex<HashMap<ServerId, KernelToken>>,
    /// The last cull of each server since berth started: (unix ms, reason).
    culled: Mutex<HashMap<ServerId, (i64, String)>>,
}

impl Culler {
    pub fn new(cfg: CullConfig) -> Result<Culler, String> {
        let overrides = cfg.overrides()?;
        Ok(Culler { cfg, overrides, ..Culler::default() })
    }

    pub fn cfg(&self) -> &CullConfig {
        &self.cfg
    }

    /// Whether any server can be culled at all (else the job does not run).
    pub fn enabled(&self) -> bool {
        !self.cfg.idle_timeout_seconds.is_zero()
            || !self.cfg.max_age_seconds.is_zero()
            || self.overrides.values().any(|d| !d.is_zero())
    }

    pub fn interval(&self) -> Duration {
        self.cfg.interval_seconds.max(Duration::from_secs(1))
    }

    /// The idle timeout of a server running `template` (its own field given):
    /// the configured override, else the template's own, else the global one.
    pub fn timeout_for(&self, template: &str, own: Option<u64>) -> Duration {
        if let Some(d) = self.overrides.get(template) {
            return *d;
        }
        match own {
            Some(s) if !template.is_empty() => Duration::from_secs(s),
            _ => self.cfg.idle_timeout_seconds,
        }
    }

    /// An SSH connection logged in to `user`'s server `server`.
    pub fn ssh_opened(&self, user: &str, server: &str) {
        if let Ok(mut m) = self.ssh.lock() {
            *m.entry((user.to_string(), server.to_string())).or_insert(0) += 1;
        }
    }

    /// That connection ended.
    pub fn ssh_closed(&self, user: &str, server: &str) {
        if let Ok(mut m) = self.ssh.lock() {
            let key = (user.to_string(), server.to_string());
            if let Some(n) = m.get_mut(&key) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    m.remove(&key);
                }
            }
        }
    }

    /// Open SSH sessions to the server.
    pub fn ssh_open(&self, id: &ServerId) -> u32 {
        self.ssh
            .lock()
            .ok()
            .and_then(|m| m.get(&(id.user().to_string(), id.server().to_string())).copied())
            .unwrap_or(0)
    }

    /// What the last check found for the server, if it is watched.
    pub fn status(&self, id: &ServerId) -> Option<CullStatus> {
        self.watches.lock().ok()?.get(id)?.status.clone()
    }

    /// The statuses of `users`' watched servers, for a list of them (only
    /// theirs are copied: a page of 200 users out of thousands).
    pub fn statuses_of<S: AsRef<str>>(&self, users: &[S]) -> CullStatuses {
        let mut out = CullStatuses::default();
        let Ok(m) = self.watches.lock() else { return out };
        if m.is_empty() {
            return out;
        }
        let wanted: std::collections::HashSet<&str> = users.iter().map(AsRef::as_ref).collect();
        for (id, w) in m.iter().filter(|(id, _)| wanted.contains(id.user())) {
            if let Some(st) = &w.status {
                out.0.entry(id.user().to_string()).or_default().insert(id.server().to_string(), st.clone());
            }
        }
        out
    }

    /// Warnings of `user`'s servers (by server name), for the banner on their pages.
    pub fn warnings_of(&self, user: &str) -> Vec<(String, CullStatus)> {
        let mut v: Vec<(String, CullStatus)> = match self.watches.lock() {
            Ok(m) => m
                .iter()
                .filter(|(id, _)| id.user() == user)
                .filter_map(|(id, w)| Some((id.server().to_string(), w.status.clone().filter(|s| s.warned())?)))
                .collect(),
            Err(_) => Vec::new(),
        };
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// When and why the server was last culled (since berth started).
    pub fn last_cull(&self, id: &ServerId) -> Option<(i64, String)> {
        self.culled.lock().ok()?.get(id).cloned()
    }
}

/// `45 s`, `5 min`, `2 h`, `2 h 5 min`.
pub fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        s if s < 120 => format!("{s} s"),
        s if s < 7200 => format!("{} min", s / 60),
        s if s % 3600 / 60 == 0 => format!("{} h", s / 3600),
        s => format!("{} h {} min", s / 3600, s % 3600 / 60),
    }
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// What one check decides for one server, from what it observed: a pure
/// function, tested with a table.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Decision {
    /// Nothing to do; no warning.
    Keep,
    /// Warn (or keep warning): stopped at `cull_at` unless something happens.
    Warn { cull_at: i64, reason: String, extendable: bool },
    /// Stop it now.
    Cull { reason: String },
}

pub(crate) struct Observed {
    pub now: i64,
    pub started: i64,
    pub last_activity: i64,
    pub any_unknown: bool,
    pub timeout: Duration,
    pub max_age: Duration,
    pub warning: Duration,
    pub warned_at: Option<i64>,
}

pub(crate) fn decide(o: &Observed) -> Decision {
    let idle_due = (!o.timeout.is_zero() && !o.any_unknown).then(|| o.last_activity.saturating_add(ms(o.timeout)));
    let age_due = (!o.max_age.is_zero()).then(|| o.started.saturating_add(ms(o.max_age)));
    let (due, by_age) = match (idle_due, age_due) {
        (Some(i), Some(a)) if a < i => (a, true),
        (Some(i), _) => (i, false),
        (None, Some(a)) => (a, true),
        (None, None) => return Decision::Keep,
    };
    if o.now.saturating_add(ms(o.warning)) < due {
        return Decision::Keep;
    }
    // The owner always gets the whole warning, however late it starts.
    let warned_at = o.warned_at.unwrap_or(o.now);
    let cull_at = due.max(warned_at.saturating_add(ms(o.warning)));
    let idle = Duration::from_millis(u64::try_from(o.now.saturating_sub(o.last_activity)).unwrap_or(0));
    let reason =
        if by_age { format!("maximum age {} reached", human(o.max_age)) } else { format!("idle for {}", human(idle)) };
    if o.warned_at.is_some() && o.now >= cull_at {
        Decision::Cull { reason }
    } else {
        Decision::Warn { cull_at, reason, extendable: !by_age }
    }
}

#[derive(Deserialize)]
struct KernelModel {
    #[serde(default)]
    execution_state: String,
    #[serde(default)]
    last_activity: Option<String>,
}

/// `2026-11-22T06:12:46.254673Z` (or with an offset) as unix ms.
fn parse_time(s: &str) -> Option<i64> {
    use time::format_description::well_known::Rfc3339;
    let t = time::OffsetDateTime::parse(s, &Rfc3339).ok()?;
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()
}

/// Reads `GET /api/kernels` as jupyter_server answers it.
pub(crate) fn parse_kernels(body: &[u8]) -> Result<Kernels, String> {
    let list: Vec<KernelModel> =
        serde_json::from_slice(body).map_err(|e| format!("the kernel list is not what Jupyter sends: {e}"))?;
    Ok(Kernels {
        busy: list.iter().filter(|k| matches!(k.execution_state.as_str(), "busy" | "starting")).count(),
        last_activity: list.iter().filter_map(|k| k.last_activity.as_deref().and_then(parse_time)).max(),
    })
}

impl Servers {
    /// One pass of the culler over the running servers: signals read,
    /// owners warned, servers past their warning stopped. Never fails: what
    /// cannot be read keeps servers running.
    pub async fn cull_check(self: &Arc<Self>) {
        if !self.culler.enabled() {
            return;
        }
        let records = match self.store.list_servers(None).await {
            Ok(r) => r,
            Err(e) => return tracing::warn!(error = %e, "culling skipped: the servers could not be read"),
        };
        // Without the allocations nobody knows who holds a GPU: no culls.
        let allocations = match self.store.gpu_allocations().await {
            Ok(a) => a,
            Err(e) => return tracing::warn!(error = %e, "culling skipped: the GPU allocations could not be read"),
        };
        let mut running = Vec::new();
        for record in records.into_iter().filter(|r| r.state == ServerState::Running) {
            let Ok(id) = ServerId::parse(&record.user, &record.name) else { continue };
            let devices: Vec<String> = allocations
                .iter()
                .filter(|(_, u, s)| *u == record.user && *s == record.name)
                .map(|(d, _, _)| d.clone())
                .collect();
            running.push(id.clone());
            self.check_one(id, record, devices).await;
        }
        if let Ok(mut w) = self.culler.watches.lock() {
            w.retain(|id, _| running.contains(id));
        }
        if let Ok(mut t) = self.culler.tokens.lock() {
            t.retain(|id, _| running.contains(id));
        }
    }

    async fn check_one(self: &Arc<Self>, id: ServerId, record: Server, devices: Vec<String>) {
        let now = now_ms();
        let c = &self.culler;
        let options = UserOptions::from_record(&record.user_options);
        let template_id = options.template.clone().unwrap_or_else(|| record.template.clone());
        let template = self.templates.lookup(&template_id);
        let timeout = c.timeout_for(&template_id, template.and_then(|t| t.idle_timeout_seconds));
        let max_age = c.cfg.max_age_seconds;
        let started = record.started.unwrap_or(now);
        if timeout.is_zero() && max_age.is_zero() {
            if let Ok(mut w) = c.watches.lock() {
                w.remove(&id);
            }
            return;
        }
        let (mut last_seen, warned_at) = match c.watches.lock().ok().and_then(|w| w.get(&id).cloned()) {
            Some(w) if w.started == started => (w.last_seen, w.warned_at),
            _ => (started, None),
        };
        let (last, active, unknown) = if timeout.is_zero() {
            let last = last_seen
                .max(started)
                .max(record.last_activity.unwrap_or(0))
                .max(self.activity.pending_server(id.user(), id.server()).unwrap_or(0));
            (last, Vec::new(), Vec::new())
        } else {
            let jupyter = template.is_none_or(|t| t.protocol == AppProtocol::Jupyter);
            let s = self.signals(&id, &record, &devices, last_seen, jupyter, now).await;
            (s.last_activity, s.active, s.unknown)
        };
        last_seen = last;
        let decision = decide(&Observed {
            now,
            started,
            last_activity: last,
            any_unknown: !unknown.is_empty(),
            timeout,
            max_age,
            warning: c.cfg.warning_seconds,
            warned_at,
        });
        let mut status = CullStatus {
            idle_timeout_seconds: timeout.as_secs(),
            max_age_seconds: max_age.as_secs(),
            checked_at_ms: now,
            last_activity_ms: last,
            active,
            unknown,
            cull_at_ms: None,
            reason: None,
            extendable: true,
        };
        let mut new_warned = None;
        let mut cull = None;
        match decision {
            Decision::Keep => {
                if warned_at.is_some() {
                    tracing::info!(server = %id, "activity resumed: the cull warning is over");
                }
            }
            Decision::Warn { cull_at, reason, extendable } => {
                status.cull_at_ms = Some(cull_at);
                status.reason = Some(reason.clone());
                status.extendable = extendable;
                new_warned = Some(warned_at.unwrap_or(now));
                if warned_at.is_none() {
                    self.warn_owner(&id, cull_at, &reason, extendable, now).await;
                }
            }
            Decision::Cull { reason } => cull = Some(reason),
        }
        if let Ok(mut w) = c.watches.lock() {
            w.insert(id.clone(), Watch { started, last_seen, warned_at: new_warned, status: Some(status) });
        }
        if let Some(reason) = cull {
            self.cull(&id, &reason).await;
        }
    }

    /// Reads every sign of life of a running server: the latest seen
    /// (never before `since` or its start), what is alive now, and what
    /// could not be read. Life seen now is written into its
    /// `last_activity`, so an external culler sees it too.
    pub(crate) async fn signals(
        self: &Arc<Self>,
        id: &ServerId,
        record: &Server,
        devices: &[String],
        since: i64,
        jupyter: bool,
        now: i64,
    ) -> Signals {
        let started = record.started.unwrap_or(now);
        let mut last = since
            .max(started)
            .max(record.last_activity.unwrap_or(0))
            .max(self.activity.pending_server(id.user(), id.server()).unwrap_or(0));
        let mut active = Vec::new();
        let mut unknown = Vec::new();
        let ssh = self.culler.ssh_open(id);
        if ssh > 0 {
            active.push(if ssh == 1 {
                "an SSH session is open".to_string()
            } else {
                format!("{ssh} SSH sessions are open")
            });
        }
        self.gpu_signals(devices, now, &mut last, &mut active, &mut unknown);
        if jupyter {
            match self.read_kernels(id, record, started).await {
                Ok(k) => {
                    if k.busy > 0 {
                        active.push(if k.busy == 1 {
                            "a kernel is busy".to_string()
                        } else {
                            format!("{} kernels are busy", k.busy)
                        });
                    }
                    if let Some(t) = k.last_activity {
                        let t = t.min(now);
                        if t > last {
                            self.activity.server(id.user(), id.server(), t);
                        }
                        last = last.max(t);
                    }
                }
                Err(e) => unknown.push(format!("its kernels could not be read: {e}")),
            }
        }
        if !active.is_empty() {
            last = now;
            self.activity.server(id.user(), id.server(), now);
        }
        Signals { last_activity: last, active, unknown }
    }

    fn gpu_signals(
        &self,
        devices: &[String],
        now: i64,
        last: &mut i64,
        active: &mut Vec<String>,
        unknown: &mut Vec<String>,
    ) {
        if devices.is_empty() {
            return;
        }
        let telemetry = &self.gpus.telemetry;
        let snap = telemetry.snapshot(now);
        for dev in devices {
            if let Some(idle) = telemetry.idle_for(dev, now) {
                *last = (*last).max(now.saturating_sub(ms(idle)));
                continue;
            }
            // Not seen idle: busy when the sample says so, otherwise unknown.
            let reading = (snap.state == SampleState::Ok).then(|| snap.gpu(dev)).flatten();
            match reading.and_then(|r| r.utilization_percent) {
                Some(u) if u >= self.gpus.cfg.idle_below_percent => active.push(format!("GPU {dev} is at {u} %")),
                _ => {
                    let why = match &snap.state {
                        SampleState::Unknown { reason } => reason.clone(),
                        SampleState::Off => "GPU utilisation is not sampled".into(),
                        SampleState::Pending => "no sample yet".into(),
                        SampleState::Ok if reading.is_none() => "not in the sample".into(),
                        SampleState::Ok => "utilisation not reported".into(),
                    };
                    unknown.push(format!("GPU {dev} utilisation unknown ({why})"));
                }
            }
        }
    }

    /// Tells the owner their server will be stopped: a progress event (the
    /// banner and the model read the status), the log, an event.
    async fn warn_owner(&self, id: &ServerId, cull_at: i64, reason: &str, extendable: bool, now: i64) {
        let mins = Duration::from_millis(u64::try_from(cull_at.saturating_sub(now)).unwrap_or(0));
        let message = if extendable {
            format!("{reason}: berth stops this server in {} unless it is used or extended", human(mins))
        } else {
            format!("{reason}: berth stops this server in {}", human(mins))
        };
        tracing::info!(server = %id, %reason, cull_at, "warned the owner of a cull");
        if let Some(log) = self.progress_log(id) {
            log.push(ProgressEvent::cull_warning(&message, cull_at));
        }
        let _ = self.store.add_event(id.user(), "cull-warning", &id.to_string(), &message).await;
    }

    /// Stops a server the culler chose, through the normal stop (volumes kept).
    async fn cull(self: &Arc<Self>, id: &ServerId, reason: &str) {
        tracing::info!(server = %id, %reason, "culling the server");
        if let Ok(mut m) = self.culler.culled.lock() {
            m.insert(id.clone(), (now_ms(), reason.to_string()));
        }
        let _ = self.store.add_event(id.user(), "cull", &id.to_string(), reason).await;
        let me = self.clone();
        let target = id.clone();
        let reason = format!("culled: {reason}");
        self.track(
            async move {
                if let Err(e) = me.stop_because(&target, &reason).await {
                    tracing::warn!(server = %target, error = %e, "the cull's stop failed");
                }
            },
            tracing::info_span!("cull", server = %id),
        );
    }

    /// Extend: counts as activity now, so the idle window starts again and
    /// a warning ends. A maximum-age cull cannot be pushed back.
    pub async fn extend_cull(&self, caller: &crate::identity::Caller, id: &ServerId) -> HubResult<Option<CullStatus>> {
        caller.require("servers", berth_core::Target::Server { user: id.user(), server: id.server() })?;
        let record = self
            .store
            .get_server(id.user(), id.server())
            .await?
            .ok_or_else(|| HubError::NoSuchServer { user: id.user().into(), server: id.server().into() })?;
        if record.state != ServerState::Running {
            return Err(HubError::NotRunning { server: id.to_string() });
        }
        let now = now_ms();
        if let Some(s) = self.culler.status(id) {
            if s.warned() && !s.extendable {
                return Err(HubError::CullNotExtendable {
                    server: id.to_string(),
                    reason: s.reason.unwrap_or_default(),
                });
            }
        }
        self.activity.server(id.user(), id.server(), now);
        let status = match self.culler.watches.lock() {
            Ok(mut w) => w.get_mut(id).map(|w| {
                w.last_seen = w.last_seen.max(now);
                w.warned_at = None;
                if let Some(s) = w.status.as_mut() {
                    s.cull_at_ms = None;
                    s.reason = None;
                    s.last_activity_ms = w.last_seen;
                }
                w.status.clone()
            }),
            Err(_) => None,
        };
        let _ = self.store.add_event(id.user(), "cull-extend", &id.to_string(), "").await;
        tracing::info!(server = %id, "the owner extended the server");
        Ok(status.flatten())
    }

    /// The token the culler reads kernels with, made when missing or old.
    async fn kernel_token(&self, id: &ServerId, started: i64) -> Result<String, String> {
        let now = now_ms();
        if let Ok(t) = self.culler.tokens.lock() {
            if let Some(t) = t.get(id).filter(|t| t.started == started && t.expires_at > now + 600_000) {
                return Ok(t.secret.clone());
            }
        }
        let secret = new_token();
        let expires_at = now + 3_600_000;
        self.store
            .create_token(&NewToken {
                hash: hash_token(secret.expose()),
                user: id.user().to_string(),
                kind: TokenKind::Server,
                server: Some(id.server().to_string()),
                scopes: vec![format!("access:servers!server={}/{}", id.user(), id.server())],
                note: "berth's culler: reads this server's kernel states".into(),
                expires_at: Some(expires_at),
                session_id: None,
                oauth_client: None,
            })
            .await
            .map_err(|e| format!("no token to read them with: {e}"))?;
        let s = secret.expose().to_string();
        if let Ok(mut t) = self.culler.tokens.lock() {
            t.insert(id.clone(), KernelToken { secret: s.clone(), started, expires_at });
        }
        Ok(s)
    }

    /// `GET <target><prefix>api/kernels` of a running Jupyter server.
    async fn read_kernels(&self, id: &ServerId, record: &Server, started: i64) -> Result<Kernels, String> {
        let state = crate::servers::SpawnerState::from_record(&record.spawner_state);
        let target = self.spawner.target(state.value()).ok_or("the server has no address")?;
        let token = self.kernel_token(id, started).await?;
        let url = format!("{}{}api/kernels?no_track_activity=1", target.trim_end_matches('/'), self.prefix(id));
        let req = http::Request::get(url.as_str())
            .header(http::header::AUTHORIZATION, format!("token {token}"))
            .header(http::header::ACCEPT, "application/json")
            .body(Empty::<Bytes>::new())
            .map_err(|e| format!("bad address {url}: {e}"))?;
        let fetch = async {
            let resp = self.http.request(req).await.map_err(|e| format!("{url}: {e}"))?;
            let status = resp.status();
            let body =
                Limited::new(resp.into_body(), 4 << 20).collect().await.map_err(|e| format!("{url}: {e}"))?.to_bytes();
            if !status.is_success() {
                return Err(format!("{url} answered {status}"));
            }
            parse_kernels(&body)
        };
        match tokio::time::timeout(Duration::from_secs(10), fetch.instrument(tracing::debug_span!("kernels"))).await {
            Ok(r) => r,
            Err(_) => Err(format!("{url} did not answer within 10 s")),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const MIN: i64 = 60_000;

    fn obs(now: i64, last: i64, warned_at: Option<i64>) -> Observed {
        Observed {
            now,
            started: 0,
            last_activity: last,
            any_unknown: false,
            timeout: Duration::from_secs(600),
            max_age: Duration::ZERO,
            warning: Duration::from_secs(120),
            warned_at,
        }
    }

    #[test]
    fn decisions() {
        // Active 5 min ago, timeout 10 min, warning 2 min: nothing yet.
        assert_eq!(decide(&obs(5 * MIN, 0, None)), Decision::Keep);
        // 8 min idle: the warning starts, the cull is due at 10 min.
        assert_eq!(
            decide(&obs(8 * MIN, 0, None)),
            Decision::Warn { cull_at: 10 * MIN, reason: "idle for 8 min".into(), extendable: true }
        );
        // First seen at 30 min idle (berth was down): still the whole warning.
        assert!(matches!(decide(&obs(30 * MIN, 0, None)), Decision::Warn { cull_at, .. } if cull_at == 32 * MIN));
        // Warned at 8, at 10 min: culled.
        assert_eq!(decide(&obs(10 * MIN, 0, Some(8 * MIN))), Decision::Cull { reason: "idle for 10 min".into() });
        // Not warned yet at 10 min (checks are rare): warned, not culled.
        assert!(matches!(decide(&obs(10 * MIN, 0, None)), Decision::Warn { .. }));
        // Activity during the warning: back to nothing.
        assert_eq!(decide(&obs(9 * MIN, 9 * MIN, Some(8 * MIN))), Decision::Keep);
        // A signal unknown: never an idle cull, however long.
        let mut o = obs(100 * MIN, 0, Some(8 * MIN));
        o.any_unknown = true;
        assert_eq!(decide(&o), Decision::Keep);
        // ... but the maximum age applies, and cannot be extended.
        o.max_age = Duration::from_secs(3600);
        assert_eq!(decide(&o), Decision::Cull { reason: "maximum age 60 min reached".into() });
        o.warned_at = None;
        assert!(matches!(decide(&o), Decision::Warn { extendable: false, .. }));
        // Both off: nothing.
        let mut o = obs(100 * MIN, 0, None);
        o.timeout = Duration::ZERO;
        assert_eq!(decide(&o), Decision::Keep);
    }

    #[test]
    fn template_timeouts_are_read_and_override() {
        let cfg = CullConfig {
            idle_timeout_seconds: Duration::from_secs(3600),
            template_timeouts: vec!["pytorch=7200".into(), " comfyui = 0 ".into()],
            ..CullConfig::default()
        };
        let c = Culler::new(cfg).unwrap();
        assert!(c.enabled());
        assert_eq!(c.timeout_for("pytorch", Some(60)), Duration::from_secs(7200), "config beats the template");
        assert_eq!(c.timeout_for("comfyui", None), Duration::ZERO, "0: never idle-culled");
        assert_eq!(c.timeout_for("jupyterlab", Some(60)), Duration::from_secs(60), "the template's own");
        assert_eq!(c.timeout_for("", None), Duration::from_secs(3600), "the global one");
        for bad in ["pytorch", "pytorch=soon", "=5"] {
            let cfg = CullConfig { template_timeouts: vec![bad.into()], ..CullConfig::default() };
            assert!(Culler::new(cfg).is_err(), "{bad}");
        }
        assert!(!Culler::new(CullConfig::default()).unwrap().enabled(), "off by default");
    }

    #[test]
    fn kernel_lists_as_jupyter_server_sends_them() {
        let body = br#"[{"id":"a","name":"python3","last_activity":"2026-11-22T06:12:46.254673Z","execution_state":"idle","connections":0},
                       {"id":"b","name":"python3","last_activity":"2026-11-22T06:10:00.000000Z","execution_state":"busy","connections":1}]"#;
        let k = parse_kernels(body).unwrap();
        assert_eq!(k, Kernels { busy: 1, last_activity: Some(1_795_327_966_254) });
        assert_eq!(parse_kernels(b"[]").unwrap(), Kernels { busy: 0, last_activity: None });
        assert!(parse_kernels(b"<html>login</html>").is_err());
    }

    #[test]
    fn ssh_sessions_are_counted_per_server() {
        let c = Culler::default();
        let id = ServerId::parse("alice", "").unwrap();
        c.ssh_opened("alice", "");
        c.ssh_opened("alice", "");
        c.ssh_opened("alice", "lab");
        assert_eq!(c.ssh_open(&id), 2);
        c.ssh_closed("alice", "");
        c.ssh_closed("alice", "");
        c.ssh_closed("alice", "");
        assert_eq!(c.ssh_open(&id), 0);
        assert_eq!(c.ssh_open(&ServerId::parse("alice", "lab").unwrap()), 1);
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(human(Duration::from_secs(45)), "45 s");
        assert_eq!(human(Duration::from_secs(300)), "5 min");
        assert_eq!(human(Duration::from_secs(7200)), "2 h");
        assert_eq!(human(Duration::from_secs(7500)), "2 h 5 min");
    }
}
