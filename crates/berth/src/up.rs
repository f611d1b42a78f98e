//! Single-tenant mode: `berth up <id>` builds a template's image through the
//! Docker API, runs it with the two port mappings (SSH and the app), GPUs
//! and a volume on `/app`, installs the key, and waits until it answers.
//! `berth down <id>`, `berth ps`.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use berth_catalog::{render, Template, APP_PORT, SSH_PORT, WORKDIR};
use bollard::models::{
    ContainerCreateBody, DeviceRequest, HostConfig, Mount, MountTypeEnum, PortBinding, RestartPolicy,
    RestartPolicyNameEnum,
};
use bollard::query_parameters::{
    BuildImageOptions, CreateContainerOptions, ListContainersOptions, RemoveContainerOptions, RemoveVolumeOptions,
    StartContainerOptions,
};
use bollard::Docker;
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LABEL_UP: &str = "berth.up";

#[derive(clap::Args)]
pub struct UpArgs {
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

fn container_name(id: &str) -> String {
    format!("berth-up-{id}")
}

fn volume_name(id: &str) -> String {
    format!("berth-up-{id}-app")
}

async fn docker() -> anyhow::Result<Docker> {
    let d = Docker::connect_with_local_defaults().context("cannot reach the Docker engine")?;
    d.ping().await.map_err(|e| anyhow!("the Docker engine does not answer ({e}); is it running?"))?;
    Ok(d)
}

/// A tar of the rendered build context.
fn context_tar(t: &Template) -> anyhow::Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, text) in render::render(t) {
        let mut h = tar::Header::new_gnu();
        h.set_size(text.len() as u64);
        h.set_mode(if name.ends_with(".sh") { 0o755 } else { 0o644 });
        h.set_cksum();
        b.append_data(&mut h, name, text.as_bytes())?;
    }
    Ok(b.into_inner()?)
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

pub async fn up(a: UpArgs) -> anyhow::Result<()> {
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
    let d = docker().await?;
    let name = container_name(&t.id);
    if d.inspect_container(&name, None::<bollard::query_parameters::InspectContainerOptions>).await.is_ok() {
        bail!("{name} exists already; `berth down {}` first", t.id);
    }
    port_free(&a.address, a.ssh_port)?;
    if t.app.is_some() {
        port_free(&a.address, a.http_port)?;
    }

    // Build, showing the engine's steps as a progress line.
    let image = t.image();
    let buildargs: HashMap<String, String> =
        t.build.args.iter().filter_map(|k| std::env::var(k).ok().map(|v| (k.clone(), v))).collect();
    if let Some(missing) = t.build.args.iter().find(|k| !buildargs.contains_key(*k)) {
        bail!("{} needs the build argument {missing}: set it in the environment", t.id);
    }
    let opts = BuildImageOptions {
        dockerfile: "Dockerfile".into(),
        t: Some(image.clone()),
        rm: true,
        buildargs: Some(buildargs),
        labels: Some(HashMap::from([(LABEL_UP.to_string(), t.id.clone())])),
        ..Default::default()
    };
    let tar = context_tar(t)?;
    let mut stream = d.build_image(opts, None, Some(bollard::body_full(tar.into())));
    let started = Instant::now();
    let mut stderr = std::io::stderr();
    while let Some(item) = stream.next().await {
        let info = item.map_err(|e| anyhow!("building {image} failed: {e}"))?;
        if let Some(e) = info.error {
            bail!("building {image} failed: {e}");
        }
        if let Some(line) = info.stream.as_deref().map(str::trim).filter(|l| l.starts_with("Step ")) {
            // `Step 3/9 : RUN …` → a bar of the steps done.
            let (done, total) = line
                .trim_start_matches("Step ")
                .split_once(' ')
                .and_then(|(f, _)| f.split_once('/'))
                .and_then(|(x, y)| Some((x.parse::<usize>().ok()?, y.parse::<usize>().ok()?)))
                .unwrap_or((0, 1));
            let width = 30;
            let filled = (done * width / total.max(1)).min(width);
            let _ = write!(
                stderr,
                "\r[{}{}] {done}/{total} {:<60.60}",
                "#".repeat(filled),
                ".".repeat(width - filled),
                line.split_once(" : ").map_or(line, |(_, r)| r)
            );
            let _ = stderr.flush();
        }
    }
    let _ = writeln!(stderr, "\nbuilt {image} in {:.0} s", started.elapsed().as_secs_f64());

    // Run.
    let bind =
        |host: u16| Some(vec![PortBinding { host_ip: Some(a.address.clone()), host_port: Some(host.to_string()) }]);
    let mut ports = HashMap::from([(format!("{SSH_PORT}/tcp"), bind(a.ssh_port))]);
    let app_port = t.app.as_ref().map_or(APP_PORT, |x| *x.port.get_ref());
    ports.insert(format!("{app_port}/tcp"), bind(a.http_port));
    let device_requests = (gpus > 0).then(|| {
        vec![DeviceRequest {
            driver: Some("nvidia".into()),
            count: Some(gpus as i64),
            capabilities: Some(vec![vec!["gpu".to_string()]]),
            ..Default::default()
        }]
    });
    let shm = parse_size(&t.resources.shm_size);
    let mut env = Vec::new();
    if let Some(k) = &key {
        env.push(format!("SSH_PUBLIC_KEY={k}"));
    }
    let body = ContainerCreateBody {
        image: Some(image.clone()),
        env: Some(env),
        labels: Some(HashMap::from([(LABEL_UP.to_string(), t.id.clone())])),
        exposed_ports: Some(ports.keys().map(|k| (k.clone(), HashMap::new())).collect()),
        host_config: Some(HostConfig {
            port_bindings: Some(ports),
            mounts: Some(vec![Mount {
                source: Some(volume_name(&t.id)),
                target: Some(WORKDIR.into()),
                typ: Some(MountTypeEnum::VOLUME),
                ..Default::default()
            }]),
            device_requests,
            shm_size: shm,
            restart_policy: Some(RestartPolicy {
                name: Some(RestartPolicyNameEnum::UNLESS_STOPPED),
                maximum_retry_count: None,
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let c = d
        .create_container(Some(CreateContainerOptions { name: Some(name.clone()), ..Default::default() }), body)
        .await
        .map_err(|e| anyhow!("cannot create {name}: {e}"))?;
    if let Err(e) = d.start_container(&c.id, None::<StartContainerOptions>).await {
        let _ = d.remove_container(&c.id, Some(RemoveContainerOptions { force: true, ..Default::default() })).await;
        bail!("cannot start {name}: {e}");
    }

    // Wait for SSH, the app and the GPUs.
    let deadline = Instant::now() + Duration::from_secs(a.timeout);
    eprintln!("waiting for SSH …");
    while !ssh_answers(a.ssh_port).await {
        running_or_bail(&d, &name).await?;
        if Instant::now() > deadline {
            bail!("SSH did not answer on port {} in time; see `docker logs {name}`", a.ssh_port);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    if t.app.is_some() {
        eprintln!("waiting for the app …");
        while !http_answers(a.http_port).await {
            running_or_bail(&d, &name).await?;
            if Instant::now() > deadline {
                bail!("the app did not answer on port {} in time; its log is {WORKDIR}/app.log", a.http_port);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    if gpus > 0 {
        eprintln!("waiting for nvidia-smi …");
        let out = exec_output(&d, &name, &["nvidia-smi", "-L"]).await?;
        eprint!("{out}");
    }
    println!("{} is up ({name}).", t.name);
    println!("  ssh:  ssh -p {} root@<this host>", a.ssh_port);
    if t.app.is_some() {
        println!("  app:  http://<this host>:{}/", a.http_port);
    }
    println!("  stop: berth down {}", t.id);
    Ok(())
}

async fn running_or_bail(d: &Docker, name: &str) -> anyhow::Result<()> {
    let info = d.inspect_container(name, None::<bollard::query_parameters::InspectContainerOptions>).await?;
    if info.state.and_then(|s| s.running) != Some(true) {
        bail!("{name} stopped while starting; see `docker logs {name}`");
    }
    Ok(())
}

async fn exec_output(d: &Docker, name: &str, cmd: &[&str]) -> anyhow::Result<String> {
    use bollard::exec::{CreateExecOptions, StartExecResults};
    let e = d
        .create_exec(
            name,
            CreateExecOptions {
                cmd: Some(cmd.to_vec()),
                attach_stdout: Some(true),
                attach_stderr: Some(true),
                ..Default::default()
            },
        )
        .await?;
    let mut text = String::new();
    if let StartExecResults::Attached { mut output, .. } = d.start_exec(&e.id, None).await? {
        while let Some(Ok(o)) = output.next().await {
            text.push_str(&o.to_string());
        }
    }
    let code = d.inspect_exec(&e.id).await?.exit_code.unwrap_or(-1);
    if code != 0 {
        bail!("{} failed in {name} (exit {code}): {text}", cmd.join(" "));
    }
    Ok(text)
}

/// `8gb`, `512m` → bytes.
fn parse_size(s: &str) -> Option<i64> {
    let s = s.trim().to_ascii_lowercase();
    let digits: String = s.chars().take_while(|c| c.is_ascii_digit()).collect();
    let n: i64 = digits.parse().ok()?;
    let unit = s[digits.len()..].trim_end_matches('b');
    let mult = match unit {
        "" => 1,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        _ => return None,
    };
    Some(n * mult)
}

pub async fn down(id: &str, volumes: bool) -> anyhow::Result<()> {
    let d = docker().await?;
    let name = container_name(id);
    match d.remove_container(&name, Some(RemoveContainerOptions { force: true, ..Default::default() })).await {
        Ok(()) => println!("removed {name}"),
        Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => {
            println!("{name} is not running")
        }
        Err(e) => bail!("cannot remove {name}: {e}"),
    }
    if volumes {
        let v = volume_name(id);
        match d.remove_volume(&v, None::<RemoveVolumeOptions>).await {
            Ok(()) => println!("removed the volume {v}"),
            Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => {}
            Err(e) => bail!("cannot remove the volume {v}: {e}"),
        }
    } else {
        println!("kept the volume {} (add --volumes to remove it)", volume_name(id));
    }
    Ok(())
}

pub async fn ps() -> anyhow::Result<()> {
    let d = docker().await?;
    let filters = HashMap::from([("label".to_string(), vec![LABEL_UP.to_string()])]);
    let list = d
        .list_containers(Some(ListContainersOptions { all: true, filters: Some(filters), ..Default::default() }))
        .await?;
    if list.is_empty() {
        println!("nothing started with `berth up`");
        return Ok(());
    }
    println!("{:<22} {:<24} {:<12} ports", "template", "container", "state");
    for c in list {
        let id = c.labels.as_ref().and_then(|l| l.get(LABEL_UP)).cloned().unwrap_or_default();
        let name = c.names.and_then(|n| n.first().cloned()).unwrap_or_default();
        let ports: Vec<String> = c
            .ports
            .unwrap_or_default()
            .iter()
            .filter_map(|p| p.public_port.map(|h| format!("{h}->{}", p.private_port)))
            .collect();
        let state = c.state.map(|s| format!("{s:?}").to_lowercase()).unwrap_or_default();
        println!("{id:<22} {:<24} {state:<12} {}", name.trim_start_matches('/'), ports.join(" "));
    }
    Ok(())
}
