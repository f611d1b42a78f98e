//! Host keys: made once, kept in `<data_dir>/ssh/` (mode 0600) and reused,
//! so clients see the same host after restarts. Ed25519 and ECDSA are made
//! at once; RSA (slow to make) in the background on first start.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use russh::keys::ssh_key::LineEnding;
use russh::keys::{Algorithm, EcdsaCurve, PrivateKey};

pub struct HostKeys {
    ready: Vec<PrivateKey>,
    pending: Option<Pending>,
}

/// Key types still to be made, and the keys already there.
pub struct Pending {
    dir: PathBuf,
    have: Vec<PrivateKey>,
    todo: Vec<&'static str>,
}

fn algorithm(t: &str) -> Option<(&'static str, Algorithm)> {
    Some(match t {
        "ed25519" => ("ed25519", Algorithm::Ed25519),
        "ecdsa" => ("ecdsa", Algorithm::Ecdsa { curve: EcdsaCurve::NistP256 }),
        "rsa" => ("rsa", Algorithm::Rsa { hash: None }),
        _ => return None,
    })
}

fn path(dir: &Path, t: &str) -> PathBuf {
    dir.join(format!("ssh_host_{t}_key"))
}

fn load(p: &Path) -> Result<Option<PrivateKey>, String> {
    match std::fs::read_to_string(p) {
        Ok(text) => PrivateKey::from_openssh(text.as_bytes()).map(Some).map_err(|e| {
            format!("the SSH host key {} cannot be read ({e}); move it away to have berth make a new one", p.display())
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read the SSH host key {}: {e}", p.display())),
    }
}

fn make(dir: &Path, t: &str, alg: Algorithm) -> Result<PrivateKey, String> {
    let key = PrivateKey::random(&mut rand10::rng(), alg).map_err(|e| format!("cannot make an {t} host key: {e}"))?;
    let text = key.to_openssh(LineEnding::LF).map_err(|e| format!("cannot encode the {t} host key: {e}"))?;
    let p = path(dir, t);
    let tmp = p.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    f.write_all(text.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, &p).map_err(|e| format!("cannot write {}: {e}", p.display()))?;
    if let Ok(public) = key.public_key().to_openssh() {
        let _ = std::fs::write(p.with_extension("pub"), format!("{public}\n"));
    }
    tracing::info!(key = %p.display(), "made a new SSH host key");
    Ok(key)
}

impl HostKeys {
    pub fn load_or_create(data_dir: &Path, types: &[String]) -> Result<HostKeys, String> {
        let dir = data_dir.join("ssh");
        std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700));
        let mut ready = Vec::new();
        let mut todo = Vec::new();
        for t in types {
            let (name, alg) = algorithm(t).ok_or_else(|| format!("unknown host key type {t}"))?;
            match load(&path(&dir, name))? {
                Some(k) => ready.push(k),
                None if name == "rsa" => todo.push(name),
                None => ready.push(make(&dir, name, alg)?),
            }
        }
        if ready.is_empty() {
            // Only slow types asked for: make them now rather than serve none.
            for name in std::mem::take(&mut todo) {
                if let Some((_, alg)) = algorithm(name) {
                    ready.push(make(&dir, name, alg)?);
                }
            }
        }
        let pending = (!todo.is_empty()).then(|| Pending { dir, have: ready.clone(), todo });
        Ok(HostKeys { ready, pending })
    }

    pub fn ready(&self) -> Vec<PrivateKey> {
        self.ready.clone()
    }

    pub fn pending(self) -> Option<Pending> {
        self.pending
    }
}

impl Pending {
    /// Makes the remaining keys; returns every key (those that failed are logged and left out).
    pub fn finish(self) -> Vec<PrivateKey> {
        let mut all = self.have;
        for name in self.todo {
            if let Some((_, alg)) = algorithm(name) {
                match make(&self.dir, name, alg) {
                    Ok(k) => all.push(k),
                    Err(e) => tracing::warn!(error = %e, "SSH host key not made"),
                }
            }
        }
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_made_once_and_reused() {
        let tmp = tempfile::tempdir().unwrap();
        let types = vec!["ed25519".to_string(), "ecdsa".to_string()];
        let a = HostKeys::load_or_create(tmp.path(), &types).unwrap();
        assert!(a.pending.is_none());
        let b = HostKeys::load_or_create(tmp.path(), &types).unwrap();
        let fp = |k: &PrivateKey| k.public_key().fingerprint(russh::keys::HashAlg::Sha256).to_string();
        assert_eq!(a.ready.iter().map(fp).collect::<Vec<_>>(), b.ready.iter().map(fp).collect::<Vec<_>>());
        let mode = std::fs::metadata(path(&tmp.path().join("ssh"), "ed25519")).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "the private key is readable only by its owner");
    }

    #[test]
    fn a_damaged_key_is_reported_not_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("ssh")).unwrap();
        std::fs::write(path(&tmp.path().join("ssh"), "ed25519"), "garbage").unwrap();
        let e = HostKeys::load_or_create(tmp.path(), &["ed25519".to_string()]).err().unwrap();
        assert!(e.contains("cannot be read"), "{e}");
        assert_eq!(std::fs::read_to_string(path(&tmp.path().join("ssh"), "ed25519")).unwrap(), "garbage");
    }
}
