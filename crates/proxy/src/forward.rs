//! Forwarding one request to its upstream: hop-by-hop headers removed,
//! `X-Forwarded-*` added, bodies streamed both ways, upgrades (WebSocket)
//! spliced, errors classified by where they came from.
//!
//! A downstream connection keeps one upstream connection of its own
//! ([`Upstream`]) and drives it in its own task: the request goes out and
//! the answer comes back without crossing to another task or a shared
//! pool. Upgrades go through the pooled client, whose connections run in
//! tasks of their own (a spliced connection outlives the request).

use berth_core::RoutingMode;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, Scheme};
use http::{Request, Response, StatusCode, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

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

type Conn = http1::Connection<TokioIo<TcpStream>, Incoming>;
const MAX_BUF: usize = 64 * 1024;

/// The upstream connection one downstream connection keeps between its
/// requests (a browser tab's or an API client's requests go to one server),
/// to one target at a time: a request for another target closes it.
/// Nothing else uses it, so it carries only this client's requests.
#[derive(Default)]
pub struct Upstream {
    kept: Mutex<Option<Kept>>,
}

struct Kept {
    authority: Authority,
    sender: http1::SendRequest<Incoming>,
    conn: Pin<Box<Conn>>,
}

impl Upstream {
    fn take(&self, authority: &Authority) -> Option<Kept> {
        let kept = self.kept.lock().ok()?.take()?;
        (kept.authority == *authority).then_some(kept)
    }

    fn put(&self, kept: Kept) {
        if let Ok(mut k) = self.kept.lock() {
            *k = Some(kept);
        }
    }
}

/// Polls the connection: it reads and writes only when polled, here in
/// the downstream connection's task. A connection that has ended is dropped.
fn drive(conn: &mut Option<Pin<Box<Conn>>>, cx: &mut Context<'_>) {
    if let Some(c) = conn {
        if let Poll::Ready(r) = c.as_mut().poll(cx) {
            if let Err(e) = r {
                tracing::debug!(error = %e, "upstream connection ended");
            }
            *conn = None;
        }
    }
}

type Back = (Arc<Upstream>, Authority, http1::SendRequest<Incoming>);

/// An upstream answer's body. Over a downstream connection's own upstream
/// connection, the connection is driven from here while the body streams,
/// and handed back for the connection's next request once the body has
/// been read to its end (a body cut short closes it).
pub struct UpstreamBody {
    body: Incoming,
    conn: Option<Pin<Box<Conn>>>,
    back: Option<Back>,
    ended: bool,
}

impl UpstreamBody {
    fn pooled(body: Incoming) -> UpstreamBody {
        UpstreamBody { body, conn: None, back: None, ended: false }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        drive(&mut this.conn, cx);
        let r = Pin::new(&mut this.body).poll_frame(cx);
        match &r {
            Poll::Ready(None) => this.ended = true,
            Poll::Ready(Some(Err(_))) => this.back = None,
            _ => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        if !(self.ended || self.body.is_end_stream()) {
            return;
        }
        if let (Some(conn), Some((slot, authority, sender))) = (self.conn.take(), self.back.take()) {
            slot.put(Kept { authority, sender, conn });
        }
    }
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
            .http1_max_buf_size(MAX_BUF)
            .build(connector);
        Forwarder { client, cfg }
    }

    /// Forwards `req` to `route`'s target, path unchanged (in strip mode,
    /// without the route's prefix), over `upstream`, the downstream
    /// connection's own upstream connection, unless it is an upgrade.
    pub async fn forward(
        &self,
        mut req: Request<Incoming>,
        route: &Route,
        peer: Peer,
        upstream: &Arc<Upstream>,
    ) -> Result<Response<UpstreamBody>, ProxyError> {
        let upgrade = is_upgrade(req.headers());
        let uri = upstream_uri(req.uri(), route)?;
        let original_host = req.headers().get(header::HOST).cloned();
        // Over the connection's own upstream, the request line has the path
        // only (origin form), as a client sends it.
        let own = match (upgrade, uri.scheme(), uri.authority()) {
            (false, Some(s), Some(a)) if *s == Scheme::HTTP => Some(a.clone()),
            _ => None,
        };
        if own.is_some() {
            let pq = uri.path_and_query().cloned().unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
            *req.uri_mut() = Uri::from(pq);
        } else {
            *req.uri_mut() = uri;
        }
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
            match (original_host, &own) {
                (Some(host), _) => {
                    h.insert("x-forwarded-host", host.clone());
                    h.insert(header::HOST, host);
                }
                // What the pooled client would send.
                (None, Some(a)) => {
                    if let Ok(v) = HeaderValue::from_str(a.as_str()) {
                        h.insert(header::HOST, v);
                    }
                }
                (None, None) => {}
            }
        }

        let target = || route.target.clone();
        let secs = self.cfg.response_timeout.as_secs();
        if let Some(authority) = own {
            let sent = tokio::time::timeout(self.cfg.response_timeout, self.send_own(upstream, &authority, req, route));
            let (mut resp, conn, sender) = match sent.await {
                Err(_) => return Err(ProxyError::Timeout { target: target(), secs }),
                Ok(r) => r?,
            };
            remove_hop_by_hop(resp.headers_mut(), false);
            if route.mode == RoutingMode::Strip {
                rewrite_for_prefix(resp.headers_mut(), &route.public_prefix, &route.target);
            }
            // Relayed in this task, whatever its size: the connection threads
            // run one task at a time each, so a task of its own for a large
            // answer would overlap nothing.
            let back = Some((upstream.clone(), authority, sender));
            return Ok(resp.map(|body| UpstreamBody { body, conn, back, ended: false }));
        }
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
        Ok(resp.map(UpstreamBody::pooled))
    }

    /// Sends `req` over the downstream connection's kept connection to
    /// `authority`, or a new one; a kept connection the server has closed
    /// meanwhile is replaced, and a request it could not take is sent again
    /// on a new one (it was not written, so this is safe for any method).
    async fn send_own(
        &self,
        upstream: &Arc<Upstream>,
        authority: &Authority,
        mut req: Request<Incoming>,
        route: &Route,
    ) -> Result<(Response<Incoming>, Option<Pin<Box<Conn>>>, http1::SendRequest<Incoming>), ProxyError> {
        let failed = |e: &hyper::Error| {
            let mut message = e.to_string();
            if let Some(src) = std::error::Error::source(e) {
                message = format!("{message}: {src}");
            }
            ProxyError::Upstream { target: route.target.clone(), message }
        };
        let mut kept = upstream.take(authority);
        loop {
            let reused = kept.is_some();
            let (mut sender, mut conn) = match kept.take() {
                Some(k) => (k.sender, Some(k.conn)),
                None => self.connect(authority, route).await?,
            };
            let ready = std::future::poll_fn(|cx| {
                drive(&mut conn, cx);
                sender.poll_ready(cx)
            })
            .await;
            match ready {
                Ok(()) => {}
                Err(_) if reused => continue,
                Err(e) => return Err(failed(&e)),
            }
            let mut answer = std::pin::pin!(sender.try_send_request(req));
            let answer = std::future::poll_fn(|cx| {
                drive(&mut conn, cx);
                answer.as_mut().poll(cx)
            })
            .await;
            match answer {
                Ok(resp) => return Ok((resp, conn, sender)),
                Err(mut e) => match e.take_message() {
                    Some(back) if reused => req = back,
                    _ => return Err(failed(e.error())),
                },
            }
        }
    }

    async fn connect(
        &self,
        authority: &Authority,
        route: &Route,
    ) -> Result<(http1::SendRequest<Incoming>, Option<Pin<Box<Conn>>>), ProxyError> {
        let addr = format!("{}:{}", authority.host(), authority.port_u16().unwrap_or(80));
        let stream = match tokio::time::timeout(self.cfg.connect_timeout, TcpStream::connect(&addr)).await {
            Err(_) => {
                return Err(ProxyError::Timeout {
                    target: route.target.clone(),
                    secs: self.cfg.connect_timeout.as_secs(),
                })
            }
            Ok(Err(_)) => return Err(ProxyError::Refused { target: route.target.clone() }),
            Ok(Ok(s)) => s,
        };
        let _ = stream.set_nodelay(true);
        let (sender, conn) = http1::Builder::new()
            .max_buf_size(MAX_BUF)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ProxyError::Upstream { target: route.target.clone(), message: e.to_string() })?;
        Ok((sender, Some(Box::pin(conn))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An upstream that answers every request on a connection with what it
    /// saw (its own name, the connection's number, the request line and
    /// Host), closing each connection after `close_after` answers without
    /// saying so (as a server's keep-alive time-out does).
    async fn upstream(name: &'static str, close_after: usize) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let conns = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = conns.clone();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                let n = counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut answered = 0;
                    while answered < close_after {
                        let mut chunk = [0u8; 4096];
                        let Ok(k) = s.read(&mut chunk).await else { return };
                        if k == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..k]);
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&buf[..end]).to_string();
                            buf.drain(..end + 4);
                            let line = head.lines().next().unwrap_or("").to_string();
                            let host = head
                                .lines()
                                .find_map(|l| l.strip_prefix("host: ").or_else(|| l.strip_prefix("Host: ")))
                                .unwrap_or("-");
                            let mut body = format!("{name} conn={n} {line} host={host}");
                            if line.contains("/big") {
                                // Larger than the connection buffers (64 KiB): several frames.
                                body.push_str(&"x".repeat(300 * 1024));
                            }
                            let resp = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}", body.len());
                            if s.write_all(resp.as_bytes()).await.is_err() {
                                return;
                            }
                            answered += 1;
                        }
                    }
                    // Closed without a word, a moment after the answer.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    let _ = s.shutdown().await;
                });
            }
        });
        (addr, conns)
    }

    /// berth's side: one listener whose connections each keep an
    /// [`Upstream`], forwarding `/a/…` to `a` and `/b/…` to `b`.
    async fn proxy(a: SocketAddr, b: SocketAddr) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let fwd = Arc::new(Forwarder::new(ForwarderConfig::default()));
        let ra = Arc::new(Route::new("/a/".into(), format!("http://{a}"), "a".into(), "".into()));
        let rb = Arc::new(Route::new("/b/".into(), format!("http://{b}"), "b".into(), "".into()));
        tokio::spawn(async move {
            loop {
                let (s, peer) = listener.accept().await.unwrap();
                let (fwd, ra, rb) = (fwd.clone(), ra.clone(), rb.clone());
                let up = Arc::new(Upstream::default());
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let (fwd, ra, rb, up) = (fwd.clone(), ra.clone(), rb.clone(), up.clone());
                    async move {
                        let route = if req.uri().path().starts_with("/a/") { ra } else { rb };
                        let p = Peer { addr: peer, tls: false, local_port: 1 };
                        let resp = match fwd.forward(req, &route, p, &up).await {
                            Ok(r) => r.map(http_body_util::Either::Left),
                            Err(e) => Response::builder()
                                .status(e.status())
                                .body(http_body_util::Either::Right(http_body_util::Full::new(Bytes::from(
                                    e.to_string(),
                                ))))
                                .unwrap(),
                        };
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
                tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(s), svc));
            }
        });
        addr
    }

    /// A client on one connection to the proxy.
    async fn client(addr: SocketAddr) -> http1::SendRequest<http_body_util::Empty<Bytes>> {
        let s = TcpStream::connect(addr).await.unwrap();
        let (sender, conn) = http1::handshake(TokioIo::new(s)).await.unwrap();
        tokio::spawn(conn);
        sender
    }

    async fn get(c: &mut http1::SendRequest<http_body_util::Empty<Bytes>>, path: &str) -> (u16, String) {
        use http_body_util::BodyExt;
        c.ready().await.unwrap();
        let req = Request::get(path).header("host", "hub.example").body(http_body_util::Empty::new()).unwrap();
        let resp = c.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).to_string())
    }

    #[tokio::test]
    async fn a_connection_keeps_its_upstream_connection_and_never_crosses_targets() {
        let (a, a_conns) = upstream("A", usize::MAX).await;
        let (b, b_conns) = upstream("B", usize::MAX).await;
        let proxy = proxy(a, b).await;
        let mut c = client(proxy).await;
        for i in 0..3 {
            let (status, body) = get(&mut c, &format!("/a/x?i={i}")).await;
            assert_eq!(status, 200);
            // Origin form on the request line, the visitor's Host kept.
            assert_eq!(body, format!("A conn=1 GET /a/x?i={i} HTTP/1.1 host=hub.example"));
        }
        assert_eq!(a_conns.load(std::sync::atomic::Ordering::SeqCst), 1, "one upstream connection for three requests");
        // The same client asking for the other target goes to it, on a
        // connection of its own; and back again.
        let (_, body) = get(&mut c, "/b/y").await;
        assert_eq!(body, "B conn=1 GET /b/y HTTP/1.1 host=hub.example");
        let (_, body) = get(&mut c, "/a/z").await;
        assert!(body.starts_with("A conn=2 GET /a/z "), "{body}");
        // A second client has its own upstream connection.
        let mut d = client(proxy).await;
        let (_, body) = get(&mut d, "/b/w").await;
        assert!(body.starts_with("B conn=2 "), "{body}");
        assert_eq!(b_conns.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn large_answers_stream_whole_and_their_connection_is_kept_after() {
        let (a, a_conns) = upstream("A", usize::MAX).await;
        let proxy = proxy(a, a).await;
        let mut c = client(proxy).await;
        for i in 0..3 {
            let (status, body) = get(&mut c, &format!("/a/big?i={i}")).await;
            assert_eq!(status, 200);
            let head = format!("A conn=1 GET /a/big?i={i} HTTP/1.1 host=hub.example");
            assert!(body.starts_with(&head), "{}", &body[..body.len().min(80)]);
            assert_eq!(body.len(), head.len() + 300 * 1024);
            // The connection goes back once the body has been read to its end.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (_, body) = get(&mut c, "/a/small").await;
        assert!(body.starts_with("A conn=1 "), "{body}");
        assert_eq!(a_conns.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn an_upstream_connection_the_server_closed_is_replaced_without_an_error() {
        // The server closes each connection after one answer, as a
        // keep-alive time-out would between two requests.
        let (a, a_conns) = upstream("A", 1).await;
        let (b, _) = upstream("B", 1).await;
        let proxy = proxy(a, b).await;
        let mut c = client(proxy).await;
        for i in 0..5 {
            let (status, body) = get(&mut c, &format!("/a/{i}")).await;
            assert_eq!(status, 200, "{body}");
            assert_eq!(body, format!("A conn={} GET /a/{i} HTTP/1.1 host=hub.example", i + 1));
            // The close arrives while the connection is kept.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(a_conns.load(std::sync::atomic::Ordering::SeqCst), 5);
    }

    #[tokio::test]
    async fn a_target_that_refuses_is_told_as_refused() {
        let (a, _) = upstream("A", usize::MAX).await;
        let gone = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
        let proxy = proxy(a, gone).await;
        let mut c = client(proxy).await;
        let (status, body) = get(&mut c, "/b/").await;
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("refused"), "{body}");
        // The connection goes on working for the other target.
        assert_eq!(get(&mut c, "/a/").await.0, 200);
    }

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
