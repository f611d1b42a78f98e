//! Credentials and their rules: argon2id password hashing (with imported
//! bcrypt hashes accepted until the next log-in), password and lock-out
//! policy, session and API token secrets (only their hashes are stored),
//! signed XSRF tokens, and PKCE for the OAuth provider.
//!
//! Pure functions and small types: no SQL, no HTTP framework, no async.
//! Hashing is CPU-heavy on purpose; callers run it off the async runtime.
#![forbid(unsafe_code)]

pub mod keys;
pub mod lockout;
pub mod password;
pub mod secrets;

pub use keys::{parse_key, ParsedKey};
pub use lockout::{Lockout, LockoutPolicy};
pub use password::HashCost;
pub use password::{PasswordError, PasswordPolicy, Verified};
pub use secrets::{
    hash_token, new_public_id, new_signing_key, new_token, pkce_s256_matches, Secret, SessionCookie, Signer,
};

use std::time::Duration;

/// The `[auth]` section of berth's configuration.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Whether people may sign up on `/hub/signup` (accounts stay pending
    /// until an admin authorizes them).
    pub signup: bool,
    pub min_password_length: u32,
    pub refuse_common_passwords: bool,
    /// Failed log-ins before the account must wait; 0 turns lock-out off.
    pub lockout_attempts: u32,
    #[serde(with = "berth_core::serde_secs")]
    pub lockout_seconds: Duration,
    #[serde(with = "berth_core::serde_secs")]
    pub session_max_age_seconds: Duration,
    pub argon2_memory_kib: u32,
    pub argon2_iterations: u32,
}

impl Default for Config {
    fn default() -> Self {
        let cost = HashCost::default();
        Config {
            signup: true,
            min_password_length: 8,
            refuse_common_passwords: true,
            lockout_attempts: 5,
            lockout_seconds: Duration::from_secs(600),
            session_max_age_seconds: Duration::from_secs(30 * 24 * 3600),
            argon2_memory_kib: cost.memory_kib,
            argon2_iterations: cost.iterations,
        }
    }
}

impl Config {
    pub fn password_policy(&self) -> PasswordPolicy {
        PasswordPolicy { min_length: self.min_password_length as usize, refuse_common: self.refuse_common_passwords }
    }
    pub fn lockout(&self) -> LockoutPolicy {
        LockoutPolicy { attempts: self.lockout_attempts, window: self.lockout_seconds }
    }
    pub fn hash_cost(&self) -> HashCost {
        HashCost { memory_kib: self.argon2_memory_kib, iterations: self.argon2_iterations }
    }
}
