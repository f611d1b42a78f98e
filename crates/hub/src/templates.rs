//! The templates users may start (the built-in catalog or `templates.dir`,
//! filtered by `templates.allowed`), the routing mode each server gets, and
//! the names of `host` mode: app hosts `<server>--<user>.<app_domain>` and
//! the single-use codes that carry a visitor from the hub to an app host.

use std::collections::HashMap;
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use berth_core::{HubTemplate, RoutingMode, ServerId};
use serde::{Deserialize, Serialize};

use crate::error::HubError;

/// The app host's own cookie.
pub const APP_COOKIE: &str = "berth-app";
/// Where an app host takes the one-time code.
pub const AUTH_PATH: &str = "/_berth/auth";
const CODE_TTL: Duration = Duration::from_secs(60);
/// How long an app host's cookie is good for.
pub const APP_SESSION_SECS: i64 = 12 * 3600;

/// The `[templates]` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TemplatesConfig {
    /// A catalog directory to offer instead of the one built into berth.
    pub dir: String,
    /// Template ids users may start; empty means all.
    pub allowed: Vec<String>,
    /// Wildcard domain for `host` routing (`<server>--<user>.<app_domain>`,
    /// with the hub at `<app_domain>` itself); empty turns `host` mode off.
    pub app_domain: String,
    /// Template ids whose images are built in the background once berth
    /// serves, so their first start does not wait for a build.
    pub prebuild: Vec<String>,
    /// The template a default server runs on a spawner that runs images
    /// when `docker.image` names none (a JupyterHub single-user template);
    /// empty: none, `docker.image` must name an image.
    pub default: String,
}

impl Default for TemplatesConfig {
    fn default() -> Self {
        TemplatesConfig {
            dir: String::new(),
            allowed: Vec::new(),
            app_domain: String::new(),
            prebuild: Vec::new(),
            default: DEFAULT_TEMPLATE.into(),
        }
    }
}

/// The catalog's light JupyterLab template, the default environment.
pub const DEFAULT_TEMPLATE: &str = "jupyterlab";

struct Code {
    visitor: String,
    /// The visitor's hub session (public id): the app host's cookie lives as long as it.
    session: String,
    host: String,
    expires: Instant,
}

pub struct Templates {
    pub cfg: TemplatesConfig,
    templates: Vec<HubTemplate>,
    /// What a default server runs when the start names no template and no
    /// image (set with `with_default`); not subject to `allowed`, which
    /// limits what users pick.
    default: Option<HubTemplate>,
    /// (`http` or `https`, `:port` or empty), known once berth listens.
    origin: RwLock<(String, String)>,
    codes: Mutex<HashMap<String, Code>>,
}

impl Templates {
    pub fn new(cfg: TemplatesConfig, templates: Vec<HubTemplate>) -> Templates {
        let templates =
            templates.into_iter().filter(|t| cfg.allowed.is_empty() || cfg.allowed.contains(&t.id)).collect();
        Templates {
            cfg,
            templates,
            default: None,
            origin: RwLock::new(("http".into(), String::new())),
            codes: Mutex::new(HashMap::new()),
        }
    }

    pub fn templates(&self) -> &[HubTemplate] {
        &self.templates
    }

    /// A template users may pick.
    pub fn get(&self, id: &str) -> Option<&HubTemplate> {
        self.templates.iter().find(|t| t.id == id)
    }

    /// A template a server may run: one users may pick, or the default.
    pub fn lookup(&self, id: &str) -> Option<&HubTemplate> {
        self.get(id).or(self.default.as_ref().filter(|t| t.id == id))
    }

    /// `get` (`offered_only`) or `lookup`, or the error naming what is offered.
    pub fn require(&self, id: &str, offered_only: bool) -> Result<&HubTemplate, HubError> {
        let found = if offered_only { self.get(id) } else { self.lookup(id) };
        found.ok_or_else(|| HubError::UnknownTemplate {
            template: id.to_string(),
            choices: self.templates.iter().map(|t| t.id.clone()).collect(),
        })
    }

    /// The default server's template, when it has one.
    pub fn default_template(&self) -> Option<&HubTemplate> {
        self.default.as_ref()
    }

    /// Makes `templates.default` (looked up in `catalog`, the whole catalog
    /// before `allowed`) what default servers run: it must exist and speak
    /// JupyterHub's single-user protocol, which is what a default server is.
    pub fn with_default(mut self, catalog: &[HubTemplate]) -> Result<Templates, String> {
        let id = self.cfg.default.clone();
        if id.is_empty() {
            return Err("templates.default is empty and docker.image names no image: a default server would have \
                 nothing to run (set one of them)"
                .into());
        }
        let Some(t) = catalog.iter().find(|t| t.id == id) else {
            let ids: Vec<&str> = catalog.iter().map(|t| t.id.as_str()).collect();
            return Err(format!(
                "templates.default names {id:?}, which the catalog does not have (it has: {})",
                ids.join(", ")
            ));
        };
        if t.protocol != berth_core::AppProtocol::Jupyter {
            return Err(format!(
                "templates.default names {id:?}, whose app is not a JupyterHub single-user server; a default server must be one"
            ));
        }
        self.default = Some(t.clone());
        Ok(self)
    }

    pub fn host_mode(&self) -> bool {
        !self.cfg.app_domain.is_empty()
    }

    /// `host` when configured and supported, else the best path mode the app supports.
    pub fn mode_for(&self, t: &HubTemplate) -> Result<RoutingMode, HubError> {
        if t.routing.is_empty() {
            return Ok(RoutingMode::Prefix);
        }
        if self.host_mode() && t.routing.contains(&RoutingMode::Host) {
            return Ok(RoutingMode::Host);
        }
        t.routing
            .iter()
            .copied()
            .find(|m| *m != RoutingMode::Host)
            .ok_or_else(|| HubError::NeedsHostRouting { name: t.name.clone() })
    }

    pub fn host_for(&self, id: &ServerId) -> String {
        format!("{}--{}.{}", id.server, id.user, self.cfg.app_domain)
    }

    /// The server an app host name stands for (port and case ignored).
    pub fn parse_host(&self, host: &str) -> Option<ServerId> {
        if !self.host_mode() {
            return None;
        }
        let name =
            host.rsplit_once(':').map_or(host, |(h, p)| if p.chars().all(|c| c.is_ascii_digit()) { h } else { host });
        let name = name.to_ascii_lowercase();
        let label = name.strip_suffix(&format!(".{}", self.cfg.app_domain))?;
        let (server, user) = label.split_once("--")?;
        let user = berth_core::UserName::parse(user).ok()?;
        let server = berth_core::ServerName::parse(server).ok()?;
        Some(ServerId::new(user, server))
    }

    pub fn set_origin(&self, tls: bool, port: u16) {
        let scheme = if tls { "https" } else { "http" };
        let port = if (tls && port == 443) || (!tls && port == 80) { String::new() } else { format!(":{port}") };
        if let Ok(mut o) = self.origin.write() {
            *o = (scheme.into(), port);
        }
    }

    /// `scheme://host[:port]`
    pub fn origin_of(&self, host: &str) -> String {
        let (s, p) = self.origin.read().map(|o| o.clone()).unwrap_or_default();
        format!("{s}://{host}{p}")
    }

    pub fn issue_code(&self, visitor: &str, session: &str, host: &str) -> String {
        let code = berth_auth::new_token().expose().to_string();
        if let Ok(mut m) = self.codes.lock() {
            m.retain(|_, c| c.expires > Instant::now());
            let expires = Instant::now() + CODE_TTL;
            m.insert(
                code.clone(),
                Code { visitor: visitor.into(), session: session.into(), host: host.into(), expires },
            );
        }
        code
    }

    /// The visitor (and their session) a code was issued to, once, for this host only.
    pub fn take_code(&self, code: &str, host: &str) -> Option<(String, String)> {
        let c = self.codes.lock().ok()?.remove(code)?;
        (c.expires > Instant::now() && c.host == host).then_some((c.visitor, c.session))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use berth_core::{AppProtocol, GpuRange};

    fn id(u: &str, s: &str) -> Option<ServerId> {
        ServerId::parse(u, s).ok()
    }

    fn t(routing: Vec<RoutingMode>) -> HubTemplate {
        HubTemplate {
            id: "x".into(),
            name: "X".into(),
            description: String::new(),
            category: String::new(),
            estimated_size: String::new(),
            image: String::new(),
            cmd: vec![],
            port: 27015,
            protocol: AppProtocol::Http,
            routing,
            gpus: GpuRange { min: 0, default: 0, max: 1 },
            env: Default::default(),
            idle_timeout_seconds: None,
            build: Vec::new(),
        }
    }

    #[test]
    fn modes_host_when_configured_else_the_best_path_mode() {
        let off = Templates::new(TemplatesConfig::default(), vec![]);
        let on = Templates::new(TemplatesConfig { app_domain: "apps.test".into(), ..Default::default() }, vec![]);
        let both = t(vec![RoutingMode::Host, RoutingMode::Strip]);
        assert_eq!(on.mode_for(&both).ok(), Some(RoutingMode::Host));
        assert_eq!(off.mode_for(&both).ok(), Some(RoutingMode::Strip));
        let only_host = t(vec![RoutingMode::Host]);
        assert!(off.mode_for(&only_host).unwrap_err().to_string().contains("app_domain"));
        assert_eq!(on.parse_host("lab--alice.apps.test:8080"), id("alice", "lab"));
        assert_eq!(on.parse_host("LAB--alice.APPS.test"), id("alice", "lab"));
        for bad in
            ["apps.test", "alice.apps.test", "lab--alice.apps.test.evil", "lab--Al ice.apps.test", "x--y--z.apps.test"]
        {
            assert_eq!(on.parse_host(bad), None, "{bad}");
        }
        assert_eq!(off.parse_host("lab--alice.apps.test"), None);
    }

    #[test]
    fn codes_are_single_use_and_bound_to_their_host() {
        let a = Templates::new(TemplatesConfig { app_domain: "apps.test".into(), ..Default::default() }, vec![]);
        let c = a.issue_code("alice", "s1", "lab--alice.apps.test");
        assert_eq!(a.take_code(&c, "other--bob.apps.test"), None, "another host cannot use it");
        let c = a.issue_code("alice", "s1", "lab--alice.apps.test");
        assert_eq!(a.take_code(&c, "lab--alice.apps.test"), Some(("alice".into(), "s1".into())));
        assert_eq!(a.take_code(&c, "lab--alice.apps.test"), None, "used once");
    }
}
