//! Keeps the imports of the plugvisor library pointing the way
//! `supervisor/imports.toml` says: every module in a layer, every `use`
//! (and every `crate::` path) towards a lower layer.
//!
//! The scan is textual, on purpose: it needs no compiler internals and
//! reads what a reviewer reads. It takes every `crate::<module>` path
//! (including `crate::{a, b::c}` groups, and `super::super::<module>` from
//! a file two levels down) outside comments and outside the file's test
//! module.
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// `imports.toml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Rule {
    layer: Vec<Layer>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Layer {
    name: String,
    modules: Vec<String>,
}

impl Rule {
    /// Module → layer index (0 = the leaves).
    fn ranks(&self) -> BTreeMap<&str, usize> {
        let mut ranks = BTreeMap::new();
        for (i, layer) in self.layer.iter().enumerate() {
            // The name is the layer's documentation: every layer says
            // what it holds.
            assert!(!layer.name.trim().is_empty(), "layer {i} has no name");
            for m in &layer.modules {
                let before = ranks.insert(m.as_str(), i);
                assert!(before.is_none(), "imports.toml lists {m} twice");
            }
        }
        ranks
    }
}

/// One import against the rule, as the failure names it.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Violation {
    file: String,
    line: usize,
    from: String,
    to: String,
    why: String,
}

/// The code of a file as the check reads it: comments blanked out, and
/// nothing from its test module on.
fn code_lines(text: &str) -> Vec<String> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if line.trim() == "#[cfg(test)]"
            && lines[i + 1..]
                .iter()
                .take(6)
                .any(|l| l.trim_start().starts_with("mod tests"))
        {
            break;
        }
        let code = match line.find("//") {
            // `//` after a colon is a URL in a string, not a comment.
            Some(at) if !line[..at].ends_with(':') => &line[..at],
            _ => line,
        };
        out.push(code.to_owned());
    }
    out
}

/// The top-level modules a line of code names through `crate::` (or
/// `super::super::` in a file `depth` directories down).
fn named_modules(code: &str, depth: usize) -> Vec<String> {
    let mut found = Vec::new();
    let mut prefixes = vec!["crate::"];
    if depth >= 2 {
        prefixes.push("super::super::");
    }
    for prefix in prefixes {
        let mut rest = code;
        while let Some(at) = rest.find(prefix) {
            let after = &rest[at + prefix.len()..];
            if let Some(group) = after.strip_prefix('{') {
                // Top-level items of the group, up to its closing brace.
                let (mut depth_in, mut item_start, mut items) = (0usize, 0usize, Vec::new());
                for (i, c) in group.char_indices() {
                    match c {
                        '{' => depth_in += 1,
                        '}' if depth_in == 0 => {
                            items.push(&group[item_start..i]);
                            break;
                        }
                        '}' => depth_in -= 1,
                        ',' if depth_in == 0 => {
                            items.push(&group[item_start..i]);
                            item_start = i + 1;
                        }
                        _ => {}
                    }
                }
                found.extend(items.into_iter().filter_map(|item| ident(item.trim())));
            } else if let Some(m) = ident(after) {
                found.push(m);
            }
            rest = after;
        }
    }
    found
}

/// The leading identifier of a path.
fn ident(path: &str) -> Option<String> {
    let end = path
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(path.len());
    (end > 0).then(|| path[..end].to_owned())
}

/// Checks one file of module `module` against `ranks`.
fn check_file(
    ranks: &BTreeMap<&str, usize>,
    module: &str,
    file: &str,
    depth: usize,
    text: &str,
) -> Vec<Violation> {
    let Some(&own) = ranks.get(module) else {
        return vec![Violation {
            file: file.to_owned(),
            line: 0,
            from: module.to_owned(),
            to: String::new(),
            why: "module is in no layer of imports.toml: place it".into(),
        }];
    };
    let mut out = Vec::new();
    for (i, code) in code_lines(text).iter().enumerate() {
        for to in named_modules(code, depth) {
            if to == module {
                continue;
            }
            // `crate::` names that are not modules (a macro, say) are
            // not imports of a layer.
            let Some(&theirs) = ranks.get(to.as_str()) else {
                continue;
            };
            if theirs >= own {
                out.push(Violation {
                    file: file.to_owned(),
                    line: i + 1,
                    from: module.to_owned(),
                    why: if theirs == own {
                        "both are in one layer".into()
                    } else {
                        "it is in a layer above".into()
                    },
                    to,
                });
            }
        }
    }
    out
}

fn rs_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rs_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn rule() -> Rule {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("imports.toml");
    toml::from_str(&std::fs::read_to_string(&path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn every_import_points_down_the_layers_of_imports_toml() {
    let rule = rule();
    let ranks = rule.ranks();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rs_files(&src, &mut files);
    files.sort();
    let mut violations = Vec::new();
    let mut seen = BTreeSet::new();
    for path in &files {
        let rel = path.strip_prefix(&src).unwrap();
        let parts: Vec<&str> = rel.iter().map(|p| p.to_str().unwrap()).collect();
        // The command line sits above every layer.
        if parts == ["main.rs"] || parts == ["lib.rs"] || parts[0] == "bin" {
            continue;
        }
        let module = parts[0].trim_end_matches(".rs");
        seen.insert(module.to_owned());
        let text = std::fs::read_to_string(path).unwrap();
        violations.extend(check_file(
            &ranks,
            module,
            &rel.display().to_string(),
            parts.len(),
            &text,
        ));
    }
    for m in ranks.keys() {
        assert!(
            seen.contains(*m),
            "imports.toml lists {m}, which src/ does not have"
        );
    }
    let report: Vec<String> = violations
        .iter()
        .map(|v| {
            format!(
                "src/{}:{}: {} imports {}: {}",
                v.file, v.line, v.from, v.to, v.why
            )
        })
        .collect();
    assert!(
        report.is_empty(),
        "imports against supervisor/imports.toml (layers, from the leaves up: {}):\n{}",
        rule.layer
            .iter()
            .map(|l| l.modules.join(" "))
            .collect::<Vec<_>>()
            .join(" | "),
        report.join("\n")
    );
}

/// Lines of `code` outside the metrics module that pick a series by its
/// label values: label spellings and order are the metrics module's to
/// decide, through its typed record functions (`metrics/record.rs`).
fn label_lookups(module: &str, code: &str) -> Vec<usize> {
    if module == "metrics" {
        return Vec::new();
    }
    code_lines(code)
        .iter()
        .enumerate()
        .filter(|(_, l)| l.contains("with_label_values(") || l.contains("remove_label_values("))
        .map(|(i, _)| i + 1)
        .collect()
}

#[test]
fn only_the_metrics_module_names_label_values() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rs_files(&src, &mut files);
    files.sort();
    let mut found = Vec::new();
    for path in &files {
        let rel = path.strip_prefix(&src).unwrap();
        let module = rel.iter().next().unwrap().to_str().unwrap();
        let text = std::fs::read_to_string(path).unwrap();
        for line in label_lookups(module.trim_end_matches(".rs"), &text) {
            found.push(format!("src/{}:{line}", rel.display()));
        }
    }
    assert!(
        found.is_empty(),
        "label values named outside src/metrics/ (add a typed record function there):\n{}",
        found.join("\n")
    );
}

/// The check on made-up sources: it must catch a wrong `use`, or it
/// proves nothing about the real ones.
mod checker {
    use super::*;

    fn ranks() -> BTreeMap<&'static str, usize> {
        BTreeMap::from([("metrics", 0), ("slot", 1), ("listeners", 2), ("daemon", 3)])
    }

    fn violations(module: &str, depth: usize, text: &str) -> Vec<(usize, String, String)> {
        check_file(&ranks(), module, "x.rs", depth, text)
            .into_iter()
            .map(|v| (v.line, v.to, v.why))
            .collect()
    }

    #[test]
    fn a_use_up_the_layers_fails() {
        let text = "use crate::slot::Slot;\nuse crate::daemon::run;\n";
        assert_eq!(
            violations("listeners", 1, text),
            vec![(2, "daemon".into(), "it is in a layer above".into())]
        );
    }

    #[test]
    fn a_use_within_one_layer_fails() {
        let ranks = BTreeMap::from([("a", 0), ("b", 0)]);
        let v = check_file(&ranks, "a", "a.rs", 1, "fn f() { crate::b::g() }\n");
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].why, "both are in one layer");
    }

    #[test]
    fn groups_paths_and_nested_files_are_read() {
        let text = "use crate::{metrics, daemon::Thing};\nfn f() { let _ = crate::listeners::X; }\nuse super::super::daemon;\n";
        assert_eq!(
            violations("slot", 2, text),
            vec![
                (1, "daemon".into(), "it is in a layer above".into()),
                (2, "listeners".into(), "it is in a layer above".into()),
                (3, "daemon".into(), "it is in a layer above".into()),
            ]
        );
    }

    #[test]
    fn comments_docs_and_test_modules_are_not_imports() {
        let text = "//! See [`crate::daemon`].\n/// Like crate::daemon::run.\nfn f() {} // crate::daemon\nlet url = \"http://crate::daemon\";\n#[cfg(test)]\n#[expect(x)]\nmod tests {\n    use crate::daemon::run;\n}\n";
        // The URL line: a `//` after a colon is not a comment, so the
        // string is read — a path in a string would be an odd thing to
        // write, and reading it errs on the side of failing.
        assert_eq!(
            violations("slot", 1, text),
            vec![(4, "daemon".into(), "it is in a layer above".into())]
        );
    }

    #[test]
    fn a_label_lookup_outside_metrics_fails_and_inside_or_in_tests_passes() {
        let text = "fn f(m: &Metrics) {\n    m.reloads_total.with_label_values(&[\"a\"]).inc();\n}\n#[cfg(test)]\nmod tests {\n    fn t(m: &Metrics) { m.x.with_label_values(&[]); }\n}\n";
        assert_eq!(label_lookups("reload", text), vec![2]);
        assert!(label_lookups("metrics", text).is_empty());
        let removal = "fn g(m: &Metrics) { let _ = m.x.remove_label_values(&[\"b\"]); }\n";
        assert_eq!(label_lookups("slot", removal), vec![1]);
    }

    #[test]
    fn a_module_in_no_layer_fails() {
        let v = check_file(&ranks(), "newcomer", "newcomer.rs", 1, "");
        assert_eq!(v.len(), 1);
        assert!(v[0].why.contains("place it"), "{v:?}");
    }
}
