//! `plugvisor run [--config FILE] [--check]`: the daemon, or a check of
//! its config (and thresholds file) by this very binary.
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;

use super::load_config;

/// Run the daemon (with no --config: the embedded default).
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Config file (plugvisor.toml).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Validate the config and exit.
    #[arg(long)]
    pub check: bool,
}

/// Runs `plugvisor run`.
pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let config = load_config(args.config.as_ref())?;
    if let Some(sync) = &config.sync {
        // Before anything binds (and in the check an upgrade runs first):
        // a node that cannot trust the fleet's root would fail every poll.
        crate::fleet::sync::check_root(&sync.root).map_err(anyhow::Error::msg)?;
    }
    if let Some(mqtt) = &config.report.mqtt {
        // The CA, client certificate and key, as the link will read them.
        crate::report::check(mqtt)?;
    }
    if args.check {
        if let Some(t) = &config.thresholds {
            // The file may be provisioned apart from the config (a
            // ConfigMap mount): absent is worth saying, not fatal.
            if t.exists() {
                let rules = crate::rules::Thresholds::load(t)?;
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
    limit_malloc_arenas();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let result = runtime.block_on(crate::daemon::run(config));
    // Dropping the runtime would wait for every blocking task, and a
    // plugin call abandoned after its timeout may never return.
    runtime.shutdown_background();
    result?;
    Ok(ExitCode::SUCCESS)
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
