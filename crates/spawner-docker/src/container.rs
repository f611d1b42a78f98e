//! A server's container: its creation request (hardened as `hardening`
//! says), creation (replacing a stale container of berth's), its address,
//! and removal.

use std::collections::HashMap;
use std::time::Duration;

use berth_spawner::{DataRole, Progress, ProgressTx, SpawnError, SpawnSpec, VolumeMount};
use bollard::models::{
    ContainerCreateBody, DeviceRequest, HostConfig, Mount, MountTypeEnum, RestartPolicy, RestartPolicyNameEnum,
};
use bollard::query_parameters::{CreateContainerOptions, InspectContainerOptions, RemoveContainerOptions};

use crate::config::parse_pairs;
use crate::hardening;
use crate::{
    container_name, engine_error, is_not_found, DockerSpawner, CONTAINER_PORT, LABEL_MANAGED, LABEL_SERVER,
    LABEL_TEMPLATE, LABEL_USER,
};

/// Variables passed through from berth's environment when set (the
/// original deployment's service toggles).
const PASS_THROUGH: &[&str] = &["ENABLE_SERVICE_MLFLOW", "ENABLE_SERVICE_GLANCES", "ENABLE_SERVICE_TENSORBOARD"];

/// The NVIDIA runtime's list of the GPUs a container sees.
const GPU_VAR: &str = "NVIDIA_VISIBLE_DEVICES";

impl DockerSpawner {
    /// The container's creation request, as `start` sends it (public so tests
    /// can check what a GPU server's container carries without a GPU).
    pub fn container_body(&self, spec: &SpawnSpec, api_url: &str) -> ContainerCreateBody {
        let image = spec.image.clone().unwrap_or_else(|| self.cfg.image.clone());
        let mut env: Vec<String> = Vec::new();
        // Which GPUs a server sees is berth's to say, once, at the end.
        for (k, v) in spec.env.iter().filter(|(k, _)| k.as_str() != GPU_VAR) {
            let v = match k.as_str() {
                "JUPYTERHUB_API_URL" => api_url.to_string(),
                "JUPYTERHUB_ACTIVITY_URL" => format!("{api_url}/users/{}/activity", spec.user),
                _ => v.clone(),
            };
            env.push(format!("{k}={v}"));
        }
        let port = spec.port.unwrap_or(CONTAINER_PORT);
        env.push(format!("JUPYTERHUB_SERVICE_URL=http://0.0.0.0:{port}{}", spec.prefix));
        for k in PASS_THROUGH {
            if let Ok(v) = std::env::var(k) {
                env.push(format!("{k}={v}"));
            }
        }
        env.extend(
            parse_pairs(&self.cfg.env).into_iter().filter(|(k, _)| k != GPU_VAR).map(|(k, v)| format!("{k}={v}")),
        );
        env.push(format!("{GPU_VAR}={}", hardening::visible_devices(&spec.gpus)));
        let mounts = self
            .volume_plan(spec)
            .into_iter()
            .map(|v| Mount {
                source: Some(v.name),
                target: Some(v.target),
                typ: Some(MountTypeEnum::VOLUME),
                ..Default::default()
            })
            .collect();
        let device_requests = (!spec.gpus.is_empty()).then(|| {
            vec![DeviceRequest {
                driver: Some(self.cfg.gpu_driver.clone()),
                device_ids: Some(spec.gpus.clone()),
                capabilities: Some(vec![vec!["gpu".to_string()]]),
                ..Default::default()
            }]
        });
        let labels = HashMap::from([
            (LABEL_MANAGED.to_string(), "true".to_string()),
            (LABEL_USER.to_string(), spec.user.clone()),
            (LABEL_SERVER.to_string(), spec.server.clone()),
            (LABEL_TEMPLATE.to_string(), spec.template.clone()),
        ]);
        let host_config = HostConfig {
            network_mode: Some(self.cfg.network.clone()),
            mounts: Some(mounts),
            shm_size: Some((self.cfg.shm_size_mib * 1024 * 1024) as i64),
            nano_cpus: (self.cfg.cpu_limit > 0.0).then_some((self.cfg.cpu_limit * 1e9) as i64),
            memory: hardening::memory_limit(&self.cfg, hardening::host_memory()),
            pids_limit: hardening::pids_limit(&self.cfg),
            security_opt: Some(hardening::SECURITY_OPT.iter().map(|s| s.to_string()).collect()),
            cap_drop: Some(hardening::CAP_DROP.iter().map(|s| s.to_string()).collect()),
            device_requests,
            restart_policy: Some(RestartPolicy { name: Some(RestartPolicyNameEnum::NO), maximum_retry_count: None }),
            init: Some(true),
            ..Default::default()
        };
        ContainerCreateBody {
            image: Some(image),
            cmd: (!spec.cmd.is_empty())
                .then(|| spec.cmd.iter().map(|a| a.replace("{port}", &port.to_string())).collect()),
            env: Some(env),
            labels: Some(labels),
            working_dir: Some(self.cfg.workdir.clone()),
            exposed_ports: Some(HashMap::from([(format!("{port}/tcp"), HashMap::new())])),
            host_config: Some(host_config),
            ..Default::default()
        }
    }

    /// Creates (but does not start) the server's container; returns its id.
    pub async fn create(&self, spec: &SpawnSpec, progress: &ProgressTx) -> Result<String, SpawnError> {
        self.create_timed(spec, progress).await.map(|(id, _)| id)
    }

    /// `create`, also returning the time spent in the engine's create call.
    pub(crate) async fn create_timed(
        &self,
        spec: &SpawnSpec,
        progress: &ProgressTx,
    ) -> Result<(String, Duration), SpawnError> {
        let gateway = self.ensure_network().await?;
        let image = spec.image.clone().unwrap_or_else(|| self.cfg.image.clone());
        if image.is_empty() {
            return Err(SpawnError::Failed(
                "no image to run: docker.image is empty and the start names no template (set docker.image, or \
                 templates.default for default servers)"
                    .into(),
            ));
        }
        if spec.build.is_empty() {
            self.ensure_image(&image, progress).await?;
        } else {
            self.ensure_built(&image, &spec.build, progress).await?;
        }
        let _ = progress.send(Progress { progress: 40, message: "Preparing volumes…".into() });
        self.prepare_volumes(spec).await?;
        let name = container_name(&spec.user, &spec.server);
        let body = self.container_body(spec, &self.hub_api_url(&gateway));
        let docker = self.client()?;
        let create = || {
            let opts = CreateContainerOptions { name: Some(name.clone()), ..Default::default() };
            docker.create_container(Some(opts), body.clone())
        };
        let t = std::time::Instant::now();
        let created = match create().await {
            Ok(c) => Ok(c),
            // A container of that name left from an earlier run (kept on
            // stop, or the engine restarted): if it is berth's, replaced.
            Err(bollard::errors::Error::DockerResponseServerError { status_code: 409, .. }) => {
                self.remove_leftover(&name).await?;
                create().await
            }
            Err(e) => Err(e),
        };
        let created = created.map_err(|e| {
            // The network may be what is missing: looked at again next time.
            self.forget_network();
            engine_error(e)
        })?;
        Ok((created.id, t.elapsed()))
    }

    /// Removes a container of berth's named `name`; one that is not berth's is an error.
    async fn remove_leftover(&self, name: &str) -> Result<(), SpawnError> {
        match self.client()?.inspect_container(name, None::<InspectContainerOptions>).await {
            Ok(existing) => {
                let ours = existing
                    .config
                    .and_then(|c| c.labels)
                    .is_some_and(|l| l.get(LABEL_MANAGED).is_some_and(|v| v == "true"));
                if !ours {
                    return Err(SpawnError::Failed(format!(
                        "a container named {name} exists and is not berth's; remove or rename it"
                    )));
                }
                self.client()?
                    .remove_container(name, Some(RemoveContainerOptions { force: true, ..Default::default() }))
                    .await
                    .map_err(engine_error)
            }
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(engine_error(e)),
        }
    }

    /// Makes the volumes of the server's plan that berth owns (and checks
    /// that adopted ones are there): what a start does before the container.
    pub(crate) async fn prepare_volumes(&self, spec: &SpawnSpec) -> Result<(), SpawnError> {
        // The volumes at once: each is its own engine call.
        let plan = self.volume_plan(spec);
        let shared_opts = parse_pairs(&self.cfg.shared_volume_opts);
        futures_util::future::try_join_all(plan.iter().map(|v| async {
            if spec.volumes.iter().any(|a| a.role == v.role) {
                // Adopted: it holds someone's data, so a missing one is an
                // error, never an empty replacement.
                self.require_volume(&v.name, v.role, &spec.user).await
            } else if v.role == DataRole::Shared {
                self.ensure_volume(&v.name, &self.cfg.shared_volume_driver, &shared_opts, "").await
            } else {
                self.ensure_volume(&v.name, "local", &[], &spec.user).await
            }
        }))
        .await?;
        Ok(())
    }

    pub(crate) async fn container_ip(&self, id: &str) -> Result<Option<String>, SpawnError> {
        let c = self.client()?.inspect_container(id, None::<InspectContainerOptions>).await.map_err(engine_error)?;
        Ok(c.network_settings
            .and_then(|n| n.networks)
            .and_then(|mut nets| nets.remove(&self.cfg.network))
            .and_then(|e| e.ip_address)
            .filter(|ip| !ip.is_empty()))
    }

    /// Force-removes a container; a missing one is no error.
    pub(crate) async fn remove(&self, id: &str) {
        let Ok(docker) = self.client() else { return };
        if let Err(e) =
            docker.remove_container(id, Some(RemoveContainerOptions { force: true, ..Default::default() })).await
        {
            if !is_not_found(&e) {
                tracing::warn!(container = %id, error = %e, "could not remove the container");
            }
        }
    }
}

impl DockerSpawner {
    /// The volumes a server mounts, one per role: an adopted volume where the
    /// spec names one, else berth's own (`berth-<owner>-<role>`, the
    /// configured shared volume unless that is turned off).
    pub fn volume_plan(&self, spec: &SpawnSpec) -> Vec<VolumeMount> {
        let mut plan = Vec::new();
        for role in DataRole::ALL {
            if let Some(a) = spec.volumes.iter().find(|a| a.role == role) {
                plan.push(a.clone());
                continue;
            }
            let (name, target) = match role {
                DataRole::Home => (own_volume(owner_of(spec), role), &self.cfg.home_dir),
                DataRole::Workspace => (own_volume(owner_of(spec), role), &self.cfg.workdir),
                DataRole::Cache => (own_volume(owner_of(spec), role), &self.cfg.cache_dir),
                DataRole::Shared if self.cfg.shared_volume.is_empty() => continue,
                DataRole::Shared => (self.cfg.shared_volume.clone(), &self.cfg.shared_mount),
            };
            plan.push(VolumeMount { role, name, target: target.clone() });
        }
        plan
    }
}

/// The name of berth's own volume for a user's role; `owner` is the account id.
pub fn own_volume(owner: &str, role: DataRole) -> String {
    format!("berth-{owner}-{role}")
}

/// What a user's volumes are named by: the account's immutable id.
fn owner_of(spec: &SpawnSpec) -> &str {
    if spec.owner_id.is_empty() {
        &spec.user
    } else {
        &spec.owner_id
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::Config;

    fn spec(gpus: &[&str]) -> SpawnSpec {
        SpawnSpec {
            owner_id: String::new(),
            build: Vec::new(),
            user: "alice".into(),
            server: String::new(),
            env: BTreeMap::from([
                ("JUPYTERHUB_API_URL".to_string(), "x".to_string()),
                (GPU_VAR.to_string(), "all".to_string()),
            ]),
            cmd: vec![],
            prefix: "/user/alice/".into(),
            template: "default".into(),
            image: None,
            gpus: gpus.iter().map(|g| g.to_string()).collect(),
            port: None,
            volumes: Vec::new(),
        }
    }

    fn body(cfg: Config, gpus: &[&str]) -> ContainerCreateBody {
        DockerSpawner::connect(cfg, "/").unwrap().container_body(&spec(gpus), "http://192.168.0.1:8081/hub/api")
    }

    fn gpu_env(b: &ContainerCreateBody) -> Vec<String> {
        b.env.iter().flatten().filter(|e| e.starts_with("NVIDIA_VISIBLE_DEVICES=")).cloned().collect()
    }

    #[test]
    fn hardened_by_default() {
        let b = body(Config { env: format!("{GPU_VAR}=all;A=b"), ..Config::default() }, &[]);
        let hc = b.host_config.clone().unwrap_or_default();
        assert_eq!(hc.security_opt, Some(vec!["no-new-privileges:true".to_string()]));
        let dropped = hc.cap_drop.unwrap_or_default();
        for cap in ["NET_RAW", "MKNOD", "AUDIT_WRITE", "SYS_CHROOT", "SETFCAP", "NET_BIND_SERVICE"] {
            assert!(dropped.iter().any(|c| c == cap), "{cap} not in {dropped:?}");
        }
        // What images that start as root and switch user need stays.
        for cap in ["CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID", "SETPCAP"] {
            assert!(!dropped.iter().any(|c| c == cap), "{cap} dropped");
        }
        assert_eq!(hc.cap_add, None);
        assert_eq!(hc.pids_limit, Some(4096));
        let host = hardening::host_memory().unwrap_or_default();
        assert_eq!(hc.memory, Some((host / 4 * 3 / (1 << 20) * (1 << 20)) as i64));
        // No GPU: none visible, whatever the template or the extra environment said.
        assert_eq!(gpu_env(&b), ["NVIDIA_VISIBLE_DEVICES=void"]);
        assert!(b.env.iter().flatten().any(|e| e == "A=b"));
        assert_eq!(hc.device_requests, None);
    }

    #[test]
    fn adopted_volumes_replace_berths_own_for_their_role() {
        let mounts = |cfg: Config, adopted: Vec<VolumeMount>| -> Vec<String> {
            let mut s = spec(&[]);
            s.owner_id = "1abc".into();
            s.volumes = adopted;
            let b = DockerSpawner::connect(cfg, "/").unwrap().container_body(&s, "http://x/hub/api");
            b.host_config
                .and_then(|h| h.mounts)
                .unwrap_or_default()
                .into_iter()
                .map(|m| format!("{}:{}", m.source.unwrap_or_default(), m.target.unwrap_or_default()))
                .collect()
        };
        assert_eq!(
            mounts(Config::default(), vec![]),
            [
                "berth-1abc-home:/home",
                "berth-1abc-workspace:/home/lab/workspace",
                "berth-1abc-cache:/home/lab/.cache",
                "berth-shared:/mnt/shared"
            ]
        );
        let adopted = vec![
            VolumeMount { role: DataRole::Workspace, name: "jupyterlab-alice_workspace".into(), target: "/w".into() },
            VolumeMount { role: DataRole::Shared, name: "jupyterhub_shared".into(), target: "/mnt/shared".into() },
        ];
        assert_eq!(
            mounts(Config::default(), adopted.clone()),
            [
                "berth-1abc-home:/home",
                "jupyterlab-alice_workspace:/w",
                "berth-1abc-cache:/home/lab/.cache",
                "jupyterhub_shared:/mnt/shared"
            ]
        );
        // An adopted shared volume is mounted even when berth's own is off.
        let off = Config { shared_volume: String::new(), ..Config::default() };
        assert!(mounts(off.clone(), adopted).contains(&"jupyterhub_shared:/mnt/shared".to_string()));
        assert!(!mounts(off, vec![]).iter().any(|m| m.ends_with(":/mnt/shared")));
    }

    #[test]
    fn gpus_and_limits_as_configured() {
        let b = body(Config { pids_limit: 0, mem_unlimited: true, ..Config::default() }, &["GPU-1", "GPU-3"]);
        let hc = b.host_config.clone().unwrap_or_default();
        assert_eq!((hc.pids_limit, hc.memory), (None, None));
        assert_eq!(gpu_env(&b), ["NVIDIA_VISIBLE_DEVICES=GPU-1,GPU-3"]);
        let b = body(Config { mem_limit_mib: 2048, pids_limit: 100, ..Config::default() }, &[]);
        let hc = b.host_config.unwrap_or_default();
        assert_eq!((hc.pids_limit, hc.memory), (Some(100), Some(2048 * 1024 * 1024)));
    }
}
