//! `plugvisor keygen [--out DIR] [--secret FILE] [--public FILE]`: an
//! ed25519 key pair for signing packages (offline).
use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;

/// Make an ed25519 key pair for signing packages (offline).
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Directory for `plugvisor.key` (mode 0600) and `plugvisor.pub`.
    #[arg(long, default_value = ".")]
    pub out: PathBuf,
    /// Secret key file (instead of OUT/plugvisor.key).
    #[arg(long)]
    pub secret: Option<PathBuf>,
    /// Public key file (instead of OUT/plugvisor.pub, or SECRET.pub).
    #[arg(long)]
    pub public: Option<PathBuf>,
}

/// Runs `plugvisor keygen`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    keygen(&args.out, args.secret, args.public)
}

fn keygen(
    out: &Path,
    secret: Option<PathBuf>,
    public: Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    let secret = secret.unwrap_or_else(|| out.join("plugvisor.key"));
    let public = public.unwrap_or_else(|| {
        if secret == out.join("plugvisor.key") {
            out.join("plugvisor.pub")
        } else {
            let mut p = secret.clone().into_os_string();
            p.push(".pub");
            PathBuf::from(p)
        }
    });
    for p in [&secret, &public] {
        if let Some(dir) = p
            .parent()
            .filter(|d| !d.as_os_str().is_empty() && !d.exists())
        {
            // A new directory for a secret key is private too.
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .with_context(|| format!("creating {}", dir.display()))?;
        }
    }
    let key = crate::trust::SecretKey::generate()?;
    crate::trust::write_key_pair(&key, &secret, &public)?;
    println!(
        "secret key: {} (mode 0600; keep it offline)",
        secret.display()
    );
    println!(
        "public key: {} (list it in [trust] public_keys)",
        public.display()
    );
    println!("key id:     {}", key.public().id);
    Ok(ExitCode::SUCCESS)
}
