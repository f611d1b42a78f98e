//! Starting, stopping and watching servers from the browser: the start
//! form, the spawn-pending page with its live progress bar, stop, the log,
//! and what a stopped server's URL answers. One handler per action: the
//! `<user>[/<server>]` path is a [`ServerPath`].

use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Redirect, Response};
use axum::Json;
use berth_core::{ServerId, ServerState, Target, UserName};
use berth_hub::{HubError, UserOptions};
use serde::Deserialize;
use serde_json::json;

use crate::api::SLOW;
use crate::error::{ApiError, ApiResult};
use crate::extract::{wants_html, MaybeUser, PageForm, PageUser, ServerPath};
use crate::html::{self, alert, esc, xsrf_input, Level, Viewer};
use crate::model::{progress_url, server_url};
use crate::SharedHub;

pub(super) fn pending_path(hub: &SharedHub, user: &str, server: &str) -> String {
    if server.is_empty() {
        format!("{}spawn-pending/{user}", hub.hub_prefix())
    } else {
        format!("{}spawn-pending/{user}/{server}", hub.hub_prefix())
    }
}

fn may_manage(c: &berth_hub::Caller, id: &ServerId) -> ApiResult<()> {
    if c.allows("servers", Target::Server { user: id.user(), server: id.server() }) {
        Ok(())
    } else {
        Err(ApiError::forbidden(format!("you may not manage {}'s servers", id.user)).page())
    }
}

fn own_default(user: &PageUser) -> ApiResult<ServerId> {
    ServerId::parse(user.caller.name(), "").map_err(|e| ApiError::from(e).page())
}

/// Where a running server is reached: its own host in `host` mode, else its path.
async fn public_url(hub: &SharedHub, id: &ServerId) -> String {
    let path = server_url(&hub.cfg.base_url, id.user(), id.server());
    match hub.store.get_server(id.user(), id.server()).await {
        Ok(Some(r)) => r.url.filter(|u| u.starts_with("http")).unwrap_or(path),
        _ => path,
    }
}

async fn spawn_form(hub: SharedHub, user: PageUser, id: ServerId) -> ApiResult<Response> {
    may_manage(&user.caller, &id)?;
    let (owner, server) = (id.user(), id.server());
    if let Some(s) = hub.store.get_server(owner, server).await? {
        match s.state {
            ServerState::Running => {
                return Ok(Redirect::to(&server_url(&hub.cfg.base_url, owner, server)).into_response())
            }
            ServerState::Starting => return Ok(Redirect::to(&pending_path(&hub, owner, server)).into_response()),
            _ => {}
        }
    }
    let path = if server.is_empty() { owner.to_string() } else { format!("{owner}/{server}") };
    let body = format!(
        r#"<div class="card"><h1>Start {what}</h1><form method="post" action="{p}spawn/{path}">{x}<button type="submit" id="start">Start</button></form></div>"#,
        what = esc(&path),
        p = hub.hub_prefix(),
        x = xsrf_input(&user.xsrf),
    );
    Ok(html::page(&hub.cfg.base_url, "Start", Some(&user.viewer()), &body).into_response())
}

/// Whether a GET came from the hub's own pages or a typed URL, not from
/// another site (which must not start servers by linking here).
fn same_site(headers: &HeaderMap) -> bool {
    matches!(headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()), None | Some("same-origin") | Some("none"))
}

/// `GET /hub/spawn`: as JupyterHub does when there is nothing to choose,
/// starts one's own default server (the templates are named servers) and
/// shows its progress — unless another site sent the browser here: then the
/// start form asks first.
pub async fn spawn_page_own(State(hub): State<SharedHub>, user: PageUser, headers: HeaderMap) -> ApiResult<Response> {
    let id = own_default(&user)?;
    if !same_site(&headers) {
        return spawn_form(hub, user, id).await;
    }
    do_spawn(hub, user, id, UserOptions::default()).await
}

/// `GET /hub/spawn/<user>[/<server>]`
pub async fn spawn_page(
    State(hub): State<SharedHub>,
    user: PageUser,
    ServerPath(id): ServerPath,
) -> ApiResult<Response> {
    spawn_form(hub, user, id).await
}

async fn do_spawn(hub: SharedHub, user: PageUser, id: ServerId, options: UserOptions) -> ApiResult<Response> {
    may_manage(&user.caller, &id)?;
    match hub.start_server(&user.caller, &id, Some(options)).await {
        Ok(()) => {}
        Err(HubError::AlreadyRunning { .. }) => return Ok(Redirect::to(&public_url(&hub, &id).await).into_response()),
        Err(HubError::PendingSpawn { .. }) => {
            return Ok(Redirect::to(&pending_path(&hub, id.user(), id.server())).into_response())
        }
        Err(e) => return Err(ApiError::for_viewer(e, user.caller.user.admin).page()),
    }
    let mut r = Redirect::to(&pending_path(&hub, id.user(), id.server())).into_response();
    *r.status_mut() = StatusCode::FOUND;
    Ok(r)
}

/// `POST /hub/spawn`
pub async fn spawn_post_own(State(hub): State<SharedHub>, user: PageUser) -> ApiResult<Response> {
    let id = own_default(&user)?;
    do_spawn(hub, user, id, UserOptions::default()).await
}

/// `POST /hub/spawn/<user>[/<server>]`
pub async fn spawn_post(
    State(hub): State<SharedHub>,
    user: PageUser,
    ServerPath(id): ServerPath,
) -> ApiResult<Response> {
    do_spawn(hub, user, id, UserOptions::default()).await
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
    PageForm(f): PageForm<TemplateForm>,
) -> ApiResult<Response> {
    let tid = f.template.trim().to_string();
    if hub.servers.templates.get(&tid).is_none() {
        return Err(ApiError::bad_request(format!("no template {tid:?}; pick one from the list")).page());
    }
    let gpus = match f.gpus.trim() {
        "" => None,
        g => Some(g.parse::<u64>().map_err(|_| ApiError::bad_request("the GPU count must be a number").page())?),
    };
    let id = ServerId::parse(user.caller.name(), &tid).map_err(|e| ApiError::from(e).page())?;
    do_spawn(hub, user, id, UserOptions { template: Some(tid), gpus, ..Default::default() }).await
}

#[derive(Deserialize)]
pub struct NamedForm {
    #[serde(default)]
    server_name: String,
}

pub async fn spawn_named_form(
    State(hub): State<SharedHub>,
    user: PageUser,
    PageForm(f): PageForm<NamedForm>,
) -> ApiResult<Response> {
    let name = f.server_name.trim().to_lowercase();
    if name.is_empty() {
        return Err(ApiError::bad_request("give the server a name").page());
    }
    let id = ServerId::parse(user.caller.name(), &name).map_err(|e| ApiError::from(e).page())?;
    do_spawn(hub, user, id, UserOptions::default()).await
}

#[derive(Deserialize, Default)]
pub struct PendingQuery {
    #[serde(default)]
    next: Option<String>,
}

/// `GET /hub/spawn-pending/<user>[/<server>][?next=<path on that server>]`
pub async fn pending(
    State(hub): State<SharedHub>,
    user: PageUser,
    ServerPath(id): ServerPath,
    axum::extract::Query(q): axum::extract::Query<PendingQuery>,
) -> ApiResult<Response> {
    let (owner, server) = (id.user().to_string(), id.server().to_string());
    // Where to land once ready: a path on this very server, nothing else.
    let prefix = server_url(&hub.cfg.base_url, &owner, &server);
    let next = q.next.filter(|n| {
        n.starts_with(&prefix) && !n.contains("..") && !n.contains('\\') && !n.chars().any(|c| c.is_control())
    });
    if !user.caller.allows("read:servers", Target::Server { user: &owner, server: &server }) {
        return Err(ApiError::forbidden("you may not see this server").page());
    }
    let record = hub.store.get_server(&owner, &server).await?;
    let url = public_url(&hub, &id).await;
    if record.as_ref().is_some_and(|r| r.state == ServerState::Running) {
        return Ok(Redirect::to(next.as_deref().unwrap_or(&url)).into_response());
    }
    let progress = progress_url(&hub.cfg.base_url, &owner, &server);
    let next_attr = next.map(|n| format!(r#" data-next-url="{}""#, esc(&n))).unwrap_or_default();
    // Waiting for GPUs: where in line (the stream says when that changes),
    // and a way out for whoever may stop the server.
    let place = match &record {
        Some(r) if r.state == ServerState::Starting => {
            hub.servers.queue_place(&id).await.ok().flatten().map(|(pos, len)| {
                let gpus = UserOptions::from_record(&r.user_options).gpus.unwrap_or(1) as u32;
                berth_hub::servers::queue::waiting_text(pos, len, gpus)
            })
        }
        _ => None,
    };
    let cancel = match &place {
        Some(_) if may_manage(&user.caller, &id).is_ok() => format!(
            r#"<form method="post" action="{p}stop/{path}" style="display:inline">{x}<button class="secondary" type="submit" id="cancel">Cancel</button></form> "#,
            p = hub.hub_prefix(),
            path = esc(&if server.is_empty() { owner.clone() } else { format!("{owner}/{server}") }),
            x = xsrf_input(&user.xsrf),
        ),
        _ => String::new(),
    };
    let waiting = place.as_deref().map(esc).unwrap_or_else(|| "Waiting for the server…".to_string());
    // No inline script (the hub's CSP forbids it): static/pending.js reads the data- attributes.
    let body = format!(
        r#"<div class="card" id="spawn-progress" data-progress-url="{progress}" data-server-url="{url}"{next_attr} data-xsrf="{xsrf}"><h1>Starting {what}</h1>
<div class="progress"><div id="bar"></div></div>
<p id="message" class="muted">{waiting}</p>
<ul id="log" class="muted"></ul>
<p>{cancel}<a href="{p}home">Back home</a></p></div>
{script}"#,
        progress = esc(&progress),
        url = esc(&url),
        xsrf = esc(&user.xsrf),
        what = esc(&if server.is_empty() { owner.clone() } else { format!("{owner}/{server}") }),
        p = hub.hub_prefix(),
        script = html::script(hub.hub_prefix(), "pending.js"),
    );
    Ok(html::page(&hub.cfg.base_url, "Starting", Some(&user.viewer()), &body).into_response())
}

/// `GET /hub/logs/<user>[/<server>]`
pub async fn logs(State(hub): State<SharedHub>, user: PageUser, ServerPath(id): ServerPath) -> ApiResult<Response> {
    may_manage(&user.caller, &id)?;
    let (owner, server) = (id.user().to_string(), id.server().to_string());
    let text = hub.servers.logs(&id).await.unwrap_or_else(|| "(no output recorded)".into());
    let body = format!(
        r#"<h1>Log of {}</h1><div class="card"><pre style="white-space:pre-wrap;font-size:.8rem">{}</pre></div>"#,
        esc(&if server.is_empty() { owner.clone() } else { format!("{owner}/{server}") }),
        esc(&text)
    );
    Ok(html::page(&hub.cfg.base_url, "Log", Some(&user.viewer()), &body).into_response())
}

/// `POST /hub/stop/<user>[/<server>]`
pub async fn stop_post(
    State(hub): State<SharedHub>,
    user: PageUser,
    ServerPath(id): ServerPath,
) -> ApiResult<Response> {
    may_manage(&user.caller, &id)?;
    hub.stop_server(&user.caller, &id, SLOW).await.map_err(|e| ApiError::from(e).page())?;
    Ok(Redirect::to(&format!("{}home", hub.hub_prefix())).into_response())
}

/// The Extend button of a cull warning: counts as use of the server.
pub async fn extend_post(
    State(hub): State<SharedHub>,
    user: PageUser,
    ServerPath(id): ServerPath,
) -> ApiResult<Response> {
    may_manage(&user.caller, &id)?;
    hub.servers.extend_cull(&user.caller, &id).await.map_err(|e| ApiError::from(e).page())?;
    Ok(Redirect::to(&format!("{}home", hub.hub_prefix())).into_response())
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
    let viewer: Option<Viewer<'_>> = a.viewer();
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

/// `/hub/user-redirect/<path>` (what nbgitpuller links and JupyterHub's own
/// pages use): the caller's own default server at `<path>`, started first
/// when it is stopped (and the link did not come from another site).
pub async fn user_redirect(
    State(hub): State<SharedHub>,
    user: PageUser,
    headers: HeaderMap,
    Path(rest): Path<String>,
    uri: Uri,
) -> ApiResult<Response> {
    let id = own_default(&user)?;
    let q = uri.query().map(|q| format!("?{q}")).unwrap_or_default();
    let target = format!("{}{}{q}", server_url(&hub.cfg.base_url, id.user(), ""), rest.trim_start_matches('/'));
    let state = hub.store.get_server(id.user(), "").await?.map(|s| s.state).unwrap_or(ServerState::Stopped);
    if state == ServerState::Stopped && same_site(&headers) {
        match hub.servers.start(&id, UserOptions::default()).await {
            Ok(()) | Err(HubError::PendingSpawn { .. }) | Err(HubError::AlreadyRunning { .. }) => {}
            Err(e) => return Err(ApiError::for_viewer(e, user.caller.user.admin).page()),
        }
    }
    if matches!(state, ServerState::Stopped | ServerState::Starting) && same_site(&headers) {
        let next = percent_encoding::utf8_percent_encode(&target, percent_encoding::NON_ALPHANUMERIC);
        return Ok(Redirect::to(&format!("{}?next={next}", pending_path(&hub, id.user(), ""))).into_response());
    }
    Ok(Redirect::to(&target).into_response())
}

/// `/hub/user/<name>/...` (JupyterHub's hub-side URL for a user's server): send the browser to it.
pub async fn hub_user_redirect(State(hub): State<SharedHub>, Path(rest): Path<String>, uri: Uri) -> Redirect {
    let q = uri.query().map(|q| format!("?{q}")).unwrap_or_default();
    Redirect::to(&format!("{}user/{rest}{q}", hub.cfg.base_url))
}
