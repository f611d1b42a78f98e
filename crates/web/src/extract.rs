//! Extractors every handler shares: request bodies (`JsonBody`,
//! `PageForm`), the `<user>[/<server>]` path (`ServerPath`), the caller
//! the middleware resolved (`ApiCaller`, `PageUser`, `MaybeUser`), and the
//! one rule for whether a client wants HTML.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, OriginalUri, Path, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use berth_core::ServerId;
use berth_hub::Caller;
use serde::de::DeserializeOwned;

use crate::cookies::Cookies;
use crate::error::ApiError;
use crate::html::Viewer;

/// Whether a client wants a page rather than JSON: a GET or HEAD that
/// accepts HTML, or accepts anything and is not an API path.
pub fn wants_html(method: &Method, headers: &HeaderMap, path: &str) -> bool {
    if !matches!(*method, Method::GET | Method::HEAD) {
        return false;
    }
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).unwrap_or("");
    accept.contains("text/html") || ((accept.is_empty() || accept == "*/*") && !path.contains("/api/"))
}

/// How long a hub request's body may take to arrive (bodies here are small;
/// proxied bodies stream and are not read by the hub).
pub const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

async fn body_bytes<S: Send + Sync>(req: Request, state: &S) -> Result<Bytes, ApiError> {
    match tokio::time::timeout(BODY_TIMEOUT, Bytes::from_request(req, state)).await {
        Err(_) => Err(ApiError::new(StatusCode::REQUEST_TIMEOUT, "the request body did not arrive in time")),
        Ok(Err(e)) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            Err(ApiError::new(e.status(), "request body is larger than the hub accepts (hub.max_body_bytes)"))
        }
        Ok(Err(e)) => Err(ApiError::new(e.status(), e.body_text())),
        Ok(Ok(b)) => Ok(b),
    }
}

/// A JSON body. Parsed whatever the `Content-Type` (JupyterHub's own
/// clients send JSON as text/plain); an empty body reads as `{}`.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = body_bytes(req, state).await?;
        let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) { b"{}" } else { &bytes };
        serde_json::from_slice(bytes)
            .map(JsonBody)
            .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
    }
}

/// A form body; a malformed one is a 400 page, not a panic or plain text.
pub struct PageForm<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for PageForm<T> {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = body_bytes(req, state).await.map_err(ApiError::page)?;
        serde_urlencoded::from_bytes(&bytes)
            .map(PageForm)
            .map_err(|e| ApiError::bad_request(format!("malformed form: {e}")).page())
    }
}

/// `<user>[/<server>]` from a route's path (`{name}` or `{user}`, and
/// `{server}` when the route has one): validated, so handlers get names they
/// can use in URLs, container and volume names.
pub struct ServerPath(pub ServerId);

impl<S: Send + Sync> FromRequestParts<S> for ServerPath {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        // Inside nested routers the URI has lost its prefix; the original has it.
        let path = parts.extensions.get::<OriginalUri>().map_or(parts.uri.path(), |u| u.0.path());
        let api = path.contains("/hub/api/");
        let as_page = |e: ApiError| if api { e } else { e.page() };
        let Path(params) = Path::<HashMap<String, String>>::from_request_parts(parts, state)
            .await
            .map_err(|e| as_page(ApiError::bad_request(e.body_text())))?;
        let user = params.get("name").or_else(|| params.get("user")).map(String::as_str).unwrap_or("");
        let server = params.get("server").map(String::as_str).unwrap_or("");
        if params.contains_key("server") && server.is_empty() {
            return Err(as_page(ApiError::bad_request("a named server needs a name")));
        }
        ServerId::parse(user, server).map(ServerPath).map_err(|e| as_page(e.into()))
    }
}

/// The client's address (for throttling), as the listener saw it.
pub struct PeerAddr(pub String);

impl<S: Send + Sync> FromRequestParts<S> for PeerAddr {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let addr = parts.extensions.get::<axum::extract::ConnectInfo<std::net::SocketAddr>>().map(|c| c.0.ip());
        Ok(PeerAddr(addr.map_or_else(|| "unknown".to_string(), |a| a.to_string())))
    }
}

/// The client's address as the listener saw it (never a header), if known.
pub struct PeerIp(pub Option<std::net::IpAddr>);

impl<S: Send + Sync> FromRequestParts<S> for PeerIp {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(PeerIp(parts.extensions.get::<axum::extract::ConnectInfo<std::net::SocketAddr>>().map(|c| c.0.ip())))
    }
}

/// What the authentication middleware found, for handlers.
#[derive(Debug, Clone)]
pub struct RequestAuth {
    pub caller: Option<Caller>,
    pub cookies: Cookies,
    pub xsrf: String,
    /// What every page of the caller's shows on top (a cull warning).
    pub banner: Option<String>,
}

impl RequestAuth {
    pub fn viewer(&self) -> Option<Viewer<'_>> {
        self.caller.as_ref().map(|c| Viewer {
            name: c.name(),
            admin: c.user.admin,
            xsrf: &self.xsrf,
            banner: self.banner.as_deref(),
        })
    }
}

/// The caller of an API request; 403 JSON without one.
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

/// The logged-in user of a page; browsers without a session are sent to
/// the log-in page with `next=`.
pub struct PageUser {
    pub caller: Caller,
    pub xsrf: String,
    pub banner: Option<String>,
}

impl PageUser {
    pub fn viewer(&self) -> Viewer<'_> {
        Viewer {
            name: self.caller.name(),
            admin: self.caller.user.admin,
            xsrf: &self.xsrf,
            banner: self.banner.as_deref(),
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for PageUser {
    type Rejection = Response;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let auth = parts.extensions.get::<RequestAuth>().cloned();
        match auth {
            Some(RequestAuth { caller: Some(caller), xsrf, banner, .. }) => Ok(PageUser { caller, xsrf, banner }),
            _ => {
                // The original URI: inside the hub's nested router the path
                // has lost `<base>hub`, and `next` must point at the page itself.
                let original = parts.extensions.get::<OriginalUri>().map(|u| u.0.clone());
                let uri = original.as_ref().unwrap_or(&parts.uri);
                let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
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

/// What the middleware found, for pages that work with or without a user.
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
    fn one_rule_for_html() {
        let h = |accept: Option<&str>| {
            let mut m = HeaderMap::new();
            if let Some(a) = accept {
                m.insert(header::ACCEPT, a.parse().unwrap_or(header::HeaderValue::from_static("")));
            }
            m
        };
        // (method, accept, path) -> wants HTML
        let cases = [
            (Method::GET, Some("text/html,application/xhtml+xml"), "/user/a/api/x", true),
            (Method::GET, None, "/user/a/lab", true),
            (Method::GET, Some("*/*"), "/user/a/lab", true),
            (Method::GET, Some("*/*"), "/user/a/api/kernels", false),
            (Method::GET, Some("application/json"), "/user/a/lab", false),
            (Method::POST, Some("text/html"), "/user/a/lab", false),
            (Method::HEAD, Some("text/html"), "/hub/home", true),
        ];
        for (m, accept, path, want) in cases {
            assert_eq!(wants_html(&m, &h(accept), path), want, "{m} {accept:?} {path}");
        }
    }
}
