//! `plugin.toml.sig` and the trust check over arbitrary bytes: parsing and
//! verifying must never panic, and nothing random verifies.
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use plugvisor::trust::{SecretKey, SignatureFile, TrustPolicy, may_be_in_progress};

const MANIFEST: &[u8] = b"name = \"echo\"\nversion = \"1.0.0\"\n";

fn policy() -> &'static TrustPolicy {
    static POLICY: OnceLock<TrustPolicy> = OnceLock::new();
    POLICY.get_or_init(|| {
        let key = SecretKey::generate().expect("random source");
        TrustPolicy::new(vec![key.public()], true)
    })
}

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = SignatureFile::parse(text);
    }
    let _ = may_be_in_progress(MANIFEST, data);
    let verdict = policy().check("echo", Path::new("plugin.toml"), MANIFEST, Some(data));
    assert!(verdict.is_err(), "random bytes verified: {data:?}");
});
