//! What the Swarm tests share: the Docker CLI (the local engine, or another
//! by its socket), services and their tasks' containers, clean-up of what a
//! test's berth made, the SSH client, and the second engine in a network
//! namespace (`scripts/swarm-worker`) joined as a worker.

use std::collections::HashMap;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::Value;

use super::{Berth, Browser, Key};

pub(crate) fn docker(args: &[&str]) -> Output {
    Command::new("docker").args(args).stdin(Stdio::null()).output().expect("docker CLI")
}

pub(crate) fn docker_text(args: &[&str]) -> String {
    String::from_utf8_lossy(&docker(args).stdout).trim().to_string()
}

/// The Docker CLI against the engine at `socket` (a worker's).
pub(crate) fn docker_at(socket: &str, args: &[&str]) -> Output {
    Command::new("docker")
        .arg("-H")
        .arg(format!("unix://{socket}"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("docker CLI")
}

pub(crate) fn docker_at_text(socket: &str, args: &[&str]) -> String {
    String::from_utf8_lossy(&docker_at(socket, args).stdout).trim().to_string()
}

/// The services and networks the test's berth made, removed on drop
/// (before the containers and volumes `DockerScope` removes).
pub(crate) struct Services {
    pub users: Vec<String>,
    pub network: String,
}

impl Drop for Services {
    fn drop(&mut self) {
        for u in &self.users {
            for id in
                docker_text(&["service", "ls", "-q", "--filter", &format!("label=berth.user={u}")]).split_whitespace()
            {
                let _ = docker(&["service", "rm", id]);
            }
        }
        // The tasks' containers go with their services, a moment later.
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline
            && self
                .users
                .iter()
                .any(|u| !docker_text(&["ps", "-aq", "--filter", &format!("label=berth.user={u}")]).is_empty())
        {
            std::thread::sleep(Duration::from_millis(300));
        }
        let _ = docker(&["network", "rm", &self.network]);
        std::thread::sleep(Duration::from_millis(500));
        let _ = docker(&["network", "rm", &format!("{}-config", self.network)]);
    }
}

/// The service as the engine describes it.
pub(crate) fn service(name: &str) -> Option<Value> {
    let o = docker(&["service", "inspect", name]);
    if !o.status.success() {
        return None;
    }
    serde_json::from_slice::<Value>(&o.stdout).ok()?.get(0).cloned()
}

/// The running task's container of a service on the local engine.
pub(crate) fn task_container(service: &str) -> String {
    docker_text(&["ps", "-q", "--no-trunc", "--filter", &format!("label=com.docker.swarm.service.name={service}")])
}

pub(crate) fn ssh(b: &Berth, key: &Key, login: &str, cmd: &str) -> Output {
    let port = b.ssh_addr.as_ref().expect("the SSH gateway is on").rsplit(':').next().unwrap().to_string();
    Command::new("timeout")
        .arg("120")
        .arg("ssh")
        .args(["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR"])
        .args(["-o", "IdentityAgent=none", "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes"])
        .args(["-o", "ConnectTimeout=20", "-p", &port, "-i"])
        .arg(&key.private)
        .arg(format!("{login}@127.0.0.1"))
        .arg(cmd)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

pub(crate) async fn server_model(b: &Browser, user: &str) -> Value {
    b.api(Method::GET, &format!("/hub/api/users/{user}")).send().await.unwrap().json().await.unwrap()
}

/// The admin's browser against the restarted berth.
pub(crate) fn admin_after_restart(b: &Berth, admin: &Browser) -> Browser {
    Browser { base: b.url.clone(), ..admin.clone() }
}

/// A second Docker engine in its own network namespace, joined to the
/// local engine's swarm as a worker (`scripts/swarm-worker`); taken down
/// on drop, leaving nothing.
pub(crate) struct Worker {
    pub name: String,
    /// What `up` printed: node_id, hostname, socket, host_addr, ns_addr,
    /// address_pool, …
    pub facts: HashMap<String, String>,
}

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/swarm-worker");

fn key_values(out: &[u8]) -> HashMap<String, String> {
    String::from_utf8_lossy(out)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

impl Worker {
    /// The namespace and its veth pair only: where the host side is (the
    /// address a manager must be advertised on for the worker to join).
    pub(crate) fn net(name: &str) -> HashMap<String, String> {
        let o = Command::new(SCRIPT).args(["net", name]).stdin(Stdio::null()).output().expect("swarm-worker net");
        assert!(o.status.success(), "swarm-worker net: {}", String::from_utf8_lossy(&o.stderr));
        key_values(&o.stdout)
    }

    /// `tls`: a directory as [`make_tls`] leaves it; the engine then also
    /// listens on `tcp://<ns_addr>:2376` (the `tcp` fact) with TLS.
    pub(crate) fn up(name: &str, gpus: &[&str], images: &[&str], tls: Option<&std::path::Path>) -> Worker {
        let mut cmd = Command::new(SCRIPT);
        cmd.args(["up", name]);
        if let Some(dir) = tls {
            cmd.arg("--tls").arg(dir);
        }
        for g in gpus {
            cmd.args(["--gpu", g]);
        }
        for i in images {
            cmd.args(["--image", i]);
        }
        let o = cmd.stdin(Stdio::null()).output().expect("swarm-worker up");
        let w = Worker { name: name.to_string(), facts: key_values(&o.stdout) };
        assert!(o.status.success(), "swarm-worker up: {}", String::from_utf8_lossy(&o.stderr));
        w
    }

    pub(crate) fn fact(&self, key: &str) -> &str {
        self.facts.get(key).map(String::as_str).unwrap_or_else(|| panic!("swarm-worker printed no {key}"))
    }

    pub(crate) fn down(name: &str) {
        let _ = Command::new(SCRIPT).args(["down", name]).stdin(Stdio::null()).output();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        Worker::down(&self.name);
    }
}

/// A CA, a server certificate for `server_ip` (`server-cert.pem`,
/// `server-key.pem`) and a client certificate (`cert.pem`, `key.pem`) in
/// `dir`, Docker's own TLS layout, made with the openssl command.
pub(crate) fn make_tls(dir: &std::path::Path, server_ip: &str) {
    let script = format!(
        "set -e; cd '{}'
openssl req -x509 -newkey rsa:2048 -nodes -keyout ca-key.pem -out ca.pem -days 2 -subj /CN=berth-test-ca
openssl req -newkey rsa:2048 -nodes -keyout server-key.pem -out server.csr -subj /CN=worker
printf 'subjectAltName=IP:{server_ip}\\nextendedKeyUsage=serverAuth\\n' > server.ext
openssl x509 -req -in server.csr -CA ca.pem -CAkey ca-key.pem -CAcreateserial -out server-cert.pem -days 2 -extfile server.ext
openssl req -newkey rsa:2048 -nodes -keyout key.pem -out client.csr -subj /CN=berth
printf 'extendedKeyUsage=clientAuth\\n' > client.ext
openssl x509 -req -in client.csr -CA ca.pem -CAkey ca-key.pem -CAcreateserial -out cert.pem -days 2 -extfile client.ext",
        dir.display()
    );
    let o = Command::new("sh").arg("-c").arg(&script).stdin(Stdio::null()).output().expect("openssl");
    assert!(o.status.success(), "making certificates: {}", String::from_utf8_lossy(&o.stderr));
}
