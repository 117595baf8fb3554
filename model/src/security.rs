//! Command-line TLS settings shared by every program, and the one rule that turns them into
//! a `Security` (daemons) or a `ClientSecurity` (clients).
//!
//! Daemons: CA `/etc/ssl/CA.pem` and their own pair `/etc/ssl/<daemon>/{cert,key}.pem`,
//! each overridable; without them a daemon refuses to start unless
//! `--permit-insecure-mode`, which serves plain HTTP (never silently). Clients: explicit
//! flags, else the first `~/.ssl/*.cert` + `*.key` pair with `/etc/ssl/CA.pem`, else plain
//! HTTP (for a development imageserver on loopback).

use crate::client::ClientSecurity;
use crate::http::Security;
use crate::tls::{server_config, TlsError, TlsFiles};
use std::path::PathBuf;

/// TLS flags of a daemon.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct DaemonTlsArgs {
    /// CA certificate peers must chain to [default: /etc/ssl/CA.pem]
    #[arg(long = "ca-file", value_name = "PEM")]
    pub ca: Option<PathBuf>,
    /// This daemon's certificate [default: /etc/ssl/<daemon>/cert.pem]
    #[arg(long = "cert-file", value_name = "PEM")]
    pub cert: Option<PathBuf>,
    /// This daemon's private key [default: /etc/ssl/<daemon>/key.pem]
    #[arg(long = "key-file", value_name = "PEM")]
    pub key: Option<PathBuf>,
    /// Serve plain HTTP when no certificate is found (development only; every caller
    /// may then call every method, and the status page says so in red)
    #[arg(long, alias = "permitInsecureMode")]
    pub permit_insecure_mode: bool,
}

/// Why a daemon cannot start securely.
#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    #[error("no TLS key pair: {0} is missing (create one with `dominator make-certs`, or pass --permit-insecure-mode for development)")]
    Missing(String),
    #[error(transparent)]
    Tls(#[from] TlsError),
}

impl DaemonTlsArgs {
    /// The files this daemon would use.
    pub fn files(&self, daemon: &str) -> TlsFiles {
        let d = TlsFiles::daemon_default(daemon);
        TlsFiles {
            ca: self.ca.clone().unwrap_or(d.ca),
            cert: self.cert.clone().unwrap_or(d.cert),
            key: self.key.clone().unwrap_or(d.key),
        }
    }

    fn missing(&self, files: &TlsFiles) -> Option<String> {
        [&files.ca, &files.cert, &files.key]
            .into_iter()
            .find(|p| !p.exists())
            .map(|p| p.display().to_string())
    }

    /// The server side: TLS if the files exist, plain HTTP only if permitted.
    pub fn server_security(&self, daemon: &str) -> Result<Security, SecurityError> {
        let files = self.files(daemon);
        match self.missing(&files) {
            None => Ok(Security::Tls(server_config(&files)?)),
            Some(_) if self.permit_insecure_mode => {
                tracing::warn!("INSECURE MODE: serving plain HTTP without client authentication");
                Ok(Security::Insecure)
            }
            Some(m) => Err(SecurityError::Missing(m)),
        }
    }

    /// The daemon acting as a client of other daemons, with its own key pair.
    pub fn client_security(&self, daemon: &str) -> Result<ClientSecurity, SecurityError> {
        let files = self.files(daemon);
        match self.missing(&files) {
            None => Ok(ClientSecurity::Tls(files)),
            Some(_) if self.permit_insecure_mode => Ok(ClientSecurity::Insecure),
            Some(m) => Err(SecurityError::Missing(m)),
        }
    }
}

/// TLS flags of a command-line client.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct ClientTlsArgs {
    /// CA certificate servers must chain to [default: /etc/ssl/CA.pem]
    #[arg(long = "ca-file", value_name = "PEM", global = true)]
    pub ca: Option<PathBuf>,
    /// Client certificate [default: first ~/.ssl/*.cert with a matching *.key]
    #[arg(long = "cert-file", value_name = "PEM", global = true)]
    pub cert: Option<PathBuf>,
    /// Client private key [default: the *.key beside the chosen *.cert]
    #[arg(long = "key-file", value_name = "PEM", global = true)]
    pub key: Option<PathBuf>,
}

impl ClientTlsArgs {
    /// Explicit flags, else `~/.ssl`, else plain HTTP.
    pub fn security(&self) -> Result<ClientSecurity, SecurityError> {
        if let (Some(cert), Some(key)) = (&self.cert, &self.key) {
            let files = TlsFiles {
                ca: self.ca.clone().unwrap_or_else(|| "/etc/ssl/CA.pem".into()),
                cert: cert.clone(),
                key: key.clone(),
            };
            for p in [&files.ca, &files.cert, &files.key] {
                if !p.exists() {
                    return Err(SecurityError::Missing(p.display().to_string()));
                }
            }
            return Ok(ClientSecurity::Tls(files));
        }
        if let Some(mut files) = TlsFiles::user_default() {
            if let Some(ca) = &self.ca {
                files.ca = ca.clone();
            }
            if files.present() {
                return Ok(ClientSecurity::Tls(files));
            }
        }
        Ok(ClientSecurity::Insecure)
    }
}
