//! The parts every template shares, written once: key-only sshd on 22, the
//! start script (sshd, then the app on 27015, then stay alive), `/app` as
//! work directory, the two port mappings and GPU pass-through. Rendered into
//! each template's `Dockerfile`, `docker-compose.yml`, `start.sh` and
//! `sshd_config`, which are committed (a test fails when they drift).

use std::path::Path;

use crate::{SshdSource, StartMode, Template, APP_PORT, SSH_PORT};

/// The first line of every rendered file.
pub const HEADER: &str = "Rendered by `berth templates render` from template.toml; edit that, not this.";

/// Host port SSH is published on in single-tenant mode.
pub const HOST_SSH_PORT: u16 = 4444;

/// `(file name, contents)` for one template.
pub fn render(t: &Template) -> Vec<(&'static str, String)> {
    vec![
        ("Dockerfile", dockerfile(t)),
        ("docker-compose.yml", compose(t)),
        ("start.sh", start_script(t)),
        ("sshd_config", sshd_config(t)),
    ]
}

fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn dockerfile(t: &Template) -> String {
    let mut f = format!("# {HEADER}\n# {}: {}\nFROM {}\nUSER root\n", t.id, t.name, t.base_image);
    for a in &t.build.args {
        f.push_str(&format!("ARG {a}\n"));
    }
    f.push_str("ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1\n");
    for (k, v) in &t.env {
        f.push_str(&format!("ENV {k}={}\n", serde_json::Value::String(v.clone())));
    }
    let mut apt: Vec<String> = Vec::new();
    if t.build.sshd == SshdSource::Apt {
        apt.push("openssh-server".into());
    }
    apt.extend(t.packages.apt.iter().cloned());
    if !apt.is_empty() {
        f.push_str(&format!(
            "RUN apt-get update && apt-get install -y --no-install-recommends {} && rm -rf /var/lib/apt/lists/*\n",
            apt.join(" ")
        ));
    }
    if !t.packages.pip.is_empty() {
        let mut idx = String::new();
        if !t.packages.pip_index_url.is_empty() {
            idx.push_str(&format!(" --index-url {}", t.packages.pip_index_url));
        }
        if !t.packages.pip_extra_index_url.is_empty() {
            idx.push_str(&format!(" --extra-index-url {}", t.packages.pip_extra_index_url));
        }
        let pins: Vec<String> = t.packages.pip.iter().map(|p| sh_quote(p)).collect();
        f.push_str(&format!("RUN pip install{idx} {}\n", pins.join(" ")));
    }
    for step in &t.build.setup {
        f.push_str(&format!("RUN {step}\n"));
    }
    f.push_str("COPY sshd_config /etc/berth/sshd_config\n");
    f.push_str("COPY start.sh /usr/local/bin/berth-start\n");
    f.push_str("RUN chmod 0755 /usr/local/bin/berth-start && mkdir -p /run/sshd /root/.ssh && chmod 0700 /root/.ssh\n");
    f.push_str(&format!("WORKDIR {}\n", t.build.workdir.get_ref()));
    let expose: Vec<String> = t.build.expose.get_ref().iter().map(|p| p.to_string()).collect();
    f.push_str(&format!("EXPOSE {}\n", expose.join(" ")));
    f.push_str("CMD [\"/usr/local/bin/berth-start\"]\n");
    f
}

fn compose(t: &Template) -> String {
    let app_port = t.app.as_ref().map_or(APP_PORT, |a| *a.port.get_ref());
    let gpus = if *t.gpus.max.get_ref() > 0 {
        format!(
            "    deploy:\n      resources:\n        reservations:\n          devices:\n            - driver: nvidia\n              count: {}\n              capabilities: [gpu]\n",
            t.gpus.default.max(1)
        )
    } else {
        String::new()
    };
    let shm = if t.resources.shm_size.is_empty() {
        String::new()
    } else {
        format!("    shm_size: \"{}\"\n", t.resources.shm_size)
    };
    let build = if t.build.args.is_empty() {
        "    build: .\n".to_string()
    } else {
        let args: String = t.build.args.iter().map(|a| format!("        {a}: ${{{a}:?set {a}}}\n")).collect();
        format!("    build:\n      context: .\n      args:\n{args}")
    };
    format!(
        "# {HEADER}\nservices:\n  {id}:\n{build}    image: {image}\n    ports:\n      - \"{HOST_SSH_PORT}:{SSH_PORT}\"\n      - \"{APP_PORT}:{app_port}\"\n    environment:\n      - SSH_PUBLIC_KEY=${{SSH_PUBLIC_KEY:-}}\n    volumes:\n      - {id}-app:{workdir}\n{shm}{gpus}    restart: unless-stopped\nvolumes:\n  {id}-app:\n",
        id = t.id,
        image = t.image(),
        workdir = t.build.workdir.get_ref(),
    )
}

fn start_script(t: &Template) -> String {
    let workdir = t.build.workdir.get_ref();
    let mut s = format!(
        "#!/bin/sh\n# {HEADER}\n# Starts sshd (keys only), then the app on {APP_PORT}, then stays alive.\nset -e\n\
mkdir -p /root/.ssh /run/sshd {workdir}\nchmod 0700 /root/.ssh\n\
if [ -n \"${{SSH_PUBLIC_KEY:-}}\" ]; then\n    grep -qxF \"$SSH_PUBLIC_KEY\" /root/.ssh/authorized_keys 2>/dev/null || printf '%s\\n' \"$SSH_PUBLIC_KEY\" >> /root/.ssh/authorized_keys\n    chmod 0600 /root/.ssh/authorized_keys\nfi\n\
ssh-keygen -A >/dev/null 2>&1 || true\n/usr/sbin/sshd -f /etc/berth/sshd_config\ncd {workdir}\n"
    );
    let command = t.app.as_ref().map(|a| {
        let port = a.port.get_ref().to_string();
        a.command.replace("{port}", &port).replace("{base_url}", "/")
    });
    match (t.start_mode, command) {
        (StartMode::App, Some(c)) => {
            s.push_str(&format!("sh -c {} > {workdir}/app.log 2>&1 &\n", sh_quote(&c)));
            s.push_str("exec sleep infinity\n");
        }
        (StartMode::Script, Some(c)) => s.push_str(&format!("exec sh -c {}\n", sh_quote(&c))),
        _ => s.push_str("exec sleep infinity\n"),
    }
    s
}

fn sshd_config(t: &Template) -> String {
    let yes_no = |b: bool| if b { "yes" } else { "no" };
    format!(
        "# {HEADER}\nPort {SSH_PORT}\nPasswordAuthentication {pw}\nKbdInteractiveAuthentication no\nPubkeyAuthentication {pk}\n\
PermitRootLogin prohibit-password\nAuthorizedKeysFile .ssh/authorized_keys\nUsePAM no\nX11Forwarding no\n\
Subsystem sftp internal-sftp\n",
        pw = yes_no(*t.ssh.password_authentication.get_ref()),
        pk = yes_no(*t.ssh.pubkey_authentication.get_ref()),
    )
}

/// Writes every template's rendered files into `dir/<id>/`.
pub fn write_all(catalog: &crate::Catalog, dir: &Path) -> std::io::Result<Vec<std::path::PathBuf>> {
    let mut written = Vec::new();
    for l in &catalog.templates {
        let d = dir.join(&l.template.id);
        std::fs::create_dir_all(&d)?;
        for (name, text) in render(&l.template) {
            let p = d.join(name);
            if std::fs::read_to_string(&p).ok().as_deref() != Some(text.as_str()) {
                std::fs::write(&p, text)?;
                written.push(p);
            }
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The committed files are what the specs render to.
    #[test]
    fn committed_files_match_the_specs() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../templates");
        let catalog = crate::Catalog::load(&root).unwrap_or_else(|p| panic!("{p:?}"));
        let mut drift = Vec::new();
        for l in &catalog.templates {
            for (name, text) in render(&l.template) {
                let p = root.join(&l.template.id).join(name);
                if std::fs::read_to_string(&p).ok().as_deref() != Some(text.as_str()) {
                    drift.push(p.display().to_string());
                }
            }
        }
        assert!(drift.is_empty(), "rendered files differ from their specs; run `berth templates render`: {drift:?}");
    }
}
