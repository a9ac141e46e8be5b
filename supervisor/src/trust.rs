//! Package signatures: ed25519 keys, the detached `plugin.toml.sig`, and
//! the daemon's trust policy (`[trust]`).
//!
//! One chain from key to code: the signature covers the exact bytes of
//! `plugin.toml`, and the manifest pins the library's sha256, which the
//! store checks while it copies the library. So a trusted key vouches for
//! the library without signing the (large) library itself, and tampering
//! with either file breaks the chain: an edited manifest fails the
//! signature, a swapped library fails the pin.
//!
//! # File formats
//!
//! All three are short text files, one value per line, hex lowercase:
//!
//! ```text
//! plugvisor ed25519 secret key v1         (mode 0600; the 32-byte seed)
//! 3f2a…64 hex digits…
//!
//! plugvisor ed25519 public key v1
//! 9c1d…64 hex digits…
//!
//! plugvisor ed25519 signature v1          (plugin.toml.sig)
//! key-id 0123456789abcdef                 (first 8 bytes of sha256(public key))
//! manifest-sha256 …64 hex digits…
//! signature …128 hex digits…
//! ```
//!
//! `key-id` and `manifest-sha256` are hints, not trusted: the signature is
//! verified against every trusted key. `manifest-sha256` lets the daemon
//! tell a signature written for a manifest that has not been renamed into
//! place yet (a commit in progress: the `.sig` is written first) from a
//! signature that is simply wrong.
use std::io::{Read as _, Write as _};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use sha2::{Digest as _, Sha256};

/// File name of the detached signature beside `plugin.toml`.
pub const SIGNATURE_FILE: &str = "plugin.toml.sig";
/// First line of a secret key file.
pub const SECRET_HEADER: &str = "plugvisor ed25519 secret key v1";
/// First line of a public key file.
pub const PUBLIC_HEADER: &str = "plugvisor ed25519 public key v1";
/// First line of a signature file.
pub const SIGNATURE_HEADER: &str = "plugvisor ed25519 signature v1";
/// Largest key or signature file read; anything bigger is not one.
const MAX_SMALL_FILE: u64 = 4096;

/// Why a key, a signature or a package's trust was refused.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// A key or signature file could not be read or written.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A key file is not in the expected format.
    #[error("key file {path}: {message}")]
    BadKeyFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A secret key file may be read by others (as ssh, we refuse to use it).
    #[error(
        "secret key {path} is accessible by group or others (mode {mode:04o}); run `chmod 600 {path}`"
    )]
    SecretKeyExposed {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// Keygen would overwrite an existing file.
    #[error("{path} exists; refusing to overwrite a key (remove it first)")]
    KeyExists {
        /// The file.
        path: PathBuf,
    },
    /// The package has no signature and the policy requires one.
    #[error(
        "plugin {plugin:?}: {path} is not signed (no {SIGNATURE_FILE} beside it) and [trust] require_signature is set"
    )]
    Unsigned {
        /// The plugin.
        plugin: String,
        /// The manifest.
        path: PathBuf,
    },
    /// The signature file is not in the expected format.
    #[error("plugin {plugin:?}: signature {path} is malformed: {message}")]
    MalformedSignature {
        /// The plugin.
        plugin: String,
        /// The signature file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The signature does not verify under any trusted key.
    #[error(
        "plugin {plugin:?}: signature {path} does not verify: {reason} (signed by key {key_id}; trusted: {trusted})"
    )]
    BadSignature {
        /// The plugin.
        plugin: String,
        /// The signature file.
        path: PathBuf,
        /// The key id the signature names.
        key_id: String,
        /// The trusted key ids, comma-separated.
        trusted: String,
        /// Why, in words.
        reason: String,
    },
}

/// A trusted (or generated) public key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    key: VerifyingKey,
    /// Short identifier: hex of the first 8 bytes of sha256(key).
    pub id: String,
}

impl PublicKey {
    fn new(key: VerifyingKey) -> PublicKey {
        let id = hex::encode(&Sha256::digest(key.as_bytes())[..8]);
        PublicKey { key, id }
    }

    /// The public key file's text.
    pub fn to_file_text(&self) -> String {
        format!("{PUBLIC_HEADER}\n{}\n", hex::encode(self.key.as_bytes()))
    }
}

/// A secret key, able to sign manifests.
pub struct SecretKey {
    key: SigningKey,
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretKey")
            .field("public", &self.public().id)
            .finish_non_exhaustive()
    }
}

impl SecretKey {
    /// A new key from the operating system's random source.
    pub fn generate() -> Result<SecretKey, TrustError> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| TrustError::Io {
            action: "reading the system random source for",
            path: PathBuf::from("a new key"),
            source: std::io::Error::other(e.to_string()),
        })?;
        let key = SigningKey::from_bytes(&seed);
        seed.fill(0);
        Ok(SecretKey { key })
    }

    /// Its public half.
    pub fn public(&self) -> PublicKey {
        PublicKey::new(self.key.verifying_key())
    }

    /// The signature file for `manifest` (the exact bytes of `plugin.toml`).
    pub fn sign(&self, manifest: &[u8]) -> String {
        let sig = self.key.sign(manifest);
        format!(
            "{SIGNATURE_HEADER}\nkey-id {}\nmanifest-sha256 {}\nsignature {}\n",
            self.public().id,
            hex::encode(Sha256::digest(manifest)),
            hex::encode(sig.to_bytes())
        )
    }

    fn to_file_text(&self) -> String {
        format!("{SECRET_HEADER}\n{}\n", hex::encode(self.key.to_bytes()))
    }
}

/// A parsed signature file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureFile {
    /// The key id it names (a hint).
    pub key_id: String,
    /// sha256 of the manifest it was made for (a hint).
    pub manifest_sha256: String,
    signature: Signature,
}

impl SignatureFile {
    /// Parses the text of a `plugin.toml.sig`.
    pub fn parse(text: &str) -> Result<SignatureFile, String> {
        let mut lines = text.lines().map(str::trim_end);
        if lines.next() != Some(SIGNATURE_HEADER) {
            return Err(format!("the first line must be {SIGNATURE_HEADER:?}"));
        }
        let mut field = |name: &str, hex_len: usize| -> Result<String, String> {
            let line = lines
                .next()
                .ok_or_else(|| format!("missing the {name} line"))?;
            let value = line
                .strip_prefix(name)
                .and_then(|rest| rest.strip_prefix(' '))
                .ok_or_else(|| format!("expected `{name} …`, found {line:?}"))?;
            if !is_lower_hex(value, hex_len) {
                return Err(format!("{name}: expected {hex_len} lowercase hex digits"));
            }
            Ok(value.to_owned())
        };
        let key_id = field("key-id", 16)?;
        let manifest_sha256 = field("manifest-sha256", 64)?;
        let sig_hex = field("signature", 128)?;
        if lines.any(|l| !l.is_empty()) {
            return Err("unexpected lines after the signature".into());
        }
        let mut bytes = [0u8; 64];
        hex::decode_to_slice(&sig_hex, &mut bytes).map_err(|e| e.to_string())?;
        Ok(SignatureFile {
            key_id,
            manifest_sha256,
            signature: Signature::from_bytes(&bytes),
        })
    }
}

fn is_lower_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn read_small(path: &Path) -> Result<(String, std::fs::Metadata), TrustError> {
    let io = |action| {
        move |source| TrustError::Io {
            action,
            path: path.to_owned(),
            source,
        }
    };
    let f = std::fs::File::open(path).map_err(io("reading"))?;
    let meta = f.metadata().map_err(io("reading"))?;
    let mut text = String::new();
    f.take(MAX_SMALL_FILE)
        .read_to_string(&mut text)
        .map_err(io("reading"))?;
    Ok((text, meta))
}

/// Decodes the one hex line after `header`.
fn key_bytes(path: &Path, text: &str, header: &str) -> Result<[u8; 32], TrustError> {
    let bad = |message: String| TrustError::BadKeyFile {
        path: path.to_owned(),
        message,
    };
    let mut lines = text.lines().map(str::trim_end).filter(|l| !l.is_empty());
    if lines.next() != Some(header) {
        return Err(bad(format!("the first line must be {header:?}")));
    }
    let value = lines
        .next()
        .ok_or_else(|| bad("no key after the header".into()))?;
    if lines.next().is_some() {
        return Err(bad("unexpected lines after the key".into()));
    }
    if !is_lower_hex(value, 64) {
        return Err(bad("expected 64 lowercase hex digits".into()));
    }
    let mut bytes = [0u8; 32];
    hex::decode_to_slice(value, &mut bytes).map_err(|e| bad(e.to_string()))?;
    Ok(bytes)
}

/// Reads a public key file.
pub fn read_public_key(path: &Path) -> Result<PublicKey, TrustError> {
    let (text, _) = read_small(path)?;
    let bytes = key_bytes(path, &text, PUBLIC_HEADER)?;
    let key = VerifyingKey::from_bytes(&bytes).map_err(|e| TrustError::BadKeyFile {
        path: path.to_owned(),
        message: format!("not an ed25519 public key: {e}"),
    })?;
    Ok(PublicKey::new(key))
}

/// Reads a secret key file; refuses one that group or others may access.
pub fn read_secret_key(path: &Path) -> Result<SecretKey, TrustError> {
    let (text, meta) = read_small(path)?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(TrustError::SecretKeyExposed {
            path: path.to_owned(),
            mode,
        });
    }
    let mut bytes = key_bytes(path, &text, SECRET_HEADER)?;
    let key = SigningKey::from_bytes(&bytes);
    bytes.fill(0);
    Ok(SecretKey { key })
}

/// Writes a new key pair: the secret key created with mode 0600 (never
/// wider, not even for a moment), the public key 0644. Refuses to
/// overwrite either file.
pub fn write_key_pair(
    key: &SecretKey,
    secret_path: &Path,
    public_path: &Path,
) -> Result<(), TrustError> {
    for p in [secret_path, public_path] {
        if p.exists() {
            return Err(TrustError::KeyExists { path: p.to_owned() });
        }
    }
    let write = |path: &Path, mode: u32, text: &str| -> Result<(), TrustError> {
        let io = |source| TrustError::Io {
            action: "writing",
            path: path.to_owned(),
            source,
        };
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)
            .map_err(io)?;
        // The umask may have narrowed the mode; set it exactly.
        f.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(io)?;
        f.write_all(text.as_bytes()).map_err(io)?;
        f.sync_all().map_err(io)
    };
    write(secret_path, 0o600, &key.to_file_text())?;
    write(public_path, 0o644, &key.public().to_file_text())
}

/// What the policy concluded about a package.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Signed by this trusted key.
    Signed {
        /// The key's id.
        key_id: String,
    },
    /// No signature, and none is required.
    Unsigned,
    /// A signature is present but no keys are configured to check it.
    Unchecked,
}

/// `[trust]` made usable: the trusted keys and whether a signature is required.
#[derive(Debug, Clone, Default)]
pub struct TrustPolicy {
    keys: Vec<PublicKey>,
    require_signature: bool,
}

impl TrustPolicy {
    /// A policy over `keys`.
    pub fn new(keys: Vec<PublicKey>, require_signature: bool) -> TrustPolicy {
        TrustPolicy {
            keys,
            require_signature,
        }
    }

    /// Reads the key files `[trust] public_keys` names; unsigned packages
    /// are refused if `require_signature`.
    pub fn load(
        public_keys: &[std::path::PathBuf],
        require_signature: bool,
    ) -> Result<TrustPolicy, TrustError> {
        let keys = public_keys
            .iter()
            .map(|p| read_public_key(p))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(TrustPolicy::new(keys, require_signature))
    }

    /// Whether unsigned packages are refused.
    pub fn require_signature(&self) -> bool {
        self.require_signature
    }

    /// The trusted keys.
    pub fn keys(&self) -> &[PublicKey] {
        &self.keys
    }

    /// Checks the signature (if any) of `plugin`'s manifest bytes.
    ///
    /// With trusted keys configured, a present signature must verify under
    /// one of them — a package signed by an unknown key is refused even when
    /// signatures are optional. With none configured, a signature cannot be
    /// checked and is ignored.
    pub fn check(
        &self,
        plugin: &str,
        manifest_path: &Path,
        manifest: &[u8],
        signature: Option<&[u8]>,
    ) -> Result<Verdict, TrustError> {
        let sig_path = manifest_path.with_file_name(SIGNATURE_FILE);
        let Some(signature) = signature else {
            if self.require_signature {
                return Err(TrustError::Unsigned {
                    plugin: plugin.to_owned(),
                    path: manifest_path.to_owned(),
                });
            }
            return Ok(Verdict::Unsigned);
        };
        if self.keys.is_empty() {
            return Ok(Verdict::Unchecked);
        }
        let malformed = |message: String| TrustError::MalformedSignature {
            plugin: plugin.to_owned(),
            path: sig_path.clone(),
            message,
        };
        let text = std::str::from_utf8(signature).map_err(|e| malformed(e.to_string()))?;
        let sig = SignatureFile::parse(text).map_err(malformed)?;
        for key in &self.keys {
            if key.key.verify_strict(manifest, &sig.signature).is_ok() {
                return Ok(Verdict::Signed {
                    key_id: key.id.clone(),
                });
            }
        }
        let actual = hex::encode(Sha256::digest(manifest));
        let reason = if sig.manifest_sha256 != actual {
            format!(
                "it was made for a manifest with sha256 {}, {} has sha256 {actual}",
                sig.manifest_sha256,
                manifest_path.display()
            )
        } else if self.keys.iter().any(|k| k.id == sig.key_id) {
            "the signature is not valid for this manifest under that key".to_owned()
        } else {
            "no trusted key made it".to_owned()
        };
        Err(TrustError::BadSignature {
            plugin: plugin.to_owned(),
            path: sig_path,
            key_id: sig.key_id,
            trusted: self
                .keys
                .iter()
                .map(|k| k.id.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            reason,
        })
    }
}

/// Whether a signature that failed to verify may belong to a commit in
/// progress rather than be wrong: it names a manifest other than
/// `manifest` (the `.sig` is written before the manifest is renamed into
/// place, so the old manifest may still be there), or it does not parse
/// (it may still be being written). A stale or truncated signature looks
/// the same; the reload path tells them apart by waiting.
pub fn may_be_in_progress(manifest: &[u8], signature: &[u8]) -> bool {
    match std::str::from_utf8(signature)
        .ok()
        .and_then(|t| SignatureFile::parse(t).ok())
    {
        None => true,
        Some(s) => s.manifest_sha256 != hex::encode(Sha256::digest(manifest)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MANIFEST: &[u8] = b"name = \"echo\"\nversion = \"1.0.0\"\n";

    fn policy(keys: &[&SecretKey], require: bool) -> TrustPolicy {
        TrustPolicy::new(keys.iter().map(|k| k.public()).collect(), require)
    }

    #[test]
    fn sign_and_verify_round_trip() {
        let k = SecretKey::generate().unwrap();
        let sig = k.sign(MANIFEST);
        let p = policy(&[&k], true);
        let v = p
            .check(
                "echo",
                Path::new("p/echo/plugin.toml"),
                MANIFEST,
                Some(sig.as_bytes()),
            )
            .unwrap();
        assert_eq!(
            v,
            Verdict::Signed {
                key_id: k.public().id
            }
        );
        let parsed = SignatureFile::parse(&sig).unwrap();
        assert_eq!(parsed.key_id.len(), 16);
        assert!(!may_be_in_progress(MANIFEST, sig.as_bytes()));
    }

    #[test]
    fn an_edited_manifest_fails_and_names_the_manifest_hash() {
        let k = SecretKey::generate().unwrap();
        let sig = k.sign(MANIFEST);
        let edited = b"name = \"echo\"\nversion = \"1.0.1\"\n";
        let err = policy(&[&k], false)
            .check(
                "echo",
                Path::new("plugin.toml"),
                edited,
                Some(sig.as_bytes()),
            )
            .unwrap_err();
        assert!(matches!(err, TrustError::BadSignature { .. }), "{err}");
        assert!(err.to_string().contains("made for a manifest"), "{err}");
        assert!(may_be_in_progress(edited, sig.as_bytes()));
        assert!(
            may_be_in_progress(MANIFEST, &sig.as_bytes()[..40]),
            "truncated"
        );
    }

    #[test]
    fn a_flipped_signature_bit_fails() {
        let k = SecretKey::generate().unwrap();
        let sig = k.sign(MANIFEST);
        // Flip one hex digit of the signature itself.
        let pos = sig.rfind(' ').unwrap() + 5;
        let mut bytes = sig.into_bytes();
        bytes[pos] = if bytes[pos] == b'0' { b'1' } else { b'0' };
        let err = policy(&[&k], false)
            .check("echo", Path::new("plugin.toml"), MANIFEST, Some(&bytes))
            .unwrap_err();
        assert!(
            err.to_string().contains("not valid for this manifest"),
            "{err}"
        );
    }

    #[test]
    fn a_wrong_key_fails_and_says_whose_it_is() {
        let signer = SecretKey::generate().unwrap();
        let trusted = SecretKey::generate().unwrap();
        let sig = signer.sign(MANIFEST);
        let err = policy(&[&trusted], false)
            .check(
                "echo",
                Path::new("plugin.toml"),
                MANIFEST,
                Some(sig.as_bytes()),
            )
            .unwrap_err();
        let s = err.to_string();
        assert!(s.contains("no trusted key made it"), "{s}");
        assert!(
            s.contains(&signer.public().id) && s.contains(&trusted.public().id),
            "{s}"
        );
        // Any one trusted key suffices.
        assert!(
            policy(&[&trusted, &signer], true)
                .check(
                    "echo",
                    Path::new("plugin.toml"),
                    MANIFEST,
                    Some(sig.as_bytes())
                )
                .is_ok()
        );
    }

    #[test]
    fn unsigned_is_refused_only_when_required() {
        let k = SecretKey::generate().unwrap();
        let err = policy(&[&k], true)
            .check("echo", Path::new("plugin.toml"), MANIFEST, None)
            .unwrap_err();
        assert!(matches!(err, TrustError::Unsigned { .. }), "{err}");
        assert_eq!(
            policy(&[&k], false)
                .check("echo", Path::new("plugin.toml"), MANIFEST, None)
                .unwrap(),
            Verdict::Unsigned
        );
        // Without keys a signature cannot be checked.
        assert_eq!(
            policy(&[], false)
                .check("echo", Path::new("plugin.toml"), MANIFEST, Some(b"junk"))
                .unwrap(),
            Verdict::Unchecked
        );
    }

    #[test]
    fn malformed_signatures_are_named() {
        let k = SecretKey::generate().unwrap();
        for junk in [
            &b"junk"[..],
            b"plugvisor ed25519 signature v1\nkey-id zz\n",
            b"\xff\xfe",
        ] {
            let err = policy(&[&k], false)
                .check("echo", Path::new("plugin.toml"), MANIFEST, Some(junk))
                .unwrap_err();
            assert!(
                matches!(err, TrustError::MalformedSignature { .. }),
                "{err}"
            );
        }
    }

    #[test]
    fn key_files_round_trip_with_safe_modes() {
        let t = tempfile::tempdir().unwrap();
        let (sk, pk) = (t.path().join("k"), t.path().join("k.pub"));
        let k = SecretKey::generate().unwrap();
        write_key_pair(&k, &sk, &pk).unwrap();
        let mode = std::fs::metadata(&sk).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(read_public_key(&pk).unwrap(), k.public());
        let again = read_secret_key(&sk).unwrap();
        assert_eq!(again.sign(MANIFEST), k.sign(MANIFEST));
        // No overwriting, and an exposed secret key is refused.
        assert!(matches!(
            write_key_pair(&k, &sk, &pk),
            Err(TrustError::KeyExists { .. })
        ));
        std::fs::set_permissions(&sk, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            read_secret_key(&sk),
            Err(TrustError::SecretKeyExposed { mode: 0o644, .. })
        ));
        // A public key file is not a secret key file, and vice versa.
        assert!(matches!(
            read_public_key(&sk),
            Err(TrustError::BadKeyFile { .. })
        ));
    }
}
