//! Credentials and their rules: argon2id password hashing (with imported
//! bcrypt hashes accepted until the next log-in), password and lock-out
//! policy, session and API token secrets (only their hashes are stored),
//! signed XSRF tokens, and PKCE for the OAuth provider.
//!
//! Pure functions and small types: no SQL, no HTTP framework, no async.
//! Hashing is CPU-heavy on purpose; callers run it off the async runtime.
#![forbid(unsafe_code)]

pub mod lockout;
pub mod password;
pub mod secrets;

pub use lockout::{Lockout, LockoutPolicy};
pub use password::{PasswordError, PasswordPolicy, Verified};
pub use password::HashCost;
pub use secrets::{hash_token, new_public_id, new_signing_key, new_token, pkce_s256_matches, Secret, SessionCookie, Signer};
