//! Plain records: what the store reads and writes.

use berth_core::ServerState;
use sqlx::any::AnyRow;
use sqlx::Row;

use crate::{get_bool, Result};

pub(crate) const USER_COLS: &str =
    "name, admin, authorized, password_hash, failed_logins, last_failed_login, locked_until, created, last_activity, account_id";
pub(crate) const USER_COLS_U: &str = "u.name AS u_name, u.admin AS u_admin, u.authorized AS u_authorized, \
     u.password_hash AS u_password_hash, u.failed_logins AS u_failed_logins, u.last_failed_login AS u_last_failed_login, \
     u.locked_until AS u_locked_until, u.created AS u_created, u.last_activity AS u_last_activity, \
     u.account_id AS u_account_id";
pub(crate) const TOKEN_COLS: &str = "t.id, t.hash, t.user_name, t.kind, t.server_name, t.scopes, t.note, t.created, \
     t.expires_at, t.last_activity, t.session_id, t.oauth_client";
pub(crate) const SERVER_COLS: &str =
    "user_name, name, template, state, last_error, spawner_state, url, started, last_activity, user_options";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    /// Never changes, and never comes back after a deletion: what the
    /// user's data (volumes, home) is named by, so a new account with an
    /// old name starts empty. Accounts from before migration 6 have their name.
    pub account_id: String,
    pub admin: bool,
    pub authorized: bool,
    /// A PHC string (argon2id), or an imported bcrypt hash (`$2b$...`).
    pub password_hash: Option<String>,
    pub failed_logins: i64,
    pub last_failed_login: Option<i64>,
    pub locked_until: Option<i64>,
    pub created: i64,
    pub last_activity: Option<i64>,
}

impl User {
    pub(crate) fn from_row(r: &AnyRow) -> Result<User> {
        User::from_row_p(r, "")
    }

    pub(crate) fn from_row_p(r: &AnyRow, p: &str) -> Result<User> {
        let c = |n: &str| format!("{p}{n}");
        Ok(User {
            name: r.try_get(c("name").as_str())?,
            account_id: r
                .try_get::<Option<String>, _>(c("account_id").as_str())?
                .unwrap_or_else(|| r.try_get(c("name").as_str()).unwrap_or_default()),
            admin: get_bool(r, &c("admin"))?,
            authorized: get_bool(r, &c("authorized"))?,
            password_hash: r.try_get(c("password_hash").as_str())?,
            failed_logins: r.try_get(c("failed_logins").as_str())?,
            last_failed_login: r.try_get(c("last_failed_login").as_str())?,
            locked_until: r.try_get(c("locked_until").as_str())?,
            created: r.try_get(c("created").as_str())?,
            last_activity: r.try_get(c("last_activity").as_str())?,
        })
    }
}

#[derive(Debug, Clone, Default)]
pub struct NewUser {
    pub name: String,
    pub admin: bool,
    pub authorized: bool,
    pub password_hash: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StateFilter {
    #[default]
    Any,
    /// A server is running.
    Ready,
    /// A server is starting, running or stopping.
    Active,
    /// No server is active.
    Inactive,
}

#[derive(Debug, Clone)]
pub struct UserQuery {
    pub name_prefix: Option<String>,
    pub state: StateFilter,
    pub authorized: Option<bool>,
    pub offset: i64,
    pub limit: i64,
}

impl Default for UserQuery {
    fn default() -> Self {
        UserQuery { name_prefix: None, state: StateFilter::Any, authorized: None, offset: 0, limit: 200 }
    }
}

#[derive(Debug, Clone)]
pub struct Session {
    pub id_hash: String,
    /// Not a credential: what `jupyterhub-session-id` carries.
    pub public_id: String,
    pub user: String,
    pub created: i64,
    pub last_seen: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    /// Made by a person (token page, API, CLI).
    Api,
    /// A single-user server's own `JUPYTERHUB_API_TOKEN`.
    Server,
    /// Issued through the OAuth flow to a server's client.
    OAuth,
}

impl TokenKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenKind::Api => "api_token",
            TokenKind::Server => "server",
            TokenKind::OAuth => "oauth",
        }
    }

    fn parse(s: &str) -> TokenKind {
        match s {
            "server" => TokenKind::Server,
            "oauth" => TokenKind::OAuth,
            _ => TokenKind::Api,
        }
    }
}

#[derive(Debug, Clone)]
pub struct NewToken {
    /// sha256 of the secret, hex.
    pub hash: String,
    pub user: String,
    pub kind: TokenKind,
    pub server: Option<String>,
    pub scopes: Vec<String>,
    pub note: String,
    pub expires_at: Option<i64>,
    pub session_id: Option<String>,
    pub oauth_client: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Token {
    pub id: String,
    pub hash: String,
    pub user: String,
    pub kind: TokenKind,
    pub server: Option<String>,
    pub scopes: Vec<String>,
    pub note: String,
    pub created: i64,
    pub expires_at: Option<i64>,
    pub last_activity: Option<i64>,
    pub session_id: Option<String>,
    pub oauth_client: Option<String>,
}

impl Token {
    pub(crate) fn from_row(r: &AnyRow) -> Result<Token> {
        let scopes: String = r.try_get("scopes")?;
        let kind: String = r.try_get("kind")?;
        Ok(Token {
            id: r.try_get("id")?,
            hash: r.try_get("hash")?,
            user: r.try_get("user_name")?,
            kind: TokenKind::parse(&kind),
            server: r.try_get("server_name")?,
            scopes: serde_json::from_str(&scopes).unwrap_or_default(),
            note: r.try_get("note")?,
            created: r.try_get("created")?,
            expires_at: r.try_get("expires_at")?,
            last_activity: r.try_get("last_activity")?,
            session_id: r.try_get("session_id")?,
            oauth_client: r.try_get("oauth_client")?,
        })
    }

    pub fn is_expired(&self, now: i64) -> bool {
        self.expires_at.is_some_and(|e| e <= now)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Server {
    pub user: String,
    /// "" is the default server.
    pub name: String,
    pub template: String,
    pub state: ServerState,
    pub last_error: Option<String>,
    /// The spawner's saved state (JSON): container id, or pid and port.
    pub spawner_state: String,
    pub url: Option<String>,
    pub started: Option<i64>,
    pub last_activity: Option<i64>,
    /// JSON object.
    pub user_options: String,
}

impl Server {
    pub fn new(user: &str, name: &str) -> Server {
        Server {
            user: user.to_string(),
            name: name.to_string(),
            template: String::new(),
            state: ServerState::Stopped,
            last_error: None,
            spawner_state: "{}".into(),
            url: None,
            started: None,
            last_activity: None,
            user_options: "{}".into(),
        }
    }

    pub(crate) fn from_row(r: &AnyRow) -> Result<Server> {
        let state: String = r.try_get("state")?;
        Ok(Server {
            user: r.try_get("user_name")?,
            name: r.try_get("name")?,
            template: r.try_get("template")?,
            // An unknown state (written by a newer berth) reads as stopped.
            state: state.parse().unwrap_or(ServerState::Stopped),
            last_error: r.try_get("last_error")?,
            spawner_state: r.try_get("spawner_state")?,
            url: r.try_get("url")?,
            started: r.try_get("started")?,
            last_activity: r.try_get("last_activity")?,
            user_options: r.try_get("user_options")?,
        })
    }
}

#[derive(Debug, Clone)]
pub struct OAuthClient {
    pub id: String,
    pub secret_hash: String,
    pub redirect_uri: String,
    pub user: String,
    pub server: String,
}

#[derive(Debug, Clone)]
pub struct OAuthCode {
    pub code_hash: String,
    pub client_id: String,
    pub user: String,
    pub session_id: Option<String>,
    pub redirect_uri: String,
    pub code_challenge: Option<String>,
    pub scopes: Vec<String>,
    pub expires_at: i64,
}

#[derive(Debug, Clone)]
pub struct Event {
    pub id: String,
    pub at: i64,
    pub actor: String,
    pub kind: String,
    pub subject: String,
    pub detail: String,
}
