//! The template catalog: one declarative `template.toml` per environment
//! (`templates/<id>/`), the shared parts every template repeats written once
//! (`render`), the two-port rules (`check`), and the `template_config.json`
//! export. The hub runs templates through [`Template::hub_template`].
//!
//! Must not know Docker or HTTP: building and running images is
//! `berth-spawner-docker`'s, offering templates is the hub's.
#![forbid(unsafe_code)]

pub mod check;
pub mod render;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use berth_core::{AppProtocol, GpuRange, HubTemplate, RoutingMode};
use serde::{Deserialize, Serialize};
use toml::Spanned;

include!(concat!(env!("OUT_DIR"), "/builtin.rs"));

/// The one port every web UI or API answers on.
pub const APP_PORT: u16 = 27015;
/// SSH inside the environment.
pub const SSH_PORT: u16 = 22;
/// The work directory every template uses.
pub const WORKDIR: &str = "/app";

/// How a template's container starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StartMode {
    /// sshd only (the environment is used over SSH).
    SshOnly,
    /// sshd, then the app in the background on 27015; the container stays up.
    App,
    /// sshd, then the app's command in the foreground (the container ends with it).
    Script,
}

/// How sshd gets into the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum SshdSource {
    /// Installed with apt-get (Debian and Ubuntu bases).
    #[default]
    Apt,
    /// The base image has it already.
    Present,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Packages {
    /// Debian packages.
    pub apt: Vec<String>,
    /// pip requirements with their pins (`torch==2.1.2`, `numpy<2.0`).
    pub pip: Vec<String>,
    /// `--index-url` for pip (e.g. the CUDA 12.1 wheel index); empty: the default.
    pub pip_index_url: String,
    /// `--extra-index-url` for pip.
    pub pip_extra_index_url: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct App {
    /// Shell command that runs the app; `{port}` and `{base_url}` are filled in.
    pub command: String,
    pub port: Spanned<u16>,
    #[serde(default = "default_protocol")]
    pub protocol: AppProtocol,
    /// Routing modes the app supports, best first.
    pub routing: Vec<RoutingMode>,
    /// How the app is told its base URL in `prefix` mode, e.g. `--subpath {base_url}`
    /// (appended to the command); empty when it reads one from the environment.
    #[serde(default)]
    pub base_url_arg: String,
    /// Environment variable that carries the base URL, if the app reads one.
    #[serde(default)]
    pub base_url_env: String,
    /// The command in hub mode, when it differs (e.g. `jupyterhub-singleuser`,
    /// or an app's own login turned off because berth's proxy checks who comes in).
    #[serde(default)]
    pub hub_command: String,
}

fn default_protocol() -> AppProtocol {
    AppProtocol::Http
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Gpus {
    pub min: u32,
    pub default: u32,
    pub max: Spanned<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Resources {
    /// `/dev/shm` size, e.g. `8gb`.
    pub shm_size: String,
    /// Memory the template wants at least, e.g. `16 GB` (informational).
    pub min_memory: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Ssh {
    pub password_authentication: Spanned<bool>,
    pub pubkey_authentication: Spanned<bool>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Build {
    #[serde(default)]
    pub sshd: SshdSource,
    /// Build arguments the Dockerfile declares (`ARG NAME`); `berth up` passes
    /// them from its environment, compose from the shell's.
    #[serde(default)]
    pub args: Vec<String>,
    /// Extra `RUN` steps, in order.
    #[serde(default)]
    pub setup: Vec<String>,
    pub workdir: Spanned<String>,
    /// Ports the image exposes.
    pub expose: Spanned<Vec<u16>>,
}

/// One `template.toml`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Template {
    pub id: String,
    pub name: String,
    pub description: String,
    pub category: String,
    pub base_image: String,
    pub estimated_size: String,
    pub use_case: String,
    pub start_mode: StartMode,
    #[serde(default)]
    pub packages: Packages,
    #[serde(default)]
    pub app: Option<App>,
    pub gpus: Gpus,
    #[serde(default)]
    pub resources: Resources,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub ssh: Ssh,
    pub build: Build,
    /// Idle timeout of the template's servers in the hub (0: never
    /// idle-culled); unset: the hub's `cull.idle_timeout_seconds`.
    #[serde(default)]
    pub idle_timeout_seconds: Option<u64>,
}

/// A template with where it came from (for `file:line` messages).
#[derive(Debug, Clone)]
pub struct Loaded {
    pub template: Template,
    /// `templates/<id>/template.toml`, or `<builtin>/<id>/template.toml`.
    pub path: PathBuf,
    pub text: String,
}

/// 1-based line of a byte offset in `text`.
fn line_at(text: &str, offset: usize) -> usize {
    text.get(..offset.min(text.len())).map_or(1, |t| t.matches('\n').count() + 1)
}

impl Loaded {
    /// 1-based line of a byte offset in the spec.
    pub fn line_of(&self, offset: usize) -> usize {
        line_at(&self.text, offset)
    }
}

/// The original fields of `template_config.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Summary {
    pub id: String,
    pub name: String,
    pub description: String,
    pub base_image: String,
    pub estimated_size: String,
    pub use_case: String,
    pub directory: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TemplateConfig {
    pub templates: Vec<Summary>,
}

/// A parse error with its place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: PathBuf,
    pub line: usize,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}: {}", self.file.display(), self.line, self.message)
    }
}

/// Parses one spec; errors carry the line.
pub fn parse(path: &Path, text: &str) -> Result<Loaded, Problem> {
    match toml::from_str::<Template>(text) {
        Ok(template) => Ok(Loaded { template, path: path.to_path_buf(), text: text.to_string() }),
        Err(e) => {
            let line = e.span().map_or(1, |s| line_at(text, s.start));
            Err(Problem { file: path.to_path_buf(), line, message: e.message().to_string() })
        }
    }
}

/// The whole catalog.
#[derive(Debug, Clone)]
pub struct Catalog {
    pub templates: Vec<Loaded>,
    /// Where it was read from (`None`: the one built into berth).
    pub dir: Option<PathBuf>,
}

impl Catalog {
    /// The catalog shipped inside berth.
    pub fn builtin() -> Result<Catalog, Vec<Problem>> {
        let mut templates = Vec::new();
        let mut problems = Vec::new();
        for (id, text) in BUILTIN {
            match parse(&Path::new("templates").join(id).join("template.toml"), text) {
                Ok(l) => templates.push(l),
                Err(p) => problems.push(p),
            }
        }
        if problems.is_empty() {
            Ok(Catalog { templates, dir: None })
        } else {
            Err(problems)
        }
    }

    /// Reads `DIR/<id>/template.toml` for every subdirectory that has one.
    pub fn load(dir: &Path) -> Result<Catalog, Vec<Problem>> {
        let entries = std::fs::read_dir(dir).map_err(|e| {
            vec![Problem { file: dir.to_path_buf(), line: 0, message: format!("cannot read the catalog: {e}") }]
        })?;
        let mut dirs: Vec<PathBuf> =
            entries.flatten().map(|e| e.path()).filter(|p| p.join("template.toml").is_file()).collect();
        dirs.sort();
        let mut templates = Vec::new();
        let mut problems = Vec::new();
        for d in dirs {
            let path = d.join("template.toml");
            match std::fs::read_to_string(&path) {
                Ok(text) => match parse(&path, &text) {
                    Ok(l) => templates.push(l),
                    Err(p) => problems.push(p),
                },
                Err(e) => problems.push(Problem { file: path, line: 0, message: format!("cannot read: {e}") }),
            }
        }
        if templates.is_empty() && problems.is_empty() {
            problems.push(Problem {
                file: dir.to_path_buf(),
                line: 0,
                message: "no templates here (expected <id>/template.toml)".into(),
            });
        }
        if problems.is_empty() {
            Ok(Catalog { templates, dir: Some(dir.to_path_buf()) })
        } else {
            Err(problems)
        }
    }

    pub fn get(&self, id: &str) -> Option<&Loaded> {
        self.templates.iter().find(|t| t.template.id == id)
    }

    /// What `template_config.json` holds.
    pub fn config(&self) -> TemplateConfig {
        TemplateConfig { templates: self.templates.iter().map(|l| l.template.summary()).collect() }
    }

    /// Every template as the hub runs it.
    pub fn hub_templates(&self) -> Vec<HubTemplate> {
        self.templates.iter().map(|l| l.template.hub_template()).collect()
    }
}

impl Template {
    pub fn summary(&self) -> Summary {
        Summary {
            id: self.id.clone(),
            name: self.name.clone(),
            description: self.description.clone(),
            base_image: self.base_image.clone(),
            estimated_size: self.estimated_size.clone(),
            use_case: self.use_case.clone(),
            directory: format!("templates/{}", self.id),
        }
    }

    /// The image `berth up` (and `docker compose build`) produces.
    pub fn image(&self) -> String {
        format!("berth-template-{}:latest", self.id)
    }

    pub fn hub_template(&self) -> HubTemplate {
        let (cmd, port, protocol, routing) = match &self.app {
            Some(a) => {
                let mut line = if a.hub_command.is_empty() { a.command.clone() } else { a.hub_command.clone() };
                if !a.base_url_arg.is_empty() {
                    line.push(' ');
                    line.push_str(&a.base_url_arg);
                }
                (vec!["/bin/sh".into(), "-c".into(), line], *a.port.get_ref(), a.protocol, a.routing.clone())
            }
            None => (Vec::new(), APP_PORT, AppProtocol::None, Vec::new()),
        };
        let mut env = self.env.clone();
        if let Some(a) = self.app.as_ref().filter(|a| !a.base_url_env.is_empty()) {
            env.insert(a.base_url_env.clone(), "{base_url}".into());
        }
        let build: Vec<(String, String)> =
            render::render(self).into_iter().map(|(path, text)| (path.to_string(), text)).collect();
        HubTemplate {
            id: self.id.clone(),
            name: self.name.clone(),
            description: self.description.clone(),
            category: self.category.clone(),
            estimated_size: self.estimated_size.clone(),
            image: format!("berth-template-{}:{}", self.id, context_hash(&build)),
            cmd,
            port,
            protocol,
            routing,
            gpus: GpuRange { min: self.gpus.min, default: self.gpus.default, max: *self.gpus.max.get_ref() },
            env,
            idle_timeout_seconds: self.idle_timeout_seconds,
            build,
        }
    }
}

/// Twelve hex digits of the SHA-256 of a build context (paths and contents),
/// the tag of the image made from it.
pub fn context_hash(files: &[(String, String)]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for (path, text) in files {
        h.update(path.as_bytes());
        h.update([0u8]);
        h.update(text.len().to_le_bytes());
        h.update(text.as_bytes());
    }
    h.finalize().iter().take(6).map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_catalog_has_all_eighteen_templates() {
        let c = Catalog::builtin().unwrap_or_else(|p| panic!("{p:?}"));
        let mut ids: Vec<&str> = c.templates.iter().map(|t| t.template.id.as_str()).collect();
        ids.sort();
        assert_eq!(
            ids,
            [
                "automatic1111",
                "comfyui",
                "datascience",
                "jupyter-ready",
                "jupyter-scipy",
                "jupyter-spark",
                "jupyter-tensorflow",
                "jupyterlab",
                "jupyterlab-ds",
                "llm-webui-qwen3-32b",
                "llm-webui-qwen3-8b",
                "mlops",
                "ollama",
                "oobabooga",
                "pytorch",
                "scientific",
                "tensorflow",
                "vscode-web",
            ]
        );
        for t in &c.templates {
            assert_eq!(t.path.parent().and_then(|p| p.file_name()).unwrap().to_str(), Some(t.template.id.as_str()));
        }
    }

    #[test]
    fn parse_errors_name_the_line() {
        let e = parse(Path::new("x/template.toml"), "id = \"x\"\nname = 3\n").unwrap_err();
        assert_eq!(e.line, 2, "{e}");
    }

    #[test]
    fn comfyui_pins_what_it_needs() {
        let c = Catalog::builtin().unwrap();
        let t = &c.get("comfyui").unwrap().template;
        for pin in ["numpy<2.0", "torch==2.1.2", "transformers<4.45", "xformers==0.0.23.post1"] {
            assert!(t.packages.pip.iter().any(|p| p == pin), "{pin}");
        }
        let h = t.hub_template();
        assert_eq!(h.port, APP_PORT);
        // The hub's image is tagged with the hash of its rendered build context.
        let tag = h.image.strip_prefix("berth-template-comfyui:").unwrap();
        assert_eq!(tag, context_hash(&h.build));
        assert!(tag.len() == 12 && tag.chars().all(|c| c.is_ascii_hexdigit()), "{tag}");
        assert!(h.build.iter().any(|(p, text)| p == "Dockerfile" && text.contains("torch==2.1.2")));
        let mut changed = h.build.clone();
        changed[0].1.push('\n');
        assert_ne!(context_hash(&changed), tag, "a changed template builds anew");
        assert_eq!(t.image(), "berth-template-comfyui:latest", "berth up keeps its own tag");
    }
}
