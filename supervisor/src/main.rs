//! The `plugvisor` command: the daemon (`run`) and the clients that talk to
//! it over the admin socket.
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use plugvisor::config::Config;
use plugvisor::control::{AdminRequest, AdminResponse, Status};
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

fn real_main(cli: Cli) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    match cli.command {
        Cmd::Run { config, check } => {
            let config = load_config(config.as_ref())?;
            if check {
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
