//! `plugvisor rollback PLUGIN [--to VERSION] [--json]`.
use std::path::PathBuf;
use std::process::ExitCode;

use super::{ask, print_action};
use crate::control::AdminRequest;

/// Switch PLUGIN back to its known-good version (or --to VERSION); the
/// version left is quarantined.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The plugin.
    pub plugin: String,
    /// The version to go back to (default: the known-good one).
    #[arg(long)]
    pub to: Option<String>,
    /// Config file, to find the admin socket.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

/// Runs `plugvisor rollback`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let resp = ask(
        args.config.as_ref(),
        &AdminRequest::Rollback {
            plugin: args.plugin,
            to: args.to,
        },
    )?;
    print_action(&resp, args.json)
}
