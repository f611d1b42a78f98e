//! Forwarding one request to its upstream: hop-by-hop headers removed,
//! `X-Forwarded-*` added, bodies streamed both ways, upgrades (WebSocket)
//! spliced, errors classified by where they came from.

use berth_core::RoutingMode;
use std::net::SocketAddr;
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::Route;

#[derive(Debug, Clone)]
pub struct ForwarderConfig {
    pub connect_timeout: Duration,
    /// Time to wait for the upstream's response head.
    pub response_timeout: Duration,
    pub pool_idle_timeout: Duration,
    pub pool_max_idle_per_host: usize,
}

impl Default for ForwarderConfig {
    fn default() -> Self {
        ForwarderConfig {
            connect_timeout: Duration::from_secs(5),
            response_timeout: Duration::from_secs(300),
            pool_idle_timeout: Duration::from_secs(60),
            pool_max_idle_per_host: 64,
        }
    }
}

/// Where a proxy error came from, for the status and the page the server shows.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// Nothing listens at the target: the server has stopped or crashed.
    #[error("the server at {target} refused the connection")]
    Refused { target: String },
    #[error("the server at {target} did not answer within {secs} s")]
    Timeout { target: String, secs: u64 },
    #[error("the server at {target} failed: {message}")]
    Upstream { target: String, message: String },
    /// The request itself cannot be forwarded (bad target URI and such).
    #[error("cannot forward the request: {0}")]
    Downstream(String),
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::Refused { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Upstream { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::Downstream(_) => StatusCode::BAD_REQUEST,
        }
    }
}

/// Who sent the request, for `X-Forwarded-*`.
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    pub addr: SocketAddr,
    pub tls: bool,
    pub local_port: u16,
}

pub struct Forwarder {
    client: Client<HttpConnector, Incoming>,
    cfg: ForwarderConfig,
}

const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

fn is_upgrade(h: &HeaderMap) -> bool {
    h.get(header::CONNECTION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade")))
        && h.contains_key(header::UPGRADE)
}

fn remove_hop_by_hop(h: &mut HeaderMap, keep_upgrade: bool) {
    // Headers named in Connection are hop-by-hop too.
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|s| s.trim().to_ascii_lowercase()).collect::<Vec<_>>())
        .filter(|n| n != "upgrade")
        .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in HOP_BY_HOP {
        if keep_upgrade && (*n == "connection" || *n == "upgrade") {
            continue;
        }
        h.remove(*n);
    }
    if keep_upgrade {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// Strip mode, on the way back: an app answering at `/` sends redirects and
/// cookie paths for `/`; they are moved under the public prefix.
pub(crate) fn rewrite_for_prefix(h: &mut HeaderMap, prefix: &str, target: &str) {
    let base = prefix.trim_end_matches('/');
    if let Some(loc) = h.get(header::LOCATION).and_then(|v| v.to_str().ok()).map(str::to_string) {
        // An absolute URL pointing at the app itself becomes a path first.
        let path = match loc.strip_prefix(target) {
            Some(rest) if rest.is_empty() || rest.starts_with('/') => {
                Some(if rest.is_empty() { "/".to_string() } else { rest.to_string() })
            }
            _ => loc.starts_with('/').then(|| loc.clone()).filter(|l| !l.starts_with("//")),
        };
        if let Some(p) = path.filter(|p| !p.starts_with(&format!("{base}/")) && p != base) {
            if let Ok(v) = HeaderValue::from_str(&format!("{base}{p}")) {
                h.insert(header::LOCATION, v);
            }
        }
    }
    let cookies: Vec<HeaderValue> = h.get_all(header::SET_COOKIE).iter().cloned().collect();
    if cookies.is_empty() {
        return;
    }
    h.remove(header::SET_COOKIE);
    for c in cookies {
        let Ok(s) = c.to_str() else {
            h.append(header::SET_COOKIE, c);
            continue;
        };
        let mut has_path = false;
        let parts: Vec<String> = s
            .split(';')
            .map(|part| {
                let t = part.trim();
                match t.split_once('=') {
                    Some((k, v)) if k.trim().eq_ignore_ascii_case("path") => {
                        has_path = true;
                        let v = v.trim();
                        if v.starts_with('/') && !v.starts_with(&format!("{base}/")) && v != base {
                            format!(" Path={base}{v}")
                        } else {
                            format!(" Path={v}")
                        }
                    }
                    _ => part.to_string(),
                }
            })
            .collect();
        let mut out = parts.join(";");
        if !has_path {
            out.push_str(&format!("; Path={base}/"));
        }
        match HeaderValue::from_str(&out) {
            Ok(v) => h.append(header::SET_COOKIE, v),
            Err(_) => h.append(header::SET_COOKIE, c),
        };
    }
}

/// Removes the named cookies from the `Cookie` header(s), keeping the rest.
pub fn strip_cookies(h: &mut HeaderMap, names: &[&str]) {
    let named = |c: &str| names.contains(&c.split('=').next().unwrap_or("").trim());
    // Most requests carry none of them: the header stays as it came.
    let untouched =
        h.get_all(header::COOKIE).iter().all(|v| v.to_str().is_ok_and(|s| !s.split(';').any(|c| named(c.trim()))));
    if untouched {
        return;
    }
    let mut kept = String::new();
    for c in h.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()).flat_map(|s| s.split(';')) {
        let c = c.trim();
        if c.is_empty() || named(c) {
            continue;
        }
        if !kept.is_empty() {
            kept.push_str("; ");
        }
        kept.push_str(c);
    }
    h.remove(header::COOKIE);
    if !kept.is_empty() {
        if let Ok(v) = HeaderValue::from_str(&kept) {
            h.insert(header::COOKIE, v);
        }
    }
}

/// The URI a request goes on with: the route's target, and the request's
/// path (in strip mode, without the route's prefix: the app answers at `/`).
fn upstream_uri(uri: &Uri, route: &Route) -> Result<Uri, ProxyError> {
    let bad = |e: &dyn std::fmt::Display| ProxyError::Downstream(format!("bad upstream URI: {e}"));
    let original = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let stripped = match route.mode {
        RoutingMode::Strip => {
            let rest = original.strip_prefix(route.prefix.trim_end_matches('/')).unwrap_or(original);
            Some(if rest.starts_with('/') { rest.to_string() } else { format!("/{rest}") })
        }
        _ => None,
    };
    match (&route.upstream, stripped) {
        // The common case: nothing parsed, nothing copied but reference counts.
        (Some((scheme, authority)), None) => {
            let mut parts = http::uri::Parts::default();
            parts.scheme = Some(scheme.clone());
            parts.authority = Some(authority.clone());
            parts.path_and_query =
                Some(uri.path_and_query().cloned().unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")));
            Uri::from_parts(parts).map_err(|e| bad(&e))
        }
        (_, stripped) => {
            format!("{}{}", route.target, stripped.as_deref().unwrap_or(original)).parse().map_err(|e| bad(&e))
        }
    }
}

impl Forwarder {
    pub fn new(cfg: ForwarderConfig) -> Forwarder {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(cfg.connect_timeout));
        connector.set_nodelay(true);
        connector.enforce_http(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(cfg.pool_idle_timeout)
            .pool_max_idle_per_host(cfg.pool_max_idle_per_host)
            .http1_max_buf_size(64 * 1024)
            .build(connector);
        Forwarder { client, cfg }
    }

    /// Forwards `req` to `route`'s target, path unchanged.
    pub async fn forward(
        &self,
        mut req: Request<Incoming>,
        route: &Route,
        peer: Peer,
    ) -> Result<Response<Incoming>, ProxyError> {
        let upgrade = is_upgrade(req.headers());
        let uri = upstream_uri(req.uri(), route)?;
        let original_host = req.headers().get(header::HOST).cloned();
        *req.uri_mut() = uri;
        *req.version_mut() = http::Version::HTTP_11;
        let downstream_upgrade = if upgrade { Some(hyper::upgrade::on(&mut req)) } else { None };
        {
            let h = req.headers_mut();
            remove_hop_by_hop(h, upgrade);
            let proto = if peer.tls { "https" } else { "http" };
            let ip = peer.addr.ip().to_string();
            let xff = match h.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
                Some(prev) => format!("{prev}, {ip}"),
                None => ip,
            };
            if let Ok(v) = HeaderValue::from_str(&xff) {
                h.insert("x-forwarded-for", v);
            }
            h.insert("x-forwarded-proto", HeaderValue::from_static(proto));
            if let Ok(v) = HeaderValue::from_str(&peer.local_port.to_string()) {
                h.insert("x-forwarded-port", v);
            }
            if let Some(host) = original_host {
                h.insert("x-forwarded-host", host.clone());
                h.insert(header::HOST, host);
            }
        }

        let target = || route.target.clone();
        let secs = self.cfg.response_timeout.as_secs();
        let mut resp = match tokio::time::timeout(self.cfg.response_timeout, self.client.request(req)).await {
            Err(_) => return Err(ProxyError::Timeout { target: target(), secs }),
            Ok(Err(e)) if e.is_connect() => {
                let msg = format!("{e:?}");
                return Err(if msg.contains("timed out") || msg.contains("TimedOut") {
                    ProxyError::Timeout { target: target(), secs: self.cfg.connect_timeout.as_secs() }
                } else {
                    ProxyError::Refused { target: target() }
                });
            }
            Ok(Err(e)) => {
                let mut message = e.to_string();
                if let Some(src) = std::error::Error::source(&e) {
                    message = format!("{message}: {src}");
                }
                return Err(ProxyError::Upstream { target: target(), message });
            }
            Ok(Ok(r)) => r,
        };

        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            if let Some(down) = downstream_upgrade {
                let up = hyper::upgrade::on(&mut resp);
                tokio::spawn(async move {
                    match tokio::try_join!(down, up) {
                        Ok((d, u)) => {
                            let mut d = TokioIo::new(d);
                            let mut u = TokioIo::new(u);
                            if let Err(e) = tokio::io::copy_bidirectional(&mut d, &mut u).await {
                                tracing::debug!(error = %e, "upgraded connection ended");
                            }
                        }
                        Err(e) => tracing::debug!(error = %e, "upgrade failed"),
                    }
                });
            }
        } else {
            remove_hop_by_hop(resp.headers_mut(), false);
        }
        if route.mode == RoutingMode::Strip {
            rewrite_for_prefix(resp.headers_mut(), &route.public_prefix, &route.target);
        }
        Ok(resp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strip_mode_moves_redirects_and_cookie_paths_under_the_prefix() {
        let mut h = HeaderMap::new();
        h.insert(header::LOCATION, HeaderValue::from_static("/get?x=1"));
        h.append(header::SET_COOKIE, HeaderValue::from_static("k=v; Path=/"));
        h.append(header::SET_COOKIE, HeaderValue::from_static("n=1; HttpOnly"));
        rewrite_for_prefix(&mut h, "/user/al/app/", "http://127.0.0.1:9");
        assert_eq!(h.get(header::LOCATION).unwrap(), "/user/al/app/get?x=1");
        let c: Vec<&str> = h.get_all(header::SET_COOKIE).iter().map(|v| v.to_str().unwrap()).collect();
        assert_eq!(c, ["k=v; Path=/user/al/app/", "n=1; HttpOnly; Path=/user/al/app/"]);
        // Absolute URLs to the app itself, too; relative ones and other hosts stay.
        for (loc, want) in [
            ("http://127.0.0.1:9/x", "/user/al/app/x"),
            ("x/y", "x/y"),
            ("https://elsewhere.example/x", "https://elsewhere.example/x"),
            ("//evil.example/", "//evil.example/"),
            ("/user/al/app/ok", "/user/al/app/ok"),
        ] {
            let mut h = HeaderMap::new();
            h.insert(header::LOCATION, HeaderValue::from_str(loc).unwrap());
            rewrite_for_prefix(&mut h, "/user/al/app/", "http://127.0.0.1:9");
            assert_eq!(h.get(header::LOCATION).unwrap(), want, "{loc}");
        }
    }

    #[test]
    fn strips_named_cookies_only() {
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("berth-session=s; _xsrf=x; jupyterhub-user-al=t"));
        h.append(header::COOKIE, HeaderValue::from_static("berth-session=again"));
        strip_cookies(&mut h, &["berth-session"]);
        assert_eq!(h.get(header::COOKIE).unwrap(), "_xsrf=x; jupyterhub-user-al=t");
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("berth-session=s"));
        strip_cookies(&mut h, &["berth-session"]);
        assert!(h.get(header::COOKIE).is_none());
        // Without them the headers stay as they are; a value that is not
        // text is dropped when the header is rewritten.
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("a=1;b=2"));
        h.append(header::COOKIE, HeaderValue::from_static("c=3"));
        strip_cookies(&mut h, &["berth-session"]);
        assert_eq!(h.get_all(header::COOKIE).iter().count(), 2);
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_bytes(b"x=\xff").unwrap());
        h.append(header::COOKIE, HeaderValue::from_static("a=1; berth-session=s"));
        strip_cookies(&mut h, &["berth-session"]);
        assert_eq!(h.get_all(header::COOKIE).iter().collect::<Vec<_>>(), ["a=1"]);
    }

    #[test]
    fn upstream_uris_keep_the_path_and_query() {
        let r = Route::new("/user/al/".into(), "http://127.0.0.1:9".into(), "al".into(), String::new());
        assert!(r.upstream.is_some());
        let u = upstream_uri(&"/user/al/api?x=1&y=%20".parse().unwrap(), &r).unwrap();
        assert_eq!(u.to_string(), "http://127.0.0.1:9/user/al/api?x=1&y=%20");
        let s = Route::new("/user/al/app/".into(), "http://127.0.0.1:9".into(), "al".into(), "app".into())
            .with_mode(RoutingMode::Strip);
        assert_eq!(
            upstream_uri(&"/user/al/app/x?q".parse().unwrap(), &s).unwrap().to_string(),
            "http://127.0.0.1:9/x?q"
        );
        assert_eq!(upstream_uri(&"/user/al/app".parse().unwrap(), &s).unwrap().to_string(), "http://127.0.0.1:9/");
        // A target with a path of its own is joined as text, as before.
        let p = Route::new("/user/al/".into(), "http://127.0.0.1:9/base".into(), "al".into(), String::new());
        assert!(p.upstream.is_none());
        assert_eq!(
            upstream_uri(&"/user/al/x".parse().unwrap(), &p).unwrap().to_string(),
            "http://127.0.0.1:9/base/user/al/x"
        );
        let bad = Route::new("/user/al/".into(), "not a url".into(), "al".into(), String::new());
        assert!(matches!(upstream_uri(&"/user/al/x".parse().unwrap(), &bad), Err(ProxyError::Downstream(_))));
    }

    #[test]
    fn hop_by_hop_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        remove_hop_by_hop(&mut h, false);
        assert!(h.get("x-secret").is_none() && h.get("keep-alive").is_none() && h.get(header::CONNECTION).is_none());
        assert!(h.get("x-kept").is_some());
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(is_upgrade(&h));
        remove_hop_by_hop(&mut h, true);
        assert_eq!(h.get(header::CONNECTION).unwrap(), "upgrade");
        assert_eq!(h.get(header::UPGRADE).unwrap(), "websocket");
    }
}
