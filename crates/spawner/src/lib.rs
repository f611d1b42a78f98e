//! The `Spawner` contract — start, stop, poll, and saved state so a
//! restarted hub can re-adopt what runs — plus progress events and the
//! local-process spawner. Failure-mode fakes for tests live behind the
//! `test-util` feature.
//!
//! Must not know the store or HTTP: the hub hands in a [`SpawnSpec`] and keeps
//! the [`Started::state`] it gets back.
#![forbid(unsafe_code)]

pub mod exec;
#[cfg(feature = "test-util")]
pub mod fake;
pub mod local;
mod local_exec;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::mpsc;

pub use exec::{ExecKind, ExecProcess, ExecRequest, Output, PtySpec};
pub use local::LocalSpawner;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What the hub asks a spawner to run.
#[derive(Debug, Clone)]
pub struct SpawnSpec {
    pub user: String,
    /// The account's immutable id: per-user data that outlives a server
    /// (Docker volumes) is named by it, so a new account that takes a
    /// deleted one's name starts empty. Empty: named by `user`.
    pub owner_id: String,
    /// "" for the default server.
    pub server: String,
    /// The single-user environment (`JUPYTERHUB_*`), and anything else to pass.
    pub env: BTreeMap<String, String>,
    /// Command line; empty means the spawner's default.
    pub cmd: Vec<String>,
    /// The URL path prefix the server must answer under (`/user/alice/`).
    pub prefix: String,
    pub template: String,
    /// Container image (Docker spawner); `None` means the configured default.
    pub image: Option<String>,
    /// The build context (path, contents) to make `image` from when the
    /// engine does not have it (catalog templates); empty: pull it.
    pub build: Vec<(String, String)>,
    /// GPU device ids allocated to this server.
    pub gpus: Vec<String>,
    /// The app's port inside a container (templates); `None`: the
    /// single-user server's usual port. The local spawner puts its own free
    /// port wherever the command says `{port}`.
    pub port: Option<u16>,
    /// Volumes adopted from an earlier deployment (`berth migrate`), each
    /// serving one [`DataRole`] in place of the spawner's own volume for it.
    /// They exist already and are never created, renamed or removed by
    /// berth. Spawners without volumes ignore them.
    pub volumes: Vec<VolumeMount>,
}

/// What a per-user (or shared) volume holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DataRole {
    Home,
    Workspace,
    Cache,
    /// The one volume every server mounts.
    Shared,
}

impl DataRole {
    pub const ALL: [DataRole; 4] = [DataRole::Home, DataRole::Workspace, DataRole::Cache, DataRole::Shared];

    pub fn as_str(self) -> &'static str {
        match self {
            DataRole::Home => "home",
            DataRole::Workspace => "workspace",
            DataRole::Cache => "cache",
            DataRole::Shared => "shared",
        }
    }

    pub fn parse(s: &str) -> Option<DataRole> {
        DataRole::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

impl std::fmt::Display for DataRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An existing volume mounted for one role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeMount {
    pub role: DataRole,
    /// The volume's name in the engine.
    pub name: String,
    /// Where it is mounted in the container.
    pub target: String,
}

/// A progress event, as JupyterHub's progress stream carries them.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Progress {
    pub progress: u8,
    pub message: String,
}

pub type ProgressTx = mpsc::UnboundedSender<Progress>;

/// An image the spawner has (what the admin's templates page lists).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    pub image: String,
    pub size_bytes: i64,
    /// Unix seconds.
    pub created: i64,
    /// Containers (running or not) made from this name of the image.
    pub used_by: Vec<String>,
}

/// What the registry serves for an image's tag, against the copy the
/// engine has (the image-update check).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryImage {
    pub image: String,
    /// The manifest digest the registry serves for the tag now.
    pub remote_digest: String,
    /// The digest the engine's copy was pushed or pulled with; `None`: the
    /// engine has no copy from that registry.
    pub local_digest: Option<String>,
}

impl RegistryImage {
    /// The engine's copy is what the registry serves.
    pub fn current(&self) -> bool {
        self.local_digest.as_deref() == Some(self.remote_digest.as_str())
    }
}

/// What a successful start returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Started {
    /// Where the server answers, e.g. `http://127.0.0.1:45241`.
    pub target: String,
    /// Saved state (JSON) that lets `poll` and `stop` find the server again
    /// after the hub restarts.
    pub state: serde_json::Value,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    Running,
    /// Runs again somewhere else (Swarm moved its task off a node that was
    /// drained or lost): where it answers now, its new saved state, and
    /// what happened, for the event.
    Moved {
        started: Started,
        why: String,
    },
    /// Gone; with what is known about why.
    Exited(String),
}

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("{0}")]
    Failed(String),
    #[error("the server's saved state is unusable: {0}")]
    BadState(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Grace periods for stopping: interrupt, then terminate, then kill.
#[derive(Debug, Clone, Copy)]
pub struct StopGrace {
    pub interrupt: Duration,
    pub terminate: Duration,
}

impl Default for StopGrace {
    fn default() -> Self {
        StopGrace { interrupt: Duration::from_secs(10), terminate: Duration::from_secs(5) }
    }
}

pub trait Spawner: Send + Sync + 'static {
    fn kind(&self) -> &'static str;

    /// Starts the server and returns where it will answer. Returning does not
    /// mean ready: the hub polls the target until it answers.
    fn start(&self, spec: SpawnSpec, progress: ProgressTx) -> BoxFuture<'_, Result<Started, SpawnError>>;

    /// Stops the server recorded in `state`; stopping one that is gone is not an error.
    fn stop<'a>(&'a self, state: &'a serde_json::Value, grace: StopGrace) -> BoxFuture<'a, Result<(), SpawnError>>;

    /// Whether the server recorded in `state` still runs.
    fn poll<'a>(&'a self, state: &'a serde_json::Value) -> BoxFuture<'a, Result<Status, SpawnError>>;

    /// Where the server recorded in `state` answers.
    fn target(&self, state: &serde_json::Value) -> Option<String> {
        state.get("target").and_then(|t| t.as_str()).map(str::to_string)
    }

    /// Whether each user's servers and sessions run apart from berth's data
    /// and from other users' (their own container, their own Unix account).
    /// The hub lets only the admin use a spawner that does not.
    fn isolates_users(&self) -> bool {
        true
    }

    /// Whether servers run from images (so a default server can run a
    /// template's image when no image is configured).
    fn runs_images(&self) -> bool {
        false
    }

    /// Whether a server found gone is stopped all the same: a Swarm service
    /// whose task cannot run anywhere is still there, and would run again
    /// unseen once a node can take it.
    fn stops_vanished(&self) -> bool {
        false
    }

    /// For a spawner that places servers on several machines (Swarm): the
    /// machine a user's volumes are on, named as GPU ids name their node
    /// (`Some(None)`: berth's own, `Some(Some(node))`: that node), so a
    /// server's GPUs are allocated where its data is. `None`: anywhere.
    fn data_node<'a>(&'a self, _owner_id: &'a str) -> BoxFuture<'a, Option<Option<String>>> {
        Box::pin(async { None })
    }

    /// Servers this spawner runs that it labelled as berth's: (user, server,
    /// handle). The hub reports those it has no record of.
    fn list_managed(&self) -> BoxFuture<'_, Vec<(String, String, String)>> {
        Box::pin(async { Vec::new() })
    }

    /// Deletes what a user's servers kept between runs (volumes, the local
    /// home), when an admin deletes the user and asks for it. `owner_id` is
    /// the account's immutable id (see [`SpawnSpec::owner_id`]).
    fn remove_user_data<'a>(&'a self, _user: &'a str, _owner_id: &'a str) -> BoxFuture<'a, Result<(), SpawnError>> {
        Box::pin(async { Ok(()) })
    }

    /// A user was deleted and their data kept (for an admin to restore or
    /// remove): put it where a new account of the same name cannot reach it.
    /// Data named by the immutable id needs nothing.
    fn retire_user_data<'a>(&'a self, _user: &'a str, _owner_id: &'a str) -> BoxFuture<'a, Result<(), SpawnError>> {
        Box::pin(async { Ok(()) })
    }

    /// Makes sure a template's image is there, building it from `build` (its
    /// rendered context) when it is not, as a first start would, without
    /// starting anything (`templates.prebuild`). `Ok(true)` when it built.
    /// Spawners that run no images have nothing to do.
    fn prepare_image<'a>(
        &'a self,
        _image: &'a str,
        _build: &'a [(String, String)],
        _progress: ProgressTx,
    ) -> BoxFuture<'a, Result<bool, SpawnError>> {
        Box::pin(async { Ok(false) })
    }

    /// Those of `images` the spawner has, with their size, age and users.
    /// Spawners that run no images have none.
    fn images<'a>(&'a self, _images: &'a [String]) -> BoxFuture<'a, Result<Vec<ImageInfo>, SpawnError>> {
        Box::pin(async { Ok(Vec::new()) })
    }

    /// Asks `image`'s registry for the digest its tag has now, and compares
    /// it with the engine's copy. Spawners that run no images refuse.
    fn registry_image<'a>(&'a self, image: &'a str) -> BoxFuture<'a, Result<RegistryImage, SpawnError>> {
        Box::pin(async move {
            Err(SpawnError::Failed(format!("the {} spawner runs no images, so {image} is not checked", self.kind())))
        })
    }

    /// Pulls `image`'s tag anew, keeping the copy it replaces under
    /// `previous` (a tag) so a server can be put back on it; returns the
    /// new digest. Running containers keep the image they were made from.
    fn update_image<'a>(&'a self, image: &'a str, previous: &'a str) -> BoxFuture<'a, Result<String, SpawnError>> {
        let _ = previous;
        Box::pin(async move {
            Err(SpawnError::Failed(format!("the {} spawner runs no images, so {image} is not updated", self.kind())))
        })
    }

    /// Keeps `image` as `previous` and removes the name `image`, so the
    /// next start makes it anew (a template's image whose base changed).
    fn set_aside_image<'a>(&'a self, image: &'a str, previous: &'a str) -> BoxFuture<'a, Result<(), SpawnError>> {
        let _ = previous;
        Box::pin(async move {
            Err(SpawnError::Failed(format!("the {} spawner runs no images, so {image} is not set aside", self.kind())))
        })
    }

    /// Points `image` at the image tagged `previous` again (a rollback).
    fn restore_image<'a>(&'a self, image: &'a str, previous: &'a str) -> BoxFuture<'a, Result<(), SpawnError>> {
        let _ = previous;
        Box::pin(async move {
            Err(SpawnError::Failed(format!("the {} spawner runs no images, so {image} is not restored", self.kind())))
        })
    }

    /// Runs a shell, a command or the sftp subsystem inside the server recorded
    /// in `state` (the SSH gateway's sessions).
    fn exec<'a>(
        &'a self,
        _user: &'a str,
        _state: &'a serde_json::Value,
        _req: ExecRequest,
    ) -> BoxFuture<'a, Result<ExecProcess, SpawnError>> {
        Box::pin(async move { Err(SpawnError::Failed(format!("the {} spawner cannot run commands", self.kind()))) })
    }

    /// Connects to `port` on the server's own loopback (its container's, for
    /// Docker): the SSH gateway's port forwarding. Nothing outside the server
    /// is reachable this way.
    fn connect<'a>(
        &'a self,
        _state: &'a serde_json::Value,
        port: u16,
    ) -> BoxFuture<'a, Result<tokio::net::TcpStream, SpawnError>> {
        Box::pin(async move {
            Err(SpawnError::Failed(format!("the {} spawner cannot forward to port {port}", self.kind())))
        })
    }

    /// Sends `(user, server)` on `exits` whenever a server of berth's stops
    /// on its own (its container died), until `exits` is closed, so the hub
    /// removes its route at once rather than at the next poll (an address a
    /// dead container had can be given to another). Spawners that cannot
    /// watch return at once; the poll job covers them.
    fn watch_exits(&self, _exits: mpsc::UnboundedSender<(String, String)>) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }

    /// The tail of the server's own output, if the spawner keeps it.
    fn logs<'a>(&'a self, _user: &'a str, _server: &'a str) -> BoxFuture<'a, Option<String>> {
        Box::pin(async { None })
    }
}
