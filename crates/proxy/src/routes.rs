//! The route table: `/user/<name>/[<server>/]` prefixes to upstream targets.
//! Readers take a snapshot (`ArcSwap::load`) and never wait for writers; a
//! change builds a new table and swaps it in, so changing one route never
//! disturbs requests or connections on another.

use std::collections::HashMap;
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
    /// `target` parsed once, when it is just `scheme://authority`: a
    /// request's upstream URI is then put together without parsing.
    pub(crate) upstream: Option<(http::uri::Scheme, http::uri::Authority)>,
}

fn upstream_of(target: &str) -> Option<(http::uri::Scheme, http::uri::Authority)> {
    let uri: http::Uri = target.parse().ok()?;
    let (scheme, authority) = (uri.scheme()?.clone(), uri.authority()?.clone());
    (format!("{scheme}://{authority}") == target).then_some((scheme, authority))
}

impl Route {
    pub fn new(prefix: String, target: String, user: String, server: String) -> Route {
        let public_prefix = prefix.clone();
        let upstream = upstream_of(&target);
        Route {
            upstream,
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

/// One snapshot of the table: routes by their key (a path prefix without
/// its trailing slash, or a host name), and the most `/` any path key has,
/// which bounds the work of a lookup.
#[derive(Default, Clone)]
struct Table {
    by_key: HashMap<String, Arc<Route>>,
    max_slashes: usize,
}

impl Table {
    fn with(mut self, f: impl FnOnce(&mut HashMap<String, Arc<Route>>)) -> Table {
        f(&mut self.by_key);
        self.max_slashes = self.by_key.keys().map(|k| k.matches('/').count()).max().unwrap_or(0);
        self
    }
}

fn key_of(prefix: &str) -> &str {
    prefix.strip_suffix('/').unwrap_or(prefix)
}

/// Routes by prefix. A lookup costs a few hash probes (one per leading path
/// segment, at most as many as the deepest prefix has), whatever the number
/// of routes.
#[derive(Default)]
pub struct RouteTable {
    table: ArcSwap<Table>,
}

impl RouteTable {
    pub fn new() -> RouteTable {
        RouteTable::default()
    }

    /// Adds or replaces the route for `route.prefix`.
    pub fn insert(&self, route: Route) {
        let route = Arc::new(route);
        self.table.rcu(|cur| {
            Table::clone(cur).with(|m| {
                m.insert(key_of(&route.prefix).to_string(), route.clone());
            })
        });
    }

    pub fn remove(&self, prefix: &str) {
        self.table.rcu(|cur| {
            Table::clone(cur).with(|m| {
                m.remove(key_of(prefix));
            })
        });
    }

    /// The most specific route for a path. `/user/alice` (no slash) matches
    /// `/user/alice/` too.
    pub fn lookup(&self, path: &str) -> Option<Arc<Route>> {
        let t = self.table.load();
        let path_route = |k: &str| t.by_key.get(k).filter(|r| r.prefix.starts_with('/'));
        // Each `/` ends a candidate prefix; the last one found is the longest.
        let mut best = None;
        let mut slashes = 0;
        for (i, _) in path.match_indices('/') {
            if slashes > t.max_slashes {
                break;
            }
            slashes += 1;
            if let Some(r) = path_route(&path[..i]) {
                best = Some(r);
            }
        }
        // The whole path names a prefix without its slash (`/user/alice`).
        if slashes <= t.max_slashes {
            if let Some(r) = path_route(path) {
                best = Some(r);
            }
        }
        best.cloned()
    }

    /// The `Host` route for a host name (without port, lower case).
    pub fn lookup_host(&self, host: &str) -> Option<Arc<Route>> {
        self.table
            .load()
            .by_key
            .get(host)
            .filter(|r| r.mode == berth_core::RoutingMode::Host && r.prefix == host)
            .cloned()
    }

    /// Every route, longest prefix first.
    pub fn all(&self) -> Vec<Arc<Route>> {
        let mut all: Vec<Arc<Route>> = self.table.load().by_key.values().cloned().collect();
        all.sort_by(|a, b| b.prefix.len().cmp(&a.prefix.len()).then_with(|| a.prefix.cmp(&b.prefix)));
        all
    }

    pub fn len(&self) -> usize {
        self.table.load().by_key.len()
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
    fn a_thousand_routes_each_reached_by_its_own_paths() {
        let t = RouteTable::new();
        for i in 0..1000 {
            t.insert(route(&format!("/user/u{i}/"), &format!("http://u{i}")));
            t.insert(route(&format!("/user/u{i}/lab/"), &format!("http://u{i}-lab")));
        }
        t.insert(
            Route::new("lab--u1.apps.test".into(), "http://host".into(), "u1".into(), "lab".into())
                .with_mode(berth_core::RoutingMode::Host),
        );
        assert_eq!(t.len(), 2001);
        for i in [0, 1, 499, 999] {
            let get = |p: String| t.lookup(&p).map(|r| r.target.clone());
            assert_eq!(get(format!("/user/u{i}/api/kernels")).as_deref(), Some(format!("http://u{i}").as_str()));
            assert_eq!(get(format!("/user/u{i}")).as_deref(), Some(format!("http://u{i}").as_str()));
            assert_eq!(get(format!("/user/u{i}/lab/a/b/c")).as_deref(), Some(format!("http://u{i}-lab").as_str()));
            assert_eq!(get(format!("/user/u{i}/lab")).as_deref(), Some(format!("http://u{i}-lab").as_str()));
        }
        assert!(t.lookup("/user/u1000/").is_none());
        // A host route is found by its host only, never by a path.
        assert!(t.lookup("lab--u1.apps.test").is_none());
        assert_eq!(t.lookup_host("lab--u1.apps.test").unwrap().target, "http://host");
        assert!(t.lookup_host("/user/u1").is_none(), "a path route is not a host route");
        // A path of many segments is looked up in as many probes as the deepest prefix has.
        let deep = format!("/user/u7/lab{}", "/x".repeat(10_000));
        assert_eq!(t.lookup(&deep).unwrap().target, "http://u7-lab");
        assert!(t.lookup(&"/".repeat(10_000)).is_none());
        // Removing the deepest routes still leaves the shallower ones reachable.
        for i in 0..1000 {
            t.remove(&format!("/user/u{i}/lab/"));
        }
        assert_eq!(t.lookup("/user/u3/lab/x").unwrap().target, "http://u3");
        let all = t.all();
        assert_eq!(all.len(), 1001);
        assert!(all.windows(2).all(|w| w[0].prefix.len() >= w[1].prefix.len()), "longest first");
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
