//! Creating a CA and one key pair per role, with Dominator's permitted-methods extension,
//! so an operator (or a test) can start a fleet over mutual TLS in one step.
//!
//! Layout written into a directory (mirrors where the programs look by default):
//! `CA.pem` (+ `CA.key`, keep it offline), `<daemon>/cert.pem` + `<daemon>/key.pem` for
//! `imageserver`, `subd` and `dominator` (copy to `/etc/ssl/<daemon>/`), and user pairs
//! `<role>.cert` + `<role>.key` for `builder` and `admin` (copy to `~/.ssl/`).

use crate::tls::{encode_method_list, PERMITTED_METHODS_OID};
use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use std::path::Path;

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
        methods: &[],
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

fn write(path: &Path, data: &str, mode: u32) -> Result<(), CertsError> {
    use std::os::unix::fs::PermissionsExt;
    let io = |source| CertsError::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    disk::fsutil::write_atomic(path, data.as_bytes()).map_err(io)?;
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
        ] {
            assert!(d.path().join(f).exists(), "{f}");
        }
    }
}
