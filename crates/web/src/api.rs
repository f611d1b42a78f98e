//! The REST API under `<base>hub/api`, in JupyterHub's shapes.

use axum::body::Bytes;
use axum::extract::{FromRequest, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use berth_core::{Target, UserName};
use berth_store::{NewUser, StateFilter, UserQuery};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::caller::{ApiCaller, Caller};
use crate::error::{ApiError, ApiResult};
use crate::model::{token_model, user_model};
use crate::tokens::{create_token, TokenRequest};
use crate::SharedHub;

pub fn router() -> Router<SharedHub> {
    Router::new()
        .route("/", get(version))
        .route("/user", get(whoami))
        .route("/users", get(list_users).post(create_users))
        .route("/users/{name}", get(get_user).post(create_user).patch(patch_user).delete(delete_user))
        .route("/users/{name}/tokens", get(list_tokens).post(post_token))
        .route("/users/{name}/keys", get(crate::keys::api_list).post(crate::keys::api_add))
        .route("/users/{name}/limits", get(get_limits).put(put_limits))
        .route("/users/{name}/keys/{key}", axum::routing::delete(crate::keys::api_delete))
        .route("/users/{name}/tokens/{id}", get(get_token).delete(delete_token))
        .route("/users/{name}/server", post(crate::spawn::api_start_default).delete(crate::spawn::api_stop_default))
        .route("/users/{name}/server/progress", get(crate::spawn::api_progress_default))
        .route(
            "/users/{name}/servers/{server}",
            post(crate::spawn::api_start_named).delete(crate::spawn::api_stop_named),
        )
        .route("/users/{name}/servers/{server}/progress", get(crate::spawn::api_progress_named))
        .route("/users/{name}/activity", post(crate::spawn::api_activity))
        .route("/gpus", get(gpus))
        .route("/oauth2/authorize", get(crate::oauth::authorize))
        .route("/oauth2/token", post(crate::oauth::token))
        .fallback(not_found)
}

/// A JSON body. Parsed whatever the `Content-Type` (JupyterHub's own
/// clients send JSON as text/plain); an empty body reads as `{}`.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            let status = e.status();
            if status == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(status, "request body is larger than the hub accepts (hub.max_body_bytes)")
            } else {
                ApiError::new(status, e.body_text())
            }
        })?;
        let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) { b"{}" } else { &bytes };
        serde_json::from_slice(bytes)
            .map(JsonBody)
            .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
    }
}

pub async fn not_found(uri: Uri) -> ApiError {
    ApiError::not_found(format!("no such page: {}", uri.path()))
}

pub async fn version() -> Json<Value> {
    Json(json!({"version": berth_core::JUPYTERHUB_API_VERSION, "berth": berth_core::VERSION}))
}

async fn whoami(State(hub): State<SharedHub>, ApiCaller(c): ApiCaller) -> ApiResult<Json<Value>> {
    let servers = hub.store.servers_of(std::slice::from_ref(&c.user.name)).await?;
    let mut m = user_model(&hub.cfg.base_url, &c.user, &servers, &c.scopes);
    // Identity questions about oneself are always answered with the name.
    m["name"] = json!(c.user.name);
    m["kind"] = json!("user");
    m["scopes"] = json!(c.scopes.to_strings());
    let (token_id, session_id) = match &c.via {
        crate::caller::Via::Token { id, session_id, .. } => (Some(id.clone()), session_id.clone()),
        crate::caller::Via::Session { public_id, .. } => (None, Some(public_id.clone())),
    };
    m["token_id"] = json!(token_id);
    m["session_id"] = json!(session_id);
    if c.scopes.allows("read:users:groups", Target::User(&c.user.name)) && m.get("groups").is_none() {
        m["groups"] = json!([]);
    }
    Ok(Json(m))
}

#[derive(Deserialize, Default)]
struct ListParams {
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

async fn list_users(
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
    let items: Vec<crate::model::UserModel> =
        users.iter().map(|u| crate::model::user_model_typed(&hub.cfg.base_url, u, &servers, &c.scopes)).collect();
    if !paginated {
        return Ok(Json(items).into_response());
    }
    let next = (offset + limit < total).then(|| {
        let mut url = format!("{}api/users?offset={}&limit={}", hub.hub_prefix(), offset + limit, limit);
        if let Some(s) = &p.state {
            url.push_str(&format!("&state={s}"));
        }
        if let Some(n) = &p.name_filter {
            url.push_str(&format!("&name_filter={n}"));
        }
        json!({"offset": offset + limit, "limit": limit, "url": url})
    });
    #[derive(serde::Serialize)]
    struct Page {
        items: Vec<crate::model::UserModel>,
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
    for n in &names {
        if let Some(u) = hub.store.get_user(n).await? {
            items.push(user_model(&hub.cfg.base_url, &u, &servers, &c.scopes));
        }
    }
    Ok(Json(Value::Array(items)))
}

/// The user called `name`, or 404.
pub(crate) async fn existing_user(hub: &SharedHub, name: &str) -> ApiResult<berth_store::User> {
    hub.store.get_user(name).await?.ok_or_else(|| ApiError::not_found(format!("No such user: {name}")))
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

async fn get_user(
    State(hub): State<SharedHub>,
    ApiCaller(c): ApiCaller,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    let u = visible_user(&hub, &c, &name, "read:users").await?;
    let servers = hub.store.servers_of(std::slice::from_ref(&u.name)).await?;
    Ok(Json(user_model(&hub.cfg.base_url, &u, &servers, &c.scopes)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateUsers {
    usernames: Vec<String>,
    #[serde(default)]
    admin: bool,
}

async fn create_users(
    State(hub): State<SharedHub>,
    ApiCaller(c): ApiCaller,
    JsonBody(body): JsonBody<CreateUsers>,
) -> ApiResult<Response> {
    c.require("admin:users", Target::Hub)?;
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
    let mut created = Vec::new();
    for n in &names {
        if hub.store.get_user(n.as_str()).await?.is_some() {
            continue;
        }
        let new = NewUser { name: n.to_string(), admin: body.admin, authorized: true, password_hash: None };
        match hub.store.create_user(&new).await {
            Ok(u) => created.push(u),
            Err(berth_store::StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    if created.is_empty() {
        return Err(ApiError::conflict(format!("All {} users already exist", names.len())));
    }
    for u in &created {
        let _ = hub.store.add_event(c.name(), "user-create", &u.name, "api").await;
    }
    let models: Vec<Value> = created.iter().map(|u| user_model(&hub.cfg.base_url, u, &[], &c.scopes)).collect();
    Ok((StatusCode::CREATED, Json(Value::Array(models))).into_response())
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct CreateUser {
    #[serde(default)]
    admin: bool,
}

async fn create_user(
    State(hub): State<SharedHub>,
    ApiCaller(c): ApiCaller,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<CreateUser>,
) -> ApiResult<Response> {
    c.require("admin:users", Target::Hub)?;
    let n = UserName::normalize(&name)?;
    let new = NewUser { name: n.to_string(), admin: body.admin, authorized: true, password_hash: None };
    let u = hub.store.create_user(&new).await.map_err(|e| match e {
        berth_store::StoreError::Conflict { .. } => ApiError::conflict(format!("User {n} already exists")),
        other => other.into(),
    })?;
    let _ = hub.store.add_event(c.name(), "user-create", &u.name, "api").await;
    Ok((StatusCode::CREATED, Json(user_model(&hub.cfg.base_url, &u, &[], &c.scopes))).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PatchUser {
    name: Option<String>,
    admin: Option<bool>,
    authorized: Option<bool>,
}

async fn patch_user(
    State(hub): State<SharedHub>,
    ApiCaller(c): ApiCaller,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<PatchUser>,
) -> ApiResult<Json<Value>> {
    c.require("admin:users", Target::User(&name))?;
    let mut current = existing_user(&hub, &name).await?;
    if let Some(admin) = body.admin {
        if !admin && name == c.name() && current.admin {
            return Err(ApiError::bad_request("you cannot remove your own admin rights; ask another admin"));
        }
        hub.store.set_admin(&name, admin).await?;
    }
    if let Some(auth) = body.authorized {
        if !auth && name == c.name() {
            return Err(ApiError::bad_request("you cannot unauthorize yourself"));
        }
        hub.store.set_authorized(&name, auth).await?;
        if !auth {
            hub.store.revoke_user_sessions(&name).await?;
        }
    }
    if let Some(new_name) = &body.name {
        let n = UserName::normalize(new_name)?;
        if n.as_str() != name {
            if hub.store.count_active_servers_of(&name).await? > 0 {
                return Err(ApiError::bad_request(format!("stop {name}'s servers before renaming")));
            }
            hub.store.rename_user(&name, n.as_str()).await.map_err(|e| match e {
                berth_store::StoreError::Conflict { .. } => ApiError::conflict(format!("User {n} already exists")),
                other => other.into(),
            })?;
        }
        current.name = n.to_string();
    }
    let _ = hub.store.add_event(c.name(), "user-update", &current.name, "api").await;
    let u = hub.store.get_user(&current.name).await?.ok_or_else(|| ApiError::not_found("user vanished"))?;
    let servers = hub.store.servers_of(std::slice::from_ref(&u.name)).await?;
    Ok(Json(user_model(&hub.cfg.base_url, &u, &servers, &c.scopes)))
}

/// `GET /hub/api/gpus` (admins): the inventory, shared flags and holders.
async fn gpus(State(hub): State<SharedHub>, ApiCaller(c): ApiCaller) -> ApiResult<Json<Value>> {
    c.require("admin:servers", Target::Hub)?;
    let report = hub.servers.gpu_report().await?;
    Ok(Json(json!({"mode": hub.servers.gpu_cfg.mode, "gpus": report})))
}

#[derive(Deserialize, Default)]
struct DeleteParams {
    #[serde(default)]
    remove_volumes: Option<String>,
}

async fn delete_user(
    State(hub): State<SharedHub>,
    ApiCaller(c): ApiCaller,
    Path(name): Path<String>,
    Query(q): Query<DeleteParams>,
) -> ApiResult<StatusCode> {
    c.require("delete:users", Target::User(&name))?;
    if name == c.name() {
        return Err(ApiError::bad_request("Cannot delete yourself!"));
    }
    if hub.store.get_user(&name).await?.is_none() {
        return Err(ApiError::not_found(format!("No such user: {name}")));
    }
    hub.servers.stop_all_of(&name).await;
    hub.store.delete_user(&name).await?;
    let _ = hub.store.add_event(c.name(), "user-delete", &name, "api").await;
    if q.remove_volumes.as_deref().is_some_and(|v| matches!(v, "1" | "true" | "yes")) {
        hub.servers.remove_user_data(&name).await.map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("{name} was deleted, but removing their volumes failed: {e}"),
            )
        })?;
        let _ = hub.store.add_event(c.name(), "volumes-remove", &name, "api").await;
    }
    Ok(StatusCode::NO_CONTENT)
}

async fn list_tokens(
    State(hub): State<SharedHub>,
    ApiCaller(c): ApiCaller,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    c.require("read:tokens", Target::User(&name))?;
    let owner = existing_user(&hub, &name).await?;
    let tokens = hub.store.list_tokens(&name).await?;
    let models: Vec<Value> = tokens.iter().map(|t| token_model(t, &owner)).collect();
    Ok(Json(json!({"api_tokens": models})))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct PostToken {
    #[serde(default)]
    note: Option<String>,
    #[serde(default)]
    expires_in: Option<i64>,
    #[serde(default)]
    scopes: Option<Vec<String>>,
    /// JupyterHub ≤ 2 clients send roles; only the default is understood.
    #[serde(default)]
    roles: Option<Vec<String>>,
}

async fn post_token(
    State(hub): State<SharedHub>,
    ApiCaller(c): ApiCaller,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<PostToken>,
) -> ApiResult<Response> {
    c.require("tokens", Target::User(&name))?;
    if body.roles.as_ref().is_some_and(|r| !r.is_empty()) {
        return Err(ApiError::bad_request("roles are not supported on tokens; request scopes instead"));
    }
    let owner = existing_user(&hub, &name).await?;
    let note = body.note.unwrap_or_else(|| {
        if c.name() == name {
            "Requested via api".into()
        } else {
            format!("Requested via api by user {}", c.name())
        }
    });
    let (token, secret) =
        create_token(&hub, &c, &owner, TokenRequest { note, expires_in: body.expires_in, scopes: body.scopes }).await?;
    let mut m = token_model(&token, &owner);
    m["token"] = json!(secret);
    Ok((StatusCode::CREATED, Json(m)).into_response())
}

async fn get_token(
    State(hub): State<SharedHub>,
    ApiCaller(c): ApiCaller,
    Path((name, id)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    c.require("read:tokens", Target::User(&name))?;
    let owner = existing_user(&hub, &name).await?;
    let t =
        hub.store.get_token(&name, &id).await?.ok_or_else(|| ApiError::not_found(format!("No such token: {id}")))?;
    Ok(Json(token_model(&t, &owner)))
}

async fn delete_token(
    State(hub): State<SharedHub>,
    ApiCaller(c): ApiCaller,
    Path((name, id)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    c.require("tokens", Target::User(&name))?;
    hub.store.delete_token(&name, &id).await.map_err(|e| match e {
        berth_store::StoreError::NotFound { .. } => ApiError::not_found(format!("No such token: {id}")),
        other => other.into(),
    })?;
    let _ = hub.store.add_event(c.name(), "token-revoke", &name, &id).await;
    Ok(StatusCode::NO_CONTENT)
}

/// Per-user limits an admin sets: `{"max_named_servers": 2, "templates": ["comfyui"]}`;
/// `null` falls back to the hub-wide setting.
async fn get_limits(
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
    })))
}

async fn put_limits(
    State(hub): State<SharedHub>,
    ApiCaller(c): ApiCaller,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<berth_store::UserLimits>,
) -> ApiResult<Json<Value>> {
    c.require("admin:users", Target::User(&name))?;
    if let Some(ts) = &body.templates {
        if let Some(bad) = ts.iter().find(|t| hub.servers.apps.get(t).is_none()) {
            return Err(ApiError::bad_request(format!("no template {bad:?} on this hub")));
        }
    }
    hub.store.set_user_limits(&name, &body).await.map_err(|e| match e {
        berth_store::StoreError::NotFound { .. } => ApiError::not_found(format!("No such user: {name}")),
        other => other.into(),
    })?;
    let _ = hub.store.add_event(c.name(), "limits", &name, &serde_json::to_string(&body).unwrap_or_default()).await;
    Ok(Json(json!({"max_named_servers": body.max_named_servers, "templates": body.templates})))
}
