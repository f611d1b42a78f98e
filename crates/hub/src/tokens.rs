//! API tokens: what a new token may hold (never more than its owner, nor,
//! when made with a token, than that token), expiry, notes, revocation.
//! Secrets are shown once, at creation; the store keeps their SHA-256.

use berth_auth::{hash_token, new_token};
use berth_core::{ScopeSet, Target};
use berth_store::{now_ms, NewToken, StoreError, Token, TokenKind, User};

use crate::error::{HubError, HubResult};
use crate::identity::{Caller, Via};
use crate::Hub;

/// Longest expiry a token may ask for: ten years, so arithmetic stays sane.
const MAX_EXPIRES_IN: i64 = 10 * 365 * 24 * 3600;

pub struct TokenRequest {
    pub note: String,
    pub expires_in: Option<i64>,
    pub scopes: Option<Vec<String>>,
}

impl Hub {
    /// Creates a token for `owner` on behalf of `caller`: the token cannot hold
    /// more than the owner (and, for tokens made with a token, than the caller).
    pub async fn create_token(&self, caller: &Caller, owner: &User, req: TokenRequest) -> HubResult<(Token, String)> {
        caller.require("tokens", Target::User(&owner.name))?;
        let owner_scopes = ScopeSet::for_user(&owner.name, owner.admin);
        let requested: Vec<String> = req.scopes.clone().unwrap_or_default();
        let requested_set = if requested.is_empty() {
            owner_scopes.clone()
        } else {
            ScopeSet::parse_list(&requested, Some(&owner.name)).map_err(|e| HubError::BadToken(e.to_string()))?
        };
        let missing = owner_scopes.missing_from(&requested_set);
        if !missing.is_empty() {
            let names: Vec<String> = missing.iter().map(|s| s.to_string()).collect();
            return Err(HubError::ScopesNotHeld { scopes: names.join(", "), holder: owner.name.clone() });
        }
        if matches!(caller.via, Via::Token { .. }) {
            let missing = caller.scopes.missing_from(&requested_set);
            if !missing.is_empty() {
                let names: Vec<String> = missing.iter().map(|s| s.to_string()).collect();
                return Err(HubError::ScopesNotHeld {
                    scopes: names.join(", "),
                    holder: "the token making this request".into(),
                });
            }
        }
        let expires_at = match req.expires_in {
            None | Some(0) => None,
            Some(s) if s < 0 => {
                return Err(HubError::BadToken("expires_in must be a positive number of seconds".into()))
            }
            Some(s) if s > MAX_EXPIRES_IN => {
                return Err(HubError::BadToken(format!("expires_in must be at most {MAX_EXPIRES_IN} seconds")))
            }
            Some(s) => Some(now_ms() + s * 1000),
        };
        if req.note.chars().count() > 1000 {
            return Err(HubError::BadToken("the note is longer than 1000 characters".into()));
        }
        let secret = new_token();
        // An empty scope list means "everything the owner holds", kept symbolic
        // so the token follows the owner's role.
        let stored_scopes = if requested.is_empty() { vec!["inherit".to_string()] } else { requested };
        let token = self
            .store
            .create_token(&NewToken {
                hash: hash_token(secret.expose()),
                user: owner.name.clone(),
                kind: TokenKind::Api,
                server: None,
                scopes: stored_scopes,
                note: req.note,
                expires_at,
                session_id: None,
                oauth_client: None,
            })
            .await?;
        let _ = self.store.add_event(caller.name(), "token-create", &owner.name, &token.id).await;
        Ok((token, secret.expose().to_string()))
    }

    /// Revokes one of `owner`'s tokens.
    pub async fn revoke_token(&self, caller: &Caller, owner: &str, id: &str) -> HubResult<()> {
        caller.require("tokens", Target::User(owner))?;
        self.store.delete_token(owner, id).await.map_err(|e| match e {
            StoreError::NotFound { .. } => HubError::NoSuchToken { id: id.to_string() },
            other => other.into(),
        })?;
        let _ = self.store.add_event(caller.name(), "token-revoke", owner, id).await;
        Ok(())
    }
}
