//! The hub's static files, embedded in the binary and served at
//! `GET <base>hub/static/<name>`.
//!
//! They exist because the hub's pages run no inline script (see
//! [`crate::headers`]): a page's script is one of these files, and what it
//! needs to know comes from `data-` attributes in the page.
//!
//! Pages link them with [`url`], which appends `?v=<hash of the content>`:
//! such a request is cached for a year (`immutable`); one without the
//! current hash is revalidated (`no-cache`) through the `ETag`. The route
//! needs no caller, so it is mounted outside the authentication layer (whose
//! XSRF rule would refuse a `<script>` fetch, which is no navigation).

use axum::extract::Path;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

/// One embedded file.
struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static str,
    /// FNV-1a of `body`, made at compile time.
    hash: u64,
}

const PENDING_JS: &str = include_str!("../assets/pending.js");
const GPUS_JS: &str = include_str!("../assets/gpus.js");

const ASSETS: &[Asset] = &[
    Asset {
        name: "pending.js",
        content_type: "text/javascript; charset=utf-8",
        body: PENDING_JS,
        hash: fnv1a(PENDING_JS.as_bytes()),
    },
    Asset {
        name: "gpus.js",
        content_type: "text/javascript; charset=utf-8",
        body: GPUS_JS,
        hash: fnv1a(GPUS_JS.as_bytes()),
    },
];

const IMMUTABLE: &str = "public, max-age=31536000, immutable";
const REVALIDATE: &str = "no-cache";

const fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < bytes.len() {
        h ^= bytes[i] as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
        i += 1;
    }
    h
}

fn find(name: &str) -> Option<&'static Asset> {
    ASSETS.iter().find(|a| a.name == name)
}

fn version(a: &Asset) -> String {
    format!("{:016x}", a.hash)
}

/// The URL a page links the file `name` with, under `hub_prefix`
/// (`<base>hub/`), versioned by its content. `None` for a file that is not embedded.
pub fn url(hub_prefix: &str, name: &str) -> Option<String> {
    find(name).map(|a| format!("{hub_prefix}static/{}?v={}", a.name, version(a)))
}

/// The route, for `hub_prefix` (`<base>hub/`); merge it into the app
/// outside the authentication layer.
pub fn router<S: Clone + Send + Sync + 'static>(hub_prefix: &str) -> Router<S> {
    Router::new().route(&format!("{hub_prefix}static/{{name}}"), get(serve))
}

async fn serve(Path(name): Path<String>, uri: Uri, headers: HeaderMap) -> Response {
    let Some(asset) = find(&name) else {
        return (StatusCode::NOT_FOUND, [(header::CACHE_CONTROL, REVALIDATE)], format!("no static file {name:?}\n"))
            .into_response();
    };
    let version = version(asset);
    let etag = format!("\"{version}\"");
    let asked = uri.query().unwrap_or("").split('&').find_map(|kv| kv.strip_prefix("v="));
    let cache = if asked == Some(version.as_str()) { IMMUTABLE } else { REVALIDATE };
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim().trim_start_matches("W/") == etag || t.trim() == "*"));
    let mut resp = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        let mut r = asset.body.into_response();
        r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(asset.content_type));
        r
    };
    let h = resp.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, v);
    }
    resp
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    use super::*;

    async fn get_(path: &str, etag: Option<&str>) -> Response {
        let app: Router = router("/base/hub/");
        let mut req = Request::get(path);
        if let Some(e) = etag {
            req = req.header(header::IF_NONE_MATCH, e);
        }
        app.oneshot(req.body(Body::empty()).unwrap()).await.unwrap()
    }

    fn h<'a>(r: &'a Response, name: &str) -> &'a str {
        r.headers().get(name).unwrap_or_else(|| panic!("no {name}")).to_str().unwrap()
    }

    #[tokio::test]
    async fn serves_the_pending_script_as_javascript_cached_by_version() {
        let url = url("/base/hub/", "pending.js").unwrap();
        assert!(url.starts_with("/base/hub/static/pending.js?v="), "{url}");
        let r = get_(&url, None).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(h(&r, "content-type"), "text/javascript; charset=utf-8");
        assert_eq!(h(&r, "cache-control"), IMMUTABLE);
        let etag = h(&r, "etag").to_string();
        let body = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
        assert_eq!(body, PENDING_JS.as_bytes());
        assert!(PENDING_JS.contains("EventSource") && PENDING_JS.contains("data-progress-url"));

        // Without (or with an old) version: revalidated, and 304 when unchanged.
        for path in ["/base/hub/static/pending.js", "/base/hub/static/pending.js?v=0123456789abcdef"] {
            let r = get_(path, None).await;
            assert_eq!(r.status(), StatusCode::OK, "{path}");
            assert_eq!(h(&r, "cache-control"), REVALIDATE, "{path}");
            let r = get_(path, Some(&etag)).await;
            assert_eq!(r.status(), StatusCode::NOT_MODIFIED, "{path}");
            assert_eq!(h(&r, "etag"), etag);
        }
        let r = get_("/base/hub/static/pending.js", Some("\"other\"")).await;
        assert_eq!(r.status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn unknown_files_are_not_found() {
        assert_eq!(url("/hub/", "nope.js"), None);
        for path in ["/base/hub/static/nope.js", "/base/hub/static/..%2Fpending.js", "/base/hub/static/"] {
            let r = get_(path, None).await;
            assert_eq!(r.status(), StatusCode::NOT_FOUND, "{path}");
        }
    }

    #[test]
    fn the_version_follows_the_content() {
        assert_ne!(fnv1a(b"a"), fnv1a(b"b"));
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(version(&ASSETS[0]).len(), 16);
    }
}
