//! The parts `App::build` wires together, chosen from the configuration:
//! the spawner, the GPU inventory, the template catalog, TLS names.

use std::sync::Arc;
use std::time::Duration;

use berth_hub::gpus::Gpu;
use berth_hub::templates::Templates;
use berth_spawner::local::LocalConfig;
use berth_spawner::{LocalSpawner, Spawner};
use berth_spawner_docker::{DockerSpawner, HubNetwork, SwarmSpawner};

use crate::{Config, StartError};

/// What `build_spawner` makes: the spawner, the Docker engine behind it
/// (GPU detection), and the network its servers reach the hub on.
pub(crate) type Spawners = (Arc<dyn Spawner>, Option<Arc<DockerSpawner>>, Option<Arc<dyn HubNetwork>>);

/// The spawner the configuration asks for: `docker`, `swarm`, `local`, or
/// `auto` (Docker; local processes only when configured, never as a fall-back).
pub(crate) async fn build_spawner(config: &Config) -> Result<Spawners, StartError> {
    let local = || -> Arc<dyn Spawner> {
        let cmd: Vec<String> = config.spawner.local_cmd.split_whitespace().map(str::to_string).collect();
        Arc::new(LocalSpawner::new(LocalConfig {
            cmd,
            data_dir: config.data_dir.clone(),
            provision: config.spawner.provision,
            provision_packages: vec!["jupyterhub".into(), "jupyterlab".into()],
            isolate_users: config.spawner.local_isolate_users,
            uid_min: config.spawner.local_uid_min,
            uid_max: config.spawner.local_uid_max,
        }))
    };
    match config.spawner.kind.as_str() {
        "local" => Ok((local(), None, None)),
        kind => {
            let docker = DockerSpawner::connect(config.docker.clone(), &config.hub.base_url);
            let answer = match &docker {
                Ok(d) => tokio::time::timeout(Duration::from_secs(5), d.ping()).await.unwrap_or_else(|_| {
                    Err(berth_spawner::SpawnError::Failed("the Docker engine did not answer within 5 s".into()))
                }),
                Err(e) => Err(berth_spawner::SpawnError::Failed(e.to_string())),
            };
            match (kind, docker, answer) {
                ("swarm", Ok(d), answer) => {
                    let grace = berth_spawner::StopGrace {
                        interrupt: config.spawner.stop_grace_seconds,
                        terminate: config.spawner.stop_grace_seconds,
                    };
                    let s = SwarmSpawner::new(d.clone(), config.swarm.clone(), grace);
                    let facts = match answer {
                        Ok(_) => tokio::time::timeout(Duration::from_secs(5), s.node_facts()).await.unwrap_or_else(
                            |_| Err(berth_spawner::SpawnError::Failed("the swarm did not answer within 5 s".into())),
                        ),
                        Err(e) => Err(e),
                    };
                    match facts {
                        Ok(f) => tracing::info!(node = %f.node_id, gpu_resource = ?f.gpu_kind, "using the Swarm spawner"),
                        // Starts fail with this message until the swarm answers.
                        Err(e) => tracing::warn!(error = %e, "the Swarm spawner cannot start servers now"),
                    }
                    Ok((s.clone() as Arc<dyn Spawner>, Some(d), Some(s as Arc<dyn HubNetwork>)))
                }
                (_, Ok(d), Ok(version)) => {
                    tracing::info!(%version, "using the Docker spawner");
                    Ok((d.clone() as Arc<dyn Spawner>, Some(d.clone()), Some(d as Arc<dyn HubNetwork>)))
                }
                (_, Ok(d), Err(e)) => {
                    // Never a silent fall-back to local processes (they isolate
                    // users less): keep to Docker, which reconnects by itself;
                    // starts fail with a clear message until the engine answers.
                    tracing::warn!(
                        error = %e,
                        "the Docker engine does not answer now; servers cannot start until it does (berth keeps trying; set spawner.kind = \"local\" to run servers as local processes instead)"
                    );
                    Ok((d.clone() as Arc<dyn Spawner>, Some(d.clone()), Some(d as Arc<dyn HubNetwork>)))
                }
                (_, Err(e), _) => Err(StartError::Unsupported(format!(
                    "cannot use the Docker spawner: {e} (set spawner.kind = \"local\" to run servers as local processes)"
                ))),
            }
        }
    }
}

/// The GPUs the hub may hand out: configured ids, or what detection finds.
pub(crate) async fn gpu_inventory(config: &Config, docker: Option<&Arc<DockerSpawner>>) -> Vec<Gpu> {
    let gpu = &config.gpu;
    if gpu.mode == 0 {
        return Vec::new();
    }
    let configured: Vec<Gpu> = gpu
        .devices
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .map(|d| Gpu { id: d.to_string(), name: "configured".into() })
        .collect();
    if !configured.is_empty() {
        tracing::info!(count = configured.len(), "GPUs from the configuration");
        return configured;
    }
    let (found, how) = match docker {
        Some(d) => {
            let det = d.detect_gpus(&gpu.probe_image).await;
            (det.devices.into_iter().map(|g| Gpu { id: g.id, name: g.name }).collect::<Vec<_>>(), det.how)
        }
        None => match tokio::process::Command::new("nvidia-smi").arg("-L").output().await {
            Ok(out) if out.status.success() => {
                let devs = berth_spawner_docker::gpu::parse_nvidia_smi_list(&String::from_utf8_lossy(&out.stdout));
                let n = devs.len();
                (
                    devs.into_iter().map(|g| Gpu { id: g.id, name: g.name }).collect(),
                    format!("nvidia-smi -L on the host: {n} GPU(s)"),
                )
            }
            _ => (Vec::new(), "no nvidia-smi on the host".to_string()),
        },
    };
    if found.is_empty() && gpu.mode == 1 {
        tracing::error!(%how, "GPU support is on (gpu.mode = 1) but no GPU was found; servers asking for GPUs will be refused");
    } else {
        tracing::info!(count = found.len(), %how, "GPU detection");
    }
    found
}

pub(crate) fn tls_names(config: &Config) -> Vec<String> {
    let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()];
    if let Ok(h) = std::fs::read_to_string("/etc/hostname") {
        let h = h.trim();
        if !h.is_empty() {
            names.push(h.to_string());
        }
    }
    let ip = config.bind.ip();
    if !ip.is_unspecified() {
        names.push(ip.to_string());
    }
    names.extend(config.tls.names.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_string));
    names.sort();
    names.dedup();
    names
}

/// The templates the hub offers: `templates.dir`, or the built-in catalog;
/// with `runs_images` (the Docker spawner) and no `docker.image`, default
/// servers run `templates.default`.
pub(crate) fn load_templates(config: &Config, runs_images: bool) -> Result<Templates, StartError> {
    let catalog = if config.templates.dir.is_empty() {
        berth_catalog::Catalog::builtin()
    } else {
        berth_catalog::Catalog::load(std::path::Path::new(&config.templates.dir))
    };
    let catalog =
        catalog.map_err(|p| StartError::Templates(p.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("; ")))?;
    let problems = berth_catalog::check::check(&catalog);
    if !problems.is_empty() {
        return Err(StartError::Templates(problems.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("; ")));
    }
    let all = catalog.hub_templates();
    let mut templates = Templates::new(config.templates.clone(), all.clone());
    if runs_images && config.docker.image.is_empty() {
        templates = templates.with_default(&all).map_err(StartError::Templates)?;
    }
    for id in &config.templates.prebuild {
        if templates.get(id).is_none() {
            let offered: Vec<&str> = templates.templates().iter().map(|t| t.id.as_str()).collect();
            return Err(StartError::Templates(format!(
                "templates.prebuild names {id:?}, which the hub does not offer (offered: {})",
                offered.join(", ")
            )));
        }
    }
    Ok(templates)
}
