//! TLS on the same port as plain HTTP: the first byte of a connection tells
//! a TLS ClientHello (0x16) from an HTTP request line. Certificates are
//! generated once (`auto`: a local certificate authority and a server
//! certificate signed by it, kept in the data directory) or read from the
//! operator's files, reloaded when they change.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use tokio::net::TcpStream;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {message}")]
    Read { path: String, message: String },
    #[error("{path} holds no usable {what}")]
    Empty { path: String, what: &'static str },
    #[error("cannot generate a certificate: {0}")]
    Generate(String),
    #[error("the certificate and key do not fit together: {0}")]
    Config(String),
}

/// Where the certificate comes from.
#[derive(Debug, Clone)]
pub enum CertSource {
    /// Generate (once) a CA and server certificate in this directory.
    Auto {
        dir: PathBuf,
        names: Vec<String>,
    },
    Files {
        cert: PathBuf,
        key: PathBuf,
    },
}

/// The current TLS configuration, swappable on reload.
pub struct TlsState {
    source: CertSource,
    config: ArcSwap<rustls::ServerConfig>,
    loaded_mtime: std::sync::Mutex<Option<SystemTime>>,
    /// SHA-256 fingerprint of the CA (auto) or server certificate (files).
    pub fingerprint: String,
    /// The CA certificate (PEM), for clients to trust, in `auto` mode.
    pub ca_pem: Option<String>,
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::Read { path: path.display().to_string(), message: e.to_string() })
}

fn parse_pem(
    cert_pem: &[u8],
    key_pem: &[u8],
    cert_path: &str,
    key_path: &str,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let certs: Vec<CertificateDer<'static>> =
        rustls_pemfile::certs(&mut &cert_pem[..]).filter_map(Result::ok).collect();
    if certs.is_empty() {
        return Err(TlsError::Empty { path: cert_path.into(), what: "PEM certificate" });
    }
    let key = rustls_pemfile::private_key(&mut &key_pem[..])
        .ok()
        .flatten()
        .ok_or_else(|| TlsError::Empty { path: key_path.into(), what: "PEM private key" })?;
    Ok((certs, key))
}

fn server_config(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<rustls::ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

fn fingerprint(der: &[u8]) -> String {
    Sha256::digest(der).iter().map(|b| format!("{b:02X}")).collect::<Vec<_>>().join(":")
}

/// The names a generated authority may vouch for: the hub's DNS names (and
/// their subdomains, for app hosts) and its addresses.
fn name_constraints(names: &[String]) -> rcgen::NameConstraints {
    let permitted = names
        .iter()
        .filter_map(|n| match n.parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V4(_)) => format!("{n}/32").parse().ok().map(rcgen::GeneralSubtree::IpAddress),
            Ok(std::net::IpAddr::V6(_)) => format!("{n}/128").parse().ok().map(rcgen::GeneralSubtree::IpAddress),
            Err(_) => Some(rcgen::GeneralSubtree::DnsName(n.trim_start_matches("*.").to_string())),
        })
        .collect();
    rcgen::NameConstraints { permitted_subtrees: permitted, excluded_subtrees: Vec::new() }
}

/// Creates the CA and server certificate in `dir` unless they exist.
fn ensure_auto(dir: &Path, names: &[String]) -> Result<(), TlsError> {
    let ca_cert = dir.join("ca.pem");
    let cert = dir.join("server.pem");
    let key = dir.join("server-key.pem");
    if ca_cert.is_file() && cert.is_file() && key.is_file() {
        return Ok(());
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| TlsError::Read { path: dir.display().to_string(), message: e.to_string() })?;
    let gen = |e: rcgen::Error| TlsError::Generate(e.to_string());
    let ca_key = rcgen::KeyPair::generate().map_err(gen)?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(gen)?;
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "berth local certificate authority");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
    ca_params.not_after = rcgen::date_time_ymd(2045, 1, 1);
    // The authority vouches for the hub's own names and nothing else, so
    // trusting it cannot let anyone impersonate another site.
    ca_params.name_constraints = Some(name_constraints(names));
    let ca = ca_params.self_signed(&ca_key).map_err(gen)?;

    let server_key = rcgen::KeyPair::generate().map_err(gen)?;
    let mut params = rcgen::CertificateParams::new(names.to_vec()).map_err(gen)?;
    params.distinguished_name.push(rcgen::DnType::CommonName, names.first().cloned().unwrap_or_else(|| "berth".into()));
    params.not_after = rcgen::date_time_ymd(2045, 1, 1);
    let server = params.signed_by(&server_key, &ca, &ca_key).map_err(gen)?;

    let write = |p: &Path, data: &str, secret: bool| -> Result<(), TlsError> {
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        if secret {
            std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        }
        use std::io::Write;
        opts.open(p)
            .and_then(|mut f| f.write_all(data.as_bytes()))
            .map_err(|e| TlsError::Read { path: p.display().to_string(), message: e.to_string() })
    };
    // The authority's key is not kept: it signed the one server certificate
    // it exists for (new names make a new authority), so nothing on this
    // machine can sign with it again.
    let _ = std::fs::remove_file(dir.join("ca-key.pem"));
    drop(ca_key);
    write(&ca_cert, &ca.pem(), false)?;
    write(&key, &server_key.serialize_pem(), true)?;
    // Chain: server certificate then the CA.
    write(&cert, &format!("{}{}", server.pem(), ca.pem()), false)?;
    Ok(())
}

impl TlsState {
    pub fn load(source: CertSource) -> Result<TlsState, TlsError> {
        let (cert_path, key_path, ca_path) = match &source {
            CertSource::Auto { dir, names } => {
                ensure_auto(dir, names)?;
                (dir.join("server.pem"), dir.join("server-key.pem"), Some(dir.join("ca.pem")))
            }
            CertSource::Files { cert, key } => (cert.clone(), key.clone(), None),
        };
        let (certs, key) = parse_pem(
            &read(&cert_path)?,
            &read(&key_path)?,
            &cert_path.display().to_string(),
            &key_path.display().to_string(),
        )?;
        let ca_pem = match &ca_path {
            Some(p) => Some(String::from_utf8_lossy(&read(p)?).into_owned()),
            None => None,
        };
        let fp_der = match &ca_pem {
            Some(pem) => rustls_pemfile::certs(&mut pem.as_bytes()).filter_map(Result::ok).next().map(|c| c.to_vec()),
            None => certs.first().map(|c| c.to_vec()),
        }
        .unwrap_or_default();
        let config = server_config(certs, key)?;
        let mtime = std::fs::metadata(&cert_path).and_then(|m| m.modified()).ok();
        Ok(TlsState {
            source,
            config: ArcSwap::from_pointee(config),
            loaded_mtime: std::sync::Mutex::new(mtime),
            fingerprint: fingerprint(&fp_der),
            ca_pem,
        })
    }

    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.config.load_full())
    }

    /// Re-reads the operator's files; `force` ignores modification times
    /// (SIGHUP). A broken new pair keeps the old one and returns the error.
    pub fn reload(&self, force: bool) -> Result<bool, TlsError> {
        let CertSource::Files { cert, key } = &self.source else { return Ok(false) };
        let mtime = std::fs::metadata(cert).and_then(|m| m.modified()).ok();
        if !force {
            let last = self.loaded_mtime.lock().map(|m| *m).unwrap_or(None);
            if mtime == last {
                return Ok(false);
            }
        }
        let (certs, k) = parse_pem(&read(cert)?, &read(key)?, &cert.display().to_string(), &key.display().to_string())?;
        self.config.store(Arc::new(server_config(certs, k)?));
        if let Ok(mut m) = self.loaded_mtime.lock() {
            *m = mtime;
        }
        Ok(true)
    }
}

/// Whether the connection starts with a TLS handshake record.
pub async fn peek_is_tls(stream: &TcpStream) -> std::io::Result<bool> {
    let mut buf = [0u8; 1];
    let n = stream.peek(&mut buf).await?;
    Ok(n == 1 && buf[0] == 0x16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_generates_once_and_reloads_files() {
        let dir = tempfile::tempdir().unwrap();
        let a = TlsState::load(CertSource::Auto {
            dir: dir.path().into(),
            names: vec!["localhost".into(), "127.0.0.1".into()],
        })
        .unwrap();
        let b = TlsState::load(CertSource::Auto { dir: dir.path().into(), names: vec!["localhost".into()] }).unwrap();
        assert_eq!(a.fingerprint, b.fingerprint, "the CA is made once and kept");
        assert!(a.ca_pem.as_deref().unwrap().contains("BEGIN CERTIFICATE"));

        let files = TlsState::load(CertSource::Files {
            cert: dir.path().join("server.pem"),
            key: dir.path().join("server-key.pem"),
        })
        .unwrap();
        assert!(files.reload(true).unwrap());
        std::fs::write(dir.path().join("server.pem"), "garbage").unwrap();
        assert!(files.reload(true).is_err(), "a broken file is reported and the old pair kept");
        assert!(matches!(
            TlsState::load(CertSource::Files {
                cert: dir.path().join("nope.pem"),
                key: dir.path().join("server-key.pem")
            }),
            Err(TlsError::Read { .. })
        ));
    }
}
