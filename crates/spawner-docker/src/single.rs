//! Single-tenant template runs (`berth up`, `berth down`, `berth ps`): the
//! engine calls that build a template's image from its rendered build
//! context, run it as one container (SSH and app ports published, GPUs, a
//! named volume on the work directory, the root key in `SSH_PUBLIC_KEY`),
//! watch it, run `nvidia-smi -L` in it, list such containers and remove
//! them with or without their volume.
//!
//! No hub, users or store here: one container per template, named
//! `berth-up-<id>` and labelled [`LABEL_UP`]` = <id>`. The CLI side (flags,
//! key file, progress bar, waiting for SSH and HTTP) lives in the `berth`
//! binary; this module is the only place it reaches the engine.

use std::collections::HashMap;
use std::fmt;

use bollard::exec::{CreateExecOptions, StartExecResults};
use bollard::models::{
    ContainerCreateBody, DeviceRequest, HostConfig, Mount, MountTypeEnum, PortBinding, RestartPolicy,
    RestartPolicyNameEnum,
};
use bollard::query_parameters::{
    CreateContainerOptions, InspectContainerOptions, ListContainersOptions, RemoveContainerOptions,
    RemoveVolumeOptions, StartContainerOptions,
};
use bollard::Docker;
use futures_util::StreamExt;

/// Label on the images and containers `berth up` makes; its value is the template id.
pub const LABEL_UP: &str = "berth.up";

/// The container `berth up <id>` runs.
pub fn container_name(template: &str) -> String {
    format!("berth-up-{template}")
}

/// The volume mounted on the work directory of `berth up <id>`'s container.
pub fn volume_name(template: &str) -> String {
    format!("berth-up-{template}-app")
}

/// What the engine said when a call failed (opaque: the engine client's
/// own type stays inside this crate).
#[derive(Debug)]
pub struct Cause(bollard::errors::Error);

impl Cause {
    /// The HTTP status the engine answered with, if it answered.
    pub fn status_code(&self) -> Option<u16> {
        match &self.0 {
            bollard::errors::Error::DockerResponseServerError { status_code, .. } => Some(*status_code),
            _ => None,
        }
    }

    fn is_not_found(&self) -> bool {
        self.status_code() == Some(404)
    }
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for Cause {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

impl From<bollard::errors::Error> for Cause {
    fn from(e: bollard::errors::Error) -> Self {
        Cause(e)
    }
}

/// Why a single-tenant engine call failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot reach the Docker engine")]
    Connect {
        #[source]
        cause: Cause,
    },
    #[error("the Docker engine does not answer ({cause}); is it running?")]
    NotAnswering { cause: Cause },
    #[error("cannot inspect {container}: {cause}")]
    Inspect { container: String, cause: Cause },
    #[error("cannot pack the build context: {cause}")]
    Context { cause: std::io::Error },
    /// The engine refused the build or its stream broke off.
    #[error("building {image} failed: {cause}")]
    BuildEngine { image: String, cause: Cause },
    /// A build step failed; `message` names the image, the step and its
    /// last output (`BuildFailure::describe`).
    #[error("{message}")]
    BuildStep { image: String, message: String },
    #[error("cannot create {container}: {cause}")]
    Create { container: String, cause: Cause },
    /// Start failed; the created container has been removed again.
    #[error("cannot start {container}: {cause}")]
    Start { container: String, cause: Cause },
    #[error("cannot run {} in {container}: {cause}", .command.join(" "))]
    Exec { container: String, command: Vec<String>, cause: Cause },
    #[error("{} failed in {container} (exit {code}): {output}", .command.join(" "))]
    ExecFailed { container: String, command: Vec<String>, code: i64, output: String },
    #[error("cannot list the containers started with `berth up`: {cause}")]
    List { cause: Cause },
    #[error("cannot list the template images: {cause}")]
    ListImages { cause: Cause },
    #[error("cannot remove {container}: {cause}")]
    RemoveContainer { container: String, cause: Cause },
    #[error("cannot remove the image {image}: {cause}")]
    RemoveImage { image: String, cause: Cause },
    #[error("{image} is not a hub template image (berth-template-*); berth removes only its own")]
    NotTemplateImage { image: String },
    #[error("cannot remove the volume {volume}: {cause}")]
    RemoveVolume { volume: String, cause: Cause },
}

/// An image build: the rendered build context and its arguments.
#[derive(Debug, Clone, Copy)]
pub struct BuildSpec<'a> {
    /// Template id (the value of [`LABEL_UP`] on the image).
    pub template: &'a str,
    /// Tag of the image built.
    pub image: &'a str,
    /// The build context: file name (with a `Dockerfile`) and text; names
    /// ending in `.sh` are packed executable.
    pub files: &'a [(&'a str, String)],
    pub build_args: &'a HashMap<String, String>,
}

/// One `Step n/m : …` line of a build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BuildStep<'a> {
    /// Steps begun (0 when the engine's line does not say) and of how many.
    pub done: usize,
    pub total: usize,
    /// The instruction, e.g. `RUN apt-get update`.
    pub text: &'a str,
}

impl<'a> BuildStep<'a> {
    /// Reads an engine output line; `None` unless it starts a step.
    pub fn parse(line: &'a str) -> Option<BuildStep<'a>> {
        let line = line.trim();
        let rest = line.strip_prefix("Step ")?;
        let (done, total) = rest
            .split_once(' ')
            .and_then(|(f, _)| f.split_once('/'))
            .and_then(|(x, y)| Some((x.parse::<usize>().ok()?, y.parse::<usize>().ok()?)))
            .unwrap_or((0, 1));
        let text = line.split_once(" : ").map_or(line, |(_, r)| r);
        Some(BuildStep { done, total, text })
    }
}

/// A host port published for a container port (TCP).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortMap {
    pub host: u16,
    pub container: u16,
}

/// The container a template runs as.
#[derive(Debug, Clone, Copy)]
pub struct RunSpec<'a> {
    /// Template id: names the container and its volume, and labels it.
    pub template: &'a str,
    pub image: &'a str,
    /// Host address the ports are published on.
    pub address: &'a str,
    pub ssh: PortMap,
    pub app: PortMap,
    /// GPUs requested from the nvidia driver (0: none).
    pub gpus: u32,
    /// `/dev/shm` size in bytes (`None`: the engine's default); see [`parse_size`].
    pub shm_size: Option<i64>,
    /// Where the template's volume is mounted.
    pub workdir: &'a str,
    /// Installed for root through `SSH_PUBLIC_KEY`.
    pub ssh_public_key: Option<&'a str>,
}

/// A container started with `berth up`, as `berth ps` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpContainer {
    pub template: String,
    /// Container name, without Docker's leading `/`.
    pub name: String,
    /// `running`, `exited`, … (empty if the engine does not say).
    pub state: String,
    pub ports: Vec<PortMap>,
}

/// Whether a removal found something to remove.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    Removed,
    NotFound,
}

/// `8gb`, `512m` → bytes; `None` for what it cannot read.
pub fn parse_size(s: &str) -> Option<i64> {
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
    n.checked_mul(mult)
}

/// A tar of the build context.
pub(crate) fn context_tar(files: &[(&str, String)]) -> std::io::Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, text) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(text.len() as u64);
        h.set_mode(if name.ends_with(".sh") { 0o755 } else { 0o644 });
        h.set_cksum();
        b.append_data(&mut h, name, text.as_bytes())?;
    }
    b.into_inner()
}

/// The container's creation request.
fn container_body(r: &RunSpec<'_>) -> ContainerCreateBody {
    let bind =
        |host: u16| Some(vec![PortBinding { host_ip: Some(r.address.to_string()), host_port: Some(host.to_string()) }]);
    let mut ports = HashMap::from([(format!("{}/tcp", r.ssh.container), bind(r.ssh.host))]);
    ports.insert(format!("{}/tcp", r.app.container), bind(r.app.host));
    let device_requests = (r.gpus > 0).then(|| {
        vec![DeviceRequest {
            driver: Some("nvidia".into()),
            count: Some(i64::from(r.gpus)),
            capabilities: Some(vec![vec!["gpu".to_string()]]),
            ..Default::default()
        }]
    });
    let env = r.ssh_public_key.map(|k| format!("SSH_PUBLIC_KEY={k}")).into_iter().collect();
    ContainerCreateBody {
        image: Some(r.image.to_string()),
        env: Some(env),
        labels: Some(HashMap::from([(LABEL_UP.to_string(), r.template.to_string())])),
        exposed_ports: Some(ports.keys().map(|k| (k.clone(), HashMap::new())).collect()),
        host_config: Some(HostConfig {
            port_bindings: Some(ports),
            mounts: Some(vec![Mount {
                source: Some(volume_name(r.template)),
                target: Some(r.workdir.to_string()),
                typ: Some(MountTypeEnum::VOLUME),
                ..Default::default()
            }]),
            device_requests,
            shm_size: r.shm_size,
            restart_policy: Some(RestartPolicy {
                name: Some(RestartPolicyNameEnum::UNLESS_STOPPED),
                maximum_retry_count: None,
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The local Docker engine, for single-tenant runs.
#[derive(Clone)]
pub struct Engine {
    docker: Docker,
}

impl Engine {
    pub(crate) fn docker(&self) -> &Docker {
        &self.docker
    }

    /// Connects to the local engine (DOCKER_HOST or the default socket) and checks it answers.
    pub async fn connect() -> Result<Engine, Error> {
        let docker = Docker::connect_with_local_defaults().map_err(|e| Error::Connect { cause: e.into() })?;
        docker.ping().await.map_err(|e| Error::NotAnswering { cause: e.into() })?;
        Ok(Engine { docker })
    }

    /// Whether the template's container exists (running or not).
    pub async fn exists(&self, template: &str) -> Result<bool, Error> {
        let container = container_name(template);
        match self.docker.inspect_container(&container, None::<InspectContainerOptions>).await.map_err(Cause::from) {
            Ok(_) => Ok(true),
            Err(cause) if cause.is_not_found() => Ok(false),
            Err(cause) => Err(Error::Inspect { container, cause }),
        }
    }

    /// Whether the template's container runs (a missing one is an error).
    pub async fn running(&self, template: &str) -> Result<bool, Error> {
        let container = container_name(template);
        let info = self
            .docker
            .inspect_container(&container, None::<InspectContainerOptions>)
            .await
            .map_err(|e| Error::Inspect { container, cause: e.into() })?;
        Ok(info.state.and_then(|s| s.running) == Some(true))
    }

    /// Builds the image (intermediate containers removed), calling `on_step`
    /// for each step the engine begins.
    pub async fn build(&self, b: &BuildSpec<'_>, on_step: impl FnMut(BuildStep<'_>)) -> Result<(), Error> {
        let image = b.image.to_string();
        let labels = HashMap::from([(LABEL_UP.to_string(), b.template.to_string())]);
        crate::build::build_image(&self.docker, &image, b.files, b.build_args.clone(), labels, on_step).await.map_err(
            |f| match f {
                crate::build::BuildFailure::Engine(e) => Error::BuildEngine { image, cause: e.into() },
                crate::build::BuildFailure::Context(cause) => Error::Context { cause },
                f @ crate::build::BuildFailure::Step { .. } => Error::BuildStep { message: f.describe(&image), image },
            },
        )
    }

    /// Creates and starts the container; returns its id. A container that
    /// does not start is removed again.
    pub async fn run(&self, r: &RunSpec<'_>) -> Result<String, Error> {
        let container = container_name(r.template);
        let opts = CreateContainerOptions { name: Some(container.clone()), ..Default::default() };
        let c = match self.docker.create_container(Some(opts), container_body(r)).await {
            Ok(c) => c,
            Err(e) => return Err(Error::Create { container, cause: e.into() }),
        };
        if let Err(e) = self.docker.start_container(&c.id, None::<StartContainerOptions>).await {
            let force = RemoveContainerOptions { force: true, ..Default::default() };
            let _ = self.docker.remove_container(&c.id, Some(force)).await;
            return Err(Error::Start { container, cause: e.into() });
        }
        Ok(c.id)
    }

    /// `nvidia-smi -L` in the template's container: its output, or an error
    /// with the output when it fails.
    pub async fn list_gpus(&self, template: &str) -> Result<String, Error> {
        self.exec_output(template, &["nvidia-smi", "-L"]).await
    }

    async fn exec_output(&self, template: &str, cmd: &[&str]) -> Result<String, Error> {
        let container = container_name(template);
        let command = || cmd.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let fail = |e: bollard::errors::Error| Error::Exec {
            container: container.clone(),
            command: command(),
            cause: e.into(),
        };
        let opts = CreateExecOptions {
            cmd: Some(cmd.to_vec()),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            ..Default::default()
        };
        let e = self.docker.create_exec(&container, opts).await.map_err(fail)?;
        let mut output = String::new();
        if let StartExecResults::Attached { output: mut stream, .. } =
            self.docker.start_exec(&e.id, None).await.map_err(fail)?
        {
            while let Some(Ok(o)) = stream.next().await {
                output.push_str(&o.to_string());
            }
        }
        let code = self.docker.inspect_exec(&e.id).await.map_err(fail)?.exit_code.unwrap_or(-1);
        if code != 0 {
            return Err(Error::ExecFailed { container, command: command(), code, output });
        }
        Ok(output)
    }

    /// The containers started with `berth up`, running or not.
    pub async fn list(&self) -> Result<Vec<UpContainer>, Error> {
        let filters = HashMap::from([("label".to_string(), vec![LABEL_UP.to_string()])]);
        let opts = ListContainersOptions { all: true, filters: Some(filters), ..Default::default() };
        let list = self.docker.list_containers(Some(opts)).await.map_err(|e| Error::List { cause: e.into() })?;
        Ok(list
            .into_iter()
            .map(|c| UpContainer {
                template: c.labels.as_ref().and_then(|l| l.get(LABEL_UP)).cloned().unwrap_or_default(),
                name: c
                    .names
                    .and_then(|n| n.first().cloned())
                    .map(|n| n.trim_start_matches('/').to_string())
                    .unwrap_or_default(),
                state: c.state.map(|s| format!("{s:?}").to_lowercase()).unwrap_or_default(),
                ports: c
                    .ports
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|p| p.public_port.map(|host| PortMap { host, container: p.private_port }))
                    .collect(),
            })
            .collect())
    }

    /// Stops (kills) and removes the template's container.
    pub async fn remove(&self, template: &str) -> Result<Removal, Error> {
        let container = container_name(template);
        let force = RemoveContainerOptions { force: true, ..Default::default() };
        match self.docker.remove_container(&container, Some(force)).await.map_err(Cause::from) {
            Ok(()) => Ok(Removal::Removed),
            Err(cause) if cause.is_not_found() => Ok(Removal::NotFound),
            Err(cause) => Err(Error::RemoveContainer { container, cause }),
        }
    }

    /// Removes the template's volume (its work directory's data).
    pub async fn remove_volume(&self, template: &str) -> Result<Removal, Error> {
        let volume = volume_name(template);
        match self.docker.remove_volume(&volume, None::<RemoveVolumeOptions>).await.map_err(Cause::from) {
            Ok(()) => Ok(Removal::Removed),
            Err(cause) if cause.is_not_found() => Ok(Removal::NotFound),
            Err(cause) => Err(Error::RemoveVolume { volume, cause }),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("8gb"), Some(8 << 30));
        assert_eq!(parse_size(" 512M "), Some(512 << 20));
        assert_eq!(parse_size("64k"), Some(64 << 10));
        assert_eq!(parse_size("100"), Some(100));
        assert_eq!(parse_size("lots"), None);
        assert_eq!(parse_size("3tb"), None);
    }

    #[test]
    fn steps() {
        assert_eq!(
            BuildStep::parse("Step 3/9 : RUN apt-get update\n"),
            Some(BuildStep { done: 3, total: 9, text: "RUN apt-get update" })
        );
        assert_eq!(BuildStep::parse("Step x : FROM a"), Some(BuildStep { done: 0, total: 1, text: "FROM a" }));
        assert_eq!(BuildStep::parse(" ---> Running in 1234"), None);
    }

    #[test]
    fn context_is_a_tar_with_executable_scripts() {
        let files = [("Dockerfile", "FROM scratch\n".to_string()), ("start.sh", "#!/bin/sh\n".to_string())];
        let tar = context_tar(&files).unwrap();
        let mut a = tar::Archive::new(&tar[..]);
        let modes: Vec<(String, u32)> = a
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (e.path().unwrap().display().to_string(), e.header().mode().unwrap())
            })
            .collect();
        assert_eq!(modes, vec![("Dockerfile".to_string(), 0o644), ("start.sh".to_string(), 0o755)]);
    }

    #[test]
    fn container_carries_ports_gpus_volume_and_key() {
        let r = RunSpec {
            template: "pytorch",
            image: "berth-template-pytorch:latest",
            address: "0.0.0.0",
            ssh: PortMap { host: 4444, container: 22 },
            app: PortMap { host: 27015, container: 27015 },
            gpus: 2,
            shm_size: parse_size("8gb"),
            workdir: "/app",
            ssh_public_key: Some("ssh-ed25519 AAAA me"),
        };
        let b = container_body(&r);
        assert_eq!(b.env, Some(vec!["SSH_PUBLIC_KEY=ssh-ed25519 AAAA me".to_string()]));
        assert_eq!(b.labels.unwrap().get(LABEL_UP).map(String::as_str), Some("pytorch"));
        let h = b.host_config.unwrap();
        let ports = h.port_bindings.unwrap();
        let host = |p: &str| ports[p].as_ref().unwrap()[0].host_port.clone().unwrap();
        assert_eq!((host("22/tcp"), host("27015/tcp")), ("4444".to_string(), "27015".to_string()));
        let d = &h.device_requests.unwrap()[0];
        assert_eq!((d.driver.as_deref(), d.count), (Some("nvidia"), Some(2)));
        let m = &h.mounts.unwrap()[0];
        assert_eq!((m.source.as_deref(), m.target.as_deref()), (Some("berth-up-pytorch-app"), Some("/app")));
        assert_eq!(h.shm_size, Some(8 << 30));
        let none = container_body(&RunSpec { gpus: 0, ssh_public_key: None, ..r });
        assert!(none.host_config.unwrap().device_requests.is_none());
        assert_eq!(none.env, Some(vec![]));
    }

    #[test]
    fn messages() {
        let e = Error::ExecFailed {
            container: "berth-up-x".into(),
            command: vec!["nvidia-smi".into(), "-L".into()],
            code: 9,
            output: "no devices".into(),
        };
        assert_eq!(e.to_string(), "nvidia-smi -L failed in berth-up-x (exit 9): no devices");
        let f = crate::build::BuildFailure::Step {
            step: "step 2/3 (RUN make)".into(),
            message: "returned a non-zero code: 2".into(),
            tail: vec!["make: *** no rule".into()],
        };
        let e = Error::BuildStep { message: f.describe("i"), image: "i".into() };
        // Said once: the image, the step, why, and what it printed last.
        assert_eq!(
            e.to_string(),
            "building i failed at step 2/3 (RUN make): returned a non-zero code: 2; its last output: make: *** no rule"
        );
    }
}
