//! `berth doctor`: one line per check, `OK` or `FIX` with what to do.

use std::time::Duration;

use berth_spawner_docker::DockerSpawner;

use crate::config::Config;

fn line(ok: bool, what: &str, detail: &str) -> bool {
    println!("{} {what}: {detail}", if ok { "OK " } else { "FIX" });
    ok
}

/// Runs every check; true when none needs fixing.
pub async fn run(config: &Config) -> bool {
    let mut all = true;
    // Data directory and database.
    all &= match crate::prepare_data_dir(&config.data_dir) {
        Ok(()) => line(true, "data directory", &config.data_dir.display().to_string()),
        Err(e) => line(false, "data directory", &format!("{e}; choose another with --data-dir")),
    };
    all &= match berth_store::Store::open(&config.database_url()).await {
        Ok(s) => {
            let users = s.count_users().await.unwrap_or(0);
            s.close().await;
            line(true, "database", &format!("{} users", users))
        }
        Err(e) => line(false, "database", &e.to_string()),
    };
    // The listening port.
    all &= match tokio::net::TcpListener::bind(config.bind).await {
        Ok(_) => line(true, "port", &format!("{} is free", config.bind)),
        Err(e) => line(
            false,
            "port",
            &format!("{}: {e} (is berth already running? otherwise pick another with --bind)", config.bind),
        ),
    };
    // Docker.
    if config.spawner.kind == "local" {
        line(true, "spawner", "local processes (spawner.kind = local)");
    } else {
        match DockerSpawner::connect(config.docker.clone(), &config.hub.base_url) {
            Err(e) => {
                all &=
                    line(!["docker", "swarm"].contains(&config.spawner.kind.as_str()), "Docker engine", &e.to_string())
            }
            Ok(d) => match tokio::time::timeout(Duration::from_secs(5), d.ping()).await {
                Ok(Ok(version)) => {
                    line(true, "Docker engine", &format!("version {version}"));
                    if config.spawner.kind == "swarm" {
                        let grace = berth_spawner::StopGrace::default();
                        let s = berth_spawner_docker::SwarmSpawner::new(d.clone(), config.swarm.clone(), grace);
                        let facts = s.node_facts().await;
                        let in_swarm = facts.is_ok();
                        all &= match facts {
                            Ok(f) => line(
                                true,
                                "Swarm",
                                &format!(
                                    "a manager; servers run on this node ({}){}",
                                    f.node_id,
                                    f.gpu_kind
                                        .map(|k| format!(", which advertises GPUs as the generic resource {k}"))
                                        .unwrap_or_default()
                                ),
                            ),
                            Err(e) => line(false, "Swarm", &e.to_string()),
                        };
                        if in_swarm {
                            all &= match s.ensure_network().await {
                                Ok(gw) => {
                                    line(true, "Swarm network", &format!("{} (gateway {gw})", config.swarm.network))
                                }
                                Err(e) => line(false, "Swarm network", &e.to_string()),
                            };
                            all &= swarm_nodes(&s).await;
                        }
                    }
                    if config.spawner.kind != "swarm" {
                        all &= match d.ensure_network().await {
                            Ok(gw) => {
                                line(true, "Docker network", &format!("{} (gateway {gw})", config.docker.network))
                            }
                            Err(e) => line(false, "Docker network", &e.to_string()),
                        };
                    }
                    let image_ok =
                        d.client().ok().map(|c| async move { c.inspect_image(&config.docker.image).await.is_ok() });
                    let present = match image_ok {
                        Some(f) => f.await,
                        None => false,
                    };
                    line(
                        true,
                        "default image",
                        &if present {
                            format!("{} is present", config.docker.image)
                        } else {
                            format!("{} is not present; it is pulled on the first start", config.docker.image)
                        },
                    );
                    if !config.docker.shared_volume.is_empty() {
                        line(
                            true,
                            "shared volume",
                            &format!(
                                "{} (driver {}) mounted at {}",
                                config.docker.shared_volume,
                                config.docker.shared_volume_driver,
                                config.docker.shared_mount
                            ),
                        );
                    }
                    let det = d.detect_gpus(&config.gpu.probe_image).await;
                    let gpus: Vec<String> = det.devices.iter().map(|g| format!("{} {}", g.id, g.name)).collect();
                    let ok = !(config.gpu.mode == 1 && det.devices.is_empty() && config.gpu.devices.is_empty());
                    all &= line(
                        ok,
                        "GPUs",
                        &format!(
                            "mode {}; {}{}{}",
                            config.gpu.mode,
                            det.how,
                            if gpus.is_empty() { String::new() } else { format!(": {}", gpus.join(", ")) },
                            if config.gpu.devices.is_empty() {
                                String::new()
                            } else {
                                format!("; configured: {}", config.gpu.devices)
                            }
                        ),
                    );
                }
                Ok(Err(e)) => {
                    all &= line(
                        !["docker", "swarm"].contains(&config.spawner.kind.as_str()),
                        "Docker engine",
                        &format!("{e}; servers run as local processes until it answers"),
                    )
                }
                Err(_) => {
                    all &= line(
                        !["docker", "swarm"].contains(&config.spawner.kind.as_str()),
                        "Docker engine",
                        "did not answer within 5 s",
                    )
                }
            },
        }
    }
    all
}

/// One line per swarm node: whether berth may place servers there, its
/// state, its GPUs and their runtime, and (other nodes) whether berth
/// reaches its engine and its part of the network is made.
async fn swarm_nodes(s: &berth_spawner_docker::SwarmSpawner) -> bool {
    let nodes = match s.nodes().await {
        Ok(n) => n,
        Err(e) => return line(false, "Swarm nodes", &e.to_string()),
    };
    let mut ok = true;
    let mut usable = 0;
    for n in &nodes {
        let uses = s.may_use(n);
        let label = format!("Swarm node {}{}", n.hostname, if n.own { " (berth's)" } else { "" });
        if !uses {
            line(
                true,
                &label,
                &format!("{}, {}; not used for servers (no berth.servers=true label)", n.state, n.availability),
            );
            continue;
        }
        usable += 1;
        let (good, facts) = s.check_node(n).await;
        ok &= line(good, &label, &facts);
    }
    if usable == 0 {
        ok &= line(false, "Swarm nodes", "no node may run servers: label one with berth.servers=true");
    }
    ok
}
