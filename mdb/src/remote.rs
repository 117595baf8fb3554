//! What `mdb` asks the imageserver, when given `--image-server`: what an MDB image name
//! stands for (an image, or an image directory followed as a stream: `model::stream`).

use model::stream::Resolution;
use wire::client::{ClientError, ImageServerClient};
use wire::security::ClientTlsArgs;

/// The imageserver flags of `mdb show`, `rollback`, `set` and `add`.
#[derive(clap::Args, Debug, Default)]
pub struct ImageServerArgs {
    /// The imageserver (HOST[:PORT]): `show` says what an image name stands for,
    /// `rollback` pins a stream-following machine to the version before, `set` and `add`
    /// warn when it lacks the `--required` or `--planned` image (the edit is made all the
    /// same)
    #[arg(long, global = true, env = "IMAGE_SERVER", value_name = "HOST[:PORT]")]
    pub image_server: Option<String>,
    /// Common name the imageserver's certificate must carry (its role)
    #[arg(long, global = true, value_name = "NAME", default_value = wire::client::IMAGESERVER_NAME)]
    pub image_server_name: String,
    #[command(flatten)]
    pub tls: ClientTlsArgs,
}

/// Asking the imageserver failed.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error(transparent)]
    Security(#[from] wire::security::SecurityError),
    #[error("asking the imageserver: {0}")]
    Client(#[from] ClientError),
    #[error("starting the client runtime: {0}")]
    Runtime(#[from] std::io::Error),
}

/// What one MDB image name stands for, with the names it was resolved among.
#[derive(Debug)]
pub struct Lookup {
    pub resolution: Resolution,
    /// The live image names starting with the name.
    pub names: Vec<String>,
}

impl ImageServerArgs {
    /// Resolves each of `names` (one `ListImages` each); `None` without `--image-server`.
    pub fn lookup(&self, names: &[&str]) -> Result<Option<Vec<Lookup>>, RemoteError> {
        let Some(addr) = &self.image_server else {
            return Ok(None);
        };
        let client = ImageServerClient::with_server_name(
            addr,
            &self.tls.security()?,
            &self.image_server_name,
        )?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let out = rt.block_on(async {
            let mut out = Vec::new();
            let now = disk::clock::unix_now();
            for name in names {
                let listed = client.list_images(Some(name)).await?;
                // As the dominator does: an expired newest version is not followed.
                let resolution = match model::stream::resolve(name, &listed) {
                    Resolution::Stream { .. } => {
                        match client.newest_live(name, &listed, now).await? {
                            Some(latest) => Resolution::Stream { latest },
                            None => Resolution::Unknown,
                        }
                    }
                    other => other,
                };
                out.push(Lookup {
                    resolution,
                    names: listed,
                });
            }
            Ok::<_, ClientError>(out)
        })?;
        Ok(Some(out))
    }
}

/// One line saying what `field`'s `name` stands for: `RequiredImage NAME: image`,
/// `… image stream, newest IMAGE`, or `… no such image or image directory`.
pub fn describe(field: &str, name: &str, r: &Resolution) -> String {
    match r {
        Resolution::Exact => format!("{field} {name}: image"),
        Resolution::Stream { latest } => format!("{field} {name}: image stream, newest {latest}"),
        Resolution::Unknown => format!("{field} {name}: no such image or image directory"),
    }
}
