//! `plugvisor disable PLUGIN [--json]`.
use std::process::ExitCode;

use super::{AdminArgs, ask, print_action};
use crate::control::AdminRequest;

/// Refuse all new work for PLUGIN, with a clear answer to clients.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The plugin.
    pub plugin: String,
    /// How to reach the daemon, and the output format.
    #[command(flatten)]
    pub admin: AdminArgs,
}

/// Runs `plugvisor disable`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let resp = ask(
        &args.admin,
        &AdminRequest::Disable {
            plugin: args.plugin,
        },
    )?;
    print_action(&resp, args.admin.json)
}
