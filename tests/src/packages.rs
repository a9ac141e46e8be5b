//! Plugin packages as an operator installs them into `plugins_dir`: the
//! library, the manifest renamed into place last (the commit point), and
//! optionally a detached signature — with deliberate defects on request,
//! for the tests of what the daemon refuses.
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

/// Deliberate defects for a package under test.
#[derive(Debug, Default, Clone)]
pub struct PackageTweaks {
    /// Write this sha256 instead of the real one.
    pub sha256: Option<String>,
    /// Write this `library` value instead of the file name.
    pub library: Option<String>,
    /// Write this version instead of the real one.
    pub version: Option<String>,
    /// Write this `abi` instead of 1.
    pub abi: Option<u32>,
    /// Write these bytes as the manifest, verbatim.
    pub raw_manifest: Option<String>,
    /// Append these lines to the manifest (`conflicts = …`, `[requires]` …).
    pub extra: Option<String>,
    /// Sign the manifest with this secret key (`plugvisor keygen`'s file):
    /// `plugin.toml.sig` is written before the manifest is renamed into place.
    pub sign_with: Option<PathBuf>,
}

/// The detached signature (`plugin.toml.sig`) of `manifest` under the
/// secret key file `key`, in the format `plugvisor pack` writes — for
/// packages `pack` cannot make (a library that does not load, a manifest
/// that lies).
pub fn sign_manifest(key: &Path, manifest: &[u8]) -> String {
    let text = std::fs::read_to_string(key).unwrap();
    let seed: [u8; 32] = hex::decode(text.lines().nth(1).expect("key line").trim())
        .unwrap()
        .try_into()
        .expect("a 32-byte seed");
    let key = ed25519_dalek::SigningKey::from_bytes(&seed);
    let signature = ed25519_dalek::Signer::sign(&key, manifest);
    format!(
        "plugvisor ed25519 signature v1\nkey-id {}\nmanifest-sha256 {}\nsignature {}\n",
        hex::encode(&Sha256::digest(key.verifying_key().as_bytes())[..8]),
        hex::encode(Sha256::digest(manifest)),
        hex::encode(signature.to_bytes())
    )
}

/// sha256 of a file, hex.
pub fn sha256_file(p: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(p).unwrap()))
}

/// Installs a package the way an operator does: the library under a new
/// file name, then the manifest renamed into place (the commit point).
pub fn install_package(
    plugins_dir: &Path,
    name: &str,
    version: &str,
    lib: &Path,
    t: &PackageTweaks,
) {
    let dir = plugins_dir.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let lib_name = format!("lib{name}-{version}-{}.so", &sha256_file(lib)[..8]);
    std::fs::copy(lib, dir.join(&lib_name)).unwrap();
    let manifest = t.raw_manifest.clone().unwrap_or_else(|| {
        format!(
            "name = \"{name}\"\nversion = \"{}\"\nlibrary = \"{}\"\nsha256 = \"{}\"\nabi = {}\n{}",
            t.version.as_deref().unwrap_or(version),
            t.library.as_deref().unwrap_or(&lib_name),
            t.sha256.clone().unwrap_or_else(|| sha256_file(lib)),
            t.abi.unwrap_or(1),
            t.extra.as_deref().unwrap_or_default()
        )
    });
    if let Some(key) = &t.sign_with {
        let sig = dir.join(".plugin.toml.sig.tmp");
        std::fs::write(&sig, sign_manifest(key, manifest.as_bytes())).unwrap();
        std::fs::rename(&sig, dir.join("plugin.toml.sig")).unwrap();
    }
    let tmp = dir.join(".plugin.toml.tmp");
    std::fs::write(&tmp, manifest).unwrap();
    std::fs::rename(&tmp, dir.join("plugin.toml")).unwrap();
}

/// Moves a package prepared in `staging` into `plugins_dir/name` in the
/// contract's order: every other file first, `plugin.toml` renamed into
/// place last.
pub fn drop_package(staging: &Path, plugins_dir: &Path, name: &str) {
    let dir = plugins_dir.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let mut manifest = None;
    for e in std::fs::read_dir(staging).unwrap() {
        let e = e.unwrap();
        if e.file_name() == "plugin.toml" {
            manifest = Some(e.path());
        } else {
            std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
        }
    }
    let manifest = manifest.expect("staging has a plugin.toml");
    let tmp = dir.join(".plugin.toml.tmp");
    std::fs::copy(manifest, &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("plugin.toml")).unwrap();
}
