//! The route table: `/user/<name>/[<server>/]` prefixes to upstream targets.
//! Readers take a snapshot (`ArcSwap::load`) and never wait for writers; a
//! change builds a new table and swaps it in, so changing one route never
//! disturbs requests or connections on another.

use std::sync::Arc;

use arc_swap::ArcSwap;

#[derive(Debug, Clone)]
pub struct Route {
    /// Path prefix with trailing slash, e.g. `/user/alice/` or `/user/alice/lab/`;
    /// for `Host` routes, the app's host name (`lab--alice.apps.example.org`).
    pub prefix: String,
    /// `http://host:port` of the upstream.
    pub target: String,
    pub user: String,
    pub server: String,
    /// When a request last passed (unix ms), so activity is recorded at most
    /// once a second per route instead of on every request.
    pub last_seen: std::sync::Arc<std::sync::atomic::AtomicI64>,
    /// How the app sees requests (see `berth_core::RoutingMode`).
    pub mode: berth_core::RoutingMode,
    /// For `Strip` and `Host` routes: the path prefix the app's redirects
    /// and cookie paths are moved under (`/user/alice/lab/`, or `/`).
    pub public_prefix: String,
}

impl Route {
    pub fn new(prefix: String, target: String, user: String, server: String) -> Route {
        let public_prefix = prefix.clone();
        Route {
            prefix,
            target,
            user,
            server,
            last_seen: Default::default(),
            mode: berth_core::RoutingMode::Prefix,
            public_prefix,
        }
    }

    /// A route for an app in `mode`: `Prefix` and `Strip` are keyed by the
    /// path prefix, `Host` by the host name.
    pub fn with_mode(mut self, mode: berth_core::RoutingMode) -> Route {
        self.mode = mode;
        if mode == berth_core::RoutingMode::Host {
            self.public_prefix = "/".into();
        }
        self
    }

    /// Marks a request at `now_ms`; true when activity should be recorded.
    pub fn touch(&self, now_ms: i64) -> bool {
        use std::sync::atomic::Ordering;
        let last = self.last_seen.load(Ordering::Relaxed);
        now_ms - last >= 1000
            && self.last_seen.compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed).is_ok()
    }
}

impl PartialEq for Route {
    fn eq(&self, o: &Route) -> bool {
        self.prefix == o.prefix && self.target == o.target && self.user == o.user && self.server == o.server
    }
}

#[derive(Default)]
pub struct RouteTable {
    routes: ArcSwap<Vec<Arc<Route>>>,
}

impl RouteTable {
    pub fn new() -> RouteTable {
        RouteTable::default()
    }

    /// Adds or replaces the route for `route.prefix`.
    pub fn insert(&self, route: Route) {
        self.routes.rcu(|cur| {
            let mut next: Vec<Arc<Route>> = cur.iter().filter(|r| r.prefix != route.prefix).cloned().collect();
            next.push(Arc::new(route.clone()));
            // Longest prefix first: the first match is the most specific.
            next.sort_by(|a, b| b.prefix.len().cmp(&a.prefix.len()).then_with(|| a.prefix.cmp(&b.prefix)));
            next
        });
    }

    pub fn remove(&self, prefix: &str) {
        self.routes.rcu(|cur| cur.iter().filter(|r| r.prefix != prefix).cloned().collect::<Vec<_>>());
    }

    /// The most specific route for a path. `/user/alice` (no slash) matches
    /// `/user/alice/` too.
    pub fn lookup(&self, path: &str) -> Option<Arc<Route>> {
        let snapshot = self.routes.load();
        snapshot
            .iter()
            .find(|r| path.starts_with(r.prefix.as_str()) || path == &r.prefix[..r.prefix.len() - 1])
            .cloned()
    }

    /// The `Host` route for a host name (without port, lower case).
    pub fn lookup_host(&self, host: &str) -> Option<Arc<Route>> {
        self.routes.load().iter().find(|r| r.mode == berth_core::RoutingMode::Host && r.prefix == host).cloned()
    }

    pub fn all(&self) -> Vec<Arc<Route>> {
        self.routes.load().iter().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.routes.load().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Whether a raw path has `.` or `..` segments, literally or percent-encoded.
/// Such paths are refused before routing: `/user/bob/../alice/` must not
/// reach anything but an error.
pub fn contains_dot_segments(path: &str) -> bool {
    // The common case (no dot, no escape) costs no allocation.
    if !path.contains(['.', '%']) {
        return false;
    }
    let decoded = percent_decode(path);
    decoded.split(['/', '\\']).any(|seg| seg == "." || seg == "..")
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok());
            if let Some(b) = hex {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(prefix: &str, target: &str) -> Route {
        Route::new(prefix.into(), target.into(), "u".into(), String::new())
    }

    #[test]
    fn most_specific_prefix_wins() {
        let t = RouteTable::new();
        t.insert(route("/user/alice/", "http://a"));
        t.insert(route("/user/alice/lab/", "http://b"));
        t.insert(route("/user/al/", "http://c"));
        let cases: &[(&str, Option<&str>)] = &[
            ("/user/alice/api/status", Some("http://a")),
            ("/user/alice/lab/api/status", Some("http://b")),
            ("/user/alice/lab", Some("http://b")),
            ("/user/alice", Some("http://a")),
            ("/user/alice/labx/", Some("http://a")),
            ("/user/al/x", Some("http://c")),
            ("/user/alicex/", None),
            ("/user/bob/", None),
            ("/hub/", None),
        ];
        for (path, want) in cases {
            assert_eq!(t.lookup(path).map(|r| r.target.clone()).as_deref(), *want, "{path}");
        }
        let r = t.lookup("/user/alice/lab/").unwrap();
        assert!(r.touch(5_000) && !r.touch(5_500) && r.touch(6_000), "activity at most once a second");
        t.remove("/user/alice/lab/");
        assert_eq!(t.lookup("/user/alice/lab/x").unwrap().target, "http://a");
        t.insert(route("/user/alice/", "http://a2"));
        assert_eq!(t.len(), 2);
        assert_eq!(t.lookup("/user/alice/").unwrap().target, "http://a2");
    }

    #[test]
    fn dot_segments() {
        for p in [
            "/user/bob/../alice/",
            "/user/bob/%2e%2e/alice/",
            "/user/bob/%2E%2E/alice",
            "/user/./x",
            "/user/bob/..%2falice/",
            "/a/..\\b",
        ] {
            assert!(contains_dot_segments(p), "{p}");
        }
        for p in ["/user/alice/", "/user/alice/a..b/", "/user/alice/.hidden", "/user/alice/%"] {
            assert!(!contains_dot_segments(p), "{p}");
        }
    }
}
