//! `plugvisor verify DIR [--config FILE] [--public-key FILE]…`: the
//! daemon's own checks on a package directory, without a daemon.
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;

use crate::config::Config;

/// Check the package in DIR as the daemon would (offline); exit 0 if it
/// would be accepted.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The package directory.
    pub dir: PathBuf,
    /// Trust settings and state (for the downgrade check) from this config.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Trust this public key (repeatable); a signature is then required.
    #[arg(long = "public-key", value_name = "FILE")]
    pub public_keys: Vec<PathBuf>,
}

/// Runs `plugvisor verify`.
pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    verify(&args.dir, args.config.as_ref(), &args.public_keys)
}

fn verify(dir: &Path, config: Option<&PathBuf>, keys: &[PathBuf]) -> anyhow::Result<ExitCode> {
    use crate::trust::{TrustPolicy, Verdict};
    let (policy, store) = match config {
        Some(path) => {
            let config = Config::load(path)?;
            let mut policy =
                TrustPolicy::load(&config.trust.public_keys, config.trust.require_signature)?;
            if !keys.is_empty() {
                policy = with_keys(&policy, keys, true)?;
            }
            (policy, crate::store::Store::existing(&config.state_dir))
        }
        None => (
            with_keys(&TrustPolicy::default(), keys, !keys.is_empty())?,
            None,
        ),
    };
    let v = crate::pack::verify(dir, &policy, store.as_ref())
        .with_context(|| format!("verify {}: refused", dir.display()))?;
    let signed = match &v.verdict {
        Verdict::Signed { key_id } => format!("signed by trusted key {key_id}"),
        Verdict::Unsigned => "unsigned (no signature required)".to_owned(),
        Verdict::Unchecked => "signature present but not checked (no keys given)".to_owned(),
    };
    println!(
        "{}: {} {} would be accepted: manifest valid, library sha256 matches, \
         ELF shared object with descriptor {} {} (ABI {}), {signed}{}",
        dir.display(),
        v.manifest.name,
        v.manifest.version,
        v.identity.name,
        v.identity.version,
        v.identity.abi,
        if store.is_some() {
            ", not a downgrade"
        } else {
            ""
        }
    );
    for note in &v.notes {
        println!("note: {note}");
    }
    Ok(ExitCode::SUCCESS)
}

/// `policy` with the keys in `files` added.
fn with_keys(
    policy: &crate::trust::TrustPolicy,
    files: &[PathBuf],
    require: bool,
) -> anyhow::Result<crate::trust::TrustPolicy> {
    let mut keys = policy.keys().to_vec();
    for f in files {
        keys.push(crate::trust::read_public_key(f)?);
    }
    Ok(crate::trust::TrustPolicy::new(
        keys,
        require || policy.require_signature(),
    ))
}
