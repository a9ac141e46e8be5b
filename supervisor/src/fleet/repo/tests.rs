//! The repository as a node sees it: `init`, `add`, `publish`, `rollback`
//! and root rotation end to end, each repository loaded back with tough's
//! client. Kept together (not beside each submodule) as every test goes
//! through the public entry points and several files at once.
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt as _;

use sha2::Digest as _;
use tough::schema::RoleType;
use tough::{Repository, RepositoryLoader, TargetName};

use super::keys::key_id;
use super::*;
use crate::fleet::release::{CUSTOM_KEY, Node, desired};

/// A package directory `PLUGIN` under `root` whose fake library the
/// manifest pins (or, with `tamper`, does not).
fn package(root: &Path, plugin: &str, version: &str, tamper: bool) -> PathBuf {
    let dir = root.join(format!("{plugin}-{version}"));
    std::fs::create_dir_all(&dir).unwrap();
    let library = format!("lib{plugin}-{version}.so");
    let bytes = format!("not really {plugin} {version}").into_bytes();
    let sha = hex::encode(sha2::Sha256::digest(&bytes));
    std::fs::write(dir.join(&library), &bytes).unwrap();
    if tamper {
        std::fs::write(dir.join(&library), b"something else").unwrap();
    }
    std::fs::write(
        dir.join(MANIFEST_FILE),
        format!(
            "name = \"{plugin}\"\nversion = \"{version}\"\nlibrary = \"{library}\"\nsha256 = \"{sha}\"\nabi = 1\n"
        ),
    )
    .unwrap();
    dir
}

/// The repository as a new node loads it, with its datastore (which
/// must outlive it).
struct Loaded {
    repo: Repository,
    _datastore: tempfile::TempDir,
}

impl std::ops::Deref for Loaded {
    type Target = Repository;
    fn deref(&self) -> &Repository {
        &self.repo
    }
}

fn loaded(dir: &Path) -> Loaded {
    try_loaded(dir).unwrap()
}

/// [`loaded`], with tough's error.
fn try_loaded(dir: &Path) -> Result<Loaded, Box<tough::error::Error>> {
    let datastore = tempfile::tempdir().unwrap();
    let root = std::fs::read(dir.join(METADATA_DIR).join(FIRST_ROOT)).unwrap();
    let (m, t) = file_urls(dir).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let repo = runtime
        .block_on(
            RepositoryLoader::new(&root, m, t)
                .datastore(datastore.path())
                .load(),
        )
        .map_err(Box::new)?;
    Ok(Loaded {
        repo,
        _datastore: datastore,
    })
}

fn releases_of(repo: &Repository) -> Vec<Release> {
    repo.targets()
        .signed
        .targets
        .values()
        .filter_map(|t| t.custom.get(CUSTOM_KEY))
        .map(|v| serde_json::from_value(v.clone()).unwrap())
        .collect()
}

fn read_target(repo: &Repository, name: &str) -> Vec<u8> {
    use tough::IntoVec as _;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        repo.read_target(&TargetName::new(name).unwrap())
            .await
            .unwrap()
            .unwrap()
            .into_vec()
            .await
            .unwrap()
    })
}

/// A new repository in `t/repo` with echo 1.0.0 (signed) published:
/// (repository, keys, package, release).
fn one_release_published(t: &Path) -> (PathBuf, PathBuf, PathBuf, Release) {
    let dir = t.join("repo");
    let keys = default_keys(&dir);
    init(&dir, &keys, Duration::from_secs(365 * 24 * 3600)).unwrap();
    let one = package(t, "echo", "1.0.0", false);
    std::fs::write(one.join(SIGNATURE_FILE), b"a signature").unwrap();
    let r1 = add(&dir, &one, NodeSelector::default(), Vec::new()).unwrap();
    publish(&dir, &keys, &Expiry::default()).unwrap();
    (dir, keys, one, r1)
}

#[test]
fn init_add_publish_as_a_node_sees_it() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("repo");
    let keys = default_keys(&dir);
    let report = init(&dir, &keys, Duration::from_secs(365 * 24 * 3600)).unwrap();
    assert!(!report.reused_keys);
    assert_eq!(report.root, dir.join("metadata/1.root.json"));
    assert_eq!(report.published.targets_version, 1);
    assert_eq!(report.key_ids.len(), 4);
    for (_, f) in KEY_FILES {
        let mode = std::fs::metadata(keys.join(f))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{f}");
        let text = std::fs::read_to_string(keys.join(f)).unwrap();
        assert!(text.starts_with("-----BEGIN PRIVATE KEY-----\n"), "{text}");
    }
    assert!(matches!(
        init(&dir, &keys, Duration::from_secs(3600)),
        Err(RepoError::AlreadyInitialised { .. })
    ));
    let repo = loaded(&dir);
    assert!(repo.root().signed.consistent_snapshot);
    assert!(repo.targets().signed.targets.is_empty());

    // Version 1.0.0, signed: three targets.
    let one = package(t.path(), "echo", "1.0.0", false);
    std::fs::write(one.join(SIGNATURE_FILE), b"a signature").unwrap();
    let r1 = add(&dir, &one, NodeSelector::default(), Vec::new()).unwrap();
    assert_eq!(r1.sequence, 1);
    assert_eq!(r1.files.manifest, "echo/1.0.0/plugin.toml");
    assert_eq!(r1.files.library, "echo/1.0.0/libecho-1.0.0.so");
    assert_eq!(
        r1.files.signature.as_deref(),
        Some("echo/1.0.0/plugin.toml.sig")
    );
    let p = publish(&dir, &keys, &Expiry::default()).unwrap();
    assert_eq!(
        (p.targets_version, p.snapshot_version, p.timestamp_version),
        (2, 2, 2)
    );
    assert!(dir.join("metadata/2.targets.json").is_file());
    assert!(dir.join("metadata/2.snapshot.json").is_file());
    let repo = loaded(&dir);
    assert_eq!(repo.targets().signed.version.get(), 2);
    let targets = &repo.targets().signed.targets;
    assert_eq!(targets.len(), 3);
    let lib_bytes = std::fs::read(one.join("libecho-1.0.0.so")).unwrap();
    let lib = &targets[&TargetName::new("echo/1.0.0/libecho-1.0.0.so").unwrap()];
    assert_eq!(lib.length, lib_bytes.len() as u64);
    assert_eq!(
        lib.hashes.sha256.as_ref(),
        sha2::Sha256::digest(&lib_bytes).as_slice()
    );
    assert!(
        lib.custom.is_empty(),
        "custom metadata on the manifest only"
    );
    assert_eq!(read_target(&repo, "echo/1.0.0/libecho-1.0.0.so"), lib_bytes);
    assert_eq!(
        read_target(&repo, "echo/1.0.0/plugin.toml.sig"),
        b"a signature"
    );
    assert_eq!(releases_of(&repo), vec![r1.clone()]);
    // The specification's layout too.
    let sha = hex::encode(sha2::Sha256::digest(&lib_bytes));
    assert!(
        dir.join(format!("targets/echo/1.0.0/{sha}.libecho-1.0.0.so"))
            .is_file()
    );

    // Published bytes are fixed; the same bytes again are fine.
    add(&dir, &one, NodeSelector::default(), Vec::new()).unwrap();
    std::fs::write(one.join(SIGNATURE_FILE), b"another signature").unwrap();
    let err = add(&dir, &one, NodeSelector::default(), Vec::new()).unwrap_err();
    assert!(matches!(err, RepoError::Republished { .. }), "{err}");
    assert!(err.to_string().contains("bump the version"), "{err}");
}

#[test]
fn each_publish_and_a_rollback_make_new_versions_and_the_rollback_is_desired() {
    let t = tempfile::tempdir().unwrap();
    let (dir, keys, _, r1) = one_release_published(t.path());
    assert_eq!(loaded(&dir).targets().signed.version.get(), 2);

    // 1.1.0 in waves, then a rollback to 1.0.0.
    let two = package(t.path(), "echo", "1.1.0", false);
    let wave = Wave {
        seeds_below: 10,
        start: "2020-01-01T00:00:00Z".parse().unwrap(),
    };
    let r2 = add(&dir, &two, NodeSelector::default(), vec![wave]).unwrap();
    assert!(r2.sequence > 1);
    let p = publish(&dir, &keys, &Expiry::default()).unwrap();
    assert_eq!(p.targets_version, 3);
    let node = Node {
        name: "edge-1".into(),
        labels: BTreeMap::new(),
        seed: 3,
    };
    let now = jiff::Timestamp::now();
    let repo = loaded(&dir);
    let all = releases_of(&repo);
    assert_eq!(all.len(), 2);
    assert_eq!(
        desired(&all, "echo", &node, now).unwrap().version,
        r2.version
    );

    let version = r1.version.clone();
    let p = rollback(&dir, &keys, "echo", &version, &Expiry::default()).unwrap();
    assert_eq!(p.targets_version, 4);
    let repo = loaded(&dir);
    assert_eq!(repo.targets().signed.version.get(), 4);
    let all = releases_of(&repo);
    let chosen = desired(&all, "echo", &node, now).unwrap();
    assert_eq!(chosen.version, version);
    assert!(chosen.sequence > r2.sequence && chosen.waves.is_empty());
    let late = Node { seed: 2000, ..node };
    assert_eq!(desired(&all, "echo", &late, now).unwrap().version, version);

    // Nothing new: still new versions (fresh expiry).
    let p = publish(&dir, &keys, &Expiry::default()).unwrap();
    assert_eq!((p.targets_version, p.timestamp_version), (5, 5));
    assert_eq!(loaded(&dir).timestamp().signed.version.get(), 5);

    let err = rollback(
        &dir,
        &keys,
        "echo",
        &semver::Version::new(9, 0, 0),
        &Expiry::default(),
    )
    .unwrap_err();
    assert!(matches!(err, RepoError::UnknownRelease { .. }), "{err}");
}

#[test]
fn a_library_that_is_not_what_its_manifest_pins_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("repo");
    init(&dir, &default_keys(&dir), Duration::from_secs(3600)).unwrap();
    let bad = package(t.path(), "echo", "1.0.0", true);
    let err = add(&dir, &bad, NodeSelector::default(), Vec::new()).unwrap_err();
    assert!(matches!(err, RepoError::LibraryMismatch { .. }), "{err}");
    let s = err.to_string();
    assert!(
        s.contains("libecho-1.0.0.so") && s.contains("plugvisor pack"),
        "{s}"
    );
    assert!(releases(&dir).unwrap().is_empty());
    assert!(!dir.join("store/echo").exists());
}

#[tokio::test]
async fn works_from_inside_a_runtime_and_reuses_keys() {
    let t = tempfile::tempdir().unwrap();
    let keys = t.path().join("keys");
    let first = init(&t.path().join("a"), &keys, Duration::from_secs(3600)).unwrap();
    let second = init(&t.path().join("b"), &keys, Duration::from_secs(3600)).unwrap();
    assert!(second.reused_keys);
    assert_eq!(first.key_ids, second.key_ids);
    std::fs::remove_file(keys.join("snapshot.pem")).unwrap();
    let err = init(&t.path().join("c"), &keys, Duration::from_secs(3600)).unwrap_err();
    assert!(matches!(err, RepoError::PartialKeys { .. }), "{err}");
    // Another repository's keys do not sign this one.
    let other = t.path().join("other-keys");
    init(&t.path().join("d"), &other, Duration::from_secs(3600)).unwrap();
    let err = publish(&t.path().join("a"), &other, &Expiry::default()).unwrap_err();
    assert!(matches!(err, RepoError::KeyNotInRoot { .. }), "{err}");
}
const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);

#[test]
fn a_rotated_root_is_followed_from_the_first_and_signs_with_the_new_keys() {
    let t = tempfile::tempdir().unwrap();
    let (dir, keys, _, r1) = one_release_published(t.path());
    let new_keys = t.path().join("new-keys");

    // The old root key must be the one the root lists.
    let other = t.path().join("other-keys");
    ensure_keys(&other).unwrap();
    let err = rotate_root(&dir, &other, &new_keys, YEAR).unwrap_err();
    assert!(matches!(err, RepoError::KeyNotInRoot { .. }), "{err}");
    assert!(
        err.to_string()
            .contains(&other.join("root.pem").display().to_string()),
        "{err}"
    );
    assert!(!dir.join("metadata/2.root.json").exists());

    let rotated = rotate_root(&dir, &keys, &new_keys, YEAR).unwrap();
    let root = &rotated.root;
    assert!(!root.reused_keys && root.accepted);
    assert_eq!(root.version, 2);
    assert_eq!(root.root, dir.join("metadata/2.root.json"));
    assert_eq!(root.previous, dir.join("metadata/1.root.json"));
    assert_eq!(
        std::fs::read(dir.join("metadata/root.json")).unwrap(),
        std::fs::read(&root.root).unwrap()
    );
    let old_ids = read_role_keys(&keys)
        .unwrap()
        .iter()
        .map(|k| hex::encode(key_id(k).unwrap()))
        .collect::<Vec<_>>();
    let new_ids = read_role_keys(&new_keys)
        .unwrap()
        .iter()
        .map(|k| hex::encode(key_id(k).unwrap()))
        .collect::<Vec<_>>();
    assert!(
        old_ids.iter().all(|id| !new_ids.contains(id)),
        "all new keys"
    );
    assert_eq!(root.key_ids["targets"], new_ids[1]);
    let mut signed_by = root.signed_by.clone();
    signed_by.sort();
    let mut both = vec![old_ids[0].clone(), new_ids[0].clone()];
    both.sort();
    assert_eq!(signed_by, both, "the old and the new root key");
    assert_eq!(rotated.published.targets_version, 3);

    // A node that trusts 1.root.json only walks to 2, and takes
    // metadata the new keys signed.
    let repo = loaded(&dir);
    assert_eq!(repo.root().signed.version.get(), 2);
    assert_eq!(repo.targets().signed.version.get(), 3);
    let signers = |sigs: &[tough::schema::Signature]| {
        sigs.iter()
            .map(|s| hex::encode(&s.keyid))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        signers(&repo.targets().signatures),
        vec![new_ids[1].clone()]
    );
    assert_eq!(
        signers(&repo.snapshot().signatures),
        vec![new_ids[2].clone()]
    );
    assert_eq!(
        signers(&repo.timestamp().signatures),
        vec![new_ids[3].clone()]
    );
    assert_eq!(releases_of(&repo), vec![r1]);

    // The old keys publish no more, and say which root refuses them.
    let err = publish(&dir, &keys, &Expiry::default()).unwrap_err();
    assert!(matches!(err, RepoError::KeyNotInRoot { .. }), "{err}");
    assert!(err.to_string().contains("2.root.json"), "{err}");
    let two = package(t.path(), "echo", "1.1.0", false);
    let r2 = add(&dir, &two, NodeSelector::default(), Vec::new()).unwrap();
    let p = publish(&dir, &new_keys, &Expiry::default()).unwrap();
    assert_eq!(p.targets_version, 4);
    assert_eq!(releases_of(&loaded(&dir)).len(), 2);

    // And again, 2 -> 3, the keys of 2 signing out: still followed
    // from 1.root.json.
    let third = t.path().join("third-keys");
    let rotated = rotate_root(&dir, &new_keys, &third, YEAR).unwrap();
    assert_eq!(rotated.root.version, 3);
    let repo = loaded(&dir);
    assert_eq!(repo.root().signed.version.get(), 3);
    assert!(releases_of(&repo).contains(&r2));

    // The same keys again: the root re-signed, with a new expiry.
    let resigned = rotate_root(&dir, &third, &third, YEAR).unwrap();
    assert!(resigned.root.reused_keys && resigned.root.accepted);
    assert_eq!(resigned.root.signed_by.len(), 1);
    assert_eq!(loaded(&dir).root().signed.version.get(), 4);
}

#[test]
fn a_root_not_signed_by_the_current_root_key_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let (dir, _, _, _) = one_release_published(t.path());
    let attacker = t.path().join("attacker-keys");
    let err = sign_root(&dir, &attacker, &[], YEAR).unwrap_err();
    assert!(matches!(err, RepoError::NoRootSigners { .. }), "{err}");
    let forged = sign_root(&dir, &attacker, &[attacker.join("root.pem")], YEAR).unwrap();
    assert_eq!(forged.version, 2);
    assert!(!forged.accepted);
    assert_eq!(forged.signed_by.len(), 1);
    // The operator's own tooling refuses to publish under it…
    let err = publish(&dir, &attacker, &Expiry::default()).unwrap_err();
    assert!(matches!(err, RepoError::BrokenRootChain { .. }), "{err}");
    assert!(err.to_string().contains("2.root.json"), "{err}");
    // …and a node refuses it, naming the root.
    let err = try_loaded(&dir).err().expect("a forged root 2 is refused");
    let message = err.to_string();
    assert!(
        matches!(
            *err,
            tough::error::Error::VerifyMetadata {
                role: RoleType::Root,
                ..
            }
        ),
        "{message}"
    );
    assert!(message.contains("root"), "{message}");
}
