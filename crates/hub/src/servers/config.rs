//! The `[spawner]` section of berth's configuration.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The `[spawner]` section of berth's configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `auto` (Docker; never falls back to local processes), `local` or `docker`.
    pub kind: String,
    /// The local spawner's command line.
    pub local_cmd: String,
    /// Provide `jupyterhub-singleuser` in a virtualenv under the data directory when it is not installed.
    pub provision: bool,
    /// Local spawner, berth running as root: each user's server and SSH
    /// sessions run under their own Unix account (`berth-<user>`). Where
    /// that cannot be done (berth is not root), only the admin may start a
    /// local server. Turned off, everyone's run as berth itself — only for
    /// users who may read berth's data.
    pub local_isolate_users: bool,
    /// The uid range of the Unix accounts the local spawner makes.
    pub local_uid_min: u32,
    pub local_uid_max: u32,
    /// Time from a start request until the server must answer.
    #[serde(with = "berth_core::serde_secs")]
    pub start_timeout_seconds: Duration,
    /// Time a start may spend making its image (pulling it, or building a
    /// template's) before the start timeout's clock begins.
    #[serde(with = "berth_core::serde_secs")]
    pub build_timeout_seconds: Duration,
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
    /// Images users may name in a start's `image` option; empty: none (the
    /// image comes from the template or the configuration).
    pub allowed_images: Vec<String>,
    /// Seconds between checks that running servers are still alive.
    #[serde(with = "berth_core::serde_secs")]
    pub poll_interval_seconds: Duration,
}

impl Config {
    /// The longest a start can take: its image's pull or build, then the
    /// start itself.
    pub fn longest_start(&self) -> Duration {
        self.build_timeout_seconds + self.start_timeout_seconds
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            kind: "auto".into(),
            local_cmd: "jupyterhub-singleuser".into(),
            provision: true,
            local_isolate_users: true,
            local_uid_min: 20000,
            local_uid_max: 29999,
            start_timeout_seconds: Duration::from_secs(120),
            build_timeout_seconds: Duration::from_secs(3600),
            stop_grace_seconds: Duration::from_secs(10),
            max_concurrent_starts: 20,
            max_running: 0,
            max_named_servers: 5,
            stop_on_shutdown: false,
            allowed_images: Vec::new(),
            poll_interval_seconds: Duration::from_secs(30),
        }
    }
}
