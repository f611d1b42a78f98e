//! The authentication middleware: who is calling (asked of the hub's
//! identity), and whether the call may change anything.
//!
//! One middleware resolves the caller (an `Authorization: token|bearer`
//! header, else the session cookie) and applies JupyterHub's XSRF rule: a
//! cookie-authenticated request needs a valid XSRF token unless it is a
//! GET/HEAD/OPTIONS navigation (`Sec-Fetch-Mode` absent or `navigate`). So a
//! script on another user's app, which cannot navigate, cannot use the
//! hub's API as the person looking at it. Token-authenticated requests carry
//! no ambient authority and skip the check.

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use berth_store::now_ms;

use crate::cookies::{self, CookieSpec, Cookies};
use crate::error::ApiError;
use crate::extract::RequestAuth;
use crate::SharedHub;

const ANON_BINDING: &str = "anon";
const ANON_XSRF_MAX_AGE_MS: i64 = 3600 * 1000;

/// The token of an `Authorization: token|bearer …` header.
pub fn token_from_headers(h: &HeaderMap) -> Option<String> {
    let v = h.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, tok) = v.trim().split_once(' ')?;
    if scheme.eq_ignore_ascii_case("token") || scheme.eq_ignore_ascii_case("bearer") {
        let tok = tok.trim();
        (!tok.is_empty()).then(|| tok.to_string())
    } else {
        None
    }
}

fn is_safe_navigation(method: &Method, headers: &HeaderMap) -> bool {
    let safe = matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS);
    let mode = headers.get("sec-fetch-mode").and_then(|v| v.to_str().ok());
    safe && matches!(mode, None | Some("navigate"))
}

fn xsrf_from_headers_or_query(parts: &Parts) -> Option<String> {
    for h in ["x-xsrftoken", "x-csrftoken"] {
        if let Some(v) = parts.headers.get(h).and_then(|v| v.to_str().ok()) {
            return Some(v.to_string());
        }
    }
    let q = parts.uri.query()?;
    form_field(q.as_bytes(), "_xsrf")
}

fn form_field(body: &[u8], name: &str) -> Option<String> {
    serde_urlencoded_pairs(body).into_iter().find(|(k, _)| k == name).map(|(_, v)| v)
}

/// Minimal `application/x-www-form-urlencoded` parsing (no dependency for one field).
fn serde_urlencoded_pairs(body: &[u8]) -> Vec<(String, String)> {
    let decode = |s: &str| {
        let s = s.replace('+', " ");
        percent_encoding::percent_decode_str(&s).decode_utf8_lossy().into_owned()
    };
    String::from_utf8_lossy(body)
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (decode(k), decode(v)),
            None => (decode(p), String::new()),
        })
        .collect()
}

fn is_form(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/x-www-form-urlencoded"))
}

/// The API, and `<base>hub/metrics` (read by Prometheus with a token, as JupyterHub's is).
fn is_api_path(hub: &SharedHub, path: &str) -> bool {
    path.strip_prefix(hub.api_prefix()).is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
        || path.strip_prefix(hub.hub_prefix()) == Some("metrics")
}

/// The middleware: resolves the caller, checks XSRF, and issues the `_xsrf`
/// cookie on navigations.
pub async fn authenticate(State(hub): State<SharedHub>, req: Request, next: Next) -> Response {
    match authenticate_inner(hub, req, next).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn authenticate_inner(hub: SharedHub, req: Request, next: Next) -> Result<Response, ApiError> {
    let (mut parts, body) = req.into_parts();
    let api = is_api_path(&hub, parts.uri.path());
    let as_page = |e: ApiError| if api { e } else { e.page() };
    let cookies = Cookies::from_headers(&parts.headers);
    let now = now_ms();

    // Pages answer to the browser's session alone, as JupyterHub's do: a
    // token gains no power on a page that it lacks on the API.
    let bearer = if api { token_from_headers(&parts.headers) } else { None };
    let (session_name, _) = cookies::session_cookie(hub.cfg.secure_cookies, &hub.cfg.base_url);
    let session_cookie = cookies.get(session_name).map(str::to_string);
    let caller = match (&bearer, &session_cookie) {
        (Some(t), _) => hub.identity.from_token(t).await?,
        (None, Some(c)) => hub.identity.from_session(c).await?,
        (None, None) => None,
    };
    let cookie_auth = bearer.is_none() && caller.is_some();
    let binding = match (&caller, cookie_auth) {
        (Some(c), true) => format!("s:{}", c.session_public_id().unwrap_or_default()),
        _ => ANON_BINDING.to_string(),
    };
    let max_age = (binding == ANON_BINDING).then_some(ANON_XSRF_MAX_AGE_MS);
    let cookie_xsrf = cookies.get(cookies::XSRF).map(str::to_string);
    let cookie_xsrf_valid = cookie_xsrf.as_deref().is_some_and(|t| hub.signer().xsrf_valid(t, &binding, now, max_age));

    // Which requests must prove they came from berth's own pages.
    let safe = is_safe_navigation(&parts.method, &parts.headers);
    let state_changing = !matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS);
    let needs_check = if bearer.is_some() {
        false
    } else if cookie_auth {
        !safe
    } else {
        // Anonymous: only the hub's own forms (log-in, sign-up) are protected.
        state_changing && !api
    };

    let mut body = body;
    if needs_check {
        let mut submitted = xsrf_from_headers_or_query(&parts);
        if submitted.is_none() && is_form(&parts.headers) {
            let limit = hub.cfg.max_body_bytes as usize;
            let read = tokio::time::timeout(crate::extract::BODY_TIMEOUT, axum::body::to_bytes(body, limit)).await;
            let bytes: Bytes = match read {
                Err(_) => {
                    return Err(as_page(ApiError::new(
                        StatusCode::REQUEST_TIMEOUT,
                        "the request body did not arrive in time",
                    )))
                }
                Ok(r) => r.map_err(|_| {
                    as_page(ApiError::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        format!("request body is larger than {limit} bytes"),
                    ))
                })?,
            };
            submitted = form_field(&bytes, "_xsrf");
            body = Body::from(bytes);
        }
        let method = parts.method.as_str().to_string();
        let Some(tok) = submitted else {
            return Err(as_page(ApiError::forbidden(format!("'_xsrf' argument missing from {method}"))));
        };
        let ok = hub.signer().xsrf_valid(&tok, &binding, now, max_age)
            && (cookie_auth || cookie_xsrf.as_deref() == Some(tok.as_str()));
        if !ok {
            return Err(as_page(ApiError::forbidden(format!("XSRF cookie does not match {method} argument"))));
        }
    }

    let xsrf = if cookie_xsrf_valid {
        cookie_xsrf.clone().unwrap_or_default()
    } else {
        hub.signer().xsrf_token(&binding, now)
    };
    let set_xsrf = !cookie_xsrf_valid && safe && !api;
    let banner = match (&caller, api) {
        (Some(c), false) => {
            let cull = crate::pages::home::cull_banner(&hub, c, &xsrf);
            let update = crate::pages::home::update_banner(&hub, c);
            match (cull, update) {
                (None, None) => None,
                (a, b) => Some(format!("{}{}", a.unwrap_or_default(), b.unwrap_or_default())),
            }
        }
        _ => None,
    };
    parts.extensions.insert(RequestAuth { caller, cookies, xsrf: xsrf.clone(), banner });
    // Pages show the announcement (see `html`); the API answers without it.
    let announcement = if api {
        None
    } else {
        match hub.announcement().await {
            Ok(a) => a.map(|a| a.message),
            Err(e) => {
                tracing::warn!(error = %e, "could not read the announcement");
                None
            }
        }
    };
    let mut resp = crate::html::ANNOUNCEMENT.scope(announcement, next.run(Request::from_parts(parts, body))).await;
    resp.headers_mut()
        .insert("x-jupyterhub-version", axum::http::HeaderValue::from_static(berth_core::JUPYTERHUB_API_VERSION));

    if set_xsrf {
        let already = resp
            .headers()
            .get_all(header::SET_COOKIE)
            .iter()
            .any(|v| v.to_str().is_ok_and(|s| s.starts_with("_xsrf=")));
        if !already {
            let spec = CookieSpec {
                name: cookies::XSRF,
                value: &xsrf,
                path: hub.hub_prefix(),
                http_only: true,
                secure: hub.cfg.secure_cookies,
                max_age: (binding == ANON_BINDING).then_some(3600),
            };
            resp.headers_mut().append(header::SET_COOKIE, spec.header());
        }
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safe_navigation_rule() {
        let mut h = HeaderMap::new();
        assert!(is_safe_navigation(&Method::GET, &h));
        assert!(!is_safe_navigation(&Method::POST, &h));
        h.insert("sec-fetch-mode", "navigate".parse().unwrap());
        assert!(is_safe_navigation(&Method::GET, &h));
        h.insert("sec-fetch-mode", "cors".parse().unwrap());
        assert!(!is_safe_navigation(&Method::GET, &h), "scripts' GETs need the token");
        h.insert("sec-fetch-mode", "no-cors".parse().unwrap());
        assert!(!is_safe_navigation(&Method::GET, &h));
    }

    #[test]
    fn form_fields() {
        assert_eq!(form_field(b"a=1&_xsrf=x%3Ay%2Bz&b", "_xsrf").as_deref(), Some("x:y+z"));
        assert_eq!(form_field(b"a=1", "_xsrf"), None);
    }

    #[test]
    fn tokens_in_headers() {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, "token abc".parse().unwrap());
        assert_eq!(token_from_headers(&h).as_deref(), Some("abc"));
        h.insert(header::AUTHORIZATION, "Bearer abc".parse().unwrap());
        assert_eq!(token_from_headers(&h).as_deref(), Some("abc"));
        h.insert(header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(token_from_headers(&h), None);
    }
}
