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
    raise_open_files_limit();
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

/// Raises the soft limit on open files to the hard limit, and says so.
///
/// Every connection is a descriptor, and the usual soft limit of 1024
/// would refuse the 1 000th client of an edge gateway that holds ten
/// thousand; the hard limit is what the operator (systemd's
/// `LimitNOFILE`, the container runtime) allows. tokio polls with epoll,
/// so descriptors above 1024 are safe here. Plugin hosts inherit it.
fn raise_open_files_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit) } != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "could not read the open files limit");
        return;
    }
    if limit.rlim_cur >= limit.rlim_max {
        tracing::info!(open_files = limit.rlim_cur, "open files limit");
        return;
    }
    let raised = libc::rlimit {
        rlim_cur: limit.rlim_max,
        rlim_max: limit.rlim_max,
    };
    // SAFETY: setrlimit reads the struct it is given.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const raised) } == 0 {
        tracing::info!(
            from = limit.rlim_cur,
            to = limit.rlim_max,
            "raised the open files limit to its hard limit (each connection holds one)"
        );
    } else {
        tracing::warn!(
            soft = limit.rlim_cur,
            hard = limit.rlim_max,
            error = %std::io::Error::last_os_error(),
            "could not raise the open files limit; connections beyond it are refused"
        );
    }
}
