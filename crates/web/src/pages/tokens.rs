//! The token page: a user's API tokens, a form for a new one (its secret
//! shown once), revocation.

use axum::extract::{Path, State};
use axum::response::{Html, IntoResponse, Redirect, Response};
use berth_hub::tokens::TokenRequest;
use berth_store::Token;
use serde::Deserialize;

use crate::error::{ApiError, ApiResult};
use crate::extract::{PageForm, PageUser};
use crate::html::{self, alert, esc, xsrf_input, Level};
use crate::model::iso;
use crate::SharedHub;

fn token_table(hub: &SharedHub, xsrf: &str, tokens: &[Token]) -> String {
    if tokens.is_empty() {
        return r#"<p class="muted">No API tokens yet.</p>"#.into();
    }
    let p = hub.hub_prefix();
    let mut rows = String::new();
    for t in tokens {
        let scopes = if t.scopes == ["inherit"] { "all of yours".to_string() } else { t.scopes.join(" ") };
        rows.push_str(&format!(
            r#"<tr id="token-{id}"><td>{note}</td><td><code>{scopes}</code></td><td class="muted">{created}</td><td class="muted">{last}</td><td class="muted">{exp}</td>
<td><form method="post" action="{p}token/{id}/revoke">{x}<button class="danger" type="submit">Revoke</button></form></td></tr>"#,
            id = esc(&t.id),
            note = if t.note.is_empty() { "<span class=\"muted\">(no note)</span>".to_string() } else { esc(&t.note) },
            scopes = esc(&scopes),
            created = iso(t.created).get(..16).unwrap_or("").replace('T', " "),
            last = t.last_activity.map(|x| iso(x).get(..16).unwrap_or("").replace('T', " ")).unwrap_or_else(|| "never".into()),
            exp = t.expires_at.map(|x| iso(x).get(..16).unwrap_or("").replace('T', " ")).unwrap_or_else(|| "never".into()),
            x = xsrf_input(xsrf),
        ));
    }
    format!(
        "<table><thead><tr><th>Note</th><th>Scopes</th><th>Created</th><th>Last used</th><th>Expires</th><th></th></tr></thead><tbody>{rows}</tbody></table>"
    )
}

async fn render(hub: &SharedHub, user: &PageUser, notice: &str) -> ApiResult<Html<String>> {
    let tokens = hub.store.list_tokens(user.caller.name()).await.map_err(|e| ApiError::from(e).page())?;
    let p = hub.hub_prefix();
    let body = format!(
        r#"<h1>API tokens</h1>{notice}<div class="card"><h2>New token</h2>
<form method="post" action="{p}token">{x}
<label for="note">Note</label><input type="text" id="note" name="note" placeholder="what it is for">
<label for="expires_in">Expires</label><select id="expires_in" name="expires_in">
<option value="3600">in 1 hour</option><option value="86400">in 1 day</option><option value="604800">in 1 week</option>
<option value="2592000" selected>in 30 days</option><option value="0">never</option></select>
<label for="scopes">Scopes</label><input type="text" id="scopes" name="scopes" placeholder="blank: all of yours; e.g. read:users!user access:servers!user">
<p><button type="submit">Create token</button></p></form></div>
<div class="card"><h2>Your tokens</h2>{table}</div>"#,
        x = xsrf_input(&user.xsrf),
        table = token_table(hub, &user.xsrf, &tokens),
    );
    Ok(html::page(&hub.cfg.base_url, "Tokens", Some(&user.viewer()), &body))
}

pub async fn token_page(State(hub): State<SharedHub>, user: PageUser) -> ApiResult<Html<String>> {
    render(&hub, &user, "").await
}

#[derive(Deserialize)]
pub struct TokenForm {
    #[serde(default)]
    note: String,
    #[serde(default)]
    expires_in: String,
    #[serde(default)]
    scopes: String,
}

pub async fn token_create(
    State(hub): State<SharedHub>,
    user: PageUser,
    PageForm(f): PageForm<TokenForm>,
) -> ApiResult<Html<String>> {
    let expires_in = match f.expires_in.trim() {
        "" => None,
        s => match s.parse::<i64>() {
            Ok(v) => Some(v),
            Err(_) => return render(&hub, &user, &alert(Level::Danger, "Expiry must be a number of seconds.")).await,
        },
    };
    let scopes: Vec<String> = f.scopes.split_whitespace().map(str::to_string).collect();
    let req = TokenRequest { note: f.note, expires_in, scopes: Some(scopes) };
    let owner = user.caller.user.clone();
    let notice = match hub.create_token(&user.caller, &owner, req).await {
        Ok((_, secret)) => format!(
            r#"<div class="alert alert-success" role="alert"><p>Your new API token (shown only now; copy it):</p><p><code id="new-token">{}</code></p></div>"#,
            esc(&secret)
        ),
        Err(e) => alert(Level::Danger, &ApiError::from(e).message),
    };
    render(&hub, &user, &notice).await
}

pub async fn token_revoke(State(hub): State<SharedHub>, user: PageUser, Path(id): Path<String>) -> ApiResult<Response> {
    hub.revoke_token(&user.caller, user.caller.name(), &id).await.map_err(|e| ApiError::from(e).page())?;
    Ok(Redirect::to(&format!("{}token", hub.hub_prefix())).into_response())
}
