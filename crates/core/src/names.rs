//! User and server names.
//!
//! One rule set serves every place a name ends up: URL paths, container,
//! volume and host names (`<server>--<user>.<domain>`), SSH user names
//! (`alice+comfyui`). Hence: lower-case ASCII letters, digits and single
//! hyphens, starting with a letter, at most 32 characters.

use std::fmt;

use serde::{Deserialize, Serialize};

pub const MAX_NAME_LEN: usize = 32;

/// The rule, as shown to people whose name breaks it.
pub const NAME_RULE: &str = "names are 1 to 32 characters: lower-case letters a-z, digits and \
     single hyphens, starting with a letter and not ending with a hyphen";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("the name is empty; {NAME_RULE}")]
    Empty,
    #[error("the name {name:?} is too long ({len} characters); {NAME_RULE}")]
    TooLong { name: String, len: usize },
    #[error("the name {name:?} is not allowed: {reason}; {NAME_RULE}")]
    Invalid { name: String, reason: &'static str },
}

fn check(raw: &str) -> Result<(), NameError> {
    if raw.is_empty() {
        return Err(NameError::Empty);
    }
    let len = raw.chars().count();
    if len > MAX_NAME_LEN {
        return Err(NameError::TooLong { name: raw.to_string(), len });
    }
    let invalid = |reason| Err(NameError::Invalid { name: raw.to_string(), reason });
    let first = raw.chars().next().unwrap_or('-');
    if !first.is_ascii_lowercase() {
        return invalid("it must start with a letter");
    }
    if let Some(c) = raw.chars().find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-')) {
        return match c {
            ' ' => invalid("it contains a space"),
            '/' => invalid("it contains a slash"),
            _ => invalid("it contains a character other than a-z, 0-9 and '-'"),
        };
    }
    if raw.ends_with('-') {
        return invalid("it ends with a hyphen");
    }
    if raw.contains("--") {
        return invalid("it contains two hyphens in a row ('--' separates server and user in host names)");
    }
    Ok(())
}

/// A validated user name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct UserName(String);

impl UserName {
    /// Validates a name exactly as given.
    pub fn parse(raw: &str) -> Result<Self, NameError> {
        check(raw)?;
        Ok(Self(raw.to_string()))
    }

    /// Trims and lower-cases what a person typed, then validates it.
    pub fn normalize(raw: &str) -> Result<Self, NameError> {
        Self::parse(&raw.trim().to_lowercase())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for UserName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        UserName::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for UserName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for UserName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// A server name; the empty name is the user's default server.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize)]
#[serde(transparent)]
pub struct ServerName(String);

impl ServerName {
    pub fn default_server() -> Self {
        Self(String::new())
    }

    pub fn parse(raw: &str) -> Result<Self, NameError> {
        if raw.is_empty() {
            return Ok(Self::default_server());
        }
        check(raw)?;
        Ok(Self(raw.to_string()))
    }

    pub fn is_default(&self) -> bool {
        self.0.is_empty()
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for ServerName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        ServerName::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for ServerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One server of one user: what the hub's lifecycle, routes and records are keyed by.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServerId {
    pub user: UserName,
    pub server: ServerName,
}

impl ServerId {
    pub fn new(user: UserName, server: ServerName) -> Self {
        ServerId { user, server }
    }

    /// Validates both names exactly as given ("" is the default server).
    pub fn parse(user: &str, server: &str) -> Result<Self, NameError> {
        Ok(ServerId { user: UserName::parse(user)?, server: ServerName::parse(server)? })
    }

    pub fn user(&self) -> &str {
        self.user.as_str()
    }

    pub fn server(&self) -> &str {
        self.server.as_str()
    }

    /// The OAuth client of this server, named as JupyterHub names it.
    pub fn client_id(&self) -> String {
        if self.server.is_default() {
            format!("jupyterhub-user-{}", self.user)
        } else {
            format!("jupyterhub-user-{}-{}", self.user, self.server)
        }
    }
}

/// `alice` for a default server, `alice/lab` for a named one.
impl fmt::Display for ServerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.server.is_default() {
            write!(f, "{}", self.user)
        } else {
            write!(f, "{}/{}", self.user, self.server)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_ids_name_their_client_and_print_as_paths() {
        let d = ServerId::parse("alice", "").unwrap();
        assert_eq!((d.to_string(), d.client_id()), ("alice".into(), "jupyterhub-user-alice".into()));
        let n = ServerId::parse("alice", "lab").unwrap();
        assert_eq!((n.to_string(), n.client_id()), ("alice/lab".into(), "jupyterhub-user-alice-lab".into()));
        assert!(ServerId::parse("Alice", "").is_err());
        assert!(ServerId::parse("alice", "a b").is_err());
    }

    #[test]
    fn name_rules() {
        let cases: &[(&str, bool)] = &[
            ("alice", true),
            ("a", true),
            ("bob-2", true),
            ("x1-y2-z3", true),
            ("abcdefghijabcdefghijabcdefghijab", true),
            ("abcdefghijabcdefghijabcdefghijabc", false),
            ("", false),
            ("Alice", false),
            ("1alice", false),
            ("-alice", false),
            ("alice-", false),
            ("al--ice", false),
            ("al ice", false),
            ("bad/name", false),
            ("al.ice", false),
            ("al_ice", false),
            ("alice+lab", false),
            ("ålice", false),
            ("..", false),
        ];
        for (raw, ok) in cases {
            assert_eq!(UserName::parse(raw).is_ok(), *ok, "{raw:?}");
        }
    }

    #[test]
    fn errors_state_the_rule() {
        let err = UserName::parse("bad/name").unwrap_err().to_string();
        assert!(err.contains("slash"), "{err}");
        assert!(err.contains(NAME_RULE), "{err}");
    }

    #[test]
    fn normalize_lowercases_and_trims() {
        assert_eq!(UserName::normalize("  Alice ").unwrap().as_str(), "alice");
    }

    #[test]
    fn default_server_is_empty() {
        assert!(ServerName::parse("").unwrap().is_default());
        assert!(ServerName::parse("lab").is_ok());
        assert!(ServerName::parse("Lab").is_err());
    }
}
