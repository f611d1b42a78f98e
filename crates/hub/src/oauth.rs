//! The OAuth2 provider single-user servers log their visitors in through:
//! authorization code with PKCE (S256), one client per server, codes used
//! once, access tokens stored hashed and scoped to that one server.

use berth_auth::{hash_token, new_token, pkce_s256_matches};
use berth_store::{now_ms, NewToken, OAuthCode, TokenKind};

use crate::error::{HubError, HubResult};
use crate::identity::Caller;
use crate::Hub;

const CODE_TTL_MS: i64 = 10 * 60 * 1000;
/// How long an access token given to a server for a visitor is good for.
pub const ACCESS_TOKEN_TTL_S: i64 = 14 * 24 * 3600;

/// What the browser brings to the authorize step.
#[derive(Debug, Default)]
pub struct AuthorizeRequest {
    pub client_id: Option<String>,
    pub redirect_uri: Option<String>,
    pub response_type: Option<String>,
    pub state: Option<String>,
    pub code_challenge: Option<String>,
    pub code_challenge_method: Option<String>,
}

/// What the server brings to the token step.
#[derive(Debug, Default)]
pub struct TokenRequest {
    pub grant_type: Option<String>,
    pub code: Option<String>,
    pub redirect_uri: Option<String>,
    pub client_id: String,
    pub client_secret: String,
    pub code_verifier: Option<String>,
}

/// An OAuth error as RFC 6749 names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OAuthError {
    /// `invalid_request`, `invalid_client`, `invalid_grant`, `unsupported_grant_type`.
    pub error: &'static str,
    pub description: String,
}

impl OAuthError {
    fn new(error: &'static str, description: impl Into<String>) -> OAuthError {
        OAuthError { error, description: description.into() }
    }
}

/// What the authorize step comes to.
#[derive(Debug, PartialEq, Eq)]
pub enum Authorization {
    /// Send the browser here (the server's callback with a one-time code).
    Redirect(String),
    /// The visitor is not the server's owner: ask them first, naming the owner.
    Consent { owner: String, server: String },
}

/// Visitors who agreed, in this session, to log in to someone else's server.
#[derive(Default)]
pub struct Consents(std::sync::Mutex<std::collections::HashSet<(String, String)>>);

impl Consents {
    fn given(&self, session: &str, client: &str) -> bool {
        self.0.lock().map(|s| s.contains(&(session.to_string(), client.to_string()))).unwrap_or(false)
    }

    fn give(&self, session: &str, client: &str) {
        if let Ok(mut s) = self.0.lock() {
            if s.len() > 100_000 {
                s.clear();
            }
            s.insert((session.to_string(), client.to_string()));
        }
    }
}

/// The access token a server gets for its visitor.
#[derive(Debug)]
pub struct Grant {
    pub access_token: String,
    pub scopes: Vec<String>,
    /// Seconds.
    pub expires_in: i64,
}

impl Hub {
    /// The redirect (with a one-time code) that logs `caller` in to a
    /// server, a question first when the caller is not its owner (asked
    /// once a session, `consented` carries the answer), or why not.
    pub async fn oauth_authorize(
        &self,
        caller: &Caller,
        q: AuthorizeRequest,
        consented: bool,
    ) -> HubResult<Authorization> {
        let bad = |m: String| HubError::OAuth(m);
        let client_id = q.client_id.ok_or_else(|| bad("client_id is missing".into()))?;
        let client = self
            .store
            .get_oauth_client(&client_id)
            .await?
            .ok_or_else(|| bad(format!("unknown OAuth client {client_id:?}: is the server running?")))?;
        let redirect_uri = q.redirect_uri.unwrap_or_else(|| client.redirect_uri.clone());
        if redirect_uri != client.redirect_uri {
            return Err(bad(format!("redirect_uri {redirect_uri:?} is not the one registered for {client_id}")));
        }
        if q.response_type.as_deref().unwrap_or("code") != "code" {
            return Err(bad("only response_type=code is supported".into()));
        }
        if q.code_challenge_method.as_deref().is_some_and(|m| m != "S256") {
            return Err(bad("only the S256 code challenge method is supported".into()));
        }
        let id = berth_core::ServerId::parse(&client.user, &client.server)?;
        if !caller.may_access(&id) {
            return Err(HubError::MissingScope { scope: format!("access:servers!server={id}") });
        }
        let session = caller.session_public_id().unwrap_or_default().to_string();
        if caller.name() != client.user {
            if consented {
                self.consents.give(&session, &client.id);
            } else if !self.consents.given(&session, &client.id) {
                return Ok(Authorization::Consent { owner: client.user.clone(), server: client.server.clone() });
            }
        }
        let code = new_token();
        let scopes = vec![
            format!("access:servers!server={}/{}", client.user, client.server),
            format!("read:users:name!user={}", caller.name()),
            format!("read:users:groups!user={}", caller.name()),
        ];
        self.store
            .put_oauth_code(&OAuthCode {
                code_hash: hash_token(code.expose()),
                client_id: client.id.clone(),
                user: caller.name().to_string(),
                session_id: caller.session_public_id().map(str::to_string),
                redirect_uri: client.redirect_uri.clone(),
                code_challenge: q.code_challenge.clone(),
                scopes,
                expires_at: now_ms() + CODE_TTL_MS,
            })
            .await?;
        let sep = if redirect_uri.contains('?') { '&' } else { '?' };
        let mut location = format!("{redirect_uri}{sep}code={}", code.expose());
        if let Some(state) = q.state {
            let enc = percent_encoding::utf8_percent_encode(&state, percent_encoding::NON_ALPHANUMERIC);
            location.push_str(&format!("&state={enc}"));
        }
        Ok(Authorization::Redirect(location))
    }

    /// Trades a code for an access token; the server authenticates with its
    /// client secret (its API token).
    pub async fn oauth_token(&self, f: TokenRequest) -> Result<Grant, OAuthError> {
        let internal = |e: berth_store::StoreError| {
            tracing::error!(error = %e, "OAuth token exchange failed inside");
            OAuthError::new("server_error", "internal error; see the hub's log")
        };
        if f.grant_type.as_deref() != Some("authorization_code") {
            return Err(OAuthError::new("unsupported_grant_type", "only authorization_code is supported"));
        }
        let client = match self.store.get_oauth_client(&f.client_id).await.map_err(internal)? {
            Some(c) if c.secret_hash == hash_token(&f.client_secret) => c,
            _ => return Err(OAuthError::new("invalid_client", "unknown client or wrong secret")),
        };
        let Some(code) = f.code.as_deref() else {
            return Err(OAuthError::new("invalid_request", "code is missing"));
        };
        let Some(grant) = self.store.take_oauth_code(&hash_token(code)).await.map_err(internal)? else {
            return Err(OAuthError::new("invalid_grant", "unknown or already used code"));
        };
        if grant.client_id != client.id || grant.expires_at < now_ms() {
            return Err(OAuthError::new("invalid_grant", "the code is expired or belongs to another client"));
        }
        if f.redirect_uri.as_deref().is_some_and(|r| r != grant.redirect_uri) {
            return Err(OAuthError::new("invalid_grant", "redirect_uri does not match"));
        }
        if let Some(challenge) = &grant.code_challenge {
            match f.code_verifier.as_deref() {
                Some(v) if pkce_s256_matches(challenge, v) => {}
                _ => return Err(OAuthError::new("invalid_grant", "PKCE verification failed")),
            }
        }
        // No longer than the visitor's session: a token outliving a log-out
        // or a revoked session would be a way around both.
        let mut expires_at = now_ms() + ACCESS_TOKEN_TTL_S * 1000;
        if let Some(session) = &grant.session_id {
            let max_age = self.auth.session_max_age_seconds.as_millis() as i64;
            match self.store.session_started(session).await.map_err(internal)? {
                Some(created) => expires_at = expires_at.min(created + max_age),
                None => return Err(OAuthError::new("invalid_grant", "the visitor's session has ended")),
            }
        }
        let access = new_token();
        self.store
            .create_token(&NewToken {
                hash: hash_token(access.expose()),
                user: grant.user.clone(),
                kind: TokenKind::OAuth,
                server: Some(client.server.clone()),
                scopes: grant.scopes.clone(),
                note: format!("OAuth access to {}", client.id),
                expires_at: Some(expires_at),
                session_id: grant.session_id.clone(),
                oauth_client: Some(client.id.clone()),
            })
            .await
            .map_err(internal)?;
        let expires_in = ((expires_at - now_ms()) / 1000).max(0);
        Ok(Grant { access_token: access.expose().to_string(), scopes: grant.scopes, expires_in })
    }
}
