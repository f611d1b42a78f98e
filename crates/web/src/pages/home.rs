//! The home page: the user's servers (default and named) with their
//! state and actions, a form for a new named server, and the template
//! picker.

use axum::extract::State;
use axum::response::Html;
use berth_core::ServerState;
use berth_hub::gpus::{GpuView, GpusView, SamplerView};
use berth_hub::servers::queue::{waiting_text, QueueEntryView, QueueView};
use berth_hub::telemetry::SampleState;
use berth_store::UserQuery;

use super::servers::pending_path;
use crate::error::ApiResult;
use crate::extract::PageUser;
use crate::html::{self, alert, esc, xsrf_input, Level};
use crate::model::{iso, server_url};
use crate::SharedHub;

pub async fn home(State(hub): State<SharedHub>, user: PageUser) -> Html<String> {
    let base = &hub.cfg.base_url;
    let name = esc(user.caller.name());
    let mut body = format!("<h1>Welcome, {name}</h1>");
    if user.caller.user.admin {
        let pending = hub
            .store
            .list_users(&UserQuery { authorized: Some(false), limit: 1, ..Default::default() })
            .await
            .map(|(_, n)| n)
            .unwrap_or(0);
        if pending > 0 {
            body.push_str(&alert(
                Level::Info,
                &format!("{pending} account(s) wait for your approval on the Users page."),
            ));
        }
    }
    let gpus = hub.servers.gpus.view(&user.caller, berth_store::now_ms()).await.ok().filter(|v| v.total > 0);
    let queue = hub.servers.queue_view(&user.caller).await.ok();
    match home_servers(&hub, &user, gpus.as_ref(), queue.as_ref()).await {
        Ok(cards) => body.push_str(&cards),
        Err(e) => body.push_str(&alert(Level::Danger, &e.message)),
    }
    let allowed = hub.store.user_limits(user.caller.name()).await.ok().and_then(|l| l.templates);
    body.push_str(&template_picker(&hub, &user.xsrf, allowed.as_deref(), gpus.as_ref(), queue.as_ref()));
    body.push_str(&usage_card(&hub, &user).await);
    if gpus.is_some() {
        body.push_str(&gpu_live(&hub, &user.xsrf));
    }
    body.push_str(&format!(
        r#"<div class="card"><h2>Your account</h2><p>API tokens for scripts and JupyterHub clients: <a href="{base}hub/token">Tokens</a>.</p></div>"#
    ));
    html::page(base, "Home", Some(&user.viewer()), &body)
}

/// `12:34:56 UTC (in 3 min)`.
fn cull_time(at_ms: i64) -> String {
    let left = at_ms.saturating_sub(berth_store::now_ms()).max(0) / 1000;
    format!("{} UTC (in {})", iso(at_ms).get(11..19).unwrap_or(""), duration_text(left as u64))
}

/// The Extend button for `user`'s server `name`.
fn extend_form(hub: &SharedHub, xsrf: &str, user: &str, name: &str) -> String {
    let path = if name.is_empty() { user.to_string() } else { format!("{user}/{name}") };
    format!(
        r#"<form method="post" action="{p}extend/{path}">{x}<button type="submit" id="extend-{n}">Extend</button></form>"#,
        p = hub.hub_prefix(),
        x = xsrf_input(xsrf),
        n = esc(name),
    )
}

/// The banner on every page of a user whose servers will be culled soon.
pub(crate) fn cull_banner(hub: &SharedHub, caller: &berth_hub::Caller, xsrf: &str) -> Option<String> {
    let user = caller.name();
    let warnings = hub.servers.culler.warnings_of(user);
    if warnings.is_empty() {
        return None;
    }
    let mut out = String::new();
    for (name, w) in warnings {
        let label = if name.is_empty() {
            "Your server".to_string()
        } else {
            format!("Your server <code>{}</code>", esc(&name))
        };
        let reason = esc(w.reason.as_deref().unwrap_or("idle"));
        let when = w.cull_at_ms.map(cull_time).unwrap_or_default();
        let (tail, button) = if w.extendable {
            (" unless it is used or you extend it.", extend_form(hub, xsrf, user, &name))
        } else {
            (".", String::new())
        };
        out.push_str(&format!(
            r#"<div class="alert alert-warning" role="alert" id="cull-warning-{n}"><p>{label} ({reason}) will be stopped at {when}{tail}{button}</p></div>"#,
            n = esc(&name),
        ));
    }
    Some(out)
}

/// The banner on every page of a user whose running servers' images have
/// an update (see `berth_hub::servers::moves`).
pub(crate) fn update_banner(hub: &SharedHub, caller: &berth_hub::Caller) -> Option<String> {
    let notices = hub.servers.update_notices_of(caller.name());
    if notices.is_empty() {
        return None;
    }
    let mut out = String::new();
    for (name, text) in notices {
        let label = if name.is_empty() {
            "Your server".to_string()
        } else {
            format!("Your server <code>{}</code>", esc(&name))
        };
        out.push_str(&format!(
            r#"<div class="alert alert-info" role="status" id="image-update-{n}"><p>{label}: {text}</p></div>"#,
            n = esc(&name),
            text = esc(&text),
        ));
    }
    Some(out)
}

/// `87 % · 40536 / 81920 MiB · 61 °C · 312 W`, or "utilisation unknown".
pub(crate) fn gpu_usage(g: &GpuView) -> String {
    let mut parts = Vec::new();
    match g.utilization_percent {
        Some(u) => parts.push(format!("{u} %")),
        None => parts.push("utilisation unknown".to_string()),
    }
    match (g.memory_used_mib, g.memory_total_mib) {
        (Some(u), Some(t)) => parts.push(format!("{u} / {t} MiB")),
        (Some(u), None) => parts.push(format!("{u} MiB")),
        _ => {}
    }
    if let Some(t) = g.temperature_c {
        parts.push(format!("{t} °C"));
    }
    if let Some(p) = g.power_w {
        parts.push(format!("{p:.0} W"));
    }
    parts.join(" · ")
}

/// What keeps a page's GPU readings (`data-gpu` elements) current: the
/// settings of `gpus.js` and its script tag.
pub(crate) fn gpu_live(hub: &SharedHub, xsrf: &str) -> String {
    format!(
        r#"<div id="gpu-live" hidden data-api="{api}" data-xsrf="{x}" data-interval="{every}"></div>{script}"#,
        api = esc(&format!("{}api/gpus", hub.hub_prefix())),
        x = esc(xsrf),
        every = hub.servers.gpus.telemetry.interval().as_secs().max(1),
        script = crate::html::script(hub.hub_prefix(), "gpus.js"),
    )
}

/// `3 min`, `2 h 5 min`.
pub(crate) fn duration_text(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s} s"),
        s if s < 3600 => format!("{} min", s / 60),
        s => format!("{} h {} min", s / 3600, s % 3600 / 60),
    }
}

/// What the sampler says, in a sentence.
pub(crate) fn sampler_text(s: &SamplerView) -> String {
    let ago = s
        .sampled_at_ms
        .map(|t| format!(", {} s ago", berth_store::now_ms().saturating_sub(t).max(0) / 1000))
        .unwrap_or_default();
    match &s.state {
        SampleState::Off => "Utilisation is not sampled (gpu.sampler = off, or no GPUs).".into(),
        SampleState::Pending => format!("Utilisation from {}: no sample yet.", s.source),
        SampleState::Ok => format!("Utilisation from {}{ago}.", s.source),
        SampleState::Unknown { reason } => format!("Utilisation unknown ({}): {reason}{ago}.", s.source),
    }
}

/// The GPUs `holder` (`alice`, `alice/lab`) holds, with their live readings.
fn server_gpus(gpus: Option<&GpusView>, user: &str, holder: &str, name: &str) -> String {
    let Some(v) = gpus else { return String::new() };
    let mine: Vec<&GpuView> = v.gpus.iter().filter(|g| g.holders.iter().any(|h| h == holder)).collect();
    if mine.is_empty() {
        return String::new();
    }
    let mut rows = String::new();
    for g in mine {
        let own: u64 =
            g.processes.iter().filter(|p| p.user.as_deref() == Some(user)).filter_map(|p| p.memory_mib).sum();
        rows.push_str(&format!(
            r#"<li><code>{id}</code> {gname}: <span data-gpu="{id}">{usage}</span>{own}{shared}</li>"#,
            id = esc(&g.id),
            gname = esc(&g.name),
            usage = gpu_usage(g),
            own = if own > 0 { format!(" · your processes {own} MiB") } else { String::new() },
            shared = if g.shared { r#" <span class="badge">shared</span>"# } else { "" },
        ));
    }
    format!(r#"<ul class="gpus" id="gpus-{n}">{rows}</ul>"#, n = esc(name))
}

/// Where the user's server `name` waits in the GPU queue, if it does.
fn queue_entry<'a>(queue: Option<&'a QueueView>, user: &str, name: &str) -> Option<&'a QueueEntryView> {
    queue?.entries.iter().find(|e| e.user == user && e.server == name)
}

/// What the culler says of a running server, on its card.
fn cull_line(hub: &SharedHub, xsrf: &str, user: &str, name: &str, c: &berth_hub::cull::CullStatus) -> String {
    let n = esc(name);
    if let Some(at) = c.cull_at_ms {
        let button = if c.extendable { extend_form(hub, xsrf, user, name) } else { String::new() };
        return format!(
            r#"<div class="alert alert-warning" id="cull-{n}"><p>{reason}: stopped at {when}. {button}</p></div>"#,
            reason = esc(c.reason.as_deref().unwrap_or("idle")),
            when = cull_time(at),
        );
    }
    let mut parts = Vec::new();
    if c.idle_timeout_seconds > 0 {
        parts.push(format!("stopped after {} without use", duration_text(c.idle_timeout_seconds)));
    }
    if c.max_age_seconds > 0 {
        parts.push(format!("at the latest {} after its start", duration_text(c.max_age_seconds)));
    }
    let now: Vec<String> = c.active.iter().chain(c.unknown.iter()).map(|a| esc(a)).collect();
    let kept = if now.is_empty() { String::new() } else { format!("; kept running now: {}", now.join("; ")) };
    format!(r#"<p class="muted" id="cull-{n}">Idle servers are {}{kept}.</p>"#, parts.join(", "))
}

/// The state of one server, as the home page shows it.
fn server_card(
    hub: &SharedHub,
    xsrf: &str,
    user: &str,
    s: Option<&berth_store::Server>,
    name: &str,
    gpus: Option<&GpusView>,
    queue: Option<&QueueView>,
) -> String {
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
        ServerState::Starting => match queue_entry(queue, user, name) {
            // Waiting for GPUs: where in line, and a way out.
            Some(e) => (
                r#"<span class="badge warn">waiting for a GPU</span>"#,
                format!(
                    r#"<span class="queue-place" id="queue-{n}">{place}</span> <a class="button" href="{pending}">Show progress</a> <form method="post" action="{p}stop/{path}" style="display:inline">{x}<button class="secondary" type="submit" id="cancel-{n}">Cancel</button></form>"#,
                    n = esc(name),
                    place = esc(&waiting_text(e.position, queue.map_or(0, |q| q.length), e.gpus)),
                    pending = pending_path(hub, user, name),
                ),
            ),
            None => (
                r#"<span class="badge warn">starting</span>"#,
                format!(r#"<a class="button" href="{}">Show progress</a>"#, pending_path(hub, user, name)),
            ),
        },
        ServerState::Stopping => (r#"<span class="badge warn">stopping</span>"#, String::new()),
        ServerState::Stopped => (
            r#"<span class="badge">stopped</span>"#,
            format!(
                r#"<form method="post" action="{p}spawn/{path}" style="display:inline">{x}<button type="submit" id="start-{n}">Start</button></form>"#,
                n = esc(name)
            ),
        ),
    };
    let mut error = s
        .and_then(|s| s.last_error.as_deref())
        .filter(|_| state == ServerState::Stopped)
        .map(|e| alert(Level::Danger, &format!("Last start failed: {e}")))
        .unwrap_or_default();
    let id = berth_core::ServerId::parse(user, name).ok();
    if state == ServerState::Stopped {
        if let Some((at, why)) = id.as_ref().and_then(|id| hub.servers.culler.last_cull(id)) {
            let when = iso(at).get(..19).unwrap_or("").replace('T', " ");
            error.push_str(&format!(
                r#"<p class="muted" id="culled-{n}">Stopped by berth at {when} UTC: {why}. Its files are kept.</p>"#,
                n = esc(name),
                why = esc(&why),
            ));
        }
    }
    if state == ServerState::Running {
        if let Some(c) = id.as_ref().and_then(|id| hub.servers.culler.status(id)) {
            error.push_str(&cull_line(hub, xsrf, user, name, &c));
        }
    }
    let started = s
        .and_then(|s| s.started)
        .filter(|_| state.is_active())
        .map(|t| format!(" since {}", iso(t).get(..16).unwrap_or("").replace('T', " ")))
        .unwrap_or_default();
    let gpus = if state.is_active() { server_gpus(gpus, user, &path, name) } else { String::new() };
    format!(
        r#"<div class="card" id="server-{n}"><h2>{label} {badge}</h2><p class="muted"><code>{url}</code>{started} · <a href="{p}logs/{path}">log</a></p>{gpus}{error}<p>{actions}</p></div>"#,
        n = esc(name),
        url = esc(&url),
    )
}

async fn home_servers(
    hub: &SharedHub,
    user: &PageUser,
    gpus: Option<&GpusView>,
    queue: Option<&QueueView>,
) -> ApiResult<String> {
    let name = user.caller.name();
    let servers = hub.store.list_servers(Some(name)).await?;
    let mut out = server_card(hub, &user.xsrf, name, servers.iter().find(|s| s.name.is_empty()), "", gpus, queue);
    for s in servers.iter().filter(|s| !s.name.is_empty()) {
        out.push_str(&server_card(hub, &user.xsrf, name, Some(s), &s.name, gpus, queue));
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

/// The start page's template picker, grouped by category.
fn template_picker(
    hub: &SharedHub,
    xsrf: &str,
    allowed: Option<&[String]>,
    gpus: Option<&GpusView>,
    queue: Option<&QueueView>,
) -> String {
    let apps = &hub.servers.templates;
    let mut ts: Vec<&berth_core::HubTemplate> =
        apps.templates().iter().filter(|t| allowed.is_none_or(|a| a.contains(&t.id))).collect();
    let counts = gpus
        .map(|v| {
            let shared = v.available.saturating_sub(v.free);
            let waiting = queue.map_or(0, |q| q.length);
            format!(
                r#"<p id="gpu-counts">GPUs: <b>{free} free</b>, {held} held, of {total}{shared}.</p>{queue}"#,
                free = v.free,
                held = v.held,
                total = v.total,
                shared =
                    if shared > 0 { format!("; {shared} held but shared, so still available") } else { String::new() },
                queue = if waiting > 0 {
                    format!(
                        r#"<p id="gpu-queue">{waiting} start(s) wait for GPUs; a start that asks for GPUs now waits behind them.</p>"#
                    )
                } else {
                    String::new()
                },
            )
        })
        .unwrap_or_default();
    if ts.is_empty() {
        return if counts.is_empty() { counts } else { format!(r#"<div class="card"><h2>GPUs</h2>{counts}</div>"#) };
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
        let blocked = apps.mode_for(t).err().map(|e| e.to_string());
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
        r#"<div class="card"><h2>Start an environment</h2>{counts}
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

/// `2026-12-01` to `2026-12-31` (the last day of a period).
fn period_span(p: &berth_hub::usage::PeriodUsage) -> String {
    let first = p.start.get(..10).unwrap_or(&p.start).to_string();
    let last = berth_hub::usage::iso_utc(p.end_ms - 1);
    let last = last.get(..10).unwrap_or(&last).to_string();
    if first == last {
        first
    } else {
        format!("{first} – {last}")
    }
}

/// The user's GPU-hours and server-hours, this period and the two before,
/// and their quota.
async fn usage_card(hub: &SharedHub, user: &PageUser) -> String {
    use berth_hub::usage::hours_text;
    let u = match hub.servers.usage.view(&user.caller, user.caller.name(), 3, berth_store::now_ms()).await {
        Ok(u) => u,
        Err(e) => return alert(Level::Danger, &crate::ApiError::from(e).message),
    };
    let mut rows = String::new();
    for p in &u.periods {
        rows.push_str(&format!(
            r#"<tr{cur}><td>{span}</td><td class="gpu-hours">{g}</td><td class="server-hours">{s}</td></tr>"#,
            cur = if p.current { r#" id="usage-current""# } else { "" },
            span = esc(&period_span(p)),
            g = hours_text(p.gpu_hours),
            s = hours_text(p.server_hours),
        ));
    }
    let quota = match &u.quota {
        Some(q) => format!(
            r#"<p id="gpu-quota">GPU-hour quota: {used} of {quota} used {this}; <b>{left} left</b>; renews {renews}.</p>"#,
            used = hours_text(q.used_gpu_hours),
            quota = hours_text(q.gpu_hours),
            this = u.period.this(),
            left = hours_text(q.left_gpu_hours),
            renews = berth_hub::usage::when_utc(q.renews_ms),
        ),
        None => r#"<p id="gpu-quota" class="muted">No GPU-hour quota.</p>"#.to_string(),
    };
    format!(
        r#"<div class="card" id="usage"><h2>Your usage</h2>{quota}<table><thead><tr><th>{period}</th><th>GPU-hours</th><th>Server-hours</th></tr></thead><tbody>{rows}</tbody></table><p class="muted">Counted while your servers run and hold GPUs (UTC).</p></div>"#,
        period = upper(u.period.as_str()),
    )
}

fn upper(s: &str) -> String {
    let mut c = s.chars();
    c.next().map(|f| f.to_uppercase().chain(c).collect()).unwrap_or_default()
}
