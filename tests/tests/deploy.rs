//! The packaging in `deploy/`, checked by the tools that would reject it:
//! the systemd unit by `systemd-analyze verify`, the Kubernetes manifests
//! by `kubernetes-validate` against the API schemas it ships (offline), and
//! the configs both carry by `plugvisor run --check`. Each checker is first
//! shown a broken copy it must reject, so a checker that silently accepts
//! everything fails the test instead of passing it.
use std::path::{Path, PathBuf};
use std::process::Command;

use plugvisor_tests::{binary, target_dir, tool};
use serde_json::Value;

/// Kubernetes versions the manifests must be valid for: the oldest the
/// validator ships (edge clusters lag) and the newest.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.25.0", "1.37.0"];

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// `plugvisor run --config <text> --check`.
fn check_config(text: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("plugvisor.toml");
    std::fs::write(&path, text).unwrap();
    run(Command::new(binary())
        .args(["run", "--config"])
        .arg(&path)
        .arg("--check"))
}

/// The value of a top-level `key = "value"` line of a TOML text.
fn toml_string(text: &str, key: &str) -> String {
    text.lines()
        .find_map(|l| {
            let (k, v) = l.split_once('=')?;
            (k.trim() == key).then(|| v.trim().trim_matches('"').to_owned())
        })
        .unwrap_or_else(|| panic!("no {key} in\n{text}"))
}

/// Whether the systemd tools can run here; says why not.
fn systemd_analyze() -> Option<PathBuf> {
    let Ok(path) = tool("systemd-analyze") else {
        eprintln!(
            "SKIP systemd unit: systemd-analyze is not installed (cargo xtask setup installs the systemd package)"
        );
        return None;
    };
    match Command::new(&path).arg("--version").output() {
        Ok(out) if out.status.success() => Some(path),
        other => {
            eprintln!("SKIP systemd unit: systemd-analyze cannot run in this container: {other:?}");
            None
        }
    }
}

/// `systemd-analyze verify` of `unit` (text) with `/usr/bin/plugvisor`
/// pointed at the binary under test (verify checks that ExecStart exists).
/// Passing means exit 0 and not one warning.
fn verify_unit(analyze: &Path, unit: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("plugvisor.service");
    let unit = unit.replace("/usr/bin/plugvisor", &binary().display().to_string());
    std::fs::write(&path, unit).unwrap();
    let (ok, out) = run(Command::new(analyze)
        .args(["verify", "--man=no"])
        .arg(&path));
    (ok && out.trim().is_empty(), out)
}

#[test]
fn systemd_unit_verifies_and_its_config_is_valid() {
    let unit = std::fs::read_to_string(deploy_dir().join("systemd/plugvisor.service")).unwrap();
    for line in [
        "Type=notify",
        // The upgrade's new process sends MAINPID= and READY=1.
        "NotifyAccess=all",
        "WatchdogSec=",
        "ExecReload=/usr/bin/plugvisor upgrade --config /etc/plugvisor/plugvisor.toml",
        "ExecStart=/usr/bin/plugvisor ",
    ] {
        assert!(
            unit.lines().any(|l| l.starts_with(line)),
            "the unit has no {line:?}"
        );
    }
    let config = std::fs::read_to_string(deploy_dir().join("systemd/plugvisor.toml")).unwrap();
    let (ok, out) = check_config(&config);
    assert!(ok, "deploy/systemd/plugvisor.toml: {out}");
    // The paths the config writes to are the ones the unit makes writable.
    assert!(toml_string(&config, "plugins_dir").starts_with("/var/lib/plugvisor/"));
    assert!(toml_string(&config, "state_dir").starts_with("/var/lib/plugvisor/"));
    assert!(
        unit.contains("StateDirectory=plugvisor") && unit.contains("RuntimeDirectory=plugvisor")
    );
    assert!(unit.contains("/etc/plugvisor/plugvisor.toml"));

    let Some(analyze) = systemd_analyze() else {
        return;
    };
    // The control: verify must complain about a broken copy.
    let broken = unit.replace("Type=notify", "Type=notifyy\nNoSuchKey=1");
    let (ok, out) = verify_unit(&analyze, &broken);
    assert!(
        !ok && out.contains("notifyy") && out.contains("NoSuchKey"),
        "systemd-analyze verify accepted a broken unit: {out}"
    );
    let (ok, out) = verify_unit(&analyze, &unit);
    assert!(
        ok,
        "systemd-analyze verify deploy/systemd/plugvisor.service:\n{out}"
    );
    // The socket unit beside it, naming its fd after a listener the config
    // has.
    let socket =
        std::fs::read_to_string(deploy_dir().join("systemd/plugvisor-echo-tcp.socket")).unwrap();
    assert!(
        socket.contains("FileDescriptorName=echo-tcp")
            && socket.contains("Service=plugvisor.service")
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("plugvisor.service"),
        unit.replace("/usr/bin/plugvisor", &binary().display().to_string()),
    )
    .unwrap();
    let path = dir.path().join("plugvisor-echo-tcp.socket");
    std::fs::write(&path, &socket).unwrap();
    let (ok, out) = run(Command::new(&analyze)
        .args(["verify", "--man=no"])
        .arg(&path));
    assert!(
        ok && out.trim().is_empty(),
        "systemd-analyze verify deploy/systemd/plugvisor-echo-tcp.socket:\n{out}"
    );
}

/// `[sync]` names a root the operator provides (a ConfigMap of their
/// repository's): the config is checked with a real one in its place, and —
/// the control — refused, naming the file, while it is not there. Returns
/// the root's path.
fn checks_with_the_fleets_root(config: &str) -> String {
    let root = config
        .split("[sync]")
        .nth(1)
        .map(|section| toml_string(section, "root"))
        .expect("the ConfigMap's config has a [sync] root");
    let (ok, out) = check_config(config);
    assert!(
        !ok && out.contains(&root),
        "a missing root must be refused: {out}"
    );
    let fleet = plugvisor_tests::FleetRepo::init();
    let (ok, out) = check_config(&config.replace(&root, fleet.root().to_str().unwrap()));
    assert!(ok, "the ConfigMap's plugvisor.toml: {out}");
    root
}

/// The root's directory is mounted from ConfigMap `plugvisor-fleet-root`.
fn root_from_the_operators_configmap(root: &str, pod: &Value) {
    let container = &pod["containers"][0];
    let root_dir = Path::new(root).parent().unwrap().to_str().unwrap();
    let root_volume = container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"] == root_dir)
        .unwrap_or_else(|| panic!("[sync] root {root}: nothing mounted at {root_dir}"))["name"]
        .clone();
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == root_volume)
        .unwrap();
    assert_eq!(
        volume["configMap"]["name"], "plugvisor-fleet-root",
        "the fleet's root comes from the operator's ConfigMap: {volume}"
    );
}

/// A new pod starts beside the old one and finds it through a socket on
/// the node (`[upgrade] socket` on a hostPath).
fn upgrades_surge_and_find_the_old_pod(
    config: &str,
    ds: &serde_json::Value,
    host_path: &dyn Fn(&str) -> Option<String>,
) {
    let rolling = &ds["spec"]["updateStrategy"]["rollingUpdate"];
    assert_eq!(rolling["maxSurge"], 1, "{rolling}");
    assert_eq!(rolling["maxUnavailable"], 0, "{rolling}");
    let upgrade_socket = config
        .split("[upgrade]")
        .nth(1)
        .map(|section| toml_string(section, "socket"))
        .expect("the ConfigMap's config has an [upgrade] socket");
    let upgrade_dir = Path::new(&upgrade_socket)
        .parent()
        .unwrap()
        .to_str()
        .unwrap();
    assert!(
        host_path(upgrade_dir).is_some(),
        "the upgrade socket's directory is not on the node: a new pod could not find the old one"
    );
}

/// The validator: `PLUGVISOR_KUBERNETES_VALIDATE` (set by `cargo xtask
/// test`), the venv `cargo xtask setup` makes, or `PATH`.
fn kubernetes_validate() -> Option<PathBuf> {
    let candidates = [
        std::env::var_os("PLUGVISOR_KUBERNETES_VALIDATE").map(PathBuf::from),
        Some(target_dir().join("../tools/kubernetes-validate/bin/kubernetes-validate")),
        tool("kubernetes-validate").ok(),
    ];
    let found = candidates.into_iter().flatten().find(|p| p.is_file());
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "kubernetes-validate missing in CI: cargo xtask setup installs it"
        );
        eprintln!(
            "SKIP kubernetes manifests: kubernetes-validate not found (run cargo xtask setup)"
        );
    }
    found
}

fn validate(validator: &Path, file: &Path) -> (bool, String) {
    let mut all_ok = true;
    let mut all_out = String::new();
    for v in KUBERNETES_VERSIONS {
        let (ok, out) = run(Command::new(validator)
            .args(["--strict", "--kubernetes-version", v])
            .arg(file));
        all_ok &= ok && !out.contains("ERROR") && !out.contains("WARN");
        all_out.push_str(&out);
    }
    (all_ok, all_out)
}

/// The manifests as JSON, read with the validator's own PyYAML.
fn manifests_as_json(validator: &Path, file: &Path) -> Vec<Value> {
    let python = validator.parent().unwrap().join("python3");
    let (ok, out) = run(Command::new(&python)
        .args([
            "-c",
            "import json, sys, yaml; json.dump(list(yaml.safe_load_all(open(sys.argv[1]))), sys.stdout)",
        ])
        .arg(file));
    assert!(ok, "reading {} with PyYAML: {out}", file.display());
    serde_json::from_str(&out).unwrap()
}

#[test]
fn kubernetes_manifests_validate_offline_against_the_api_schemas() {
    let Some(validator) = kubernetes_validate() else {
        return;
    };
    let file = deploy_dir().join("kubernetes/plugvisor.yaml");

    // The control: a field the API does not have must be refused.
    let text = std::fs::read_to_string(&file).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.yaml");
    std::fs::write(
        &broken,
        text.replace(
            "hostNetwork: true",
            "hostNetwork: true\n      hostNetworking: true",
        ),
    )
    .unwrap();
    let (ok, out) = validate(&validator, &broken);
    assert!(
        !ok && out.contains("hostNetworking"),
        "kubernetes-validate accepted an unknown field: {out}"
    );

    let (ok, out) = validate(&validator, &file);
    assert!(ok, "kubernetes-validate {}:\n{out}", file.display());
}

/// What the schemas cannot know: the pieces fit together.
#[test]
fn kubernetes_daemonset_mounts_and_scrapes_what_its_config_names() {
    let Some(validator) = kubernetes_validate() else {
        return;
    };
    let file = deploy_dir().join("kubernetes/plugvisor.yaml");
    let docs = manifests_as_json(&validator, &file);
    let kind = |k: &str| {
        docs.iter()
            .find(|d| d["kind"] == k)
            .unwrap_or_else(|| panic!("no {k} in {}", file.display()))
    };
    let cm = kind("ConfigMap");
    let ds = kind("DaemonSet");
    let config = cm["data"]["plugvisor.toml"].as_str().unwrap();
    let root = checks_with_the_fleets_root(config);
    assert!(
        cm["data"]["thresholds.toml"].is_string(),
        "the ConfigMap carries the thresholds file"
    );

    let pod = &ds["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let mounts: Vec<&str> = container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["mountPath"].as_str().unwrap())
        .collect();
    let host_path = |mount: &str| {
        let name = container["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["mountPath"] == mount)
            .unwrap_or_else(|| panic!("nothing mounted at {mount}; mounts: {mounts:?}"))["name"]
            .clone();
        pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .unwrap()["hostPath"]["path"]
            .as_str()
            .map(str::to_owned)
    };
    for key in ["plugins_dir", "state_dir"] {
        let path = toml_string(config, key);
        assert!(
            host_path(&path).is_some(),
            "{key} {path} is not on a hostPath: it would not survive the pod"
        );
    }
    let socket = toml_string(config, "socket");
    let socket_dir = Path::new(&socket).parent().unwrap().to_str().unwrap();
    assert!(
        host_path(socket_dir).is_some(),
        "the admin socket's directory is not on the node"
    );
    let args: Vec<&str> = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let config_arg = args[args.iter().position(|a| *a == "--config").unwrap() + 1];
    assert!(
        mounts.contains(&Path::new(config_arg).parent().unwrap().to_str().unwrap()),
        "--config {config_arg} is not where the ConfigMap is mounted"
    );
    let listen = toml_string(config, "listen");
    let port = listen.rsplit_once(':').unwrap().1;
    let annotations = &ds["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(
        annotations["prometheus.io/port"], port,
        "scrape port = [metrics] listen"
    );
    assert_eq!(pod["hostNetwork"], true);
    upgrades_surge_and_find_the_old_pod(config, ds, &host_path);
    root_from_the_operators_configmap(&root, pod);
    let caps = &container["securityContext"]["capabilities"]["add"];
    for cap in ["BPF", "PERFMON"] {
        assert!(
            caps.as_array().unwrap().iter().any(|c| c == cap),
            "CAP_{cap} missing: the probes could not load"
        );
    }
}
