//! The one edge: every request on berth's port comes through [`handle`].
//! Hub pages and the API go to the router; a user's server is reached by
//! path (`/user/<name>[/<server>]/…`) or, in `host` routing, by its own host
//! name — both through one admission rule ([`admit`]: the hub's identity
//! resolves the credential, `Caller::may_access` decides) and one
//! [`forward`].

use std::sync::Arc;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::response::{IntoResponse, Redirect};
use berth_core::ServerId;
use berth_hub::templates::{APP_COOKIE, APP_SESSION_SECS, AUTH_PATH};
use berth_hub::Caller;
use berth_proxy::{contains_dot_segments, strip_cookies, Peer, ProxyError, Route, Upstream};
use berth_web::cookies::{self, Cookies};
use berth_web::extract::wants_html;
use berth_web::html;
use http::request::Parts;
use http::{header, HeaderValue, Response, StatusCode};
use hyper::body::Incoming;
use tower::ServiceExt;

use crate::Shared;

/// `internal`: the connection came in on the listener for containers.
pub(crate) async fn handle(
    shared: Arc<Shared>,
    req: hyper::Request<Incoming>,
    peer: Peer,
    internal: bool,
    upstream: &Arc<Upstream>,
) -> Response<Body> {
    if shared.tls.is_some() && !peer.tls {
        let api_call =
            (internal || peer.addr.ip().is_loopback()) && req.uri().path().starts_with(&shared.hub_api_prefix);
        if !api_call {
            return https_redirect(&req, peer.local_port);
        }
    }
    let templates = &shared.hub.servers.templates;
    let app_host = templates
        .host_mode()
        .then(|| req.headers().get(header::HOST).and_then(|h| h.to_str().ok()))
        .flatten()
        .and_then(|h| templates.parse_host(h));
    let mut resp = if let Some(id) = app_host {
        host_route(&shared, req, peer, id, upstream).await
    } else if req.uri().path().starts_with(&shared.user_prefix) {
        path_route(&shared, req, peer, upstream).await
    } else {
        hub(&shared, req, peer).await
    };
    if let (Some(h), true) = (&shared.hsts, peer.tls) {
        resp.headers_mut().insert(header::STRICT_TRANSPORT_SECURITY, h.clone());
    }
    resp
}

/// Hub pages and the API, on the hub's runtime: what they start (a
/// server's start, a build, a stream's producer) lives there, not on the
/// connection's thread.
async fn hub(shared: &Arc<Shared>, mut req: hyper::Request<Incoming>, peer: Peer) -> Response<Body> {
    req.extensions_mut().insert(ConnectInfo(peer.addr));
    let answer = shared.router.clone().oneshot(req.map(Body::new));
    // A client that goes away cancels its request, as if it ran here.
    struct AbortOnDrop(tokio::task::JoinHandle<Result<Response<Body>, std::convert::Infallible>>);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let mut task = AbortOnDrop(shared.hub_runtime.spawn(answer));
    match (&mut task.0).await {
        Ok(Ok(resp)) => resp,
        Ok(Err(e)) => match e {},
        Err(e) => {
            tracing::error!(error = %e, "a hub request's task ended without an answer");
            json_error(StatusCode::INTERNAL_SERVER_ERROR, "the hub could not answer this request")
        }
    }
}

fn text(status: StatusCode, body: String) -> Response<Body> {
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

fn json_error(status: StatusCode, message: &str) -> Response<Body> {
    let body = serde_json::json!({"status": status.as_u16(), "message": message}).to_string();
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// A refusal, as a page for browsers and as JSON for API clients.
fn deny(shared: &Shared, parts: &Parts, status: StatusCode, msg: &str) -> Response<Body> {
    if wants_html(&parts.method, &parts.headers, parts.uri.path()) {
        let body = format!(
            r#"<h1>{}</h1><div class="alert alert-danger" role="alert"><p>{}</p></div><p><a href="{}home">Go home</a></p>"#,
            status.as_u16(),
            html::esc(msg),
            shared.hub.hub_prefix()
        );
        let mut page = (status, html::bare_page("Forbidden", &body)).into_response();
        // A page of the hub's own: its headers too (it must not be framed).
        berth_web::headers::HubHeaders::for_hub(&shared.hub).apply(&mut page);
        page
    } else {
        json_error(status, msg)
    }
}

fn query_token(parts: &Parts) -> Option<String> {
    parts.uri.query()?.split('&').find_map(|kv| kv.strip_prefix("token=").map(str::to_string)).filter(|t| !t.is_empty())
}

/// Who is calling, from what they sent: a token (`Authorization` or
/// `?token=`), else the app host's own cookie (on an app host), else the
/// hub's session cookie.
/// The caller is the cache's own (shared, not copied per request).
async fn caller_of(
    shared: &Shared,
    parts: &Parts,
    app_host: Option<&str>,
) -> Result<Option<Arc<Caller>>, Response<Body>> {
    let identity = &shared.hub.identity;
    let token = berth_web::auth::token_from_headers(&parts.headers).or_else(|| query_token(parts));
    let found = match (&token, app_host) {
        (Some(t), _) => identity.token_caller(t).await,
        (None, Some(host)) => match Cookies::find(&parts.headers, APP_COOKIE) {
            Some(v) => identity.app_cookie_caller(host, v).await,
            None => Ok(None),
        },
        (None, None) => {
            match Cookies::find(&parts.headers, cookies::session_cookie(shared.hub.cfg.secure_cookies, "/").0) {
                Some(v) => identity.session_caller(v).await,
                None => Ok(None),
            }
        }
    };
    found.map_err(|e| berth_web::ApiError::from(e).into_response())
}

/// The one admission rule for a user's server, path or host: the caller
/// may access it (owner, admins, holders of `access:servers` for it).
pub(crate) fn admit(caller: &Caller, id: &ServerId) -> bool {
    caller.may_access(id)
}

async fn path_route(
    shared: &Arc<Shared>,
    req: hyper::Request<Incoming>,
    peer: Peer,
    upstream: &Arc<Upstream>,
) -> Response<Body> {
    if contains_dot_segments(req.uri().path()) {
        return json_error(StatusCode::BAD_REQUEST, "paths with . or .. segments are not accepted");
    }
    let Some(route) = shared.routes.lookup(req.uri().path()) else {
        // No route: the hub answers (the server is not running).
        return hub(shared, req, peer).await;
    };
    let (parts, body) = req.into_parts();
    let Ok(id) = ServerId::parse(&route.user, &route.server) else {
        return json_error(StatusCode::NOT_FOUND, "no such server");
    };
    let caller = match caller_of(shared, &parts, None).await {
        Err(r) => return r,
        Ok(Some(c)) if admit(&c, &id) => c,
        Ok(Some(c)) => {
            tracing::info!(visitor = %c.name(), server = %id, "refused access to a server");
            return deny(shared, &parts, StatusCode::FORBIDDEN, &format!("{} may not access this server", c.name()));
        }
        Ok(None) => {
            let has_token =
                berth_web::auth::token_from_headers(&parts.headers).is_some() || query_token(&parts).is_some();
            if !has_token && wants_html(&parts.method, &parts.headers, parts.uri.path()) {
                let here = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
                let next = percent_encoding::utf8_percent_encode(here, percent_encoding::NON_ALPHANUMERIC);
                return Redirect::to(&format!("{}login?next={next}", shared.hub.hub_prefix())).into_response();
            }
            return deny(
                shared,
                &parts,
                StatusCode::FORBIDDEN,
                "authentication required: log in to the hub or send a token",
            );
        }
    };
    forward(shared, hyper::Request::from_parts(parts, body), &route, &id, &caller, peer, upstream).await
}

/// A request on an app's own host name (`host` routing).
async fn host_route(
    shared: &Arc<Shared>,
    req: hyper::Request<Incoming>,
    peer: Peer,
    id: ServerId,
    upstream: &Arc<Upstream>,
) -> Response<Body> {
    let templates = &shared.hub.servers.templates;
    let host = templates.host_for(&id);
    if contains_dot_segments(req.uri().path()) {
        return json_error(StatusCode::BAD_REQUEST, "paths with . or .. segments are not accepted");
    }
    let Some(route) = shared.routes.lookup_host(&host) else {
        let hub = templates.origin_of(&templates.cfg.app_domain);
        let body =
            format!("{} of {} is not running; start it at {hub}{}home\n", id.server, id.user, shared.hub.hub_prefix());
        return text(StatusCode::NOT_FOUND, body);
    };
    let (parts, body) = req.into_parts();
    let pq = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/").to_string();
    let (path, query) = pq.split_once('?').unwrap_or((&pq, ""));
    if path == AUTH_PATH {
        return take_code(shared, &host, query, peer.tls);
    }
    let caller = match caller_of(shared, &parts, Some(&host)).await {
        Err(r) => return r,
        Ok(Some(c)) if admit(&c, &id) => c,
        Ok(Some(c)) => return text(StatusCode::FORBIDDEN, format!("{} may not access {}\n", c.name(), id.server)),
        Ok(None) if berth_web::auth::token_from_headers(&parts.headers).is_some() => {
            return deny(
                shared,
                &parts,
                StatusCode::FORBIDDEN,
                "authentication required: log in to the hub or send a token",
            )
        }
        Ok(None) => {
            // To the hub, which sends the visitor back with a one-time code.
            let next = percent_encoding::utf8_percent_encode(&pq, percent_encoding::NON_ALPHANUMERIC);
            let hubo = templates.origin_of(&templates.cfg.app_domain);
            return Redirect::to(&format!("{hubo}{}app-login?host={host}&next={next}", shared.hub.hub_prefix()))
                .into_response();
        }
    };
    forward(shared, hyper::Request::from_parts(parts, body), &route, &id, &caller, peer, upstream).await
}

/// `<app host>/_berth/auth?code=…&next=…`: trades the hub's single-use code
/// for the app host's own cookie.
fn take_code(shared: &Shared, host: &str, query: &str, tls: bool) -> Response<Body> {
    let params: std::collections::HashMap<String, String> = serde_urlencoded::from_str(query).unwrap_or_default();
    let templates = &shared.hub.servers.templates;
    let Some((visitor, session)) = params.get("code").and_then(|c| templates.take_code(c, host)) else {
        return text(
            StatusCode::FORBIDDEN,
            "this sign-in link was used already or has expired; open the app again\n".into(),
        );
    };
    let value = shared.hub.identity.app_cookie(host, &visitor, &session);
    let secure = if tls { "; Secure" } else { "" };
    let cookie = format!("{APP_COOKIE}={value}; Path=/; HttpOnly; SameSite=Lax; Max-Age={APP_SESSION_SECS}{secure}");
    let next = berth_web::pages::apps::safe_app_next(params.get("next").map(String::as_str).unwrap_or("/"));
    let mut r = Redirect::to(&next).into_response();
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

/// The one forward path: activity recorded, the visitor's credentials
/// removed (berth's cookies always; a token unless it was made for this
/// server alone), the request sent to the route's target, and berth's
/// cookies kept out of the answer; a server that refuses connections is
/// checked on in the background.
async fn forward(
    shared: &Arc<Shared>,
    mut req: hyper::Request<Incoming>,
    route: &Route,
    id: &ServerId,
    caller: &Caller,
    peer: Peer,
    upstream: &Arc<Upstream>,
) -> Response<Body> {
    shared.hub.servers.counters.proxied();
    let now = berth_store::now_ms();
    if route.touch(now) {
        shared.hub.activity.server(&route.user, &route.server, now);
    }
    strip_cookies(req.headers_mut(), cookies::OWN);
    if !caller.credential_is_for(id) {
        req.headers_mut().remove(header::AUTHORIZATION);
        if let Some(uri) = without_token_param(req.uri()) {
            *req.uri_mut() = uri;
        }
    }
    let prefix = match route.mode {
        berth_core::RoutingMode::Host => None,
        _ => Some(route.prefix.as_str()),
    };
    match shared.forwarder.forward(req, route, peer, upstream).await {
        Ok(resp) => {
            let mut resp = resp.map(Body::new);
            guard_cookies(resp.headers_mut(), prefix);
            if prefix.is_some() {
                // A path-routed server shares the hub's origin: its service
                // worker stays within its prefix (it may not widen its scope
                // to the hub's pages), and it may not clear the origin's data
                // (which would log its visitors out of the hub).
                resp.headers_mut().remove("service-worker-allowed");
                resp.headers_mut().remove("clear-site-data");
            }
            resp
        }
        Err(e) => {
            if matches!(e, ProxyError::Refused { .. }) {
                if let Ok(id) = ServerId::parse(&route.user, &route.server) {
                    shared.hub.servers.check_soon(id);
                }
            }
            tracing::warn!(user = %route.user, server = %route.server, error = %e, "proxy error");
            let message = match &e {
                ProxyError::Refused { .. } => {
                    format!("{}'s server is not answering; berth is checking on it. Reload in a moment.", route.user)
                }
                other => other.to_string(),
            };
            json_error(e.status(), &message)
        }
    }
}

/// Where plain HTTP goes when TLS is on: the same URL over https. Loopback
/// calls to the hub API (local single-user servers) are served as they are.
fn https_redirect(req: &hyper::Request<Incoming>, local_port: u16) -> Response<Body> {
    let host = req
        .headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .unwrap_or_else(|| format!("localhost:{local_port}"));
    let path = req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let location = format!("https://{host}{path}");
    Response::builder()
        .status(StatusCode::PERMANENT_REDIRECT)
        .header(http::header::LOCATION, location.clone())
        .header(http::header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Body::from(format!("berth serves HTTPS on this port: {location}\n")))
        .unwrap_or_else(|_| Response::new(Body::empty()))
}

/// The URI without its `token` query parameters, when it has any.
fn without_token_param(uri: &http::Uri) -> Option<http::Uri> {
    let q = uri.query()?;
    if !q.split('&').any(|kv| kv == "token" || kv.starts_with("token=")) {
        return None;
    }
    let kept: Vec<&str> = q.split('&').filter(|kv| !(*kv == "token" || kv.starts_with("token="))).collect();
    let pq = if kept.is_empty() { uri.path().to_string() } else { format!("{}?{}", uri.path(), kept.join("&")) };
    pq.parse().ok()
}

/// What a user's server may not do with cookies: set one of berth's own
/// (`Set-Cookie` naming them is dropped), set one for another host
/// (`Domain` is removed, so it stays host-only), or, on a path route, set
/// one outside its own prefix (the path is moved under it).
fn guard_cookies(h: &mut http::HeaderMap, prefix: Option<&str>) {
    let set: Vec<HeaderValue> = h.get_all(header::SET_COOKIE).iter().cloned().collect();
    if set.is_empty() {
        return;
    }
    h.remove(header::SET_COOKIE);
    for v in set {
        let Ok(text) = v.to_str() else { continue };
        let name = text.split(['=', ';']).next().unwrap_or("").trim();
        if cookies::OWN.iter().any(|own| own.eq_ignore_ascii_case(name)) || name.starts_with("__Host-berth") {
            tracing::warn!(cookie = %name, "dropped a server's attempt to set one of berth's cookies");
            continue;
        }
        let mut attrs: Vec<String> = Vec::new();
        let mut path_seen = false;
        for (i, part) in text.split(';').enumerate() {
            let p = part.trim();
            if i == 0 {
                attrs.push(p.to_string());
                continue;
            }
            let key = p.split('=').next().unwrap_or("").trim().to_ascii_lowercase();
            match key.as_str() {
                "domain" => continue,
                "path" => {
                    path_seen = true;
                    let value = p.split_once('=').map(|(_, v)| v.trim()).unwrap_or("");
                    match prefix {
                        Some(pre) if !value.starts_with(pre) => attrs.push(format!("Path={pre}")),
                        _ => attrs.push(p.to_string()),
                    }
                }
                _ => attrs.push(p.to_string()),
            }
        }
        if let (false, Some(pre)) = (path_seen, prefix) {
            attrs.push(format!("Path={pre}"));
        }
        if let Ok(v) = HeaderValue::from_str(&attrs.join("; ")) {
            h.append(header::SET_COOKIE, v);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn token_parameters_are_removed_and_the_rest_kept() {
        let cases = [
            ("/user/a/lab?token=abc", Some("/user/a/lab")),
            ("/user/a/lab?x=1&token=abc&y=2", Some("/user/a/lab?x=1&y=2")),
            ("/user/a/lab?tokens=1", None),
            ("/user/a/lab", None),
        ];
        for (input, want) in cases {
            let got = without_token_param(&input.parse().unwrap());
            assert_eq!(got.map(|u| u.to_string()), want.map(str::to_string), "{input}");
        }
    }

    #[test]
    fn servers_cannot_set_berths_cookies_or_leave_their_prefix() {
        let mut h = http::HeaderMap::new();
        for c in [
            "berth-session=evil; Path=/hub/",
            "__Host-berth-session=evil; Path=/; Secure",
            "berth-app=evil; Path=/",
            "_xsrf=theirs; Path=/hub/",
            "app=1; Path=/; Domain=apps.test; HttpOnly",
            "lab=2; Path=/user/alice/lab/x",
            "bare=3",
        ] {
            h.append(header::SET_COOKIE, HeaderValue::from_str(c).unwrap());
        }
        guard_cookies(&mut h, Some("/user/alice/lab/"));
        let got: Vec<&str> = h.get_all(header::SET_COOKIE).iter().map(|v| v.to_str().unwrap()).collect();
        assert_eq!(
            got,
            [
                "_xsrf=theirs; Path=/user/alice/lab/",
                "app=1; Path=/user/alice/lab/; HttpOnly",
                "lab=2; Path=/user/alice/lab/x",
                "bare=3; Path=/user/alice/lab/"
            ]
        );
        let mut h = http::HeaderMap::new();
        h.append(header::SET_COOKIE, HeaderValue::from_static("app=1; Path=/; Domain=.apps.test"));
        guard_cookies(&mut h, None);
        assert_eq!(h.get(header::SET_COOKIE).unwrap(), "app=1; Path=/", "host routes: host-only");
    }
}
