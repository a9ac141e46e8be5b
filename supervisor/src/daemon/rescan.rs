//! Reloads off the async workers (`dlopen` and `init` block), and the
//! second look at a package deferred for its signature.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;

use crate::control::Command;
use crate::reload::{AttemptOutcome, ReloadReport, Reloader, SIGNATURE_GRACE};

/// How long after [`SIGNATURE_GRACE`] a deferred package is looked at
/// again, so the grace has surely run out by then.
const DEFERRED_RECHECK_MARGIN: Duration = Duration::from_millis(100);

/// Runs reloads for `plugins` (or every package and slot) off the async
/// workers: `dlopen` and `init` block. A package that was deferred (its
/// signature names a manifest not yet in place) is looked at again once
/// the grace has passed, whether or not another event arrives.
pub(super) async fn rescan(
    reloader: &Arc<Mutex<Reloader>>,
    plugins: Option<Vec<String>>,
    force: bool,
    commands: &mpsc::Sender<Command>,
) -> Vec<ReloadReport> {
    let reports = rescan_now(reloader, plugins, force).await;
    let deferred: Vec<String> = reports
        .iter()
        .filter(|r| r.outcome == AttemptOutcome::Deferred)
        .map(|r| r.plugin.clone())
        .collect();
    if !deferred.is_empty() {
        let commands = commands.clone();
        tokio::spawn(async move {
            tokio::time::sleep(SIGNATURE_GRACE + DEFERRED_RECHECK_MARGIN).await;
            let _ = commands
                .send(Command::Rescan {
                    plugins: Some(deferred),
                    force: false,
                    reply: None,
                })
                .await;
        });
    }
    reports
}

async fn rescan_now(
    reloader: &Arc<Mutex<Reloader>>,
    plugins: Option<Vec<String>>,
    force: bool,
) -> Vec<ReloadReport> {
    let reloader = reloader.clone();
    let result = tokio::task::spawn_blocking(move || {
        let mut r = reloader.lock().expect("reloader lock");
        let names: Vec<String> = plugins.unwrap_or_else(|| {
            let mut all: BTreeSet<String> = r.packages().into_iter().collect();
            all.extend(r.slots().keys().cloned());
            all.into_iter().collect()
        });
        let names: Vec<String> = names
            .into_iter()
            .filter(|n| crate::name::valid_name(n))
            .collect();
        let reports = r
            .in_dependency_order(&names)
            .iter()
            .map(|n| r.reload(n, force))
            .filter(|rep| force || rep.outcome != AttemptOutcome::Unchanged)
            .collect::<Vec<_>>();
        if !reports.is_empty() {
            r.collect_garbage();
        }
        reports
    })
    .await;
    result.unwrap_or_else(|e| {
        tracing::error!(error = %e, "reload task panicked");
        Vec::new()
    })
}
