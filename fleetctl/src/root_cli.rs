//! `fleetctl root …`: make, rotate, sign, check and publish the root of trust (ADR 0010).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use fleetctl::trust_root::{self, RoleKeys, RootChanges};
use proto::keys::{parse_public_key, parse_secret_key};
use proto::root::{rotate, SignedRoot};

use crate::{key_text, ServerArgs};

#[derive(Subcommand)]
pub enum RootCommand {
    /// Write root 1 (unsigned) naming the keys of each role; then `fleetctl root sign` it with
    /// enough root keys and give it to agents (root_file) and the server (--root).
    Init {
        #[command(flatten)]
        roles: RoleArgs,
        /// Days until the root expires (it is then no longer accepted as a rotation).
        #[arg(long, default_value_t = 365)]
        expires_days: u64,
        #[arg(long)]
        out: PathBuf,
    },
    /// Write the next root (unsigned) from `--from`, with the roles given replaced; a key no role
    /// names any more is revoked. It needs a threshold of the old root keys and of the new.
    Rotate {
        #[arg(long)]
        from: PathBuf,
        #[command(flatten)]
        roles: RoleArgs,
        /// Days from now until the new root expires; the old expiry when omitted.
        #[arg(long)]
        expires_days: Option<u64>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Add signatures to a root file in place, one per secret key file.
    Sign {
        file: PathBuf,
        #[arg(long = "key", required = true)]
        keys: Vec<PathBuf>,
    },
    /// Check a root: the first (signed by a threshold of its own root keys), or with
    /// `--previous`, a rotation by TUF's rule.
    Verify {
        file: PathBuf,
        #[arg(long)]
        previous: Option<PathBuf>,
    },
    /// Publish a signed root to the server (admin): the first, or the next rotation.
    Publish {
        file: PathBuf,
        #[command(flatten)]
        server: ServerArgs,
    },
}

/// Keys per role: public keys as hex or .pub files.
#[derive(clap::Args)]
pub struct RoleArgs {
    /// Offline key that signs root documents; repeatable.
    #[arg(long = "root-key")]
    root_keys: Vec<String>,
    #[arg(long, default_value_t = 1)]
    root_threshold: u32,
    /// Release key that signs bundles; repeatable.
    #[arg(long = "targets-key")]
    targets_keys: Vec<String>,
    #[arg(long, default_value_t = 1)]
    targets_threshold: u32,
    /// The server's online key for freshness metadata; repeatable.
    #[arg(long = "timestamp-key")]
    timestamp_keys: Vec<String>,
    #[arg(long, default_value_t = 1)]
    timestamp_threshold: u32,
}

impl RoleArgs {
    fn changes(&self, expires: Option<u64>) -> Result<RootChanges> {
        let role = |keys: &[String], threshold: u32| -> Result<Option<RoleKeys>> {
            if keys.is_empty() {
                return Ok(None);
            }
            let keys = keys.iter().map(|k| Ok(parse_public_key(&key_text(k)?)?)).collect::<Result<Vec<_>>>()?;
            Ok(Some(RoleKeys { keys, threshold }))
        };
        Ok(RootChanges {
            root: role(&self.root_keys, self.root_threshold)?,
            targets: role(&self.targets_keys, self.targets_threshold)?,
            timestamp: role(&self.timestamp_keys, self.timestamp_threshold)?,
            expires,
        })
    }
}

fn read_root(path: &Path) -> Result<SignedRoot> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    SignedRoot::parse(&bytes).with_context(|| format!("{} is not a valid root", path.display()))
}

fn write_root(path: &Path, root: &SignedRoot) -> Result<()> {
    std::fs::write(path, root.to_json_bytes()).with_context(|| format!("cannot write {}", path.display()))
}

fn days_from_now(days: u64) -> u64 {
    fleet_server::unix_ms() / 1000 + days * 86_400
}

pub async fn run(command: RootCommand) -> Result<()> {
    match command {
        RootCommand::Init { roles, expires_days, out } => {
            let Some(root) = trust_root::first(&roles.changes(None)?, days_from_now(expires_days)) else {
                bail!("root 1 needs at least one --root-key, --targets-key and --timestamp-key");
            };
            root.signed.check()?;
            write_root(&out, &root)?;
            println!("root 1 written to {} (unsigned): sign it with `fleetctl root sign`", out.display());
        }
        RootCommand::Rotate { from, roles, expires_days, out } => {
            let previous = read_root(&from)?;
            let next = trust_root::next(&previous.signed, &roles.changes(expires_days.map(days_from_now))?);
            next.signed.check()?;
            write_root(&out, &next)?;
            println!(
                "root {} written to {} (unsigned): sign it with a threshold of root {}'s root keys and of its own",
                next.signed.version,
                out.display(),
                previous.signed.version
            );
        }
        RootCommand::Sign { file, keys } => {
            let mut root = read_root(&file)?;
            for path in &keys {
                let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
                root.sign(&parse_secret_key(&text)?);
            }
            write_root(&file, &root)?;
            println!("root {} now carries {} signature(s)", root.signed.version, root.signatures.len());
        }
        RootCommand::Verify { file, previous } => {
            let root = read_root(&file)?;
            let accepted = match previous {
                None => root.verify_initial()?,
                Some(previous) => {
                    let previous = read_root(&previous)?.verify_initial()?;
                    rotate(&previous, &root, fleet_server::unix_ms() / 1000)?
                }
            };
            let role = |r: &proto::root::Role| format!("{} of {}", r.threshold, r.keyids.len());
            println!(
                "root {} verifies: root {}, targets {}, timestamp {}; expires at {} (unix seconds)",
                accepted.version,
                role(&accepted.roles.root),
                role(&accepted.roles.targets),
                role(&accepted.roles.timestamp),
                accepted.expires
            );
        }
        RootCommand::Publish { file, server } => {
            let bytes = std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let info = server.client()?.publish_root(bytes).await?;
            println!("root {} published; devices rotate to it at their next check-in", info.version);
        }
    }
    Ok(())
}
