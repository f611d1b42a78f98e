//! The admin's pages: users (authorize, admin rights, delete, set a
//! password) and GPUs (shared or exclusive). Each action goes through the
//! hub's account rules, which check the caller's scopes.

use axum::extract::{Path, Query, State};
use axum::response::{Html, IntoResponse, Redirect, Response};
use berth_core::Target;
use berth_hub::{Actor, HubError};
use berth_store::UserQuery;
use serde::Deserialize;

use super::login::{change_password_form, PasswordForm};
use super::{page, upper_first};
use crate::error::{ApiError, ApiResult};
use crate::extract::{PageForm, PageUser};
use crate::html::{self, alert, esc, xsrf_input, Level};
use crate::model::iso;
use crate::SharedHub;

pub async fn admin_password_page(
    State(hub): State<SharedHub>,
    user: PageUser,
    Path(name): Path<String>,
) -> ApiResult<Html<String>> {
    user.caller.require("admin:users", Target::User(&name)).map_err(page)?;
    if hub.store.get_user(&name).await?.is_none() {
        return Err(ApiError::not_found(format!("user {name} not found")).page());
    }
    let body = change_password_form(&hub, &user.xsrf, Some(&name));
    Ok(html::page(&hub.cfg.base_url, "Change password", Some(&user.viewer()), &body))
}

pub async fn admin_password(
    State(hub): State<SharedHub>,
    user: PageUser,
    Path(name): Path<String>,
    PageForm(f): PageForm<PasswordForm>,
) -> ApiResult<Html<String>> {
    let msg = if f.new_password != f.new_password_confirmation {
        alert(Level::Danger, "The new password didn't match the confirmation. Please try again.")
    } else {
        match hub.reset_password(&Actor::Caller(&user.caller), &name, f.new_password).await {
            Ok(()) => alert(Level::Success, &format!("The password for {name} has been changed successfully")),
            Err(HubError::Password(e)) => alert(Level::Danger, &(upper_first(&e.to_string()) + ".")),
            Err(e) => return Err(ApiError::from(e).page()),
        }
    };
    let body = format!("{msg}{}", change_password_form(&hub, &user.xsrf, Some(&name)));
    Ok(html::page(&hub.cfg.base_url, "Change password", Some(&user.viewer()), &body))
}

// ------------------------------------------------------------ admin: users

#[derive(Deserialize, Default)]
pub struct ListQuery {
    #[serde(default)]
    q: String,
    #[serde(default)]
    pending: Option<String>,
    #[serde(default)]
    offset: i64,
    #[serde(default)]
    msg: Option<String>,
}

const PAGE: i64 = 100;

pub async fn authorize_page(
    State(hub): State<SharedHub>,
    user: PageUser,
    Query(lq): Query<ListQuery>,
) -> ApiResult<Html<String>> {
    user.caller.require("admin:users", Target::Hub).map_err(page)?;
    let pending_only = lq.pending.as_deref().is_some_and(|v| !v.is_empty() && v != "0");
    let query = UserQuery {
        name_prefix: Some(lq.q.trim().to_lowercase()).filter(|s| !s.is_empty()),
        authorized: pending_only.then_some(false),
        offset: lq.offset.max(0),
        limit: PAGE,
        ..Default::default()
    };
    let (users, total) = hub.store.list_users(&query).await.map_err(|e| ApiError::from(e).page())?;
    let p = hub.hub_prefix();
    let x = xsrf_input(&user.xsrf);
    let ssh_sessions = hub.store.count_events_by_subject("ssh-session").await.unwrap_or_default();
    let usage: std::collections::HashMap<String, berth_hub::usage::UserUsage> = hub
        .servers
        .usage
        .all(1, berth_store::now_ms())
        .await
        .map(|all| all.into_iter().map(|u| (u.user.clone(), u)).collect())
        .unwrap_or_default();
    let hours = |name: &str| {
        use berth_hub::usage::hours_text;
        let Some(u) = usage.get(name) else { return ("—".to_string(), "—".to_string()) };
        let Some(p) = u.periods.first() else { return ("—".to_string(), "—".to_string()) };
        let gpu = match &u.quota {
            Some(q) => format!("{} of {}", hours_text(p.gpu_hours), hours_text(q.gpu_hours)),
            None => hours_text(p.gpu_hours),
        };
        (gpu, hours_text(p.server_hours))
    };
    let mut rows = String::new();
    for u in &users {
        let n = esc(&u.name);
        let status = if u.authorized {
            r#"<span class="badge ok">authorized</span>"#
        } else {
            r#"<span class="badge warn">pending</span>"#
        };
        let btn = |action: &str, label: &str, class: &str| {
            format!(
                r#"<form method="post" action="{p}authorize/{n}">{x}<input type="hidden" name="action" value="{action}"><button class="{class}" type="submit">{label}</button></form> "#
            )
        };
        let mut actions = String::new();
        if u.authorized {
            actions.push_str(&btn("unauthorize", "Unauthorize", "secondary"));
        } else {
            actions.push_str(&btn("authorize", "Authorize", ""));
        }
        if u.admin {
            actions.push_str(&btn("remove-admin", "Remove admin", "secondary"));
        } else {
            actions.push_str(&btn("make-admin", "Make admin", "secondary"));
        }
        actions.push_str(&format!(
            r#"<a href="{p}change-password/{n}">Set password</a> <a href="{p}keys/{n}">SSH keys</a> "#
        ));
        if u.name != user.caller.name() {
            actions.push_str(&btn("delete", "Delete", "danger"));
        }
        let own = usage
            .get(&u.name)
            .and_then(|v| v.quota.as_ref())
            .filter(|q| q.source == "user")
            .map(|q| berth_hub::usage::hours_text(q.gpu_hours));
        actions.push_str(&format!(
            r#"<form method="post" action="{p}gpu-quota/{n}" class="gpu-quota">{x}<input type="text" name="gpu_hours" value="{v}" placeholder="hub's" size="5" aria-label="GPU-hours per period"><button class="secondary" type="submit">Set GPU-hours</button></form>"#,
            v = esc(&own.unwrap_or_default()),
        ));
        let (gpu_hours, server_hours) = hours(&u.name);
        rows.push_str(&format!(
            r#"<tr id="{n}"><td>{n}</td><td>{status}</td><td>{admin}</td><td class="muted">{created}</td><td class="muted">{last}</td><td class="ssh-sessions">{ssh}</td><td class="gpu-hours">{gpu_hours}</td><td class="server-hours">{server_hours}</td><td>{actions}</td></tr>"#,
            ssh = ssh_sessions.get(&u.name).copied().unwrap_or(0),
            admin = if u.admin { "admin" } else { "" },
            created = iso(u.created).get(..10).unwrap_or(""),
            last = u.last_activity.map(|t| iso(t).get(..16).unwrap_or("").replace('T', " ")).unwrap_or_else(|| "never".into()),
        ));
    }
    let msg = lq.msg.as_deref().map(|m| alert(Level::Success, m)).unwrap_or_default();
    let more = if lq.offset + PAGE < total {
        format!(
            r#"<a href="{p}authorize?q={q}&pending={pd}&offset={o}">Next {PAGE} →</a>"#,
            q = esc(&lq.q),
            pd = if pending_only { "1" } else { "" },
            o = lq.offset + PAGE
        )
    } else {
        String::new()
    };
    let gpu_card = match hub.servers.gpus.view(&user.caller, berth_store::now_ms()).await {
        Ok(v) if v.gpus.is_empty() => {
            format!(r#"<div class="card"><h2>GPUs</h2><p class="muted">No GPUs (mode {}).</p></div>"#, v.mode)
        }
        Ok(v) => {
            let mut rows = String::new();
            for g in &v.gpus {
                let (id, shared, holders) = (&g.id, g.shared, &g.holders);
                rows.push_str(&format!(
                    r#"<tr id="gpu-{id}"><td><code>{id}</code></td><td>{name}</td><td>{holders}</td><td data-gpu="{id}">{usage}</td><td>{idle}</td><td>{kind}</td><td><form method="post" action="{p}gpus/{id}">{x}<input type="hidden" name="action" value="{act}"><button class="secondary" type="submit">{label}</button></form></td></tr>"#,
                    id = esc(id),
                    name = esc(&g.name),
                    holders = if holders.is_empty() { "free".to_string() } else { esc(&holders.join(", ")) },
                    usage = super::home::gpu_usage(g),
                    idle = g.idle_seconds.map(super::home::duration_text).unwrap_or_else(|| "—".into()),
                    kind = if shared { "shared" } else { "exclusive" },
                    act = if shared { "exclusive" } else { "share" },
                    label = if shared { "Make exclusive" } else { "Share" },
                ));
            }
            format!(
                r#"<div class="card"><h2>GPUs</h2><p class="muted" id="gpu-sampler">{sampler}</p><table><thead><tr><th>Id</th><th>Name</th><th>Held by</th><th>Use</th><th>Idle for</th><th>Kind</th><th></th></tr></thead><tbody>{rows}</tbody></table></div>{live}"#,
                sampler = esc(&super::home::sampler_text(&v.sampler)),
                live = super::home::gpu_live(&hub, &user.xsrf),
            )
        }
        Err(e) => alert(Level::Danger, &ApiError::from(e).message),
    };
    let cull_card = culls_card(&hub, &user).await;
    let body = format!(
        r#"<h1>Users</h1>{msg}<p><a href="{p}admin/templates">Template images</a> · <a href="{p}admin/gpu-queue" id="gpu-queue-link">GPU queue ({waiting} waiting)</a></p>{gpu_card}{cull_card}<div class="card"><form method="get" action="{p}authorize">
<input type="text" name="q" value="{q}" placeholder="name starts with…" style="max-width:16rem;display:inline-block">
<label style="display:inline;font-weight:normal"><input type="checkbox" name="pending" value="1" {checked}> pending only</label>
<button class="secondary" type="submit">Filter</button></form>
<p class="muted">{total} user(s)</p>
<table><thead><tr><th>Name</th><th>Status</th><th>Role</th><th>Created</th><th>Last active</th><th>SSH sessions</th><th>GPU-hours {this}</th><th>Server-hours</th><th></th></tr></thead><tbody>{rows}</tbody></table>{more}</div>"#,
        q = esc(&lq.q),
        checked = if pending_only { "checked" } else { "" },
        waiting = hub.servers.queue_view(&user.caller).await.map(|v| v.length).unwrap_or(0),
        this = hub.servers.usage.period.this(),
    );
    Ok(html::page(&hub.cfg.base_url, "Users", Some(&user.viewer()), &body))
}

/// The latest culls with their reasons (from the event log), for callers
/// who may read every server.
async fn culls_card(hub: &SharedHub, user: &PageUser) -> String {
    if !user.caller.allows("read:servers", Target::Hub) || !hub.servers.culler.enabled() {
        return String::new();
    }
    let events = hub.store.recent_events_of_kind("cull", 20).await.unwrap_or_default();
    let rows: String = events
        .iter()
        .map(|e| {
            format!(
                r#"<tr><td class="muted">{at}</td><td>{server}</td><td>{why}</td></tr>"#,
                at = iso(e.at).get(..19).unwrap_or("").replace('T', " "),
                server = esc(&e.subject),
                why = esc(&e.detail),
            )
        })
        .collect();
    let body = if rows.is_empty() {
        r#"<p class="muted">No server was culled yet.</p>"#.to_string()
    } else {
        format!(
            r#"<table><thead><tr><th>When (UTC)</th><th>Server</th><th>Why</th></tr></thead><tbody>{rows}</tbody></table>"#
        )
    };
    format!(r#"<div class="card" id="culls"><h2>Culled servers</h2>{body}</div>"#)
}

#[derive(Deserialize)]
pub struct ActionForm {
    #[serde(default)]
    action: String,
}

pub async fn authorize_action(
    State(hub): State<SharedHub>,
    user: PageUser,
    Path(name): Path<String>,
    PageForm(f): PageForm<ActionForm>,
) -> ApiResult<Response> {
    let actor = Actor::Caller(&user.caller);
    let done = match f.action.as_str() {
        "authorize" => hub.set_authorized(&actor, &name, true).await.map(|_| format!("{name} is authorized")),
        "unauthorize" => {
            hub.set_authorized(&actor, &name, false).await.map(|_| format!("{name} is no longer authorized"))
        }
        "make-admin" => hub.set_admin(&actor, &name, true).await.map(|_| format!("{name} is an admin")),
        "remove-admin" => hub.set_admin(&actor, &name, false).await.map(|_| format!("{name} is no longer an admin")),
        "delete" | "discard" => hub.delete_user(&actor, &name, false).await.map(|_| format!("{name} was deleted")),
        other => return Err(ApiError::bad_request(format!("unknown action {other:?}")).page()),
    }
    .map_err(|e| ApiError::from(e).page())?;
    let msg = percent_encoding::utf8_percent_encode(&done, percent_encoding::NON_ALPHANUMERIC);
    Ok(Redirect::to(&format!("{}authorize?msg={msg}#{name}", hub.hub_prefix())).into_response())
}

/// `POST /hub/gpus/<id>` (admins): mark a GPU shared or exclusive.
pub async fn gpu_action(
    State(hub): State<SharedHub>,
    user: PageUser,
    Path(id): Path<String>,
    PageForm(f): PageForm<ActionForm>,
) -> ApiResult<Response> {
    let shared = match f.action.as_str() {
        "share" => true,
        "exclusive" => false,
        other => return Err(ApiError::bad_request(format!("unknown action {other:?}")).page()),
    };
    hub.set_gpu_shared(&user.caller, &id, shared).await.map_err(page)?;
    let msg = format!("{id} is {}", if shared { "shared" } else { "exclusive" });
    let msg = percent_encoding::utf8_percent_encode(&msg, percent_encoding::NON_ALPHANUMERIC);
    Ok(Redirect::to(&format!("{}authorize?msg={msg}", hub.hub_prefix())).into_response())
}

#[derive(Deserialize)]
pub struct QuotaForm {
    #[serde(default)]
    gpu_hours: String,
}

/// `POST /hub/gpu-quota/<name>` (admins): the user's own GPU-hours per
/// period; empty for the hub's, 0 for unlimited.
pub async fn gpu_quota_action(
    State(hub): State<SharedHub>,
    user: PageUser,
    Path(name): Path<String>,
    PageForm(f): PageForm<QuotaForm>,
) -> ApiResult<Response> {
    let raw = f.gpu_hours.trim();
    let hours = if raw.is_empty() {
        None
    } else {
        Some(raw.parse::<f64>().map_err(|_| ApiError::from(HubError::BadQuota { hours: raw.to_string() }).page())?)
    };
    hub.servers.usage.set_user_quota(&user.caller, &name, hours).await.map_err(|e| ApiError::from(e).page())?;
    let done = match hours {
        Some(h) if h > 0.0 => {
            format!("{name} may use {} GPU-hours {}", berth_hub::usage::hours_text(h), hub.servers.usage.period.this())
        }
        Some(_) => format!("{name} has no GPU-hour quota"),
        None => format!("{name} has the hub's GPU-hour quota"),
    };
    let msg = percent_encoding::utf8_percent_encode(&done, percent_encoding::NON_ALPHANUMERIC);
    Ok(Redirect::to(&format!("{}authorize?msg={msg}#{name}", hub.hub_prefix())).into_response())
}
