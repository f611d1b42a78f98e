//! Password hashing and the password rules.

use std::sync::OnceLock;

use argon2::password_hash::{rand_core::OsRng, PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};

/// Argon2id cost. The defaults are OWASP's minimum recommendation
/// (19 MiB, 2 passes): about 20–40 ms on one core of a current machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashCost {
    pub memory_kib: u32,
    pub iterations: u32,
}

impl Default for HashCost {
    fn default() -> Self {
        HashCost { memory_kib: 19 * 1024, iterations: 2 }
    }
}

fn argon2(cost: HashCost) -> Argon2<'static> {
    let params =
        Params::new(cost.memory_kib.max(8), cost.iterations.max(1), 1, None).unwrap_or_else(|_| Params::default());
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

/// Hashes a password as an argon2id PHC string.
pub fn hash(password: &str, cost: HashCost) -> String {
    let salt = SaltString::generate(&mut OsRng);
    match argon2(cost).hash_password(password.as_bytes(), &salt) {
        Ok(h) => h.to_string(),
        // Only reachable with parameters Params::new rejected above.
        Err(_) => String::new(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verified {
    Ok,
    /// Correct, but stored in an old format (bcrypt, weaker argon2): re-hash.
    OkRehash,
    Wrong,
}

impl Verified {
    pub fn ok(self) -> bool {
        !matches!(self, Verified::Wrong)
    }
}

/// Checks a password against a stored hash: argon2 PHC strings, or bcrypt
/// hashes imported from NativeAuthenticator.
pub fn verify(stored: &str, password: &str, cost: HashCost) -> Verified {
    if stored.starts_with("$2a$") || stored.starts_with("$2b$") || stored.starts_with("$2y$") {
        return match bcrypt::verify(password, stored) {
            Ok(true) => Verified::OkRehash,
            _ => Verified::Wrong,
        };
    }
    let Ok(parsed) = PasswordHash::new(stored) else {
        return Verified::Wrong;
    };
    match argon2(cost).verify_password(password.as_bytes(), &parsed) {
        Ok(()) => {
            let current = parsed.algorithm.as_str() == "argon2id"
                && Params::try_from(&parsed)
                    .map(|p| p.m_cost() >= cost.memory_kib && p.t_cost() >= cost.iterations)
                    .unwrap_or(false);
            if current {
                Verified::Ok
            } else {
                Verified::OkRehash
            }
        }
        Err(_) => Verified::Wrong,
    }
}

/// Spends the same time as a real verification, for unknown users, so that
/// response times do not reveal which names exist.
pub fn verify_dummy(password: &str, cost: HashCost) {
    static DUMMY: OnceLock<(HashCost, String)> = OnceLock::new();
    let (c, h) = DUMMY.get_or_init(|| (cost, hash("berth-dummy-password", cost)));
    let h = if *c == cost { h.clone() } else { hash("berth-dummy-password", cost) };
    let _ = verify(&h, password, cost);
}

/// The password rules.
#[derive(Debug, Clone)]
pub struct PasswordPolicy {
    pub min_length: usize,
    pub refuse_common: bool,
}

impl Default for PasswordPolicy {
    fn default() -> Self {
        PasswordPolicy { min_length: 8, refuse_common: true }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PasswordError {
    #[error("the password must be at least {min} characters long")]
    TooShort { min: usize },
    #[error("the password is longer than {max} characters")]
    TooLong { max: usize },
    #[error("the password is too common; choose one that is not on lists of leaked passwords")]
    Common,
    #[error("the password must not be the user name")]
    SameAsName,
}

pub const MAX_PASSWORD_LEN: usize = 1024;

/// Most common leaked passwords of 6+ characters, lower-cased.
const COMMON: &[&str] = &[
    "123456",
    "password",
    "12345678",
    "qwerty",
    "123456789",
    "12345",
    "1234567",
    "111111",
    "1234567890",
    "123123",
    "abc123",
    "1234",
    "password1",
    "iloveyou",
    "1q2w3e4r",
    "000000",
    "qwerty123",
    "zaq12wsx",
    "dragon",
    "sunshine",
    "princess",
    "letmein",
    "654321",
    "monkey",
    "27653",
    "1qaz2wsx",
    "123321",
    "qwertyuiop",
    "superman",
    "asdfghjkl",
    "trustno1",
    "football",
    "baseball",
    "welcome",
    "admin123",
    "passw0rd",
    "password123",
    "master",
    "hello123",
    "freedom",
    "whatever",
    "qazwsx",
    "starwars",
    "michael",
    "shadow",
    "jennifer",
    "jordan23",
    "computer",
    "michelle",
    "corvette",
    "mustang",
    "access",
    "batman",
    "charlie",
    "donald",
    "killer",
    "loveme",
    "maggie",
    "matrix",
    "pepper",
    "ranger",
    "robert",
    "soccer",
    "summer",
    "thomas",
    "tigger",
    "hunter",
    "hockey",
    "daniel",
    "secret",
    "changeme",
    "administrator",
    "default",
    "jupyter",
    "jupyterhub",
    "notebook",
    "welcome1",
    "p@ssw0rd",
    "p@ssword",
    "qwerty1",
    "11111111",
    "88888888",
    "abcd1234",
    "87654321",
    "aa123456",
    "1111111",
    "121212",
    "666666",
    "696969",
    "7777777",
    "987654321",
    "a123456",
    "qwe123",
    "123qwe",
    "1q2w3e",
    "q1w2e3r4",
    "asdfgh",
    "zxcvbnm",
    "zxcvbn",
    "asdf1234",
    "iloveyou1",
    "lovely",
    "flower",
    "hello",
    "hello1",
    "login",
    "mypass",
    "mypassword",
    "pass1234",
    "test123",
    "testing",
    "test1234",
    "temp1234",
    "root1234",
    "toor",
    "letmein1",
];

impl PasswordPolicy {
    pub fn check(&self, user: &str, password: &str) -> Result<(), PasswordError> {
        let len = password.chars().count();
        if len < self.min_length {
            return Err(PasswordError::TooShort { min: self.min_length });
        }
        if len > MAX_PASSWORD_LEN {
            return Err(PasswordError::TooLong { max: MAX_PASSWORD_LEN });
        }
        let lower = password.to_lowercase();
        if !user.is_empty() && lower == user.to_lowercase() {
            return Err(PasswordError::SameAsName);
        }
        if self.refuse_common && COMMON.contains(&lower.as_str()) {
            return Err(PasswordError::Common);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAST: HashCost = HashCost { memory_kib: 64, iterations: 1 };

    #[test]
    fn argon2id_round_trip() {
        let h = hash("correct horse", FAST);
        assert!(h.starts_with("$argon2id$"), "{h}");
        assert_eq!(verify(&h, "correct horse", FAST), Verified::Ok);
        assert_eq!(verify(&h, "wrong horse", FAST), Verified::Wrong);
        // A stronger configured cost asks for a re-hash.
        assert_eq!(verify(&h, "correct horse", HashCost { memory_kib: 128, iterations: 1 }), Verified::OkRehash);
    }

    #[test]
    fn imported_bcrypt_verifies_and_asks_for_rehash() {
        let h = bcrypt::hash("s3cret-pass", 4).unwrap();
        assert_eq!(verify(&h, "s3cret-pass", FAST), Verified::OkRehash);
        assert_eq!(verify(&h, "nope", FAST), Verified::Wrong);
    }

    #[test]
    fn garbage_hash_never_verifies() {
        assert_eq!(verify("", "", FAST), Verified::Wrong);
        assert_eq!(verify("plaintext", "plaintext", FAST), Verified::Wrong);
    }

    #[test]
    fn policy_table() {
        let p = PasswordPolicy::default();
        let cases: &[(&str, &str, Option<PasswordError>)] = &[
            ("alice", "short", Some(PasswordError::TooShort { min: 8 })),
            ("alice", "password", Some(PasswordError::Common)),
            ("alice", "PassWord123", Some(PasswordError::Common)),
            ("alicealice", "AliceAlice", Some(PasswordError::SameAsName)),
            ("alice", "gentle-otter-42", None),
        ];
        for (user, pw, want) in cases {
            assert_eq!(p.check(user, pw).err(), *want, "{user}/{pw}");
        }
        assert!(p.check("a", &"x".repeat(MAX_PASSWORD_LEN + 1)).is_err());
    }
}
