//! `plugvisor pack DIR [--key FILE] …`: write or update a package
//! (library, `plugin.toml`, signature), the manifest renamed into place
//! last (offline).
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;

/// Write or update the package in DIR: library, plugin.toml, and with
/// --key the signature (offline). The manifest is renamed into place last.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The package directory (created if missing).
    pub dir: PathBuf,
    /// The library (default: the one the manifest names, else the only *.so in DIR).
    #[arg(long)]
    pub library: Option<PathBuf>,
    /// Sign with this secret key (from `plugvisor keygen`).
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// Plugin name (default: the library's descriptor).
    #[arg(long)]
    pub name: Option<String>,
    /// Version (default: the library's descriptor).
    #[arg(long)]
    pub version: Option<semver::Version>,
    /// Plugin ABI (default: the library's descriptor).
    #[arg(long)]
    pub abi: Option<u32>,
    /// A requirement, NAME=RANGE (repeatable; replaces the manifest's [requires]).
    #[arg(long = "requires", value_name = "NAME=RANGE")]
    pub requires: Vec<String>,
    /// A plugin this one conflicts with (repeatable; replaces `conflicts`).
    #[arg(long = "conflicts", value_name = "NAME")]
    pub conflicts: Vec<String>,
}

/// Runs `plugvisor pack`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let requires = if args.requires.is_empty() {
        None
    } else {
        Some(parse_requires(&args.requires)?)
    };
    let options = crate::pack::PackOptions {
        library: args.library,
        name: args.name,
        version: args.version,
        abi: args.abi,
        requires,
        conflicts: (!args.conflicts.is_empty()).then_some(args.conflicts),
        key: args
            .key
            .map(|k| crate::trust::read_secret_key(&k))
            .transpose()?,
    };
    pack(&args.dir, options)
}

fn parse_requires(items: &[String]) -> anyhow::Result<BTreeMap<String, semver::VersionReq>> {
    items
        .iter()
        .map(|item| {
            let (name, range) = item
                .split_once('=')
                .with_context(|| format!("--requires {item:?}: expected NAME=RANGE"))?;
            let range = semver::VersionReq::parse(range.trim())
                .with_context(|| format!("--requires {item:?}: {range:?} is not a semver range"))?;
            Ok((name.trim().to_owned(), range))
        })
        .collect()
}

fn pack(dir: &Path, options: crate::pack::PackOptions) -> anyhow::Result<ExitCode> {
    let packed =
        crate::pack::pack(dir, options).with_context(|| format!("packing {}", dir.display()))?;
    let m = &packed.manifest;
    println!(
        "packed {} {} in {}: library {} (sha256 {})",
        m.name,
        m.version,
        dir.display(),
        m.library,
        m.sha256
    );
    match &packed.key_id {
        Some(id) => println!("signed by key {id} ({})", crate::trust::SIGNATURE_FILE),
        None => println!("unsigned"),
    }
    Ok(ExitCode::SUCCESS)
}
