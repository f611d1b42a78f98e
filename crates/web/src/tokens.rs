//! API tokens: the token page and the logic the REST API shares with it.
//! Secrets are shown once, at creation; the store keeps their SHA-256.

use axum::extract::{Path, State};
use axum::response::{Html, IntoResponse, Redirect, Response};
use berth_auth::{hash_token, new_token};
use berth_core::{ScopeSet, Target};
use berth_store::{now_ms, NewToken, Token, TokenKind};
use serde::Deserialize;

use crate::accounts::PageForm;
use crate::caller::{Caller, PageUser};
use crate::error::{ApiError, ApiResult};
use crate::html::{self, alert, esc, xsrf_input, Level, Viewer};
use crate::model::iso;
use crate::SharedHub;

/// Longest expiry a token may ask for: ten years, so arithmetic stays sane.
const MAX_EXPIRES_IN: i64 = 10 * 365 * 24 * 3600;

pub struct TokenRequest {
    pub note: String,
    pub expires_in: Option<i64>,
    pub scopes: Option<Vec<String>>,
}

/// Creates a token for `owner` on behalf of `caller`: the token cannot hold
/// more than the owner (and, for tokens made with a token, than the caller).
pub async fn create_token(
    hub: &SharedHub,
    caller: &Caller,
    owner: &berth_store::User,
    req: TokenRequest,
) -> ApiResult<(Token, String)> {
    caller.require("tokens", Target::User(&owner.name))?;
    let owner_scopes = ScopeSet::for_user(&owner.name, owner.admin);
    let requested: Vec<String> = req.scopes.clone().unwrap_or_default();
    let requested_set = if requested.is_empty() {
        owner_scopes.clone()
    } else {
        ScopeSet::parse_list(&requested, Some(&owner.name)).map_err(|e| ApiError::bad_request(e.to_string()))?
    };
    let missing = owner_scopes.missing_from(&requested_set);
    if !missing.is_empty() {
        let names: Vec<String> = missing.iter().map(|s| s.to_string()).collect();
        return Err(ApiError::forbidden(format!(
            "Not assigning requested scopes {} not held by {}",
            names.join(", "),
            owner.name
        )));
    }
    if matches!(caller.via, crate::caller::Via::Token { .. }) {
        let missing = caller.scopes.missing_from(&requested_set);
        if !missing.is_empty() {
            let names: Vec<String> = missing.iter().map(|s| s.to_string()).collect();
            return Err(ApiError::forbidden(format!(
                "Not assigning requested scopes {} not held by the token making this request",
                names.join(", ")
            )));
        }
    }
    let expires_at = match req.expires_in {
        None | Some(0) => None,
        Some(s) if s < 0 => return Err(ApiError::bad_request("expires_in must be a positive number of seconds")),
        Some(s) if s > MAX_EXPIRES_IN => {
            return Err(ApiError::bad_request(format!("expires_in must be at most {MAX_EXPIRES_IN} seconds")))
        }
        Some(s) => Some(now_ms() + s * 1000),
    };
    if req.note.chars().count() > 1000 {
        return Err(ApiError::bad_request("the note is longer than 1000 characters"));
    }
    let secret = new_token();
    // An empty scope list means "everything the owner holds", kept symbolic
    // so the token follows the owner's role.
    let stored_scopes = if requested.is_empty() { vec!["inherit".to_string()] } else { requested };
    let token = hub
        .store
        .create_token(&NewToken {
            hash: hash_token(secret.expose()),
            user: owner.name.clone(),
            kind: TokenKind::Api,
            server: None,
            scopes: stored_scopes,
            note: req.note,
            expires_at,
            session_id: None,
            oauth_client: None,
        })
        .await?;
    let _ = hub.store.add_event(caller.name(), "token-create", &owner.name, &token.id).await;
    Ok((token, secret.expose().to_string()))
}

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
    let v = Viewer { name: user.caller.name(), admin: user.caller.user.admin, xsrf: &user.xsrf };
    Ok(html::page(&hub.cfg.base_url, "Tokens", Some(&v), &body))
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
    let notice = match create_token(&hub, &user.caller, &owner, req).await {
        Ok((_, secret)) => format!(
            r#"<div class="alert alert-success" role="alert"><p>Your new API token (shown only now; copy it):</p><p><code id="new-token">{}</code></p></div>"#,
            esc(&secret)
        ),
        Err(e) => alert(Level::Danger, &e.message),
    };
    render(&hub, &user, &notice).await
}

pub async fn token_revoke(State(hub): State<SharedHub>, user: PageUser, Path(id): Path<String>) -> ApiResult<Response> {
    hub.store.delete_token(user.caller.name(), &id).await.map_err(|e| ApiError::from(e).page())?;
    let _ = hub.store.add_event(user.caller.name(), "token-revoke", user.caller.name(), &id).await;
    Ok(Redirect::to(&format!("{}token", hub.hub_prefix())).into_response())
}
