//! Single-tenant mode: `berth up <id>` builds a template's image through the
//! Docker API, runs it with the two port mappings (SSH and the app), GPUs
//! and a volume on `/app`, installs the key, and waits until it answers.
//! `berth down <id>`, `berth ps`. The engine calls are
//! `berth_spawner_docker::single`'s; this is the command line around them.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use berth_catalog::{render, APP_PORT, SSH_PORT, WORKDIR};
use berth_spawner_docker::single::{
    self, container_name, volume_name, BuildSpec, BuildStep, Engine, PortMap, Removal, RunSpec,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(clap::Args)]
pub(crate) struct UpArgs {
    /// Template id.
    pub id: String,
    /// Public key to install for root (authorized_keys).
    #[arg(long)]
    pub ssh_key: Option<PathBuf>,
    /// GPUs to pass through (default: the template's default).
    #[arg(long)]
    pub gpus: Option<u32>,
    /// A catalog directory instead of the one built into berth.
    #[arg(long)]
    pub catalog: Option<PathBuf>,
    /// Host port for SSH.
    #[arg(long, default_value_t = render::HOST_SSH_PORT)]
    pub ssh_port: u16,
    /// Host port for the app.
    #[arg(long, default_value_t = APP_PORT)]
    pub http_port: u16,
    /// Address the ports are published on.
    #[arg(long, default_value = "0.0.0.0")]
    pub address: String,
    /// How long to wait for SSH and the app, in seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
}

fn port_free(address: &str, port: u16) -> anyhow::Result<()> {
    std::net::TcpListener::bind((address, port)).map(drop).map_err(|e| {
        anyhow!("port {port} on {address} is in use or not available ({e}); choose another with --ssh-port/--http-port")
    })
}

/// Whether `port` answers `request` (possibly nothing) with bytes starting with `expect`.
async fn answers(port: u16, request: &[u8], expect: &[u8]) -> bool {
    let connect = tokio::net::TcpStream::connect(("127.0.0.1", port));
    let Ok(Ok(mut s)) = tokio::time::timeout(Duration::from_secs(2), connect).await else {
        return false;
    };
    if s.write_all(request).await.is_err() {
        return false;
    }
    let mut buf = vec![0u8; expect.len()];
    matches!(tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf)).await, Ok(Ok(_))) && buf == expect
}

/// Something on `port` speaks SSH.
async fn ssh_answers(port: u16) -> bool {
    answers(port, b"", b"SSH-").await
}

/// `port` answers HTTP (any status).
async fn http_answers(port: u16) -> bool {
    answers(port, b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n", b"HTTP/").await
}

/// Draws `[####......] 3/9 RUN …` over the previous one.
fn draw_step(stderr: &mut std::io::Stderr, step: BuildStep<'_>) {
    let BuildStep { done, total, text } = step;
    let width = 30;
    let filled = (done * width / total.max(1)).min(width);
    let _ = write!(stderr, "\r[{}{}] {done}/{total} {text:<60.60}", "#".repeat(filled), ".".repeat(width - filled));
    let _ = stderr.flush();
}

pub(crate) async fn up(a: UpArgs) -> anyhow::Result<()> {
    let catalog = crate::templates::open(a.catalog.as_deref())?;
    let loaded = catalog.get(&a.id).ok_or_else(|| crate::templates::unknown(&catalog, &a.id))?;
    let problems = berth_catalog::check::check_spec(loaded);
    if !problems.is_empty() {
        bail!("{}", problems.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("\n"));
    }
    let t = &loaded.template;
    let key = match &a.ssh_key {
        Some(p) => {
            let k = std::fs::read_to_string(p).with_context(|| format!("cannot read the key {}", p.display()))?;
            let k = k.trim().to_string();
            if k.contains("PRIVATE KEY") {
                bail!("{} is a private key; pass the public one (.pub)", p.display());
            }
            if !k.starts_with("ssh-") && !k.starts_with("ecdsa-") && !k.starts_with("sk-") {
                bail!("{} is not an OpenSSH public key", p.display());
            }
            Some(k)
        }
        None => None,
    };
    let gpus = a.gpus.unwrap_or(t.gpus.default);
    if gpus > *t.gpus.max.get_ref() || gpus < t.gpus.min {
        bail!("{} takes between {} and {} GPUs, not {gpus}", t.id, t.gpus.min, t.gpus.max.get_ref());
    }
    let engine = Engine::connect().await?;
    let name = container_name(&t.id);
    if engine.exists(&t.id).await? {
        bail!("{name} exists already; `berth down {}` first", t.id);
    }
    port_free(&a.address, a.ssh_port)?;
    if t.app.is_some() {
        port_free(&a.address, a.http_port)?;
    }

    // Build, showing the engine's steps as a progress line.
    let image = t.image();
    let build_args: HashMap<String, String> =
        t.build.args.iter().filter_map(|k| std::env::var(k).ok().map(|v| (k.clone(), v))).collect();
    if let Some(missing) = t.build.args.iter().find(|k| !build_args.contains_key(*k)) {
        bail!("{} needs the build argument {missing}: set it in the environment", t.id);
    }
    let files = render::render(t);
    let build = BuildSpec { template: &t.id, image: &image, files: &files, build_args: &build_args };
    let started = Instant::now();
    let mut stderr = std::io::stderr();
    engine.build(&build, |step| draw_step(&mut stderr, step)).await?;
    let _ = writeln!(stderr, "\nbuilt {image} in {:.0} s", started.elapsed().as_secs_f64());

    // Run.
    let app_port = t.app.as_ref().map_or(APP_PORT, |x| *x.port.get_ref());
    engine
        .run(&RunSpec {
            template: &t.id,
            image: &image,
            address: &a.address,
            ssh: PortMap { host: a.ssh_port, container: SSH_PORT },
            app: PortMap { host: a.http_port, container: app_port },
            gpus,
            shm_size: single::parse_size(&t.resources.shm_size),
            workdir: WORKDIR,
            ssh_public_key: key.as_deref(),
        })
        .await?;

    // Wait for SSH, the app and the GPUs.
    let deadline = Instant::now() + Duration::from_secs(a.timeout);
    eprintln!("waiting for SSH …");
    while !ssh_answers(a.ssh_port).await {
        running_or_bail(&engine, &t.id).await?;
        if Instant::now() > deadline {
            bail!("SSH did not answer on port {} in time; see `docker logs {name}`", a.ssh_port);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    if t.app.is_some() {
        eprintln!("waiting for the app …");
        while !http_answers(a.http_port).await {
            running_or_bail(&engine, &t.id).await?;
            if Instant::now() > deadline {
                bail!("the app did not answer on port {} in time; its log is {WORKDIR}/app.log", a.http_port);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    if gpus > 0 {
        eprintln!("waiting for nvidia-smi …");
        let out = engine.list_gpus(&t.id).await?;
        eprint!("{out}");
    }
    out!("{} is up ({name}).", t.name);
    out!("  ssh:  ssh -p {} root@<this host>", a.ssh_port);
    if t.app.is_some() {
        out!("  app:  http://<this host>:{}/", a.http_port);
    }
    out!("  stop: berth down {}", t.id);
    Ok(())
}

async fn running_or_bail(engine: &Engine, id: &str) -> anyhow::Result<()> {
    if !engine.running(id).await? {
        let name = container_name(id);
        bail!("{name} stopped while starting; see `docker logs {name}`");
    }
    Ok(())
}

pub(crate) async fn down(id: &str, volumes: bool) -> anyhow::Result<()> {
    let engine = Engine::connect().await?;
    let name = container_name(id);
    match engine.remove(id).await? {
        Removal::Removed => out!("removed {name}"),
        Removal::NotFound => out!("{name} is not running"),
    }
    let v = volume_name(id);
    if volumes {
        if engine.remove_volume(id).await? == Removal::Removed {
            out!("removed the volume {v}");
        }
    } else {
        out!("kept the volume {v} (add --volumes to remove it)");
    }
    Ok(())
}

pub(crate) async fn ps() -> anyhow::Result<()> {
    let list = Engine::connect().await?.list().await?;
    if list.is_empty() {
        out!("nothing started with `berth up`");
        return Ok(());
    }
    out!("{:<22} {:<24} {:<12} ports", "template", "container", "state");
    for c in list {
        let ports: Vec<String> = c.ports.iter().map(|p| format!("{}->{}", p.host, p.container)).collect();
        out!("{:<22} {:<24} {:<12} {}", c.template, c.name, c.state, ports.join(" "));
    }
    Ok(())
}
