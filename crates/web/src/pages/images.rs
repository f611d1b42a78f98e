//! The admin's templates page: each template's image — built or not, its
//! tag, size, age, the containers using it, the last build asked for here —
//! and a button that builds it ahead of any start (as `berth templates
//! images` and `berth templates build` do from the command line).

use axum::extract::{Path, Query, State};
use axum::response::{Html, IntoResponse, Redirect, Response};
use berth_core::Target;
use berth_hub::servers::images::BuildState;
use serde::Deserialize;

use super::page;
use crate::error::ApiResult;
use crate::extract::{PageForm, PageUser};
use crate::html::{self, alert, esc, xsrf_input, Level};
use crate::SharedHub;

#[derive(Deserialize)]
pub struct MsgQuery {
    #[serde(default)]
    pub(crate) msg: Option<String>,
}

#[derive(Deserialize)]
pub struct NoFields {}

/// "3 min", "2 h", "5 d".
fn age(secs: i64) -> String {
    match secs.max(0) {
        s if s < 120 => format!("{s} s"),
        s if s < 7200 => format!("{} min", s / 60),
        s if s < 172_800 => format!("{} h", s / 3600),
        s => format!("{} d", s / 86_400),
    }
}

/// `GET /hub/admin/templates` (admins).
pub async fn templates_page(
    State(hub): State<SharedHub>,
    user: PageUser,
    Query(q): Query<MsgQuery>,
) -> ApiResult<Html<String>> {
    user.caller.require("admin:servers", Target::Hub).map_err(page)?;
    let list = hub.servers.template_images().await.map_err(page)?;
    let p = hub.hub_prefix();
    let x = xsrf_input(&user.xsrf);
    let now = berth_store::now_ms() / 1000;
    let default = hub.servers.templates.default_template().map(|t| t.id.clone());
    let mut rows = String::new();
    for t in &list {
        let id = esc(&t.id);
        let (built, size, made, users) = match &t.info {
            Some(i) => (
                r#"<span class="badge ok">built</span>"#.to_string(),
                format!("{} MB", i.size_bytes / 1_000_000),
                age(now - i.created),
                if i.used_by.is_empty() { "-".to_string() } else { esc(&i.used_by.join(", ")) },
            ),
            None => (r#"<span class="badge warn">not built</span>"#.to_string(), "-".into(), "-".into(), "-".into()),
        };
        let build = match &t.build {
            None => String::new(),
            Some(BuildState::Building { step }) => format!("building: {}", esc(step)),
            Some(BuildState::Built { seconds }) => format!("built here in {seconds} s"),
            Some(BuildState::Present) => "nothing to build".into(),
            Some(BuildState::Failed { reason }) => format!(r#"<span class="badge err">failed</span> {}"#, esc(reason)),
        };
        let button = if t.info.is_none() && !matches!(t.build, Some(BuildState::Building { .. })) {
            format!(
                r#"<form method="post" action="{p}admin/templates/{id}/build">{x}<button type="submit">Build</button></form>"#
            )
        } else {
            String::new()
        };
        rows.push_str(&format!(
            r#"<tr id="t-{id}"><td>{id}{dflt}</td><td>{name}</td><td>{built}</td><td><code>{image}</code></td><td>{size}</td><td class="muted">{made}</td><td class="in-use">{users}</td><td class="build">{build}</td><td>{button}</td></tr>"#,
            dflt = if default.as_deref() == Some(t.id.as_str()) { " <span class=\"muted\">(default)</span>" } else { "" },
            name = esc(&t.name),
            image = esc(&t.image),
        ));
    }
    let msg = q.msg.as_deref().map(|m| alert(Level::Success, m)).unwrap_or_default();
    let updates = updates_card(&hub, p, &x).await?;
    let body = format!(
        r#"<h1>Template images</h1>{msg}{updates}<div class="card"><p class="muted">On the {kind} spawner. A template's image is built on its first start, or here ahead of it; <code>berth templates prune</code> removes images no template builds any more.</p>
<table><thead><tr><th>Template</th><th>Name</th><th>Image</th><th>Tag</th><th>Size</th><th>Age</th><th>In use by</th><th>Last build</th><th></th></tr></thead><tbody>{rows}</tbody></table></div>"#,
        kind = hub.servers.spawner_kind(),
    );
    Ok(html::page(&hub.cfg.base_url, "Template images", Some(&user.viewer()), &body))
}

/// The image-update checks: the last result per template and the button.
async fn updates_card(hub: &SharedHub, p: &str, x: &str) -> ApiResult<String> {
    let checks = hub.servers.image_checks().await.map_err(page)?;
    let mut rows = String::new();
    for c in &checks {
        let badge = match c.status.as_str() {
            "current" => r#"<span class="badge ok">up to date</span>"#,
            "available" => r#"<span class="badge warn">update available</span>"#,
            "updated" => r#"<span class="badge ok">updated</span>"#,
            "rolled-back" => r#"<span class="badge err">rolled back</span>"#,
            _ => r#"<span class="badge err">check failed</span>"#,
        };
        rows.push_str(&format!(
            r#"<tr class="image-check" data-status="{status}"><td>{t}</td><td><code>{image}</code></td><td>{badge}</td><td>{policy}</td><td class="muted">{when}</td><td class="message">{message}</td></tr>"#,
            status = esc(&c.status),
            t = esc(&c.template),
            image = esc(&c.image),
            policy = hub.servers.updates.policy(&c.template).as_str(),
            when = berth_web_time(c.checked),
            message = esc(&c.message),
        ));
    }
    let table = if rows.is_empty() {
        r#"<p class="muted">No check has run yet.</p>"#.to_string()
    } else {
        format!(
            r#"<table><thead><tr><th>Template</th><th>Image</th><th>Status</th><th>Policy</th><th>Checked</th><th></th></tr></thead><tbody>{rows}</tbody></table>"#
        )
    };
    Ok(format!(
        r#"<div class="card" id="image-updates"><h2>Image updates</h2><p class="muted">A check asks each image's registry for the digest its tag has now; a changed image is handled by the template's policy (<code>images.policy</code>): <code>notify</code> says so here and in the event log, <code>next-start</code> pulls it for the next start (keeping the previous image), <code>when-idle</code> also recreates idle servers on it and puts one whose new image does not become ready back on the previous image. A busy server is never interrupted.</p>{table}<form method="post" action="{p}admin/templates/check">{x}<button type="submit">Check for updates</button></form></div>"#
    ))
}

/// Unix ms as `YYYY-MM-DD HH:MM UTC`.
fn berth_web_time(ms: i64) -> String {
    crate::model::iso(ms).get(..16).map(|s| format!("{} UTC", s.replace('T', " "))).unwrap_or_default()
}

/// `POST /hub/admin/templates/check` (admins): the image-update check, now.
pub async fn check_action(
    State(hub): State<SharedHub>,
    user: PageUser,
    PageForm(_): PageForm<NoFields>,
) -> ApiResult<Response> {
    let checks = hub.servers.check_images_for(&user.caller).await.map_err(page)?;
    let count = |s: &str| checks.iter().filter(|c| c.status == s).count();
    let msg = format!(
        "Checked {} images: {} up to date, {} with an update available, {} updated, {} rolled back before, {} failed.",
        checks.len(),
        count("current"),
        count("available"),
        count("updated"),
        count("rolled-back"),
        count("failed")
    );
    let msg = percent_encoding::utf8_percent_encode(&msg, percent_encoding::NON_ALPHANUMERIC);
    Ok(Redirect::to(&format!("{}admin/templates?msg={msg}#image-updates", hub.hub_prefix())).into_response())
}

/// `POST /hub/admin/templates/<id>/build` (admins): build in the background.
pub async fn build_action(
    State(hub): State<SharedHub>,
    user: PageUser,
    Path(id): Path<String>,
    PageForm(_): PageForm<NoFields>,
) -> ApiResult<Response> {
    hub.build_template(&user.caller, &id).await.map_err(page)?;
    let msg = format!("Building {id}'s image in the background; this page shows how far it got.");
    let msg = percent_encoding::utf8_percent_encode(&msg, percent_encoding::NON_ALPHANUMERIC);
    Ok(Redirect::to(&format!("{}admin/templates?msg={msg}#t-{id}", hub.hub_prefix())).into_response())
}
