//! Account rules, written once for the REST API, the admin pages and the
//! CLI: sign-up, creation, authorizing and unauthorizing, admin rights,
//! renaming, deletion, passwords. Each checks the actor's scopes and records
//! one event, under one set of names:
//! `signup`, `user-create`, `user-authorize`, `user-unauthorize`,
//! `admin-grant`, `admin-revoke`, `user-rename`, `user-delete`,
//! `volumes-remove`, `password-change`, `password-reset`.
//!
//! Withdrawing an account (unauthorize, delete) or setting its password
//! ends its sessions and revokes its tokens; a user changing their own
//! password keeps only the session they did it from.

use berth_core::{Target, UserName};
use berth_store::{NewUser, StoreError, User};

use crate::error::{HubError, HubResult, SelfAction};
use crate::identity::{Actor, Caller, Via};
use crate::Hub;

/// What a sign-up made.
#[derive(Debug)]
pub struct Signup {
    pub name: UserName,
    /// Always false: kept so pages can say what happened.
    pub admin: bool,
}

impl Hub {
    /// Ends every session of `name` and revokes every token they hold.
    async fn revoke_everything(&self, name: &str) -> HubResult<()> {
        self.store.revoke_user_sessions(name).await?;
        self.store.revoke_user_tokens(name).await?;
        Ok(())
    }

    /// Logs one browser session out: the session, and what servers were
    /// given through it (their OAuth tokens; app hosts' cookies check it).
    pub async fn logout(&self, caller: &Caller) -> HubResult<()> {
        if let Via::Session { id_hash, public_id } = &caller.via {
            self.store.revoke_session(id_hash).await?;
            let n = self.store.revoke_session_tokens(public_id).await?;
            tracing::info!(user = %caller.name(), oauth_tokens = n, "logged out");
        }
        Ok(())
    }

    async fn existing(&self, name: &str) -> HubResult<User> {
        self.store.get_user(name).await?.ok_or_else(|| HubError::NoSuchUser { user: name.to_string() })
    }

    async fn event(&self, actor: &Actor<'_>, kind: &str, subject: &str, detail: &str) {
        if let Err(e) = self.store.add_event(actor.name(), kind, subject, detail).await {
            tracing::warn!(error = %e, kind, subject, "could not record an event");
        }
    }

    /// Self-service sign-up: the account waits for an admin. No name is
    /// special (the first admin comes from the setup link).
    pub async fn signup(&self, raw_name: &str, password: String, confirmation: &str) -> HubResult<Signup> {
        let name = UserName::normalize(raw_name)?;
        if password != confirmation {
            return Err(HubError::PasswordMismatch);
        }
        self.auth.password_policy().check(name.as_str(), &password)?;
        let admin = false;
        let hash = self.login.hash_password(password).await?;
        let new = NewUser { name: name.to_string(), admin, authorized: admin, password_hash: Some(hash) };
        self.store.create_user(&new).await.map_err(|e| conflict_as_exists(e, name.as_str()))?;
        let _ =
            self.store.add_event(name.as_str(), "signup", name.as_str(), if admin { "admin" } else { "pending" }).await;
        tracing::info!(user = %name, admin, "sign-up");
        Ok(Signup { name, admin })
    }

    /// Creates an authorized account (with a password from the CLI, without
    /// one from the API: such users log in through another way or get one set).
    pub async fn create_user(
        &self,
        actor: &Actor<'_>,
        name: &UserName,
        admin: bool,
        password: Option<String>,
    ) -> HubResult<User> {
        actor.require("admin:users", Target::Hub)?;
        let password_hash = match password {
            Some(p) => {
                self.auth.password_policy().check(name.as_str(), &p)?;
                Some(self.login.hash_password(p).await?)
            }
            None => None,
        };
        let new = NewUser { name: name.to_string(), admin, authorized: true, password_hash };
        let u = self.store.create_user(&new).await.map_err(|e| conflict_as_exists(e, name.as_str()))?;
        if admin {
            self.close_setup().await?;
        }
        self.event(actor, "user-create", &u.name, if admin { "admin" } else { "" }).await;
        Ok(u)
    }

    /// Creates those of `names` that do not exist yet; refuses when all do.
    pub async fn create_users(&self, actor: &Actor<'_>, names: &[UserName], admin: bool) -> HubResult<Vec<User>> {
        actor.require("admin:users", Target::Hub)?;
        let mut created = Vec::new();
        for n in names {
            if self.store.get_user(n.as_str()).await?.is_some() {
                continue;
            }
            match self.create_user(actor, n, admin, None).await {
                Ok(u) => created.push(u),
                Err(HubError::UserExists { .. }) => continue,
                Err(e) => return Err(e),
            }
        }
        if created.is_empty() {
            return Err(HubError::AllUsersExist { count: names.len() });
        }
        Ok(created)
    }

    /// Authorizes an account, or withdraws it: then every session of the
    /// account ends and its servers stop (which frees their GPUs).
    pub async fn set_authorized(&self, actor: &Actor<'_>, name: &str, authorized: bool) -> HubResult<()> {
        actor.require("admin:users", Target::User(name))?;
        self.existing(name).await?;
        if !authorized && actor.is(name) {
            return Err(HubError::SelfAction { action: SelfAction::Unauthorize });
        }
        self.store.set_authorized(name, authorized).await?;
        if !authorized {
            self.revoke_everything(name).await?;
            self.servers.stop_all_of(name).await?;
        }
        self.event(actor, if authorized { "user-authorize" } else { "user-unauthorize" }, name, "").await;
        tracing::info!(by = %actor.name(), user = %name, authorized, "account authorization changed");
        Ok(())
    }

    pub async fn set_admin(&self, actor: &Actor<'_>, name: &str, admin: bool) -> HubResult<()> {
        actor.require("admin:users", Target::User(name))?;
        let current = self.existing(name).await?;
        if !admin && current.admin && actor.is(name) {
            return Err(HubError::SelfAction { action: SelfAction::RemoveAdmin });
        }
        self.store.set_admin(name, admin).await?;
        if admin {
            self.close_setup().await?;
        }
        self.event(actor, if admin { "admin-grant" } else { "admin-revoke" }, name, "").await;
        tracing::info!(by = %actor.name(), user = %name, admin, "admin rights changed");
        Ok(())
    }

    /// Renames an account whose servers are all stopped.
    pub async fn rename(&self, actor: &Actor<'_>, name: &str, new_name: &UserName) -> HubResult<()> {
        actor.require("admin:users", Target::User(name))?;
        self.existing(name).await?;
        if new_name.as_str() == name {
            return Ok(());
        }
        if self.store.count_active_servers_of(name).await? > 0 {
            return Err(HubError::ServersRunning { user: name.to_string(), action: "renaming" });
        }
        self.store.rename_user(name, new_name.as_str()).await.map_err(|e| conflict_as_exists(e, new_name.as_str()))?;
        self.event(actor, "user-rename", new_name.as_str(), name).await;
        Ok(())
    }

    /// Deletes an account: its servers stop first; with `remove_data`, what
    /// they kept (volumes, home) goes too, through the configured spawner.
    pub async fn delete_user(&self, actor: &Actor<'_>, name: &str, remove_data: bool) -> HubResult<()> {
        actor.require("delete:users", Target::User(name))?;
        if actor.is(name) {
            return Err(HubError::SelfAction { action: SelfAction::Delete });
        }
        let account = self.existing(name).await?;
        // Volumes adopted from an earlier deployment stay whatever
        // `remove_data` says (they are that deployment's too, and going back
        // to it must find them); their records go with the account.
        let adopted: Vec<String> =
            self.store.adopted_volumes_of(&account.account_id).await?.into_iter().map(|v| v.volume).collect();
        self.revoke_everything(name).await?;
        self.servers.stop_all_of(name).await?;
        self.store.delete_user(name).await?;
        self.event(actor, "user-delete", name, &account.account_id).await;
        tracing::info!(by = %actor.name(), user = %name, account = %account.account_id, "account deleted");
        if !adopted.is_empty() {
            self.event(actor, "adopted-volumes-kept", name, &adopted.join(",")).await;
            tracing::info!(user = %name, volumes = %adopted.join(","), "kept the volumes adopted for the account");
        }
        if remove_data {
            self.servers.remove_user_data(name, &account.account_id).await?;
            self.event(actor, "volumes-remove", name, &account.account_id).await;
        } else {
            // Kept for the admin, out of reach of the next account of that name.
            self.servers.retire_user_data(name, &account.account_id).await?;
        }
        Ok(())
    }

    /// An admin (or the operator) sets someone's password: every session of
    /// that account ends, and a lock-out is lifted.
    pub async fn reset_password(&self, actor: &Actor<'_>, name: &str, password: String) -> HubResult<()> {
        actor.require("admin:users", Target::User(name))?;
        self.existing(name).await?;
        self.auth.password_policy().check(name, &password)?;
        let hash = self.login.hash_password(password).await?;
        self.store.set_password(name, &hash, None).await?;
        self.store.revoke_user_tokens(name).await?;
        self.event(actor, "password-reset", name, "").await;
        Ok(())
    }

    /// A user changes their own password; the session doing it stays, every
    /// other one ends.
    pub async fn change_own_password(
        &self,
        caller: &Caller,
        old: String,
        new: String,
        confirmation: &str,
    ) -> HubResult<()> {
        let name = caller.name();
        let stored = self.store.get_user_uncached(name).await?.and_then(|u| u.password_hash);
        if !self.login.verify_password(stored, old).await?.ok() {
            return Err(HubError::WrongPassword);
        }
        if new != confirmation {
            return Err(HubError::PasswordMismatch);
        }
        self.auth.password_policy().check(name, &new)?;
        let hash = self.login.hash_password(new).await?;
        let keep = match &caller.via {
            Via::Session { id_hash, .. } => Some(id_hash.as_str()),
            _ => None,
        };
        self.store.set_password(name, &hash, keep).await?;
        self.store.revoke_user_tokens(name).await?;
        self.event(&Actor::Caller(caller), "password-change", name, "").await;
        Ok(())
    }
}

fn conflict_as_exists(e: StoreError, name: &str) -> HubError {
    match e {
        StoreError::Conflict { .. } => HubError::UserExists { user: name.to_string() },
        other => other.into(),
    }
}
