//! The admin's GPU queue page: who waits for GPUs, in order, for how long,
//! with buttons to move an entry to a position or call it off. The rules
//! (who may see, move and cancel) are the hub's.

use axum::extract::{Query, State};
use axum::response::{Html, IntoResponse, Redirect, Response};
use berth_core::Target;
use serde::Deserialize;

use super::images::MsgQuery;
use super::page;
use crate::error::{ApiError, ApiResult};
use crate::extract::{PageForm, PageUser, ServerPath};
use crate::html::{self, alert, esc, xsrf_input, Level};
use crate::SharedHub;

/// `GET /hub/admin/gpu-queue` (admins).
pub async fn queue_page(
    State(hub): State<SharedHub>,
    user: PageUser,
    Query(q): Query<MsgQuery>,
) -> ApiResult<Html<String>> {
    user.caller.require("admin:servers", Target::Hub).map_err(page)?;
    let view = hub.servers.queue_view(&user.caller).await.map_err(page)?;
    let p = hub.hub_prefix();
    let x = xsrf_input(&user.xsrf);
    let now = berth_store::now_ms();
    let mut rows = String::new();
    for e in &view.entries {
        let path = if e.server.is_empty() { e.user.clone() } else { format!("{}/{}", e.user, e.server) };
        let path = esc(&path);
        let waited = super::home::duration_text((now.saturating_sub(e.queued_at_ms).max(0) / 1000) as u64);
        rows.push_str(&format!(
            r#"<tr id="q-{key}"><td class="position">{pos}</td><td>{path}</td><td>{gpus}</td><td class="muted">{waited}</td><td><form method="post" action="{p}admin/gpu-queue/{path}" style="display:inline">{x}<input type="hidden" name="action" value="move"><input type="number" name="position" min="1" max="{len}" value="{pos}" style="max-width:5rem;display:inline-block"> <button class="secondary" type="submit">Move</button></form> <form method="post" action="{p}admin/gpu-queue/{path}" style="display:inline">{x}<input type="hidden" name="action" value="cancel"><button class="danger" type="submit">Cancel</button></form></td></tr>"#,
            key = path.replace('/', "--"),
            pos = e.position,
            gpus = e.gpus,
            len = view.length,
        ));
    }
    let table = if view.entries.is_empty() {
        r#"<p class="muted" id="queue-empty">Nobody is waiting for a GPU.</p>"#.to_string()
    } else {
        format!(
            r#"<table><thead><tr><th>Position</th><th>Server</th><th>GPUs</th><th>Waiting for</th><th></th></tr></thead><tbody>{rows}</tbody></table>"#
        )
    };
    let mode = if view.when_full == "refuse" {
        "This hub refuses starts when GPUs are taken (<code>gpu.when_full = refuse</code>): nobody joins the queue."
    } else {
        "A start that asks for more GPUs than are free waits here, first come, first served; the first in line starts by itself when GPUs free. Nobody behind it starts first: move an entry to let it."
    };
    let msg = q.msg.as_deref().map(|m| alert(Level::Success, m)).unwrap_or_default();
    let body = format!(
        r#"<h1>GPU queue</h1>{msg}<div class="card"><p class="muted">{mode}</p><p id="queue-length">{n} waiting.</p>{table}</div><p><a href="{p}authorize">Users</a></p>"#,
        n = view.length,
    );
    Ok(html::page(&hub.cfg.base_url, "GPU queue", Some(&user.viewer()), &body))
}

#[derive(Deserialize)]
pub struct QueueForm {
    #[serde(default)]
    action: String,
    #[serde(default)]
    position: String,
}

/// `POST /hub/admin/gpu-queue/<user>[/<server>]`: `action=move&position=N` or `action=cancel`.
pub async fn queue_action(
    State(hub): State<SharedHub>,
    user: PageUser,
    ServerPath(id): ServerPath,
    PageForm(f): PageForm<QueueForm>,
) -> ApiResult<Response> {
    let done = match f.action.as_str() {
        "move" => {
            let position: usize = f
                .position
                .trim()
                .parse()
                .map_err(|_| ApiError::bad_request("the position must be a whole number, 1 or more").page())?;
            hub.servers.move_queued(&user.caller, &id, position).await.map_err(page)?;
            format!("{id} is now number {position} in the queue")
        }
        "cancel" => {
            hub.servers.cancel_queued_by(&user.caller, &id).await.map_err(page)?;
            format!("{id}'s start was cancelled")
        }
        other => return Err(ApiError::bad_request(format!("unknown action {other:?}")).page()),
    };
    let msg = percent_encoding::utf8_percent_encode(&done, percent_encoding::NON_ALPHANUMERIC);
    Ok(Redirect::to(&format!("{}admin/gpu-queue?msg={msg}", hub.hub_prefix())).into_response())
}
