//! The `[docker]` configuration section.

use serde::{Deserialize, Serialize};

/// The `[docker]` section of berth's configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Image for default servers; empty (the default): they run the
    /// `templates.default` template's image, built on demand.
    pub image: String,
    /// Network the containers join (created if missing, as a bridge with
    /// inter-container traffic off); the hub reaches them on it.
    pub network: String,
    /// URL containers use to reach the hub's API; empty derives it from the network's gateway.
    pub hub_connect_url: String,
    /// Remove the container when its server stops (volumes are always kept).
    pub remove_on_stop: bool,
    /// Where the user's workspace volume is mounted.
    pub workdir: String,
    /// Where the user's home volume is mounted.
    pub home_dir: String,
    /// Where the user's cache volume is mounted.
    pub cache_dir: String,
    /// The shared volume (empty turns it off) and where it is mounted.
    pub shared_volume: String,
    pub shared_mount: String,
    /// Volume driver and its options (`key=value;key=value`), e.g. CIFS:
    /// `type=cifs;device=//server/share;o=username=u,password=p`.
    pub shared_volume_driver: String,
    pub shared_volume_opts: String,
    /// `/dev/shm` size in MiB (PyTorch data loaders need more than Docker's 64 MB).
    pub shm_size_mib: u64,
    /// CPU limit in cores (0: none).
    pub cpu_limit: f64,
    /// Memory limit per server in MiB; 0 (the default) means three quarters
    /// of the host's memory (`MemTotal` of `/proc/meminfo`; no limit, with a
    /// warning, when that cannot be read), unless `mem_unlimited`.
    pub mem_limit_mib: u64,
    /// With `mem_limit_mib = 0`: no memory limit at all instead of three
    /// quarters of the host's (default false). A positive `mem_limit_mib`
    /// applies either way.
    pub mem_unlimited: bool,
    /// Most processes (threads count) a server's container may run at once,
    /// so a fork bomb stays inside it; 0 means no limit (default 4096).
    pub pids_limit: u64,
    /// Extra environment for every container: `KEY=value;KEY=value`
    /// (`NVIDIA_VISIBLE_DEVICES` is berth's: the server's GPUs, or `void`).
    pub env: String,
    /// Driver named in GPU device requests.
    pub gpu_driver: String,
    /// User name for the registries images are checked against and pulled
    /// from (empty: anonymous).
    pub registry_username: String,
    /// Its password or token; never logged (its `Debug` is redacted).
    pub registry_password: RegistryPassword,
}

/// A registry password: written to the engine's auth header only, redacted
/// in `Debug` so no log line or error carries it.
#[derive(Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct RegistryPassword(pub String);

impl std::fmt::Debug for RegistryPassword {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_empty() { "\"\"" } else { "\"(redacted)\"" })
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            image: String::new(),
            network: "berth".into(),
            hub_connect_url: String::new(),
            remove_on_stop: true,
            workdir: "/home/lab/workspace".into(),
            home_dir: "/home".into(),
            cache_dir: "/home/lab/.cache".into(),
            shared_volume: "berth-shared".into(),
            shared_mount: "/mnt/shared".into(),
            shared_volume_driver: "local".into(),
            shared_volume_opts: String::new(),
            shm_size_mib: 2048,
            cpu_limit: 0.0,
            mem_limit_mib: 0,
            mem_unlimited: false,
            pids_limit: 4096,
            env: String::new(),
            gpu_driver: "nvidia".into(),
            registry_username: String::new(),
            registry_password: RegistryPassword::default(),
        }
    }
}

pub fn parse_pairs(s: &str) -> Vec<(String, String)> {
    s.split(';')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .filter(|(k, _)| !k.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs() {
        assert_eq!(
            parse_pairs("type=cifs;device=//srv/share;o=username=u,password=p"),
            vec![
                ("type".to_string(), "cifs".to_string()),
                ("device".to_string(), "//srv/share".to_string()),
                ("o".to_string(), "username=u,password=p".to_string())
            ]
        );
        assert!(parse_pairs("").is_empty());
    }

    #[test]
    fn registry_password_is_redacted() {
        let c = Config { registry_password: RegistryPassword("hunter2-secret".into()), ..Config::default() };
        assert!(!format!("{c:?}").contains("hunter2-secret"));
        assert!(format!("{c:?}").contains("(redacted)"));
    }
}
