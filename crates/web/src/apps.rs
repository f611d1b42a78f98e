//! Templates in the hub: which ones users may start, the routing mode each
//! server gets, and `host` mode — apps on their own host names
//! (`<server>--<user>.<app_domain>`), reached after a one-time redirect
//! through the hub that gives the app host a cookie of its own. The hub's
//! session cookie is host-only on the hub's host, so it never reaches an app
//! host; if one arrives anyway it is stripped like everywhere else.

use std::collections::HashMap;
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use berth_core::{HubTemplate, RoutingMode, Target};
use serde::{Deserialize, Serialize};

use crate::caller::PageUser;
use crate::error::{ApiError, ApiResult};
use crate::SharedHub;

/// The app host's own cookie.
pub const APP_COOKIE: &str = "berth-app";
/// Where an app host takes the one-time code.
pub const AUTH_PATH: &str = "/_berth/auth";
const CODE_TTL: Duration = Duration::from_secs(60);
const APP_SESSION_SECS: i64 = 12 * 3600;

/// The `[templates]` section.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TemplatesConfig {
    /// A catalog directory to offer instead of the one built into berth.
    pub dir: String,
    /// Template ids users may start; empty means all.
    pub allowed: Vec<String>,
    /// Wildcard domain for `host` routing (`<server>--<user>.<app_domain>`,
    /// with the hub at `<app_domain>` itself); empty turns `host` mode off.
    pub app_domain: String,
}

struct Code {
    visitor: String,
    host: String,
    expires: Instant,
}

pub struct Apps {
    pub cfg: TemplatesConfig,
    templates: Vec<HubTemplate>,
    /// (`http` or `https`, `:port` or empty), known once berth listens.
    origin: RwLock<(String, String)>,
    codes: Mutex<HashMap<String, Code>>,
}

impl Apps {
    pub fn new(cfg: TemplatesConfig, templates: Vec<HubTemplate>) -> Apps {
        let templates =
            templates.into_iter().filter(|t| cfg.allowed.is_empty() || cfg.allowed.contains(&t.id)).collect();
        Apps { cfg, templates, origin: RwLock::new(("http".into(), String::new())), codes: Mutex::new(HashMap::new()) }
    }

    pub fn templates(&self) -> &[HubTemplate] {
        &self.templates
    }

    pub fn get(&self, id: &str) -> Option<&HubTemplate> {
        self.templates.iter().find(|t| t.id == id)
    }

    pub fn host_mode(&self) -> bool {
        !self.cfg.app_domain.is_empty()
    }

    /// `host` when configured and supported, else the best path mode the app supports.
    pub fn mode_for(&self, t: &HubTemplate) -> Result<RoutingMode, String> {
        if t.routing.is_empty() {
            return Ok(RoutingMode::Prefix);
        }
        if self.host_mode() && t.routing.contains(&RoutingMode::Host) {
            return Ok(RoutingMode::Host);
        }
        t.routing.iter().copied().find(|m| *m != RoutingMode::Host).ok_or_else(|| {
            format!(
                "{} works only on its own host name; an admin must set templates.app_domain to a wildcard domain",
                t.name
            )
        })
    }

    pub fn host_for(&self, user: &str, server: &str) -> String {
        format!("{server}--{user}.{}", self.cfg.app_domain)
    }

    /// `(user, server)` of an app host name (port and case ignored).
    pub fn parse_host(&self, host: &str) -> Option<(String, String)> {
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
        Some((user.to_string(), server.to_string()))
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

    fn issue_code(&self, visitor: &str, host: &str) -> String {
        let code = berth_auth::new_token().expose().to_string();
        if let Ok(mut m) = self.codes.lock() {
            m.retain(|_, c| c.expires > Instant::now());
            m.insert(
                code.clone(),
                Code { visitor: visitor.into(), host: host.into(), expires: Instant::now() + CODE_TTL },
            );
        }
        code
    }

    /// The visitor a code was issued to, once, for this host only.
    fn take_code(&self, code: &str, host: &str) -> Option<String> {
        let c = self.codes.lock().ok()?.remove(code)?;
        (c.expires > Instant::now() && c.host == host).then_some(c.visitor)
    }
}

#[derive(Deserialize)]
pub struct AppLogin {
    host: String,
    #[serde(default)]
    next: String,
}

fn safe_next(next: &str) -> String {
    if next.starts_with('/') && !next.starts_with("//") && !next.contains('\\') {
        next.to_string()
    } else {
        "/".into()
    }
}

/// `GET /hub/app-login?host=…&next=…`: the hub side of the one-time redirect.
pub async fn app_login(State(hub): State<SharedHub>, user: PageUser, Query(q): Query<AppLogin>) -> ApiResult<Response> {
    let apps = &hub.servers.apps;
    let Some((owner, server)) = apps.parse_host(&q.host) else {
        return Err(ApiError::bad_request(format!("{:?} is not an app host of this hub", q.host)).page());
    };
    if !user.caller.allows("access:servers", Target::Server { user: &owner, server: &server }) {
        return Err(ApiError::forbidden(format!("{} may not access this server", user.caller.name())).page());
    }
    let host = apps.host_for(&owner, &server);
    let code = apps.issue_code(user.caller.name(), &host);
    let next = safe_next(&q.next);
    let next = percent_encoding::utf8_percent_encode(&next, percent_encoding::NON_ALPHANUMERIC);
    Ok(Redirect::to(&format!("{}{AUTH_PATH}?code={code}&next={next}", apps.origin_of(&host))).into_response())
}

/// What the proxy does for a request on an app host.
pub enum AppHostAccess {
    /// Forward it; the visitor's name.
    Allowed(String),
    /// Answer this instead (a redirect to log in, the cookie being set, a refusal).
    Respond(Response),
}

fn cookie_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(';')).find_map(|c| {
        let (k, v) = c.trim().split_once('=')?;
        (k == name).then_some(v)
    })
}

/// Decides a request for `host` (already known to be an app host of `owner`'s `server`).
pub async fn app_host_access(
    hub: &SharedHub,
    host: &str,
    owner: &str,
    server: &str,
    path_and_query: &str,
    headers: &HeaderMap,
    tls: bool,
) -> AppHostAccess {
    let apps = &hub.servers.apps;
    let (path, query) = path_and_query.split_once('?').unwrap_or((path_and_query, ""));
    if path == AUTH_PATH {
        let params: HashMap<String, String> = serde_urlencoded::from_str(query).unwrap_or_default();
        let visitor = params.get("code").and_then(|c| apps.take_code(c, host));
        let Some(visitor) = visitor else {
            return AppHostAccess::Respond(
                (StatusCode::FORBIDDEN, "this sign-in link was used already or has expired; open the app again\n")
                    .into_response(),
            );
        };
        let expires = berth_store::now_ms() / 1000 + APP_SESSION_SECS;
        let value = hub.signer.sign(&format!("app:{host}"), &format!("{visitor}|{expires}"));
        let secure = if tls { "; Secure" } else { "" };
        let cookie =
            format!("{APP_COOKIE}={value}; Path=/; HttpOnly; SameSite=Lax; Max-Age={APP_SESSION_SECS}{secure}");
        let next = safe_next(params.get("next").map(String::as_str).unwrap_or("/"));
        let mut r = Redirect::to(&next).into_response();
        if let Ok(v) = header::HeaderValue::from_str(&cookie) {
            r.headers_mut().insert(header::SET_COOKIE, v);
        }
        return AppHostAccess::Respond(r);
    }
    let visitor = cookie_value(headers, APP_COOKIE).and_then(|v| {
        let inner = hub.signer.unsign(&format!("app:{host}"), v)?;
        let (name, expires) = inner.split_once('|')?;
        (expires.parse::<i64>().ok()? > berth_store::now_ms() / 1000).then(|| name.to_string())
    });
    match visitor {
        Some(v) => {
            // Owners and admins; access can be withdrawn at any time.
            let ok = v == owner || hub.store.get_user(&v).await.ok().flatten().is_some_and(|u| u.admin && u.authorized);
            if ok {
                AppHostAccess::Allowed(v)
            } else {
                AppHostAccess::Respond(
                    (StatusCode::FORBIDDEN, format!("{v} may not access {server}\n")).into_response(),
                )
            }
        }
        None => {
            let _ = server;
            let next = percent_encoding::utf8_percent_encode(path_and_query, percent_encoding::NON_ALPHANUMERIC);
            let hubo = apps.origin_of(&apps.cfg.app_domain);
            AppHostAccess::Respond(
                Redirect::to(&format!("{hubo}{}app-login?host={host}&next={next}", hub.hub_prefix())).into_response(),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_core::{AppProtocol, GpuRange};

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
        }
    }

    #[test]
    fn modes_host_when_configured_else_the_best_path_mode() {
        let off = Apps::new(TemplatesConfig::default(), vec![]);
        let on = Apps::new(TemplatesConfig { app_domain: "apps.test".into(), ..Default::default() }, vec![]);
        let both = t(vec![RoutingMode::Host, RoutingMode::Strip]);
        assert_eq!(on.mode_for(&both), Ok(RoutingMode::Host));
        assert_eq!(off.mode_for(&both), Ok(RoutingMode::Strip));
        let only_host = t(vec![RoutingMode::Host]);
        assert!(off.mode_for(&only_host).unwrap_err().contains("app_domain"));
        assert_eq!(on.parse_host("lab--alice.apps.test:8080"), Some(("alice".into(), "lab".into())));
        assert_eq!(on.parse_host("LAB--alice.APPS.test"), Some(("alice".into(), "lab".into())));
        for bad in
            ["apps.test", "alice.apps.test", "lab--alice.apps.test.evil", "lab--Al ice.apps.test", "x--y--z.apps.test"]
        {
            assert_eq!(on.parse_host(bad), None, "{bad}");
        }
        assert_eq!(off.parse_host("lab--alice.apps.test"), None);
    }

    #[test]
    fn codes_are_single_use_and_bound_to_their_host() {
        let a = Apps::new(TemplatesConfig { app_domain: "apps.test".into(), ..Default::default() }, vec![]);
        let c = a.issue_code("alice", "lab--alice.apps.test");
        assert_eq!(a.take_code(&c, "other--bob.apps.test"), None, "another host cannot use it");
        let c = a.issue_code("alice", "lab--alice.apps.test");
        assert_eq!(a.take_code(&c, "lab--alice.apps.test").as_deref(), Some("alice"));
        assert_eq!(a.take_code(&c, "lab--alice.apps.test"), None, "used once");
        assert_eq!(safe_next("//evil.example/"), "/");
        assert_eq!(safe_next("/ok?x=1"), "/ok?x=1");
    }
}
