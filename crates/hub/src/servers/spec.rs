//! The pure part of a start: the user options a start is asked with, the
//! template choice resolved into a GPU count and a routing mode, JupyterHub's
//! single-user environment, and the `SpawnSpec` with its readiness probe.
//! No IO: everything here is tested with tables.

use std::collections::BTreeMap;

use berth_core::{AppProtocol, HubTemplate, RoutingMode, ServerId};
use berth_spawner::SpawnSpec;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{HubError, HubResult};

/// What a start is asked with (JupyterHub's `user_options`): a closed set —
/// `template`, `gpus`, and `image` where the admin allows images by name.
/// berth records the `routing` mode it chose itself; `extra` only holds
/// what records written by older versions carry.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UserOptions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpus: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routing: Option<RoutingMode>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl UserOptions {
    /// From a request body: a JSON object of the options berth knows, or
    /// an error naming the one it does not.
    pub fn from_json(v: Value) -> HubResult<UserOptions> {
        let Some(o) = v.as_object() else {
            return Err(HubError::BadOptions { message: "the body must be a JSON object of user options".into() });
        };
        if let Some(k) = o.keys().find(|k| !matches!(k.as_str(), "template" | "gpus" | "image")) {
            return Err(HubError::BadOptions {
                message: format!("unknown option {k:?}; a start takes template, gpus and (where allowed) image"),
            });
        }
        serde_json::from_value(v).map_err(|e| HubError::BadOptions { message: e.to_string() })
    }

    /// As recorded with a server; a damaged record reads as no options.
    pub fn from_record(s: &str) -> UserOptions {
        serde_json::from_str(s).unwrap_or_default()
    }

    pub fn to_record(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| "{}".into())
    }

    /// The mode recorded for the server (prefix unless a template chose another).
    pub fn routing_mode(&self) -> RoutingMode {
        self.routing.unwrap_or(RoutingMode::Prefix)
    }
}

/// Fills in a template start's GPU count (unasked: the template's default, or
/// its minimum on a hub without GPUs) and the routing mode, or refuses.
pub fn resolve_template(
    options: &mut UserOptions,
    t: &HubTemplate,
    mode: RoutingMode,
    hub_has_gpus: bool,
) -> HubResult<()> {
    let gpus = match options.gpus {
        None if !hub_has_gpus => t.gpus.min as u64,
        None => t.gpus.default as u64,
        Some(g) => g,
    };
    if gpus < t.gpus.min as u64 || gpus > t.gpus.max as u64 {
        return Err(HubError::GpuCountOutOfRange {
            name: t.name.clone(),
            min: t.gpus.min,
            max: t.gpus.max,
            asked: gpus,
        });
    }
    options.gpus = Some(gpus);
    options.routing = Some(mode);
    Ok(())
}

/// Where a server answers through berth: `<base>user/<name>/[<server>/]`.
pub fn server_prefix(base_url: &str, id: &ServerId) -> String {
    if id.server.is_default() {
        format!("{base_url}user/{}/", id.user)
    } else {
        format!("{base_url}user/{}/{}/", id.user, id.server)
    }
}

/// The environment JupyterHub gives a single-user server.
pub fn jupyterhub_env(id: &ServerId, token: &str, api_url: &str, base_url: &str) -> BTreeMap<String, String> {
    let prefix = server_prefix(base_url, id);
    let (user, server) = (id.user(), id.server());
    let access =
        serde_json::json!([format!("access:servers!server={user}/{server}"), format!("access:servers!user={user}")])
            .to_string();
    [
        ("JUPYTERHUB_API_TOKEN", token.to_string()),
        ("JPY_API_TOKEN", token.to_string()),
        ("JUPYTERHUB_CLIENT_ID", id.client_id()),
        ("JUPYTERHUB_API_URL", api_url.to_string()),
        ("JUPYTERHUB_ACTIVITY_URL", format!("{api_url}/users/{user}/activity")),
        ("JUPYTERHUB_BASE_URL", base_url.to_string()),
        ("JUPYTERHUB_SERVICE_PREFIX", prefix.clone()),
        ("JUPYTERHUB_USER", user.to_string()),
        ("JUPYTERHUB_SERVER_NAME", server.to_string()),
        ("JUPYTERHUB_OAUTH_CALLBACK_URL", format!("{prefix}oauth_callback")),
        ("JUPYTERHUB_OAUTH_ACCESS_SCOPES", access.clone()),
        ("JUPYTERHUB_OAUTH_SCOPES", access),
        ("JUPYTERHUB_OAUTH_CLIENT_ALLOWED_SCOPES", "[]".into()),
        ("JUPYTERHUB_HOST", String::new()),
        ("JUPYTERHUB_PUBLIC_URL", String::new()),
        ("JUPYTERHUB_PUBLIC_HUB_URL", String::new()),
        ("JUPYTERHUB_COOKIE_HOST_PREFIX_ENABLED", "0".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// What to run and how to tell it is ready.
#[derive(Debug, Clone)]
pub struct StartPlan {
    pub spec: SpawnSpec,
    /// Path (under the target) that answers once the server is up; `None`:
    /// nothing answers HTTP, running is ready.
    pub probe: Option<String>,
}

/// The spawn for `id`: the single-user server, or the template's app.
pub fn plan(
    id: &ServerId,
    env: BTreeMap<String, String>,
    base_url: &str,
    options: &UserOptions,
    template: Option<&HubTemplate>,
    gpus: Vec<String>,
) -> StartPlan {
    let prefix = server_prefix(base_url, id);
    let mut spec = SpawnSpec {
        owner_id: String::new(),
        build: Vec::new(),
        user: id.user().to_string(),
        server: id.server().to_string(),
        env,
        cmd: Vec::new(),
        prefix: prefix.clone(),
        template: options.template.clone().unwrap_or_default(),
        image: options.image.clone(),
        gpus,
        port: None,
        volumes: Vec::new(),
    };
    // The single-user server answers under its prefix at `<prefix>api`.
    let Some(t) = template else { return StartPlan { spec, probe: Some(format!("{prefix}api")) } };
    let base = if options.routing_mode() == RoutingMode::Prefix { prefix.clone() } else { "/".to_string() };
    spec.template = t.id.clone();
    spec.image = Some(t.image.clone());
    spec.build = t.build.clone();
    spec.cmd = t.cmd.iter().map(|a| a.replace("{base_url}", &base)).collect();
    spec.port = Some(t.port);
    if t.protocol != AppProtocol::Jupyter {
        // Plain apps get no hub credentials, only who and where they are.
        spec.env.retain(|k, _| matches!(k.as_str(), "JUPYTERHUB_USER" | "JUPYTERHUB_SERVER_NAME"));
        spec.env.insert("BERTH_BASE_URL".into(), base.clone());
    }
    for (k, v) in &t.env {
        spec.env.insert(k.clone(), v.replace("{base_url}", &base));
    }
    let probe = match t.protocol {
        AppProtocol::Jupyter => Some(format!("{prefix}api")),
        AppProtocol::Http => Some(base),
        AppProtocol::None => None,
    };
    StartPlan { spec, probe }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use berth_core::GpuRange;
    use serde_json::json;

    fn template(protocol: AppProtocol, gpus: (u32, u32, u32)) -> HubTemplate {
        HubTemplate {
            id: "app".into(),
            name: "App".into(),
            description: String::new(),
            category: String::new(),
            estimated_size: String::new(),
            image: "berth-template-app:latest".into(),
            cmd: vec!["serve".into(), "--root={base_url}".into()],
            port: 27015,
            protocol,
            routing: vec![RoutingMode::Prefix, RoutingMode::Strip],
            gpus: GpuRange { min: gpus.0, default: gpus.1, max: gpus.2 },
            env: [("APP_ROOT".to_string(), "{base_url}static".to_string())].into(),
            idle_timeout_seconds: None,
            build: Vec::new(),
        }
    }

    #[test]
    fn options_keep_what_clients_send_and_refuse_non_objects() {
        let o = UserOptions::from_json(json!({"template": "app", "gpus": 1})).unwrap();
        assert_eq!((o.template.as_deref(), o.gpus), (Some("app"), Some(1)));
        let back = UserOptions::from_record(&o.to_record());
        assert_eq!(back, o);
        // Records of older versions keep what they had.
        let old = UserOptions::from_record(r#"{"routing":"strip","profile":"x"}"#);
        assert_eq!((old.routing_mode(), old.extra.get("profile")), (RoutingMode::Strip, Some(&json!("x"))));
        for bad in [
            json!([1]),
            json!("x"),
            json!({"gpus": "two"}),
            json!({"routing": "strip"}),
            json!({"profile": "x"}),
            json!({"cmd": ["sh"]}),
        ] {
            assert!(matches!(UserOptions::from_json(bad.clone()), Err(HubError::BadOptions { .. })), "{bad}");
        }
        assert_eq!(UserOptions::from_record("not json"), UserOptions::default());
        assert_eq!(UserOptions::default().routing_mode(), RoutingMode::Prefix);
    }

    #[test]
    fn template_gpu_counts() {
        // (asked, hub has GPUs, (min, default, max)) -> resolved or refused
        type Case = (Option<u64>, bool, (u32, u32, u32), Option<u64>);
        let cases: &[Case] = &[
            (None, true, (0, 1, 2), Some(1)),
            (None, false, (0, 1, 2), Some(0)),
            (Some(2), true, (0, 1, 2), Some(2)),
            (Some(3), true, (0, 1, 2), None),
            (None, false, (1, 1, 2), Some(1)),
            (Some(0), true, (1, 1, 2), None),
        ];
        for (asked, have, range, want) in cases {
            let mut o = UserOptions { gpus: *asked, ..Default::default() };
            let r = resolve_template(&mut o, &template(AppProtocol::Http, *range), RoutingMode::Strip, *have);
            match want {
                Some(n) => {
                    assert!(r.is_ok(), "{asked:?} {have} {range:?}: {r:?}");
                    assert_eq!((o.gpus, o.routing), (Some(*n), Some(RoutingMode::Strip)));
                }
                None => assert!(matches!(r, Err(HubError::GpuCountOutOfRange { .. })), "{asked:?} {range:?}: {r:?}"),
            }
        }
    }

    #[test]
    fn the_environment_names_the_server_and_its_credentials() {
        let cases = [
            (("alice", ""), "/", "/user/alice/", "jupyterhub-user-alice"),
            (("alice", "lab"), "/", "/user/alice/lab/", "jupyterhub-user-alice-lab"),
            (("bob", ""), "/jh/", "/jh/user/bob/", "jupyterhub-user-bob"),
        ];
        for ((u, s), base, prefix, client) in cases {
            let id = ServerId::parse(u, s).unwrap();
            let env = jupyterhub_env(&id, "tok", "http://10.0.0.1:27015/hub/api", base);
            assert_eq!(env["JUPYTERHUB_SERVICE_PREFIX"], prefix);
            assert_eq!(env["JUPYTERHUB_CLIENT_ID"], client);
            assert_eq!(env["JUPYTERHUB_OAUTH_CALLBACK_URL"], format!("{prefix}oauth_callback"));
            assert_eq!(env["JUPYTERHUB_API_TOKEN"], "tok");
            assert_eq!(env["JUPYTERHUB_ACTIVITY_URL"], format!("http://10.0.0.1:27015/hub/api/users/{u}/activity"));
            assert_eq!(env["JUPYTERHUB_SERVER_NAME"], s);
            let scopes: Vec<String> = serde_json::from_str(&env["JUPYTERHUB_OAUTH_ACCESS_SCOPES"]).unwrap();
            assert_eq!(scopes, [format!("access:servers!server={u}/{s}"), format!("access:servers!user={u}")]);
        }
    }

    #[test]
    fn plans_per_protocol_and_mode() {
        let id = ServerId::parse("alice", "app").unwrap();
        let env = || jupyterhub_env(&id, "tok", "http://h/hub/api", "/");
        // (protocol, mode) -> (base the app is told, probe, keeps hub credentials)
        let cases = [
            (AppProtocol::Jupyter, RoutingMode::Prefix, "/user/alice/app/", Some("/user/alice/app/api"), true),
            (AppProtocol::Http, RoutingMode::Prefix, "/user/alice/app/", Some("/user/alice/app/"), false),
            (AppProtocol::Http, RoutingMode::Strip, "/", Some("/"), false),
            (AppProtocol::None, RoutingMode::Strip, "/", None, false),
        ];
        for (protocol, mode, base, probe, creds) in cases {
            let t = template(protocol, (0, 0, 1));
            let o = UserOptions { template: Some("app".into()), routing: Some(mode), ..Default::default() };
            let p = plan(&id, env(), "/", &o, Some(&t), vec!["GPU-1".into()]);
            assert_eq!(p.spec.cmd, ["serve".to_string(), format!("--root={base}")], "{protocol:?} {mode:?}");
            assert_eq!(p.spec.env["APP_ROOT"], format!("{base}static"));
            assert_eq!(p.probe.as_deref(), probe);
            assert_eq!(p.spec.env.contains_key("JUPYTERHUB_API_TOKEN"), creds, "{protocol:?}");
            assert_eq!(p.spec.env["JUPYTERHUB_USER"], "alice");
            assert_eq!((p.spec.port, p.spec.gpus.clone()), (Some(27015), vec!["GPU-1".to_string()]));
            assert_eq!(p.spec.image.as_deref(), Some("berth-template-app:latest"));
        }
        let o = UserOptions { image: Some("custom:1".into()), ..Default::default() };
        let p = plan(&id, env(), "/", &o, None, vec![]);
        assert_eq!((p.spec.image.as_deref(), p.probe.as_deref()), (Some("custom:1"), Some("/user/alice/app/api")));
        assert!(p.spec.cmd.is_empty() && p.spec.port.is_none());
    }
}
