//! Random secrets, their hashes, and HMAC signatures.

use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

/// A secret value whose `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    rand::rngs::OsRng.fill_bytes(&mut b);
    b
}

/// A new API token: 32 hex characters like JupyterHub's, 128 random bits.
pub fn new_token() -> Secret {
    Secret(hex::encode(random_bytes::<16>()))
}

/// What the store keeps of a token, session or code: its SHA-256, hex.
/// Tokens are random with 128 bits or more, so a fast hash is enough.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// A random id for things that are not credentials (the public session id).
pub fn new_public_id() -> String {
    hex::encode(random_bytes::<16>())
}

/// Generates a new signing key (the cookie secret), hex.
pub fn new_signing_key() -> Secret {
    Secret(hex::encode(random_bytes::<32>()))
}

/// Signs and checks values with the hub's cookie secret.
#[derive(Clone)]
pub struct Signer {
    key: Vec<u8>,
}

impl fmt::Debug for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Signer(***)")
    }
}

impl Signer {
    pub fn new(key: &Secret) -> Signer {
        Signer { key: key.expose().as_bytes().to_vec() }
    }

    fn mac(&self, purpose: &str, parts: &[&str]) -> String {
        let Ok(mut m) = HmacSha256::new_from_slice(&self.key) else {
            return String::new();
        };
        m.update(purpose.as_bytes());
        for p in parts {
            m.update(b"|");
            m.update(p.as_bytes());
        }
        B64.encode(m.finalize().into_bytes())
    }

    fn check(&self, purpose: &str, parts: &[&str], mac: &str) -> bool {
        let want = self.mac(purpose, parts);
        want.as_bytes().ct_eq(mac.as_bytes()).into()
    }

    /// An XSRF token bound to `binding` (the session's public id, or an
    /// anonymous nonce): `nonce:issued:mac`.
    pub fn xsrf_token(&self, binding: &str, now_ms: i64) -> String {
        let nonce = B64.encode(random_bytes::<12>());
        let issued = now_ms.to_string();
        let mac = self.mac("xsrf", &[binding, &nonce, &issued]);
        format!("{nonce}:{issued}:{mac}")
    }

    /// Whether `token` was made by [`Signer::xsrf_token`] for `binding`, and
    /// (with `max_age_ms`) is not older than that.
    pub fn xsrf_valid(&self, token: &str, binding: &str, now_ms: i64, max_age_ms: Option<i64>) -> bool {
        let mut it = token.splitn(3, ':');
        let (Some(nonce), Some(issued), Some(mac)) = (it.next(), it.next(), it.next()) else {
            return false;
        };
        let Ok(t) = issued.parse::<i64>() else { return false };
        if max_age_ms.is_some_and(|max| now_ms - t > max) {
            return false;
        }
        self.check("xsrf", &[binding, nonce, issued], mac)
    }

    /// Signs a short value for a cookie: `value.mac`.
    pub fn sign(&self, purpose: &str, value: &str) -> String {
        format!("{value}.{}", self.mac(purpose, &[value]))
    }

    /// The value of a cookie made by [`Signer::sign`], if its signature holds.
    pub fn unsign<'a>(&self, purpose: &str, signed: &'a str) -> Option<&'a str> {
        let (value, mac) = signed.rsplit_once('.')?;
        self.check(purpose, &[value], mac).then_some(value)
    }
}

/// A new log-in session: the cookie carries `secret` (signed); the store
/// keeps only `id_hash`.
pub struct SessionCookie {
    pub cookie_value: String,
    pub id_hash: String,
    pub public_id: String,
}

impl SessionCookie {
    pub fn new(signer: &Signer) -> SessionCookie {
        let secret = B64.encode(random_bytes::<32>());
        SessionCookie {
            cookie_value: signer.sign("session", &secret),
            id_hash: hash_token(&secret),
            public_id: new_public_id(),
        }
    }

    /// The store key for a cookie value, if the cookie is genuine.
    pub fn id_hash_of(signer: &Signer, cookie_value: &str) -> Option<String> {
        signer.unsign("session", cookie_value).map(hash_token)
    }
}

/// PKCE S256: `base64url(sha256(verifier)) == challenge`.
pub fn pkce_s256_matches(challenge: &str, verifier: &str) -> bool {
    let computed = B64.encode(Sha256::digest(verifier.as_bytes()));
    computed.as_bytes().ct_eq(challenge.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer() -> Signer {
        Signer::new(&Secret::new("k".repeat(64)))
    }

    #[test]
    fn secrets_do_not_leak_through_debug() {
        let s = Secret::new("hunter2-very-secret");
        assert!(!format!("{s:?} {s}").contains("hunter2"));
    }

    #[test]
    fn tokens_are_random_and_hashed() {
        let a = new_token();
        let b = new_token();
        assert_ne!(a, b);
        assert_eq!(a.expose().len(), 32);
        assert_eq!(hash_token(a.expose()).len(), 64);
        assert_ne!(hash_token(a.expose()), a.expose());
    }

    #[test]
    fn xsrf_binds_to_the_session() {
        let s = signer();
        let t = s.xsrf_token("sess-a", 1000);
        assert!(s.xsrf_valid(&t, "sess-a", 2000, None));
        assert!(!s.xsrf_valid(&t, "sess-b", 2000, None));
        assert!(!s.xsrf_valid(&t, "sess-a", 10_000, Some(5_000)));
        assert!(!s.xsrf_valid("garbage", "sess-a", 0, None));
        let other = Signer::new(&Secret::new("z".repeat(64)));
        assert!(!other.xsrf_valid(&t, "sess-a", 2000, None));
    }

    #[test]
    fn sessions_are_signed() {
        let s = signer();
        let c = SessionCookie::new(&s);
        assert_eq!(SessionCookie::id_hash_of(&s, &c.cookie_value), Some(c.id_hash.clone()));
        let forged = format!("{}x", c.cookie_value);
        assert_eq!(SessionCookie::id_hash_of(&s, &forged), None);
        assert_eq!(SessionCookie::id_hash_of(&s, "no-dot"), None);
    }

    #[test]
    fn pkce() {
        // Challenge computed independently with Python hashlib + urlsafe_b64encode.
        assert!(pkce_s256_matches(
            "0DRCtC_ZJ0mUjn3BZXQfGetQTKAe6BTSTO6LQdE_0Z4",
            "dBjftJeZ4CVP-mQtJMOdYB8d9-Yzn0PkcDm6Wfs5jbM"
        ));
        assert!(!pkce_s256_matches("0DRCtC_ZJ0mUjn3BZXQfGetQTKAe6BTSTO6LQdE_0Z4", "wrong"));
    }
}
