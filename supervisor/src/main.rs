//! The `plugvisor` command: the daemon (`run`) and the clients that talk to
//! it over the admin socket.
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use plugvisor::actions::ActionReport;
use plugvisor::config::Config;
use plugvisor::control::{AdminRequest, AdminResponse, Status, Versions};
use plugvisor::reload::ReloadReport;

/// Hot-loads native plugins into a running service without breaking a
/// connection, and proves it from the kernel.
#[derive(Debug, Parser)]
#[command(name = "plugvisor", version, about)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human, env = "PLUGVISOR_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the daemon (with no --config: the embedded default).
    Run {
        /// Config file (plugvisor.toml).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Validate the config and exit.
        #[arg(long)]
        check: bool,
    },
    /// Show plugins, versions, listeners and probes of the running daemon.
    Status {
        /// Config file, to find the admin socket.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Re-read PLUGIN's package now and switch to it if it is new.
    Reload {
        /// The plugin.
        plugin: String,
        /// Config file, to find the admin socket.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Switch PLUGIN back to its known-good version (or --to VERSION); the
    /// version left is quarantined.
    Rollback {
        /// The plugin.
        plugin: String,
        /// The version to go back to (default: the known-good one).
        #[arg(long)]
        to: Option<String>,
        /// Config file, to find the admin socket.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Show PLUGIN's versions: active, known-good, mapped, history, quarantined.
    Versions {
        /// The plugin.
        plugin: String,
        /// Config file, to find the admin socket.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Refuse all new work for PLUGIN, with a clear answer to clients.
    Disable {
        /// The plugin.
        plugin: String,
        /// Config file, to find the admin socket.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Serve PLUGIN again after `disable`.
    Enable {
        /// The plugin.
        plugin: String,
        /// Config file, to find the admin socket.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

fn load_config(path: Option<&PathBuf>) -> anyhow::Result<Config> {
    match path {
        Some(p) => Config::load(p).map_err(Into::into),
        None => Ok(Config::embedded_default()),
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PLUGVISOR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match real_main(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("plugvisor: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[expect(
    clippy::too_many_lines,
    reason = "one arm per CLI verb, each a few lines"
)]
fn real_main(cli: Cli) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    match cli.command {
        Cmd::Run { config, check } => {
            let config = load_config(config.as_ref())?;
            if check {
                if let Some(t) = &config.thresholds {
                    // The file may be provisioned apart from the config (a
                    // ConfigMap mount): absent is worth saying, not fatal.
                    if t.exists() {
                        let rules = plugvisor::rules::Thresholds::load(t)?;
                        eprintln!(
                            "plugvisor: thresholds {} is valid ({} rules)",
                            t.display(),
                            rules.rules.len()
                        );
                    } else {
                        eprintln!(
                            "plugvisor: thresholds {} does not exist (yet); it is read when it appears",
                            t.display()
                        );
                    }
                }
                let source = config
                    .source
                    .as_ref()
                    .map_or("<embedded default>".into(), |p| p.display().to_string());
                eprintln!("plugvisor: config {source} is valid");
                return Ok(ExitCode::SUCCESS);
            }
            runtime.block_on(plugvisor::daemon::run(config))?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Status { config, json } => {
            let config = load_config(config.as_ref())?;
            let resp = runtime.block_on(plugvisor::admin::request(
                &config.admin.socket,
                &AdminRequest::Status,
            ))?;
            print_status(&resp, json)
        }
        Cmd::Reload {
            plugin,
            config,
            json,
        } => {
            let config = load_config(config.as_ref())?;
            let resp = runtime.block_on(plugvisor::admin::request(
                &config.admin.socket,
                &AdminRequest::Reload { plugin },
            ))?;
            print_reload(&resp, json)
        }
        Cmd::Rollback {
            plugin,
            to,
            config,
            json,
        } => {
            let config = load_config(config.as_ref())?;
            let resp = runtime.block_on(plugvisor::admin::request(
                &config.admin.socket,
                &AdminRequest::Rollback { plugin, to },
            ))?;
            print_action(&resp, json)
        }
        Cmd::Disable {
            plugin,
            config,
            json,
        } => {
            let config = load_config(config.as_ref())?;
            let resp = runtime.block_on(plugvisor::admin::request(
                &config.admin.socket,
                &AdminRequest::Disable { plugin },
            ))?;
            print_action(&resp, json)
        }
        Cmd::Enable {
            plugin,
            config,
            json,
        } => {
            let config = load_config(config.as_ref())?;
            let resp = runtime.block_on(plugvisor::admin::request(
                &config.admin.socket,
                &AdminRequest::Enable { plugin },
            ))?;
            print_action(&resp, json)
        }
        Cmd::Versions {
            plugin,
            config,
            json,
        } => {
            let config = load_config(config.as_ref())?;
            let resp = runtime.block_on(plugvisor::admin::request(
                &config.admin.socket,
                &AdminRequest::Versions { plugin },
            ))?;
            if json {
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
    }
}

fn print_json(resp: &AdminResponse) -> anyhow::Result<ExitCode> {
    println!("{}", serde_json::to_string_pretty(resp)?);
    Ok(if resp.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
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
    Ok(ExitCode::SUCCESS)
}

fn describe_action(a: &ActionReport) -> String {
    use std::fmt::Write as _;
    let mut s = format!("{} ", a.action);
    if let Some(step) = &a.step {
        let _ = write!(s, "({step}) ");
    }
    if let (Some(f), Some(t)) = (&a.from_version, &a.to_version) {
        let _ = write!(s, "{f} -> {t} ");
    }
    let _ = write!(s, "reason={}", a.reason);
    if let (Some(o), Some(t)) = (a.observed, a.threshold) {
        let _ = write!(s, " observed={o} threshold={t}");
    }
    s
}

fn print_action(resp: &AdminResponse, json: bool) -> anyhow::Result<ExitCode> {
    if json {
        return print_json(resp);
    }
    if !resp.ok {
        anyhow::bail!("{}", resp.error.as_deref().unwrap_or("failed"));
    }
    let a: ActionReport =
        serde_json::from_value(resp.result.clone()).context("decoding the action")?;
    println!("{}: {}", a.plugin, describe_action(&a));
    Ok(ExitCode::SUCCESS)
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
        match r.outcome.as_str() {
            "success" => println!(
                "{}: reloaded {from} -> {to} in {} us (switch {} us)",
                r.plugin,
                r.total_us.unwrap_or(0),
                r.switch_us.unwrap_or(0)
            ),
            "unchanged" => println!("{}: unchanged, {to} is serving", r.plugin),
            other => println!(
                "{}: {other}: {}; still serving {to}",
                r.plugin,
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
