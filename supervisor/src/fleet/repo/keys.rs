//! The repository's keys on disk: one Ed25519 key per top-level role in
//! KEYDIR (`root.pem`, `targets.pem`, `snapshot.pem`, `timestamp.pem`,
//! PKCS#8 in PEM), made by `init` (or `rotate-root`) and read back as
//! tough signs with them, and the check that a key is the one a root
//! lists for its role. Split out of the repository module so the secret
//! material is handled in one file.
use std::fmt;
use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};

use tough::key_source::KeySource;
use tough::schema::decoded::{Decoded, Hex};
use tough::schema::{RoleType, Root, Signed};
use tough::sign::Sign;

use super::store::write_file;
use super::{RepoError, io};

/// The key file of each top-level role, in KEYDIR.
pub(super) const KEY_FILES: [(RoleType, &str); 4] = [
    (RoleType::Root, "root.pem"),
    (RoleType::Targets, "targets.pem"),
    (RoleType::Snapshot, "snapshot.pem"),
    (RoleType::Timestamp, "timestamp.pem"),
];
/// The roles that sign a publish: all but root, which stays offline.
pub(super) const ONLINE_ROLES: [RoleType; 3] =
    [RoleType::Targets, RoleType::Snapshot, RoleType::Timestamp];
/// The PEM label of a PKCS#8 private key.
const PEM_LABEL: &str = "PRIVATE KEY";

pub(super) fn role_name(role: RoleType) -> &'static str {
    match role {
        RoleType::Root => "root",
        RoleType::Targets => "targets",
        RoleType::Snapshot => "snapshot",
        RoleType::Timestamp => "timestamp",
        RoleType::DelegatedTargets => "delegated-targets",
    }
}

/// Makes the four keys in `keys` unless all are there; `Ok(true)` when
/// they were there.
pub(super) fn ensure_keys(keys: &Path) -> Result<bool, RepoError> {
    let missing: Vec<&str> = KEY_FILES
        .iter()
        .map(|(_, f)| *f)
        .filter(|f| !keys.join(f).exists())
        .collect();
    if missing.is_empty() {
        return Ok(true);
    }
    if missing.len() != KEY_FILES.len() {
        return Err(RepoError::PartialKeys {
            keys: keys.to_owned(),
            missing: missing.join(", "),
        });
    }
    // Secret keys: a directory of their own, private to the operator.
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(keys)
        .map_err(io("creating", keys))?;
    let rng = aws_lc_rs::rand::SystemRandom::new();
    for (role, file) in KEY_FILES {
        let path = keys.join(file);
        // PKCS#8 v1: what `openssl genpkey -algorithm ED25519` writes and
        // reads, so the keys can be moved to other tools.
        let der = aws_lc_rs::signature::Ed25519KeyPair::generate_pkcs8v1(&rng).map_err(|_| {
            RepoError::KeyGenerate {
                role: role_name(role),
                path: path.clone(),
            }
        })?;
        write_file(&path, pem_encode(PEM_LABEL, der.as_ref()).as_bytes(), 0o600)?;
    }
    Ok(false)
}

/// A key file read and checked: PKCS#8 in PEM (as `init` writes) or DER.
#[derive(Clone)]
pub(super) struct KeyFile {
    pub(super) role: &'static str,
    pub(super) path: PathBuf,
    der: Vec<u8>,
    pub(super) public: tough::schema::key::Key,
}

// Not derived: the DER is the secret key.
impl fmt::Debug for KeyFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyFile")
            .field("role", &self.role)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

pub(super) fn read_key(role: &'static str, path: &Path) -> Result<KeyFile, RepoError> {
    let bad = |message: String| RepoError::Key {
        role,
        path: path.to_owned(),
        message,
    };
    let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    // tough's `parse_keypair` reads Ed25519 keys as DER only (PEM only for
    // RSA), so the PEM armour comes off here.
    let der = if bytes.starts_with(b"-----BEGIN") {
        let text = std::str::from_utf8(&bytes).map_err(|_| bad("not UTF-8 PEM".into()))?;
        pem_decode(PEM_LABEL, text).map_err(bad)?
    } else {
        bytes
    };
    let public = tough::sign::parse_keypair(&der)
        .map_err(|e| bad(format!("not a PKCS#8 Ed25519 or ECDSA key: {e}")))?
        .tuf_key();
    Ok(KeyFile {
        role,
        path: path.to_owned(),
        der,
        public,
    })
}

/// A [`KeyFile`] as tough signs with it.
#[derive(Debug)]
struct KeyFileSource(KeyFile);

#[tough::async_trait]
impl KeySource for KeyFileSource {
    async fn as_sign(
        &self,
    ) -> Result<Box<dyn Sign>, Box<dyn std::error::Error + Send + Sync + 'static>> {
        Ok(Box::new(tough::sign::parse_keypair(&self.0.der)?))
    }

    async fn write(
        &self,
        _value: &str,
        _key_id_hex: &str,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        Err(format!("{} is not rewritten by plugvisor", self.0.path.display()).into())
    }
}

pub(super) fn sources<'a>(keys: impl IntoIterator<Item = &'a KeyFile>) -> Vec<Box<dyn KeySource>> {
    keys.into_iter()
        .map(|k| Box::new(KeyFileSource(k.clone())) as Box<dyn KeySource>)
        .collect()
}

pub(super) fn key_id(key: &KeyFile) -> Result<Decoded<Hex>, RepoError> {
    key.public.key_id().map_err(|e| RepoError::Key {
        role: key.role,
        path: key.path.clone(),
        message: format!("computing its key id: {e}"),
    })
}

/// The four keys of `keys`, in [`KEY_FILES`] order.
pub(super) fn read_role_keys(keys: &Path) -> Result<Vec<KeyFile>, RepoError> {
    KEY_FILES
        .iter()
        .map(|(role, file)| read_key(role_name(*role), &keys.join(file)))
        .collect()
}

/// Refuses keys the root does not list for their role, naming the file
/// (tough would only say that no key was found).
pub(super) fn check_keys(
    root_path: &Path,
    root: &Signed<Root>,
    keys: &[(RoleType, KeyFile)],
) -> Result<(), RepoError> {
    for (role, key) in keys {
        let listed = root.signed.roles.get(role).is_some_and(|rk| {
            rk.keyids
                .iter()
                .any(|id| root.signed.keys.get(id) == Some(&key.public))
        });
        if !listed {
            return Err(RepoError::KeyNotInRoot {
                role: key.role,
                path: key.path.clone(),
                root: root_path.to_owned(),
            });
        }
    }
    Ok(())
}

/// RFC 7468 text (the `pem` crate tough itself uses).
fn pem_encode(label: &str, der: &[u8]) -> String {
    pem::encode_config(
        &pem::Pem::new(label, der.to_vec()),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

/// The DER inside `text`, which must be one `label` block.
fn pem_decode(label: &str, text: &str) -> Result<Vec<u8>, String> {
    let p = pem::parse(text).map_err(|e| e.to_string())?;
    if p.tag() != label {
        return Err(format!("a {:?} block, not {label:?}", p.tag()));
    }
    Ok(p.into_contents())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_round_trips() {
        assert!(pem_encode("X", b"Man").contains("\nTWFu\n"));
        assert!(pem_encode("X", b"Ma").contains("\nTWE=\n"));
        for len in [0, 1, 2, 3, 47, 48, 49, 100] {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 37 % 256) as u8).collect();
            let text = pem_encode(PEM_LABEL, &bytes);
            assert!(text.lines().all(|l| l.len() <= 64));
            assert_eq!(pem_decode(PEM_LABEL, &text).unwrap(), bytes, "{len}");
        }
        assert!(
            pem_decode(
                PEM_LABEL,
                "-----BEGIN PRIVATE KEY-----\n*\n-----END PRIVATE KEY-----"
            )
            .is_err()
        );
    }
}
