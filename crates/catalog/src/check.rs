//! The two-port rules, on each spec and on its rendered files: the app
//! listens on 27015 and nothing but 22 and 27015 is exposed; SSH takes keys,
//! never passwords; GPUs are passed through; `/app` is the work directory.
//! Every violation names its file and line.

use std::path::Path;

use berth_core::ServerName;

use crate::render::HOST_SSH_PORT;
use crate::{Catalog, Loaded, Problem, APP_PORT, SSH_PORT, WORKDIR};

fn at(l: &Loaded, offset: usize, message: String) -> Problem {
    Problem { file: l.path.clone(), line: l.line_of(offset), message }
}

/// The line of the first occurrence of `needle` in the spec (for fields without spans).
fn line_of_key(l: &Loaded, needle: &str) -> usize {
    l.text.find(needle).map_or(1, |o| l.line_of(o))
}

/// Problems in one spec.
pub fn check_spec(l: &Loaded) -> Vec<Problem> {
    let t = &l.template;
    let mut out = Vec::new();
    let dir_name = l.path.parent().and_then(|p| p.file_name()).map(|n| n.to_string_lossy().to_string());
    if ServerName::parse(&t.id).is_err() || t.id.is_empty() {
        out.push(Problem {
            file: l.path.clone(),
            line: line_of_key(l, "id"),
            message: format!("id {:?} must be a lower-case name (a-z, 0-9, -)", t.id),
        });
    }
    if dir_name.as_deref().is_some_and(|d| d != t.id) {
        out.push(Problem {
            file: l.path.clone(),
            line: line_of_key(l, "id"),
            message: format!("id {:?} differs from its directory {:?}", t.id, dir_name.unwrap_or_default()),
        });
    }
    if let Some(app) = &t.app {
        let port = *app.port.get_ref();
        if port != APP_PORT {
            out.push(at(l, app.port.span().start, format!("the app listens on {port}; it must listen on {APP_PORT}")));
        }
        if !app.command.contains("{port}") && !app.command.contains(&APP_PORT.to_string()) {
            out.push(Problem {
                file: l.path.clone(),
                line: line_of_key(l, "command"),
                message: format!("the app command does not name its port ({{port}} or {APP_PORT})"),
            });
        }
        if app.routing.is_empty() {
            out.push(Problem {
                file: l.path.clone(),
                line: line_of_key(l, "routing"),
                message: "an app must name the routing modes it supports (prefix, strip, host)".into(),
            });
        }
    }
    let expose = t.build.expose.get_ref();
    for p in expose {
        if *p != SSH_PORT && *p != APP_PORT {
            out.push(at(
                l,
                t.build.expose.span().start,
                format!("port {p} is exposed; only {SSH_PORT} (SSH) and {APP_PORT} (the app) may be"),
            ));
        }
    }
    if !expose.contains(&SSH_PORT) {
        out.push(at(l, t.build.expose.span().start, format!("port {SSH_PORT} (SSH) must be exposed")));
    }
    if t.app.is_some() && !expose.contains(&APP_PORT) {
        out.push(at(l, t.build.expose.span().start, format!("the app's port {APP_PORT} must be exposed")));
    }
    if *t.ssh.password_authentication.get_ref() {
        out.push(at(l, t.ssh.password_authentication.span().start, "SSH password authentication must be off".into()));
    }
    if !*t.ssh.pubkey_authentication.get_ref() {
        out.push(at(l, t.ssh.pubkey_authentication.span().start, "SSH public-key authentication must be on".into()));
    }
    let max = *t.gpus.max.get_ref();
    if max == 0 {
        out.push(at(l, t.gpus.max.span().start, "GPUs are not passed through (gpus.max is 0)".into()));
    } else if t.gpus.min > t.gpus.default || t.gpus.default > max {
        out.push(at(l, t.gpus.max.span().start, "gpus must satisfy min <= default <= max".into()));
    }
    if t.build.workdir.get_ref() != WORKDIR {
        out.push(at(
            l,
            t.build.workdir.span().start,
            format!("the work directory is {}; it must be {WORKDIR}", t.build.workdir.get_ref()),
        ));
    }
    out
}

/// Problems in the rendered files next to a spec.
pub fn check_rendered(dir: &Path) -> Vec<Problem> {
    let mut out = Vec::new();
    let read = |name: &str, out: &mut Vec<Problem>| -> Option<Vec<String>> {
        let p = dir.join(name);
        match std::fs::read_to_string(&p) {
            Ok(t) => Some(t.lines().map(str::to_string).collect()),
            Err(_) => {
                out.push(Problem { file: p, line: 0, message: "missing; run `berth templates render`".into() });
                None
            }
        }
    };
    let problem = |name: &str, line: usize, message: String| Problem { file: dir.join(name), line, message };

    if let Some(lines) = read("Dockerfile", &mut out) {
        let mut workdir = false;
        for (i, l) in lines.iter().enumerate() {
            let l = l.trim();
            if let Some(ports) = l.strip_prefix("EXPOSE ") {
                for p in ports.split_whitespace() {
                    let n = p.split('/').next().unwrap_or(p);
                    if n != SSH_PORT.to_string() && n != APP_PORT.to_string() {
                        out.push(problem(
                            "Dockerfile",
                            i + 1,
                            format!("port {p} is exposed; only 22 and 27015 may be"),
                        ));
                    }
                }
            }
            if let Some(w) = l.strip_prefix("WORKDIR ") {
                workdir = w.trim() == WORKDIR;
                if !workdir {
                    out.push(problem("Dockerfile", i + 1, format!("the work directory must be {WORKDIR}")));
                }
            }
        }
        if !workdir && !lines.iter().any(|l| l.trim().starts_with("WORKDIR ")) {
            out.push(problem("Dockerfile", lines.len(), format!("no WORKDIR {WORKDIR}")));
        }
    }
    if let Some(lines) = read("sshd_config", &mut out) {
        let setting = |key: &str| {
            lines.iter().enumerate().find_map(|(i, l)| {
                let mut w = l.split_whitespace();
                (w.next()?.eq_ignore_ascii_case(key)).then(|| (i + 1, w.next().unwrap_or("").to_ascii_lowercase()))
            })
        };
        match setting("PasswordAuthentication") {
            Some((_, v)) if v == "no" => {}
            Some((i, _)) => out.push(problem("sshd_config", i, "SSH password authentication must be off".into())),
            None => out.push(problem("sshd_config", lines.len(), "PasswordAuthentication no is missing".into())),
        }
        match setting("PubkeyAuthentication") {
            Some((_, v)) if v == "yes" => {}
            Some((i, _)) => out.push(problem("sshd_config", i, "SSH public-key authentication must be on".into())),
            None => out.push(problem("sshd_config", lines.len(), "PubkeyAuthentication yes is missing".into())),
        }
    }
    if let Some(lines) = read("docker-compose.yml", &mut out) {
        let allowed = [format!("{HOST_SSH_PORT}:{SSH_PORT}"), format!("{APP_PORT}:{APP_PORT}")];
        let mut in_ports = false;
        for (i, l) in lines.iter().enumerate() {
            let t = l.trim();
            if t == "ports:" {
                in_ports = true;
                continue;
            }
            if in_ports {
                match t.strip_prefix("- ") {
                    Some(m) => {
                        let m = m.trim_matches('"');
                        if !allowed.iter().any(|a| a == m) {
                            out.push(problem(
                                "docker-compose.yml",
                                i + 1,
                                format!("port mapping {m}; only {} and {} are allowed", allowed[0], allowed[1]),
                            ));
                        }
                    }
                    None => in_ports = false,
                }
            }
        }
        if !lines.iter().any(|l| l.contains("capabilities: [gpu]")) {
            // At the device's capabilities when there is one, else at the end.
            let line = lines.iter().position(|l| l.contains("capabilities:")).map_or(lines.len(), |i| i + 1);
            out.push(problem("docker-compose.yml", line, "GPUs are not passed through (no gpu device)".into()));
        }
    }
    out
}

/// Every problem in the catalog: specs, and (when it was read from a
/// directory) the rendered files beside them.
pub fn check(catalog: &Catalog) -> Vec<Problem> {
    let mut out = Vec::new();
    for l in &catalog.templates {
        out.extend(check_spec(l));
        if catalog.dir.is_some() {
            if let Some(d) = l.path.parent() {
                out.extend(check_rendered(d));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copy_dir(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                copy_dir(&p, &to.join(e.file_name()));
            } else {
                std::fs::copy(&p, to.join(e.file_name())).unwrap();
            }
        }
    }

    fn root() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../templates")
    }

    #[test]
    fn the_shipped_catalog_passes() {
        let c = Catalog::load(&root()).unwrap_or_else(|p| panic!("{p:?}"));
        let problems = check(&c);
        assert!(problems.is_empty(), "{}", problems.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("\n"));
        assert!(check(&Catalog::builtin().unwrap()).is_empty());
    }

    #[test]
    fn seeded_violations_are_named_with_file_and_line() {
        let tmp = tempfile::tempdir().unwrap();
        copy_dir(&root(), tmp.path());
        let spec = tmp.path().join("comfyui/template.toml");
        let text = std::fs::read_to_string(&spec).unwrap();
        let seeded = text
            .replace("port = 27015", "port = 8080")
            .replace("password_authentication = false", "password_authentication = true")
            .replace("max = 4", "max = 0");
        assert_ne!(seeded, text);
        std::fs::write(&spec, &seeded).unwrap();
        let line = |needle: &str| seeded.lines().position(|l| l.trim_start().starts_with(needle)).unwrap() + 1;
        let sshd = tmp.path().join("comfyui/sshd_config");
        let s =
            std::fs::read_to_string(&sshd).unwrap().replace("PasswordAuthentication no", "PasswordAuthentication yes");
        std::fs::write(&sshd, s).unwrap();

        let c = Catalog::load(tmp.path()).unwrap();
        let problems: Vec<String> = check(&c).iter().map(|p| p.to_string()).collect();
        let want = [
            format!("{}:{}: the app listens on 8080", spec.display(), line("port = 8080")),
            format!("{}:{}: SSH password authentication must be off", spec.display(), line("password_authentication")),
            format!("{}:{}: GPUs are not passed through", spec.display(), line("max = 0")),
            format!("{}:3: SSH password authentication must be off", sshd.display()),
        ];
        for w in &want {
            assert!(problems.iter().any(|p| p.starts_with(w.as_str())), "missing {w:?} in {problems:#?}");
        }
        assert_eq!(problems.len(), want.len(), "{problems:#?}");
    }
}
