//! Native accounts, NativeAuthenticator-compatible: sign-up, log-in,
//! log-out, changing one's own password. URLs and form field names are
//! NativeAuthenticator's; the rules are the hub's.

use axum::extract::{Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use berth_core::UserName;
use berth_hub::login::LoginOutcome;
use berth_hub::HubError;
use berth_store::now_ms;
use serde::Deserialize;

use super::upper_first;
use crate::cookies::{self, CookieSpec};
use crate::error::{ApiError, ApiResult};
use crate::extract::{MaybeUser, PageForm, PageUser, PeerAddr};
use crate::html::{self, alert, esc, xsrf_input, Level};
use crate::model::iso;
use crate::SharedHub;

/// A local redirect target under berth's base URL, or the home page.
pub fn safe_next(hub: &SharedHub, next: Option<&str>) -> String {
    let home = format!("{}home", hub.hub_prefix());
    let Some(n) = next.filter(|n| !n.is_empty()) else { return home };
    // Also as a browser may read it once decoded: no `//host`, `/\host`, controls.
    let decoded = percent_encoding::percent_decode_str(n).decode_utf8_lossy();
    let ok = n.starts_with(&hub.cfg.base_url)
        && n.starts_with('/')
        && [n, decoded.as_ref()].iter().all(|v| {
            !v.starts_with("//")
                && !v.starts_with("/\\")
                && !v.contains('\\')
                && !v.contains("://")
                && !v.chars().any(|c| c.is_control())
        });
    if ok {
        n.to_string()
    } else {
        home
    }
}

pub async fn root(State(hub): State<SharedHub>, MaybeUser(a): MaybeUser) -> Redirect {
    let p = hub.hub_prefix();
    if a.caller.is_some() {
        Redirect::to(&format!("{p}home"))
    } else {
        Redirect::to(&format!("{p}login"))
    }
}

pub async fn admin_redirect(State(hub): State<SharedHub>) -> Redirect {
    Redirect::to(&format!("{}authorize", hub.hub_prefix()))
}

// ------------------------------------------------------------------ sign-up

fn signup_form(hub: &SharedHub, xsrf: &str, username: &str) -> String {
    format!(
        r#"<div class="card"><h1>Sign up</h1>
<form method="post" action="{p}signup">{x}
<label for="username">User name</label><input type="text" id="username" name="username" value="{u}" autocapitalize="off" autocomplete="username" required>
<p class="muted">{rule}</p>
<label for="signup_password">Password</label><input type="password" id="signup_password" name="signup_password" autocomplete="new-password" required>
<p class="muted">At least {min} characters; common passwords are refused.</p>
<label for="signup_password_confirmation">Confirm password</label><input type="password" id="signup_password_confirmation" name="signup_password_confirmation" autocomplete="new-password" required>
<p><button type="submit">Create account</button></p></form>
<p class="muted">Already have an account? <a href="{p}login">Log in</a>.</p></div>"#,
        p = hub.hub_prefix(),
        x = xsrf_input(xsrf),
        u = esc(username),
        rule = esc(&upper_first(berth_core::names::NAME_RULE)),
        min = hub.auth.min_password_length,
    )
}

pub async fn signup_page(State(hub): State<SharedHub>, MaybeUser(a): MaybeUser) -> ApiResult<Html<String>> {
    if !hub.auth.signup {
        return Err(ApiError::not_found("sign-up is turned off on this hub; ask an admin for an account").page());
    }
    let body = signup_form(&hub, &a.xsrf, "");
    Ok(html::page(&hub.cfg.base_url, "Sign up", a.viewer().as_ref(), &body))
}

#[derive(Deserialize)]
pub struct SignupForm {
    #[serde(default)]
    username: String,
    #[serde(default)]
    signup_password: String,
    #[serde(default)]
    signup_password_confirmation: String,
}

pub async fn signup(
    State(hub): State<SharedHub>,
    MaybeUser(a): MaybeUser,
    PageForm(f): PageForm<SignupForm>,
) -> ApiResult<Html<String>> {
    if !hub.auth.signup {
        return Err(ApiError::not_found("sign-up is turned off on this hub; ask an admin for an account").page());
    }
    let render = |msg: String, level: Level, keep: &str| {
        let body = format!("{}{}", alert(level, &msg), signup_form(&hub, &a.xsrf, keep));
        html::page(&hub.cfg.base_url, "Sign up", a.viewer().as_ref(), &body)
    };
    let kept = UserName::normalize(&f.username).map(|n| n.to_string()).unwrap_or_else(|_| f.username.clone());
    let done = match hub.signup(&f.username, f.signup_password, &f.signup_password_confirmation).await {
        Ok(done) => done,
        Err(HubError::Name(e)) => {
            return Ok(render(
                format!("Something went wrong! {}", upper_first(&e.to_string())),
                Level::Danger,
                &f.username,
            ))
        }
        Err(HubError::PasswordMismatch) => {
            return Ok(render(
                "Your password did not match the confirmation. Please try again.".into(),
                Level::Danger,
                &kept,
            ))
        }
        Err(HubError::Password(e)) => {
            return Ok(render(format!("Something went wrong! {}.", upper_first(&e.to_string())), Level::Danger, &kept))
        }
        Err(HubError::UserExists { .. }) => {
            return Ok(render(
                "Something went wrong! It appears that this username is already in use. Please try again with a different username.".into(),
                Level::Danger,
                "",
            ))
        }
        Err(e) => return Err(ApiError::from(e).page()),
    };
    let is_admin = done.admin;
    let (msg, level) = if is_admin {
        (
            "The signup was successful! You can now go to the home page and log in to the system.".to_string(),
            Level::Success,
        )
    } else {
        (
            "Your information has been sent to the admin. You can log in once an admin has authorized your account."
                .to_string(),
            Level::Info,
        )
    };
    let body = format!(
        r#"{}<div class="card"><p><a class="button" href="{}login">Go to log-in</a></p></div>"#,
        alert(level, &msg),
        hub.hub_prefix()
    );
    Ok(html::page(&hub.cfg.base_url, "Sign up", a.viewer().as_ref(), &body))
}

// ------------------------------------------------------------------- log-in

#[derive(Deserialize, Default)]
pub struct NextQuery {
    next: Option<String>,
}

fn login_form(hub: &SharedHub, xsrf: &str, next: &str, username: &str) -> String {
    let next_q = percent_encoding::utf8_percent_encode(next, percent_encoding::NON_ALPHANUMERIC);
    let signup = if hub.auth.signup {
        format!(
            r#"<p class="muted">No account yet? <a href="{}signup">Sign up</a>; an admin will authorize it.</p>"#,
            hub.hub_prefix()
        )
    } else {
        String::new()
    };
    format!(
        r#"<div class="card"><h1>Log in</h1>
<form method="post" action="{p}login?next={next_q}">{x}
<label for="username_input">User name</label><input type="text" id="username_input" name="username" value="{u}" autocapitalize="off" autocomplete="username" autofocus required>
<label for="password_input">Password</label><input type="password" id="password_input" name="password" autocomplete="current-password" required>
<p><button type="submit" id="login_submit">Log in</button></p></form>{signup}</div>"#,
        p = hub.hub_prefix(),
        x = xsrf_input(xsrf),
        u = esc(username),
    )
}

pub async fn login_page(State(hub): State<SharedHub>, MaybeUser(a): MaybeUser, Query(q): Query<NextQuery>) -> Response {
    let next = safe_next(&hub, q.next.as_deref());
    if a.caller.is_some() {
        return Redirect::to(&next).into_response();
    }
    let body = login_form(&hub, &a.xsrf, q.next.as_deref().unwrap_or(""), "");
    html::page(&hub.cfg.base_url, "Log in", None, &body).into_response()
}

#[derive(Deserialize)]
pub struct LoginForm {
    #[serde(default)]
    username: String,
    #[serde(default)]
    password: String,
}

fn lock_message(until: i64, now: i64) -> String {
    let secs = ((until - now).max(0) + 999) / 1000;
    let wait = if secs >= 120 { format!("{} minutes", (secs + 59) / 60) } else { format!("{secs} seconds") };
    let at = iso(until);
    let clock = at.get(11..19).unwrap_or(&at);
    format!("Too many failed log-in attempts. Try again in {wait} (after {clock} UTC).")
}

/// Starts a session for `user`: the response's cookies.
pub(crate) async fn start_session(hub: &SharedHub, user: &str) -> ApiResult<Vec<HeaderValue>> {
    let sc = hub.login.start_session(hub.signer(), user).await?;
    let base = &hub.cfg.base_url;
    let secure = hub.cfg.secure_cookies;
    let max_age = Some(hub.auth.session_max_age_seconds.as_secs());
    let xsrf = sc.xsrf;
    let (session_name, session_path) = cookies::session_cookie(secure, base);
    let hub_path = hub.hub_prefix();
    Ok(vec![
        CookieSpec {
            name: session_name,
            value: &sc.cookie_value,
            path: session_path,
            http_only: true,
            secure,
            max_age,
        }
        .header(),
        CookieSpec {
            name: cookies::SESSION_ID,
            value: &sc.public_id,
            path: base,
            http_only: true,
            secure,
            max_age: None,
        }
        .header(),
        CookieSpec { name: cookies::XSRF, value: &xsrf, path: hub_path, http_only: true, secure, max_age: None }
            .header(),
    ])
}

pub async fn login(
    State(hub): State<SharedHub>,
    MaybeUser(a): MaybeUser,
    PeerAddr(addr): PeerAddr,
    Query(q): Query<NextQuery>,
    PageForm(f): PageForm<LoginForm>,
) -> ApiResult<Response> {
    let now = now_ms();
    let outcome = hub.login.check(&f.username, f.password, &addr).await.map_err(|e| ApiError::from(e).page())?;
    let message = match outcome {
        LoginOutcome::Ok(user) => {
            let set = start_session(&hub, &user.name).await.map_err(ApiError::page)?;
            tracing::info!(user = %user.name, "logged in");
            let mut resp = Redirect::to(&safe_next(&hub, q.next.as_deref())).into_response();
            *resp.status_mut() = StatusCode::FOUND;
            for v in set {
                resp.headers_mut().append(header::SET_COOKIE, v);
            }
            return Ok(resp);
        }
        LoginOutcome::Invalid => "Invalid username or password.".to_string(),
        LoginOutcome::Pending(name) => format!("User {name} has not been authorized by an administrator yet."),
        LoginOutcome::Locked { until } => lock_message(until, now),
    };
    let body = format!(
        r#"<p class="login_error alert alert-danger" role="alert">{}</p>{}"#,
        esc(&message),
        login_form(&hub, &a.xsrf, q.next.as_deref().unwrap_or(""), &f.username)
    );
    Ok(html::page(&hub.cfg.base_url, "Log in", None, &body).into_response())
}

/// `GET /hub/logout`: a button, never the log-out itself (a link or an
/// image elsewhere must not log anyone out).
pub async fn logout_page(State(hub): State<SharedHub>, MaybeUser(a): MaybeUser) -> Response {
    let Some(viewer) = a.viewer() else {
        return Redirect::to(&format!("{}login", hub.hub_prefix())).into_response();
    };
    let body = format!(
        r#"<div class="card"><h1>Log out</h1><form method="post" action="{p}logout">{x}<button type="submit" id="logout">Log out</button></form></div>"#,
        p = hub.hub_prefix(),
        x = xsrf_input(&a.xsrf),
    );
    html::page(&hub.cfg.base_url, "Log out", Some(&viewer), &body).into_response()
}

/// `POST /hub/logout`: ends this session and what servers got through it.
pub async fn logout(State(hub): State<SharedHub>, MaybeUser(a): MaybeUser) -> ApiResult<Response> {
    if let Some(c) = &a.caller {
        hub.logout(c).await.map_err(|e| ApiError::from(e).page())?;
    }
    let base = &hub.cfg.base_url;
    let (session_name, session_path) = cookies::session_cookie(hub.cfg.secure_cookies, base);
    let mut resp = Redirect::to(&format!("{}login", hub.hub_prefix())).into_response();
    let h = resp.headers_mut();
    h.append(header::SET_COOKIE, cookies::clear(session_name, session_path));
    h.append(header::SET_COOKIE, cookies::clear(cookies::SESSION_ID, base));
    h.append(header::SET_COOKIE, cookies::clear(cookies::XSRF, hub.hub_prefix()));
    Ok(resp)
}

// --------------------------------------------------------- change password

pub(super) fn change_password_form(hub: &SharedHub, xsrf: &str, target: Option<&str>) -> String {
    let (action, old, title) = match target {
        Some(u) => (format!("{}change-password/{}", hub.hub_prefix(), esc(u)), String::new(), format!("Set a new password for {}", esc(u))),
        None => (
            format!("{}change-password", hub.hub_prefix()),
            r#"<label for="old_password">Current password</label><input type="password" id="old_password" name="old_password" autocomplete="current-password" required>"#.to_string(),
            "Change your password".to_string(),
        ),
    };
    format!(
        r#"<div class="card"><h1>{title}</h1><form method="post" action="{action}">{x}{old}
<label for="new_password">New password</label><input type="password" id="new_password" name="new_password" autocomplete="new-password" required>
<label for="new_password_confirmation">Confirm new password</label><input type="password" id="new_password_confirmation" name="new_password_confirmation" autocomplete="new-password" required>
<p class="muted">At least {min} characters. Other sessions of this account are logged out.</p>
<p><button type="submit">Change password</button></p></form></div>"#,
        x = xsrf_input(xsrf),
        min = hub.auth.min_password_length,
    )
}

pub async fn change_password_page(State(hub): State<SharedHub>, user: PageUser) -> Html<String> {
    let body = change_password_form(&hub, &user.xsrf, None);
    html::page(&hub.cfg.base_url, "Change password", Some(&user.viewer()), &body)
}

#[derive(Deserialize)]
pub struct PasswordForm {
    #[serde(default)]
    old_password: String,
    #[serde(default)]
    pub(super) new_password: String,
    #[serde(default)]
    pub(super) new_password_confirmation: String,
}

pub async fn change_password(
    State(hub): State<SharedHub>,
    user: PageUser,
    PageForm(f): PageForm<PasswordForm>,
) -> ApiResult<Html<String>> {
    let result =
        hub.change_own_password(&user.caller, f.old_password, f.new_password, &f.new_password_confirmation).await;
    let msg = match result {
        Ok(()) => alert(Level::Success, "Your password has been changed successfully!"),
        Err(HubError::WrongPassword) => alert(Level::Danger, "Your current password was incorrect. Please try again."),
        Err(HubError::PasswordMismatch) => {
            alert(Level::Danger, "Your new password didn't match the confirmation. Please try again.")
        }
        Err(HubError::Password(e)) => alert(Level::Danger, &(upper_first(&e.to_string()) + ".")),
        Err(e) => alert(Level::Danger, &ApiError::from(e).message),
    };
    let body = format!("{msg}{}", change_password_form(&hub, &user.xsrf, None));
    Ok(html::page(&hub.cfg.base_url, "Change password", Some(&user.viewer()), &body))
}
