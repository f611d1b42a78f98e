//! Edge authentication for proxied requests: who may reach a user's server.
//! The owner, admins, and holders of `access:servers` for that server pass;
//! a browser without a session is sent to log in; anyone else gets 403.

use axum::http::request::Parts;
use axum::http::{header, Method, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::Json;
use berth_core::Target;
use serde_json::json;

use crate::caller::{caller_from_session, caller_from_token, Caller};
use crate::cookies::{self, Cookies};
use crate::html;
use crate::SharedHub;

/// Cookies of berth's own that never reach a user's server.
pub const STRIPPED_COOKIES: &[&str] = &[cookies::SESSION];

fn query_token(parts: &Parts) -> Option<String> {
    parts.uri.query()?.split('&').find_map(|kv| kv.strip_prefix("token=").map(str::to_string)).filter(|t| !t.is_empty())
}

fn header_token(parts: &Parts) -> Option<String> {
    let v = parts.headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, tok) = v.trim().split_once(' ')?;
    (scheme.eq_ignore_ascii_case("token") || scheme.eq_ignore_ascii_case("bearer")).then(|| tok.trim().to_string())
}

fn is_browser(parts: &Parts) -> bool {
    let accept = parts.headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).unwrap_or("");
    parts.method == Method::GET && accept.contains("text/html")
}

fn deny(hub: &SharedHub, parts: &Parts, status: StatusCode, msg: &str) -> Response {
    if is_browser(parts) {
        let body = format!(
            r#"<h1>{}</h1><div class="alert alert-danger" role="alert"><p>{}</p></div><p><a href="{}home">Go home</a></p>"#,
            status.as_u16(),
            html::esc(msg),
            hub.hub_prefix()
        );
        (status, html::bare_page("Forbidden", &body)).into_response()
    } else {
        (status, Json(json!({"status": status.as_u16(), "message": msg}))).into_response()
    }
}

/// Decides whether the request may reach `user`'s server `server`.
pub async fn authorize(hub: &SharedHub, parts: &Parts, user: &str, server: &str) -> Result<Caller, Response> {
    let token = header_token(parts).or_else(|| query_token(parts));
    let caller = match &token {
        Some(t) => caller_from_token(hub, t).await,
        None => match Cookies::from_headers(&parts.headers).get(cookies::SESSION) {
            Some(c) => caller_from_session(hub, c).await,
            None => Ok(None),
        },
    };
    let caller = match caller {
        Ok(c) => c,
        Err(e) => return Err(e.into_response()),
    };
    let Some(caller) = caller else {
        if token.is_none() && is_browser(parts) {
            let here = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
            let next = percent_encoding::utf8_percent_encode(here, percent_encoding::NON_ALPHANUMERIC);
            return Err(Redirect::to(&format!("{}login?next={next}", hub.hub_prefix())).into_response());
        }
        return Err(deny(
            hub,
            parts,
            StatusCode::FORBIDDEN,
            "authentication required: log in to the hub or send a token",
        ));
    };
    if !caller.allows("access:servers", Target::Server { user, server }) {
        tracing::info!(visitor = %caller.name(), owner = %user, server = %server, "refused access to a server");
        return Err(deny(hub, parts, StatusCode::FORBIDDEN, &format!("{} may not access this server", caller.name())));
    }
    Ok(caller)
}

/// The page or JSON for a request refused before routing (a path with dot segments).
pub fn bad_path() -> Response {
    (StatusCode::BAD_REQUEST, Json(json!({"status": 400, "message": "paths with . or .. segments are not accepted"})))
        .into_response()
}
