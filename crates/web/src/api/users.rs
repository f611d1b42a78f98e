//! Users: who am I, the user list (paginated as JupyterHub's), one user,
//! creating, changing and deleting accounts (through the hub's account
//! rules), and per-user limits.

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use berth_core::{Target, UserName};
use berth_hub::{Actor, Caller, Via};
use berth_store::{StateFilter, UserQuery};
use serde::Deserialize;
use serde_json::{json, Value};

use super::existing_user;
use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiCaller, JsonBody};
use crate::model::{servers_by_user, user_model, user_model_typed, UserModel};
use crate::SharedHub;

pub(super) async fn whoami(State(hub): State<SharedHub>, ApiCaller(c): ApiCaller) -> ApiResult<Json<Value>> {
    let servers = hub.store.servers_of(std::slice::from_ref(&c.user.name)).await?;
    let cull = hub.servers.culler.statuses_of(std::slice::from_ref(&c.user.name));
    let mut m = user_model(&hub.cfg.base_url, &c.user, &servers, &c.scopes, &cull);
    // Identity questions about oneself are always answered with the name.
    m["name"] = json!(c.user.name);
    m["kind"] = json!("user");
    m["scopes"] = json!(c.scopes.to_strings());
    let (token_id, session_id) = match &c.via {
        Via::Token { id, session_id, .. } => (Some(id.clone()), session_id.clone()),
        Via::Session { public_id, .. } => (None, Some(public_id.clone())),
        Via::AppHost { .. } => (None, None),
    };
    m["token_id"] = json!(token_id);
    m["session_id"] = json!(session_id);
    if c.scopes.allows("read:users:groups", Target::User(&c.user.name)) && m.get("groups").is_none() {
        m["groups"] = json!([]);
    }
    Ok(Json(m))
}

#[derive(Deserialize, Default)]
pub(super) struct ListParams {
    offset: Option<String>,
    limit: Option<String>,
    state: Option<String>,
    name_filter: Option<String>,
}

const DEFAULT_LIMIT: i64 = 50;
const MAX_LIMIT: i64 = 200;

fn parse_nonneg(name: &str, v: Option<&str>) -> ApiResult<Option<i64>> {
    match v {
        None | Some("") => Ok(None),
        Some(s) => s
            .parse::<i64>()
            .ok()
            .filter(|n| *n >= 0)
            .map(Some)
            .ok_or_else(|| ApiError::bad_request(format!("{name} must be a non-negative integer, not {s:?}"))),
    }
}

pub(super) async fn list_users(
    State(hub): State<SharedHub>,
    ApiCaller(c): ApiCaller,
    headers: HeaderMap,
    Query(p): Query<ListParams>,
) -> ApiResult<Response> {
    if !c.allows("list:users", Target::Hub) {
        return list_named_users(&hub, &c).await.map(IntoResponse::into_response);
    }
    let paginated = headers
        .get(axum::http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/jupyterhub-pagination+json"));
    let offset = parse_nonneg("offset", p.offset.as_deref())?.unwrap_or(0);
    let limit = parse_nonneg("limit", p.limit.as_deref())?
        .unwrap_or(if paginated { DEFAULT_LIMIT } else { MAX_LIMIT })
        .clamp(1, MAX_LIMIT);
    let state = match p.state.as_deref() {
        None | Some("") => StateFilter::Any,
        Some("ready") => StateFilter::Ready,
        Some("active") => StateFilter::Active,
        Some("inactive") => StateFilter::Inactive,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "unrecognized state filter: {other:?}; use ready, active or inactive"
            )))
        }
    };
    let q = UserQuery { name_prefix: p.name_filter.clone(), state, authorized: None, offset, limit };
    let (users, total) = hub.store.list_users(&q).await?;
    let names: Vec<String> = users.iter().map(|u| u.name.clone()).collect();
    let servers = hub.store.servers_of(&names).await?;
    let cull = hub.servers.culler.statuses_of(&names);
    let by_user = servers_by_user(&servers);
    let items: Vec<UserModel<'_>> = users
        .iter()
        .map(|u| {
            let theirs = by_user.get(u.name.as_str()).copied().unwrap_or_default();
            user_model_typed(&hub.cfg.base_url, u, theirs, &c.scopes, &cull)
        })
        .collect();
    if !paginated {
        return Ok(Json(items).into_response());
    }
    // A full URL, as JupyterHub sends (clients such as jupyterhub-idle-culler fetch it as it is).
    let origin = headers
        .get(axum::http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| !h.is_empty() && h.chars().all(|c| c.is_ascii_alphanumeric() || ".-:[]".contains(c)))
        .map(|h| format!("{}://{h}", if hub.cfg.secure_cookies { "https" } else { "http" }))
        .unwrap_or_default();
    let next = (offset + limit < total).then(|| {
        let mut url = format!("{origin}{}api/users?offset={}&limit={}", hub.hub_prefix(), offset + limit, limit);
        let enc = |v: &str| percent_encoding::utf8_percent_encode(v, percent_encoding::NON_ALPHANUMERIC).to_string();
        if let Some(s) = &p.state {
            url.push_str(&format!("&state={}", enc(s)));
        }
        if let Some(n) = &p.name_filter {
            url.push_str(&format!("&name_filter={}", enc(n)));
        }
        json!({"offset": offset + limit, "limit": limit, "url": url})
    });
    #[derive(serde::Serialize)]
    struct Page<'a> {
        items: Vec<UserModel<'a>>,
        _pagination: Value,
    }
    let page = Page { items, _pagination: json!({"offset": offset, "limit": limit, "total": total, "next": next}) };
    Ok(Json(page).into_response())
}

/// For callers whose `list:users` is limited to named users: those users.
async fn list_named_users(hub: &SharedHub, c: &Caller) -> ApiResult<Json<Value>> {
    let mut names: Vec<String> = c
        .scopes
        .iter()
        .filter(|s| s.name == "list:users")
        .filter_map(|s| match &s.filter {
            berth_core::scopes::Filter::User(u) => Some(u.clone()),
            _ => None,
        })
        .collect();
    if names.is_empty() {
        return Err(ApiError::forbidden("Action is not authorized with current scopes; requires any of [list:users]"));
    }
    names.sort();
    names.dedup();
    let mut items = Vec::new();
    let servers = hub.store.servers_of(&names).await?;
    let cull = hub.servers.culler.statuses_of(&names);
    for n in &names {
        if let Some(u) = hub.store.get_user(n).await? {
            items.push(user_model(&hub.cfg.base_url, &u, &servers, &c.scopes, &cull));
        }
    }
    Ok(Json(Value::Array(items)))
}

/// Looks up a user the caller may see: 403 before 404, so names do not leak.
async fn visible_user(hub: &SharedHub, c: &Caller, name: &str, scope: &str) -> ApiResult<berth_store::User> {
    if !c.allows(scope, Target::User(name)) && !c.allows("read:users:name", Target::User(name)) {
        return Err(ApiError::forbidden(format!(
            "Action is not authorized with current scopes; requires any of [{scope}]"
        )));
    }
    existing_user(hub, name).await
}

pub(super) async fn get_user(
    State(hub): State<SharedHub>,
    ApiCaller(c): ApiCaller,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    let u = visible_user(&hub, &c, &name, "read:users").await?;
    let servers = hub.store.servers_of(std::slice::from_ref(&u.name)).await?;
    let cull = hub.servers.culler.statuses_of(std::slice::from_ref(&u.name));
    Ok(Json(user_model(&hub.cfg.base_url, &u, &servers, &c.scopes, &cull)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CreateUsers {
    usernames: Vec<String>,
    #[serde(default)]
    admin: bool,
}

pub(super) async fn create_users(
    State(hub): State<SharedHub>,
    ApiCaller(c): ApiCaller,
    JsonBody(body): JsonBody<CreateUsers>,
) -> ApiResult<Response> {
    if body.usernames.is_empty() {
        return Err(ApiError::bad_request("usernames must be a non-empty list"));
    }
    if body.usernames.len() > 10_000 {
        return Err(ApiError::bad_request("at most 10000 users per request"));
    }
    let mut names = Vec::with_capacity(body.usernames.len());
    for raw in &body.usernames {
        names.push(UserName::normalize(raw)?);
    }
    let created = hub.create_users(&Actor::Caller(&c), &names, body.admin).await?;
    let models: Vec<Value> =
        created.iter().map(|u| user_model(&hub.cfg.base_url, u, &[], &c.scopes, &Default::default())).collect();
    Ok((StatusCode::CREATED, Json(Value::Array(models))).into_response())
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct CreateUser {
    #[serde(default)]
    admin: bool,
}

pub(super) async fn create_user(
    State(hub): State<SharedHub>,
    ApiCaller(c): ApiCaller,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<CreateUser>,
) -> ApiResult<Response> {
    let n = UserName::normalize(&name)?;
    let u = hub.create_user(&Actor::Caller(&c), &n, body.admin, None).await?;
    Ok((StatusCode::CREATED, Json(user_model(&hub.cfg.base_url, &u, &[], &c.scopes, &Default::default())))
        .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PatchUser {
    name: Option<String>,
    admin: Option<bool>,
    authorized: Option<bool>,
}

pub(super) async fn patch_user(
    State(hub): State<SharedHub>,
    ApiCaller(c): ApiCaller,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<PatchUser>,
) -> ApiResult<Json<Value>> {
    c.require("admin:users", Target::User(&name))?;
    let actor = Actor::Caller(&c);
    existing_user(&hub, &name).await?;
    if let Some(admin) = body.admin {
        hub.set_admin(&actor, &name, admin).await?;
    }
    if let Some(authorized) = body.authorized {
        hub.set_authorized(&actor, &name, authorized).await?;
    }
    let mut current = name.clone();
    if let Some(new_name) = &body.name {
        let n = UserName::normalize(new_name)?;
        hub.rename(&actor, &name, &n).await?;
        current = n.to_string();
    }
    let u = hub.store.get_user(&current).await?.ok_or_else(|| ApiError::not_found("user vanished"))?;
    let servers = hub.store.servers_of(std::slice::from_ref(&u.name)).await?;
    let cull = hub.servers.culler.statuses_of(std::slice::from_ref(&u.name));
    Ok(Json(user_model(&hub.cfg.base_url, &u, &servers, &c.scopes, &cull)))
}

#[derive(Deserialize, Default)]
pub(super) struct DeleteParams {
    #[serde(default)]
    remove_volumes: Option<String>,
}

pub(super) async fn delete_user(
    State(hub): State<SharedHub>,
    ApiCaller(c): ApiCaller,
    Path(name): Path<String>,
    Query(q): Query<DeleteParams>,
) -> ApiResult<StatusCode> {
    let remove = q.remove_volumes.as_deref().is_some_and(|v| matches!(v, "1" | "true" | "yes"));
    hub.delete_user(&Actor::Caller(&c), &name, remove).await.map_err(|e| match e {
        berth_hub::HubError::Spawner { message } => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("{name} was deleted, but removing their volumes failed: {message}"),
        ),
        other => other.into(),
    })?;
    Ok(StatusCode::NO_CONTENT)
}

/// Per-user limits an admin sets: `{"max_named_servers": 2, "templates": ["comfyui"],
/// "gpu_hours_per_period": 10}`; `null` (or leaving a field out) falls back to the
/// hub-wide setting; a GPU-hour limit of 0 means unlimited.
pub(super) async fn get_limits(
    State(hub): State<SharedHub>,
    ApiCaller(c): ApiCaller,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    c.require("read:users", Target::User(&name))?;
    existing_user(&hub, &name).await?;
    let l = hub.store.user_limits(&name).await?;
    Ok(Json(json!({
        "max_named_servers": l.max_named_servers,
        "templates": l.templates,
        "effective_max_named_servers": l.max_named_servers.unwrap_or(hub.servers.cfg.max_named_servers),
        "gpu_hours_per_period": l.gpu_hours_per_period,
        "effective_gpu_hours_per_period": hub.servers.usage.quota_of(&name).await?.map(|(q, _)| q),
        "period": hub.servers.usage.period,
    })))
}

pub(super) async fn put_limits(
    State(hub): State<SharedHub>,
    ApiCaller(c): ApiCaller,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<berth_store::UserLimits>,
) -> ApiResult<Json<Value>> {
    hub.set_user_limits(&c, &name, &body).await?;
    Ok(Json(json!({
        "max_named_servers": body.max_named_servers,
        "templates": body.templates,
        "gpu_hours_per_period": body.gpu_hours_per_period,
    })))
}
