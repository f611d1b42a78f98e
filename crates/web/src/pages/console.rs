//! The admin console's pages: every server (stop, start, log, open), live
//! sessions (revoke), the event log (filters, paging, CSV and JSON export)
//! and the announcement. The rules — scopes, events naming the acting
//! admin — are the hub's (`berth_hub::console`).

use axum::extract::{Query, State};
use axum::http::header;
use axum::response::{Html, IntoResponse, Redirect, Response};
use berth_core::{ServerId, ServerState, Target};
use berth_hub::console::ANNOUNCEMENT_MAX_CHARS;
use serde::Deserialize;

use super::page;
use crate::api::SLOW;
use crate::error::{ApiError, ApiResult};
use crate::export::{csv_line, event_json, EventFilter, CSV_HEADER};
use crate::extract::{PageForm, PageUser};
use crate::html::{self, alert, esc, xsrf_input, Level};
use crate::model::{iso, server_url};
use crate::SharedHub;

/// Events on one page of the Events page.
const EVENTS_PAGE: i64 = 50;
/// The most events one export holds (newest first).
const EXPORT_MAX: i64 = 100_000;

#[derive(Deserialize, Default)]
pub struct MsgQuery {
    #[serde(default)]
    msg: Option<String>,
    #[serde(default)]
    user: Option<String>,
}

/// `2026-01-31 09:30` (UTC), or "—".
fn when(ms: Option<i64>) -> String {
    ms.map(|t| iso(t).get(..16).unwrap_or("").replace('T', " ")).unwrap_or_else(|| "—".into())
}

/// The console's own navigation, `here` marked.
fn subnav(p: &str, here: &str) -> String {
    let links = [
        ("admin/servers", "Servers"),
        ("admin/sessions", "Sessions"),
        ("admin/events", "Events"),
        ("admin/announcement", "Announcement"),
        ("authorize", "Users"),
        ("admin/templates", "Template images"),
    ];
    let mut out = String::from(r#"<nav class="subnav">"#);
    for (path, label) in links {
        let class = if path == here { r#" class="here""# } else { "" };
        out.push_str(&format!(r#"<a href="{p}{path}"{class}>{label}</a>"#));
    }
    out.push_str("</nav>");
    out
}

fn redirect_with(p: &str, path: &str, msg: &str) -> Response {
    let msg = percent_encoding::utf8_percent_encode(msg, percent_encoding::NON_ALPHANUMERIC);
    Redirect::to(&format!("{p}{path}?msg={msg}")).into_response()
}

fn success(q: &MsgQuery) -> String {
    q.msg.as_deref().map(|m| alert(Level::Success, m)).unwrap_or_default()
}

// ------------------------------------------------------------------ servers

/// `GET /hub/admin/servers`: every server.
pub async fn servers_page(
    State(hub): State<SharedHub>,
    user: PageUser,
    Query(q): Query<MsgQuery>,
) -> ApiResult<Html<String>> {
    let rows = hub.server_rows(&user.caller).await.map_err(page)?;
    let p = hub.hub_prefix();
    let x = xsrf_input(&user.xsrf);
    let mut table = String::new();
    for r in &rows {
        let (u, n) = (esc(&r.user), esc(&r.name));
        let badge = match r.state {
            ServerState::Running => r#"<span class="badge ok">running</span>"#,
            ServerState::Starting => r#"<span class="badge warn">starting</span>"#,
            ServerState::Stopping => r#"<span class="badge warn">stopping</span>"#,
            ServerState::Stopped => r#"<span class="badge">stopped</span>"#,
        };
        let form = |action: &str, label: &str, class: &str| {
            format!(
                r#"<form method="post" action="{p}admin/servers">{x}<input type="hidden" name="user" value="{u}"><input type="hidden" name="server" value="{n}"><input type="hidden" name="action" value="{action}"><button class="{class} {action}" type="submit">{label}</button></form> "#
            )
        };
        let mut actions = match r.state {
            ServerState::Running | ServerState::Starting => form("stop", "Stop", "secondary"),
            ServerState::Stopped => form("start", "Start", ""),
            ServerState::Stopping => String::new(),
        };
        let path = if r.name.is_empty() { r.user.clone() } else { format!("{}/{}", r.user, r.name) };
        actions.push_str(&format!(r#"<a class="logs" href="{p}logs/{}">Log</a> "#, esc(&path)));
        if r.state == ServerState::Running {
            let url = r.url.clone().unwrap_or_else(|| server_url(&hub.cfg.base_url, &r.user, &r.name));
            actions.push_str(&format!(r#"<a class="open" href="{}">Open</a>"#, esc(&url)));
        }
        let error = r
            .last_error
            .as_deref()
            .map(|e| format!(r#"<br><span class="muted">last start failed: {}</span>"#, esc(e)))
            .unwrap_or_default();
        table.push_str(&format!(
            r#"<tr data-server="{sid}"><td>{u}</td><td>{name}</td><td>{template}</td><td><code>{image}</code></td><td class="state">{badge}{error}</td><td class="muted">{since}</td><td class="muted">{last}</td><td>{gpus}</td><td>{actions}</td></tr>"#,
            sid = esc(&format!("{}/{}", r.user, r.name)),
            name = if r.name.is_empty() { r#"<span class="muted">default</span>"#.to_string() } else { n.clone() },
            template = if r.template.is_empty() { "—".to_string() } else { esc(&r.template) },
            image = if r.image.is_empty() { "—".to_string() } else { esc(&r.image) },
            since = if r.state.is_active() { when(r.since) } else { "—".into() },
            last = when(r.last_activity),
            gpus = if r.gpus.is_empty() { "—".to_string() } else { esc(&r.gpus.join(", ")) },
        ));
    }
    let running = rows.iter().filter(|r| r.state.is_active()).count();
    let body = format!(
        r#"<h1>Servers</h1>{nav}{msg}<div class="card"><p class="muted">{total} server(s), {running} running or starting. Times are UTC.</p>
<table id="servers"><thead><tr><th>User</th><th>Server</th><th>Template</th><th>Image</th><th>State</th><th>Since</th><th>Last activity</th><th>GPUs</th><th></th></tr></thead><tbody>{table}</tbody></table></div>"#,
        nav = subnav(p, "admin/servers"),
        msg = success(&q),
        total = rows.len(),
    );
    Ok(html::page(&hub.cfg.base_url, "Servers", Some(&user.viewer()), &body))
}

#[derive(Deserialize)]
pub struct ServerActionForm {
    #[serde(default)]
    user: String,
    #[serde(default)]
    server: String,
    #[serde(default)]
    action: String,
}

/// `POST /hub/admin/servers` (`user`, `server`, `action=start|stop`).
pub async fn server_action(
    State(hub): State<SharedHub>,
    user: PageUser,
    PageForm(f): PageForm<ServerActionForm>,
) -> ApiResult<Response> {
    let id = ServerId::parse(&f.user, &f.server).map_err(|e| ApiError::from(e).page())?;
    let msg = match f.action.as_str() {
        "start" => {
            hub.start_server(&user.caller, &id, None)
                .await
                .map_err(|e| ApiError::for_viewer(e, user.caller.user.admin).page())?;
            format!("Starting {id}.")
        }
        "stop" => {
            let done = hub.stop_server(&user.caller, &id, SLOW).await.map_err(page)?;
            if done {
                format!("{id} is stopped.")
            } else {
                format!("{id} is stopping.")
            }
        }
        other => return Err(ApiError::bad_request(format!("unknown action {other:?}")).page()),
    };
    Ok(redirect_with(hub.hub_prefix(), "admin/servers", &msg))
}

// ----------------------------------------------------------------- sessions

/// `GET /hub/admin/sessions[?user=<name>]`: live browser sessions.
pub async fn sessions_page(
    State(hub): State<SharedHub>,
    user: PageUser,
    Query(q): Query<MsgQuery>,
) -> ApiResult<Html<String>> {
    let only = q.user.as_deref().map(str::trim).filter(|u| !u.is_empty()).map(str::to_lowercase);
    let rows = hub.session_rows(&user.caller, only.as_deref()).await.map_err(page)?;
    let p = hub.hub_prefix();
    let x = xsrf_input(&user.xsrf);
    let mut table = String::new();
    for s in &rows {
        let (u, sid) = (esc(&s.user), esc(&s.public_id));
        let current = if s.current { r#" <span class="badge ok">this one</span>"# } else { "" };
        table.push_str(&format!(
            r#"<tr data-session="{sid}" data-user="{u}"><td>{u}</td><td><code>{short}</code>{current}</td><td class="muted">{created}</td><td class="muted">{seen}</td><td><form method="post" action="{p}admin/sessions/revoke">{x}<input type="hidden" name="user" value="{u}"><input type="hidden" name="session" value="{sid}"><button class="danger revoke" type="submit">Revoke</button></form></td></tr>"#,
            short = esc(s.public_id.get(..12).unwrap_or(&s.public_id)),
            created = when(Some(s.created)),
            seen = when(Some(s.last_seen)),
        ));
    }
    let body = format!(
        r#"<h1>Sessions</h1>{nav}{msg}<div class="card"><form method="get" action="{p}admin/sessions">
<input type="text" name="user" value="{filter}" placeholder="user name" style="max-width:16rem;display:inline-block"> <button class="secondary" type="submit">Filter</button></form>
<p class="muted">{n} live browser session(s). Revoking one logs that browser out; the user can log in again (unauthorize the account to keep them out).</p>
<table id="sessions"><thead><tr><th>User</th><th>Session</th><th>Logged in</th><th>Last seen</th><th></th></tr></thead><tbody>{table}</tbody></table></div>"#,
        nav = subnav(p, "admin/sessions"),
        msg = success(&q),
        filter = esc(only.as_deref().unwrap_or("")),
        n = rows.len(),
    );
    Ok(html::page(&hub.cfg.base_url, "Sessions", Some(&user.viewer()), &body))
}

#[derive(Deserialize)]
pub struct RevokeForm {
    #[serde(default)]
    user: String,
    #[serde(default)]
    session: String,
}

/// `POST /hub/admin/sessions/revoke` (`user`, `session`: its public id).
pub async fn revoke_session(
    State(hub): State<SharedHub>,
    user: PageUser,
    PageForm(f): PageForm<RevokeForm>,
) -> ApiResult<Response> {
    hub.revoke_session(&user.caller, &f.user, &f.session).await.map_err(page)?;
    Ok(redirect_with(hub.hub_prefix(), "admin/sessions", &format!("A session of {} was revoked.", f.user)))
}

// ------------------------------------------------------------------- events

/// `GET /hub/admin/events?user=&kind=&since=&until=&offset=`
pub async fn events_page(
    State(hub): State<SharedHub>,
    user: PageUser,
    Query(f): Query<EventFilter>,
) -> ApiResult<Html<String>> {
    let mut q = f.query(EVENTS_PAGE).map_err(ApiError::page)?;
    q.limit = EVENTS_PAGE;
    let (events, total) = hub.events(&user.caller, q.clone()).await.map_err(page)?;
    let p = hub.hub_prefix();
    let mut table = String::new();
    for e in &events {
        table.push_str(&format!(
            r#"<tr class="event" data-kind="{kind}"><td class="muted">{at}</td><td>{actor}</td><td><code>{kind}</code></td><td>{subject}</td><td>{detail}</td></tr>"#,
            at = esc(&iso(e.at).get(..19).unwrap_or("").replace('T', " ")),
            actor = esc(&e.actor),
            kind = esc(&e.kind),
            subject = esc(&e.subject),
            detail = esc(&e.detail),
        ));
    }
    let mut paging = String::new();
    if q.offset > 0 {
        let prev = (q.offset - EVENTS_PAGE).max(0);
        paging.push_str(&format!(
            r#"<a id="newer" href="{p}admin/events{}">← Newer</a> "#,
            esc(&f.link(&format!("offset={prev}")))
        ));
    }
    if q.offset + (events.len() as i64) < total {
        let next = q.offset + EVENTS_PAGE;
        paging.push_str(&format!(
            r#"<a id="older" href="{p}admin/events{}">Older →</a>"#,
            esc(&f.link(&format!("offset={next}")))
        ));
    }
    let shown = if events.is_empty() {
        "no events".to_string()
    } else {
        format!("{}–{} of {total}", q.offset + 1, q.offset + events.len() as i64)
    };
    let body = format!(
        r#"<h1>Events</h1>{nav}<div class="card"><form method="get" action="{p}admin/events" id="event-filter">
<label for="user">User</label><input type="text" id="user" name="user" value="{user_v}" placeholder="who did it, or whom it concerns">
<label for="kind">Kind</label><input type="text" id="kind" name="kind" value="{kind_v}" placeholder="e.g. user-authorize, start, cull">
<label for="since">From (UTC)</label><input type="text" id="since" name="since" value="{since_v}" placeholder="2026-01-31 or 2026-01-31T09:30">
<label for="until">Until (UTC)</label><input type="text" id="until" name="until" value="{until_v}" placeholder="2026-02-01">
<p><button type="submit">Filter</button> <a href="{p}admin/events">Clear</a></p></form>
<p><span class="muted" id="shown">{shown}</span> · Export: <a id="export-csv" href="{p}admin/events/export{csv}">CSV</a> <a id="export-json" href="{p}admin/events/export{json}">JSON</a> · API: <code>GET {api}/events</code> (scope <code>read:events</code>)</p>
<table id="events"><thead><tr><th>When (UTC)</th><th>Who</th><th>Kind</th><th>Subject</th><th>Detail</th></tr></thead><tbody>{table}</tbody></table><p>{paging}</p></div>"#,
        nav = subnav(p, "admin/events"),
        user_v = esc(&f.user),
        kind_v = esc(&f.kind),
        since_v = esc(&f.since),
        until_v = esc(&f.until),
        csv = esc(&f.link("format=csv")),
        json = esc(&f.link("format=json")),
        api = esc(hub.api_prefix()),
    );
    Ok(html::page(&hub.cfg.base_url, "Events", Some(&user.viewer()), &body))
}

#[derive(Deserialize)]
pub struct ExportQuery {
    #[serde(default)]
    format: String,
    #[serde(flatten)]
    filter: EventFilter,
}

/// `GET /hub/admin/events/export?format=csv|json&<filters>`: every event the
/// filters select (newest first, at most 100 000), as a download.
pub async fn events_export(
    State(hub): State<SharedHub>,
    user: PageUser,
    Query(eq): Query<ExportQuery>,
) -> ApiResult<Response> {
    let csv = match eq.format.as_str() {
        "csv" | "" => true,
        "json" => false,
        other => return Err(ApiError::bad_request(format!("unknown format {other:?}; csv or json")).page()),
    };
    let mut q = eq.filter.query(1000).map_err(ApiError::page)?;
    q.limit = berth_hub::console::EVENTS_MAX_PAGE;
    q.offset = 0;
    let mut out_csv = String::from(CSV_HEADER);
    let mut out_json = Vec::new();
    let mut count = 0;
    loop {
        let (batch, total) = hub.events(&user.caller, q.clone()).await.map_err(page)?;
        for e in &batch {
            if csv {
                out_csv.push_str(&csv_line(e));
            } else {
                out_json.push(event_json(e));
            }
        }
        count += batch.len() as i64;
        q.offset += q.limit;
        if batch.is_empty() || q.offset >= total || count >= EXPORT_MAX {
            if count < total {
                tracing::warn!(total, exported = count, "the event export stopped at its limit");
            }
            break;
        }
    }
    let (ctype, name, body) = if csv {
        ("text/csv; charset=utf-8", "berth-events.csv", out_csv)
    } else {
        ("application/json", "berth-events.json", serde_json::Value::Array(out_json).to_string())
    };
    Ok((
        [
            (header::CONTENT_TYPE, ctype.to_string()),
            (header::CONTENT_DISPOSITION, format!("attachment; filename=\"{name}\"")),
        ],
        body,
    )
        .into_response())
}

// ------------------------------------------------------------- announcement

/// `GET /hub/admin/announcement`
pub async fn announcement_page(
    State(hub): State<SharedHub>,
    user: PageUser,
    Query(q): Query<MsgQuery>,
) -> ApiResult<Html<String>> {
    user.caller.require("admin:users", Target::Hub).map_err(page)?;
    let current = hub.announcement().await.map_err(page)?;
    let p = hub.hub_prefix();
    let x = xsrf_input(&user.xsrf);
    let now_text = match &current {
        Some(a) => format!(
            r#"<p id="current">Shown now, set by {by} at {at} UTC, {until}.</p><form method="post" action="{p}admin/announcement">{x}<input type="hidden" name="action" value="clear"><button class="secondary" type="submit" id="clear-announcement">Clear it</button></form>"#,
            by = esc(&a.set_by),
            at = when(Some(a.set_at)),
            until =
                a.expires_at.map(|t| format!("until {} UTC", when(Some(t)))).unwrap_or_else(|| "until cleared".into()),
        ),
        None => r#"<p id="current" class="muted">No announcement is shown.</p>"#.to_string(),
    };
    let body = format!(
        r#"<h1>Announcement</h1>{nav}{msg}<div class="card">{now_text}</div><div class="card"><h2>Set the announcement</h2>
<form method="post" action="{p}admin/announcement">{x}<input type="hidden" name="action" value="set">
<label for="message">Message (text, shown at the top of every hub page)</label>
<textarea id="message" name="message" rows="3" maxlength="{max}" style="width:100%;font:inherit;padding:.45rem .6rem">{text}</textarea>
<label for="expires_in_hours">Expires after (hours, optional)</label><input type="number" id="expires_in_hours" name="expires_in_hours" min="0" step="any" placeholder="until cleared">
<p><button type="submit" id="set-announcement">Set</button></p></form>
<p class="muted">The API: <code>PUT {api}/announcement</code> with <code>{{"message": "…", "expires_in": 3600}}</code>, <code>DELETE</code> to clear.</p></div>"#,
        nav = subnav(p, "admin/announcement"),
        msg = success(&q),
        max = ANNOUNCEMENT_MAX_CHARS,
        text = esc(current.as_ref().map(|a| a.message.as_str()).unwrap_or("")),
        api = esc(hub.api_prefix()),
    );
    Ok(html::page(&hub.cfg.base_url, "Announcement", Some(&user.viewer()), &body))
}

#[derive(Deserialize)]
pub struct AnnouncementForm {
    #[serde(default)]
    action: String,
    #[serde(default)]
    message: String,
    #[serde(default)]
    expires_in_hours: String,
}

/// `POST /hub/admin/announcement` (`action=set` with `message` and
/// `expires_in_hours`, or `action=clear`).
pub async fn announcement_action(
    State(hub): State<SharedHub>,
    user: PageUser,
    PageForm(f): PageForm<AnnouncementForm>,
) -> ApiResult<Response> {
    let msg = match f.action.as_str() {
        "set" => {
            let expires_at = match f.expires_in_hours.trim() {
                "" => None,
                h => {
                    let hours: f64 = h
                        .parse()
                        .ok()
                        .filter(|v: &f64| v.is_finite() && *v > 0.0 && *v < 24.0 * 366.0 * 10.0)
                        .ok_or_else(|| ApiError::bad_request(format!("{h:?} is not a number of hours")).page())?;
                    Some(berth_store::now_ms() + (hours * 3_600_000.0) as i64)
                }
            };
            hub.set_announcement(&user.caller, &f.message, expires_at).await.map_err(page)?;
            "The announcement is shown on every page."
        }
        "clear" => {
            hub.clear_announcement(&user.caller).await.map_err(page)?;
            "The announcement is cleared."
        }
        other => return Err(ApiError::bad_request(format!("unknown action {other:?}")).page()),
    };
    Ok(redirect_with(hub.hub_prefix(), "admin/announcement", msg))
}
