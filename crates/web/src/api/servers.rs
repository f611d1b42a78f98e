//! Servers: start and stop (`/users/<name>/server` and
//! `/users/<name>/servers/<server>`, one handler each through
//! [`ServerPath`]), the progress event stream, the activity the single-user
//! server reports, and the GPU inventory.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use berth_core::Target;
use berth_hub::{ProgressEvent, Settled, UserOptions};
use futures_util::stream::{self, StreamExt};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiCaller, JsonBody, ServerPath};
use crate::model::{parse_iso, server_url};
use crate::SharedHub;

/// How long a start or stop request waits before answering 202 instead of 201/204.
pub(crate) const SLOW: Duration = Duration::from_secs(10);

pub(super) async fn start(
    State(hub): State<SharedHub>,
    ApiCaller(c): ApiCaller,
    ServerPath(id): ServerPath,
    JsonBody(options): JsonBody<Value>,
) -> ApiResult<Response> {
    c.require("servers", Target::Server { user: id.user(), server: id.server() })?;
    let options = UserOptions::from_json(options)?;
    hub.start_server(&c, &id, Some(options)).await.map_err(|e| ApiError::for_viewer(e, c.user.admin))?;
    // Wait a little, as JupyterHub does, so fast servers answer 201.
    match hub.servers.wait_settled(&id, tokio::time::Instant::now() + SLOW, None).await? {
        Settled::Running { .. } => Ok(StatusCode::CREATED.into_response()),
        Settled::Stopped { error } => {
            let msg = error.unwrap_or_else(|| "the server stopped".into());
            Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("Spawn failed: {msg}")))
        }
        Settled::Pending => Ok(StatusCode::ACCEPTED.into_response()),
    }
}

#[derive(Deserialize, Default)]
pub(super) struct StopBody {
    #[serde(default)]
    remove: bool,
}

pub(super) async fn stop(
    State(hub): State<SharedHub>,
    ApiCaller(c): ApiCaller,
    ServerPath(id): ServerPath,
    JsonBody(body): JsonBody<StopBody>,
) -> ApiResult<StatusCode> {
    let target = Target::Server { user: id.user(), server: id.server() };
    if !(c.allows("delete:servers", target) || c.allows("servers", target)) {
        return Err(ApiError::forbidden(
            "Action is not authorized with current scopes; requires any of [delete:servers]",
        ));
    }
    if hub.store.get_user(id.user()).await?.is_none() {
        return Err(ApiError::not_found(format!("No such user: {}", id.user)));
    }
    let done = hub.stop_server(&c, &id, SLOW).await?;
    if body.remove && !id.server.is_default() {
        if !done {
            return Err(berth_hub::HubError::StillStopping.into());
        }
        hub.servers.remove(&id).await?;
    }
    Ok(if done { StatusCode::NO_CONTENT } else { StatusCode::ACCEPTED })
}

/// The progress stream: the current start's events so far, then each new
/// one, ending with the ready or failed event (made from the record when
/// berth restarted since, so the log is gone).
pub(super) async fn progress(
    State(hub): State<SharedHub>,
    ApiCaller(c): ApiCaller,
    ServerPath(id): ServerPath,
) -> ApiResult<Response> {
    c.require("read:servers", Target::Server { user: id.user(), server: id.server() })?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<ProgressEvent>();
    let deadline = tokio::time::Instant::now() + hub.servers.cfg.longest_start() + Duration::from_secs(60);
    let path_url = server_url(&hub.cfg.base_url, id.user(), id.server());
    let span = tracing::info_span!("progress-stream", server = %id);
    let servers = hub.servers.clone();
    let waiter = hub.servers.track(async move { servers.wait_settled(&id, deadline, Some(&tx)).await }, span);
    let events = stream::unfold((rx, Some(waiter), false), move |(mut rx, waiter, seen_final)| {
        let path_url = path_url.clone();
        async move {
            if let Some(ev) = rx.recv().await {
                let fin = ev.is_final();
                return Some((ev, (rx, waiter, seen_final || fin)));
            }
            // The wait is over: say how it ended if the events did not.
            let settled = waiter?.await.ok()?.ok()?;
            if seen_final {
                return None;
            }
            let last = match settled {
                Settled::Running { url, .. } => ProgressEvent::ready(url.as_deref().unwrap_or(&path_url)),
                Settled::Stopped { error: Some(e) } => ProgressEvent::failed(&e),
                Settled::Stopped { error: None } | Settled::Pending => return None,
            };
            Some((last, (rx, None, true)))
        }
    });
    let sse =
        events.map(|ev| Ok::<_, Infallible>(Event::default().data(serde_json::to_string(&ev).unwrap_or_default())));
    let mut resp = Sse::new(sse).keep_alive(KeepAlive::new().interval(Duration::from_secs(8))).into_response();
    resp.headers_mut().insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-cache"));
    resp.headers_mut().insert("x-accel-buffering", header::HeaderValue::from_static("no"));
    Ok(resp)
}

#[derive(Deserialize)]
pub(super) struct ActivityBody {
    last_activity: Option<String>,
    servers: Option<Map<String, Value>>,
}

/// `POST /hub/api/users/<name>/activity`, as the single-user server sends it.
pub(super) async fn activity(
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
        hub.activity.user(&user, check(raw)?);
    }
    for (name, t) in updates {
        hub.activity.server(&user, &name, t);
    }
    Ok(StatusCode::OK)
}

/// `POST …/server/extend` (and `…/servers/<name>/extend`): Extend — the
/// culler counts it as use, so a cull warning ends and the idle window
/// starts again. Answers the server's `berth` model.
pub(super) async fn extend(
    State(hub): State<SharedHub>,
    ApiCaller(c): ApiCaller,
    ServerPath(id): ServerPath,
) -> ApiResult<Json<Value>> {
    let status = hub.servers.extend_cull(&c, &id).await?;
    let record = hub
        .store
        .get_server(id.user(), id.server())
        .await?
        .ok_or_else(|| ApiError::not_found(format!("{id} not found")))?;
    Ok(Json(crate::model::berth_model(&hub.cfg.base_url, &record, status.as_ref())))
}

/// `GET /hub/api/gpus`: the inventory, counts, shared flags and live
/// readings for every caller; holder names and others' processes with
/// `read:gpus` only (everyone sees their own).
pub(super) async fn gpus(
    State(hub): State<SharedHub>,
    ApiCaller(c): ApiCaller,
) -> ApiResult<Json<berth_hub::gpus::GpusView>> {
    Ok(Json(hub.servers.gpus.view(&c, berth_store::now_ms()).await?))
}
