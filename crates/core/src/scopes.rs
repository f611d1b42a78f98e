//! JupyterHub-style scopes: `name[!filter]`, with JupyterHub's names and
//! hierarchy, expanded once so checks are set look-ups.
//!
//! Filters: none (everything), `!user=<name>`, `!server=<user>/<server>`, and
//! the unexpanded `!user` / `!server` forms, which mean "the token's owner"
//! and are expanded when the owner is known.

use std::collections::BTreeSet;
use std::fmt;

/// Every scope name berth knows, with the names each one implies.
const HIERARCHY: &[(&str, &[&str])] = &[
    ("admin:users", &["admin:auth_state", "users", "delete:users", "list:users"]),
    ("admin:auth_state", &[]),
    ("users", &["read:users", "users:activity"]),
    ("delete:users", &[]),
    ("list:users", &["read:users:name"]),
    ("read:users", &["list:users", "read:users:name", "read:users:groups", "read:users:activity"]),
    ("read:users:name", &[]),
    ("read:users:groups", &[]),
    ("read:users:activity", &[]),
    ("users:activity", &["read:users:activity"]),
    ("admin:servers", &["admin:server_state", "servers"]),
    ("admin:server_state", &[]),
    ("servers", &["read:servers", "delete:servers"]),
    ("read:servers", &["read:users:name"]),
    ("delete:servers", &[]),
    ("access:servers", &[]),
    ("tokens", &["read:tokens"]),
    ("read:tokens", &[]),
    ("read:metrics", &[]),
    ("read:hub", &[]),
    ("shutdown", &[]),
    ("proxy", &[]),
    ("ssh-keys", &["read:ssh-keys"]),
    ("read:ssh-keys", &[]),
    // Who holds which GPU and whose processes run on it (`GET /hub/api/gpus`).
    ("read:gpus", &[]),
    // The hub's event log (`GET /hub/api/events`, the admin's Events page).
    ("read:events", &[]),
];

/// What a user holds on their own account (JupyterHub's `self`).
const SELF_SCOPES: &[&str] =
    &["users", "servers", "access:servers", "tokens", "read:users", "users:activity", "ssh-keys"];

/// What an admin holds, unfiltered.
const ADMIN_SCOPES: &[&str] = &[
    "admin:users",
    "admin:servers",
    "access:servers",
    "tokens",
    "read:metrics",
    "read:hub",
    "shutdown",
    "proxy",
    "ssh-keys",
    "read:gpus",
    "read:events",
];

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Filter {
    All,
    User(String),
    Server { user: String, server: String },
}

/// What a request acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target<'a> {
    /// Hub-wide things: listing users, metrics.
    Hub,
    User(&'a str),
    Server {
        user: &'a str,
        server: &'a str,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Scope {
    pub name: String,
    pub filter: Filter,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScopeError {
    #[error("unknown scope {0:?}")]
    Unknown(String),
    #[error("unsupported scope filter in {0:?} (use !user=<name> or !server=<user>/<server>)")]
    BadFilter(String),
}

impl Scope {
    /// Parses `name[!filter]`; `owner` expands the bare `!user`/`!server`.
    pub fn parse(raw: &str, owner: Option<&str>) -> Result<Scope, ScopeError> {
        let raw = raw.trim();
        let (name, filter) = match raw.split_once('!') {
            None => (raw, Filter::All),
            Some((name, f)) => {
                let bad = || ScopeError::BadFilter(raw.to_string());
                let filter = match f.split_once('=') {
                    None if f == "user" => Filter::User(owner.ok_or_else(bad)?.to_string()),
                    None if f == "server" => {
                        Filter::Server { user: owner.ok_or_else(bad)?.to_string(), server: String::new() }
                    }
                    Some(("user", u)) if !u.is_empty() => Filter::User(u.to_string()),
                    Some(("server", s)) => {
                        let (user, server) = s.split_once('/').ok_or_else(bad)?;
                        if user.is_empty() {
                            return Err(bad());
                        }
                        Filter::Server { user: user.to_string(), server: server.to_string() }
                    }
                    _ => return Err(bad()),
                };
                (name, filter)
            }
        };
        if !HIERARCHY.iter().any(|(n, _)| *n == name) {
            return Err(ScopeError::Unknown(name.to_string()));
        }
        Ok(Scope { name: name.to_string(), filter })
    }

    fn covers(&self, target: Target<'_>) -> bool {
        match (&self.filter, target) {
            (Filter::All, _) => true,
            (Filter::User(u), Target::User(t)) => u == t,
            (Filter::User(u), Target::Server { user, .. }) => u == user,
            (Filter::Server { user, server }, Target::Server { user: tu, server: ts }) => user == tu && server == ts,
            _ => false,
        }
    }

    /// Whether this scope's filter includes all of `other`'s.
    fn filter_includes(&self, other: &Filter) -> bool {
        match (&self.filter, other) {
            (Filter::All, _) => true,
            (Filter::User(a), Filter::User(b)) => a == b,
            (Filter::User(a), Filter::Server { user, .. }) => a == user,
            (Filter::Server { user: a, server: s }, Filter::Server { user: b, server: t }) => a == b && s == t,
            _ => false,
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.filter {
            Filter::All => write!(f, "{}", self.name),
            Filter::User(u) => write!(f, "{}!user={}", self.name, u),
            Filter::Server { user, server } => write!(f, "{}!server={}/{}", self.name, user, server),
        }
    }
}

/// A set of scopes with every implied scope added.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScopeSet {
    scopes: BTreeSet<Scope>,
}

impl ScopeSet {
    pub fn from_scopes(scopes: impl IntoIterator<Item = Scope>) -> ScopeSet {
        let mut set = ScopeSet::default();
        for s in scopes {
            set.insert_expanded(s);
        }
        set
    }

    fn insert_expanded(&mut self, s: Scope) {
        if !self.scopes.insert(s.clone()) {
            return;
        }
        if let Some((_, implied)) = HIERARCHY.iter().find(|(n, _)| *n == s.name) {
            for name in implied.iter() {
                self.insert_expanded(Scope { name: (*name).to_string(), filter: s.filter.clone() });
            }
        }
    }

    /// The scopes of a user's own role (`user`, plus `admin` for admins).
    pub fn for_user(name: &str, admin: bool) -> ScopeSet {
        let mut scopes: Vec<Scope> = SELF_SCOPES
            .iter()
            .map(|n| Scope { name: (*n).to_string(), filter: Filter::User(name.to_string()) })
            .collect();
        if admin {
            scopes.extend(ADMIN_SCOPES.iter().map(|n| Scope { name: (*n).to_string(), filter: Filter::All }));
        }
        ScopeSet::from_scopes(scopes)
    }

    /// Scopes a single-user server's own token holds (JupyterHub's `server` role).
    pub fn for_server(user: &str, server: &str) -> ScopeSet {
        ScopeSet::from_scopes([
            Scope { name: "users:activity".into(), filter: Filter::User(user.to_string()) },
            Scope {
                name: "access:servers".into(),
                filter: Filter::Server { user: user.to_string(), server: server.to_string() },
            },
            Scope { name: "read:users:name".into(), filter: Filter::User(user.to_string()) },
        ])
    }

    /// Parses a list of scope strings, expanding `!user` for `owner`.
    pub fn parse_list<S: AsRef<str>>(raw: &[S], owner: Option<&str>) -> Result<ScopeSet, ScopeError> {
        let scopes = raw.iter().map(|s| Scope::parse(s.as_ref(), owner)).collect::<Result<Vec<_>, _>>()?;
        Ok(ScopeSet::from_scopes(scopes))
    }

    pub fn allows(&self, name: &str, target: Target<'_>) -> bool {
        self.scopes.iter().any(|s| s.name == name && s.covers(target))
    }

    /// Whether `name` is held for at least one target (used to decide 403 vs 404
    /// and whether a list endpoint can be called at all).
    pub fn has_any(&self, name: &str) -> bool {
        self.scopes.iter().any(|s| s.name == name)
    }

    /// Scopes of `requested` that `self` does not cover.
    pub fn missing_from(&self, requested: &ScopeSet) -> Vec<Scope> {
        requested
            .scopes
            .iter()
            .filter(|r| !self.scopes.iter().any(|h| h.name == r.name && h.filter_includes(&r.filter)))
            .cloned()
            .collect()
    }

    /// The intersection with `holder`: what a token of these scopes may really do
    /// when its owner holds `holder` (an owner who lost admin loses it for their
    /// tokens too).
    pub fn intersect(&self, holder: &ScopeSet) -> ScopeSet {
        let kept = self
            .scopes
            .iter()
            .filter(|r| holder.scopes.iter().any(|h| h.name == r.name && h.filter_includes(&r.filter)))
            .cloned();
        ScopeSet { scopes: kept.collect() }
    }

    pub fn iter(&self) -> impl Iterator<Item = &Scope> {
        self.scopes.iter()
    }

    /// The expanded list as strings, as `GET /hub/api/user` reports them.
    pub fn to_strings(&self) -> Vec<String> {
        self.scopes.iter().map(|s| s.to_string()).collect()
    }

    pub fn is_empty(&self) -> bool {
        self.scopes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_forms() {
        assert_eq!(Scope::parse("read:users", None).unwrap().filter, Filter::All);
        assert_eq!(Scope::parse("read:users!user=bob", None).unwrap().filter, Filter::User("bob".into()));
        assert_eq!(Scope::parse("servers!user", Some("al")).unwrap().filter, Filter::User("al".into()));
        assert_eq!(
            Scope::parse("access:servers!server=al/", None).unwrap().filter,
            Filter::Server { user: "al".into(), server: "".into() }
        );
        assert!(matches!(Scope::parse("fly:away", None), Err(ScopeError::Unknown(_))));
        assert!(matches!(Scope::parse("servers!user", None), Err(ScopeError::BadFilter(_))));
        assert!(matches!(Scope::parse("servers!group=x", None), Err(ScopeError::BadFilter(_))));
    }

    #[test]
    fn hierarchy_expands() {
        let s = ScopeSet::parse_list(&["admin:users"], None).unwrap();
        for implied in ["users", "read:users", "read:users:name", "list:users", "users:activity"] {
            assert!(s.allows(implied, Target::User("x")), "{implied}");
        }
        assert!(!s.allows("servers", Target::User("x")));
    }

    #[test]
    fn filters_limit_targets() {
        let table: &[(&str, Target<'_>, bool)] = &[
            ("read:users!user=al", Target::User("al"), true),
            ("read:users!user=al", Target::User("bo"), false),
            ("read:users!user=al", Target::Hub, false),
            ("access:servers!user=al", Target::Server { user: "al", server: "lab" }, true),
            ("access:servers!server=al/", Target::Server { user: "al", server: "" }, true),
            ("access:servers!server=al/", Target::Server { user: "al", server: "lab" }, false),
            ("access:servers!server=al/", Target::User("al"), false),
            ("access:servers", Target::Server { user: "zz", server: "" }, true),
        ];
        for (raw, target, ok) in table {
            let set = ScopeSet::parse_list(&[*raw], None).unwrap();
            let name = raw.split('!').next().unwrap();
            assert_eq!(set.allows(name, *target), *ok, "{raw} on {target:?}");
        }
    }

    #[test]
    fn users_hold_only_their_own() {
        let al = ScopeSet::for_user("al", false);
        assert!(al.allows("servers", Target::Server { user: "al", server: "" }));
        assert!(!al.allows("servers", Target::Server { user: "bo", server: "" }));
        assert!(!al.allows("list:users", Target::Hub));
        let admin = ScopeSet::for_user("root", true);
        assert!(admin.allows("admin:users", Target::User("al")));
        assert!(admin.allows("list:users", Target::Hub));
        assert!(admin.allows("read:events", Target::Hub));
        assert!(!al.has_any("read:events"), "the event log is the admins'");
    }

    #[test]
    fn token_scopes_cannot_exceed_owner() {
        let al = ScopeSet::for_user("al", false);
        let want = ScopeSet::parse_list(&["read:users!user=al"], None).unwrap();
        assert!(al.missing_from(&want).is_empty());
        let too_much = ScopeSet::parse_list(&["read:users"], None).unwrap();
        assert!(!al.missing_from(&too_much).is_empty());
        // Demoted owner: an admin token loses what the owner no longer holds.
        let token = ScopeSet::parse_list(&["admin:users"], None).unwrap();
        let kept = token.intersect(&al);
        assert!(!kept.allows("admin:users", Target::User("bo")));
    }

    #[test]
    fn server_role_matches_single_user_access_scopes() {
        let s = ScopeSet::for_server("al", "");
        assert!(s.to_strings().contains(&"access:servers!server=al/".to_string()));
        assert!(s.allows("users:activity", Target::User("al")));
    }
}
