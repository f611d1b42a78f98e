//! SSH public keys as users paste them: one OpenSSH line, checked (type,
//! strength, no private keys or options) and reduced to what the hub stores,
//! with the SHA-256 fingerprint the SSH gateway looks keys up by.

use ssh_key::{Algorithm, HashAlg, PublicKey};

/// Longest key line accepted (an RSA 16384-bit key is about 2.8 KB).
const MAX_KEY_LEN: usize = 8 * 1024;
/// Smallest RSA modulus accepted, in bits.
const MIN_RSA_BITS: usize = 2048;

/// A key line, checked and reduced to what the store keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedKey {
    pub algorithm: String,
    /// `<algorithm> <base64>`, without the comment.
    pub public_key: String,
    pub comment: String,
    /// `SHA256:…`, as `ssh-keygen -l` prints it.
    pub fingerprint: String,
}

/// Parses one OpenSSH public key line (`ssh-ed25519 AAAA… comment`).
pub fn parse_key(line: &str) -> Result<ParsedKey, String> {
    let line = line.trim();
    if line.is_empty() {
        return Err("the key is empty; paste the contents of your .pub file (for example ~/.ssh/id_ed25519.pub)".into());
    }
    if line.len() > MAX_KEY_LEN {
        return Err(format!("the key is longer than {MAX_KEY_LEN} characters"));
    }
    if line.contains("PRIVATE KEY") {
        return Err("this is a private key: never share it; paste the public key (the .pub file) instead".into());
    }
    if line.lines().count() > 1 {
        return Err("paste one key per request (one line)".into());
    }
    if line.starts_with("---- BEGIN SSH2 PUBLIC KEY") {
        return Err("this is an RFC 4716 key; convert it with `ssh-keygen -i -f KEY` and paste the result".into());
    }
    let first = line.split_whitespace().next().unwrap_or("");
    if !first.starts_with("ssh-") && !first.starts_with("ecdsa-") && !first.starts_with("sk-") {
        return Err(format!(
            "not an OpenSSH public key: it should start with its type, e.g. ssh-ed25519 (found {:?}); \
authorized_keys options are not supported",
            first.chars().take(40).collect::<String>()
        ));
    }
    let key =
        PublicKey::from_openssh(line).map_err(|e| format!("the key cannot be read ({e}); copy the whole line"))?;
    match key.algorithm() {
        Algorithm::Ed25519 | Algorithm::Ecdsa { .. } => {}
        Algorithm::Rsa { .. } => {
            let bits = key.key_data().rsa().map(|k| k.n().as_positive_bytes().map(|b| b.len() * 8).unwrap_or(0));
            if let Some(bits) = bits.filter(|b| *b < MIN_RSA_BITS) {
                return Err(format!("this RSA key has {bits} bits; at least {MIN_RSA_BITS} are required"));
            }
        }
        Algorithm::Dsa => return Err("DSA keys are too weak and are refused; use ed25519".into()),
        other => return Err(format!("{} keys are not supported; use ed25519, ECDSA or RSA", other.as_str())),
    }
    let comment = key.comment().to_string();
    let bare = PublicKey::new(key.key_data().clone(), "");
    let public_key = bare.to_openssh().map_err(|e| format!("the key cannot be re-encoded: {e}"))?;
    Ok(ParsedKey {
        algorithm: key.algorithm().as_str().to_string(),
        public_key: public_key.trim().to_string(),
        comment: comment.chars().take(200).collect(),
        fingerprint: key.fingerprint(HashAlg::Sha256).to_string(),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    // Generated with `ssh-keygen -t ed25519 -C alice@laptop` for these tests.
    const ED25519: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDrD+pwPLnX4GFu1Z/HSG1b/m6hD8HOWaOTzvucTpb88 alice@laptop";

    #[test]
    fn a_good_key_is_reduced_to_type_and_data_with_its_fingerprint() {
        let k = parse_key(&format!("  {ED25519}\n")).unwrap();
        assert_eq!(k.algorithm, "ssh-ed25519");
        assert_eq!(k.comment, "alice@laptop");
        assert!(k.public_key.starts_with("ssh-ed25519 AAAAC3"));
        assert!(!k.public_key.contains("alice"));
        // As `ssh-keygen -lf` printed it for this key.
        assert_eq!(k.fingerprint, "SHA256:KN4GMZVhgdcG5P1HOejXULVbPdkiA5aWo2DLWbV4kVE");
    }

    #[test]
    fn bad_keys_are_refused_with_a_reason() {
        let cases = [
            ("", "empty"),
            ("-----BEGIN OPENSSH PRIVATE KEY-----", "private key"),
            ("command=\"x\" ssh-ed25519 AAAA", "options"),
            ("ssh-ed25519 AAAA!!!notbase64", "cannot be read"),
            ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5", "cannot be read"),
        ];
        for (line, want) in cases {
            let e = parse_key(line).unwrap_err();
            assert!(e.contains(want), "{line:?}: {e}");
        }
        let two = format!("{ED25519}\n{ED25519}");
        assert!(parse_key(&two).unwrap_err().contains("one key"));
    }
}
