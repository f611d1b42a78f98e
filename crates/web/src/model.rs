//! JSON models in JupyterHub's shapes.

use berth_core::{ScopeSet, ServerState, Target};
use berth_hub::cull::{CullStatus, CullStatuses};
use berth_store::{Server, Token, User};
use serde_json::{json, Value};

/// Unix milliseconds as JupyterHub's ISO 8601 `…Z`.
pub fn iso(ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    t.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

pub fn iso_opt(ms: Option<i64>) -> Value {
    ms.map(|m| Value::String(iso(m))).unwrap_or(Value::Null)
}

/// Parses JupyterHub's timestamps (`2026-11-22T06:12:46.254673Z`, with or without offset).
pub fn parse_iso(s: &str) -> Option<i64> {
    use time::format_description::well_known::Rfc3339;
    let t = time::OffsetDateTime::parse(s, &Rfc3339)
        .or_else(|_| time::OffsetDateTime::parse(&format!("{s}Z"), &Rfc3339))
        .ok()?;
    Some((t.unix_timestamp_nanos() / 1_000_000) as i64)
}

pub fn server_url(base: &str, user: &str, server: &str) -> String {
    if server.is_empty() {
        format!("{base}user/{user}/")
    } else {
        format!("{base}user/{user}/{server}/")
    }
}

pub fn progress_url(base: &str, user: &str, server: &str) -> String {
    if server.is_empty() {
        format!("{base}hub/api/users/{user}/server/progress")
    } else {
        format!("{base}hub/api/users/{user}/servers/{server}/progress")
    }
}

/// berth's own part of a server model (`berth`, beside JupyterHub's fields):
/// the culler's view, `null` when the server is not watched.
#[derive(serde::Serialize)]
pub struct BerthModel {
    cull: Option<CullModel>,
}

#[derive(serde::Serialize)]
struct CullModel {
    idle_timeout_seconds: u64,
    max_age_seconds: u64,
    checked_at: String,
    last_activity: String,
    active: Vec<String>,
    unknown: Vec<String>,
    cull_at: Option<String>,
    reason: Option<String>,
    extendable: bool,
    extend_url: String,
}

fn berth_model_typed(base: &str, s: &Server, cull: Option<&CullStatus>) -> BerthModel {
    BerthModel {
        cull: cull.map(|c| CullModel {
            idle_timeout_seconds: c.idle_timeout_seconds,
            max_age_seconds: c.max_age_seconds,
            checked_at: iso(c.checked_at_ms),
            last_activity: iso(c.last_activity_ms),
            active: c.active.clone(),
            unknown: c.unknown.clone(),
            cull_at: c.cull_at_ms.map(iso),
            reason: c.reason.clone(),
            extendable: c.extendable,
            extend_url: format!("{}/extend", server_api_path(base, &s.user, &s.name)),
        }),
    }
}

pub fn berth_model(base: &str, s: &Server, cull: Option<&CullStatus>) -> Value {
    serde_json::to_value(berth_model_typed(base, s, cull)).unwrap_or(Value::Null)
}

/// `<base>hub/api/users/<u>/server` or `…/servers/<name>`.
pub fn server_api_path(base: &str, user: &str, server: &str) -> String {
    if server.is_empty() {
        format!("{base}hub/api/users/{user}/server")
    } else {
        format!("{base}hub/api/users/{user}/servers/{server}")
    }
}

/// A server model in JupyterHub's shape, serialized as it is (no `Value`
/// tree per server in a list of hundreds).
#[derive(serde::Serialize)]
pub struct ServerModel<'a> {
    name: &'a str,
    display_name: &'a str,
    full_name: String,
    last_activity: Option<String>,
    started: Option<String>,
    pending: Option<&'static str>,
    ready: bool,
    stopped: bool,
    url: String,
    user_options: Value,
    progress_url: String,
    full_url: Option<()>,
    full_progress_url: Option<()>,
    template: &'a str,
    last_error: Option<&'a str>,
    berth: BerthModel,
    #[serde(skip_serializing_if = "Option::is_none")]
    state: Option<Value>,
}

pub fn server_model<'a>(base: &str, s: &'a Server, with_state: bool, cull: Option<&CullStatus>) -> ServerModel<'a> {
    ServerModel {
        name: &s.name,
        display_name: &s.name,
        full_name: format!("{}/{}", s.user, s.name),
        last_activity: s.last_activity.or(s.started).map(iso),
        started: s.started.map(iso),
        pending: s.state.pending(),
        ready: s.state == ServerState::Running,
        stopped: s.state == ServerState::Stopped,
        url: s.url.clone().filter(|u| u.starts_with("http")).unwrap_or_else(|| server_url(base, &s.user, &s.name)),
        user_options: serde_json::from_str::<Value>(&s.user_options).unwrap_or_else(|_| json!({})),
        progress_url: progress_url(base, &s.user, &s.name),
        full_url: None,
        full_progress_url: None,
        template: &s.template,
        last_error: s.last_error.as_deref(),
        berth: berth_model_typed(base, s, cull),
        state: with_state.then(|| serde_json::from_str::<Value>(&s.spawner_state).unwrap_or_else(|_| json!({}))),
    }
}

/// The user model as a typed value, for lists (serialized without building
/// a `Value` tree per user).
#[derive(serde::Serialize)]
pub struct UserModel<'a> {
    kind: &'static str,
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    admin: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    authorized: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    groups: Option<[u8; 0]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    roles: Option<&'static [&'static str]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    created: Option<String>,
    #[serde(skip_serializing_if = "Skip::skip")]
    last_activity: Skip<Option<String>>,
    #[serde(skip_serializing_if = "Skip::skip")]
    server: Skip<Option<String>>,
    #[serde(skip_serializing_if = "Skip::skip")]
    pending: Skip<Option<&'static str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    servers: Option<std::collections::BTreeMap<&'a str, ServerModel<'a>>>,
    #[serde(skip_serializing_if = "Skip::skip")]
    auth_state: Skip<Option<()>>,
    #[serde(skip_serializing_if = "Skip::skip")]
    user_info: Skip<Option<()>>,
}

/// A field that may be left out, or present (possibly as null).
pub struct Skip<T>(Option<T>);

impl<T> Skip<T> {
    fn skip(&self) -> bool {
        self.0.is_none()
    }
}

impl<T: serde::Serialize> serde::Serialize for Skip<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

/// `servers`: the user's servers (others' are passed over); a list groups
/// them first ([`servers_by_user`]).
pub fn user_model_typed<'a>(
    base: &str,
    u: &'a User,
    servers: &'a [Server],
    scopes: &ScopeSet,
    cull: &CullStatuses,
) -> UserModel<'a> {
    let target = Target::User(&u.name);
    let mut m = UserModel {
        kind: "user",
        name: &u.name,
        admin: None,
        authorized: None,
        groups: None,
        roles: None,
        created: None,
        last_activity: Skip(None),
        server: Skip(None),
        pending: Skip(None),
        servers: None,
        auth_state: Skip(None),
        user_info: Skip(None),
    };
    // JupyterHub's access map: `read:servers` alone gives `servers` (what
    // jupyterhub-idle-culler reads), `read:users:activity` `last_activity`.
    let servers_of = || {
        let with_state = scopes.allows("admin:server_state", target);
        servers
            .iter()
            .filter(|s| s.user == u.name && s.state.is_active())
            .map(|s| (s.name.as_str(), server_model(base, s, with_state, cull.get(&s.user, &s.name))))
            .collect()
    };
    if !scopes.allows("read:users", target) {
        if scopes.allows("read:users:activity", target) {
            m.last_activity = Skip(Some(u.last_activity.map(iso)));
        }
        if scopes.allows("read:servers", target) {
            m.servers = Some(servers_of());
        }
        return m;
    }
    let default = servers.iter().find(|s| s.user == u.name && s.name.is_empty() && s.state.is_active());
    m.admin = Some(u.admin);
    m.authorized = Some(u.authorized);
    m.groups = Some([]);
    m.roles = Some(if u.admin { &["admin", "user"] } else { &["user"] });
    m.created = Some(iso(u.created));
    m.last_activity = Skip(Some(u.last_activity.map(iso)));
    m.server = Skip(Some(default.filter(|s| s.state == ServerState::Running).map(|s| server_url(base, &s.user, ""))));
    m.pending = Skip(Some(default.and_then(|s| s.state.pending())));
    m.auth_state = Skip(Some(None));
    m.user_info = Skip(Some(None));
    if scopes.allows("read:servers", target) {
        m.servers = Some(servers_of());
    }
    m
}

/// `servers` (sorted by user, as the store returns them) split by user, so a
/// list of users looks up each one's without a scan of all.
pub fn servers_by_user(servers: &[Server]) -> std::collections::HashMap<&str, &[Server]> {
    let mut out = std::collections::HashMap::new();
    for chunk in servers.chunk_by(|a, b| a.user == b.user) {
        out.insert(chunk[0].user.as_str(), chunk);
    }
    out
}

/// The user model, filtered by what `scopes` may read.
pub fn user_model(base: &str, u: &User, servers: &[Server], scopes: &ScopeSet, cull: &CullStatuses) -> Value {
    serde_json::to_value(user_model_typed(base, u, servers, scopes, cull)).unwrap_or(Value::Null)
}

pub fn token_model(t: &Token, owner: &berth_store::User) -> Value {
    let expanded = berth_hub::identity::token_scopes(t, owner).to_strings();
    json!({
        "user": t.user,
        "id": t.id,
        "kind": "api_token",
        "roles": [],
        "scopes": expanded,
        "created": iso(t.created),
        "last_activity": iso_opt(t.last_activity),
        "expires_at": iso_opt(t.expires_at),
        "note": t.note,
        "session_id": t.session_id,
        "oauth_client": t.oauth_client.clone().unwrap_or_else(|| "JupyterHub".into()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso_round_trip() {
        let s = iso(1_700_000_000_123);
        assert_eq!(s, "2023-11-14T22:13:20.123Z");
        assert_eq!(parse_iso(&s), Some(1_700_000_000_123));
        assert_eq!(parse_iso("2026-11-22T06:12:46.254673Z"), Some(1_795_327_966_254));
        assert_eq!(parse_iso("2026-11-22T06:12:46.254673"), Some(1_795_327_966_254));
        assert_eq!(parse_iso("yesterday"), None);
    }
}
