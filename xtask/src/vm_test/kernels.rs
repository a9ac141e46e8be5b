//! Debian's kernel images, fetched with apt's own tools into the cache.
//!
//! Each (suite, architecture) gets a private apt configuration under the
//! cache directory — its own sources list, state and cache — so that
//! fetching an arm64 kernel on an amd64 host does not need `dpkg
//! --add-architecture`, and nothing of the host's apt state changes. The
//! metapackage (`linux-image-amd64`, `linux-image-6.12-arm64`, …) names the
//! current image package (`apt-cache depends`), so no ABI number is
//! written down here; `apt-get download` fetches exactly that one, and
//! `dpkg-deb` unpacks only `/boot` from it.
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

use anyhow::{Context as _, Result, bail};

use super::{Arch, KernelSpec};
use crate::util;

/// Package lists older than this are refreshed before a name is resolved.
const LISTS_MAX_AGE: Duration = Duration::from_secs(24 * 3600);
/// Where Debian's archive is.
const MIRROR: &str = "http://deb.debian.org/debian";
const SECURITY_MIRROR: &str = "http://deb.debian.org/debian-security";
/// The archive's signing keys (package `debian-archive-keyring`).
const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// Kernel config options the probes need built in: the guest loads no
/// modules, so one of these as `=m` would leave a probe without its hook
/// (and the guest would report that probe as SKIP or FAIL).
const NEEDED_BUILT_IN: [&str; 6] = [
    "CONFIG_BPF_SYSCALL",
    "CONFIG_BPF_EVENTS",
    "CONFIG_CGROUP_BPF",
    "CONFIG_UPROBE_EVENTS",
    "CONFIG_INET",
    "CONFIG_TRACING",
];

/// A kernel image ready to boot.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// The image package, e.g. `linux-image-6.1.0-56-amd64`.
    pub package: String,
    /// `vmlinuz`.
    pub image: PathBuf,
    /// Config options of [`NEEDED_BUILT_IN`] that are not `=y`.
    pub not_built_in: Vec<String>,
}

/// Resolves, downloads (if not cached) and unpacks the image of `spec`.
///
/// The newest image the metapackage names comes first; when the archive
/// cannot serve it (a mirror without that security upload, say), the
/// images older versions of the metapackage named are tried in turn.
pub fn fetch(cache: &Path, spec: &KernelSpec) -> Result<Kernel> {
    let apt = AptRoot::new(cache, spec.suite, spec.arch)?;
    let fresh = apt.lists_fresh();
    if !fresh {
        if let Err(e) = apt.update() {
            if !apt.has_lists() {
                return Err(e);
            }
            println!("vm-test: warning: {e:#}; using the package lists from an earlier run");
        }
    }
    let debs = cache.join("debs");
    fs::create_dir_all(&debs).with_context(|| format!("creating {}", debs.display()))?;
    let (package, deb) = match first_available(&apt, spec, &debs) {
        Ok(found) => found,
        // Fresh enough by age, but the archive may have moved on since: once more.
        Err(e) if fresh => {
            println!("vm-test: {e:#}; refreshing the package lists");
            apt.update()?;
            first_available(&apt, spec, &debs)?
        }
        Err(e) => return Err(e),
    };
    let dir = cache.join("kernels").join(&package);
    let image = dir.join("vmlinuz");
    let config = dir.join("config");
    if !image.is_file() || !config.is_file() {
        unpack_boot(&deb, &dir)?;
    }
    let config_text =
        fs::read_to_string(&config).with_context(|| format!("reading {}", config.display()))?;
    let not_built_in = NEEDED_BUILT_IN
        .iter()
        .filter(|o| !config_text.lines().any(|l| l == format!("{o}=y")))
        .map(|o| (*o).to_owned())
        .collect();
    Ok(Kernel {
        package,
        image,
        not_built_in,
    })
}

/// The first image package of `spec`'s metapackage that is cached or can
/// be downloaded, and its `.deb`.
fn first_available(apt: &AptRoot, spec: &KernelSpec, debs: &Path) -> Result<(String, PathBuf)> {
    let candidates = apt.candidates(spec.meta)?;
    let mut failures = Vec::new();
    for package in &candidates {
        if let Some(deb) = cached_deb(debs, package, spec.arch)? {
            return Ok((package.clone(), deb));
        }
        match apt.download(package, debs) {
            Ok(deb) => return Ok((package.clone(), deb)),
            Err(e) => {
                println!("vm-test: {e:#}; trying an older image");
                failures.push(format!("{e:#}"));
            }
        }
    }
    bail!(
        "no image of {} could be fetched: {}",
        spec.meta,
        failures.join("; ")
    )
}

/// `<package>_<version>_<arch>.deb` already in `debs`, if any.
fn cached_deb(debs: &Path, package: &str, arch: Arch) -> Result<Option<PathBuf>> {
    let prefix = format!("{package}_");
    let suffix = format!("_{}.deb", arch.debian());
    for entry in fs::read_dir(debs).with_context(|| format!("listing {}", debs.display()))? {
        let name = entry?.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(&prefix) && name.ends_with(&suffix) {
            return Ok(Some(debs.join(name.as_ref())));
        }
    }
    Ok(None)
}

/// Unpacks `boot/vmlinuz-*` and `boot/config-*` of `deb` into `dir` as
/// `vmlinuz` and `config` (the modules, hundreds of MB, stay packed: the
/// probes need none).
fn unpack_boot(deb: &Path, dir: &Path) -> Result<()> {
    let tmp = dir.with_extension("unpacking");
    if tmp.exists() {
        fs::remove_dir_all(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
    }
    fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut dpkg = Command::new("dpkg-deb");
    dpkg.arg("--fsys-tarfile").arg(deb).stdout(Stdio::piped());
    let mut dpkg_child = dpkg
        .spawn()
        .with_context(|| format!("could not start `{}`", util::display(&dpkg)))?;
    let stdout = dpkg_child.stdout.take().expect("stdout is piped");
    let mut tar = Command::new("tar");
    tar.arg("-x")
        .arg("-C")
        .arg(&tmp)
        .args(["--wildcards", "./boot/vmlinuz-*", "./boot/config-*"])
        .stdin(stdout);
    let tar_status = tar
        .status()
        .with_context(|| format!("could not start `{}`", util::display(&tar)))?;
    let dpkg_status = dpkg_child.wait()?;
    if !dpkg_status.success() || !tar_status.success() {
        bail!(
            "unpacking /boot of {} failed (dpkg-deb {dpkg_status}, tar {tar_status})",
            deb.display()
        );
    }
    let boot = tmp.join("boot");
    let mut found = (None, None);
    for entry in fs::read_dir(&boot).with_context(|| format!("listing {}", boot.display()))? {
        let path = entry?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if name.starts_with("vmlinuz-") {
            found.0 = Some(path.clone());
        } else if name.starts_with("config-") {
            found.1 = Some(path.clone());
        }
    }
    let (Some(image), Some(config)) = found else {
        bail!("{} has no /boot/vmlinuz-* and config-*", deb.display());
    };
    fs::rename(&image, tmp.join("vmlinuz"))?;
    fs::rename(&config, tmp.join("config"))?;
    fs::remove_dir_all(&boot)?;
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    fs::rename(&tmp, dir).with_context(|| format!("renaming to {}", dir.display()))?;
    Ok(())
}

/// A private apt configuration for one suite and architecture.
struct AptRoot {
    dir: PathBuf,
    arch: Arch,
}

impl AptRoot {
    fn new(cache: &Path, suite: &str, arch: Arch) -> Result<AptRoot> {
        let dir = cache.join("apt").join(format!("{suite}-{}", arch.debian()));
        for sub in ["state/lists/partial", "cache/archives/partial"] {
            let d = dir.join(sub);
            fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        }
        let a = arch.debian();
        let sources = format!(
            "deb [arch={a} signed-by={KEYRING}] {MIRROR} {suite} main\n\
             deb [arch={a} signed-by={KEYRING}] {MIRROR} {suite}-updates main\n\
             deb [arch={a} signed-by={KEYRING}] {SECURITY_MIRROR} {suite}-security main\n"
        );
        let list = dir.join("sources.list");
        if fs::read_to_string(&list).ok().as_deref() != Some(sources.as_str()) {
            fs::write(&list, sources).with_context(|| format!("writing {}", list.display()))?;
        }
        Ok(AptRoot { dir, arch })
    }

    /// `-o` options that point apt at this root (the host's apt.conf.d,
    /// with any proxy settings, still applies).
    fn options(&self) -> Vec<String> {
        let d = self.dir.display();
        let mut o = vec![
            format!("Dir::Etc::SourceList={d}/sources.list"),
            "Dir::Etc::SourceParts=/nonexistent".to_owned(),
            format!("Dir::State={d}/state"),
            format!("Dir::Cache={d}/cache"),
            format!("APT::Architecture={}", self.arch.debian()),
            format!("APT::Architectures={}", self.arch.debian()),
            "Acquire::Languages=none".to_owned(),
            // Root downloads into a directory the _apt user cannot write.
            "APT::Sandbox::User=root".to_owned(),
            // Nothing else runs apt on this root.
            "Debug::NoLocking=1".to_owned(),
        ];
        // AppStream metadata, which the host's apt.conf.d may enable.
        for t in [
            "DEP-11",
            "DEP-11-icons",
            "DEP-11-icons-small",
            "DEP-11-icons-large",
            "DEP-11-icons-hidpi",
            "DEP-11-icons-large-hidpi",
        ] {
            o.push(format!(
                "Acquire::IndexTargets::deb::{t}::DefaultEnabled=false"
            ));
        }
        o.into_iter().flat_map(|v| ["-o".to_owned(), v]).collect()
    }

    fn lists(&self) -> Vec<PathBuf> {
        fs::read_dir(self.dir.join("state/lists"))
            .map(|rd| {
                rd.filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.to_string_lossy().contains("_Packages"))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn has_lists(&self) -> bool {
        !self.lists().is_empty()
    }

    fn lists_fresh(&self) -> bool {
        let newest = self
            .lists()
            .iter()
            .filter_map(|p| fs::metadata(p).ok()?.modified().ok())
            .max();
        newest.is_some_and(|t| {
            SystemTime::now()
                .duration_since(t)
                .is_ok_and(|age| age < LISTS_MAX_AGE)
        })
    }

    fn update(&self) -> Result<()> {
        self.apt_get(&["update"], &self.dir)
    }

    /// Runs `apt-get` on this root; the progress line and the error name
    /// only what differs from run to run (the options are in [`Self::options`]).
    fn apt_get(&self, args: &[&str], dir: &Path) -> Result<()> {
        let what = format!("apt-get {} (root {})", args.join(" "), self.dir.display());
        println!("$ {what}");
        let status = Command::new("apt-get")
            .args(self.options())
            .args(args)
            .current_dir(dir)
            .status()
            .with_context(|| format!("could not start `{what}`"))?;
        if !status.success() {
            bail!("`{what}` failed ({status})");
        }
        Ok(())
    }

    /// The image packages the versions of metapackage `meta` depend on,
    /// the candidate version's first.
    fn candidates(&self, meta: &str) -> Result<Vec<String>> {
        let mut show = Command::new("apt-cache");
        show.args(self.options()).args(["show", meta]);
        let out = util::output(&mut show)
            .map_err(|_| anyhow::anyhow!("`apt-cache show {meta}` failed: no such package?"))?;
        let mut names = Vec::new();
        // `apt-cache depends` names the candidate's; `show` lists them all.
        let mut depends = Command::new("apt-cache");
        depends.args(self.options()).args(["depends", meta]);
        if let Some(first) = util::output(&mut depends)
            .ok()
            .as_deref()
            .and_then(parse_depends)
        {
            names.push(first);
        }
        for stanza in out.split("\n\n") {
            if let Some(name) = parse_depends(stanza)
                && !names.contains(&name)
            {
                names.push(name);
            }
        }
        if names.is_empty() {
            bail!("no version of {meta} names a linux-image package");
        }
        Ok(names)
    }

    fn download(&self, package: &str, into: &Path) -> Result<PathBuf> {
        self.apt_get(&["download", package], into)?;
        cached_deb(into, package, self.arch)?
            .with_context(|| format!("apt-get download {package} left no .deb"))
    }
}

/// The first `Depends: linux-image-…` of `apt-cache depends` output, or of
/// one `apt-cache show` stanza (`Depends: linux-image-5.10.0-32-arm64 (= 5.10.223-1), …`).
fn parse_depends(out: &str) -> Option<String> {
    out.lines().find_map(|l| {
        let deps = l.trim().trim_start_matches('|').strip_prefix("Depends:")?;
        deps.split([',', '|']).find_map(|d| {
            let name = d.split_whitespace().next()?;
            name.starts_with("linux-image-").then(|| name.to_owned())
        })
    })
}

#[cfg(test)]
mod tests {
    use super::parse_depends;

    #[test]
    fn resolves_the_metapackage() {
        let out = "linux-image-6.12-arm64\n  Depends: linux-image-6.12.117+deb12-arm64\n";
        assert_eq!(
            parse_depends(out).as_deref(),
            Some("linux-image-6.12.117+deb12-arm64")
        );
        assert_eq!(
            parse_depends(
                "linux-image-amd64\n  Depends: kmod\n  Depends: linux-image-6.1.0-56-amd64\n"
            )
            .as_deref(),
            Some("linux-image-6.1.0-56-amd64")
        );
        assert_eq!(parse_depends("x\n"), None);
        let show = "Package: linux-image-arm64\nVersion: 5.10.223-1\n\
                    Depends: linux-image-5.10.0-32-arm64 (= 5.10.223-1)\n";
        assert_eq!(
            parse_depends(show).as_deref(),
            Some("linux-image-5.10.0-32-arm64")
        );
    }
}
