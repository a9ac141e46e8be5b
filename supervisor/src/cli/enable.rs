//! `plugvisor enable PLUGIN [--json]`.
use std::process::ExitCode;

use super::{AdminArgs, ask, print_action};
use crate::control::AdminRequest;

/// Serve PLUGIN again after `disable`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The plugin.
    pub plugin: String,
    /// How to reach the daemon, and the output format.
    #[command(flatten)]
    pub admin: AdminArgs,
}

/// Runs `plugvisor enable`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let resp = ask(
        &args.admin,
        &AdminRequest::Enable {
            plugin: args.plugin,
        },
    )?;
    print_action(&resp, args.admin.json)
}
