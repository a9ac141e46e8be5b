//! Named crash points on the reload, trial and rollback paths, for the
//! kill -9 tests (`tests/tests/crash_points.rs`).
//!
//! Only a build with the `failpoints` feature (the `plugvisor-failpoints`
//! binary) can trigger them; in any other build [`crash_point`] is an empty
//! inline function. A point is armed through the `FAILPOINTS` environment
//! variable of the [`fail`](https://docs.rs/fail) crate:
//!
//! * `FAILPOINTS="reload-after-refs=return"` — kill the process with
//!   SIGKILL (a real kill -9: no destructor, no flush, no exit handler) the
//!   first time the reload path gets there;
//! * `FAILPOINTS="reload-after-refs=return(2.0.0)"` — only when the point
//!   is reached for that key (a version, or for
//!   [`CrashPoint::StoreObjectBeforeRename`] the object's sha256), so a
//!   daemon can first come up normally on another version.
//!
//! Every point is declared once, in [`CrashPoint`]; `plugvisor-failpoints
//! failpoints` lists them, and the crash test refuses to pass while a
//! listed point has no case of its own.

macro_rules! crash_points {
    ($( $(#[$doc:meta])* $variant:ident = $name:literal, )*) => {
        /// A named step of the reload, trial or rollback path.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum CrashPoint {
            $( $(#[$doc])* $variant, )*
        }

        impl CrashPoint {
            /// Every point, in the order a reload, a trial and a rollback
            /// pass them.
            pub const ALL: &[CrashPoint] = &[$( CrashPoint::$variant, )*];

            /// The name `FAILPOINTS` arms it by.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $( CrashPoint::$variant => $name, )*
                }
            }
        }
    };
}

crash_points! {
    /// The package passed every check (manifest, signature, downgrade,
    /// dependencies); nothing is written yet.
    ReloadAfterVerify = "reload-after-verify",
    /// The object's bytes are in a temp file of the store, not yet fsynced
    /// nor renamed into place.
    StoreObjectBeforeRename = "store-object-before-rename",
    /// Object and manifest are in the store; nothing is loaded.
    ReloadAfterStage = "reload-after-stage",
    /// The new version is loaded and initialised; the old one still serves.
    ReloadAfterInit = "reload-after-init",
    /// The new version serves; the refs do not know it yet.
    ReloadAfterSwitch = "reload-after-switch",
    /// The refs name the new version active and on trial; the journal has
    /// no `activated` line for it yet.
    ReloadAfterRefs = "reload-after-refs",
    /// The activation is fully recorded; the trial runs.
    ReloadAfterJournal = "reload-after-journal",
    /// The trial passed; the refs do not say known-good yet.
    TrialBeforeRefs = "trial-before-refs",
    /// The refs say known-good; the journal has no `known-good` line yet.
    TrialAfterRefs = "trial-after-refs",
    /// A rollback chose its target; nothing is swapped.
    RollbackBeforeSwap = "rollback-before-swap",
    /// The rollback's target serves; the refs do not know it yet.
    RollbackAfterSwap = "rollback-after-swap",
    /// The refs name the target active and quarantine the version left;
    /// the journal has no `rollback` line yet.
    RollbackAfterRefs = "rollback-after-refs",
}

/// Arms the points named in `FAILPOINTS`, for the life of the process. A
/// malformed value stops the process: a test that meant to crash must not
/// silently run without its crash.
#[cfg(feature = "failpoints")]
pub fn setup() {
    std::mem::forget(fail::FailScenario::setup());
}

/// Kills the process with SIGKILL here if `point` is armed, for any key or
/// for `key` (a version or an object's sha256). Does nothing in a build
/// without the `failpoints` feature.
#[inline]
pub fn crash_point(point: CrashPoint, key: &str) {
    #[cfg(feature = "failpoints")]
    if let Some(armed) = fail::eval(point.as_str(), |arg| arg)
        && armed.as_deref().is_none_or(|k| k == key)
    {
        tracing::warn!(
            failpoint = point.as_str(),
            key,
            "failpoint armed: SIGKILL now"
        );
        // SAFETY: getpid and kill have no preconditions; SIGKILL cannot be
        // caught, so nothing of this process runs after it.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        // The kill takes this thread on its way out of the kernel; never
        // step past the point meanwhile.
        loop {
            std::thread::park();
        }
    }
    #[cfg(not(feature = "failpoints"))]
    let _ = (point, key);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_distinct_and_kebab_case() {
        let mut seen = std::collections::HashSet::new();
        for p in CrashPoint::ALL {
            let n = p.as_str();
            assert!(seen.insert(n), "{n} twice");
            assert!(
                n.bytes().all(|b| b.is_ascii_lowercase() || b == b'-'),
                "{n}"
            );
        }
    }
}
