//! The SSH keys page: one's own keys, or (for admins) anyone's; add and
//! remove through the hub, which checks the `ssh-keys` scopes.

use axum::extract::{Path, State};
use axum::response::{Html, IntoResponse, Redirect, Response};
use berth_hub::HubError;
use serde::Deserialize;

use crate::error::{ApiError, ApiResult};
use crate::extract::{PageForm, PageUser};
use crate::html::{self, alert, esc, xsrf_input, Level};
use crate::model::iso;
use crate::SharedHub;

async fn render(hub: &SharedHub, user: &PageUser, owner: &str, notice: &str) -> ApiResult<Html<String>> {
    let keys = hub.list_keys(&user.caller, owner).await.map_err(|e| ApiError::from(e).page())?;
    let p = hub.hub_prefix();
    let x = xsrf_input(&user.xsrf);
    let action = format!("{p}keys/{}", esc(owner));
    let table = if keys.is_empty() {
        r#"<p class="muted">No SSH keys yet.</p>"#.to_string()
    } else {
        let mut rows = String::new();
        for k in &keys {
            rows.push_str(&format!(
                r#"<tr id="key-{id}"><td><code>{fp}</code></td><td>{alg}</td><td>{comment}</td><td class="muted">{created}</td><td class="muted">{last}</td>
<td><form method="post" action="{action}/{id}/delete">{x}<button class="danger" type="submit">Remove</button></form></td></tr>"#,
                id = esc(&k.id),
                fp = esc(&k.fingerprint),
                alg = esc(&k.algorithm),
                comment = esc(&k.comment),
                created = iso(k.created).get(..16).unwrap_or("").replace('T', " "),
                last = k.last_used.map(|t| iso(t).get(..16).unwrap_or("").replace('T', " ")).unwrap_or_else(|| "never".into()),
            ));
        }
        format!(
            "<table><thead><tr><th>Fingerprint</th><th>Type</th><th>Comment</th><th>Added</th><th>Last used</th><th></th></tr></thead><tbody>{rows}</tbody></table>"
        )
    };
    let whose =
        if owner == user.caller.name() { "Your SSH keys".to_string() } else { format!("SSH keys of {}", esc(owner)) };
    let body = format!(
        r#"<h1>SSH keys</h1>{notice}<div class="card"><h2>Add a key</h2>
<p class="muted">Paste a public key (the contents of <code>~/.ssh/id_ed25519.pub</code>). Then <code>ssh {user}@this-host</code>
reaches your server; <code>ssh {user}+NAME@this-host</code> reaches the named server NAME.</p>
<form method="post" action="{action}">{x}<label for="key">Public key</label>
<textarea id="key" name="key" rows="3" placeholder="ssh-ed25519 AAAA… you@laptop"></textarea>
<p><button type="submit">Add key</button></p></form></div>
<div class="card"><h2>{whose}</h2>{table}</div>"#,
        user = esc(owner),
    );
    Ok(html::page(&hub.cfg.base_url, "SSH keys", Some(&user.viewer()), &body))
}

pub async fn page_own(State(hub): State<SharedHub>, user: PageUser) -> ApiResult<Html<String>> {
    let owner = user.caller.name().to_string();
    render(&hub, &user, &owner, "").await
}

pub async fn page_user(
    State(hub): State<SharedHub>,
    user: PageUser,
    Path(name): Path<String>,
) -> ApiResult<Html<String>> {
    render(&hub, &user, &name, "").await
}

#[derive(Deserialize)]
pub struct KeyForm {
    #[serde(default)]
    key: String,
}

pub async fn page_add(
    State(hub): State<SharedHub>,
    user: PageUser,
    Path(name): Path<String>,
    PageForm(f): PageForm<KeyForm>,
) -> ApiResult<Html<String>> {
    let notice = match hub.add_key(&user.caller, &name, &f.key).await {
        Ok(k) => alert(Level::Success, &format!("Added {}.", k.fingerprint)),
        Err(e @ (HubError::MissingScope { .. } | HubError::NoSuchUser { .. })) => return Err(ApiError::from(e).page()),
        Err(e) => alert(Level::Danger, &ApiError::from(e).message),
    };
    render(&hub, &user, &name, &notice).await
}

pub async fn page_delete(
    State(hub): State<SharedHub>,
    user: PageUser,
    Path((name, id)): Path<(String, String)>,
) -> ApiResult<Response> {
    hub.remove_key(&user.caller, &name, &id).await.map_err(|e| ApiError::from(e).page())?;
    Ok(Redirect::to(&format!("{}keys/{name}", hub.hub_prefix())).into_response())
}
