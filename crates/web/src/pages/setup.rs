//! `/hub/setup?code=…`: the page the one-time link berth prints at its
//! first start opens, where the operator makes the first admin.

use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use berth_hub::HubError;
use serde::Deserialize;

use super::login::start_session;
use super::upper_first;
use crate::error::{ApiError, ApiResult};
use crate::extract::{MaybeUser, PageForm};
use crate::html::{self, alert, esc, xsrf_input, Level};
use crate::SharedHub;

#[derive(Deserialize, Default)]
pub struct SetupQuery {
    #[serde(default)]
    code: String,
}

fn form(hub: &SharedHub, xsrf: &str, code: &str, name: &str, notice: &str) -> String {
    format!(
        r#"{notice}<div class="card"><h1>Make the first admin</h1>
<p class="muted">This link was printed when berth started; it works once. The admin approves everyone else who signs up.</p>
<form method="post" action="{p}setup">{x}<input type="hidden" name="code" value="{code}">
<label for="username">User name</label><input type="text" id="username" name="username" value="{name}" autocapitalize="off" required>
<label for="password">Password</label><input type="password" id="password" name="password" autocomplete="new-password" required>
<label for="password_confirmation">Confirm password</label><input type="password" id="password_confirmation" name="password_confirmation" autocomplete="new-password" required>
<p><button type="submit" id="setup">Create the admin</button></p></form></div>"#,
        p = hub.hub_prefix(),
        x = xsrf_input(xsrf),
        code = esc(code),
        name = esc(name),
    )
}

pub async fn setup_page(
    State(hub): State<SharedHub>,
    MaybeUser(a): MaybeUser,
    Query(q): Query<SetupQuery>,
) -> ApiResult<Response> {
    if !hub.setup_open(&q.code).await.map_err(|e| ApiError::from(e).page())? {
        return Err(ApiError::from(HubError::SetupClosed).page());
    }
    let body = form(&hub, &a.xsrf, &q.code, &hub.cfg.admin, "");
    Ok(html::page(&hub.cfg.base_url, "Set up", None, &body).into_response())
}

#[derive(Deserialize)]
pub struct SetupForm {
    #[serde(default)]
    code: String,
    #[serde(default)]
    username: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    password_confirmation: String,
}

pub async fn setup(
    State(hub): State<SharedHub>,
    MaybeUser(a): MaybeUser,
    PageForm(f): PageForm<SetupForm>,
) -> ApiResult<Response> {
    let again = |msg: String| {
        let body = form(&hub, &a.xsrf, &f.code, &f.username, &alert(Level::Danger, &msg));
        (StatusCode::BAD_REQUEST, html::page(&hub.cfg.base_url, "Set up", None, &body)).into_response()
    };
    let user = match hub.complete_setup(&f.code, &f.username, f.password.clone(), &f.password_confirmation).await {
        Ok(u) => u,
        Err(HubError::Name(e)) => return Ok(again(upper_first(&e.to_string()))),
        Err(HubError::Password(e)) => return Ok(again(upper_first(&e.to_string()) + ".")),
        Err(HubError::PasswordMismatch) => return Ok(again("The password did not match its confirmation.".into())),
        Err(e) => return Err(ApiError::from(e).page()),
    };
    let cookies = start_session(&hub, &user.name).await.map_err(ApiError::page)?;
    let mut resp = Redirect::to(&format!("{}home", hub.hub_prefix())).into_response();
    *resp.status_mut() = StatusCode::FOUND;
    for c in cookies {
        resp.headers_mut().append(header::SET_COOKIE, c);
    }
    Ok(resp)
}
