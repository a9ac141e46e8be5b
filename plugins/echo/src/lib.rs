//! The example plugin: one frame in, one frame out.
//!
//! * `upper TEXT` → `TEXT` upper-cased, `rev TEXT` → `TEXT` reversed,
//!   `version` → the plugin's version, anything else → echoed.
//! * Every response starts with `[echo VERSION] `, so a client can see which
//!   version served it — the point of a hot reload is that this changes
//!   under a live connection.
//! * `degrade(1)` turns the transforms off (plain echo); `degrade(0)` turns
//!   them back on.
use std::sync::atomic::{AtomicU32, Ordering};

use plugvisor_sdk::{Plugin, export_plugin};

/// The plugin's version as the descriptor reports it.
pub const VERSION: &str = match option_env!("PLUGVISOR_PLUGIN_VERSION") {
    Some(v) => v,
    None => env!("CARGO_PKG_VERSION"),
};

/// [`VERSION`] as the bytes in the library's read-only data, read at run
/// time: without the opaque read the compiler folds the short string into
/// immediate stores, and a library whose version string was rewritten in
/// place (the test harness' version series) would answer with a version
/// its descriptor no longer claims.
fn version() -> &'static str {
    std::hint::black_box(VERSION)
}

/// Echo state: only the degrade level.
pub struct Echo {
    level: AtomicU32,
}

impl Echo {
    fn transform(&self, line: &[u8]) -> Vec<u8> {
        let full = self.level.load(Ordering::Relaxed) == 0;
        if line == b"version" {
            return version().as_bytes().to_vec();
        }
        if full {
            if let Some(rest) = line.strip_prefix(b"upper ") {
                return rest.to_ascii_uppercase();
            }
            if let Some(rest) = line.strip_prefix(b"rev ") {
                let mut v = rest.to_vec();
                v.reverse();
                return v;
            }
        }
        line.to_vec()
    }
}

impl Plugin for Echo {
    fn init() -> Result<Self, String> {
        Ok(Echo {
            level: AtomicU32::new(0),
        })
    }

    fn handle(&self, request: &[u8]) -> Result<Vec<u8>, String> {
        let body = self.transform(request);
        let version = version();
        let mut out = Vec::with_capacity(body.len() + version.len() + 8);
        out.extend_from_slice(b"[echo ");
        out.extend_from_slice(version.as_bytes());
        out.extend_from_slice(b"] ");
        out.extend_from_slice(&body);
        Ok(out)
    }

    fn degrade(&self, level: u32) -> Option<Result<(), String>> {
        self.level.store(level, Ordering::Relaxed);
        Some(Ok(()))
    }
}

export_plugin!(Echo, name = "echo");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_and_transforms() {
        let e = Echo::init().unwrap();
        let tag = format!("[echo {VERSION}] ");
        assert_eq!(e.handle(b"hi").unwrap(), format!("{tag}hi").into_bytes());
        assert_eq!(
            e.handle(b"upper hi").unwrap(),
            format!("{tag}HI").into_bytes()
        );
        assert_eq!(
            e.handle(b"rev abc").unwrap(),
            format!("{tag}cba").into_bytes()
        );
        e.degrade(1).unwrap().unwrap();
        assert_eq!(
            e.handle(b"upper hi").unwrap(),
            format!("{tag}upper hi").into_bytes()
        );
    }
}
