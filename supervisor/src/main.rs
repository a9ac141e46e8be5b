//! The `plugvisor` command: the daemon (`run`), the clients that talk to
//! it over the admin socket, and the offline tools (`keygen`, `pack`,
//! `verify`).
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use std::os::unix::fs::DirBuilderExt as _;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use plugvisor::actions::ActionReport;
use plugvisor::config::Config;
use plugvisor::control::{AdminRequest, AdminResponse, Status, Versions};
use plugvisor::reload::{AttemptOutcome, ReloadReport};

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
    /// Make an ed25519 key pair for signing packages (offline).
    Keygen {
        /// Directory for `plugvisor.key` (mode 0600) and `plugvisor.pub`.
        #[arg(long, default_value = ".")]
        out: PathBuf,
        /// Secret key file (instead of OUT/plugvisor.key).
        #[arg(long)]
        secret: Option<PathBuf>,
        /// Public key file (instead of OUT/plugvisor.pub, or SECRET.pub).
        #[arg(long)]
        public: Option<PathBuf>,
    },
    /// Write or update the package in DIR: library, plugin.toml, and with
    /// --key the signature (offline). The manifest is renamed into place last.
    Pack {
        /// The package directory (created if missing).
        dir: PathBuf,
        /// The library (default: the one the manifest names, else the only *.so in DIR).
        #[arg(long)]
        library: Option<PathBuf>,
        /// Sign with this secret key (from `plugvisor keygen`).
        #[arg(long)]
        key: Option<PathBuf>,
        /// Plugin name (default: the library's descriptor).
        #[arg(long)]
        name: Option<String>,
        /// Version (default: the library's descriptor).
        #[arg(long)]
        version: Option<semver::Version>,
        /// Plugin ABI (default: the library's descriptor).
        #[arg(long)]
        abi: Option<u32>,
        /// A requirement, NAME=RANGE (repeatable; replaces the manifest's [requires]).
        #[arg(long = "requires", value_name = "NAME=RANGE")]
        requires: Vec<String>,
        /// A plugin this one conflicts with (repeatable; replaces `conflicts`).
        #[arg(long = "conflicts", value_name = "NAME")]
        conflicts: Vec<String>,
    },
    /// Check the package in DIR as the daemon would (offline); exit 0 if it
    /// would be accepted.
    Verify {
        /// The package directory.
        dir: PathBuf,
        /// Trust settings and state (for the downgrade check) from this config.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Trust this public key (repeatable); a signature is then required.
        #[arg(long = "public-key", value_name = "FILE")]
        public_keys: Vec<PathBuf>,
    },
    /// List the crash points `FAILPOINTS` can arm (failpoints build only).
    #[cfg(feature = "failpoints")]
    Failpoints,
}

/// Sends one request to the daemon named by the config at `config`.
fn ask(
    runtime: &tokio::runtime::Runtime,
    config: Option<&PathBuf>,
    req: &AdminRequest,
) -> anyhow::Result<AdminResponse> {
    let config = load_config(config)?;
    Ok(runtime.block_on(plugvisor::control::socket::request(
        &config.admin.socket,
        req,
    ))?)
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

/// Caps glibc's malloc at two arenas for the daemon, unless the operator
/// chose a number with `MALLOC_ARENA_MAX`.
///
/// glibc gives threads up to eight arenas per core, and the pages an
/// arena once touched mostly stay resident. The reload path runs on
/// short-lived blocking threads and bounded requests on runner threads,
/// so the default let RSS climb by 3–4 MiB over the first hundred reloads
/// on a 2-core node — more than the mapped versions themselves. With two
/// arenas the growth over 1000 reloads stays within `keep_loaded` ×
/// library (measured by the soak in `cargo xtask bench`), and requests
/// did not slow down (they allocate little, on at most a few threads).
/// Must run before any thread is started.
fn limit_malloc_arenas() {
    #[cfg(target_env = "gnu")]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets an allocator parameter; called while
        // the process is still single-threaded.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}

pub(crate) fn main() -> ExitCode {
    #[cfg(feature = "failpoints")]
    plugvisor::failpoints::setup();
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match real_main(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("plugvisor: {}", render(&e));
            ExitCode::FAILURE
        }
    }
}

#[expect(
    clippy::too_many_lines,
    reason = "one arm per CLI verb, each a few lines"
)]
fn real_main(cli: Cli) -> anyhow::Result<ExitCode> {
    // The offline tools need no runtime and no daemon.
    match cli.command {
        Cmd::Keygen {
            out,
            secret,
            public,
        } => return keygen(&out, secret, public),
        Cmd::Pack {
            dir,
            library,
            key,
            name,
            version,
            abi,
            requires,
            conflicts,
        } => {
            let requires = if requires.is_empty() {
                None
            } else {
                Some(parse_requires(&requires)?)
            };
            let options = plugvisor::pack::PackOptions {
                library,
                name,
                version,
                abi,
                requires,
                conflicts: (!conflicts.is_empty()).then_some(conflicts),
                key: key
                    .map(|k| plugvisor::trust::read_secret_key(&k))
                    .transpose()?,
            };
            return pack(&dir, options);
        }
        Cmd::Verify {
            dir,
            config,
            public_keys,
        } => return verify(&dir, config.as_ref(), &public_keys),
        #[cfg(feature = "failpoints")]
        Cmd::Failpoints => {
            for p in plugvisor::failpoints::CrashPoint::ALL {
                println!("{}", p.as_str());
            }
            return Ok(ExitCode::SUCCESS);
        }
        _ => {}
    }
    if matches!(cli.command, Cmd::Run { .. }) {
        limit_malloc_arenas();
    }
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
            let result = runtime.block_on(plugvisor::daemon::run(config));
            // Dropping the runtime would wait for every blocking task, and a
            // plugin call abandoned after its timeout may never return.
            runtime.shutdown_background();
            result?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Status { config, json } => {
            let resp = ask(&runtime, config.as_ref(), &AdminRequest::Status)?;
            print_status(&resp, json)
        }
        Cmd::Reload {
            plugin,
            config,
            json,
        } => {
            let resp = ask(&runtime, config.as_ref(), &AdminRequest::Reload { plugin })?;
            print_reload(&resp, json)
        }
        Cmd::Rollback {
            plugin,
            to,
            config,
            json,
        } => {
            let resp = ask(
                &runtime,
                config.as_ref(),
                &AdminRequest::Rollback { plugin, to },
            )?;
            print_action(&resp, json)
        }
        Cmd::Disable {
            plugin,
            config,
            json,
        } => {
            let resp = ask(&runtime, config.as_ref(), &AdminRequest::Disable { plugin })?;
            print_action(&resp, json)
        }
        Cmd::Enable {
            plugin,
            config,
            json,
        } => {
            let resp = ask(&runtime, config.as_ref(), &AdminRequest::Enable { plugin })?;
            print_action(&resp, json)
        }
        Cmd::Versions {
            plugin,
            config,
            json,
        } => {
            let resp = ask(
                &runtime,
                config.as_ref(),
                &AdminRequest::Versions { plugin },
            )?;
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
        Cmd::Keygen { .. } | Cmd::Pack { .. } | Cmd::Verify { .. } => {
            unreachable!("handled above")
        }
        #[cfg(feature = "failpoints")]
        Cmd::Failpoints => unreachable!("handled above"),
    }
}

fn keygen(
    out: &Path,
    secret: Option<PathBuf>,
    public: Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    let secret = secret.unwrap_or_else(|| out.join("plugvisor.key"));
    let public = public.unwrap_or_else(|| {
        if secret == out.join("plugvisor.key") {
            out.join("plugvisor.pub")
        } else {
            let mut p = secret.clone().into_os_string();
            p.push(".pub");
            PathBuf::from(p)
        }
    });
    for p in [&secret, &public] {
        if let Some(dir) = p
            .parent()
            .filter(|d| !d.as_os_str().is_empty() && !d.exists())
        {
            // A new directory for a secret key is private too.
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .with_context(|| format!("creating {}", dir.display()))?;
        }
    }
    let key = plugvisor::trust::SecretKey::generate()?;
    plugvisor::trust::write_key_pair(&key, &secret, &public)?;
    println!(
        "secret key: {} (mode 0600; keep it offline)",
        secret.display()
    );
    println!(
        "public key: {} (list it in [trust] public_keys)",
        public.display()
    );
    println!("key id:     {}", key.public().id);
    Ok(ExitCode::SUCCESS)
}

fn parse_requires(items: &[String]) -> anyhow::Result<BTreeMap<String, semver::VersionReq>> {
    items
        .iter()
        .map(|item| {
            let (name, range) = item
                .split_once('=')
                .with_context(|| format!("--requires {item:?}: expected NAME=RANGE"))?;
            let range = semver::VersionReq::parse(range.trim())
                .with_context(|| format!("--requires {item:?}: {range:?} is not a semver range"))?;
            Ok((name.trim().to_owned(), range))
        })
        .collect()
}

fn pack(dir: &Path, options: plugvisor::pack::PackOptions) -> anyhow::Result<ExitCode> {
    let packed = plugvisor::pack::pack(dir, options)
        .with_context(|| format!("packing {}", dir.display()))?;
    let m = &packed.manifest;
    println!(
        "packed {} {} in {}: library {} (sha256 {})",
        m.name,
        m.version,
        dir.display(),
        m.library,
        m.sha256
    );
    match &packed.key_id {
        Some(id) => println!("signed by key {id} ({})", plugvisor::trust::SIGNATURE_FILE),
        None => println!("unsigned"),
    }
    Ok(ExitCode::SUCCESS)
}

fn verify(dir: &Path, config: Option<&PathBuf>, keys: &[PathBuf]) -> anyhow::Result<ExitCode> {
    use plugvisor::trust::{TrustPolicy, Verdict};
    let (policy, store) = match config {
        Some(path) => {
            let config = Config::load(path)?;
            let mut policy =
                TrustPolicy::load(&config.trust.public_keys, config.trust.require_signature)?;
            if !keys.is_empty() {
                policy = with_keys(&policy, keys, true)?;
            }
            (policy, plugvisor::store::Store::existing(&config.state_dir))
        }
        None => (
            with_keys(&TrustPolicy::default(), keys, !keys.is_empty())?,
            None,
        ),
    };
    let v = plugvisor::pack::verify(dir, &policy, store.as_ref())
        .with_context(|| format!("verify {}: refused", dir.display()))?;
    let signed = match &v.verdict {
        Verdict::Signed { key_id } => format!("signed by trusted key {key_id}"),
        Verdict::Unsigned => "unsigned (no signature required)".to_owned(),
        Verdict::Unchecked => "signature present but not checked (no keys given)".to_owned(),
    };
    println!(
        "{}: {} {} would be accepted: manifest valid, library sha256 matches, \
         ELF shared object with descriptor {} {} (ABI {}), {signed}{}",
        dir.display(),
        v.manifest.name,
        v.manifest.version,
        v.identity.name,
        v.identity.version,
        v.identity.abi,
        if store.is_some() {
            ", not a downgrade"
        } else {
            ""
        }
    );
    for note in &v.notes {
        println!("note: {note}");
    }
    Ok(ExitCode::SUCCESS)
}

/// `policy` with the keys in `files` added.
fn with_keys(
    policy: &plugvisor::trust::TrustPolicy,
    files: &[PathBuf],
    require: bool,
) -> anyhow::Result<plugvisor::trust::TrustPolicy> {
    let mut keys = policy.keys().to_vec();
    for f in files {
        keys.push(plugvisor::trust::read_public_key(f)?);
    }
    Ok(plugvisor::trust::TrustPolicy::new(
        keys,
        require || policy.require_signature(),
    ))
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
    if s.conflicts.is_empty() {
        println!("\nno dependency conflicts");
    } else {
        println!("\n{:<20} {:<10} DEPENDENCY CONFLICT", "PLUGIN", "KIND");
        for c in &s.conflicts {
            println!("{:<20} {:<10} {}", c.plugin, c.kind, c.message);
        }
    }
    Ok(ExitCode::SUCCESS)
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
