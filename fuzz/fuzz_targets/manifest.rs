//! `plugin.toml` as an attacker or a careless editor may write it: the
//! parser must never panic, and what it accepts must hold the invariants
//! the reload path relies on (a plugin name fit for a directory and a
//! label, a library that is one plain file name, a 64-digit lowercase
//! sha256, no self-requirement) and survive `pack`'s round trip.
#![no_main]

use std::path::{Component, Path};

use libfuzzer_sys::fuzz_target;
use plugvisor::catalog::Manifest;
use plugvisor::name::valid_name;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("plugins/fuzz/plugin.toml");
    let Ok(m) = Manifest::parse(text, path) else {
        return;
    };
    assert!(valid_name(&m.name), "name {:?}", m.name);
    let mut parts = Path::new(&m.library).components();
    assert!(
        matches!(parts.next(), Some(Component::Normal(_))) && parts.next().is_none(),
        "library {:?}",
        m.library
    );
    assert!(
        m.sha256.len() == 64 && m.sha256.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')),
        "sha256 {:?}",
        m.sha256
    );
    assert!(m.conflicts.iter().all(|c| valid_name(c)));
    assert!(m.requires.keys().all(|r| valid_name(r) && *r != m.name));
    // What `plugvisor pack` would write parses back to the same manifest.
    let again = Manifest::parse(&m.to_toml(), path).expect("pack's output parses");
    assert_eq!(again, m);
});
