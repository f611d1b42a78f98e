//! SSH keys: registering and removing them (scopes `ssh-keys` and
//! `read:ssh-keys`), and the SSH gateway's question "may this key log in as
//! this user". Parsing a key line is `berth_auth::keys`.

use berth_core::Target;
use berth_store::{NewSshKey, SshKey, StoreError};

use crate::error::{HubError, HubResult};
use crate::identity::Caller;
use crate::Hub;

/// Keys one user may register.
pub const MAX_KEYS: usize = 100;

/// A key accepted for a log-in.
#[derive(Debug, Clone)]
pub struct KeyLogin {
    pub key_id: String,
    pub fingerprint: String,
}

impl Hub {
    pub async fn list_keys(&self, caller: &Caller, owner: &str) -> HubResult<Vec<SshKey>> {
        caller.require("read:ssh-keys", Target::User(owner))?;
        self.store.get_user(owner).await?.ok_or_else(|| HubError::NoSuchUser { user: owner.to_string() })?;
        Ok(self.store.list_ssh_keys(owner).await?)
    }

    /// Registers `line` for `owner`.
    pub async fn add_key(&self, caller: &Caller, owner: &str, line: &str) -> HubResult<SshKey> {
        caller.require("ssh-keys", Target::User(owner))?;
        self.store.get_user(owner).await?.ok_or_else(|| HubError::NoSuchUser { user: owner.to_string() })?;
        let parsed = berth_auth::parse_key(line).map_err(HubError::BadKey)?;
        if self.store.list_ssh_keys(owner).await?.len() >= MAX_KEYS {
            return Err(HubError::TooManyKeys { user: owner.to_string(), max: MAX_KEYS });
        }
        let key = self
            .store
            .add_ssh_key(&NewSshKey {
                user: owner.to_string(),
                fingerprint: parsed.fingerprint.clone(),
                algorithm: parsed.algorithm,
                public_key: parsed.public_key,
                comment: parsed.comment,
            })
            .await
            .map_err(|e| match e {
                StoreError::Conflict { .. } => HubError::KeyExists { fingerprint: parsed.fingerprint.clone() },
                other => other.into(),
            })?;
        let _ = self.store.add_event(caller.name(), "ssh-key-add", owner, &key.fingerprint).await;
        tracing::info!(user = %owner, by = %caller.name(), fingerprint = %key.fingerprint, "SSH key added");
        Ok(key)
    }

    /// Removes a key by id or fingerprint (with or without `SHA256:`).
    pub async fn remove_key(&self, caller: &Caller, owner: &str, which: &str) -> HubResult<()> {
        caller.require("ssh-keys", Target::User(owner))?;
        let mut r = self.store.delete_ssh_key(owner, which).await;
        if matches!(r, Err(StoreError::NotFound { .. })) && !which.starts_with("SHA256:") {
            r = self.store.delete_ssh_key(owner, &format!("SHA256:{which}")).await;
        }
        r.map_err(|e| match e {
            StoreError::NotFound { .. } => HubError::NoSuchKey { user: owner.to_string(), key: which.to_string() },
            other => other.into(),
        })?;
        let _ = self.store.add_event(caller.name(), "ssh-key-remove", owner, which).await;
        tracing::info!(user = %owner, by = %caller.name(), key = %which, "SSH key removed");
        Ok(())
    }

    /// Whether `user` may log in over SSH with the key of `fingerprint`: the
    /// account exists, is authorized, and registered that key. Reads the
    /// database every time, so a removed key or a withdrawn account is
    /// refused at once.
    pub async fn ssh_login(&self, user: &str, fingerprint: &str) -> HubResult<Option<KeyLogin>> {
        let Some(record) = self.store.get_user_uncached(user).await? else { return Ok(None) };
        if !record.authorized {
            return Ok(None);
        }
        Ok(self
            .store
            .find_ssh_key(user, fingerprint)
            .await?
            .map(|k| KeyLogin { key_id: k.id, fingerprint: k.fingerprint }))
    }
}
