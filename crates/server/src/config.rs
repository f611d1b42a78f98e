//! berth's configuration tree and its layers: defaults → TOML file →
//! environment (`BERTH_*`, and the original deployment's names as aliases) →
//! command-line flags. Unknown keys and invalid values are errors that name
//! the key; the binary exits with code 64 on them.
//!
//! Sources are passed in ([`Sources`]), never read from the process here, so
//! tests hand in a map instead of mutating the environment.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use toml::Value;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub bind: SocketAddr,
    pub data_dir: PathBuf,
    pub database_url: String,
    pub log: String,
    pub hub: berth_hub::Config,
    pub auth: berth_auth::Config,
    pub spawner: berth_hub::servers::Config,
    pub docker: berth_spawner_docker::Config,
    pub swarm: berth_spawner_docker::SwarmConfig,
    pub gpu: berth_hub::gpus::GpuConfig,
    pub proxy: ProxyConfig,
    pub tls: TlsConfig,
    pub ssh: berth_ssh::Config,
    pub templates: berth_hub::templates::TemplatesConfig,
    pub usage: berth_hub::usage::UsageConfig,
    pub metrics: berth_hub::metrics::MetricsConfig,
    pub cull: berth_hub::cull::CullConfig,
    pub images: berth_hub::updates::ImagesConfig,
}

/// The `[proxy]` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    #[serde(with = "berth_core::serde_secs")]
    pub connect_timeout_seconds: std::time::Duration,
    #[serde(with = "berth_core::serde_secs")]
    pub response_timeout_seconds: std::time::Duration,
    /// Connections berth serves at once; more are answered 503.
    pub max_connections: u32,
    /// Connections one source address may hold at once (loopback is not
    /// limited: local servers and the hub's own clients live there).
    pub max_connections_per_address: u32,
    /// Time a client has for the TLS handshake (first byte included) and
    /// for sending a request's headers; an idle request body the same.
    #[serde(with = "berth_core::serde_secs")]
    pub client_timeout_seconds: std::time::Duration,
    /// Threads that serve connections on berth's port, each with its own
    /// event loop (0: one per core).
    pub threads: u32,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        let d = berth_proxy::ForwarderConfig::default();
        ProxyConfig {
            connect_timeout_seconds: d.connect_timeout,
            response_timeout_seconds: d.response_timeout,
            max_connections: 10_000,
            max_connections_per_address: 256,
            client_timeout_seconds: std::time::Duration::from_secs(15),
            threads: 0,
        }
    }
}

/// The `[tls]` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// `off`, or `auto` for a generated certificate authority; `cert` and `key` select files.
    pub mode: String,
    pub cert: String,
    pub key: String,
    /// Extra host names and addresses for the generated certificate (comma-separated).
    pub names: String,
    /// `Strict-Transport-Security` max-age; 0 sends none.
    pub hsts_seconds: u64,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig { mode: "off".into(), cert: String::new(), key: String::new(), names: String::new(), hsts_seconds: 0 }
    }
}

impl TlsConfig {
    pub fn enabled(&self) -> bool {
        self.mode == "auto" || !self.cert.is_empty()
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            bind: SocketAddr::from(([0, 0, 0, 0], 27015)),
            data_dir: PathBuf::from("./berth-data"),
            database_url: String::new(),
            log: "info".into(),
            hub: berth_hub::Config::default(),
            auth: berth_auth::Config::default(),
            spawner: berth_hub::servers::Config::default(),
            docker: berth_spawner_docker::Config::default(),
            swarm: berth_spawner_docker::SwarmConfig::default(),
            gpu: berth_hub::gpus::GpuConfig::default(),
            proxy: ProxyConfig::default(),
            tls: TlsConfig::default(),
            ssh: berth_ssh::Config::default(),
            templates: berth_hub::templates::TemplatesConfig::default(),
            usage: berth_hub::usage::UsageConfig::default(),
            metrics: berth_hub::metrics::MetricsConfig::default(),
            cull: berth_hub::cull::CullConfig::default(),
            images: berth_hub::updates::ImagesConfig::default(),
        }
    }
}

/// Every key: its path, the environment variables that set it (first wins),
/// and what it means. The configuration reference is generated from this.
pub const KEYS: &[(&str, &[&str], &str)] = &[
    ("bind", &["BERTH_BIND"], "Address and port for the hub, its API and every proxied server (HTTP and HTTPS on one port)."),
    ("data_dir", &["BERTH_DATA_DIR"], "Directory for berth's state: the SQLite database, the cookie secret, certificates, logs."),
    ("database_url", &["BERTH_DATABASE_URL"], "Database URL; empty means SQLite in the data directory. `postgres://user:pass@host/db` selects PostgreSQL."),
    ("log", &["BERTH_LOG"], "Log filter, e.g. `info` or `berth_hub=debug,info`."),
    ("hub.base_url", &["BERTH_BASE_URL", "JUPYTERHUB_BASE_URL"], "URL prefix of everything berth serves; the hub is at `<base_url>hub/`."),
    ("hub.admin", &["BERTH_ADMIN", "JUPYTERHUB_ADMIN"], "The name the first admin's setup page suggests. Nobody becomes admin by signing up with it: the first admin is made with the one-time link berth prints at its first start (or `berth user add NAME --admin`)."),
    ("hub.max_body_bytes", &["BERTH_MAX_BODY_BYTES"], "Largest request body the hub accepts (413 beyond); proxied bodies are streamed and not limited."),
    ("hub.secure_cookies", &["BERTH_SECURE_COOKIES"], "Mark cookies `Secure` (on by itself when berth serves TLS; set it behind a TLS-terminating proxy)."),
    ("auth.signup", &["BERTH_SIGNUP"], "Whether people may sign up; new accounts wait for an admin's approval."),
    ("auth.min_password_length", &["BERTH_MIN_PASSWORD_LENGTH"], "Shortest password accepted."),
    ("auth.refuse_common_passwords", &["BERTH_REFUSE_COMMON_PASSWORDS"], "Refuse passwords from a list of the most common leaked ones."),
    ("auth.lockout_attempts", &["BERTH_LOCKOUT_ATTEMPTS"], "Failed log-ins before an account must wait; 0 turns lock-out off."),
    ("auth.lockout_seconds", &["BERTH_LOCKOUT_SECONDS"], "How long a locked account waits, in seconds."),
    ("auth.session_max_age_seconds", &["BERTH_SESSION_MAX_AGE_SECONDS"], "Lifetime of a log-in session, in seconds."),
    ("auth.argon2_memory_kib", &["BERTH_ARGON2_MEMORY_KIB"], "argon2id memory cost in KiB for password hashes."),
    ("auth.argon2_iterations", &["BERTH_ARGON2_ITERATIONS"], "argon2id passes for password hashes."),
    ("spawner.kind", &["BERTH_SPAWNER"], "`auto`, `local`, `docker` or `swarm`. `auto` is Docker (it keeps trying when the engine does not answer); local processes only when set to `local`, never as a fall-back. `swarm`: each server a Docker Swarm service on the engine's swarm, which must be a manager (docs/swarm.md); the `docker.*` keys shape its containers."),
    ("spawner.local_cmd", &["BERTH_LOCAL_CMD"], "The local spawner's command line; the first word is looked up on PATH."),
    ("spawner.provision", &["BERTH_PROVISION"], "When `jupyterhub-singleuser` is not installed, make a virtualenv with JupyterLab under the data directory on the first start."),
    ("spawner.local_isolate_users", &["BERTH_LOCAL_ISOLATE_USERS"], "Local spawner as root: run each user's server and SSH sessions under a Unix account of their own (`berth-<user>`). When berth is not root only the admin may start a local server; off, everyone runs as berth itself (only for users trusted with berth's data)."),
    ("spawner.local_uid_min", &["BERTH_LOCAL_UID_MIN"], "Lowest uid of the Unix accounts the local spawner makes."),
    ("spawner.local_uid_max", &["BERTH_LOCAL_UID_MAX"], "Highest uid of the Unix accounts the local spawner makes."),
    ("spawner.start_timeout_seconds", &["BERTH_START_TIMEOUT"], "Time from when a start has its image (see `spawner.build_timeout_seconds`) until the server must answer; then it is stopped and the reason shown."),
    ("spawner.build_timeout_seconds", &["BERTH_BUILD_TIMEOUT"], "Time a start may spend pulling its image or building its template's image; the start timeout counts from when the image is there."),
    ("spawner.stop_grace_seconds", &["BERTH_STOP_GRACE"], "Seconds after SIGINT before SIGTERM, and after SIGTERM before SIGKILL."),
    ("spawner.max_concurrent_starts", &["BERTH_MAX_CONCURRENT_STARTS"], "Servers that may be starting at once; more are refused with a message."),
    ("spawner.max_running", &["BERTH_MAX_RUNNING"], "Servers that may run at once; 0 means no limit."),
    ("spawner.max_named_servers", &["BERTH_MAX_NAMED_SERVERS"], "Named servers a user may have besides the default one."),
    ("spawner.stop_on_shutdown", &["BERTH_STOP_ON_SHUTDOWN"], "Stop every server when berth shuts down; by default they keep running and are re-adopted."),
    ("spawner.allowed_images", &["BERTH_ALLOWED_IMAGES"], "Images users may name in a start's `image` option (comma-separated in the environment); empty means none: the image comes from the template or `docker.image`."),
    ("spawner.poll_interval_seconds", &["BERTH_POLL_INTERVAL"], "Seconds between checks that running servers are alive."),
    ("docker.image", &["BERTH_DOCKER_IMAGE", "DOCKER_NOTEBOOK_IMAGE"], "Image for default servers (pulled with progress when not present); empty (the default): they run the `templates.default` template, built on demand."),
    ("docker.network", &["BERTH_DOCKER_NETWORK", "DOCKER_NETWORK_NAME"], "Docker network the server containers join; created if missing, as a bridge with traffic between containers off."),
    ("docker.hub_connect_url", &["BERTH_HUB_CONNECT_URL"], "URL containers use for the hub API; empty derives it from the network's gateway and berth's port (berth then also listens on the gateway when bound to loopback)."),
    ("docker.remove_on_stop", &["BERTH_DOCKER_REMOVE_ON_STOP"], "Remove a server's container when it stops; its volumes are always kept."),
    ("docker.workdir", &["BERTH_DOCKER_WORKDIR"], "Where the user's workspace volume (berth-<user>-workspace) is mounted; the container's working directory."),
    ("docker.home_dir", &["BERTH_DOCKER_HOME_DIR"], "Where the user's home volume (berth-<user>-home) is mounted. Volumes adopted by `berth migrate` are mounted where the migration recorded instead."),
    ("docker.cache_dir", &["BERTH_DOCKER_CACHE_DIR"], "Where the user's cache volume (berth-<user>-cache) is mounted."),
    ("docker.shared_volume", &["BERTH_SHARED_VOLUME"], "Volume every server mounts (empty: none). A shared volume adopted by `berth migrate` takes its place."),
    ("docker.shared_mount", &["BERTH_SHARED_MOUNT"], "Where the shared volume is mounted."),
    ("docker.shared_volume_driver", &["BERTH_SHARED_VOLUME_DRIVER"], "Driver of the shared volume."),
    ("docker.shared_volume_opts", &["BERTH_SHARED_VOLUME_OPTS"], "Driver options `key=value;key=value`, e.g. `type=cifs;device=//server/share;o=username=u,password=p`."),
    ("docker.shm_size_mib", &["BERTH_SHM_SIZE_MIB"], "/dev/shm size of server containers in MiB (PyTorch data loaders need more than Docker's 64 MB)."),
    ("docker.cpu_limit", &["BERTH_CPU_LIMIT"], "CPU limit per server in cores; 0 means none."),
    ("docker.mem_limit_mib", &["BERTH_MEM_LIMIT_MIB"], "Memory limit per server in MiB; 0 means three quarters of the host's memory (none with `docker.mem_unlimited`)."),
    ("docker.mem_unlimited", &["BERTH_DOCKER_MEM_UNLIMITED"], "With `docker.mem_limit_mib = 0`, no memory limit instead of three quarters of the host's memory."),
    ("docker.pids_limit", &["BERTH_DOCKER_PIDS_LIMIT"], "Most processes (threads count) a server's container may run; 0 means no limit."),
    ("docker.env", &["BERTH_DOCKER_ENV"], "Extra environment for every server container: `KEY=value;KEY=value` (ENABLE_SERVICE_* from berth's environment pass through too)."),
    ("docker.gpu_driver", &["BERTH_GPU_DRIVER"], "Driver named in GPU device requests."),
    ("docker.registry_username", &["BERTH_REGISTRY_USERNAME"], "User name for the registries images are checked against and pulled from; empty: anonymous."),
    ("docker.registry_password", &["BERTH_REGISTRY_PASSWORD"], "Password or token for `docker.registry_username`; never logged."),
    ("gpu.mode", &["BERTH_GPU_MODE", "ENABLE_GPU_SUPPORT"], "0 off, 1 on, 2 auto-detect."),
    ("gpu.devices", &["BERTH_GPU_DEVICES"], "Comma-separated GPU ids to hand out instead of detecting them."),
    ("gpu.probe_image", &["BERTH_GPU_PROBE_IMAGE", "NVIDIA_AUTODETECT_IMAGE"], "Image that runs `nvidia-smi -L` to list the GPUs when the engine has the nvidia runtime."),
    ("gpu.max_per_server", &["BERTH_GPU_MAX_PER_SERVER"], "Most GPUs one server may ask for."),
    ("gpu.sampler", &["BERTH_GPU_SAMPLER"], "Where GPU utilisation, memory, temperature, power and per-process memory come from: `auto` (NVML when the driver's library loads, else `nvidia-smi` on the host's PATH; only when there are GPUs), `nvml`, `nvidia-smi`, or `off`. A failed read makes utilisation unknown until the next one (see docs/gpus.md)."),
    ("gpu.nvml_library", &["BERTH_NVML_LIBRARY"], "The NVML library the sampler loads; empty means the driver's `libnvidia-ml.so.1` wherever the dynamic loader finds it."),
    ("gpu.sample_interval_seconds", &["BERTH_GPU_SAMPLE_INTERVAL"], "Seconds between GPU samples."),
    ("gpu.idle_below_percent", &["BERTH_GPU_IDLE_BELOW_PERCENT"], "A GPU whose utilisation stays below this many percent counts as idle (the admin page shows for how long)."),
    ("gpu.when_full", &["BERTH_GPU_WHEN_FULL"], "A start that asks for more GPUs than are free: `queue` (it is accepted as a pending spawn and waits in line, first come, first served, and starts by itself when GPUs free) or `refuse` (it fails with the shortage). See docs/gpus.md."),
    ("proxy.connect_timeout_seconds", &["BERTH_PROXY_CONNECT_TIMEOUT"], "Time to connect to a server before the proxy gives up."),
    ("proxy.response_timeout_seconds", &["BERTH_PROXY_RESPONSE_TIMEOUT"], "Time a server may take to start answering before the proxy answers 504."),
    ("proxy.max_connections", &["BERTH_MAX_CONNECTIONS"], "Connections berth serves at once; more are answered 503 with a message."),
    ("proxy.max_connections_per_address", &["BERTH_MAX_CONNECTIONS_PER_ADDRESS"], "Connections one source address may hold at once; more are answered 503 (loopback is not limited)."),
    ("proxy.client_timeout_seconds", &["BERTH_CLIENT_TIMEOUT"], "Time a client has for the TLS handshake and for a request's headers, and that a request body may stay idle."),
    ("proxy.threads", &["BERTH_PROXY_THREADS"], "Threads serving connections on berth's port, each with its own event loop; a connection stays on the thread that accepted it (0: one per core)."),
    ("swarm.network", &["BERTH_SWARM_NETWORK"], "Swarm-scoped network the Swarm spawner's services join; created if missing (a bridge on berth's node, configured from `<network>-config` with traffic between containers off)."),
    ("swarm.restart_attempts", &["BERTH_SWARM_RESTART_ATTEMPTS"], "How often Swarm retries a server's task that fails while it starts before the start fails with the task's error."),
    ("swarm.nodes", &["BERTH_SWARM_NODES"], "Which nodes run servers: `self` (berth's own node) or `labelled` (every node labelled `berth.servers=true`; berth picks the node, docs/swarm.md)."),
    ("swarm.engines", &["BERTH_SWARM_ENGINES"], "Each other node's own Docker engine, `hostname=tcp://ADDRESS:2376;hostname=unix:///path`: its images, volumes, its part of the network and its servers' containers (address, output, SSH)."),
    ("swarm.engine_tls_dir", &["BERTH_SWARM_ENGINE_TLS_DIR"], "Directory with `ca.pem`, `cert.pem` and `key.pem` for the `tcp://` engines (a node's own in `<dir>/<hostname>/` when there is one); empty: plain HTTP."),
    ("swarm.node_subnets", &["BERTH_SWARM_NODE_SUBNETS"], "Address range each other node's part of `swarm.network` gets a `/24` of; the hub routes to them (docs/swarm.md)."),
    ("swarm.hub_address", &["BERTH_SWARM_HUB_ADDRESS"], "Address servers on other nodes reach the hub at (berth listens there too); empty: berth's node's address in the swarm."),
    ("swarm.volumes", &["BERTH_SWARM_VOLUMES"], "Users' volumes: `node` (on the node a user's server first ran on; their servers go there) or `shared` (made by each node from `swarm.volume_driver` and `swarm.volume_opts`, e.g. NFS; servers go anywhere and follow a drained node's)."),
    ("swarm.volume_driver", &["BERTH_SWARM_VOLUME_DRIVER"], "Volume driver of users' volumes with `swarm.volumes = \"shared\"`."),
    ("swarm.volume_opts", &["BERTH_SWARM_VOLUME_OPTS"], "Its options, `key=value;key=value`, `{volume}` replaced by the volume's name, e.g. `type=nfs;o=addr=10.0.0.5,rw;device=:/export/{volume}`."),
    ("templates.dir", &["BERTH_TEMPLATES_DIR"], "A catalog directory (`<id>/template.toml`) to offer on the start page instead of the catalog built into berth."),
    ("templates.allowed", &["BERTH_TEMPLATES_ALLOWED"], "Template ids users may start (comma-separated in the environment); empty means all."),
    ("templates.prebuild", &["BERTH_TEMPLATES_PREBUILD"], "Template ids whose images the Docker spawner builds in the background once berth serves (comma-separated in the environment), so no first start waits for a build."),
    ("templates.default", &["BERTH_TEMPLATES_DEFAULT"], "Template a default server runs on the Docker spawner when `docker.image` is empty (a JupyterHub single-user template; `allowed` does not apply to it)."),
    ("templates.app_domain", &["BERTH_APP_DOMAIN"], "Wildcard domain for `host` routing: apps at `<server>--<user>.<app_domain>`, the hub at `<app_domain>`; empty turns it off."),
    ("cull.idle_timeout_seconds", &["BERTH_CULL_IDLE_TIMEOUT"], "Stop a server after this many seconds without any sign of use: web traffic, kernel activity, an open SSH session, or GPU utilisation at or above `gpu.idle_below_percent` (see docs/gpus.md). 0 (the default) turns idle culling off."),
    ("cull.template_timeouts", &["BERTH_CULL_TEMPLATE_TIMEOUTS"], "Idle timeouts per template, `id=seconds` (comma-separated in the environment; 0: that template's servers are never idle-culled), over a template's own `idle_timeout_seconds` and `cull.idle_timeout_seconds`."),
    ("cull.max_age_seconds", &["BERTH_CULL_MAX_AGE"], "Stop a server this many seconds after it started, however busy it is (after the warning, which cannot be extended); 0 means no maximum age."),
    ("cull.warning_seconds", &["BERTH_CULL_WARNING"], "How long the owner is warned (banner, `berth.cull` in the server model, a progress event) before a server is culled; Extend or any use ends an idle warning."),
    ("cull.interval_seconds", &["BERTH_CULL_INTERVAL"], "Seconds between the culler's checks of the running servers."),
    ("images.policy", &["BERTH_IMAGES_POLICY"], "What an image-update check does when an image's tag moved in its registry: `notify` (the admins' templates page and the event log say an update is available, also to the owners of servers running on it), `next-start` (the tag is pulled anew, the previous image kept as `<repo>:berth-previous`; the next start runs the new one, running servers keep theirs) or `when-idle` (pulled the same way; running servers on it are recreated on it once idle for `images.idle_seconds`, and put back on the previous image when the new one fails its readiness check; a busy server is never interrupted). See docs/operations.md."),
    ("images.template_policies", &["BERTH_IMAGES_TEMPLATE_POLICIES"], "Policies per template, `id=policy` (comma-separated in the environment; `docker.image=…` for `docker.image`), over `images.policy`."),
    ("images.check_at", &["BERTH_IMAGES_CHECK_AT"], "When the daily image-update check runs, `HH:MM` in UTC; empty: only on demand (`berth images check`, the admins' templates page)."),
    ("images.idle_seconds", &["BERTH_IMAGES_IDLE_SECONDS"], "`when-idle`: how long a server must show no sign of use (web traffic, kernel activity, an open SSH session, GPU use — what the culler reads) before berth recreates it on an updated image."),
    ("ssh.bind", &["BERTH_SSH_BIND"], "Where the SSH gateway listens (`ADDR:PORT`; 22 in a container deployment), or `off`."),
    ("ssh.auto_start", &["BERTH_SSH_AUTO_START"], "Start a stopped server when its user connects over SSH, with its progress on the terminal."),
    ("ssh.max_auth_failures", &["BERTH_SSH_MAX_AUTH_FAILURES"], "Failed SSH log-ins from one address before it is refused for `ssh.failure_window_seconds`."),
    ("ssh.failure_window_seconds", &["BERTH_SSH_FAILURE_WINDOW"], "Window in which failed SSH log-ins are counted, and how long an address is refused."),
    ("ssh.host_key_types", &["BERTH_SSH_HOST_KEY_TYPES"], "Host key types offered (`ed25519`, `ecdsa`, `rsa`); made once in `<data_dir>/ssh/`."),
    ("ssh.window_bytes", &["BERTH_SSH_WINDOW_BYTES"], "SSH flow-control window per channel in bytes; large windows keep bulk transfers fast."),
    ("ssh.idle_timeout_seconds", &["BERTH_SSH_IDLE_TIMEOUT"], "Close SSH connections idle this long; 0 means never."),
    ("ssh.login_grace_seconds", &["BERTH_SSH_LOGIN_GRACE"], "Time a client has to log in after connecting; then the connection is closed."),
    ("ssh.recheck_seconds", &["BERTH_SSH_RECHECK"], "How often an open SSH session's key and account are checked again: removing the key or withdrawing the account ends it within this."),
    ("tls.mode", &["BERTH_TLS"], "`off` or `auto` (generate and keep a certificate authority and server certificate in the data directory)."),
    ("tls.cert", &["BERTH_TLS_CERT"], "PEM certificate chain to serve (with `tls.key`); reloaded when it changes or on SIGHUP."),
    ("tls.key", &["BERTH_TLS_KEY"], "PEM private key for `tls.cert`."),
    ("tls.names", &["BERTH_TLS_NAMES"], "Comma-separated extra host names or addresses for the generated certificate."),
    ("tls.hsts_seconds", &["BERTH_HSTS_SECONDS"], "Strict-Transport-Security max-age sent over TLS; 0 sends none."),
    ("usage.period", &["BERTH_USAGE_PERIOD"], "The period GPU-hours and server-hours are counted in and quotas renew: `month`, `week` (from Monday) or `day`, with UTC boundaries (see docs/gpus.md)."),
    ("usage.gpu_hours_per_period", &["BERTH_GPU_HOURS_PER_PERIOD"], "GPU-hours each user may use per period; a start that asks for GPUs is refused once they are used, saying what is left and when it renews. 0 means unlimited; a user's own limit (`PUT /hub/api/users/<name>/limits`) takes its place."),
    ("metrics.allowed_addresses", &["BERTH_METRICS_ALLOWED_ADDRESSES"], "Addresses or CIDR ranges (comma-separated in the environment) that may read `/hub/metrics` without a credential; otherwise it takes the scope `read:metrics`. The address is the connection's, never a header."),
];

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the configuration file {path}: {message}")]
    Read { path: String, message: String },
    #[error("the configuration file {path} is not valid TOML: {message}")]
    Parse { path: String, message: String },
    #[error("unknown configuration key `{key}` (in {source_name})")]
    UnknownKey { key: String, source_name: String },
    #[error("invalid value for `{key}` (from {source_name}): {message}")]
    Invalid { key: String, source_name: String, message: String },
}

/// Where values come from, in increasing precedence after the defaults.
#[derive(Debug, Default, Clone)]
pub struct Sources {
    pub file: Option<PathBuf>,
    pub env: BTreeMap<String, String>,
    /// (key path, value) pairs from flags.
    pub flags: Vec<(String, String)>,
}

impl Sources {
    /// The process environment's berth-related variables.
    pub fn from_process_env() -> Sources {
        let names: Vec<&str> = KEYS.iter().flat_map(|(_, envs, _)| envs.iter().copied()).collect();
        let env = std::env::vars().filter(|(k, _)| names.contains(&k.as_str())).collect();
        Sources { env, ..Default::default() }
    }
}

fn lookup<'a>(root: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(root, |v, k| v.get(k))
}

fn lookup_mut<'a>(root: &'a mut Value, path: &str) -> Option<&'a mut Value> {
    path.split('.').try_fold(root, |v, k| v.get_mut(k))
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::String(_) => "a string",
        Value::Integer(_) => "an integer",
        Value::Float(_) => "a number",
        Value::Boolean(_) => "true or false",
        Value::Datetime(_) => "a date",
        Value::Array(_) => "a list",
        Value::Table(_) => "a table",
    }
}

/// Merges `file` into `base`, refusing keys `base` does not have and values
/// of another type.
fn merge(base: &mut Value, file: &Value, prefix: &str, source_name: &str) -> Result<(), ConfigError> {
    let (Value::Table(b), Value::Table(f)) = (base, file) else { return Ok(()) };
    for (k, v) in f {
        let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
        let Some(slot) = b.get_mut(k) else {
            return Err(ConfigError::UnknownKey { key, source_name: source_name.into() });
        };
        match (&*slot, v) {
            (Value::Table(_), Value::Table(_)) => merge(slot, v, &key, source_name)?,
            (Value::Table(_), _) => {
                return Err(ConfigError::Invalid {
                    key,
                    source_name: source_name.into(),
                    message: format!("expected a table, found {}", type_name(v)),
                })
            }
            (d, v) if std::mem::discriminant(d) == std::mem::discriminant(v) => *slot = v.clone(),
            (Value::Float(_), Value::Integer(i)) => *slot = Value::Float(*i as f64),
            (d, v) => {
                return Err(ConfigError::Invalid {
                    key,
                    source_name: source_name.into(),
                    message: format!("expected {}, found {}", type_name(d), type_name(v)),
                })
            }
        }
    }
    Ok(())
}

/// Sets one key from text (environment or flag), typed like its default.
fn set_text(root: &mut Value, key: &str, raw: &str, source_name: &str) -> Result<(), ConfigError> {
    let invalid = |message: String| ConfigError::Invalid { key: key.into(), source_name: source_name.into(), message };
    let slot = lookup_mut(root, key)
        .ok_or_else(|| ConfigError::UnknownKey { key: key.into(), source_name: source_name.into() })?;
    *slot = match slot {
        Value::String(_) => Value::String(raw.to_string()),
        Value::Integer(_) => Value::Integer(
            raw.trim().parse::<i64>().map_err(|_| invalid(format!("expected an integer, found {raw:?}")))?,
        ),
        Value::Float(_) => Value::Float(
            raw.trim()
                .parse::<f64>()
                .ok()
                .filter(|f| f.is_finite())
                .ok_or_else(|| invalid(format!("expected a number, found {raw:?}")))?,
        ),
        Value::Boolean(_) => Value::Boolean(match raw.trim().to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => true,
            "0" | "false" | "no" | "off" | "" => false,
            _ => return Err(invalid(format!("expected true or false, found {raw:?}"))),
        }),
        // Lists from text: comma- or space-separated words.
        Value::Array(_) => Value::Array(
            raw.split([',', ' ']).map(str::trim).filter(|w| !w.is_empty()).map(|w| Value::String(w.into())).collect(),
        ),
        other => return Err(invalid(format!("cannot be set from text (it is {})", type_name(other)))),
    };
    Ok(())
}

impl Config {
    /// Builds the configuration from its layers and checks it.
    pub fn load(sources: &Sources) -> Result<Config, ConfigError> {
        let mut root = Value::try_from(Config::default()).map_err(|e| ConfigError::Invalid {
            key: "(defaults)".into(),
            source_name: "defaults".into(),
            message: e.to_string(),
        })?;
        if let Some(path) = &sources.file {
            let shown = path.display().to_string();
            let text = std::fs::read_to_string(path)
                .map_err(|e| ConfigError::Read { path: shown.clone(), message: e.to_string() })?;
            let file: Value = toml::from_str(&text).map_err(|e| ConfigError::Parse {
                path: shown.clone(),
                message: e.to_string().trim().replace('\n', " "),
            })?;
            merge(&mut root, &file, "", &shown)?;
        }
        for (key, envs, _) in KEYS {
            // BERTH_* first: an explicit berth setting beats a legacy alias.
            if let Some((name, v)) = envs.iter().find_map(|e| sources.env.get(*e).map(|v| (*e, v))) {
                set_text(&mut root, key, v, &format!("environment variable {name}"))?;
            }
        }
        for (key, v) in &sources.flags {
            set_text(&mut root, key, v, &format!("flag for {key}"))?;
        }
        let cfg: Config = root.try_into().map_err(|e: toml::de::Error| {
            let msg = e.to_string();
            let key = KEYS
                .iter()
                .map(|k| k.0)
                .find(|k| msg.contains(k.rsplit('.').next().unwrap_or(k)))
                .unwrap_or("(unknown)");
            ConfigError::Invalid {
                key: key.into(),
                source_name: "configuration".into(),
                message: msg.trim().replace('\n', " "),
            }
        })?;
        cfg.normalized()
    }

    fn normalized(mut self) -> Result<Config, ConfigError> {
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            key: key.into(),
            source_name: "configuration".into(),
            message,
        };
        let mut base = self.hub.base_url.trim().to_string();
        if !base.starts_with('/') {
            base.insert(0, '/');
        }
        if !base.ends_with('/') {
            base.push('/');
        }
        if base.contains("//") || base.contains(['?', '#', ' ', '\\']) {
            return Err(invalid(
                "hub.base_url",
                format!("{:?} is not a URL path prefix like /jupyter/", self.hub.base_url),
            ));
        }
        self.hub.base_url = base;
        berth_core::UserName::parse(&self.hub.admin).map_err(|e| invalid("hub.admin", e.to_string()))?;
        if self.hub.max_body_bytes < 1024 {
            return Err(invalid("hub.max_body_bytes", "must be at least 1024".into()));
        }
        self.ssh.bind = self.ssh.bind.trim().to_string();
        if let Err(m) = self.ssh.validate() {
            let key =
                if m.starts_with("ssh.") { m.split(' ').next().unwrap_or("ssh").trim_end_matches(':') } else { "ssh" };
            return Err(invalid(key, m.clone()));
        }
        if self.auth.min_password_length == 0 || self.auth.min_password_length > 1024 {
            return Err(invalid("auth.min_password_length", "must be between 1 and 1024".into()));
        }
        if self.auth.argon2_memory_kib < 8 || self.auth.argon2_iterations == 0 {
            return Err(invalid("auth.argon2_memory_kib", "argon2 needs at least 8 KiB and 1 iteration".into()));
        }
        if self.proxy.threads > 256 {
            return Err(invalid("proxy.threads", "must be between 0 (one per core) and 256".into()));
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err(invalid("data_dir", "must not be empty".into()));
        }
        if !self.database_url.is_empty()
            && !["sqlite:", "postgres://", "postgresql://"].iter().any(|p| self.database_url.starts_with(p))
        {
            return Err(invalid("database_url", "must start with sqlite:, postgres:// or postgresql://".into()));
        }
        tracing_filter_ok(&self.log).map_err(|m| invalid("log", m))?;
        if !["auto", "local", "docker", "swarm"].contains(&self.spawner.kind.as_str()) {
            return Err(invalid(
                "spawner.kind",
                format!("{:?} is not auto, local, docker or swarm", self.spawner.kind),
            ));
        }
        if self.swarm.network.is_empty() {
            return Err(invalid("swarm.network", "must name a network".into()));
        }
        if !["self", "labelled"].contains(&self.swarm.nodes.as_str()) {
            return Err(invalid("swarm.nodes", format!("{:?} is not self or labelled", self.swarm.nodes)));
        }
        if !["node", "shared"].contains(&self.swarm.volumes.as_str()) {
            return Err(invalid("swarm.volumes", format!("{:?} is not node or shared", self.swarm.volumes)));
        }
        berth_spawner_docker::nodes::parse_engines(&self.swarm.engines, &self.swarm.engine_tls_dir)
            .map_err(|m| invalid("swarm.engines", m))?;
        if !self.swarm.engine_tls_dir.is_empty() && !std::path::Path::new(&self.swarm.engine_tls_dir).is_dir() {
            return Err(invalid("swarm.engine_tls_dir", format!("{} is not a directory", self.swarm.engine_tls_dir)));
        }
        if berth_spawner_docker::nodes::free_subnet_in(&self.swarm.node_subnets, &[]).is_none() {
            return Err(invalid(
                "swarm.node_subnets",
                format!("{:?} is not an IPv4 range of /24 or wider (10.231.0.0/16)", self.swarm.node_subnets),
            ));
        }
        if !self.swarm.hub_address.is_empty() && self.swarm.hub_address.parse::<std::net::IpAddr>().is_err() {
            return Err(invalid("swarm.hub_address", format!("{:?} is not an IP address", self.swarm.hub_address)));
        }
        if self.spawner.local_cmd.split_whitespace().next().is_none() {
            return Err(invalid("spawner.local_cmd", "must name a command".into()));
        }
        if self.spawner.start_timeout_seconds.is_zero() {
            return Err(invalid("spawner.start_timeout_seconds", "must be at least 1".into()));
        }
        if self.spawner.build_timeout_seconds.is_zero() {
            return Err(invalid("spawner.build_timeout_seconds", "must be at least 1".into()));
        }
        if !["auto", "nvml", "nvidia-smi", "off"].contains(&self.gpu.sampler.as_str()) {
            return Err(invalid("gpu.sampler", format!("{:?} is not auto, nvml, nvidia-smi or off", self.gpu.sampler)));
        }
        if !["queue", "refuse"].contains(&self.gpu.when_full.as_str()) {
            return Err(invalid("gpu.when_full", format!("{:?} is not queue or refuse", self.gpu.when_full)));
        }
        if self.gpu.idle_below_percent > 100 {
            return Err(invalid("gpu.idle_below_percent", format!("{} is more than 100", self.gpu.idle_below_percent)));
        }
        if self.gpu.mode > 2 {
            return Err(invalid("gpu.mode", format!("{} is not 0 (off), 1 (on) or 2 (auto)", self.gpu.mode)));
        }
        if berth_hub::usage::Period::parse(&self.usage.period).is_none() {
            return Err(invalid("usage.period", format!("{:?} is not month, week or day", self.usage.period)));
        }
        let quota = self.usage.gpu_hours_per_period;
        if !quota.is_finite() || quota < 0.0 {
            return Err(invalid("usage.gpu_hours_per_period", format!("{quota} is not a number of hours (0 or more)")));
        }
        self.metrics.parse().map_err(|m| invalid("metrics.allowed_addresses", m))?;
        self.cull.overrides().map_err(|m| invalid("cull.template_timeouts", m))?;
        berth_hub::updates::Updates::new(&self.images, &self.docker.image).map_err(|(k, m)| invalid(k, m))?;
        if self.cull.interval_seconds.is_zero() {
            return Err(invalid("cull.interval_seconds", "must be at least 1".into()));
        }
        if self.docker.cpu_limit < 0.0 {
            return Err(invalid("docker.cpu_limit", "must not be negative".into()));
        }
        if !self.docker.workdir.starts_with('/') || !self.docker.home_dir.starts_with('/') {
            return Err(invalid("docker.workdir", "mount points must be absolute paths".into()));
        }
        if !["off", "auto"].contains(&self.tls.mode.as_str()) {
            return Err(invalid("tls.mode", format!("{:?} is not off or auto", self.tls.mode)));
        }
        if self.tls.cert.is_empty() != self.tls.key.is_empty() {
            let key = if self.tls.cert.is_empty() { "tls.cert" } else { "tls.key" };
            return Err(invalid(key, "tls.cert and tls.key go together".into()));
        }
        Ok(self)
    }

    /// The database URL in effect.
    pub fn database_url(&self) -> String {
        if self.database_url.is_empty() {
            format!("sqlite://{}", self.data_dir.join("berth.sqlite").display())
        } else {
            self.database_url.clone()
        }
    }

    /// The defaults as a commented TOML file (`berth config defaults`).
    pub fn defaults_toml() -> String {
        let root = Value::try_from(Config::default()).unwrap_or(Value::Table(Default::default()));
        let mut out = String::from("# berth configuration: every key with its default.\n# Layers: defaults, this file (--config / BERTH_CONFIG), environment, flags.\n");
        let mut section = "";
        for (key, envs, doc) in KEYS {
            let (sec, leaf) = key.rsplit_once('.').unwrap_or(("", key));
            if sec != section {
                out.push_str(&format!("\n[{sec}]\n"));
                section = sec;
            }
            let value = lookup(&root, key).map(|v| v.to_string()).unwrap_or_default();
            out.push_str(&format!("\n# {doc}\n# Environment: {}\n{leaf} = {value}\n", envs.join(", ")));
        }
        out
    }

    /// The configuration reference in Markdown (`docs/configuration.md`).
    pub fn reference_markdown() -> String {
        let root = Value::try_from(Config::default()).unwrap_or(Value::Table(Default::default()));
        let mut out = String::from(
            "# Configuration reference\n\n<!-- generated by `berth config reference`; a test fails when it drifts -->\n\n\
             Layers, later ones winning: built-in defaults, the TOML file given by `--config` or `BERTH_CONFIG`, \
             environment variables, command-line flags. Unknown keys and invalid values stop berth with exit code 64 \
             and name the key. `berth config defaults` prints a complete file; `berth config check` checks one.\n\n\
             | key | default | environment | meaning |\n| --- | --- | --- | --- |\n",
        );
        for (key, envs, doc) in KEYS {
            let value = lookup(&root, key).map(|v| v.to_string()).unwrap_or_default();
            let envs: Vec<String> = envs.iter().map(|e| format!("`{e}`")).collect();
            out.push_str(&format!("| `{key}` | `{value}` | {} | {doc} |\n", envs.join(", ")));
        }
        out
    }
}

fn tracing_filter_ok(s: &str) -> Result<(), String> {
    if s.trim().is_empty() {
        return Err("must not be empty (try `info`)".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaves(v: &Value, prefix: &str, out: &mut Vec<String>) {
        if let Value::Table(t) = v {
            for (k, v) in t {
                let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                if v.is_table() {
                    leaves(v, &key, out);
                } else {
                    out.push(key);
                }
            }
        }
    }

    #[test]
    fn every_key_is_documented_and_every_documented_key_exists() {
        let root = Value::try_from(Config::default()).unwrap();
        let mut all = Vec::new();
        leaves(&root, "", &mut all);
        let documented: Vec<&str> = KEYS.iter().map(|k| k.0).collect();
        for k in &all {
            assert!(documented.contains(&k.as_str()), "{k} has no entry in KEYS");
        }
        for k in documented {
            assert!(all.iter().any(|a| a == k), "KEYS names {k}, which Config lacks");
        }
    }

    fn file(text: &str) -> (tempfile::TempDir, Sources) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("berth.toml");
        std::fs::write(&p, text).unwrap();
        (dir, Sources { file: Some(p), ..Default::default() })
    }

    #[test]
    fn image_update_settings_are_checked() {
        for (var, value, key, says) in [
            ("BERTH_IMAGES_POLICY", "sometimes", "images.policy", "not a policy"),
            ("BERTH_IMAGES_TEMPLATE_POLICIES", "lab", "images.template_policies", "template=policy"),
            ("BERTH_IMAGES_CHECK_AT", "25:00", "images.check_at", "HH:MM"),
        ] {
            let mut s = Sources::default();
            s.env.insert(var.into(), value.into());
            match Config::load(&s) {
                Err(ConfigError::Invalid { key: k, message, .. }) => {
                    assert_eq!(k, key, "{var}={value}");
                    assert!(message.contains(says), "{var}={value}: {message}");
                }
                other => panic!("{var}={value}: {other:?}"),
            }
        }
        let mut s = Sources::default();
        s.env.insert("BERTH_IMAGES_TEMPLATE_POLICIES".into(), "lab=next-start,docker.image=notify".into());
        s.env.insert("BERTH_REGISTRY_PASSWORD".into(), "pw-in-config-9".into());
        let c = Config::load(&s).unwrap();
        assert_eq!(c.images.template_policies, vec!["lab=next-start", "docker.image=notify"]);
        assert_eq!(c.docker.registry_password.0, "pw-in-config-9");
        assert!(!format!("{c:?}").contains("pw-in-config-9"), "the password is redacted in Debug");
    }

    #[test]
    fn layers_apply_in_order() {
        let (_d, mut s) = file("bind = \"127.0.0.1:9000\"\n[hub]\nadmin = \"root\"\n");
        s.env.insert("JUPYTERHUB_ADMIN".into(), "legacy".into());
        s.env.insert("BERTH_LOCKOUT_ATTEMPTS".into(), "3".into());
        s.env.insert("JUPYTERHUB_BASE_URL".into(), "jupyter".into());
        s.flags.push(("bind".into(), "127.0.0.1:9001".into()));
        let c = Config::load(&s).unwrap();
        assert_eq!(c.bind.port(), 9001);
        assert_eq!(c.hub.admin, "legacy", "environment beats file");
        assert_eq!(c.auth.lockout_attempts, 3);
        assert_eq!(c.hub.base_url, "/jupyter/");
        let mut s2 = s.clone();
        s2.env.insert("BERTH_ADMIN".into(), "chief".into());
        assert_eq!(Config::load(&s2).unwrap().hub.admin, "chief", "BERTH_* beats the legacy alias");
    }

    #[test]
    fn errors_name_the_key() {
        let cases: &[(&str, &str)] = &[
            ("colour = 1", "`colour`"),
            ("[hub]\nadmn = \"x\"", "`hub.admn`"),
            ("[auth]\nlockout_attempts = \"five\"", "`auth.lockout_attempts`"),
            ("bind = \"not an address\"", "`bind`"),
            ("[hub]\nadmin = \"Bad Name\"", "`hub.admin`"),
            ("hub = 3", "`hub`"),
        ];
        for (text, key) in cases {
            let (_d, s) = file(text);
            let err = Config::load(&s).unwrap_err().to_string();
            assert!(err.contains(key), "{text:?} -> {err}");
        }
        let (_d, s) = file("this is = not toml [");
        assert!(matches!(Config::load(&s), Err(ConfigError::Parse { .. })));
        let mut s = Sources::default();
        s.env.insert("BERTH_LOCKOUT_SECONDS".into(), "ten".into());
        let err = Config::load(&s).unwrap_err().to_string();
        assert!(err.contains("BERTH_LOCKOUT_SECONDS") && err.contains("auth.lockout_seconds"), "{err}");
    }

    #[test]
    fn defaults_file_round_trips() {
        let (_d, s) = file(&Config::defaults_toml());
        let c = Config::load(&s).unwrap();
        assert_eq!(toml::to_string(&c).unwrap(), toml::to_string(&Config::default()).unwrap());
    }

    #[test]
    fn reference_doc_is_current() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/configuration.md");
        let committed = std::fs::read_to_string(path).unwrap_or_default();
        if std::env::var_os("BERTH_REGENERATE").is_some() {
            std::fs::write(path, Config::reference_markdown()).unwrap();
            return;
        }
        assert_eq!(
            committed,
            Config::reference_markdown(),
            "docs/configuration.md is out of date: run `BERTH_REGENERATE=1 cargo test -p berth-server reference_doc`"
        );
    }
}
