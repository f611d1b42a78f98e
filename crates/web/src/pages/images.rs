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
    let body = format!(
        r#"<h1>Template images</h1>{msg}<div class="card"><p class="muted">On the {kind} spawner. A template's image is built on its first start, or here ahead of it; <code>berth templates prune</code> removes images no template builds any more.</p>
<table><thead><tr><th>Template</th><th>Name</th><th>Image</th><th>Tag</th><th>Size</th><th>Age</th><th>In use by</th><th>Last build</th><th></th></tr></thead><tbody>{rows}</tbody></table></div>"#,
        kind = hub.servers.spawner_kind(),
    );
    Ok(html::page(&hub.cfg.base_url, "Template images", Some(&user.viewer()), &body))
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
