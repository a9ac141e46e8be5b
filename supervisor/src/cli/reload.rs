//! `plugvisor reload PLUGIN [--json]`: re-read a package now and say what
//! the attempt came to.
use std::process::ExitCode;

use super::{AdminArgs, ask, print_json};
use crate::control::{AdminRequest, AdminResponse};
use crate::reload::{AttemptOutcome, ReloadReport};

/// Re-read PLUGIN's package now and switch to it if it is new.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The plugin.
    pub plugin: String,
    /// How to reach the daemon, and the output format.
    #[command(flatten)]
    pub admin: AdminArgs,
}

/// Runs `plugvisor reload`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let resp = ask(
        &args.admin,
        &AdminRequest::Reload {
            plugin: args.plugin,
        },
    )?;
    print_reload(&resp, args.admin.json)
}

fn print_reload(resp: &AdminResponse, json: bool) -> anyhow::Result<ExitCode> {
    if json {
        return print_json(resp);
    }
    let reports: Vec<ReloadReport> =
        serde_json::from_value(resp.result.clone()).unwrap_or_default();
    if reports.is_empty() && !resp.ok {
        anyhow::bail!("{}", resp.error.as_deref().unwrap_or("reload failed"));
    }
    for r in &reports {
        let from = r.from_version.as_deref().unwrap_or("-");
        let to = r.active_version.as_deref().unwrap_or("-");
        match r.outcome {
            AttemptOutcome::Success => println!(
                "{}: reloaded {from} -> {to} in {} us (switch {} us)",
                r.plugin,
                r.total_us.unwrap_or(0),
                r.switch_us.unwrap_or(0)
            ),
            AttemptOutcome::Unchanged => println!("{}: unchanged, {to} is serving", r.plugin),
            other => println!(
                "{}: {}: {}; still serving {to}",
                r.plugin,
                other.as_str(),
                r.message.as_deref().unwrap_or("no reason given")
            ),
        }
    }
    Ok(if resp.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
