//! What the people who run the machine do from the admin console: every
//! server at a glance (and starting or stopping someone else's), live
//! sessions (and revoking one), the event log, the hub-wide announcement,
//! and the admin actions that were recorded by the pages before (GPU share
//! toggles, template builds, per-user limits). Each checks the caller's
//! scopes and records one event naming the acting admin:
//! `admin-server-start`, `admin-server-stop`, `session-revoke`,
//! `announcement-set`, `announcement-clear`, `gpu-share`, `gpu-exclusive`,
//! `template-build`, `limits`. (Account changes record theirs in
//! `accounts.rs`; a server's own `start`/`stop` events name its owner.)

use std::time::Duration;

use berth_core::{ServerId, ServerState, Target, UserName};
use berth_store::{now_ms, Event, EventQuery, UserLimits};
use serde::{Deserialize, Serialize};

use crate::error::{HubError, HubResult};
use crate::identity::{Caller, Via};
use crate::servers::UserOptions;
use crate::Hub;

/// The settings key the announcement is kept under (as JSON).
const ANNOUNCEMENT_KEY: &str = "announcement";
/// The longest announcement, in characters: a banner, not a page.
pub const ANNOUNCEMENT_MAX_CHARS: usize = 2000;
/// The most events one page of the log holds.
pub const EVENTS_MAX_PAGE: i64 = 1000;

/// The message every hub page shows, until it is cleared or expires.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announcement {
    pub message: String,
    /// Unix ms; none: until cleared.
    pub expires_at: Option<i64>,
    pub set_by: String,
    pub set_at: i64,
}

impl Announcement {
    pub fn is_live(&self, now: i64) -> bool {
        self.expires_at.is_none_or(|t| t > now)
    }
}

/// One server as the console lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerRow {
    pub user: String,
    /// "" is the default server.
    pub name: String,
    pub template: String,
    /// The image it runs or ran: chosen by name, or its template's; "" when
    /// the spawner's default (or a local process).
    pub image: String,
    pub state: ServerState,
    /// When the current (or last) start began.
    pub since: Option<i64>,
    pub last_activity: Option<i64>,
    pub gpus: Vec<String>,
    pub last_error: Option<String>,
    /// Where it is reached while it runs.
    pub url: Option<String>,
}

impl ServerRow {
    pub fn id(&self) -> String {
        if self.name.is_empty() {
            self.user.clone()
        } else {
            format!("{}/{}", self.user, self.name)
        }
    }
}

/// A live browser session as the console lists it (never its secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRow {
    pub user: String,
    /// Not a credential (what `jupyterhub-session-id` carries): what a revoke names.
    pub public_id: String,
    pub created: i64,
    pub last_seen: i64,
    /// The session the caller is using.
    pub current: bool,
}

impl Hub {
    async fn record(&self, caller: &Caller, kind: &str, subject: &str, detail: &str) {
        if let Err(e) = self.store.add_event(caller.name(), kind, subject, detail).await {
            tracing::warn!(error = %e, kind, subject, "could not record an event");
        }
    }

    // ------------------------------------------------------------ servers

    /// Every server the caller may administer, with what the console shows.
    pub async fn server_rows(&self, caller: &Caller) -> HubResult<Vec<ServerRow>> {
        caller.require("admin:servers", Target::Hub)?;
        let allocations = self.store.gpu_allocations().await?;
        let mut rows = Vec::new();
        for s in self.store.list_servers(None).await? {
            if !caller.allows("read:servers", Target::Server { user: &s.user, server: &s.name }) {
                continue;
            }
            let options = UserOptions::from_record(&s.user_options);
            let template = options.template.clone().unwrap_or_else(|| s.template.clone());
            let image = options
                .image
                .clone()
                .or_else(|| self.servers.templates.lookup(&template).map(|t| t.image.clone()))
                .unwrap_or_default();
            let gpus = allocations
                .iter()
                .filter(|(_, u, n)| *u == s.user && *n == s.name)
                .map(|(d, _, _)| d.clone())
                .collect();
            rows.push(ServerRow {
                template,
                image,
                state: s.state,
                since: s.started,
                last_activity: s.last_activity,
                gpus,
                last_error: s.last_error.filter(|_| s.state == ServerState::Stopped),
                url: s.url.filter(|_| s.state == ServerState::Running),
                user: s.user,
                name: s.name,
            });
        }
        rows.sort_by(|a, b| (&a.user, &a.name).cmp(&(&b.user, &b.name)));
        Ok(rows)
    }

    /// Starts a server for whoever may manage it; one started for someone
    /// else is recorded as the caller's. Without options it runs what it
    /// ran last time.
    pub async fn start_server(&self, caller: &Caller, id: &ServerId, options: Option<UserOptions>) -> HubResult<()> {
        caller.require("servers", Target::Server { user: id.user(), server: id.server() })?;
        let options = match options {
            Some(o) => o,
            None => self.servers.implicit_options(id).await?,
        };
        self.servers.start(id, options).await?;
        if caller.name() != id.user() {
            self.record(caller, "admin-server-start", &id.to_string(), "").await;
            tracing::info!(by = %caller.name(), server = %id, "started someone else's server");
        }
        Ok(())
    }

    /// Stops a server for whoever may stop it; `true` when it finished
    /// within `wait`. One stopped for someone else is recorded as the caller's.
    pub async fn stop_server(&self, caller: &Caller, id: &ServerId, wait: Duration) -> HubResult<bool> {
        let target = Target::Server { user: id.user(), server: id.server() };
        if !(caller.allows("servers", target) || caller.allows("delete:servers", target)) {
            return Err(HubError::missing_scope("delete:servers"));
        }
        let state = self.store.get_server(id.user(), id.server()).await?.map(|s| s.state);
        let done = self.servers.stop(id, wait).await?;
        if caller.name() != id.user() && state.is_some_and(|s| s.is_active()) {
            self.record(caller, "admin-server-stop", &id.to_string(), "").await;
            tracing::info!(by = %caller.name(), server = %id, "stopped someone else's server");
        }
        Ok(done)
    }

    // ----------------------------------------------------------- sessions

    /// Live browser sessions: one user's, or everyone's the caller may administer.
    pub async fn session_rows(&self, caller: &Caller, user: Option<&str>) -> HubResult<Vec<SessionRow>> {
        match user {
            Some(u) => caller.require("admin:users", Target::User(u))?,
            None => caller.require("admin:users", Target::Hub)?,
        }
        let since = now_ms() - self.auth.session_max_age_seconds.as_millis() as i64;
        let mine = match &caller.via {
            Via::Session { public_id, .. } => Some(public_id.as_str()),
            _ => None,
        };
        let mut rows = Vec::new();
        for s in self.store.list_sessions(user, since).await? {
            if !caller.allows("admin:users", Target::User(&s.user)) {
                continue;
            }
            rows.push(SessionRow {
                current: mine == Some(s.public_id.as_str()),
                user: s.user,
                public_id: s.public_id,
                created: s.created,
                last_seen: s.last_seen,
            });
        }
        Ok(rows)
    }

    /// Ends one of `user`'s sessions (and what servers were given through
    /// it): the next request with its cookie is anonymous.
    pub async fn revoke_session(&self, caller: &Caller, user: &str, public_id: &str) -> HubResult<()> {
        caller.require("admin:users", Target::User(user))?;
        if !self.store.revoke_session_of(user, public_id).await? {
            return Err(HubError::NoSuchSession { user: user.to_string(), session: public_id.to_string() });
        }
        let tokens = self.store.revoke_session_tokens(public_id).await?;
        self.record(caller, "session-revoke", user, public_id).await;
        tracing::info!(by = %caller.name(), %user, oauth_tokens = tokens, "session revoked");
        Ok(())
    }

    // ---------------------------------------------------------- the log

    /// One page of the event log (`read:events`). The page size is capped
    /// at [`EVENTS_MAX_PAGE`]; a user filter must be a valid name.
    pub async fn events(&self, caller: &Caller, mut q: EventQuery) -> HubResult<(Vec<Event>, i64)> {
        caller.require("read:events", Target::Hub)?;
        if let Some(u) = q.user.take().map(|u| u.trim().to_string()).filter(|u| !u.is_empty()) {
            let name = UserName::normalize(&u)
                .map_err(|e| HubError::BadEventFilter { message: format!("user {u:?}: {e}") })?;
            q.user = Some(name.to_string());
        }
        q.kind = q.kind.map(|k| k.trim().to_string()).filter(|k| !k.is_empty());
        if let (Some(a), Some(b)) = (q.since, q.until) {
            if a >= b {
                return Err(HubError::BadEventFilter {
                    message: "the start of the time range is not before its end".into(),
                });
            }
        }
        if q.offset < 0 {
            return Err(HubError::BadEventFilter { message: "offset must not be negative".into() });
        }
        if q.limit < 1 || q.limit > EVENTS_MAX_PAGE {
            return Err(HubError::BadEventFilter { message: format!("limit must be between 1 and {EVENTS_MAX_PAGE}") });
        }
        Ok(self.store.query_events(&q).await?)
    }

    // --------------------------------------------------- the announcement

    /// The live announcement, if any (expired ones read as none).
    pub async fn announcement(&self) -> HubResult<Option<Announcement>> {
        let cached = self.announcement.read().ok().and_then(|a| a.clone());
        let stored = match cached {
            Some(a) => a,
            None => {
                let stored = match self.store.setting(ANNOUNCEMENT_KEY).await? {
                    None => None,
                    Some(raw) => match serde_json::from_str::<Announcement>(&raw) {
                        Ok(a) => Some(a),
                        Err(e) => {
                            tracing::warn!(error = %e, "the stored announcement is unreadable; showing none");
                            None
                        }
                    },
                };
                self.cache_announcement(stored.clone());
                stored
            }
        };
        Ok(stored.filter(|a| a.is_live(now_ms())))
    }

    fn cache_announcement(&self, a: Option<Announcement>) {
        if let Ok(mut c) = self.announcement.write() {
            *c = Some(a);
        }
    }

    /// Sets the announcement every hub page shows (an admin's), replacing
    /// any other. The message is text (pages escape it); `expires_at`, when
    /// given, must lie ahead.
    pub async fn set_announcement(
        &self,
        caller: &Caller,
        message: &str,
        expires_at: Option<i64>,
    ) -> HubResult<Announcement> {
        caller.require("admin:users", Target::Hub)?;
        let message = message.trim();
        if message.is_empty() {
            return Err(HubError::BadAnnouncement { message: "the message is empty".into() });
        }
        let chars = message.chars().count();
        if chars > ANNOUNCEMENT_MAX_CHARS {
            return Err(HubError::BadAnnouncement {
                message: format!("the message has {chars} characters; at most {ANNOUNCEMENT_MAX_CHARS} fit"),
            });
        }
        if message.chars().any(|c| c.is_control() && c != '\n' && c != '\t') {
            return Err(HubError::BadAnnouncement { message: "the message holds control characters".into() });
        }
        let now = now_ms();
        if expires_at.is_some_and(|t| t <= now) {
            return Err(HubError::BadAnnouncement { message: "the expiry time has passed already".into() });
        }
        let a =
            Announcement { message: message.to_string(), expires_at, set_by: caller.name().to_string(), set_at: now };
        let json = serde_json::to_string(&a).map_err(HubError::internal)?;
        self.store.set_setting(ANNOUNCEMENT_KEY, &json).await?;
        self.cache_announcement(Some(a.clone()));
        let detail = match expires_at {
            Some(t) => format!("{message} (expires at unix ms {t})"),
            None => message.to_string(),
        };
        self.record(caller, "announcement-set", "hub", &detail).await;
        Ok(a)
    }

    /// Clears the announcement; `false` when there was none.
    pub async fn clear_announcement(&self, caller: &Caller) -> HubResult<bool> {
        caller.require("admin:users", Target::Hub)?;
        let had = self.announcement().await?.is_some();
        self.store.delete_setting(ANNOUNCEMENT_KEY).await?;
        self.cache_announcement(None);
        if had {
            self.record(caller, "announcement-clear", "hub", "").await;
        }
        Ok(had)
    }

    // ------------------------------------- admin actions with their events

    /// Marks a GPU shared or exclusive.
    pub async fn set_gpu_shared(&self, caller: &Caller, id: &str, shared: bool) -> HubResult<()> {
        caller.require("admin:servers", Target::Hub)?;
        // Through the lifecycle: a GPU made shared may let a waiting start go.
        self.servers.set_gpu_shared(id, shared).await?;
        self.record(caller, if shared { "gpu-share" } else { "gpu-exclusive" }, id, "").await;
        Ok(())
    }

    /// Builds a template's image in the background (the templates page's button).
    pub async fn build_template(&self, caller: &Caller, id: &str) -> HubResult<()> {
        caller.require("admin:servers", Target::Hub)?;
        self.servers.start_template_build(id)?;
        self.record(caller, "template-build", id, "").await;
        Ok(())
    }

    /// Sets a user's limits (templates must exist on this hub; a GPU-hour
    /// quota is 0 or more hours).
    pub async fn set_user_limits(&self, caller: &Caller, name: &str, limits: &UserLimits) -> HubResult<()> {
        caller.require("admin:users", Target::User(name))?;
        if let Some(h) = limits.gpu_hours_per_period {
            if !h.is_finite() || h < 0.0 {
                return Err(HubError::BadQuota { hours: h.to_string() });
            }
        }
        if let Some(ts) = &limits.templates {
            if let Some(bad) = ts.iter().find(|t| self.servers.templates.get(t).is_none()) {
                return Err(HubError::UnknownTemplate {
                    template: bad.clone(),
                    choices: self.servers.templates.templates().iter().map(|t| t.id.clone()).collect(),
                });
            }
        }
        self.store.set_user_limits(name, limits).await.map_err(|e| match e {
            berth_store::StoreError::NotFound { .. } => HubError::NoSuchUser { user: name.to_string() },
            other => other.into(),
        })?;
        self.record(caller, "limits", name, &serde_json::to_string(limits).unwrap_or_default()).await;
        Ok(())
    }
}
