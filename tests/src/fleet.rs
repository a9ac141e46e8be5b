//! A fleet repository made and signed with `plugvisor repo`, as an
//! operator would (the sync tests and the bench publish through it), and
//! the `[sync]` table of a node that follows it.
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::{
    Daemon, LineClient, Nginx, build_echo_version, echo_version, pack, plugvisor, wait_until,
};

/// A TUF repository on disk (in a temporary directory).
pub struct FleetRepo {
    dir: tempfile::TempDir,
}

impl FleetRepo {
    /// `plugvisor repo init`.
    pub fn init() -> FleetRepo {
        let r = FleetRepo {
            dir: tempfile::tempdir().unwrap(),
        };
        FleetRepo::run(&["init", r.path().to_str().unwrap()]);
        r
    }

    /// The repository directory (`metadata/`, `targets/` are served).
    pub fn path(&self) -> PathBuf {
        self.dir.path().join("repo")
    }

    /// The root a node is given out of band.
    pub fn root(&self) -> PathBuf {
        self.path().join("metadata").join("1.root.json")
    }

    /// `plugvisor repo ARGS`, which must succeed; its output.
    pub fn run(args: &[&str]) -> String {
        let mut all = vec!["repo"];
        all.extend_from_slice(args);
        let os: Vec<&std::ffi::OsStr> = all.iter().map(std::ffi::OsStr::new).collect();
        plugvisor(&os).ok().stdout
    }

    /// Packs echo `version` and adds it as a release (`extra`: its node
    /// selector and waves). Returns the package's size in bytes.
    pub fn add(&self, version: &str, extra: &[&str]) -> u64 {
        let pkg = self.dir.path().join(format!("pkg-{version}"));
        std::fs::create_dir_all(&pkg).unwrap();
        let lib = build_echo_version(version);
        pack(&pkg, &lib, None, &[]).assert_ok();
        let repo = self.path();
        let mut args = vec!["add", repo.to_str().unwrap(), pkg.to_str().unwrap()];
        args.extend_from_slice(extra);
        FleetRepo::run(&args);
        std::fs::read_dir(&pkg)
            .unwrap()
            .flatten()
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum()
    }

    /// `plugvisor repo publish` (`extra`: expiry flags).
    pub fn publish(&self, extra: &[&str]) {
        let repo = self.path();
        let mut args = vec!["publish", repo.to_str().unwrap()];
        args.extend_from_slice(extra);
        FleetRepo::run(&args);
    }

    /// `plugvisor repo rollback echo --to VERSION`.
    pub fn rollback(&self, version: &str) {
        let repo = self.path();
        FleetRepo::run(&["rollback", repo.to_str().unwrap(), "echo", "--to", version]);
    }

    /// The `[sync]` table of node `name` following this repository on
    /// `server`, polling every `interval`.
    pub fn sync_config(
        &self,
        server: &Nginx,
        name: &str,
        seed: u32,
        labels: &str,
        interval: &str,
    ) -> String {
        format!(
            "[sync]\nmetadata_url = \"{}\"\ntargets_url = \"{}\"\nroot = \"{}\"\ninterval = \"{interval}\"\nnode = \"{name}\"\nseed = {seed}\nlabels = {{ {labels} }}\n",
            server.url("metadata"),
            server.url("targets"),
            self.root().display()
        )
    }
}

/// What `plugvisor status` says of echo's fleet sync on `d`: (state,
/// desired, active).
pub fn echo_sync(d: &Daemon) -> Option<(String, String, String)> {
    let s = d.status();
    let p = &s["sync"]["plugins"]["echo"];
    Some((
        p["state"].as_str()?.to_owned(),
        p["desired"].as_str()?.to_owned(),
        p["active"].as_str().unwrap_or("-").to_owned(),
    ))
}

/// The echo version answering on `d`'s `echo-tcp` listener.
pub fn echo_serving(d: &Daemon) -> String {
    let answer = LineClient::connect(d.addr("echo-tcp"))
        .unwrap()
        .call("which")
        .unwrap();
    echo_version(&answer).unwrap_or_default().to_owned()
}

/// Waits (30 s at most) until `d` says echo is synced on `version` and
/// that version answers.
pub fn await_synced(d: &Daemon, version: &str, what: &str) {
    wait_until(Instant::now() + Duration::from_secs(30), what, || {
        echo_sync(d).is_some_and(|(state, desired, active)| {
            state == "synced" && desired == version && active == version
        }) && echo_serving(d) == version
    });
}

/// `plugvisor_sync_errors_total{stage}` on `d`.
pub fn sync_errors(d: &Daemon, stage: &str) -> u64 {
    d.metrics()
        .get("plugvisor_sync_errors_total", &[("stage", stage)])
        .unwrap_or(0.0) as u64
}

/// Sync errors at the metadata stages (timestamp, snapshot, targets).
pub fn metadata_errors(d: &Daemon) -> u64 {
    sync_errors(d, "timestamp") + sync_errors(d, "snapshot") + sync_errors(d, "targets")
}
