//! The security headers of every response the hub's router sends.
//!
//! Users' servers are served on the hub's own origin (`<base>user/<name>/…`),
//! so a page there is "same origin" to the hub: if it could load a hub page
//! into a frame (or keep a handle on a window it opened) it could read that
//! page's `_xsrf` field and submit the hub's forms as whoever looks at it —
//! an admin, say, minting an API token for the page's author. The headers
//! here forbid that:
//!
//! - `X-Frame-Options: DENY` and CSP `frame-ancestors 'none'`: no hub
//!   response is shown in a frame, an `<object>` or an `<embed>`, not even by
//!   a page of the same origin;
//! - `Cross-Origin-Opener-Policy: same-origin`: a hub page opened with
//!   `window.open` from a user's server (whose pages carry no such policy)
//!   gets a browsing context group of its own, so the opener's handle on it
//!   is severed;
//! - a `Content-Security-Policy` for the hub's own pages: scripts only from
//!   the hub's files (no inline script, no `on…=` handler), forms posting
//!   only to the hub (and, in `host` routing, to its app hosts: the log-in
//!   form's redirect chain ends on one), no `<base>`, no plugins;
//! - `Referrer-Policy: same-origin` and `X-Content-Type-Options: nosniff`.
//!
//! Proxied responses of users' servers never pass through the router, so
//! they keep their own headers (a notebook may frame its own pages).

use axum::extract::{Request, State};
use axum::http::header::{self, HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;

/// The hub's pages' policy in path routing; [`HubHeaders::new`] adds app hosts to `form-action`.
pub const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
img-src 'self' data:; connect-src 'self'; form-action 'self'; base-uri 'none'; object-src 'none'; \
frame-ancestors 'none'";

const COOP: HeaderName = HeaderName::from_static("cross-origin-opener-policy");

/// The headers the middleware sets, made once from the configuration.
#[derive(Clone, Debug)]
pub struct HubHeaders {
    csp: HeaderValue,
}

impl HubHeaders {
    /// `app_domain`: the `host` routing domain (empty when it is off). Forms
    /// may then also lead to its app hosts (`<server>--<user>.<app_domain>`,
    /// any port): logging in on the way to an app ends with a redirect there,
    /// and browsers check `form-action` on each redirect of a form's post.
    pub fn new(app_domain: &str) -> HubHeaders {
        let domain = app_domain.trim().trim_matches('.').to_ascii_lowercase();
        let plain = !domain.is_empty()
            && domain.split('.').all(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
        let csp = if plain {
            CSP.replace("form-action 'self'", &format!("form-action 'self' *.{domain}:*"))
        } else {
            if !domain.is_empty() {
                tracing::warn!(app_domain = %domain, "the app domain is not a plain host name; hub forms may post to the hub only");
            }
            CSP.to_string()
        };
        let csp = HeaderValue::from_str(&csp).unwrap_or_else(|_| HeaderValue::from_static(CSP));
        HubHeaders { csp }
    }

    /// The headers for this hub's configuration.
    pub fn for_hub(hub: &berth_hub::Hub) -> HubHeaders {
        HubHeaders::new(&hub.servers.templates.cfg.app_domain)
    }

    /// Sets the headers on a response, replacing any a handler set.
    pub fn apply(&self, resp: &mut Response) {
        let h = resp.headers_mut();
        h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
        h.insert(header::CONTENT_SECURITY_POLICY, self.csp.clone());
        h.insert(COOP, HeaderValue::from_static("same-origin"));
        h.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
        h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    }
}

impl Default for HubHeaders {
    fn default() -> HubHeaders {
        HubHeaders::new("")
    }
}

/// The middleware, outermost on the hub's router (so refusals made by the
/// authentication layer carry the headers too):
/// `.layer(axum::middleware::from_fn_with_state(HubHeaders::for_hub(&hub), hub_headers))`.
pub async fn hub_headers(State(headers): State<HubHeaders>, req: Request, next: Next) -> Response {
    let mut resp = next.run(req).await;
    headers.apply(&mut resp);
    resp
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use axum::response::IntoResponse;
    use axum::routing::get;
    use axum::Router;
    use tower::ServiceExt;

    use super::*;

    fn app(h: HubHeaders) -> Router {
        Router::new()
            .route("/hub/home", get(|| async { axum::response::Html("<p>home</p>") }))
            .route(
                "/hub/framed",
                get(|| async { ([(header::X_FRAME_OPTIONS, "ALLOWALL"), (header::CONTENT_SECURITY_POLICY, "")], "x") }),
            )
            .route("/hub/api/boom", get(|| async { (StatusCode::FORBIDDEN, "no").into_response() }))
            .fallback(|| async { (StatusCode::NOT_FOUND, "none") })
            .layer(axum::middleware::from_fn_with_state(h, hub_headers))
    }

    async fn headers_of(h: HubHeaders, path: &str) -> (StatusCode, axum::http::HeaderMap) {
        let r = app(h).oneshot(Request::get(path).body(Body::empty()).unwrap()).await.unwrap();
        (r.status(), r.headers().clone())
    }

    fn get_h<'a>(h: &'a axum::http::HeaderMap, name: &str) -> &'a str {
        h.get(name).unwrap_or_else(|| panic!("no {name}")).to_str().unwrap()
    }

    /// The directives of a policy, by name.
    fn directives(csp: &str) -> Vec<(String, String)> {
        csp.split(';')
            .map(str::trim)
            .filter(|d| !d.is_empty())
            .map(|d| {
                let (k, v) = d.split_once(' ').unwrap_or((d, ""));
                (k.to_string(), v.to_string())
            })
            .collect()
    }

    #[tokio::test]
    async fn every_answer_forbids_framing_and_inline_script() {
        for path in ["/hub/home", "/hub/api/boom", "/hub/nowhere", "/user/mallory/not-running"] {
            let (status, h) = headers_of(HubHeaders::default(), path).await;
            assert!(status.is_success() || status.is_client_error(), "{path}: {status}");
            assert_eq!(get_h(&h, "x-frame-options"), "DENY", "{path}");
            assert_eq!(get_h(&h, "content-security-policy"), CSP, "{path}");
            assert_eq!(get_h(&h, "cross-origin-opener-policy"), "same-origin", "{path}");
            assert_eq!(get_h(&h, "referrer-policy"), "same-origin", "{path}");
            assert_eq!(get_h(&h, "x-content-type-options"), "nosniff", "{path}");
            assert_eq!(h.get_all("x-frame-options").iter().count(), 1, "{path}: one value");
        }
    }

    #[tokio::test]
    async fn a_handler_cannot_loosen_them() {
        let (_, h) = headers_of(HubHeaders::default(), "/hub/framed").await;
        assert_eq!(get_h(&h, "x-frame-options"), "DENY");
        assert_eq!(get_h(&h, "content-security-policy"), CSP);
        assert_eq!(h.get_all("content-security-policy").iter().count(), 1);
    }

    #[test]
    fn the_policy_allows_no_inline_script_and_no_framing() {
        let d = directives(CSP);
        let find = |k: &str| d.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str()).unwrap_or_else(|| panic!("{k}"));
        assert_eq!(find("script-src"), "'self'", "no 'unsafe-inline', no 'unsafe-eval'");
        assert_eq!(find("frame-ancestors"), "'none'");
        assert_eq!(find("default-src"), "'self'");
        assert_eq!(find("form-action"), "'self'");
        assert_eq!(find("base-uri"), "'none'");
        assert_eq!(find("object-src"), "'none'");
        assert_eq!(find("connect-src"), "'self'", "the pending page's EventSource is same-origin");
        let names: Vec<&str> = d.iter().map(|(n, _)| n.as_str()).collect();
        let mut unique = names.clone();
        unique.dedup();
        assert_eq!(names, unique, "each directive once");
    }

    #[tokio::test]
    async fn in_host_routing_forms_may_lead_to_app_hosts() {
        let (_, h) = headers_of(HubHeaders::new("Apps.Example.org."), "/hub/home").await;
        let csp = get_h(&h, "content-security-policy");
        assert!(csp.contains("form-action 'self' *.apps.example.org:*;"), "{csp}");
        assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
        assert!(csp.contains("script-src 'self';"), "{csp}");
    }

    #[test]
    fn an_odd_app_domain_cannot_inject_directives() {
        for odd in ["apps.test; script-src *", "apps.test 'unsafe-inline'", "a..b", "*.apps.test", "ap\u{e9}ps.test"] {
            let csp = HubHeaders::new(odd).csp.to_str().unwrap().to_string();
            assert_eq!(csp, CSP, "{odd:?}");
        }
    }
}
