//! `plugvisor enable PLUGIN [--json]`.
use std::path::PathBuf;
use std::process::ExitCode;

use super::{ask, print_action};
use crate::control::AdminRequest;

/// Serve PLUGIN again after `disable`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The plugin.
    pub plugin: String,
    /// Config file, to find the admin socket.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

/// Runs `plugvisor enable`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let resp = ask(
        args.config.as_ref(),
        &AdminRequest::Enable {
            plugin: args.plugin,
        },
    )?;
    print_action(&resp, args.json)
}
