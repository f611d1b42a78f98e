//! What the hub needs to know about an environment template to run it as a
//! user's server. The catalog (`berth-catalog`) produces these from its
//! `template.toml` specs; the hub (`berth-web`) offers them on the start page,
//! and the proxy routes to them in one of the [`RoutingMode`]s.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// How the proxy presents an app under berth's single port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum RoutingMode {
    /// The app is told its base URL (`/user/alice/comfyui/`) and emits URLs under it.
    Prefix,
    /// The proxy strips the prefix; the app answers at `/` and its redirects and
    /// cookie paths are rewritten on the way back.
    Strip,
    /// The app is served at `/` on its own host name `<server>--<user>.<domain>`.
    Host,
}

impl RoutingMode {
    pub fn as_str(self) -> &'static str {
        match self {
            RoutingMode::Prefix => "prefix",
            RoutingMode::Strip => "strip",
            RoutingMode::Host => "host",
        }
    }
}

/// What the app on the template's port speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AppProtocol {
    /// JupyterHub's single-user protocol (OAuth with the hub, activity reports).
    Jupyter,
    /// A plain web app or API; ready when its port answers HTTP. The proxy's
    /// edge check (owner, admin, `access:servers`) is its only protection.
    Http,
    /// No app on the web port (SSH-only environments).
    None,
}

/// GPUs a template wants: the user may pick between `min` and `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuRange {
    pub min: u32,
    pub default: u32,
    pub max: u32,
}

/// A template as the hub runs it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HubTemplate {
    pub id: String,
    pub name: String,
    pub description: String,
    pub category: String,
    /// Human-readable, e.g. "8 GB".
    pub estimated_size: String,
    /// The image the Docker spawner runs.
    pub image: String,
    /// Command line; `{base_url}` is replaced with the path the app must answer
    /// under (the server's prefix in `prefix` mode, `/` otherwise) and `{port}`
    /// with `port`. Empty means the image's own command.
    pub cmd: Vec<String>,
    /// The app's port inside the container (27015 in the catalog).
    pub port: u16,
    pub protocol: AppProtocol,
    /// The routing modes the app supports, best first. Empty for `AppProtocol::None`.
    pub routing: Vec<RoutingMode>,
    pub gpus: GpuRange,
    /// Extra environment; values take the same placeholders as `cmd`.
    pub env: BTreeMap<String, String>,
    /// Idle timeout of its servers, over the hub's global one (0: never
    /// idle-culled); `cull.template_timeouts` overrides it.
    #[serde(default)]
    pub idle_timeout_seconds: Option<u64>,
    /// The rendered build context (path, contents) the Docker spawner makes
    /// `image` from when the engine does not have it; `image`'s tag is the
    /// hash of these files, so a changed template builds anew.
    #[serde(skip)]
    pub build: Vec<(String, String)>,
}

impl HubTemplate {
    /// Replaces `{base_url}` and `{port}` in `s`.
    pub fn expand(&self, s: &str, base_url: &str) -> String {
        s.replace("{base_url}", base_url).replace("{port}", &self.port.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expand_replaces_both_placeholders() {
        let t = HubTemplate {
            id: "comfyui".into(),
            name: "ComfyUI".into(),
            description: String::new(),
            category: "image".into(),
            estimated_size: "12 GB".into(),
            image: "berth/comfyui".into(),
            cmd: vec![],
            port: 27015,
            protocol: AppProtocol::Http,
            routing: vec![RoutingMode::Host, RoutingMode::Strip],
            gpus: GpuRange { min: 0, default: 1, max: 2 },
            env: BTreeMap::new(),
            idle_timeout_seconds: None,
            build: Vec::new(),
        };
        assert_eq!(t.expand("--port {port} --root {base_url}", "/user/a/c/"), "--port 27015 --root /user/a/c/");
    }
}
