//! Who is calling, and whether the call may change anything.
//!
//! One middleware resolves the caller (an `Authorization: token|bearer`
//! header, else the session cookie) and applies JupyterHub's XSRF rule: a
//! cookie-authenticated request needs a valid XSRF token unless it is a
//! GET/HEAD/OPTIONS navigation (`Sec-Fetch-Mode` absent or `navigate`). So a
//! script on another user's app, which cannot navigate, cannot use the
//! hub's API as the person looking at it. Token-authenticated requests carry
//! no ambient authority and skip the check.

use axum::body::{Body, Bytes};
use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use berth_auth::{hash_token, SessionCookie};
use berth_core::{ScopeSet, Target};
use berth_store::{now_ms, TokenKind, User};

use crate::cookies::{self, CookieSpec, Cookies};
use crate::error::ApiError;
use crate::SharedHub;

const ANON_BINDING: &str = "anon";
const ANON_XSRF_MAX_AGE_MS: i64 = 3600 * 1000;

#[derive(Debug, Clone)]
pub enum Via {
    Session { id_hash: String, public_id: String },
    Token { id: String, kind: TokenKind, session_id: Option<String> },
}

/// An authenticated caller with the scopes this request may use.
#[derive(Debug, Clone)]
pub struct Caller {
    pub user: User,
    /// Shared: callers are cloned per request from the cache.
    pub scopes: std::sync::Arc<ScopeSet>,
    pub via: Via,
}

impl Caller {
    pub fn name(&self) -> &str {
        &self.user.name
    }

    pub fn allows(&self, scope: &str, target: Target<'_>) -> bool {
        self.scopes.allows(scope, target)
    }

    /// 403 unless the caller holds `scope` on `target`.
    pub fn require(&self, scope: &str, target: Target<'_>) -> Result<(), ApiError> {
        if self.allows(scope, target) {
            Ok(())
        } else {
            Err(ApiError::forbidden(format!("Action is not authorized with current scopes; requires any of [{scope}]")))
        }
    }

    pub fn session_public_id(&self) -> Option<&str> {
        match &self.via {
            Via::Session { public_id, .. } => Some(public_id),
            Via::Token { session_id, .. } => session_id.as_deref(),
        }
    }
}

/// The XSRF token the current page should embed (equal to the `_xsrf` cookie).
#[derive(Debug, Clone)]
pub struct XsrfToken(pub String);

/// What the middleware found, for handlers.
#[derive(Debug, Clone)]
pub struct RequestAuth {
    pub caller: Option<Caller>,
    pub cookies: Cookies,
    pub xsrf: String,
}

fn token_from_headers(h: &HeaderMap) -> Option<String> {
    let v = h.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, tok) = v.trim().split_once(' ')?;
    if scheme.eq_ignore_ascii_case("token") || scheme.eq_ignore_ascii_case("bearer") {
        let tok = tok.trim();
        (!tok.is_empty()).then(|| tok.to_string())
    } else {
        None
    }
}

/// How long an authenticated caller is remembered. Changes made by this
/// process (revocations, deletions) invalidate at once through the store's
/// auth generation; changes by another process (the CLI) within this time.
const CACHE_TTL: std::time::Duration = std::time::Duration::from_secs(5);
const CACHE_MAX: usize = 10_000;

struct CacheEntry {
    caller: Caller,
    /// When activity was last recorded for this credential (unix ms).
    last_recorded: std::sync::atomic::AtomicI64,
    /// Token expiry, checked on every use.
    expires_at: Option<i64>,
    generation: u64,
    stored: std::time::Instant,
}

/// Recently authenticated callers, keyed by the credential's hash, so the
/// proxy's edge check costs no database round trip per request.
#[derive(Default)]
pub struct AuthCache {
    map: std::sync::Mutex<std::collections::HashMap<String, CacheEntry>>,
}

impl AuthCache {
    /// The cached caller, and whether its activity is due to be recorded
    /// (at most once a second per credential).
    fn get(&self, key: &str, generation: u64, now: i64) -> Option<(Caller, bool)> {
        use std::sync::atomic::Ordering;
        let map = self.map.lock().ok()?;
        let e = map.get(key)?;
        let fresh =
            e.generation == generation && e.stored.elapsed() < CACHE_TTL && e.expires_at.is_none_or(|t| t > now);
        if !fresh {
            return None;
        }
        let last = e.last_recorded.load(Ordering::Relaxed);
        let due = now - last >= 1000;
        if due {
            e.last_recorded.store(now, Ordering::Relaxed);
        }
        Some((e.caller.clone(), due))
    }

    fn put(&self, key: String, caller: Caller, expires_at: Option<i64>, generation: u64) {
        if let Ok(mut map) = self.map.lock() {
            if map.len() >= CACHE_MAX {
                map.clear();
            }
            map.insert(
                key,
                CacheEntry {
                    caller,
                    last_recorded: std::sync::atomic::AtomicI64::new(now_ms()),
                    expires_at,
                    generation,
                    stored: std::time::Instant::now(),
                },
            );
        }
    }
}

/// Resolves a token to its caller, or None when unknown, expired, or its
/// owner is not (or no longer) authorized.
pub async fn caller_from_token(hub: &SharedHub, token: &str) -> Result<Option<Caller>, ApiError> {
    let now = now_ms();
    // Keyed by the credential itself (memory only), so a hit costs no hashing.
    let key = format!("t:{token}");
    let generation = hub.store.auth_generation();
    if let Some((c, due)) = hub.auth_cache.get(&key, generation, now) {
        if let (true, Via::Token { id, .. }) = (due, &c.via) {
            hub.activity.token(id, now);
        }
        return Ok(Some(c));
    }
    let Some((tok, user)) = hub.store.find_token(&hash_token(token)).await? else {
        return Ok(None);
    };
    if tok.is_expired(now) || !user.authorized {
        return Ok(None);
    }
    hub.activity.token(&tok.id, now);
    let scopes = token_scopes(&tok, &user);
    let caller = Caller {
        user,
        scopes: std::sync::Arc::new(scopes),
        via: Via::Token { id: tok.id, kind: tok.kind, session_id: tok.session_id },
    };
    hub.auth_cache.put(key, caller.clone(), tok.expires_at, generation);
    Ok(Some(caller))
}

/// What a token may do: what it was given, never more than its owner holds
/// now (a demoted admin's tokens lose admin too). `inherit` means all of the
/// owner's. A server's own token and OAuth tokens hold exactly their scopes.
pub fn token_scopes(tok: &berth_store::Token, owner: &User) -> ScopeSet {
    let owner_scopes = ScopeSet::for_user(&owner.name, owner.admin);
    if tok.scopes.iter().any(|s| s == "inherit") {
        return owner_scopes;
    }
    let requested = match ScopeSet::parse_list(&tok.scopes, Some(&owner.name)) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(token = %tok.id, error = %e, "token has unparseable scopes; treating it as having none");
            ScopeSet::default()
        }
    };
    match tok.kind {
        TokenKind::Server | TokenKind::OAuth => requested,
        TokenKind::Api => requested.intersect(&owner_scopes),
    }
}

/// Resolves a session cookie to its caller.
pub async fn caller_from_session(hub: &SharedHub, cookie_value: &str) -> Result<Option<Caller>, ApiError> {
    let now = now_ms();
    let generation = hub.store.auth_generation();
    let key = format!("s:{cookie_value}");
    if let Some((c, due)) = hub.auth_cache.get(&key, generation, now) {
        if let (true, Via::Session { id_hash, .. }) = (due, &c.via) {
            hub.activity.session(id_hash, now);
        }
        return Ok(Some(c));
    }
    let Some(id_hash) = SessionCookie::id_hash_of(&hub.signer, cookie_value) else {
        return Ok(None);
    };
    let Some((session, user)) = hub.store.get_session(&id_hash).await? else {
        return Ok(None);
    };
    let max_age = hub.auth.session_max_age_seconds.as_millis() as i64;
    if !user.authorized || now - session.created > max_age {
        return Ok(None);
    }
    hub.activity.session(&id_hash, now);
    let scopes = ScopeSet::for_user(&user.name, user.admin);
    let caller = Caller {
        user,
        scopes: std::sync::Arc::new(scopes),
        via: Via::Session { id_hash: id_hash.clone(), public_id: session.public_id },
    };
    hub.auth_cache.put(key, caller.clone(), Some(session.created + max_age), generation);
    Ok(Some(caller))
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

fn is_api_path(hub: &SharedHub, path: &str) -> bool {
    path.strip_prefix(hub.api_prefix()).is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
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

    let bearer = token_from_headers(&parts.headers);
    let session_cookie = cookies.get(cookies::SESSION).map(str::to_string);
    let caller = match (&bearer, &session_cookie) {
        (Some(t), _) => caller_from_token(&hub, t).await?,
        (None, Some(c)) => caller_from_session(&hub, c).await?,
        (None, None) => None,
    };
    let cookie_auth = bearer.is_none() && caller.is_some();
    let binding = match (&caller, cookie_auth) {
        (Some(c), true) => format!("s:{}", c.session_public_id().unwrap_or_default()),
        _ => ANON_BINDING.to_string(),
    };
    let max_age = (binding == ANON_BINDING).then_some(ANON_XSRF_MAX_AGE_MS);
    let cookie_xsrf = cookies.get(cookies::XSRF).map(str::to_string);
    let cookie_xsrf_valid = cookie_xsrf.as_deref().is_some_and(|t| hub.signer.xsrf_valid(t, &binding, now, max_age));

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
            let bytes: Bytes = axum::body::to_bytes(body, limit).await.map_err(|_| {
                as_page(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("request body is larger than {limit} bytes"),
                ))
            })?;
            submitted = form_field(&bytes, "_xsrf");
            body = Body::from(bytes);
        }
        let method = parts.method.as_str().to_string();
        let Some(tok) = submitted else {
            return Err(as_page(ApiError::forbidden(format!("'_xsrf' argument missing from {method}"))));
        };
        let ok = hub.signer.xsrf_valid(&tok, &binding, now, max_age)
            && (cookie_auth || cookie_xsrf.as_deref() == Some(tok.as_str()));
        if !ok {
            return Err(as_page(ApiError::forbidden(format!("XSRF cookie does not match {method} argument"))));
        }
    }

    let xsrf =
        if cookie_xsrf_valid { cookie_xsrf.clone().unwrap_or_default() } else { hub.signer.xsrf_token(&binding, now) };
    let set_xsrf = !cookie_xsrf_valid && safe && !api;
    parts.extensions.insert(RequestAuth { caller, cookies, xsrf: xsrf.clone() });
    let mut resp = next.run(Request::from_parts(parts, body)).await;
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
                http_only: false,
                secure: hub.cfg.secure_cookies,
                max_age: (binding == ANON_BINDING).then_some(3600),
            };
            resp.headers_mut().append(header::SET_COOKIE, spec.header());
        }
    }
    Ok(resp)
}

/// Extractor: the caller of an API request; 403 JSON without one.
pub struct ApiCaller(pub Caller);

impl<S: Send + Sync> FromRequestParts<S> for ApiCaller {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<RequestAuth>()
            .and_then(|a| a.caller.clone())
            .map(ApiCaller)
            .ok_or_else(|| ApiError::forbidden("Missing or invalid credentials"))
    }
}

/// Extractor: the logged-in user of a page; browsers without a session are
/// sent to the log-in page with `next=`.
pub struct PageUser {
    pub caller: Caller,
    pub xsrf: String,
}

impl<S: Send + Sync> FromRequestParts<S> for PageUser {
    type Rejection = Response;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let auth = parts.extensions.get::<RequestAuth>().cloned();
        match auth {
            Some(RequestAuth { caller: Some(caller), xsrf, .. }) => Ok(PageUser { caller, xsrf }),
            _ => {
                let path = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
                let hub_prefix = hub_prefix_of(path);
                let next = percent_encoding::utf8_percent_encode(path, percent_encoding::NON_ALPHANUMERIC);
                Err(Redirect::to(&format!("{hub_prefix}login?next={next}")).into_response())
            }
        }
    }
}

/// `<base>hub/` from a path under it.
fn hub_prefix_of(path: &str) -> String {
    match path.find("hub/") {
        Some(i) => path[..i + 4].to_string(),
        None => "/hub/".to_string(),
    }
}

/// Extractor: what the middleware found, for pages that work with or without a user.
pub struct MaybeUser(pub RequestAuth);

impl<S: Send + Sync> FromRequestParts<S> for MaybeUser {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<RequestAuth>()
            .cloned()
            .map(MaybeUser)
            .ok_or_else(|| ApiError::internal("authentication middleware missing"))
    }
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
