//! What the hub refuses, and why, as structured variants. The front ends
//! (REST API, pages, SSH gateway) pick status codes and wording from the
//! variant; `Display` is the text a user may see. Operator-only detail
//! (who holds the GPUs, internal causes) is kept apart: [`HubError::detail`].

use berth_core::gpu::Shortage;

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    // --- names and accounts
    #[error("No such user: {user}")]
    NoSuchUser { user: String },
    #[error("{user} has no server named {server:?}")]
    NoSuchServer { user: String, server: String },
    #[error("User {user} already exists")]
    UserExists { user: String },
    #[error("All {count} users already exist")]
    AllUsersExist { count: usize },
    #[error("{0}")]
    Name(#[from] berth_core::NameError),
    #[error("{user} is not authorized")]
    NotAuthorized { user: String },
    /// An admin tried to do to themselves what only another admin may.
    #[error("{}", self_action_text(*.action))]
    SelfAction { action: SelfAction },
    #[error("stop {user}'s servers before {action}")]
    ServersRunning { user: String, action: &'static str },
    #[error("{0}")]
    Password(#[from] berth_auth::PasswordError),
    #[error("the new password and its confirmation differ")]
    PasswordMismatch,
    #[error("the current password is wrong")]
    WrongPassword,
    #[error("this setup link is not valid: it was used, or berth printed a newer one when it last started")]
    SetupClosed,

    // --- scopes
    #[error("Action is not authorized with current scopes; requires any of [{scope}]")]
    MissingScope { scope: String },
    #[error("Not assigning requested scopes {scopes} not held by {holder}")]
    ScopesNotHeld { scopes: String, holder: String },

    // --- servers
    #[error("{server} is already running")]
    AlreadyRunning { server: String },
    #[error("{server} is pending spawn")]
    PendingSpawn { server: String },
    #[error("{server} is pending stop")]
    PendingStop { server: String },
    #[error("{server} is pending, try again once it has finished")]
    Busy { server: String },
    #[error("{server} is not stopped")]
    NotStopped { server: String },
    #[error("the server is still stopping; remove it once it has stopped")]
    StillStopping,
    #[error("{user} already has {} named servers ({}; the limit is {limit}); delete one first", running.len(), running.join(", "))]
    NamedServerLimit { user: String, limit: u32, running: Vec<String> },
    #[error("this hub runs its maximum of {limit} servers; try again when one stops")]
    HubFull { limit: u32 },
    #[error("{limit} servers are starting at once, the most this hub allows; try again in a moment")]
    TooManyStarting { limit: u32 },
    #[error("illegal server state change: {0}")]
    Transition(#[from] berth_core::TransitionError),
    #[error("{message}")]
    Spawner { message: String },
    #[error("{server} is not running")]
    NotRunning { server: String },
    #[error("{server} will be stopped ({reason}); the maximum age cannot be extended")]
    CullNotExtendable { server: String, reason: String },
    #[error("the {spawner} spawner here cannot run your server under an account of your own (berth is not running as root), so only the admin may start one; ask the admin to use the Docker spawner")]
    NotIsolated { spawner: &'static str },

    // --- templates and options
    #[error("{user} may not start the template {template:?}; allowed: {}", if allowed.is_empty() { "none".to_string() } else { allowed.join(", ") })]
    TemplateNotAllowed { user: String, template: String, allowed: Vec<String> },
    #[error("no template {template:?} here; the choices are: {}", choices.join(", "))]
    UnknownTemplate { template: String, choices: Vec<String> },
    #[error("{name} takes between {min} and {max} GPUs, not {asked}")]
    GpuCountOutOfRange { name: String, min: u32, max: u32, asked: u64 },
    #[error("{name} works only on its own host name; an admin must set templates.app_domain to a wildcard domain")]
    NeedsHostRouting { name: String },
    #[error("invalid user options: {message}")]
    BadOptions { message: String },
    #[error("the image {image:?} may not be chosen here; an admin allows images in spawner.allowed_images")]
    ImageNotAllowed { image: String },

    // --- GPUs
    #[error("GPUs are turned off on this hub (gpu.mode / ENABLE_GPU_SUPPORT is 0)")]
    GpusOff,
    #[error("a server may ask for at most {max} GPUs")]
    TooManyGpus { max: u32 },
    #[error("{}", shortage.for_users())]
    NoGpus { shortage: Shortage },
    #[error("no GPU {id} in the inventory")]
    NoSuchGpu { id: String },
    #[error("{wanted} GPUs asked for, but this hub has only {total}")]
    GpusExceedInventory { wanted: usize, total: usize },
    #[error("{server} is not waiting for a GPU")]
    NotQueued { server: String },
    #[error("position {position} is outside the GPU queue (1 to {len})")]
    QueuePosition { position: usize, len: usize },
    /// The GPU-hour quota of the period is used up (`crate::usage`).
    #[error(
        "{user} has used {} of {} GPU-hours {}; {} left; renews {}",
        used_text(*used_hours),
        crate::usage::hours_text(*quota_hours),
        period.this(),
        crate::usage::hours_text((quota_hours - used_hours).max(0.0)),
        crate::usage::when_utc(*renews_ms)
    )]
    GpuQuota { user: String, used_hours: f64, quota_hours: f64, period: crate::usage::Period, renews_ms: i64 },
    #[error("a GPU-hour quota is a number of hours, 0 (unlimited) or more, not {hours:?}")]
    BadQuota { hours: String },

    // --- tokens, keys, OAuth
    #[error("No such token: {id}")]
    NoSuchToken { id: String },
    #[error("{0}")]
    BadToken(String),
    #[error("{0}")]
    BadKey(String),
    #[error("{user} already has {max} keys; remove one first")]
    TooManyKeys { user: String, max: usize },
    #[error(
        "the key {fingerprint} is already registered (to this or another account); each key can belong to one account"
    )]
    KeyExists { fingerprint: String },
    #[error("{user} has no key {key}")]
    NoSuchKey { user: String, key: String },
    #[error("{0}")]
    OAuth(String),

    // --- the admin console
    #[error("{user} has no live session {session}")]
    NoSuchSession { user: String, session: String },
    #[error("invalid announcement: {message}")]
    BadAnnouncement { message: String },
    #[error("invalid event filter: {message}")]
    BadEventFilter { message: String },

    // --- the hub itself
    #[error("the hub is busy checking passwords; try again in a moment")]
    Busy503,
    #[error("internal error; see the hub's log")]
    Internal(String),
    #[error(transparent)]
    Store(#[from] berth_store::StoreError),
}

/// Things an admin may not do to their own account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SelfAction {
    Unauthorize,
    RemoveAdmin,
    Delete,
}

fn self_action_text(a: SelfAction) -> &'static str {
    match a {
        SelfAction::Unauthorize => "you cannot unauthorize yourself",
        SelfAction::RemoveAdmin => "you cannot remove your own admin rights; ask another admin",
        SelfAction::Delete => "Cannot delete yourself!",
    }
}

/// Used hours with at least one decimal (`10.0`, `0.0003`).
fn used_text(h: f64) -> String {
    let t = crate::usage::hours_text(h);
    if t.contains('.') {
        t
    } else {
        format!("{t}.0")
    }
}

impl HubError {
    /// What an admin may be told beyond [`Display`]: who holds the GPUs.
    pub fn detail(&self) -> String {
        match self {
            HubError::NoGpus { shortage } => shortage.for_admins(),
            other => other.to_string(),
        }
    }

    pub fn missing_scope(scope: &str) -> HubError {
        HubError::MissingScope { scope: scope.to_string() }
    }

    /// Logs the cause; callers see only that something failed inside.
    pub fn internal(cause: impl std::fmt::Display) -> HubError {
        tracing::error!(error = %cause, "internal error");
        HubError::Internal(cause.to_string())
    }
}

pub type HubResult<T> = Result<T, HubError>;
