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
use crate::tls::{server_config, status_server_config, TlsError, TlsFiles};
use std::path::PathBuf;

/// TLS flags of a daemon.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct DaemonTlsArgs {
    /// CA certificate peers must chain to [default: /etc/ssl/CA.pem]
    #[arg(long = "ca-file", value_name = "PEM")]
    pub ca: Option<PathBuf>,
    /// Certificate this program presents [default: /etc/ssl/ROLE/cert.pem]
    #[arg(long = "cert-file", value_name = "PEM")]
    pub cert: Option<PathBuf>,
    /// Private key of that certificate [default: /etc/ssl/ROLE/key.pem]
    #[arg(long = "key-file", value_name = "PEM")]
    pub key: Option<PathBuf>,
    /// Serve plain HTTP when no certificate is found (development only; every caller
    /// may then call every method, and the status page says so in red)
    #[arg(long, alias = "permitInsecureMode")]
    pub permit_insecure_mode: bool,
}

/// For `#[command(mut_args = daemon_tls_help("ROLE"))]` on a command flattening
/// [`DaemonTlsArgs`]: its `--cert-file`/`--key-file` help names ROLE's real default
/// paths (`/etc/ssl/ROLE/cert.pem`) instead of a placeholder.
pub fn daemon_tls_help(role: &'static str) -> impl FnMut(clap::Arg) -> clap::Arg {
    move |arg| match arg.get_id().as_str() {
        "cert" => arg.help(format!(
            "Certificate this program presents [default: /etc/ssl/{role}/cert.pem]"
        )),
        "key" => arg.help(format!(
            "Private key of that certificate [default: /etc/ssl/{role}/key.pem]"
        )),
        _ => arg,
    }
}

/// Why a daemon cannot start securely.
#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    #[error("no TLS key pair: {0} is missing (create one with `dominator make-certs`, or pass --permit-insecure-mode for development)")]
    Missing(String),
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// Some TLS material was given or found, but not enough to use it.
    #[error("{0}")]
    Incomplete(String),
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

    /// The read-only status listener: server-side TLS with this daemon's own pair and no
    /// client certificate, or plain HTTP where the main listener is plain too.
    pub fn status_security(&self, daemon: &str) -> Result<Security, SecurityError> {
        let files = self.files(daemon);
        match self.missing(&files) {
            None => Ok(Security::Tls(status_server_config(&files)?)),
            Some(_) if self.permit_insecure_mode => Ok(Security::Insecure),
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
    /// Explicit flags, else `~/.ssl`, else plain HTTP — but only when no TLS material at
    /// all was given or found: half a configuration (a certificate without its key, a CA
    /// alone, a `~/.ssl` pair without a CA) is an error naming what is missing, never a
    /// silent fall-back to plain text.
    pub fn security(&self) -> Result<ClientSecurity, SecurityError> {
        let default_ca = || PathBuf::from("/etc/ssl/CA.pem");
        let missing = |p: &PathBuf, what: &str| {
            SecurityError::Incomplete(format!("{what} {} does not exist", p.display()))
        };
        let check = |files: TlsFiles| -> Result<ClientSecurity, SecurityError> {
            if !files.cert.exists() {
                return Err(missing(&files.cert, "client certificate"));
            }
            if !files.key.exists() {
                return Err(missing(&files.key, "client key"));
            }
            if !files.ca.exists() {
                return Err(SecurityError::Incomplete(format!(
                    "CA certificate {} does not exist (servers are verified against it; give --ca-file)",
                    files.ca.display()
                )));
            }
            Ok(ClientSecurity::Tls(files))
        };
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                return check(TlsFiles {
                    ca: self.ca.clone().unwrap_or_else(default_ca),
                    cert: cert.clone(),
                    key: key.clone(),
                })
            }
            (Some(_), None) => {
                return Err(SecurityError::Incomplete(
                    "--cert-file needs --key-file".into(),
                ))
            }
            (None, Some(_)) => {
                return Err(SecurityError::Incomplete(
                    "--key-file needs --cert-file".into(),
                ))
            }
            (None, None) => {}
        }
        if let Some(mut files) = TlsFiles::user_default() {
            if let Some(ca) = &self.ca {
                files.ca = ca.clone();
            }
            return check(files);
        }
        if self.ca.is_some() {
            return Err(SecurityError::Incomplete(
                "--ca-file given but no client certificate: give --cert-file and --key-file, or put a NAME.cert and NAME.key in ~/.ssl".into(),
            ));
        }
        Ok(ClientSecurity::Insecure)
    }
}
