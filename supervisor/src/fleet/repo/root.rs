//! Root metadata: the first root `init` signs, and root rotation —
//! `N+1.root.json` listing new keys, signed by root N's root key and its
//! own — plus reading the latest root and checking the chain of roots a
//! node walks from `1.root.json` (TUF 1.0 §5.3.4, 5.3.5).
use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroU64;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use tough::editor::signed::SignedRole;
use tough::schema::{KeyHolder, RoleKeys, RoleType, Root, Signed};

use super::keys::{
    KEY_FILES, KeyFile, check_keys, ensure_keys, key_id, read_key, read_role_keys, role_name,
    sources,
};
use super::publish::expires_at;
use super::store::{sync_dir, write_file};
use super::{
    Expiry, FIRST_ROOT, METADATA_DIR, Published, ROOT_FILE, RepoError, io, publish, run_async, tuf,
};

/// The TUF specification version the metadata follows (tough's).
const SPEC_VERSION: &str = "1.0.0";

/// What [`sign_root`] wrote.
#[derive(Debug, Clone, Serialize)]
pub struct RootSigned {
    /// The new root, `DIR/metadata/N+1.root.json` (`root.json` is the same
    /// bytes).
    pub root: PathBuf,
    /// Its version, N+1.
    pub version: u64,
    /// The root it follows, `N.root.json`.
    pub previous: PathBuf,
    /// The key directory it lists.
    pub keys: PathBuf,
    /// Whether the keys were there already (and used) rather than made.
    pub reused_keys: bool,
    /// Each role's key id, as the new root lists it.
    pub key_ids: BTreeMap<String, String>,
    /// The key ids that signed it.
    pub signed_by: Vec<String>,
    /// When the new root expires.
    pub root_expires: jiff::Timestamp,
    /// Whether a client that trusts root N takes it (TUF 1.0 §5.3.4): it
    /// carries the signature of a threshold of root N's root keys and of
    /// its own. `false` is a root no node will follow.
    pub accepted: bool,
}

/// What [`rotate_root`] did.
#[derive(Debug, Clone, Serialize)]
pub struct Rotated {
    /// The new root.
    pub root: RootSigned,
    /// The targets, snapshot and timestamp signed with the new keys.
    pub published: Published,
}

/// Rotates every key of the repository (TUF 1.0 §5.3.4): makes four new
/// keys in `new_keys` (or uses the four there), writes root N+1 listing
/// them — signed by the root key in `old_keys`, which must be the one the
/// latest root N lists, and by the new root key, as a client that trusts N
/// requires — then publishes targets, snapshot and timestamp signed with
/// the new keys. Later publishes take `new_keys`. Nodes keep their
/// `1.root.json`: tough walks from it to the latest root.
pub fn rotate_root(
    dir: &Path,
    old_keys: &Path,
    new_keys: &Path,
    root_expires: Duration,
) -> Result<Rotated, RepoError> {
    let metadata = dir.join(METADATA_DIR);
    let (root_path, root) = latest_root(dir, &metadata)?;
    let (_, root_file) = KEY_FILES[0];
    let old_root_key = old_keys.join(root_file);
    check_keys(
        &root_path,
        &root,
        &[(RoleType::Root, read_key("root", &old_root_key)?)],
    )?;
    let signed = sign_root(
        dir,
        new_keys,
        &[old_root_key, new_keys.join(root_file)],
        root_expires,
    )?;
    if !signed.accepted {
        return Err(RepoError::Verify {
            path: signed.root,
            message: format!(
                "a client trusting {} would not take it",
                root_path.display()
            ),
        });
    }
    let published = publish(dir, new_keys, &Expiry::default())?;
    Ok(Rotated {
        root: signed,
        published,
    })
}

/// Writes root N+1 (N: the latest root in `DIR/metadata`) listing the four
/// keys of `new_keys` (made there unless all four are), valid for
/// `root_expires`, signed by exactly the key files `signers` — whether or
/// not that makes a root clients take: [`RootSigned::accepted`] says. As
/// `N+1.root.json`, then `root.json`. [`rotate_root`] signs with the old
/// and the new root key; signing with the new one only is what an attacker
/// without the old root key can do, and nodes refuse it.
pub fn sign_root(
    dir: &Path,
    new_keys: &Path,
    signers: &[PathBuf],
    root_expires: Duration,
) -> Result<RootSigned, RepoError> {
    let metadata = dir.join(METADATA_DIR);
    let (previous_path, previous) = latest_root(dir, &metadata)?;
    if signers.is_empty() {
        return Err(RepoError::NoRootSigners {
            root: previous_path,
        });
    }
    let reused_keys = ensure_keys(new_keys)?;
    let keys = read_role_keys(new_keys)?;
    let signers = signers
        .iter()
        .map(|p| read_key("root", p))
        .collect::<Result<Vec<_>, _>>()?;
    let version = previous.signed.version.saturating_add(1);
    let expires = expires_at(jiff::Timestamp::now(), root_expires, "root")?;
    let (root, key_ids) = build_root(&keys, version, expires)?;
    let signed = run_async(dir, || sign_root_with(root, &signers))?;
    let new = signed.signed();
    let accepted = previous.signed.verify_role(new).is_ok() && new.signed.verify_role(new).is_ok();
    let path = metadata.join(format!("{version}.root.json"));
    write_file(&path, signed.buffer(), 0o644)?;
    write_file(&metadata.join(ROOT_FILE), signed.buffer(), 0o644)?;
    sync_dir(&metadata)?;
    Ok(RootSigned {
        root: path,
        version: version.get(),
        previous: previous_path,
        keys: new_keys.to_owned(),
        reused_keys,
        key_ids,
        signed_by: new
            .signatures
            .iter()
            .map(|s| hex::encode(&s.keyid))
            .collect(),
        root_expires: expires,
        accepted,
    })
}

/// Builds and signs the first root, writes it as `1.root.json` and
/// `root.json`; returns each role's key id.
pub(super) async fn write_root(
    metadata: &Path,
    keys: &[KeyFile],
    expires: jiff::Timestamp,
) -> Result<BTreeMap<String, String>, RepoError> {
    let (root, ids) = build_root(keys, NonZeroU64::MIN, expires)?;
    let root_key = keys
        .iter()
        .zip(KEY_FILES)
        .find(|(_, (role, _))| *role == RoleType::Root)
        .map(|(k, _)| k)
        .expect("the root key is read");
    let signed = sign_root_with(root, std::slice::from_ref(root_key)).await?;
    write_file(&metadata.join(FIRST_ROOT), signed.buffer(), 0o644)?;
    write_file(&metadata.join(ROOT_FILE), signed.buffer(), 0o644)?;
    Ok(ids)
}

/// The root of version `version` listing `keys` (in [`KEY_FILES`] order),
/// one per role with threshold 1, consistent snapshots on; and each role's
/// key id.
fn build_root(
    keys: &[KeyFile],
    version: NonZeroU64,
    expires: jiff::Timestamp,
) -> Result<(Root, BTreeMap<String, String>), RepoError> {
    let mut root = Root {
        spec_version: SPEC_VERSION.to_owned(),
        consistent_snapshot: true,
        version,
        expires,
        keys: HashMap::new(),
        roles: HashMap::new(),
        _extra: HashMap::new(),
    };
    let mut ids = BTreeMap::new();
    for (key, (role, _)) in keys.iter().zip(KEY_FILES) {
        let id = key_id(key)?;
        ids.insert(role_name(role).to_owned(), hex::encode(&id));
        root.keys.insert(id.clone(), key.public.clone());
        root.roles.insert(
            role,
            RoleKeys {
                keyids: vec![id],
                threshold: NonZeroU64::MIN,
                _extra: HashMap::new(),
            },
        );
    }
    Ok((root, ids))
}

/// Signs `root` with exactly `signers` (each once), whether or not the
/// root lists them: tough's editor signs a role only with keys listed for
/// it, so the keys are listed for root in a copy that only says who signs.
async fn sign_root_with(root: Root, signers: &[KeyFile]) -> Result<SignedRole<Root>, RepoError> {
    let first = signers.first().expect("a root has a signer");
    let mut holder = root.clone();
    let mut ids = Vec::new();
    for k in signers {
        let id = key_id(k)?;
        holder.keys.insert(id.clone(), k.public.clone());
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
    holder.roles.insert(
        RoleType::Root,
        RoleKeys {
            keyids: ids.clone(),
            threshold: NonZeroU64::MIN,
            _extra: HashMap::new(),
        },
    );
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let signed = SignedRole::new(root, &KeyHolder::Root(holder), &sources(signers), &rng)
        .await
        .map_err(tuf("signing the root with", &first.path))?;
    // tough checks no threshold for a root (a rotated one is signed by two
    // roots' keys): every signer must have signed.
    if signed.signed().signatures.len() != ids.len() {
        return Err(RepoError::Verify {
            path: first.path.clone(),
            message: format!(
                "the root carries {} signatures, {} keys were to sign it",
                signed.signed().signatures.len(),
                ids.len()
            ),
        });
    }
    Ok(signed)
}

/// The newest `N.root.json` in `metadata`.
pub(super) fn latest_root(
    dir: &Path,
    metadata: &Path,
) -> Result<(PathBuf, Signed<Root>), RepoError> {
    let entries = std::fs::read_dir(metadata).map_err(io("listing", metadata))?;
    let newest = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let n: u64 = name.strip_suffix(".root.json")?.parse().ok()?;
            Some((n, e.path()))
        })
        .max_by_key(|(n, _)| *n)
        .map(|(_, p)| p)
        .ok_or_else(|| RepoError::NotInitialised {
            dir: dir.to_owned(),
            missing: metadata.join(FIRST_ROOT),
        })?;
    let root = read_root(&newest)?;
    Ok((newest, root))
}

fn read_root(path: &Path) -> Result<Signed<Root>, RepoError> {
    let bytes = std::fs::read(path).map_err(io("reading", path))?;
    serde_json::from_slice(&bytes).map_err(|e| RepoError::Verify {
        path: path.to_owned(),
        message: format!("not a signed root: {e}"),
    })
}

/// Refuses to publish under a root no node reaches: each `N.root.json`
/// from 2 to `latest` must carry the signature of the root key of the one
/// before and of its own, and say its version, as a client checks when it
/// walks them (TUF 1.0 §5.3.4, 5.3.5).
pub(super) fn check_root_chain(metadata: &Path, latest: u64) -> Result<(), RepoError> {
    let mut previous_path = metadata.join(FIRST_ROOT);
    let mut previous = read_root(&previous_path)?;
    for version in 2..=latest {
        let path = metadata.join(format!("{version}.root.json"));
        let root = read_root(&path)?;
        let chained = root.signed.version.get() == version
            && previous.signed.verify_role(&root).is_ok()
            && root.signed.verify_role(&root).is_ok();
        if !chained {
            return Err(RepoError::BrokenRootChain {
                root: path,
                previous: previous_path,
            });
        }
        (previous_path, previous) = (path, root);
    }
    Ok(())
}
