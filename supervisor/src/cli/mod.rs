//! The `plugvisor` command: the daemon (`run`), the clients that talk to
//! it over the admin socket (`status`, `reload`, `rollback`, `versions`,
//! `disable`, `enable`, `upgrade`), and the offline tools (`keygen`, `pack`,
//! `verify`) — one file per verb, each with its flags (a clap `Args`) and
//! its `run`. Both binaries (`plugvisor`, and `plugvisor-failpoints` for
//! the crash tests) are [`main`].
//!
//! The clients print for people by default and the daemon's JSON with
//! `--json`; what they print is their interface, so it is written to
//! stdout here, while the daemon itself only logs.
#![expect(
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "a command line's output is its interface"
)]
mod disable;
mod enable;
#[cfg(feature = "failpoints")]
mod failpoints;
mod keygen;
mod pack;
mod plugin_host;
mod reload;
mod repo;
mod rollback;
mod run;
mod status;
mod upgrade;
mod verify;
mod versions;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};

use crate::actions::ActionReport;
use crate::config::Config;
use crate::control::{AdminRequest, AdminResponse};

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
    Run(run::Args),
    /// Show plugins, versions, listeners and probes of the running daemon.
    Status(status::Args),
    /// Re-read PLUGIN's package now and switch to it if it is new.
    Reload(reload::Args),
    /// Switch PLUGIN back to its known-good version (or --to VERSION); the
    /// version left is quarantined.
    Rollback(rollback::Args),
    /// Show PLUGIN's versions: active, known-good, mapped, history, quarantined.
    Versions(versions::Args),
    /// Refuse all new work for PLUGIN, with a clear answer to clients.
    Disable(disable::Args),
    /// Serve PLUGIN again after `disable`.
    Enable(enable::Args),
    /// Replace the running daemon by a new process (a new binary, or the
    /// same) that takes over its sockets and connections; exits 0 once the
    /// new one serves. `SIGUSR2` to the daemon does the same.
    Upgrade(upgrade::Args),
    /// Make an ed25519 key pair for signing packages (offline).
    Keygen(keygen::Args),
    /// Write or update the package in DIR: library, plugin.toml, and with
    /// --key the signature (offline). The manifest is renamed into place last.
    Pack(pack::Args),
    /// Check the package in DIR as the daemon would (offline); exit 0 if it
    /// would be accepted.
    Verify(verify::Args),
    /// The fleet's TUF repository (offline): init, add, publish, rollback,
    /// rotate-root.
    Repo(repo::Args),
    /// List the crash points `FAILPOINTS` can arm (failpoints build only).
    #[cfg(feature = "failpoints")]
    Failpoints,
    /// The process a plugin version runs in (`isolation = "process"`);
    /// started by the daemon only.
    #[command(hide = true)]
    PluginHost(plugin_host::Args),
}

/// The command line: parses, sets up logging, runs the verb, and turns an
/// error into one line on stderr and exit status 1.
pub fn main() -> ExitCode {
    #[cfg(feature = "failpoints")]
    crate::failpoints::setup();
    let cli = Cli::parse();
    // Plugin hosts (and anything else this process starts with its own
    // binary) log as the daemon does, whether the format came from the
    // flag or the environment.
    let inherited = match cli.log_format {
        LogFormat::Human => "human",
        LogFormat::Json => "json",
    };
    // SAFETY: nothing but this thread runs yet (no runtime, no logger),
    // so no other thread can be reading the environment.
    unsafe { std::env::set_var("PLUGVISOR_LOG_FORMAT", inherited) };
    init_logging(cli.log_format);
    let result = match cli.command {
        Cmd::Run(a) => run::run(&a),
        Cmd::Status(a) => status::run(&a),
        Cmd::Reload(a) => reload::run(a),
        Cmd::Rollback(a) => rollback::run(a),
        Cmd::Versions(a) => versions::run(a),
        Cmd::Disable(a) => disable::run(a),
        Cmd::Enable(a) => enable::run(a),
        Cmd::Upgrade(a) => upgrade::run(a),
        Cmd::Keygen(a) => keygen::run(a),
        Cmd::Pack(a) => pack::run(a),
        Cmd::Verify(a) => verify::run(&a),
        Cmd::Repo(a) => repo::run(a),
        Cmd::PluginHost(a) => plugin_host::run(a),
        #[cfg(feature = "failpoints")]
        Cmd::Failpoints => Ok(failpoints::run()),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("plugvisor: {}", render(&e));
            ExitCode::FAILURE
        }
    }
}

/// Sends one request to the daemon named by the config at `config`.
/// What every verb that talks to the running daemon takes: where its
/// config (and so its admin socket) is, and whether to print JSON.
#[derive(Debug, clap::Args)]
pub struct AdminArgs {
    /// Config file, to find the admin socket.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

fn ask(admin: &AdminArgs, req: &AdminRequest) -> anyhow::Result<AdminResponse> {
    let config = load_config(admin.config.as_ref())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    Ok(runtime.block_on(crate::control::socket::request(&config.admin.socket, req))?)
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

/// The error and its causes, each said once: most errors here already
/// carry their cause in their own message (`reading F: No such file…`),
/// which `{:#}` would repeat.
fn render(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !out.contains(&cause) {
            out.push_str(": ");
            out.push_str(&cause);
        }
    }
    out
}

fn print_json(resp: &AdminResponse) -> anyhow::Result<ExitCode> {
    println!("{}", serde_json::to_string_pretty(resp)?);
    Ok(if resp.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn describe_action(a: &ActionReport) -> String {
    use std::fmt::Write as _;
    let mut s = format!("{} ", a.action.as_str());
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
