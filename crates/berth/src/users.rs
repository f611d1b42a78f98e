//! `berth user ...`: account management for operators, working directly on
//! the database (SQLite's WAL lets it run beside a serving berth).

use std::io::BufRead;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use berth_core::UserName;
use berth_hub::Actor;
use berth_server::Config;
use berth_store::{NewUser, Store, UserQuery};
use clap::Subcommand;
use sqlx::Row;

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
    /// Import NativeAuthenticator accounts from a JupyterHub database.
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
            println!("created {name}{}", if admin { " (admin)" } else { "" });
            if generated {
                println!("password: {pw}");
            }
        }
        UserCommand::Approve { name } => {
            hub(config).await?.set_authorized(&op, &name, true).await.map_err(said)?;
            println!("{name} is authorized");
        }
        UserCommand::List { pending } => {
            let mut offset = 0;
            println!("{:<33} {:<11} {:<6} LOCKED", "NAME", "STATUS", "ADMIN");
            loop {
                let q = UserQuery { authorized: pending.then_some(false), offset, limit: 200, ..Default::default() };
                let (users, total) = store.list_users(&q).await?;
                for u in &users {
                    let locked = u.locked_until.filter(|t| *t > berth_store::now_ms()).map(|_| "locked").unwrap_or("");
                    println!(
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
            println!("deleted {name}");
            if remove_volumes {
                println!("removed {name}'s data ({} spawner)", hub.servers.spawner_kind());
            }
        }
        UserCommand::ResetPassword { name, password_stdin } => {
            if store.get_user(&name).await?.is_none() {
                bail!("user {name} not found");
            }
            let (pw, generated) = read_password(password_stdin)?;
            hub(config).await?.reset_password(&op, &name, pw.clone()).await.map_err(said)?;
            println!("password of {name} changed; their sessions are logged out");
            if generated {
                println!("password: {pw}");
            }
        }
        UserCommand::Admin { name, revoke } => {
            hub(config).await?.set_admin(&op, &name, !revoke).await.map_err(said)?;
            println!("{name} is {}an admin", if revoke { "no longer " } else { "" });
        }
        UserCommand::ImportNativeauth { database } => import_nativeauth(store, &database).await?,
    }
    Ok(())
}

/// Reads NativeAuthenticator's `users_info` (and the hub's `users` for admin
/// flags) and creates the accounts that do not exist yet. bcrypt hashes are
/// kept as they are and replaced by argon2id at each user's next log-in.
async fn import_nativeauth(store: &Store, path: &std::path::Path) -> Result<()> {
    if !path.is_file() {
        bail!("{} is not a file", path.display());
    }
    sqlx::any::install_default_drivers();
    let url = format!("sqlite://{}?mode=ro", path.display());
    let pool = sqlx::AnyPool::connect(&url).await.with_context(|| format!("opening {}", path.display()))?;
    let rows = sqlx::query(
        "SELECT username, password, CAST(COALESCE(is_authorized, 0) AS INTEGER) AS is_authorized FROM users_info",
    )
    .fetch_all(&pool)
    .await
    .with_context(|| format!("reading NativeAuthenticator's users_info table from {}", path.display()))?;
    let admins: Vec<String> = match sqlx::query("SELECT name FROM users WHERE admin = 1").fetch_all(&pool).await {
        Ok(rows) => rows.iter().filter_map(|r| r.try_get::<String, _>("name").ok()).collect(),
        Err(_) => Vec::new(),
    };
    let (mut imported, mut skipped) = (0, 0);
    for r in &rows {
        let raw: String = r.try_get("username")?;
        let hash: String = match r.try_get::<Vec<u8>, _>("password") {
            Ok(b) => String::from_utf8_lossy(&b).into_owned(),
            Err(_) => r.try_get::<String, _>("password")?,
        };
        let authorized = match r.try_get::<i64, _>("is_authorized") {
            Ok(v) => v != 0,
            Err(_) => r.try_get::<bool, _>("is_authorized").unwrap_or(false),
        };
        let name = match UserName::normalize(&raw) {
            Ok(n) => n,
            Err(e) => {
                println!("skipped {raw:?}: {e}");
                skipped += 1;
                continue;
            }
        };
        if !hash.starts_with("$2") {
            println!("skipped {name}: the stored password is not a bcrypt hash");
            skipped += 1;
            continue;
        }
        let admin = admins.iter().any(|a| a == &raw || a == name.as_str());
        let new = NewUser { name: name.to_string(), admin, authorized, password_hash: Some(hash) };
        match store.create_user(&new).await {
            Ok(_) => {
                imported += 1;
                println!(
                    "imported {name}{}{}",
                    if authorized { "" } else { " (pending)" },
                    if admin { " (admin)" } else { "" }
                );
            }
            Err(berth_store::StoreError::Conflict { .. }) => {
                println!("skipped {name}: an account of that name exists already");
                skipped += 1;
            }
            Err(e) => return Err(e.into()),
        }
    }
    pool.close().await;
    store.add_event("cli", "import-nativeauth", &path.display().to_string(), &format!("{imported} imported")).await?;
    println!("{imported} account(s) imported, {skipped} skipped");
    Ok(())
}
