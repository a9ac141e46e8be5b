//! `plugin.toml`: the package manifest, and the commit point of a package.
use std::collections::BTreeMap;
use std::path::{Component, Path};

use semver::{Version, VersionReq};
use serde::{Deserialize, Serialize};

use super::CatalogError;
use crate::name::valid_name;

/// Largest manifest read; anything bigger is refused before parsing.
pub const MAX_MANIFEST_BYTES: u64 = 64 * 1024;

/// A parsed and validated manifest.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Plugin name; must match the package directory and the descriptor.
    pub name: String,
    /// Semver version; must match the descriptor.
    pub version: Version,
    /// Library file name inside the package directory.
    pub library: String,
    /// Lowercase hex sha256 of the library file.
    pub sha256: String,
    /// Plugin ABI version the library implements.
    pub abi: u32,
    /// Plugins that must not be active at the same time.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conflicts: Vec<String>,
    /// Other plugins this one needs, with semver ranges.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub requires: BTreeMap<String, VersionReq>,
}

impl Manifest {
    /// Parses `text` (read from `path`, for messages) and validates it.
    pub fn parse(text: &str, path: &Path) -> Result<Manifest, CatalogError> {
        let m: Manifest = toml::from_str(text).map_err(|e| CatalogError::ManifestSyntax {
            path: path.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        m.validate(path)
    }

    /// The manifest's text as `plugvisor pack` writes it (parses back to
    /// an equal manifest).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a manifest always serialises")
    }

    /// Validates a manifest built in code (as `plugvisor pack` does).
    pub fn validated(self, path: &Path) -> Result<Manifest, CatalogError> {
        self.validate(path)
    }

    fn validate(self, path: &Path) -> Result<Manifest, CatalogError> {
        let invalid = |message: String| CatalogError::ManifestInvalid {
            path: path.to_owned(),
            message,
        };
        if !valid_name(&self.name) {
            return Err(invalid(format!(
                "name {:?}: use [a-z0-9_-], at most 64 characters",
                self.name
            )));
        }
        let lib = Path::new(&self.library);
        let mut components = lib.components();
        let single_normal =
            matches!(components.next(), Some(Component::Normal(_))) && components.next().is_none();
        if self.library.is_empty() || !single_normal {
            return Err(CatalogError::LibraryEscapes {
                path: path.to_owned(),
                library: self.library,
            });
        }
        if self.sha256.len() != 64
            || !self
                .sha256
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        {
            return Err(invalid(format!(
                "sha256 {:?}: expected 64 lowercase hex digits",
                self.sha256
            )));
        }
        for c in &self.conflicts {
            if !valid_name(c) {
                return Err(invalid(format!("conflicts: {c:?} is not a plugin name")));
            }
        }
        for r in self.requires.keys() {
            if !valid_name(r) {
                return Err(invalid(format!("requires: {r:?} is not a plugin name")));
            }
            if *r == self.name {
                return Err(invalid(format!("requires itself ({r:?})")));
            }
        }
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn parse(text: &str) -> Result<Manifest, CatalogError> {
        Manifest::parse(text, Path::new("plugins/echo/plugin.toml"))
    }

    #[test]
    fn design_example() {
        let m = parse(&format!(
            r#"
name = "echo"
version = "1.3.0"
library = "libecho-1.3.0.so"
sha256 = "{SHA}"
abi = 1
conflicts = ["legacy-echo"]
[requires]
codec = ">=1.2, <2"
"#
        ))
        .unwrap();
        assert_eq!(m.version, Version::new(1, 3, 0));
        assert_eq!(m.conflicts, vec!["legacy-echo".to_owned()]);
        assert!(m.requires["codec"].matches(&Version::new(1, 5, 0)));
        assert!(!m.requires["codec"].matches(&Version::new(2, 0, 0)));
    }

    fn minimal(extra: &str, library: &str, sha: &str) -> String {
        format!(
            "name = \"echo\"\nversion = \"1.0.0\"\nlibrary = \"{library}\"\nsha256 = \"{sha}\"\nabi = 1\n{extra}"
        )
    }

    #[test]
    fn not_toml_names_line_and_column() {
        let err = parse("name = \"echo\nversion = 1").unwrap_err();
        let s = err.to_string();
        assert!(
            s.contains("plugins/echo/plugin.toml") && s.contains("line"),
            "{s}"
        );
    }

    #[test]
    fn unknown_key_refused() {
        let err = parse(&minimal("colour = \"red\"", "a.so", SHA)).unwrap_err();
        assert!(err.to_string().contains("colour"), "{err}");
    }

    #[test]
    fn bad_version_refused() {
        let err = parse(&minimal("", "a.so", SHA).replace("1.0.0", "one")).unwrap_err();
        assert!(matches!(err, CatalogError::ManifestSyntax { .. }), "{err}");
    }

    #[test]
    fn library_escaping_package_refused() {
        for lib in [
            "../other/lib.so",
            "/usr/lib/libc.so.6",
            "sub/lib.so",
            "..",
            "",
        ] {
            let err = parse(&minimal("", lib, SHA)).unwrap_err();
            assert!(
                matches!(err, CatalogError::LibraryEscapes { .. }),
                "{lib}: {err}"
            );
        }
    }

    #[test]
    fn bad_sha_refused() {
        for sha in ["abc", &SHA.to_uppercase(), &format!("{}zz", &SHA[..62])] {
            let err = parse(&minimal("", "a.so", sha)).unwrap_err();
            assert!(err.to_string().contains("sha256"), "{err}");
        }
    }

    #[test]
    fn serialises_back_to_an_equal_manifest() {
        let text = minimal(
            "conflicts = [\"legacy-echo\"]\n[requires]\ncodec = \">=1.2, <2\"\n",
            "a.so",
            SHA,
        );
        let m = parse(&text).unwrap();
        let again = parse(&m.to_toml()).unwrap();
        assert_eq!(m, again);
        assert!(
            !parse(&minimal("", "a.so", SHA))
                .unwrap()
                .to_toml()
                .contains("requires")
        );
    }

    #[test]
    fn bad_names_refused() {
        assert!(parse(&minimal("", "a.so", SHA).replace("\"echo\"", "\"Echo/1\"")).is_err());
        assert!(parse(&minimal("conflicts = [\"../x\"]", "a.so", SHA)).is_err());
        assert!(parse(&minimal("[requires]\necho = \"1\"", "a.so", SHA)).is_err());
    }
}
