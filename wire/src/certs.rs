//! Creating a CA and one key pair per role, with Dominator's permitted-methods extension,
//! so an operator (or a test) can start a fleet over mutual TLS in one step.
//!
//! Layout written into a directory (mirrors where the programs look by default):
//! `CA.pem` (+ `CA.key`, keep it offline), `<daemon>/cert.pem` + `<daemon>/key.pem` for
//! `imageserver`, `subd` and `dominator` (copy to `/etc/ssl/<daemon>/`), and user pairs
//! `<role>.cert` + `<role>.key` for `builder` and `admin` (copy to `~/.ssl/`), and
//! `admin.p12`: the admin pair with the CA as a PKCS#12 bundle a browser imports (password
//! `ADMIN_P12_PASSWORD`; PBES2 with AES-256 and an HMAC-SHA-256 MAC, which current
//! Chromium, Firefox and OpenSSL read).

use crate::tls::{encode_method_list, PERMITTED_METHODS_OID};
use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use std::path::Path;

/// The password of `admin.p12`, documented (README): the file's protection is its mode
/// (0600), as for `admin.key`; a non-empty password avoids the two encodings of an empty
/// one that PKCS#12 readers disagree on.
pub const ADMIN_P12_PASSWORD: &str = "fleet";

/// A role: who it is and what it may call.
pub struct Role {
    pub name: &'static str,
    /// `true`: written as `<name>/cert.pem`; `false`: as `<name>.cert` (a user's pair).
    pub daemon: bool,
    pub methods: &'static [&'static str],
}

/// The roles of the reference, with our method names.
pub const ROLES: &[Role] = &[
    Role {
        name: crate::client::IMAGESERVER_NAME,
        daemon: true,
        // What a replica calls on its master (`--replication-master`).
        methods: &[
            "ImageServer.GetReplicationState",
            "ImageServer.GetImage",
            "ObjectServer.GetObjects",
        ],
    },
    Role {
        name: crate::client::SUBD_NAME,
        daemon: true,
        methods: &["ObjectServer.GetObjects"],
    },
    Role {
        name: crate::client::DOMINATOR_NAME,
        daemon: true,
        methods: &[
            "Subd.*",
            "ImageServer.GetImage",
            "ImageServer.CheckImage",
            "ImageServer.ListImages",
            "ImageServer.GetImageExpiration",
            "ObjectServer.CheckObjects",
        ],
    },
    Role {
        name: "builder",
        daemon: false,
        methods: &[
            "ImageServer.AddImage",
            "ImageServer.CheckImage",
            "ImageServer.GetImage",
            "ImageServer.ListImages",
            // Expiry: seen, and extended (never shortened) by whoever builds images.
            "ImageServer.GetImageExpiration",
            "ImageServer.ChangeImageExpiration",
            "ObjectServer.AddObjects",
            "ObjectServer.CheckObjects",
            // `imagetool adds`: a host's tree (a full poll) and its files by hash.
            "Snapshot.GetTree",
            "Snapshot.GetObjects",
        ],
    },
    Role {
        name: "admin",
        daemon: false,
        methods: &["*.*"],
    },
];

/// Failure to create or write certificates.
#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    #[error("generating certificate: {0}")]
    Gen(#[from] rcgen::Error),
    #[error("making the PKCS#12 bundle: {0}")]
    Pkcs12(String),
    #[error("writing {path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// A CA able to sign more certificates.
pub struct Ca {
    pub cert: rcgen::Certificate,
    pub key: KeyPair,
}

fn oid() -> Vec<u64> {
    PERMITTED_METHODS_OID
        .split('.')
        .map(|c| c.parse().unwrap())
        .collect()
}

/// A new self-signed CA named `cn`.
pub fn new_ca(cn: &str) -> Result<Ca, CertsError> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name.push(DnType::CommonName, cn);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.not_before = rcgen::date_time_ymd(2024, 1, 1);
    p.not_after = rcgen::date_time_ymd(2036, 1, 1);
    let key = KeyPair::generate()?;
    let cert = p.self_signed(&key)?;
    Ok(Ca { cert, key })
}

/// A certificate for `cn` granting `methods`, valid for loopback and `extra_names`, usable
/// both as a server and as a client certificate. Returns (cert PEM, key PEM).
pub fn issue(
    ca: &Ca,
    cn: &str,
    methods: &[&str],
    extra_names: &[String],
) -> Result<(String, String), CertsError> {
    let mut names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    names.extend(extra_names.iter().cloned());
    let mut p = CertificateParams::new(names)?;
    p.distinguished_name.push(DnType::CommonName, cn);
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    p.not_before = rcgen::date_time_ymd(2024, 1, 1);
    p.not_after = rcgen::date_time_ymd(2036, 1, 1);
    if !methods.is_empty() {
        p.custom_extensions.push(CustomExtension::from_oid_content(
            &oid(),
            encode_method_list(methods),
        ));
    }
    let key = KeyPair::generate()?;
    let cert = p.signed_by(&key, &ca.cert, &ca.key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// A PKCS#12 bundle of the pair (`cert_pem`, `key_pem`) with `ca_pem` as its chain,
/// under `password` (`friendly` names the entry in a browser's certificate list).
pub fn pkcs12(
    cert_pem: &str,
    key_pem: &str,
    ca_pem: &str,
    friendly: &str,
    password: &str,
) -> Result<Vec<u8>, CertsError> {
    use p12_keystore::{Certificate, KeyStore, KeyStoreEntry, PrivateKey, PrivateKeyChain};
    let bad = |e: &dyn std::fmt::Display| CertsError::Pkcs12(e.to_string());
    let cert_der = |pem: &str| -> Result<Certificate, CertsError> {
        let der = rustls_pemfile::certs(&mut pem.as_bytes())
            .next()
            .ok_or_else(|| CertsError::Pkcs12("no certificate in PEM".into()))?
            .map_err(|e| bad(&e))?;
        Certificate::from_der(&der).map_err(|e| bad(&e))
    };
    let key = rustls_pemfile::private_key(&mut key_pem.as_bytes())
        .map_err(|e| bad(&e))?
        .ok_or_else(|| CertsError::Pkcs12("no private key in PEM".into()))?;
    let key = PrivateKey::from_der(key.secret_der()).map_err(|e| bad(&e))?;
    let chain = PrivateKeyChain::new(
        friendly.as_bytes().to_vec(),
        key,
        [cert_der(cert_pem)?, cert_der(ca_pem)?],
    );
    let mut store = KeyStore::new();
    store.add_entry(friendly, KeyStoreEntry::PrivateKeyChain(chain));
    store.writer(password).write().map_err(|e| bad(&e))
}

fn write(path: &Path, data: &str, mode: u32) -> Result<(), CertsError> {
    write_bytes(path, data.as_bytes(), mode)
}

fn write_bytes(path: &Path, data: &[u8], mode: u32) -> Result<(), CertsError> {
    use std::os::unix::fs::PermissionsExt;
    let io = |source| CertsError::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    disk::fsutil::write_atomic(path, data).map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io)
}

/// Writes a new CA and every role's pair into `dir`; `extra_names` are added to the
/// daemons' subject alternative names. Returns the paths written.
pub fn make_all(dir: &Path, extra_names: &[String]) -> Result<Vec<std::path::PathBuf>, CertsError> {
    let ca = new_ca("Fleet CA")?;
    let mut written = Vec::new();
    let mut put = |rel: String, data: &str, mode: u32| -> Result<(), CertsError> {
        let p = dir.join(rel);
        write(&p, data, mode)?;
        written.push(p);
        Ok(())
    };
    let mut admin_p12 = None;
    put("CA.pem".into(), &ca.cert.pem(), 0o644)?;
    put("CA.key".into(), &ca.key.serialize_pem(), 0o600)?;
    for role in ROLES {
        let (cert, key) = issue(
            &ca,
            role.name,
            role.methods,
            if role.daemon { extra_names } else { &[] },
        )?;
        if role.daemon {
            put(format!("{}/cert.pem", role.name), &cert, 0o644)?;
            put(format!("{}/key.pem", role.name), &key, 0o600)?;
        } else {
            put(format!("{}.cert", role.name), &cert, 0o644)?;
            put(format!("{}.key", role.name), &key, 0o600)?;
        }
        if role.name == "admin" {
            admin_p12 = Some(pkcs12(
                &cert,
                &key,
                &ca.cert.pem(),
                "fleet admin",
                ADMIN_P12_PASSWORD,
            )?);
        }
    }
    if let Some(p12) = admin_p12 {
        let p = dir.join("admin.p12");
        write_bytes(&p, &p12, 0o600)?;
        written.push(p);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::identity_of;

    #[test]
    fn issued_certificate_carries_cn_and_methods() {
        let ca = new_ca("t").unwrap();
        let (pem, _) = issue(
            &ca,
            "builder",
            &["ImageServer.AddImage", "ObjectServer.*"],
            &[],
        )
        .unwrap();
        let der = rustls_pemfile::certs(&mut pem.as_bytes())
            .next()
            .unwrap()
            .unwrap();
        let (cn, methods) = identity_of(&der);
        assert_eq!(cn, "builder");
        assert_eq!(methods, ["ImageServer.AddImage", "ObjectServer.*"]);
    }

    /// Snapshotting a host (`Snapshot.GetTree`, `Snapshot.GetObjects`) is for builders and
    /// admins only: the subd and dominator certificates must not reach it, whatever globs
    /// they carry; and the builder still may not poll a host fully as its dominator does.
    #[test]
    fn only_builder_and_admin_may_snapshot_a_host() {
        use crate::tls::glob_match;
        use model::api::methods::{SNAPSHOT_GET_OBJECTS, SNAPSHOT_GET_TREE, SUBD_POLL};
        let may = |role: &Role, method: &str| role.methods.iter().any(|g| glob_match(g, method));
        for role in ROLES {
            for method in [SNAPSHOT_GET_OBJECTS, SNAPSHOT_GET_TREE] {
                let want = role.name == "builder" || role.name == "admin";
                assert_eq!(may(role, method), want, "{} {method}", role.name);
            }
            if role.name == "builder" {
                assert!(!may(role, SUBD_POLL));
            }
        }
    }

    #[test]
    fn make_all_writes_the_layout() {
        let d = tempfile::tempdir().unwrap();
        make_all(d.path(), &[]).unwrap();
        for f in [
            "CA.pem",
            "subd/cert.pem",
            "subd/key.pem",
            "dominator/key.pem",
            "imageserver/cert.pem",
            "builder.cert",
            "admin.key",
            "admin.p12",
        ] {
            assert!(d.path().join(f).exists(), "{f}");
        }
    }

    #[test]
    fn the_admin_bundle_holds_the_admin_pair_and_the_ca() {
        let d = tempfile::tempdir().unwrap();
        make_all(d.path(), &[]).unwrap();
        let data = std::fs::read(d.path().join("admin.p12")).unwrap();
        let store = p12_keystore::KeyStore::from_pkcs12(
            &data,
            ADMIN_P12_PASSWORD,
            p12_keystore::Pkcs12ImportPolicy::Strict,
        )
        .unwrap();
        let (_, chain) = store.private_key_chain().expect("a key with its chain");
        let pem = |f: &str| std::fs::read_to_string(d.path().join(f)).unwrap();
        let der = |f: &str| {
            rustls_pemfile::certs(&mut pem(f).as_bytes())
                .next()
                .unwrap()
                .unwrap()
        };
        assert_eq!(chain.certs()[0].as_der(), der("admin.cert").as_ref());
        assert_eq!(chain.certs()[1].as_der(), der("CA.pem").as_ref());
        let key = rustls_pemfile::private_key(&mut pem("admin.key").as_bytes())
            .unwrap()
            .unwrap();
        assert_eq!(chain.key().as_der(), key.secret_der());
        assert!(p12_keystore::KeyStore::from_pkcs12(
            &data,
            "wrong",
            p12_keystore::Pkcs12ImportPolicy::Strict
        )
        .is_err());
    }
}
