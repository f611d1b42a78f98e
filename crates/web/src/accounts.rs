//! Native accounts, NativeAuthenticator-compatible: sign-up, log-in,
//! log-out, password changes, and the admin's list of users. URLs and form
//! field names are NativeAuthenticator's; changing an account is always a
//! POST with an XSRF token (never its GET toggle).

use axum::body::Bytes;
use axum::extract::{FromRequest, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use berth_auth::{SessionCookie, Verified};
use berth_core::UserName;
use berth_store::{now_ms, NewUser, StoreError, UserQuery};
use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::caller::{MaybeUser, PageUser, RequestAuth};
use crate::cookies::{self, CookieSpec};
use crate::error::{ApiError, ApiResult};
use crate::html::{self, alert, esc, xsrf_input, Level, Viewer};
use crate::model::iso;
use crate::SharedHub;

/// A form body; a malformed one is a 400 page, not a panic or plain text.
pub struct PageForm<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for PageForm<T> {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes =
            Bytes::from_request(req, state).await.map_err(|e| ApiError::new(e.status(), e.body_text()).page())?;
        serde_urlencoded::from_bytes(&bytes)
            .map(PageForm)
            .map_err(|e| ApiError::bad_request(format!("malformed form: {e}")).page())
    }
}

fn viewer<'a>(u: &'a PageUser) -> Viewer<'a> {
    Viewer { name: u.caller.name(), admin: u.caller.user.admin, xsrf: &u.xsrf }
}

fn maybe_viewer(a: &RequestAuth) -> Option<Viewer<'_>> {
    a.caller.as_ref().map(|c| Viewer { name: c.name(), admin: c.user.admin, xsrf: &a.xsrf })
}

/// A local redirect target under berth's base URL, or the home page.
pub fn safe_next(hub: &SharedHub, next: Option<&str>) -> String {
    let home = format!("{}home", hub.hub_prefix());
    let Some(n) = next.filter(|n| !n.is_empty()) else { return home };
    let ok = n.starts_with(&hub.cfg.base_url)
        && !n.starts_with("//")
        && !n.contains('\\')
        && !n.contains("://")
        && !n.chars().any(|c| c.is_control());
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
    match crate::spawn::home_servers(&hub, &user).await {
        Ok(cards) => body.push_str(&cards),
        Err(e) => body.push_str(&alert(Level::Danger, &e.message)),
    }
    let allowed = hub.store.user_limits(user.caller.name()).await.ok().and_then(|l| l.templates);
    body.push_str(&crate::spawn::template_picker(&hub, &user.xsrf, allowed.as_deref()));
    body.push_str(&format!(
        r#"<div class="card"><h2>Your account</h2><p>API tokens for scripts and JupyterHub clients: <a href="{base}hub/token">Tokens</a>.</p></div>"#
    ));
    html::page(base, "Home", Some(&viewer(&user)), &body)
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

fn upper_first(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
        None => String::new(),
    }
}

pub async fn signup_page(State(hub): State<SharedHub>, MaybeUser(a): MaybeUser) -> ApiResult<Html<String>> {
    if !hub.auth.signup {
        return Err(ApiError::not_found("sign-up is turned off on this hub; ask an admin for an account").page());
    }
    let body = signup_form(&hub, &a.xsrf, "");
    Ok(html::page(&hub.cfg.base_url, "Sign up", maybe_viewer(&a).as_ref(), &body))
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
        html::page(&hub.cfg.base_url, "Sign up", maybe_viewer(&a).as_ref(), &body)
    };
    let name = match UserName::normalize(&f.username) {
        Ok(n) => n,
        Err(e) => {
            return Ok(render(
                format!("Something went wrong! {}", upper_first(&e.to_string())),
                Level::Danger,
                &f.username,
            ))
        }
    };
    if f.signup_password != f.signup_password_confirmation {
        return Ok(render(
            "Your password did not match the confirmation. Please try again.".into(),
            Level::Danger,
            name.as_str(),
        ));
    }
    if let Err(e) = hub.auth.password_policy().check(name.as_str(), &f.signup_password) {
        return Ok(render(
            format!("Something went wrong! {}.", upper_first(&e.to_string())),
            Level::Danger,
            name.as_str(),
        ));
    }
    let is_admin = name.as_str() == hub.cfg.admin;
    let hash = hub.hash_password(f.signup_password).await?;
    let new = NewUser { name: name.to_string(), admin: is_admin, authorized: is_admin, password_hash: Some(hash) };
    match hub.store.create_user(&new).await {
        Ok(_) => {}
        Err(StoreError::Conflict { .. }) => {
            return Ok(render(
                "Something went wrong! It appears that this username is already in use. Please try again with a different username.".into(),
                Level::Danger,
                "",
            ))
        }
        Err(e) => return Err(ApiError::from(e).page()),
    }
    let _ =
        hub.store.add_event(name.as_str(), "signup", name.as_str(), if is_admin { "admin" } else { "pending" }).await;
    tracing::info!(user = %name, admin = is_admin, "sign-up");
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
    Ok(html::page(&hub.cfg.base_url, "Sign up", maybe_viewer(&a).as_ref(), &body))
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

enum LoginOutcome {
    Ok(berth_store::User),
    Invalid,
    Pending,
    Locked { until: i64 },
}

fn lock_message(until: i64, now: i64) -> String {
    let secs = ((until - now).max(0) + 999) / 1000;
    let wait = if secs >= 120 { format!("{} minutes", (secs + 59) / 60) } else { format!("{secs} seconds") };
    let at = iso(until);
    let clock = at.get(11..19).unwrap_or(&at);
    format!("Too many failed log-in attempts. Try again in {wait} (after {clock} UTC).")
}

async fn check_login(hub: &SharedHub, raw_name: &str, password: String) -> ApiResult<LoginOutcome> {
    let now = now_ms();
    let policy = hub.auth.lockout();
    let name = UserName::normalize(raw_name).ok();
    let user = match &name {
        Some(n) => hub.store.get_user_uncached(n.as_str()).await?,
        None => None,
    };
    let Some(user) = user else {
        // Unknown names cost the same time and lock out the same way.
        let key = raw_name.trim().to_lowercase();
        let prior = hub.unknown_failures.lock().ok().and_then(|m| m.get(&key).copied());
        if let Some(until) = policy.locked_until(prior.and_then(|p| p.2), now) {
            return Ok(LoginOutcome::Locked { until });
        }
        hub.verify_password(None, password).await?;
        let (failed, last) = prior.map(|p| (p.0, p.1)).unwrap_or((0, None));
        let next = policy.after_failure(failed, last, now);
        if let Ok(mut m) = hub.unknown_failures.lock() {
            if m.len() > 10_000 {
                m.clear();
            }
            m.insert(key, (next.failed, Some(now), next.locked_until));
        }
        return Ok(LoginOutcome::Invalid);
    };
    if let Some(until) = policy.locked_until(user.locked_until, now) {
        return Ok(LoginOutcome::Locked { until });
    }
    let verdict = hub.verify_password(user.password_hash.clone(), password.clone()).await?;
    if !verdict.ok() {
        let next = policy.after_failure(user.failed_logins, user.last_failed_login, now);
        hub.store.record_login_failure(&user.name, next.failed, now, next.locked_until).await?;
        if next.locked_until.is_some() {
            tracing::warn!(user = %user.name, failures = next.failed, "account locked after failed log-ins");
        }
        return Ok(LoginOutcome::Invalid);
    }
    if !user.authorized {
        return Ok(LoginOutcome::Pending);
    }
    if verdict == Verified::OkRehash {
        let hash = hub.hash_password(password).await?;
        hub.store.rehash_password(&user.name, &hash).await?;
        tracing::info!(user = %user.name, "re-hashed an imported or outdated password hash with argon2id");
    }
    hub.store.record_login_success(&user.name, now).await?;
    Ok(LoginOutcome::Ok(user))
}

/// Starts a session for `user`: the response's cookies.
pub async fn start_session(hub: &SharedHub, user: &str) -> ApiResult<Vec<HeaderValue>> {
    let sc = SessionCookie::new(&hub.signer);
    hub.store.create_session(&sc.id_hash, &sc.public_id, user).await?;
    let base = &hub.cfg.base_url;
    let secure = hub.cfg.secure_cookies;
    let max_age = Some(hub.auth.session_max_age_seconds.as_secs());
    let xsrf = hub.signer.xsrf_token(&format!("s:{}", sc.public_id), now_ms());
    let hub_path = hub.hub_prefix();
    Ok(vec![
        CookieSpec { name: cookies::SESSION, value: &sc.cookie_value, path: base, http_only: true, secure, max_age }
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
        CookieSpec { name: cookies::XSRF, value: &xsrf, path: hub_path, http_only: false, secure, max_age: None }
            .header(),
    ])
}

pub async fn login(
    State(hub): State<SharedHub>,
    MaybeUser(a): MaybeUser,
    Query(q): Query<NextQuery>,
    PageForm(f): PageForm<LoginForm>,
) -> ApiResult<Response> {
    let now = now_ms();
    let outcome = check_login(&hub, &f.username, f.password).await.map_err(ApiError::page)?;
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
        LoginOutcome::Pending => format!(
            "User {} has not been authorized by an administrator yet.",
            UserName::normalize(&f.username).map(|n| n.to_string()).unwrap_or_default()
        ),
        LoginOutcome::Locked { until } => lock_message(until, now),
    };
    let body = format!(
        r#"<p class="login_error alert alert-danger" role="alert">{}</p>{}"#,
        esc(&message),
        login_form(&hub, &a.xsrf, q.next.as_deref().unwrap_or(""), &f.username)
    );
    Ok(html::page(&hub.cfg.base_url, "Log in", None, &body).into_response())
}

pub async fn logout(State(hub): State<SharedHub>, MaybeUser(a): MaybeUser) -> ApiResult<Response> {
    if let Some(c) = &a.caller {
        if let crate::caller::Via::Session { id_hash, .. } = &c.via {
            hub.store.revoke_session(id_hash).await?;
            tracing::info!(user = %c.name(), "logged out");
        }
    }
    let base = &hub.cfg.base_url;
    let mut resp = Redirect::to(&format!("{}login", hub.hub_prefix())).into_response();
    let h = resp.headers_mut();
    h.append(header::SET_COOKIE, cookies::clear(cookies::SESSION, base));
    h.append(header::SET_COOKIE, cookies::clear(cookies::SESSION_ID, base));
    h.append(header::SET_COOKIE, cookies::clear(cookies::XSRF, hub.hub_prefix()));
    Ok(resp)
}

// --------------------------------------------------------- change password

fn change_password_form(hub: &SharedHub, xsrf: &str, target: Option<&str>) -> String {
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
    html::page(&hub.cfg.base_url, "Change password", Some(&viewer(&user)), &body)
}

#[derive(Deserialize)]
pub struct PasswordForm {
    #[serde(default)]
    old_password: String,
    #[serde(default)]
    new_password: String,
    #[serde(default)]
    new_password_confirmation: String,
}

pub async fn change_password(
    State(hub): State<SharedHub>,
    user: PageUser,
    PageForm(f): PageForm<PasswordForm>,
) -> ApiResult<Html<String>> {
    let name = user.caller.name().to_string();
    let result: Result<(), String> = async {
        let fresh = hub.store.get_user_uncached(&name).await.map_err(|e| ApiError::from(e).message)?;
        let stored = fresh.and_then(|u| u.password_hash);
        let ok = hub.verify_password(stored, f.old_password.clone()).await.map_err(|e| e.message)?;
        if !ok.ok() {
            return Err("Your current password was incorrect. Please try again.".into());
        }
        if f.new_password != f.new_password_confirmation {
            return Err("Your new password didn't match the confirmation. Please try again.".into());
        }
        hub.auth.password_policy().check(&name, &f.new_password).map_err(|e| upper_first(&e.to_string()) + ".")?;
        let hash = hub.hash_password(f.new_password.clone()).await.map_err(|e| e.message)?;
        let keep = match &user.caller.via {
            crate::caller::Via::Session { id_hash, .. } => Some(id_hash.as_str()),
            _ => None,
        };
        hub.store.set_password(&name, &hash, keep).await.map_err(|e| ApiError::from(e).message)?;
        Ok(())
    }
    .await;
    let msg = match result {
        Ok(()) => {
            let _ = hub.store.add_event(&name, "password-change", &name, "").await;
            alert(Level::Success, "Your password has been changed successfully!")
        }
        Err(m) => alert(Level::Danger, &m),
    };
    let body = format!("{msg}{}", change_password_form(&hub, &user.xsrf, None));
    Ok(html::page(&hub.cfg.base_url, "Change password", Some(&viewer(&user)), &body))
}

fn require_admin(user: &PageUser) -> ApiResult<()> {
    if user.caller.user.admin {
        Ok(())
    } else {
        Err(ApiError::forbidden("only admins may do this").page())
    }
}

pub async fn admin_password_page(
    State(hub): State<SharedHub>,
    user: PageUser,
    Path(name): Path<String>,
) -> ApiResult<Html<String>> {
    require_admin(&user)?;
    if hub.store.get_user(&name).await?.is_none() {
        return Err(ApiError::not_found(format!("user {name} not found")).page());
    }
    let body = change_password_form(&hub, &user.xsrf, Some(&name));
    Ok(html::page(&hub.cfg.base_url, "Change password", Some(&viewer(&user)), &body))
}

pub async fn admin_password(
    State(hub): State<SharedHub>,
    user: PageUser,
    Path(name): Path<String>,
    PageForm(f): PageForm<PasswordForm>,
) -> ApiResult<Html<String>> {
    require_admin(&user)?;
    if hub.store.get_user(&name).await?.is_none() {
        return Err(ApiError::not_found(format!("user {name} not found")).page());
    }
    let msg = if f.new_password != f.new_password_confirmation {
        alert(Level::Danger, "The new password didn't match the confirmation. Please try again.")
    } else if let Err(e) = hub.auth.password_policy().check(&name, &f.new_password) {
        alert(Level::Danger, &(upper_first(&e.to_string()) + "."))
    } else {
        let hash = hub.hash_password(f.new_password).await.map_err(ApiError::page)?;
        hub.store.set_password(&name, &hash, None).await.map_err(|e| ApiError::from(e).page())?;
        let _ = hub.store.add_event(user.caller.name(), "password-reset", &name, "").await;
        alert(Level::Success, &format!("The password for {name} has been changed successfully"))
    };
    let body = format!("{msg}{}", change_password_form(&hub, &user.xsrf, Some(&name)));
    Ok(html::page(&hub.cfg.base_url, "Change password", Some(&viewer(&user)), &body))
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
    require_admin(&user)?;
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
        rows.push_str(&format!(
            r#"<tr id="{n}"><td>{n}</td><td>{status}</td><td>{admin}</td><td class="muted">{created}</td><td class="muted">{last}</td><td class="ssh-sessions">{ssh}</td><td>{actions}</td></tr>"#,
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
    let gpus = hub.servers.gpu_report().await.unwrap_or_default();
    let gpu_card = if gpus.is_empty() {
        format!(
            r#"<div class="card"><h2>GPUs</h2><p class="muted">No GPUs (mode {}).</p></div>"#,
            hub.servers.gpu_cfg.mode
        )
    } else {
        let mut rows = String::new();
        for g in &gpus {
            let id = g["id"].as_str().unwrap_or("");
            let shared = g["shared"].as_bool().unwrap_or(false);
            let holders: Vec<&str> =
                g["holders"].as_array().map(|a| a.iter().filter_map(|h| h.as_str()).collect()).unwrap_or_default();
            rows.push_str(&format!(
                r#"<tr><td><code>{id}</code></td><td>{name}</td><td>{holders}</td><td><form method="post" action="{p}gpus/{id}">{x}<input type="hidden" name="action" value="{act}"><button class="secondary" type="submit">{label}</button></form></td></tr>"#,
                id = esc(id),
                name = esc(g["name"].as_str().unwrap_or("")),
                holders = if holders.is_empty() { "free".to_string() } else { esc(&holders.join(", ")) },
                act = if shared { "exclusive" } else { "share" },
                label = if shared { "Shared: make exclusive" } else { "Exclusive: share" },
            ));
        }
        format!(
            r#"<div class="card"><h2>GPUs</h2><table><thead><tr><th>Id</th><th>Name</th><th>Held by</th><th></th></tr></thead><tbody>{rows}</tbody></table></div>"#
        )
    };
    let body = format!(
        r#"<h1>Users</h1>{msg}{gpu_card}<div class="card"><form method="get" action="{p}authorize">
<input type="text" name="q" value="{q}" placeholder="name starts with…" style="max-width:16rem;display:inline-block">
<label style="display:inline;font-weight:normal"><input type="checkbox" name="pending" value="1" {checked}> pending only</label>
<button class="secondary" type="submit">Filter</button></form>
<p class="muted">{total} user(s)</p>
<table><thead><tr><th>Name</th><th>Status</th><th>Role</th><th>Created</th><th>Last active</th><th>SSH sessions</th><th></th></tr></thead><tbody>{rows}</tbody></table>{more}</div>"#,
        q = esc(&lq.q),
        checked = if pending_only { "checked" } else { "" },
    );
    Ok(html::page(&hub.cfg.base_url, "Users", Some(&viewer(&user)), &body))
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
    require_admin(&user)?;
    let me = user.caller.name().to_string();
    let page_err = |e: ApiError| e.page();
    if hub.store.get_user(&name).await?.is_none() {
        return Err(ApiError::not_found(format!("user {name} not found")).page());
    }
    let done = match f.action.as_str() {
        "authorize" => {
            hub.store.set_authorized(&name, true).await.map_err(|e| page_err(e.into()))?;
            format!("{name} is authorized")
        }
        "unauthorize" => {
            if name == me {
                return Err(ApiError::bad_request("you cannot unauthorize yourself").page());
            }
            hub.store.set_authorized(&name, false).await.map_err(|e| page_err(e.into()))?;
            hub.store.revoke_user_sessions(&name).await.map_err(|e| page_err(e.into()))?;
            hub.servers.stop_all_of(&name).await;
            format!("{name} is no longer authorized")
        }
        "make-admin" => {
            hub.store.set_admin(&name, true).await.map_err(|e| page_err(e.into()))?;
            format!("{name} is an admin")
        }
        "remove-admin" => {
            if name == me {
                return Err(ApiError::bad_request("you cannot remove your own admin rights; ask another admin").page());
            }
            hub.store.set_admin(&name, false).await.map_err(|e| page_err(e.into()))?;
            format!("{name} is no longer an admin")
        }
        "delete" | "discard" => {
            if name == me {
                return Err(ApiError::bad_request("Cannot delete yourself!").page());
            }
            hub.servers.stop_all_of(&name).await;
            hub.store.delete_user(&name).await.map_err(|e| page_err(e.into()))?;
            format!("{name} was deleted")
        }
        other => return Err(ApiError::bad_request(format!("unknown action {other:?}")).page()),
    };
    let _ = hub.store.add_event(&me, &f.action, &name, "").await;
    tracing::info!(admin = %me, user = %name, action = %f.action, "account changed");
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
    require_admin(&user)?;
    let shared = match f.action.as_str() {
        "share" => true,
        "exclusive" => false,
        other => return Err(ApiError::bad_request(format!("unknown action {other:?}")).page()),
    };
    hub.servers.set_gpu_shared(&id, shared).await.map_err(|e| ApiError::from(e).page())?;
    let _ = hub.store.add_event(user.caller.name(), &format!("gpu-{}", f.action), &id, "").await;
    let msg = format!("{id} is {}", if shared { "shared" } else { "exclusive" });
    let msg = percent_encoding::utf8_percent_encode(&msg, percent_encoding::NON_ALPHANUMERIC);
    Ok(Redirect::to(&format!("{}authorize?msg={msg}", hub.hub_prefix())).into_response())
}

/// Headers helper for tests and other modules.
pub fn location(h: &HeaderMap) -> Option<&str> {
    h.get(header::LOCATION).and_then(|v| v.to_str().ok())
}
