//! `plugvisor upgrade [--binary PATH] [--json]`: replace the running daemon
//! by a new process without refusing a connect; exit 0 once the new process
//! serves, non-zero with the reason when it did not (the old one serves on).
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;

use super::{AdminArgs, ask, print_json};
use crate::control::{AdminRequest, UpgradeReport};

/// Replace the running daemon by a new process (default: of the binary it
/// was started from) that takes over its sockets and raw TCP connections.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The new binary (checked with `run --check` first).
    #[arg(long)]
    pub binary: Option<PathBuf>,
    /// How to reach the daemon, and the output format.
    #[command(flatten)]
    pub admin: AdminArgs,
}

/// Runs `plugvisor upgrade`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    // Relative to where the command runs, not where the daemon does.
    let binary = args.binary.map(|b| std::path::absolute(&b).unwrap_or(b));
    let resp = ask(&args.admin, &AdminRequest::Upgrade { binary })?;
    if args.admin.json {
        return print_json(&resp);
    }
    if !resp.ok {
        anyhow::bail!("{}", resp.error.as_deref().unwrap_or("upgrade failed"));
    }
    let r: UpgradeReport =
        serde_json::from_value(resp.result).context("decoding the upgrade report")?;
    let moved: Vec<String> = r
        .connections_moved
        .iter()
        .map(|(l, n)| format!("{l}={n}"))
        .collect();
    println!(
        "upgraded: pid {} -> {} ({}), ready in {} ms; raw TCP connections moved: {}; plugin hosts adopted: {} of {}",
        r.old_pid,
        r.new_pid,
        r.binary,
        r.ready_ms,
        if moved.is_empty() {
            "none".to_owned()
        } else {
            moved.join(" ")
        },
        r.hosts_adopted,
        r.hosts,
    );
    Ok(ExitCode::SUCCESS)
}
