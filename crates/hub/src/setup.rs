//! The first admin. Nobody becomes admin by claiming a name: until the hub
//! has had an admin, each start of berth prints a one-time setup link (its
//! code's hash kept in the settings), and whoever holds the link — the
//! operator at the console — makes the admin account. Once any admin has
//! existed (from the link or `berth user add NAME --admin`), setup is closed
//! for good: renaming or deleting the admin does not reopen it.

use berth_auth::{hash_token, new_token};
use berth_core::UserName;
use berth_store::{NewUser, User};

use crate::error::{HubError, HubResult};
use crate::Hub;

const DONE: &str = "setup_done";
const CODE: &str = "setup_code";

impl Hub {
    /// A fresh setup code when the hub has never had an admin (the link to
    /// print at start-up); `None` once setup is done.
    pub async fn setup_code(&self) -> HubResult<Option<String>> {
        if self.setup_done().await? {
            return Ok(None);
        }
        let code = new_token();
        self.store.set_setting(CODE, &hash_token(code.expose())).await?;
        Ok(Some(code.expose().to_string()))
    }

    async fn setup_done(&self) -> HubResult<bool> {
        if self.store.setting(DONE).await?.is_some() {
            return Ok(true);
        }
        if self.store.count_admins().await? > 0 {
            self.close_setup().await?;
            return Ok(true);
        }
        Ok(false)
    }

    pub(crate) async fn close_setup(&self) -> HubResult<()> {
        self.store.set_setting(DONE, "1").await?;
        self.store.delete_setting(CODE).await?;
        Ok(())
    }

    /// Whether `code` is the setup link's code, while setup is open.
    pub async fn setup_open(&self, code: &str) -> HubResult<bool> {
        if self.setup_done().await? {
            return Ok(false);
        }
        Ok(self.store.setting(CODE).await?.is_some_and(|h| h == hash_token(code)))
    }

    /// Makes the first admin with the setup link's code; the link is spent.
    pub async fn complete_setup(
        &self,
        code: &str,
        raw_name: &str,
        password: String,
        confirmation: &str,
    ) -> HubResult<User> {
        if !self.setup_open(code).await? {
            return Err(HubError::SetupClosed);
        }
        let name = UserName::normalize(raw_name)?;
        if password != confirmation {
            return Err(HubError::PasswordMismatch);
        }
        self.auth.password_policy().check(name.as_str(), &password)?;
        let hash = self.login.hash_password(password).await?;
        let new = NewUser { name: name.to_string(), admin: true, authorized: true, password_hash: Some(hash) };
        let user = self.store.create_user(&new).await.map_err(|e| match e {
            berth_store::StoreError::Conflict { .. } => HubError::UserExists { user: name.to_string() },
            other => other.into(),
        })?;
        self.close_setup().await?;
        let _ = self.store.add_event(name.as_str(), "admin-setup", name.as_str(), "setup link").await;
        tracing::info!(user = %name, "the first admin was made with the setup link");
        Ok(user)
    }
}
