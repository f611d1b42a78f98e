//! `berth user ...`: account management for operators, working directly on
//! the database (SQLite's WAL lets it run beside a serving berth).

use std::io::BufRead;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use berth_core::UserName;
use berth_hub::Actor;
use berth_server::Config;
use berth_store::{Store, UserQuery};
use clap::Subcommand;

#[derive(Subcommand)]
pub(crate) enum UserCommand {
    /// Create an authorized account.
    Add {
        name: String,
        /// Make the account an admin.
        #[arg(long)]
        admin: bool,
        /// Read the password from standard input (otherwise one is generated and printed).
        #[arg(long)]
        password_stdin: bool,
    },
    /// Authorize a pending account.
    Approve { name: String },
    /// List accounts.
    List {
        /// Only accounts waiting for approval.
        #[arg(long)]
        pending: bool,
    },
    /// Delete an account with its sessions, tokens and server records.
    Delete {
        name: String,
        /// Also remove the user's Docker volumes (home, workspace, cache).
        #[arg(long)]
        remove_volumes: bool,
    },
    /// Set a new password and log the account out everywhere; also lifts a lock-out.
    ResetPassword {
        name: String,
        #[arg(long)]
        password_stdin: bool,
    },
    /// Make an account an admin (or, with --revoke, no longer one).
    Admin {
        name: String,
        #[arg(long)]
        revoke: bool,
    },
    /// Import NativeAuthenticator accounts from a JupyterHub database (the
    /// accounts part of `berth migrate jupyterhub`).
    ImportNativeauth { database: PathBuf },
}

fn read_password(from_stdin: bool) -> Result<(String, bool)> {
    if from_stdin {
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line).context("reading the password from standard input")?;
        let pw = line.trim_end_matches(['\n', '\r']).to_string();
        Ok((pw, false))
    } else {
        Ok((berth_auth::new_token().expose()[..20].to_string(), true))
    }
}

/// The hub's account rules, on the configured store and spawner.
async fn hub(config: &Config) -> Result<berth_web::SharedHub> {
    berth_server::offline_hub(config).await.context("preparing the hub")
}

/// A hub refusal in the CLI's words.
fn said(e: berth_hub::HubError) -> anyhow::Error {
    match e {
        berth_hub::HubError::NoSuchUser { user } => anyhow::anyhow!("user {user} not found"),
        other => other.into(),
    }
}

pub(crate) async fn run(cmd: UserCommand, config: &Config, store: &Store) -> Result<()> {
    let op = Actor::Operator;
    match cmd {
        UserCommand::Add { name, admin, password_stdin } => {
            let name = UserName::normalize(&name)?;
            let (pw, generated) = read_password(password_stdin)?;
            hub(config).await?.create_user(&op, &name, admin, Some(pw.clone())).await.map_err(said)?;
            out!("created {name}{}", if admin { " (admin)" } else { "" });
            if generated {
                out!("password: {pw}");
            }
        }
        UserCommand::Approve { name } => {
            hub(config).await?.set_authorized(&op, &name, true).await.map_err(said)?;
            out!("{name} is authorized");
        }
        UserCommand::List { pending } => {
            let mut offset = 0;
            out!("{:<33} {:<11} {:<6} LOCKED", "NAME", "STATUS", "ADMIN");
            loop {
                let q = UserQuery { authorized: pending.then_some(false), offset, limit: 200, ..Default::default() };
                let (users, total) = store.list_users(&q).await?;
                for u in &users {
                    let locked = u.locked_until.filter(|t| *t > berth_store::now_ms()).map(|_| "locked").unwrap_or("");
                    out!(
                        "{:<33} {:<11} {:<6} {}",
                        u.name,
                        if u.authorized { "authorized" } else { "pending" },
                        if u.admin { "yes" } else { "" },
                        locked
                    );
                }
                offset += users.len() as i64;
                if users.is_empty() || offset >= total {
                    break;
                }
            }
        }
        UserCommand::Delete { name, remove_volumes } => {
            // The serving berth owns the routes of running servers: it stops them.
            if store.count_active_servers_of(&name).await? > 0 {
                bail!("{name} has running servers; stop them in the hub first (or DELETE /hub/api/users/{name}, which stops them)");
            }
            let hub = hub(config).await?;
            hub.delete_user(&op, &name, remove_volumes).await.map_err(said)?;
            out!("deleted {name}");
            if remove_volumes {
                out!("removed {name}'s data ({} spawner)", hub.servers.spawner_kind());
            }
        }
        UserCommand::ResetPassword { name, password_stdin } => {
            if store.get_user(&name).await?.is_none() {
                bail!("user {name} not found");
            }
            let (pw, generated) = read_password(password_stdin)?;
            hub(config).await?.reset_password(&op, &name, pw.clone()).await.map_err(said)?;
            out!("password of {name} changed; their sessions are logged out");
            if generated {
                out!("password: {pw}");
            }
        }
        UserCommand::Admin { name, revoke } => {
            hub(config).await?.set_admin(&op, &name, !revoke).await.map_err(said)?;
            out!("{name} is {}an admin", if revoke { "no longer " } else { "" });
        }
        UserCommand::ImportNativeauth { database } => crate::migrate::import_nativeauth(database, config).await?,
    }
    Ok(())
}
