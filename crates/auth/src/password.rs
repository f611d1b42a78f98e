//! Password hashing and the password rules.

use std::cell::RefCell;
use std::sync::OnceLock;

use argon2::password_hash::{rand_core::OsRng, Output, ParamsString, PasswordHash, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use subtle::ConstantTimeEq;

thread_local! {
    /// argon2's working memory, kept per thread and reused: a fresh 19 MiB
    /// allocation per hash leaves the allocator holding copies of it.
    static BLOCKS: RefCell<Vec<Block>> = const { RefCell::new(Vec::new()) };
}

/// Gives this thread's argon2 working memory back (hashing threads call it
/// when idle, so a quiet hub does not hold 19 MiB per thread).
pub fn release_memory() {
    BLOCKS.with(|b| *b.borrow_mut() = Vec::new());
}

/// Runs argon2 into `out` with this thread's reusable memory.
fn argon2_into(a: &Argon2<'_>, params: &Params, password: &[u8], salt: &[u8], out: &mut [u8]) -> bool {
    BLOCKS.with(|b| {
        let mut blocks = b.borrow_mut();
        let need = params.block_count();
        if blocks.len() < need {
            blocks.resize(need, Block::default());
        }
        a.hash_password_into_with_memory(password, salt, out, &mut blocks[..need]).is_ok()
    })
}

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
    let a = argon2(cost);
    let params = a.params().clone();
    let salt = SaltString::generate(&mut OsRng);
    let mut salt_buf = [0u8; 64];
    let Ok(salt_bytes) = salt.as_salt().decode_b64(&mut salt_buf) else { return String::new() };
    let mut out = [0u8; 32];
    if !argon2_into(&a, &params, password.as_bytes(), salt_bytes, &mut out) {
        return String::new();
    }
    let (Ok(params_string), Ok(output)) = (ParamsString::try_from(&params), Output::new(&out)) else {
        return String::new();
    };
    let phc = PasswordHash {
        algorithm: argon2::ARGON2ID_IDENT,
        version: Some(Version::V0x13.into()),
        params: params_string,
        salt: Some(salt.as_salt()),
        hash: Some(output),
    };
    phc.to_string()
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
    let (Ok(algorithm), Ok(params)) = (Algorithm::try_from(parsed.algorithm), Params::try_from(&parsed)) else {
        return Verified::Wrong;
    };
    let version = parsed.version.and_then(|v| Version::try_from(v).ok()).unwrap_or(Version::V0x13);
    let (Some(salt), Some(expected)) = (parsed.salt, parsed.hash) else {
        return Verified::Wrong;
    };
    let mut salt_buf = [0u8; 64];
    let Ok(salt_bytes) = salt.decode_b64(&mut salt_buf) else { return Verified::Wrong };
    let a = Argon2::new(algorithm, version, params.clone());
    let mut out = vec![0u8; expected.len()];
    let matched = argon2_into(&a, &params, password.as_bytes(), salt_bytes, &mut out)
        && bool::from(out.as_slice().ct_eq(expected.as_bytes()));
    match matched {
        true => {
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
        false => Verified::Wrong,
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
    fn phc_strings_agree_with_the_argon2_crate() {
        use argon2::password_hash::{PasswordHasher, PasswordVerifier};
        // Ours verifies with the crate's verifier...
        let ours = hash("compat-pass", FAST);
        let parsed = PasswordHash::new(&ours).unwrap();
        assert!(argon2(FAST).verify_password(b"compat-pass", &parsed).is_ok());
        assert!(argon2(FAST).verify_password(b"other", &parsed).is_err());
        // ...and the crate's hashes verify with ours.
        let salt = SaltString::generate(&mut OsRng);
        let theirs = argon2(FAST).hash_password(b"compat-pass", &salt).unwrap().to_string();
        assert_eq!(verify(&theirs, "compat-pass", FAST), Verified::Ok);
        assert_eq!(verify(&theirs, "other", FAST), Verified::Wrong);
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
