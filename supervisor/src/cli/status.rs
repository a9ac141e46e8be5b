//! `plugvisor status [--json]`: plugins, versions, listeners, probes,
//! rules and dependency conflicts of the running daemon.
use std::process::ExitCode;

use anyhow::Context as _;

use super::{AdminArgs, ask, describe_action, print_json};
use crate::control::{AdminRequest, AdminResponse, Status};

/// Show plugins, versions, listeners and probes of the running daemon.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// How to reach the daemon, and the output format.
    #[command(flatten)]
    pub admin: AdminArgs,
}

/// Runs `plugvisor status`.
pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let resp = ask(&args.admin, &AdminRequest::Status)?;
    print_status(&resp, args.admin.json)
}

fn print_status(resp: &AdminResponse, json: bool) -> anyhow::Result<ExitCode> {
    if json {
        return print_json(resp);
    }
    if !resp.ok {
        anyhow::bail!("{}", resp.error.as_deref().unwrap_or("status failed"));
    }
    let s: Status = serde_json::from_value(resp.result.clone()).context("decoding status")?;
    println!("plugvisor {}", s.version);
    println!("\n{:<20} {:<12} MAPPED", "PLUGIN", "ACTIVE");
    for p in &s.plugins {
        println!(
            "{:<20} {:<12} {}",
            p.plugin,
            p.active.as_deref().unwrap_or("-"),
            p.mapped.join(", ")
        );
    }
    println!(
        "\n{:<20} {:<8} {:<22} PLUGIN",
        "LISTENER", "PROTO", "ADDRESS"
    );
    for l in &s.listeners {
        println!(
            "{:<20} {:<8} {:<22} {}",
            l.name, l.protocol, l.addr, l.plugin
        );
    }
    println!("\n{:<24} UP", "PROBE");
    for (p, up) in &s.probes {
        println!("{:<24} {}", p, if *up { "yes" } else { "no" });
    }
    println!(
        "\n{:<20} {:<11} {:<11} {:<12} {:<9} WHY (last action)",
        "PLUGIN", "STATE", "KNOWN-GOOD", "DEGRADED", "DISABLED"
    );
    for p in &s.plugins {
        let why = p
            .last_action
            .as_ref()
            .map_or_else(String::new, describe_action);
        println!(
            "{:<20} {:<11} {:<11} {:<12} {:<9} {}",
            p.plugin,
            p.state,
            p.known_good.as_deref().unwrap_or("-"),
            p.degraded.as_deref().unwrap_or("no"),
            if p.disabled { "yes" } else { "no" },
            why
        );
    }
    let valid = if s.rules_config_valid {
        ""
    } else {
        "  (thresholds file on disk is INVALID; previous rules in force)"
    };
    println!(
        "\n{:<32} {:<8} {:>14} {:>14} {:<9}{valid}",
        "RULE", "STATE", "OBSERVED", "THRESHOLD", "ACTION"
    );
    for r in &s.rules {
        println!(
            "{:<32} {:<8} {:>14} {:>14} {:<9}{}",
            r.name,
            format!("{:?}", r.state).to_lowercase(),
            r.observed
                .map_or_else(|| "no data".to_owned(), |v| format!("{v:.6}")),
            r.threshold,
            r.action,
            if r.dry_run { " (dry run)" } else { "" }
        );
    }
    if s.conflicts.is_empty() {
        println!("\nno dependency conflicts");
    } else {
        println!("\n{:<20} {:<10} DEPENDENCY CONFLICT", "PLUGIN", "KIND");
        for c in &s.conflicts {
            println!("{:<20} {:<10} {}", c.plugin, c.kind, c.message);
        }
    }
    if let Some(sync) = &s.sync {
        print_sync(sync);
    }
    if let Some(report) = &s.report {
        print_report(report);
    }
    Ok(ExitCode::SUCCESS)
}

/// The MQTT link's part of `status`.
fn print_report(r: &crate::report::ReportStatus) {
    println!(
        "\nreport: {} as {} (topics {}/…): {} since {} (Unix s), birth {}",
        r.broker,
        r.client_id,
        r.topic_prefix,
        if r.connected { "connected" } else { "down" },
        r.since,
        r.birth
    );
    println!(
        "  outbox {} events; published {}, dropped {} since start; last publish {}{}",
        r.outbox_events,
        r.published,
        r.dropped,
        r.last_publish
            .map_or_else(|| "never".to_owned(), |t| format!("at {t} (Unix s)")),
        r.last_error
            .as_ref()
            .map_or_else(String::new, |e| format!("; last error: {e}"))
    );
}

/// The fleet sync's part of `status`.
fn print_sync(sync: &crate::fleet::sync::SyncStatus) {
    println!(
        "\nfleet sync: node {} (seed {}), last verified {}{}",
        sync.node,
        sync.seed,
        sync.last_success
            .map_or_else(|| "never".to_owned(), |t| format!("at {t} (Unix s)")),
        sync.last_error
            .as_ref()
            .map_or_else(String::new, |e| format!("; last error: {e}"))
    );
    println!(
        "{:<20} {:<9} {:<12} {:<12} WHY",
        "PLUGIN", "STATE", "DESIRED", "ACTIVE"
    );
    for (plugin, p) in &sync.plugins {
        println!(
            "{:<20} {:<9} {:<12} {:<12} {}",
            plugin,
            p.state.as_str(),
            p.desired.as_deref().unwrap_or("-"),
            p.active.as_deref().unwrap_or("-"),
            p.reason.as_deref().unwrap_or("")
        );
    }
}
