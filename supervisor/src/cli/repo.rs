//! `plugvisor repo init | add | publish | rollback | rotate-root DIR …`: the fleet's TUF
//! repository, made and signed offline (`fleet::repo`); `DIR/metadata` and
//! `DIR/targets` are what a web server serves.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;

use crate::fleet::release::{NodeSelector, Release, Wave};
use crate::fleet::repo::{self, Expiry, Published, RootSigned};

/// Create, stage, publish and roll back releases in a TUF repository
/// (offline).
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    verb: Verb,
}

#[derive(Debug, clap::Subcommand)]
enum Verb {
    /// Make the keys (or use those in KEYDIR), a signed root and the first,
    /// empty, targets, snapshot and timestamp.
    Init(InitArgs),
    /// Stage the package in PACKAGE_DIR as a release (published by `publish`).
    Add(AddArgs),
    /// Sign and write a new targets, snapshot and timestamp listing every
    /// release; with nothing new, renews their expiry (run it from cron).
    Publish(PublishArgs),
    /// Publish PLUGIN's release VERSION again as its newest, without waves.
    Rollback(RollbackArgs),
    /// Replace every key: new keys in NEWKEYDIR, root N+1 listing them signed
    /// by the old and the new root key, and new metadata signed with them.
    /// Nodes keep their 1.root.json; publish with --keys NEWKEYDIR afterwards.
    RotateRoot(RotateRootArgs),
    /// Write root N+1 listing the keys of NEWKEYDIR, signed by exactly the
    /// --sign-with key files (a root nodes take needs the current root key
    /// and the new one: `rotate-root` does that). Publishes nothing.
    #[command(hide = true)]
    SignRoot(SignRootArgs),
}

/// Where the repository and its keys are.
#[derive(Debug, clap::Args)]
struct RepoDir {
    /// The repository directory.
    dir: PathBuf,
    /// The key directory (default: DIR/keys).
    #[arg(long, value_name = "KEYDIR")]
    keys: Option<PathBuf>,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
}

impl RepoDir {
    fn keys(&self) -> PathBuf {
        self.keys
            .clone()
            .unwrap_or_else(|| repo::default_keys(&self.dir))
    }
}

#[derive(Debug, clap::Args)]
struct InitArgs {
    #[command(flatten)]
    repo: RepoDir,
    /// How long the root stays valid.
    #[arg(long, default_value = "365d", value_name = "DURATION", value_parser = humantime::parse_duration)]
    root_expires: Duration,
}

#[derive(Debug, clap::Args)]
struct AddArgs {
    /// The repository directory.
    dir: PathBuf,
    /// The package directory (plugin.toml, its library, plugin.toml.sig if signed).
    package: PathBuf,
    /// Only for these nodes (comma-separated names).
    #[arg(long, value_delimiter = ',', value_name = "NAME,...")]
    names: Vec<String>,
    /// Only for nodes with this label (repeatable; all must match).
    #[arg(long = "label", value_name = "KEY=VALUE")]
    labels: Vec<String>,
    /// A wave: nodes whose seed is below SEEDS_BELOW (1..=2048) take it from
    /// TIME (repeatable; none: every node at once).
    #[arg(long = "wave", value_name = "SEEDS_BELOW@RFC3339")]
    waves: Vec<String>,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
}

/// How long the new metadata stays valid.
#[derive(Debug, clap::Args)]
struct ExpiryArgs {
    /// How long the new targets.json stays valid.
    #[arg(long = "targets-expires", default_value = "30d", value_name = "DURATION", value_parser = humantime::parse_duration)]
    targets: Duration,
    /// How long the new snapshot.json stays valid.
    #[arg(long = "snapshot-expires", default_value = "7d", value_name = "DURATION", value_parser = humantime::parse_duration)]
    snapshot: Duration,
    /// How long the new timestamp.json stays valid: publish again before then.
    #[arg(long = "timestamp-expires", default_value = "1d", value_name = "DURATION", value_parser = humantime::parse_duration)]
    timestamp: Duration,
}

impl ExpiryArgs {
    fn expiry(&self) -> Expiry {
        Expiry {
            targets: self.targets,
            snapshot: self.snapshot,
            timestamp: self.timestamp,
        }
    }
}

#[derive(Debug, clap::Args)]
struct PublishArgs {
    #[command(flatten)]
    repo: RepoDir,
    #[command(flatten)]
    expiry: ExpiryArgs,
}

#[derive(Debug, clap::Args)]
struct RollbackArgs {
    #[command(flatten)]
    repo: RepoDir,
    /// The plugin.
    plugin: String,
    /// The release to publish again.
    #[arg(long = "to", value_name = "VERSION")]
    to: semver::Version,
    #[command(flatten)]
    expiry: ExpiryArgs,
}

#[derive(Debug, clap::Args)]
struct RotateRootArgs {
    #[command(flatten)]
    repo: RepoDir,
    /// Where the new keys go (made unless all four are there already).
    #[arg(long, value_name = "NEWKEYDIR")]
    new_keys: PathBuf,
    /// How long the new root stays valid.
    #[arg(long, default_value = "365d", value_name = "DURATION", value_parser = humantime::parse_duration)]
    root_expires: Duration,
}

#[derive(Debug, clap::Args)]
struct SignRootArgs {
    /// The repository directory.
    dir: PathBuf,
    /// The keys the new root lists (made unless all four are there already).
    #[arg(long, value_name = "NEWKEYDIR")]
    new_keys: PathBuf,
    /// A root key file to sign the new root with (repeatable, at least one).
    #[arg(long = "sign-with", value_name = "KEYFILE", required = true)]
    sign_with: Vec<PathBuf>,
    /// How long the new root stays valid.
    #[arg(long, default_value = "365d", value_name = "DURATION", value_parser = humantime::parse_duration)]
    root_expires: Duration,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
}

/// Runs `plugvisor repo`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    match args.verb {
        Verb::Init(a) => init(&a),
        Verb::Add(a) => add(a),
        Verb::Publish(a) => {
            let published = repo::publish(&a.repo.dir, &a.repo.keys(), &a.expiry.expiry())?;
            print_published(&published, a.repo.json)
        }
        Verb::Rollback(a) => {
            let published = repo::rollback(
                &a.repo.dir,
                &a.repo.keys(),
                &a.plugin,
                &a.to,
                &a.expiry.expiry(),
            )?;
            if !a.repo.json {
                println!("{} {} is the newest release again", a.plugin, a.to);
            }
            print_published(&published, a.repo.json)
        }
        Verb::RotateRoot(a) => rotate_root(&a),
        Verb::SignRoot(a) => {
            let signed = repo::sign_root(&a.dir, &a.new_keys, &a.sign_with, a.root_expires)?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&signed)?);
            } else {
                describe_root(&signed);
                if !signed.accepted {
                    eprintln!(
                        "warning: {} is not signed by the root key {} lists and its own: nodes will refuse it",
                        signed.root.display(),
                        signed.previous.display()
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn rotate_root(a: &RotateRootArgs) -> anyhow::Result<ExitCode> {
    let rotated = repo::rotate_root(&a.repo.dir, &a.repo.keys(), &a.new_keys, a.root_expires)?;
    if a.repo.json {
        println!("{}", serde_json::to_string_pretty(&rotated)?);
        return Ok(ExitCode::SUCCESS);
    }
    describe_root(&rotated.root);
    println!(
        "  nodes keep {}: they walk to root v{} on their next poll",
        a.repo.dir.join("metadata").join(repo::FIRST_ROOT).display(),
        rotated.root.version
    );
    println!(
        "  publish with --keys {} from now on; move {} and the old key directory offline",
        a.new_keys.display(),
        a.new_keys.join("root.pem").display()
    );
    print_published(&rotated.published, false)
}

fn describe_root(r: &RootSigned) {
    let made = if r.reused_keys {
        "used"
    } else {
        "made (mode 0600)"
    };
    println!("keys {made} in {}:", r.keys.display());
    for (role, id) in &r.key_ids {
        println!("  {role:<9} {id}");
    }
    println!(
        "root:    {} (v{}, expires {}), signed by {}",
        r.root.display(),
        r.version,
        r.root_expires,
        r.signed_by.join(", ")
    );
}

fn init(a: &InitArgs) -> anyhow::Result<ExitCode> {
    let keys = a.repo.keys();
    let report = repo::init(&a.repo.dir, &keys, a.root_expires)?;
    if a.repo.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    let made = if report.reused_keys {
        "used"
    } else {
        "made (mode 0600)"
    };
    println!("keys {made} in {}:", keys.display());
    for (role, id) in &report.key_ids {
        println!("  {role:<9} {id}");
    }
    println!(
        "root:    {} (expires {})",
        report.root.display(),
        report.root_expires
    );
    println!("  give this file to every node out of band ([sync] root);");
    println!(
        "  then move {} offline: publish does not need it",
        keys.join("root.pem").display()
    );
    print_published(&report.published, false)
}

fn add(a: AddArgs) -> anyhow::Result<ExitCode> {
    let labels = a
        .labels
        .iter()
        .map(|l| {
            let (k, v) = l
                .split_once('=')
                .with_context(|| format!("--label {l:?}: expected KEY=VALUE"))?;
            Ok((k.trim().to_owned(), v.trim().to_owned()))
        })
        .collect::<anyhow::Result<BTreeMap<_, _>>>()?;
    let waves = a
        .waves
        .iter()
        .map(|w| parse_wave(w))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let nodes = NodeSelector {
        names: a.names.into_iter().filter(|n| !n.is_empty()).collect(),
        labels,
    };
    let release = repo::add(&a.dir, &a.package, nodes, waves)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&release)?);
    } else {
        describe(&release);
        println!(
            "staged in {}; `plugvisor repo publish {}` publishes it",
            a.dir.join(repo::RELEASES_FILE).display(),
            a.dir.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn parse_wave(text: &str) -> anyhow::Result<Wave> {
    let (seeds, start) = text
        .split_once('@')
        .with_context(|| format!("--wave {text:?}: expected SEEDS_BELOW@RFC3339"))?;
    let seeds_below = seeds
        .trim()
        .parse()
        .with_context(|| format!("--wave {text:?}: {seeds:?} is not a number of seeds"))?;
    let start = start
        .trim()
        .parse()
        .with_context(|| format!("--wave {text:?}: {start:?} is not an RFC 3339 time"))?;
    Ok(Wave { seeds_below, start })
}

fn describe(r: &Release) {
    let mut who = Vec::new();
    if !r.nodes.names.is_empty() {
        who.push(format!("nodes {}", r.nodes.names.join(",")));
    }
    for (k, v) in &r.nodes.labels {
        who.push(format!("{k}={v}"));
    }
    let who = if who.is_empty() {
        "every node".to_owned()
    } else {
        who.join(" ")
    };
    let when = if r.waves.is_empty() {
        "at once".to_owned()
    } else {
        r.waves
            .iter()
            .map(|w| format!("seeds < {} from {}", w.seeds_below, w.start))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "{} {} (sequence {}) for {who}, {when}",
        r.plugin, r.version, r.sequence
    );
}

fn print_published(p: &Published, json: bool) -> anyhow::Result<ExitCode> {
    if json {
        println!("{}", serde_json::to_string_pretty(p)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "published targets v{} (expires {}), snapshot v{} (expires {}), timestamp v{} (expires {})",
        p.targets_version,
        p.targets_expires,
        p.snapshot_version,
        p.snapshot_expires,
        p.timestamp_version,
        p.timestamp_expires
    );
    for r in &p.releases {
        print!("  ");
        describe(r);
    }
    serve_hint(&p.metadata, &p.targets);
    if p.root_expires < p.targets_expires {
        eprintln!(
            "warning: the root expires {} — before this metadata; nodes will refuse the repository then",
            p.root_expires
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn serve_hint(metadata: &Path, targets: &Path) {
    println!("serve {} at metadata_url", metadata.display());
    println!("serve {} at targets_url", targets.display());
}
