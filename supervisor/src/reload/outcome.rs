//! What a reload attempt comes to: the refusal reasons ([`ReloadError`]),
//! the outcome word the admin socket and the CLI show ([`AttemptOutcome`]),
//! the report, and the reasons a rollback or a quarantine is journalled with.

use std::path::{Path, PathBuf};
use std::time::Duration;

use semver::Version;
use serde::{Deserialize, Serialize};

use crate::catalog::{self, CatalogError};
use crate::dependencies::Conflict;
use crate::loader::LoadError;
use crate::metrics::ReloadOutcome;
use crate::store::StoreError;
use crate::trust::TrustError;

/// How long a signature that names another manifest (or does not parse)
/// is given for the commit to finish — the `.sig` is written first, then
/// the manifest renamed into place — before the pair is refused as it
/// stands.
pub const SIGNATURE_GRACE: Duration = Duration::from_secs(2);

/// The `reason` of a rollback done at start because the process died
/// during a trial.
pub const CRASH_IN_TRIAL: &str = "crash-in-trial";

/// The `reason` of a rollback because the version on trial crashed its
/// plugin host (`isolation = "process"`): the daemon lived, the version
/// did not.
pub const CRASH: &str = "crash";

/// The `reason` of an operator's own rollback.
pub const MANUAL: &str = "manual";

/// Journal event of a version whose `dlopen` or `init` killed the previous
/// process (see [`super::Reloader::recover_interrupted_loads`]).
pub const CRASH_IN_LOAD: &str = "crash-in-load";

/// Why a reload did not switch versions.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The package is unreadable or invalid.
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    /// The library failed verification or the store could not take it.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The library could not be loaded or initialised.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// This version was rolled back from; a newer one is needed.
    #[error(
        "plugin {plugin:?}: version {version} is quarantined (rolled back from, its init timed out, or it crashed the process while loading); publish a newer version"
    )]
    Quarantined {
        /// The plugin.
        plugin: String,
        /// The version.
        version: String,
    },
    /// The signature does not satisfy `[trust]`.
    #[error(transparent)]
    Trust(#[from] TrustError),
    /// Lower than the highest version ever activated, and no rollback names it.
    #[error(
        "plugin {plugin:?}: version {version} is lower than {highest}, the highest version activated; refused as a downgrade (only an explicit rollback may name a lower version)"
    )]
    Downgrade {
        /// The plugin.
        plugin: String,
        /// The package's version.
        version: String,
        /// The highest version activated.
        highest: String,
    },
    /// The switch would leave the active versions with a dependency conflict.
    #[error(
        "plugin {plugin:?} {version}: dependency conflict: {}",
        join_conflicts(conflicts)
    )]
    Dependencies {
        /// The plugin.
        plugin: String,
        /// The package's version.
        version: String,
        /// What blocks it.
        conflicts: Vec<Conflict>,
    },
    /// Same version as the active one, different bytes.
    #[error(
        "plugin {plugin:?}: version {version} is already active with sha256 {active}, the package has {package}; bump the version"
    )]
    VersionReused {
        /// The plugin.
        plugin: String,
        /// The version.
        version: String,
        /// Active object hash.
        active: String,
        /// Package library hash.
        package: String,
    },
}

fn join_conflicts(conflicts: &[Conflict]) -> String {
    conflicts
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

impl ReloadError {
    /// `rejected` for bad input, `failed` for a good package that did not start.
    pub fn outcome(&self) -> ReloadOutcome {
        match self {
            ReloadError::Store(StoreError::Io { .. }) => ReloadOutcome::Failed,
            ReloadError::Load(e) if !e.is_rejection() => ReloadOutcome::Failed,
            _ => ReloadOutcome::Rejected,
        }
    }

    /// The file most relevant to the error, for the log line.
    pub(super) fn file(&self, package_dir: &Path) -> PathBuf {
        match self {
            ReloadError::Catalog(
                CatalogError::ManifestSyntax { path, .. }
                | CatalogError::ManifestInvalid { path, .. }
                | CatalogError::NameMismatch { path, .. }
                | CatalogError::LibraryEscapes { path, .. }
                | CatalogError::ManifestTooLarge { path, .. }
                | CatalogError::NoPackage { path, .. }
                | CatalogError::Read { path, .. }
                | CatalogError::LibraryMissing { path, .. }
                | CatalogError::Unsafe(catalog::UnsafePath { path, .. }),
            )
            | ReloadError::Trust(
                TrustError::Io { path, .. }
                | TrustError::BadKeyFile { path, .. }
                | TrustError::SecretKeyExposed { path, .. }
                | TrustError::KeyExists { path }
                | TrustError::Unsigned { path, .. }
                | TrustError::MalformedSignature { path, .. }
                | TrustError::BadSignature { path, .. },
            )
            | ReloadError::Store(
                StoreError::ChecksumMismatch { library: path, .. }
                | StoreError::Io { path, .. }
                | StoreError::CorruptRefs { path, .. },
            )
            | ReloadError::Load(
                LoadError::Open { path, .. }
                | LoadError::NoDescriptor { path, .. }
                | LoadError::AbiMismatch { path, .. }
                | LoadError::ManifestAbi { path, .. }
                | LoadError::IdentityMismatch { path, .. },
            ) => path.clone(),
            ReloadError::Load(
                LoadError::InitFailed { .. }
                | LoadError::InitTimeout { .. }
                | LoadError::TooManyStuckInits { .. }
                | LoadError::HostFailed { .. }
                | LoadError::HostDied { .. }
                | LoadError::InitKilled { .. },
            )
            | ReloadError::VersionReused { .. }
            | ReloadError::Quarantined { .. }
            | ReloadError::Downgrade { .. }
            | ReloadError::Dependencies { .. } => package_dir.join(catalog::MANIFEST_FILE),
        }
    }
}

/// What one reload attempt came to, as the admin socket, `plugvisor
/// reload` and the logs name it (`as_str`, and the same lowercase word in
/// JSON). The first three are also `plugvisor_reloads_total{outcome}`
/// ([`ReloadOutcome`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttemptOutcome {
    /// The new version serves.
    Success,
    /// The package was refused; the previous version serves on.
    Rejected,
    /// The package looked right but loading it failed.
    Failed,
    /// Nothing to do: the package is what was already acted on.
    Unchanged,
    /// The signature belongs to a commit still in progress; looked at
    /// again after [`SIGNATURE_GRACE`].
    Deferred,
    /// No such plugin: neither configured nor packaged.
    Unknown,
}

impl AttemptOutcome {
    /// The word for it.
    pub const fn as_str(self) -> &'static str {
        match self {
            AttemptOutcome::Success => "success",
            AttemptOutcome::Rejected => "rejected",
            AttemptOutcome::Failed => "failed",
            AttemptOutcome::Unchanged => "unchanged",
            AttemptOutcome::Deferred => "deferred",
            AttemptOutcome::Unknown => "unknown",
        }
    }
}

impl From<ReloadOutcome> for AttemptOutcome {
    fn from(o: ReloadOutcome) -> AttemptOutcome {
        match o {
            ReloadOutcome::Success => AttemptOutcome::Success,
            ReloadOutcome::Rejected => AttemptOutcome::Rejected,
            ReloadOutcome::Failed => AttemptOutcome::Failed,
        }
    }
}

/// What one reload attempt did, as reported to the admin socket.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReloadReport {
    /// The plugin.
    pub plugin: String,
    /// What the attempt came to.
    pub outcome: AttemptOutcome,
    /// Version now serving (after the attempt).
    pub active_version: Option<String>,
    /// Version the package offered.
    pub package_version: Option<String>,
    /// Version serving before.
    pub from_version: Option<String>,
    /// Why, when not a success.
    pub message: Option<String>,
    /// Microseconds from manifest read to new version serving.
    pub total_us: Option<u64>,
    /// Microseconds of the switch itself (dlopen, checks, init, swap).
    pub switch_us: Option<u64>,
}

/// How one reload attempt may deviate from the defaults.
#[derive(Debug, Clone, Default)]
pub struct ReloadOptions {
    /// Re-process the manifest even if its bytes were seen before.
    pub force: bool,
    /// Accept the package if it is this version, even if it is lower than
    /// the highest version ever activated (an explicit rollback).
    pub allow_downgrade_to: Option<Version>,
}
