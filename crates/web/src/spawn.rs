//! Starting, stopping and watching servers: the pages, the REST endpoints
//! (`/hub/api/users/<name>/server[s/<server>]`), the progress event stream,
//! the activity endpoint, and what a stopped server's URL answers.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use axum::Json;
use berth_core::{ServerName, ServerState, Target, UserName};
use futures_util::stream::{self, Stream, StreamExt};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::api::JsonBody;
use crate::caller::{ApiCaller, Caller, MaybeUser, PageUser};
use crate::error::{ApiError, ApiResult};
use crate::html::{self, alert, esc, xsrf_input, Level, Viewer};
use crate::model::{iso, parse_iso, progress_url, server_url};
use crate::servers::{ProgressLog, StartError};
use crate::SharedHub;

impl From<StartError> for ApiError {
    fn from(e: StartError) -> ApiError {
        match e {
            StartError::Refused(m) | StartError::AlreadyRunning(m) | StartError::PendingSpawn(m) => {
                ApiError::bad_request(m)
            }
            StartError::NoGpus { public, .. } => ApiError::new(StatusCode::CONFLICT, public),
            StartError::Limit(m) => ApiError::new(StatusCode::TOO_MANY_REQUESTS, m),
            StartError::NotFound(m) => ApiError::not_found(m),
            StartError::Invalid(m) => ApiError::bad_request(m),
            StartError::Store(s) => s.into(),
        }
    }
}

/// A start error as `caller` may see it: admins learn who holds the GPUs.
fn start_error(e: StartError, caller: &Caller) -> ApiError {
    match e {
        StartError::NoGpus { detail, .. } if caller.user.admin => ApiError::new(StatusCode::CONFLICT, detail),
        other => other.into(),
    }
}

/// How long a start or stop request waits before answering 202 instead of 201/204.
const SLOW: Duration = Duration::from_secs(10);

fn viewer(u: &PageUser) -> Viewer<'_> {
    Viewer { name: u.caller.name(), admin: u.caller.user.admin, xsrf: &u.xsrf }
}

fn names(user: &str, server: &str) -> ApiResult<(UserName, ServerName)> {
    Ok((UserName::parse(user)?, ServerName::parse(server)?))
}

fn pending_path(hub: &SharedHub, user: &str, server: &str) -> String {
    if server.is_empty() {
        format!("{}spawn-pending/{user}", hub.hub_prefix())
    } else {
        format!("{}spawn-pending/{user}/{server}", hub.hub_prefix())
    }
}

// -------------------------------------------------------------------- API

async fn api_start(hub: &SharedHub, c: &Caller, user: &str, server: &str, options: Value) -> ApiResult<Response> {
    names(user, server)?;
    c.require("servers", Target::Server { user, server })?;
    if !options.is_object() {
        return Err(ApiError::bad_request("the body must be a JSON object of user options"));
    }
    hub.servers.start(user, server, options).await.map_err(|e| start_error(e, c))?;
    // Wait a little, as JupyterHub does, so fast servers answer 201.
    let deadline = tokio::time::Instant::now() + SLOW;
    while tokio::time::Instant::now() < deadline {
        match hub.store.get_server(user, server).await? {
            Some(s) if s.state == ServerState::Running => return Ok(StatusCode::CREATED.into_response()),
            Some(s) if s.state == ServerState::Stopped => {
                let msg = s.last_error.unwrap_or_else(|| "the server stopped".into());
                return Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("Spawn failed: {msg}")));
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    Ok(StatusCode::ACCEPTED.into_response())
}

async fn api_stop(hub: &SharedHub, c: &Caller, user: &str, server: &str, remove: bool) -> ApiResult<StatusCode> {
    names(user, server)?;
    let target = Target::Server { user, server };
    if !(c.allows("delete:servers", target) || c.allows("servers", target)) {
        return Err(ApiError::forbidden(
            "Action is not authorized with current scopes; requires any of [delete:servers]",
        ));
    }
    let done = match hub.store.get_server(user, server).await? {
        None if hub.store.get_user(user).await?.is_none() => {
            return Err(ApiError::not_found(format!("No such user: {user}")))
        }
        None => return Err(ApiError::not_found(format!("{user} has no server named {server:?}"))),
        Some(_) => hub.servers.stop(user, server, SLOW).await?,
    };
    if remove && !server.is_empty() {
        if !done {
            return Err(ApiError::bad_request("the server is still stopping; remove it once it has stopped"));
        }
        hub.servers.remove(user, server).await?;
    }
    Ok(if done { StatusCode::NO_CONTENT } else { StatusCode::ACCEPTED })
}

pub async fn api_start_default(
    State(hub): State<SharedHub>,
    ApiCaller(c): ApiCaller,
    Path(user): Path<String>,
    JsonBody(options): JsonBody<Value>,
) -> ApiResult<Response> {
    api_start(&hub, &c, &user, "", options).await
}

pub async fn api_start_named(
    State(hub): State<SharedHub>,
    ApiCaller(c): ApiCaller,
    Path((user, server)): Path<(String, String)>,
    JsonBody(options): JsonBody<Value>,
) -> ApiResult<Response> {
    if server.is_empty() {
        return Err(ApiError::bad_request("a named server needs a name"));
    }
    api_start(&hub, &c, &user, &server, options).await
}

#[derive(Deserialize, Default)]
pub struct StopBody {
    #[serde(default)]
    remove: bool,
}

pub async fn api_stop_default(
    State(hub): State<SharedHub>,
    ApiCaller(c): ApiCaller,
    Path(user): Path<String>,
) -> ApiResult<StatusCode> {
    api_stop(&hub, &c, &user, "", false).await
}

pub async fn api_stop_named(
    State(hub): State<SharedHub>,
    ApiCaller(c): ApiCaller,
    Path((user, server)): Path<(String, String)>,
    JsonBody(body): JsonBody<StopBody>,
) -> ApiResult<StatusCode> {
    api_stop(&hub, &c, &user, &server, body.remove).await
}

fn sse_stream(
    hub: &SharedHub,
    user: &str,
    server: &str,
) -> impl Stream<Item = Result<Event, Infallible>> + Send + 'static {
    let log = hub.servers.progress_log(user, server);
    let (past, rx) = match &log {
        Some(l) => {
            let (p, r) = l.subscribe();
            (p, Some(r))
        }
        None => (Vec::new(), None),
    };
    let finished = past.iter().any(ProgressLog::is_finished);
    let replay = stream::iter(past.into_iter().map(|v| Ok(Event::default().data(v.to_string()))));
    let live = match (rx, finished) {
        (Some(rx), false) => tokio_stream_from(rx).boxed(),
        _ => stream::empty().boxed(),
    };
    replay.chain(live)
}

/// Turns a broadcast receiver into a stream that ends after the final event.
fn tokio_stream_from(
    rx: tokio::sync::broadcast::Receiver<Value>,
) -> impl Stream<Item = Result<Event, Infallible>> + Send {
    stream::unfold((rx, false), |(mut rx, done)| async move {
        if done {
            return None;
        }
        loop {
            match rx.recv().await {
                Ok(v) => {
                    let fin = ProgressLog::is_finished(&v);
                    return Some((Ok(Event::default().data(v.to_string())), (rx, fin)));
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(_) => return None,
            }
        }
    })
}

async fn progress(hub: SharedHub, c: Caller, user: String, server: String) -> ApiResult<Response> {
    names(&user, &server)?;
    c.require("read:servers", Target::Server { user: &user, server: &server })?;
    let record = hub.store.get_server(&user, &server).await?;
    let stream = sse_stream(&hub, &user, &server);
    // A server that is already running but whose log is gone (restart): say ready.
    let tail: Vec<Result<Event, Infallible>> = match (&record, hub.servers.progress_log(&user, &server)) {
        (Some(r), None) if r.state == ServerState::Running => {
            let url = server_url(&hub.cfg.base_url, &user, &server);
            vec![Ok(Event::default().data(
                json!({"progress": 100, "ready": true, "message": format!("Server ready at {url}"), "url": url})
                    .to_string(),
            ))]
        }
        (Some(r), None) if r.state == ServerState::Stopped && r.last_error.is_some() => {
            let msg = format!("Spawn failed: {}", r.last_error.clone().unwrap_or_default());
            vec![Ok(Event::default().data(json!({"progress": 100, "failed": true, "message": msg}).to_string()))]
        }
        _ => Vec::new(),
    };
    let sse = Sse::new(stream.chain(stream::iter(tail))).keep_alive(KeepAlive::new().interval(Duration::from_secs(8)));
    let mut resp = sse.into_response();
    resp.headers_mut().insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-cache"));
    resp.headers_mut().insert("x-accel-buffering", header::HeaderValue::from_static("no"));
    Ok(resp)
}

pub async fn api_progress_default(
    State(hub): State<SharedHub>,
    ApiCaller(c): ApiCaller,
    Path(user): Path<String>,
) -> ApiResult<Response> {
    progress(hub, c, user, String::new()).await
}

pub async fn api_progress_named(
    State(hub): State<SharedHub>,
    ApiCaller(c): ApiCaller,
    Path((user, server)): Path<(String, String)>,
) -> ApiResult<Response> {
    progress(hub, c, user, server).await
}

#[derive(Deserialize)]
pub struct ActivityBody {
    last_activity: Option<String>,
    servers: Option<serde_json::Map<String, Value>>,
}

/// `POST /hub/api/users/<name>/activity`, as the single-user server sends it.
pub async fn api_activity(
    State(hub): State<SharedHub>,
    ApiCaller(c): ApiCaller,
    Path(user): Path<String>,
    JsonBody(body): JsonBody<ActivityBody>,
) -> ApiResult<StatusCode> {
    c.require("users:activity", Target::User(&user))?;
    if hub.store.get_user(&user).await?.is_none() {
        return Err(ApiError::not_found(format!("No such user: {user}")));
    }
    if body.last_activity.is_none() && body.servers.is_none() {
        return Err(ApiError::bad_request("body has no activity: send last_activity or servers"));
    }
    let now = berth_store::now_ms();
    let check = |raw: &str| -> ApiResult<i64> {
        let t = parse_iso(raw).ok_or_else(|| ApiError::bad_request(format!("invalid timestamp {raw:?}")))?;
        if t > now + 59 * 60 * 1000 {
            return Err(ApiError::bad_request(format!("timestamp {raw} is in the future")));
        }
        Ok(t)
    };
    let mut updates = Vec::new();
    if let Some(servers) = &body.servers {
        for (name, v) in servers {
            let Some(raw) = v.get("last_activity").and_then(|t| t.as_str()) else {
                return Err(ApiError::bad_request(format!("server {name:?} has no last_activity")));
            };
            let t = check(raw)?;
            if hub.store.get_server(&user, name).await?.is_none() {
                return Err(ApiError::bad_request(format!("No such server {name:?} for {user}")));
            }
            updates.push((name.clone(), t));
        }
    }
    if let Some(raw) = &body.last_activity {
        let t = check(raw)?;
        hub.activity.user(&user, t);
    }
    for (name, t) in updates {
        hub.activity.server(&user, &name, t);
    }
    Ok(StatusCode::OK)
}

// ------------------------------------------------------------------- pages

/// The state of one server, as the home page shows it.
fn server_card(hub: &SharedHub, xsrf: &str, user: &str, s: Option<&berth_store::Server>, name: &str) -> String {
    let p = hub.hub_prefix();
    let url = server_url(&hub.cfg.base_url, user, name);
    let path = if name.is_empty() { user.to_string() } else { format!("{user}/{name}") };
    let label =
        if name.is_empty() { "Default server".to_string() } else { format!("Server <code>{}</code>", esc(name)) };
    let x = xsrf_input(xsrf);
    let state = s.map(|s| s.state).unwrap_or(ServerState::Stopped);
    let (badge, actions) = match state {
        ServerState::Running => (
            r#"<span class="badge ok">running</span>"#,
            format!(
                r#"<a class="button" href="{url}" id="open-{n}">Open</a> <form method="post" action="{p}stop/{path}" style="display:inline">{x}<button class="secondary" type="submit" id="stop-{n}">Stop</button></form>"#,
                n = esc(name)
            ),
        ),
        ServerState::Starting => (
            r#"<span class="badge warn">starting</span>"#,
            format!(r#"<a class="button" href="{}">Show progress</a>"#, pending_path(hub, user, name)),
        ),
        ServerState::Stopping => (r#"<span class="badge warn">stopping</span>"#, String::new()),
        ServerState::Stopped => (
            r#"<span class="badge">stopped</span>"#,
            format!(
                r#"<form method="post" action="{p}spawn/{path}" style="display:inline">{x}<button type="submit" id="start-{n}">Start</button></form>"#,
                n = esc(name)
            ),
        ),
    };
    let error = s
        .and_then(|s| s.last_error.as_deref())
        .filter(|_| state == ServerState::Stopped)
        .map(|e| alert(Level::Danger, &format!("Last start failed: {e}")))
        .unwrap_or_default();
    let started = s
        .and_then(|s| s.started)
        .filter(|_| state.is_active())
        .map(|t| format!(" since {}", iso(t).get(..16).unwrap_or("").replace('T', " ")))
        .unwrap_or_default();
    format!(
        r#"<div class="card" id="server-{n}"><h2>{label} {badge}</h2><p class="muted"><code>{url}</code>{started} · <a href="{p}logs/{path}">log</a></p>{error}<p>{actions}</p></div>"#,
        n = esc(name),
        url = esc(&url),
    )
}

pub async fn home_servers(hub: &SharedHub, user: &PageUser) -> ApiResult<String> {
    let name = user.caller.name();
    let servers = hub.store.list_servers(Some(name)).await?;
    let mut out = server_card(hub, &user.xsrf, name, servers.iter().find(|s| s.name.is_empty()), "");
    for s in servers.iter().filter(|s| !s.name.is_empty()) {
        out.push_str(&server_card(hub, &user.xsrf, name, Some(s), &s.name));
    }
    if hub.servers.cfg.max_named_servers > 0 {
        out.push_str(&format!(
            r#"<div class="card"><h2>New named server</h2><form method="post" action="{p}spawn-named">{x}
<label for="server_name">Name</label><input type="text" id="server_name" name="server_name" placeholder="e.g. lab2" required>
<p class="muted">Up to {max} named servers besides the default one.</p><p><button type="submit">Start</button></p></form></div>"#,
            p = hub.hub_prefix(),
            x = xsrf_input(&user.xsrf),
            max = hub.servers.cfg.max_named_servers,
        ));
    }
    Ok(out)
}

fn may_manage(c: &Caller, user: &str, server: &str) -> ApiResult<()> {
    if c.allows("servers", Target::Server { user, server }) {
        Ok(())
    } else {
        Err(ApiError::forbidden(format!("you may not manage {user}'s servers")).page())
    }
}

async fn spawn_form(hub: SharedHub, user: PageUser, owner: String, server: String) -> ApiResult<Response> {
    names(&owner, &server).map_err(ApiError::page)?;
    may_manage(&user.caller, &owner, &server)?;
    if let Some(s) = hub.store.get_server(&owner, &server).await? {
        match s.state {
            ServerState::Running => {
                return Ok(Redirect::to(&server_url(&hub.cfg.base_url, &owner, &server)).into_response())
            }
            ServerState::Starting => return Ok(Redirect::to(&pending_path(&hub, &owner, &server)).into_response()),
            _ => {}
        }
    }
    let path = if server.is_empty() { owner.clone() } else { format!("{owner}/{server}") };
    let body = format!(
        r#"<div class="card"><h1>Start {what}</h1><form method="post" action="{p}spawn/{path}">{x}<button type="submit" id="start">Start</button></form></div>"#,
        what = esc(&path),
        p = hub.hub_prefix(),
        x = xsrf_input(&user.xsrf),
    );
    Ok(html::page(&hub.cfg.base_url, "Start", Some(&viewer(&user)), &body).into_response())
}

pub async fn spawn_page(State(hub): State<SharedHub>, user: PageUser) -> ApiResult<Response> {
    let me = user.caller.name().to_string();
    spawn_form(hub, user, me, String::new()).await
}
pub async fn spawn_page_user(
    State(hub): State<SharedHub>,
    user: PageUser,
    Path(owner): Path<String>,
) -> ApiResult<Response> {
    spawn_form(hub, user, owner, String::new()).await
}
pub async fn spawn_page_named(
    State(hub): State<SharedHub>,
    user: PageUser,
    Path((owner, server)): Path<(String, String)>,
) -> ApiResult<Response> {
    spawn_form(hub, user, owner, server).await
}

async fn do_spawn(hub: SharedHub, user: PageUser, owner: String, server: String) -> ApiResult<Response> {
    do_spawn_with(hub, user, owner, server, json!({})).await
}

/// Where a running server is reached: its own host in `host` mode, else its path.
pub async fn public_url(hub: &SharedHub, owner: &str, server: &str) -> String {
    match hub.store.get_server(owner, server).await {
        Ok(Some(r)) => {
            r.url.filter(|u| u.starts_with("http")).unwrap_or_else(|| server_url(&hub.cfg.base_url, owner, server))
        }
        _ => server_url(&hub.cfg.base_url, owner, server),
    }
}

async fn do_spawn_with(
    hub: SharedHub,
    user: PageUser,
    owner: String,
    server: String,
    options: serde_json::Value,
) -> ApiResult<Response> {
    names(&owner, &server).map_err(ApiError::page)?;
    may_manage(&user.caller, &owner, &server)?;
    match hub.servers.start(&owner, &server, options).await {
        Ok(()) => {}
        Err(StartError::AlreadyRunning(_)) => {
            return Ok(Redirect::to(&public_url(&hub, &owner, &server).await).into_response())
        }
        Err(StartError::PendingSpawn(_)) => {
            return Ok(Redirect::to(&pending_path(&hub, &owner, &server)).into_response())
        }
        Err(e) => return Err(start_error(e, &user.caller).page()),
    }
    let mut r = Redirect::to(&pending_path(&hub, &owner, &server)).into_response();
    *r.status_mut() = StatusCode::FOUND;
    Ok(r)
}

pub async fn spawn_post(State(hub): State<SharedHub>, user: PageUser) -> ApiResult<Response> {
    let me = user.caller.name().to_string();
    do_spawn(hub, user, me, String::new()).await
}
pub async fn spawn_post_user(
    State(hub): State<SharedHub>,
    user: PageUser,
    Path(owner): Path<String>,
) -> ApiResult<Response> {
    do_spawn(hub, user, owner, String::new()).await
}
pub async fn spawn_post_named(
    State(hub): State<SharedHub>,
    user: PageUser,
    Path((owner, server)): Path<(String, String)>,
) -> ApiResult<Response> {
    do_spawn(hub, user, owner, server).await
}

#[derive(Deserialize)]
pub struct TemplateForm {
    #[serde(default)]
    template: String,
    #[serde(default)]
    gpus: String,
}

/// `POST /hub/spawn-template`: the start page's template choice becomes the
/// named server of the same name.
pub async fn spawn_template_form(
    State(hub): State<SharedHub>,
    user: PageUser,
    crate::accounts::PageForm(f): crate::accounts::PageForm<TemplateForm>,
) -> ApiResult<Response> {
    let me = user.caller.name().to_string();
    let id = f.template.trim().to_string();
    if hub.servers.apps.get(&id).is_none() {
        return Err(ApiError::bad_request(format!("no template {id:?}; pick one from the list")).page());
    }
    let gpus = match f.gpus.trim() {
        "" => serde_json::Value::Null,
        g => json!(g.parse::<u64>().map_err(|_| ApiError::bad_request("the GPU count must be a number").page())?),
    };
    do_spawn_with(hub, user, me, id.clone(), json!({"template": id, "gpus": gpus})).await
}

/// The start page's template picker, grouped by category.
pub fn template_picker(hub: &SharedHub, xsrf: &str, allowed: Option<&[String]>) -> String {
    let apps = &hub.servers.apps;
    let mut ts: Vec<&berth_core::HubTemplate> =
        apps.templates().iter().filter(|t| allowed.is_none_or(|a| a.contains(&t.id))).collect();
    if ts.is_empty() {
        return String::new();
    }
    ts.sort_by(|a, b| (&a.category, &a.name).cmp(&(&b.category, &b.name)));
    let mut groups = String::new();
    let mut rows = String::new();
    let mut category = "";
    for t in &ts {
        if t.category != category {
            if !category.is_empty() {
                groups.push_str("</optgroup>");
            }
            category = &t.category;
            groups.push_str(&format!(r#"<optgroup label="{}">"#, esc(category)));
        }
        let blocked = apps.mode_for(t).err();
        groups.push_str(&format!(
            r#"<option value="{id}"{dis}>{name} ({size})</option>"#,
            id = esc(&t.id),
            dis = if blocked.is_some() { " disabled" } else { "" },
            name = esc(&t.name),
            size = esc(&t.estimated_size),
        ));
        let note = blocked.map(|b| format!(r#" <span class="badge warn">{}</span>"#, esc(&b))).unwrap_or_default();
        rows.push_str(&format!(
            r#"<tr id="template-{id}"><td>{cat}</td><td><b>{name}</b><br><span class="muted">{desc}</span>{note}</td><td>{size}</td><td>{gmin}–{gmax}</td></tr>"#,
            id = esc(&t.id),
            cat = esc(&t.category),
            name = esc(&t.name),
            desc = esc(&t.description),
            size = esc(&t.estimated_size),
            gmin = t.gpus.min,
            gmax = t.gpus.max,
        ));
    }
    if !category.is_empty() {
        groups.push_str("</optgroup>");
    }
    format!(
        r#"<div class="card"><h2>Start an environment</h2>
<form method="post" action="{p}spawn-template">{x}
<label for="template">Template</label><select id="template" name="template">{groups}</select>
<label for="gpus">GPUs</label><input type="number" id="gpus" name="gpus" min="0" placeholder="the template's default">
<p><button type="submit">Start</button></p></form>
<p class="muted">Each template runs as a server of the same name, so several can run side by side.</p>
<table><thead><tr><th>Category</th><th>Template</th><th>Size</th><th>GPUs</th></tr></thead><tbody>{rows}</tbody></table></div>"#,
        p = hub.hub_prefix(),
        x = xsrf_input(xsrf),
    )
}

#[derive(Deserialize)]
pub struct NamedForm {
    #[serde(default)]
    server_name: String,
}

pub async fn spawn_named_form(
    State(hub): State<SharedHub>,
    user: PageUser,
    crate::accounts::PageForm(f): crate::accounts::PageForm<NamedForm>,
) -> ApiResult<Response> {
    let me = user.caller.name().to_string();
    let name = f.server_name.trim().to_lowercase();
    if name.is_empty() {
        return Err(ApiError::bad_request("give the server a name").page());
    }
    do_spawn(hub, user, me, name).await
}

async fn pending(hub: SharedHub, user: PageUser, owner: String, server: String) -> ApiResult<Response> {
    names(&owner, &server).map_err(ApiError::page)?;
    if !user.caller.allows("read:servers", Target::Server { user: &owner, server: &server }) {
        return Err(ApiError::forbidden("you may not see this server").page());
    }
    let record = hub.store.get_server(&owner, &server).await?;
    let url = public_url(&hub, &owner, &server).await;
    if record.as_ref().is_some_and(|r| r.state == ServerState::Running) {
        return Ok(Redirect::to(&url).into_response());
    }
    let progress = progress_url(&hub.cfg.base_url, &owner, &server);
    let body = format!(
        r##"<div class="card"><h1>Starting {what}</h1>
<div class="progress"><div id="bar"></div></div>
<p id="message" class="muted">Waiting for the server…</p>
<ul id="log" class="muted"></ul>
<p><a href="{p}home">Back home</a></p></div>
<script>
(function(){{
  var bar=document.getElementById("bar"),msg=document.getElementById("message"),log=document.getElementById("log");
  var es=new EventSource({progress:?});
  es.onmessage=function(e){{
    var ev=JSON.parse(e.data);
    if(ev.progress!==undefined)bar.style.width=ev.progress+"%";
    msg.textContent=ev.message||"";
    var li=document.createElement("li");li.textContent=ev.message||"";log.appendChild(li);
    if(ev.ready){{es.close();window.location.href=ev.url||{url:?};}}
    if(ev.failed){{es.close();bar.style.background="#c8372d";}}
  }};
  es.onerror=function(){{msg.textContent="Lost the connection to the progress stream; reload to retry.";}};
}})();
</script>"##,
        what = esc(&if server.is_empty() { owner.clone() } else { format!("{owner}/{server}") }),
        p = hub.hub_prefix(),
    );
    Ok(html::page(&hub.cfg.base_url, "Starting", Some(&viewer(&user)), &body).into_response())
}

pub async fn pending_page(
    State(hub): State<SharedHub>,
    user: PageUser,
    Path(owner): Path<String>,
) -> ApiResult<Response> {
    pending(hub, user, owner, String::new()).await
}
pub async fn pending_page_named(
    State(hub): State<SharedHub>,
    user: PageUser,
    Path((owner, server)): Path<(String, String)>,
) -> ApiResult<Response> {
    pending(hub, user, owner, server).await
}

async fn do_stop(hub: SharedHub, user: PageUser, owner: String, server: String) -> ApiResult<Response> {
    names(&owner, &server).map_err(ApiError::page)?;
    may_manage(&user.caller, &owner, &server)?;
    hub.servers.stop(&owner, &server, SLOW).await.map_err(|e| ApiError::from(e).page())?;
    Ok(Redirect::to(&format!("{}home", hub.hub_prefix())).into_response())
}

pub async fn stop_post(State(hub): State<SharedHub>, user: PageUser, Path(owner): Path<String>) -> ApiResult<Response> {
    do_stop(hub, user, owner, String::new()).await
}
pub async fn stop_post_named(
    State(hub): State<SharedHub>,
    user: PageUser,
    Path((owner, server)): Path<(String, String)>,
) -> ApiResult<Response> {
    do_stop(hub, user, owner, server).await
}

async fn logs(hub: SharedHub, user: PageUser, owner: String, server: String) -> ApiResult<Response> {
    names(&owner, &server).map_err(ApiError::page)?;
    may_manage(&user.caller, &owner, &server)?;
    let text = hub.servers.logs(&owner, &server).await.unwrap_or_else(|| "(no output recorded)".into());
    let body = format!(
        r#"<h1>Log of {}</h1><div class="card"><pre style="white-space:pre-wrap;font-size:.8rem">{}</pre></div>"#,
        esc(&if server.is_empty() { owner.clone() } else { format!("{owner}/{server}") }),
        esc(&text)
    );
    Ok(html::page(&hub.cfg.base_url, "Log", Some(&viewer(&user)), &body).into_response())
}

pub async fn logs_page(State(hub): State<SharedHub>, user: PageUser, Path(owner): Path<String>) -> ApiResult<Response> {
    logs(hub, user, owner, String::new()).await
}
pub async fn logs_page_named(
    State(hub): State<SharedHub>,
    user: PageUser,
    Path((owner, server)): Path<(String, String)>,
) -> ApiResult<Response> {
    logs(hub, user, owner, server).await
}

/// Splits `/user/<name>[/<server>]/rest` into its parts, guessing whether the
/// second segment names a server (one that exists for that user).
async fn split_user_path(hub: &SharedHub, rest: &str) -> (String, String) {
    let mut parts = rest.splitn(3, '/');
    let user = parts.next().unwrap_or("").to_string();
    let second = parts.next().unwrap_or("");
    let server = if !second.is_empty() && hub.store.get_server(&user, second).await.ok().flatten().is_some() {
        second.to_string()
    } else {
        String::new()
    };
    (user, server)
}

fn wants_html(method: &Method, headers: &HeaderMap, path: &str) -> bool {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).unwrap_or("");
    method == Method::GET
        && !path.contains("/api/")
        && (accept.contains("text/html") || accept.is_empty() || accept == "*/*")
}

/// `/user/<name>/...` when the proxy has no route: the server is not running.
pub async fn not_running(
    State(hub): State<SharedHub>,
    MaybeUser(a): MaybeUser,
    method: Method,
    headers: HeaderMap,
    uri: Uri,
) -> ApiResult<Response> {
    let base_user = format!("{}user/", hub.cfg.base_url);
    let path = uri.path().to_string();
    let rest = path.strip_prefix(&base_user).unwrap_or("");
    let (user, server) = split_user_path(&hub, rest).await;
    let html = wants_html(&method, &headers, &path);
    if UserName::parse(&user).is_err() {
        let e = ApiError::not_found(format!("no such page: {path}"));
        return Err(if html { e.page() } else { e });
    }
    let record = hub.store.get_server(&user, &server).await?;
    let state = record.as_ref().map(|r| r.state).unwrap_or(ServerState::Stopped);
    if state == ServerState::Starting && html {
        let next = percent_encoding::utf8_percent_encode(
            uri.path_and_query().map(|p| p.as_str()).unwrap_or(""),
            percent_encoding::NON_ALPHANUMERIC,
        );
        return Ok(Redirect::to(&format!("{}?next={next}", pending_path(&hub, &user, &server))).into_response());
    }
    let spawn_url = if server.is_empty() {
        format!("{}spawn/{user}", hub.hub_prefix())
    } else {
        format!("{}spawn/{user}/{server}", hub.hub_prefix())
    };
    if !html {
        let msg = match state {
            ServerState::Starting => format!("The server at {path} is starting; try again in a moment"),
            _ => format!("Server no longer running at {path}. Restart the server at {spawn_url}"),
        };
        let status = if state == ServerState::Starting {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::from_u16(424).unwrap_or(StatusCode::SERVICE_UNAVAILABLE)
        };
        return Ok((status, Json(json!({"status": status.as_u16(), "message": msg}))).into_response());
    }
    let viewer = a.caller.as_ref().map(|c| Viewer { name: c.name(), admin: c.user.admin, xsrf: &a.xsrf });
    let may_start =
        a.caller.as_ref().is_some_and(|c| c.allows("servers", Target::Server { user: &user, server: &server }));
    let error = record
        .as_ref()
        .and_then(|r| r.last_error.clone())
        .map(|e| alert(Level::Danger, &format!("It stopped: {e}")))
        .unwrap_or_default();
    let action = if may_start {
        format!(
            r#"<form method="post" action="{spawn_url}">{}<button type="submit" id="start">Start it</button></form>"#,
            xsrf_input(&a.xsrf)
        )
    } else if a.caller.is_none() {
        format!(
            r#"<a class="button" href="{}login?next={}">Log in</a>"#,
            hub.hub_prefix(),
            percent_encoding::utf8_percent_encode(&path, percent_encoding::NON_ALPHANUMERIC)
        )
    } else {
        String::new()
    };
    let who = if server.is_empty() { format!("{user}'s server") } else { format!("{user}'s server {server}") };
    let body = format!(r#"<div class="card"><h1>{} is not running</h1>{error}<p>{action}</p></div>"#, esc(&who));
    Ok((StatusCode::SERVICE_UNAVAILABLE, html::page(&hub.cfg.base_url, "Not running", viewer.as_ref(), &body))
        .into_response())
}

/// `/hub/user/<name>/...` (JupyterHub's hub-side URL for a user's server): send the browser to it.
pub async fn hub_user_redirect(State(hub): State<SharedHub>, Path(rest): Path<String>, uri: Uri) -> Redirect {
    let q = uri.query().map(|q| format!("?{q}")).unwrap_or_default();
    Redirect::to(&format!("{}user/{rest}{q}", hub.cfg.base_url))
}
