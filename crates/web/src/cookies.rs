//! Reading the `Cookie` header and writing `Set-Cookie` with berth's flags.

use axum::http::{header, HeaderMap, HeaderValue};

pub const SESSION: &str = "berth-session";
/// The session cookie's name over TLS: browsers accept a `__Host-` cookie
/// only from a secure origin, for `Path=/`, without `Domain` — so no
/// server on another host or path can set one that shadows it.
pub const SECURE_SESSION: &str = "__Host-berth-session";
/// JupyterHub's session id cookie: not a credential, read by single-user
/// servers to bind their own XSRF tokens.
pub const SESSION_ID: &str = "jupyterhub-session-id";
pub const XSRF: &str = "_xsrf";

/// berth's credential cookies, which no user's server may set or receive.
/// (`_xsrf` and `jupyterhub-session-id` are not credentials: single-user
/// servers use cookies of those names themselves, under their own paths.)
pub const OWN: &[&str] = &[SESSION, SECURE_SESSION, "berth-app"];

/// The session cookie's name and path: `__Host-` and `/` when cookies are secure.
pub fn session_cookie(secure: bool, base_url: &str) -> (&'static str, &str) {
    if secure {
        (SECURE_SESSION, "/")
    } else {
        (SESSION, base_url)
    }
}

/// Cookies of a request (the first of each name wins).
#[derive(Debug, Clone, Default)]
pub struct Cookies(Vec<(String, String)>);

impl Cookies {
    pub fn from_headers(h: &HeaderMap) -> Cookies {
        let mut out = Vec::new();
        for v in h.get_all(header::COOKIE) {
            let Ok(s) = v.to_str() else { continue };
            for part in s.split(';') {
                if let Some((k, v)) = part.trim().split_once('=') {
                    out.push((k.trim().to_string(), v.trim().trim_matches('"').to_string()));
                }
            }
        }
        Cookies(out)
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// The value of the first cookie called `name`, as [`Cookies::get`]
    /// finds it, read in place (the proxy's edge: no copies per request).
    pub fn find<'h>(h: &'h HeaderMap, name: &str) -> Option<&'h str> {
        h.get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|s| s.split(';'))
            .filter_map(|part| part.trim().split_once('='))
            .find(|(k, _)| k.trim() == name)
            .map(|(_, v)| v.trim().trim_matches('"'))
    }
}

pub struct CookieSpec<'a> {
    pub name: &'a str,
    pub value: &'a str,
    pub path: &'a str,
    pub http_only: bool,
    pub secure: bool,
    /// `None`: a session cookie.
    pub max_age: Option<u64>,
}

impl CookieSpec<'_> {
    pub fn header(&self) -> HeaderValue {
        let mut s = format!("{}={}; Path={}; SameSite=Lax", self.name, self.value, self.path);
        if self.http_only {
            s.push_str("; HttpOnly");
        }
        if self.secure {
            s.push_str("; Secure");
        }
        if let Some(age) = self.max_age {
            s.push_str(&format!("; Max-Age={age}"));
        }
        HeaderValue::from_str(&s).unwrap_or_else(|_| HeaderValue::from_static("invalid=; Max-Age=0"))
    }
}

/// A `Set-Cookie` that removes a cookie.
pub fn clear(name: &str, path: &str) -> HeaderValue {
    HeaderValue::from_str(&format!("{name}=; Path={path}; Max-Age=0; expires=Thu, 01 Jan 1970 00:00:00 GMT"))
        .unwrap_or_else(|_| HeaderValue::from_static("invalid=; Max-Age=0"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cookie_headers() {
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("a=1; b=\"2\"; a=3"));
        h.append(header::COOKIE, HeaderValue::from_static("c=x=y"));
        let c = Cookies::from_headers(&h);
        assert_eq!(c.get("a"), Some("1"));
        assert_eq!(c.get("b"), Some("2"));
        assert_eq!(c.get("c"), Some("x=y"));
        assert_eq!(c.get("d"), None);
        for name in ["a", "b", "c", "d", " a", ""] {
            assert_eq!(Cookies::find(&h, name), c.get(name), "find and get agree on {name:?}");
        }
    }
}
