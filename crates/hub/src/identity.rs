//! Who is calling: the one place a token, a session cookie or an app host's
//! cookie becomes a [`Caller`] with the scopes this request may use. The
//! REST API, the pages, the proxy's edge and the app hosts all ask here.

use std::sync::Arc;

use berth_auth::{hash_token, SessionCookie, Signer};
use berth_core::{ScopeSet, ServerId, Target};
use berth_store::{now_ms, Store, TokenKind, User};

use crate::activity::Activity;
use crate::error::{HubError, HubResult};

#[derive(Debug, Clone)]
pub enum Via {
    Session {
        id_hash: String,
        public_id: String,
    },
    Token {
        id: String,
        kind: TokenKind,
        session_id: Option<String>,
        /// The server a server's own token belongs to.
        server: Option<String>,
        /// The server an OAuth token was issued to (its client id).
        oauth_client: Option<String>,
    },
    /// An app host's own cookie (`host` routing).
    AppHost {
        host: String,
    },
}

/// An authenticated caller with the scopes this request may use.
#[derive(Debug, Clone)]
pub struct Caller {
    pub user: User,
    /// Shared: callers are cloned per request from the cache.
    pub scopes: std::sync::Arc<ScopeSet>,
    pub via: Via,
}

impl Caller {
    pub fn name(&self) -> &str {
        &self.user.name
    }

    pub fn allows(&self, scope: &str, target: Target<'_>) -> bool {
        self.scopes.allows(scope, target)
    }

    /// 403 unless the caller holds `scope` on `target`.
    pub fn require(&self, scope: &str, target: Target<'_>) -> HubResult<()> {
        if self.allows(scope, target) {
            Ok(())
        } else {
            Err(HubError::missing_scope(scope))
        }
    }

    /// Whether this caller may reach `id` through the proxy: the one rule
    /// for path routes, app hosts and the OAuth log-in of a server.
    pub fn may_access(&self, id: &ServerId) -> bool {
        self.allows("access:servers", Target::Server { user: id.user(), server: id.server() })
    }

    pub fn is_session(&self) -> bool {
        matches!(self.via, Via::Session { .. })
    }

    /// Whether this caller's credential is scoped to `id` alone, so that
    /// server may see it (a server needs the token to identify its
    /// visitor): a token whose scopes reach that server and nothing else —
    /// an OAuth token the hub issued to it, a token made for it — or the
    /// server's own token. Any other credential is removed before a request
    /// goes on, so a visitor's wider token never reaches a server's owner.
    pub fn credential_is_for(&self, id: &ServerId) -> bool {
        use berth_core::scopes::Filter;
        match &self.via {
            Via::Token { kind: TokenKind::Server, server: Some(s), .. } => {
                return self.name() == id.user() && s == id.server();
            }
            Via::Token { .. } => {}
            _ => return false,
        }
        let me = self.name();
        let mut reaches = false;
        for scope in self.scopes.iter() {
            match (scope.name.as_str(), &scope.filter) {
                ("access:servers", Filter::Server { user, server }) if user == id.user() && server == id.server() => {
                    reaches = true
                }
                ("read:users:name" | "read:users:groups", Filter::User(u)) if u == me => {}
                _ => return false,
            }
        }
        reaches
    }

    pub fn session_public_id(&self) -> Option<&str> {
        match &self.via {
            Via::Session { public_id, .. } => Some(public_id),
            Via::Token { session_id, .. } => session_id.as_deref(),
            Via::AppHost { .. } => None,
        }
    }
}

/// How long an authenticated caller is remembered. Changes made by this
/// process (revocations, deletions) invalidate at once through the store's
/// auth generation; changes by another process (the CLI) within this time.
const CACHE_TTL: std::time::Duration = std::time::Duration::from_secs(5);
const CACHE_MAX: usize = 10_000;

struct CacheEntry {
    /// Shared with every request it admits: a hit copies nothing.
    caller: Arc<Caller>,
    /// When activity was last recorded for this credential (unix ms).
    last_recorded: std::sync::atomic::AtomicI64,
    /// Token expiry, checked on every use.
    expires_at: Option<i64>,
    generation: u64,
    stored: std::time::Instant,
}

/// Recently authenticated callers, keyed by the credential's hash, so the
/// proxy's edge check costs no database round trip per request.
#[derive(Default)]
pub struct AuthCache {
    map: std::sync::Mutex<std::collections::HashMap<String, CacheEntry>>,
}

impl AuthCache {
    /// The cached caller, and whether its activity is due to be recorded
    /// (at most once a second per credential).
    fn get(&self, key: &str, generation: u64, now: i64) -> Option<(Arc<Caller>, bool)> {
        use std::sync::atomic::Ordering;
        let map = self.map.lock().ok()?;
        let e = map.get(key)?;
        let fresh =
            e.generation == generation && e.stored.elapsed() < CACHE_TTL && e.expires_at.is_none_or(|t| t > now);
        if !fresh {
            return None;
        }
        let last = e.last_recorded.load(Ordering::Relaxed);
        let due = now - last >= 1000;
        if due {
            e.last_recorded.store(now, Ordering::Relaxed);
        }
        Some((e.caller.clone(), due))
    }

    fn put(&self, key: String, caller: Arc<Caller>, expires_at: Option<i64>, generation: u64) {
        if let Ok(mut map) = self.map.lock() {
            if map.len() >= CACHE_MAX {
                map.clear();
            }
            map.insert(
                key,
                CacheEntry {
                    caller,
                    last_recorded: std::sync::atomic::AtomicI64::new(now_ms()),
                    expires_at,
                    generation,
                    stored: std::time::Instant::now(),
                },
            );
        }
    }
}

pub struct Identity {
    store: Store,
    signer: Signer,
    activity: Arc<Activity>,
    session_max_age: std::time::Duration,
    cache: AuthCache,
}

impl Identity {
    pub fn new(store: Store, signer: Signer, activity: Arc<Activity>, session_max_age: std::time::Duration) -> Self {
        Identity { store, signer, activity, session_max_age, cache: AuthCache::default() }
    }

    pub fn signer(&self) -> &Signer {
        &self.signer
    }

    /// Resolves a token to its caller, or None when unknown, expired, or its
    /// owner is not (or no longer) authorized.
    pub async fn from_token(&self, token: &str) -> HubResult<Option<Caller>> {
        Ok(self.token_caller(token).await?.map(|c| Caller::clone(&c)))
    }

    /// [`Identity::from_token`], shared with the cache (the proxy's edge:
    /// a cached caller costs no copy).
    pub async fn token_caller(&self, token: &str) -> HubResult<Option<Arc<Caller>>> {
        let now = now_ms();
        // Keyed by the credential itself (memory only), so a hit costs no hashing.
        let key = format!("t:{token}");
        let generation = self.store.auth_generation();
        if let Some((c, due)) = self.cache.get(&key, generation, now) {
            if let (true, Via::Token { id, .. }) = (due, &c.via) {
                self.activity.token(id, now);
            }
            return Ok(Some(c));
        }
        let Some((tok, user)) = self.store.find_token(&hash_token(token)).await? else {
            return Ok(None);
        };
        if tok.is_expired(now) || !user.authorized {
            return Ok(None);
        }
        self.activity.token(&tok.id, now);
        let scopes = token_scopes(&tok, &user);
        let caller = Caller {
            user,
            scopes: std::sync::Arc::new(scopes),
            via: Via::Token {
                id: tok.id,
                kind: tok.kind,
                session_id: tok.session_id,
                server: tok.server,
                oauth_client: tok.oauth_client,
            },
        };
        let caller = Arc::new(caller);
        self.cache.put(key, caller.clone(), tok.expires_at, generation);
        Ok(Some(caller))
    }
}

/// What a token may do: what it was given, never more than its owner holds
/// now (a demoted admin's tokens lose admin too). `inherit` means all of the
/// owner's. A server's own token and OAuth tokens hold exactly their scopes.
pub fn token_scopes(tok: &berth_store::Token, owner: &User) -> ScopeSet {
    let owner_scopes = ScopeSet::for_user(&owner.name, owner.admin);
    if tok.scopes.iter().any(|s| s == "inherit") {
        return owner_scopes;
    }
    let requested = match ScopeSet::parse_list(&tok.scopes, Some(&owner.name)) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(token = %tok.id, error = %e, "token has unparseable scopes; treating it as having none");
            ScopeSet::default()
        }
    };
    match tok.kind {
        TokenKind::Server | TokenKind::OAuth => requested,
        TokenKind::Api => requested.intersect(&owner_scopes),
    }
}

impl Identity {
    /// Resolves a session cookie to its caller.
    pub async fn from_session(&self, cookie_value: &str) -> HubResult<Option<Caller>> {
        Ok(self.session_caller(cookie_value).await?.map(|c| Caller::clone(&c)))
    }

    /// [`Identity::from_session`], shared with the cache.
    pub async fn session_caller(&self, cookie_value: &str) -> HubResult<Option<Arc<Caller>>> {
        let now = now_ms();
        let generation = self.store.auth_generation();
        let key = format!("s:{cookie_value}");
        if let Some((c, due)) = self.cache.get(&key, generation, now) {
            if let (true, Via::Session { id_hash, .. }) = (due, &c.via) {
                self.activity.session(id_hash, now);
            }
            return Ok(Some(c));
        }
        let Some(id_hash) = SessionCookie::id_hash_of(&self.signer, cookie_value) else {
            return Ok(None);
        };
        let Some((session, user)) = self.store.get_session(&id_hash).await? else {
            return Ok(None);
        };
        let max_age = self.session_max_age.as_millis() as i64;
        if !user.authorized || now - session.created > max_age {
            return Ok(None);
        }
        self.activity.session(&id_hash, now);
        let scopes = ScopeSet::for_user(&user.name, user.admin);
        let caller = Caller {
            user,
            scopes: std::sync::Arc::new(scopes),
            via: Via::Session { id_hash: id_hash.clone(), public_id: session.public_id },
        };
        let caller = Arc::new(caller);
        self.cache.put(key, caller.clone(), Some(session.created + max_age), generation);
        Ok(Some(caller))
    }
}

impl Identity {
    /// The value of an app host's own cookie for `visitor`, good for
    /// [`crate::templates::APP_SESSION_SECS`] on `host` only.
    /// Bound to the visitor's hub session: logging out of the hub (or any
    /// revocation of that session) ends it.
    pub fn app_cookie(&self, host: &str, visitor: &str, session: &str) -> String {
        let expires = now_ms() / 1000 + crate::templates::APP_SESSION_SECS;
        self.signer.sign(&format!("app:{host}"), &format!("{visitor}|{expires}|{session}"))
    }

    /// The caller an app host's cookie stands for, with the scopes their
    /// account holds now (so access follows the same rule as on paths, and
    /// a demoted or unauthorized visitor loses it at once).
    pub async fn from_app_cookie(&self, host: &str, value: &str) -> HubResult<Option<Caller>> {
        Ok(self.app_cookie_caller(host, value).await?.map(|c| Caller::clone(&c)))
    }

    /// [`Identity::from_app_cookie`], shared with the cache.
    pub async fn app_cookie_caller(&self, host: &str, value: &str) -> HubResult<Option<Arc<Caller>>> {
        // Cached like tokens (a revocation invalidates at once), so an app
        // host's requests cost no database round trip each.
        let now = now_ms();
        let key = format!("a:{host}:{value}");
        let generation = self.store.auth_generation();
        if let Some((c, _)) = self.cache.get(&key, generation, now) {
            return Ok(Some(c));
        }
        let Some(inner) = self.signer.unsign(&format!("app:{host}"), value) else { return Ok(None) };
        let mut parts = inner.splitn(3, '|');
        let (Some(name), Some(expires), Some(session)) = (parts.next(), parts.next(), parts.next()) else {
            return Ok(None);
        };
        if expires.parse::<i64>().ok().is_none_or(|e| e <= now_ms() / 1000) {
            return Ok(None);
        }
        let max_age = self.session_max_age.as_millis() as i64;
        let created = match self.store.session_started(session).await? {
            Some(created) if now - created <= max_age => created,
            _ => return Ok(None),
        };
        let Some(user) = self.store.get_user(name).await? else { return Ok(None) };
        if !user.authorized {
            return Ok(None);
        }
        let scopes = ScopeSet::for_user(&user.name, user.admin);
        let caller = Arc::new(Caller { user, scopes: Arc::new(scopes), via: Via::AppHost { host: host.to_string() } });
        let ends = expires.parse::<i64>().unwrap_or(0).saturating_mul(1000).min(created + max_age);
        self.cache.put(key, caller.clone(), Some(ends), generation);
        Ok(Some(caller))
    }
}

/// Who asks for an account change: a caller with scopes, or the operator at
/// the command line (who has the database and the configuration already).
#[derive(Clone, Copy)]
pub enum Actor<'a> {
    Caller(&'a Caller),
    Operator,
}

impl Actor<'_> {
    /// The name events record.
    pub fn name(&self) -> &str {
        match self {
            Actor::Caller(c) => c.name(),
            Actor::Operator => "cli",
        }
    }

    /// Whether this is `user` acting on their own account.
    pub fn is(&self, user: &str) -> bool {
        matches!(self, Actor::Caller(c) if c.name() == user)
    }

    pub fn require(&self, scope: &str, target: Target<'_>) -> HubResult<()> {
        match self {
            Actor::Caller(c) => c.require(scope, target),
            Actor::Operator => Ok(()),
        }
    }
}
