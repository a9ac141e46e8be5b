//! `plugvisor rollback PLUGIN [--to VERSION] [--json]`.
use std::process::ExitCode;

use super::{AdminArgs, ask, print_action};
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
    /// How to reach the daemon, and the output format.
    #[command(flatten)]
    pub admin: AdminArgs,
}

/// Runs `plugvisor rollback`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let resp = ask(
        &args.admin,
        &AdminRequest::Rollback {
            plugin: args.plugin,
            to: args.to,
        },
    )?;
    print_action(&resp, args.admin.json)
}
