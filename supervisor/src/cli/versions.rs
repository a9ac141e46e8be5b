//! `plugvisor versions PLUGIN [--json]`: active, known-good, mapped,
//! history and quarantined versions.
use std::process::ExitCode;

use anyhow::Context as _;

use super::{AdminArgs, ask, print_json};
use crate::control::{AdminRequest, Versions};

/// Show PLUGIN's versions: active, known-good, mapped, history, quarantined.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The plugin.
    pub plugin: String,
    /// How to reach the daemon, and the output format.
    #[command(flatten)]
    pub admin: AdminArgs,
}

/// Runs `plugvisor versions`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let resp = ask(
        &args.admin,
        &AdminRequest::Versions {
            plugin: args.plugin,
        },
    )?;
    if args.admin.json {
        return print_json(&resp);
    }
    if !resp.ok {
        anyhow::bail!("{}", resp.error.as_deref().unwrap_or("versions failed"));
    }
    let v: Versions = serde_json::from_value(resp.result).context("decoding versions")?;
    let none = || "-".to_owned();
    println!("plugin       {}", v.plugin);
    println!(
        "active       {}{}",
        v.active.unwrap_or_else(none),
        if v.on_trial { " (on trial)" } else { "" }
    );
    println!("known-good   {}", v.known_good.unwrap_or_else(none));
    println!("mapped       {}", v.mapped.join(", "));
    println!("history      {}", v.history.join(" → "));
    println!(
        "quarantined  {}",
        if v.quarantined.is_empty() {
            none()
        } else {
            v.quarantined.join(", ")
        }
    );
    Ok(ExitCode::SUCCESS)
}
