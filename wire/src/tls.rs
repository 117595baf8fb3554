//! Mutual TLS: loading the CA and key pairs, building rustls configurations, and reading a
//! peer certificate's identity (common name) and permitted methods (Dominator's X.509
//! extension OID 1.3.6.1.4.1.9586.100.7.1, a SEQUENCE of UTF8String `Service.Method` globs).
//!
//! Servers require a client certificate signed by the CA. Clients verify that the server's
//! certificate chains to the CA and names the role they expect (its common name, such as
//! `imageserver` or `subd`), but not its host name: a fleet shares one subd certificate, as
//! in Dominator, so trust comes from the CA signature and the role.

use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// OID of the permitted-methods extension.
pub const PERMITTED_METHODS_OID: &str = "1.3.6.1.4.1.9586.100.7.1";

/// Failure to load or use TLS material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {what}")]
    Bad { path: PathBuf, what: String },
    #[error("TLS configuration: {0}")]
    Config(String),
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// All certificates in a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let data = read(path)?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut data.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Bad {
            path: path.to_path_buf(),
            what: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Bad {
            path: path.to_path_buf(),
            what: "no PEM certificate found".into(),
        });
    }
    Ok(certs)
}

/// The first private key in a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let data = read(path)?;
    rustls_pemfile::private_key(&mut data.as_slice())
        .map_err(|e| TlsError::Bad {
            path: path.to_path_buf(),
            what: e.to_string(),
        })?
        .ok_or_else(|| TlsError::Bad {
            path: path.to_path_buf(),
            what: "no PEM private key found".into(),
        })
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(ca: &Path) -> Result<rustls::RootCertStore, TlsError> {
    let mut store = rustls::RootCertStore::empty();
    for c in load_certs(ca)? {
        store.add(c).map_err(|e| TlsError::Bad {
            path: ca.to_path_buf(),
            what: e.to_string(),
        })?;
    }
    Ok(store)
}

/// Where a program's TLS material lives.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    /// Dominator's defaults for a daemon: `/etc/ssl/CA.pem`, `/etc/ssl/<daemon>/{cert,key}.pem`.
    pub fn daemon_default(daemon: &str) -> TlsFiles {
        TlsFiles {
            ca: "/etc/ssl/CA.pem".into(),
            cert: format!("/etc/ssl/{daemon}/cert.pem").into(),
            key: format!("/etc/ssl/{daemon}/key.pem").into(),
        }
    }

    /// A user's pair from `~/.ssl`: the first `*.cert` with a matching `*.key`.
    pub fn user_default() -> Option<TlsFiles> {
        let home = std::env::var_os("HOME")?;
        let dir = Path::new(&home).join(".ssl");
        let mut certs: Vec<PathBuf> = std::fs::read_dir(&dir)
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "cert"))
            .collect();
        certs.sort();
        let cert = certs
            .into_iter()
            .find(|c| c.with_extension("key").exists())?;
        Some(TlsFiles {
            ca: "/etc/ssl/CA.pem".into(),
            key: cert.with_extension("key"),
            cert,
        })
    }

    /// True when all three files exist.
    pub fn present(&self) -> bool {
        self.ca.exists() && self.cert.exists() && self.key.exists()
    }
}

/// A server configuration that demands client certificates signed by the CA.
pub fn server_config(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let roots = Arc::new(roots(&files.ca)?);
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(&files.cert)?, load_key(&files.key)?)
        .map_err(|e| TlsError::Config(format!("{}: {e}", files.cert.display())))?;
    Ok(Arc::new(cfg))
}

/// A server configuration asking for no client certificate: the read-only status
/// listener (`--status-listen`), which a browser or a metrics scraper reads with only
/// the fleet CA to trust. Whoever connects is an anonymous caller with no grants.
pub fn status_server_config(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(load_certs(&files.cert)?, load_key(&files.key)?)
        .map_err(|e| TlsError::Config(format!("{}: {e}", files.cert.display())))?;
    Ok(Arc::new(cfg))
}

/// A client configuration presenting `files.cert` and trusting only servers whose
/// certificate is signed by `files.ca` and has the common name `server_name` (the server's
/// role, such as `imageserver`).
pub fn client_config(
    files: &TlsFiles,
    server_name: &str,
) -> Result<rustls::ClientConfig, TlsError> {
    let roots = Arc::new(roots(&files.ca)?);
    let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(RoleVerifier {
            inner,
            expected: server_name.to_string(),
        }))
        .with_client_auth_cert(load_certs(&files.cert)?, load_key(&files.key)?)
        .map_err(|e| TlsError::Config(format!("{}: {e}", files.cert.display())))?;
    Ok(cfg)
}

/// A server certificate of the wrong role: signed by the CA, but issued to another role.
#[derive(Debug, thiserror::Error)]
#[error("the server's certificate is for {actual:?}, expected {expected:?} (is the server started with another role's key pair, or the address wrong?)")]
pub struct WrongRole {
    pub expected: String,
    pub actual: String,
}

/// Verifies the chain to the CA and the end-entity common name (the role), accepting any
/// host name.
#[derive(Debug)]
struct RoleVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    expected: String,
}

impl rustls::client::danger::ServerCertVerifier for RoleVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        match self
            .inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Ok(_)
            | Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))
            | Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForNameContext { .. },
            )) => {}
            Err(e) => return Err(e),
        }
        let (actual, _) = identity_of(end_entity);
        if actual != self.expected {
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Other(rustls::OtherError(Arc::new(WrongRole {
                    expected: self.expected.clone(),
                    actual,
                }))),
            ));
        }
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The identity and grants read from a verified peer certificate.
pub fn identity_of(cert_der: &[u8]) -> (String, Vec<String>) {
    use x509_parser::prelude::*;
    let Ok((_, cert)) = X509Certificate::from_der(cert_der) else {
        return (String::new(), Vec::new());
    };
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|c| c.as_str().ok())
        .unwrap_or("")
        .to_string();
    let mut methods = Vec::new();
    for ext in cert.extensions() {
        if ext.oid.to_id_string() == PERMITTED_METHODS_OID {
            methods = parse_method_list(ext.value);
        }
    }
    (cn, methods)
}

/// Decodes a DER SEQUENCE of UTF8String (or other string types).
pub fn parse_method_list(der: &[u8]) -> Vec<String> {
    use x509_parser::der_parser::ber::BerObjectContent;
    let Ok((_, obj)) = x509_parser::der_parser::parse_der(der) else {
        return Vec::new();
    };
    let BerObjectContent::Sequence(items) = obj.content else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|i| match &i.content {
            BerObjectContent::UTF8String(s)
            | BerObjectContent::PrintableString(s)
            | BerObjectContent::IA5String(s) => Some(s.to_string()),
            _ => None,
        })
        .collect()
}

/// Encodes a method list as the extension's DER value.
pub fn encode_method_list(methods: &[&str]) -> Vec<u8> {
    let mut body = Vec::new();
    for m in methods {
        body.push(0x0c);
        der_len(&mut body, m.len());
        body.extend_from_slice(m.as_bytes());
    }
    let mut out = vec![0x30];
    der_len(&mut out, body.len());
    out.extend(body);
    out
}

fn der_len(out: &mut Vec<u8>, n: usize) {
    if n < 0x80 {
        out.push(n as u8);
    } else {
        let bytes: Vec<u8> = n
            .to_be_bytes()
            .iter()
            .copied()
            .skip_while(|&b| b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend(bytes);
    }
}

/// Shell-style glob match (`*` any run, `?` one character), as Dominator's method grants.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti, mut star, mut mark) = (0, 0, None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("Subd.*", "Subd.Update"));
        assert!(glob_match("*.*", "ImageServer.AddImage"));
        assert!(!glob_match("Subd.*", "ImageServer.AddImage"));
        assert!(glob_match("ImageServer.AddImage", "ImageServer.AddImage"));
        assert!(!glob_match("ImageServer.Add", "ImageServer.AddImage"));
        assert!(glob_match("Image?erver.*", "ImageServer.X"));
    }

    #[test]
    fn method_list_round_trip() {
        let long = "x".repeat(200);
        let der = encode_method_list(&["Subd.*", "ImageServer.GetImage", &long]);
        assert_eq!(
            parse_method_list(&der),
            ["Subd.*", "ImageServer.GetImage", long.as_str()]
        );
    }
}
