//! What a long-lived client — a TCP connection or a gRPC `Exchange`
//! stream — saw while the plugin behind it was reloaded version after
//! version, and the claim the reload tests make about it. The TCP and the
//! gRPC test make the same claim, so it is written once and the two cannot
//! drift apart.

/// What one long-lived client saw across a run of reloads.
#[derive(Debug, Default)]
pub struct ClientReport {
    /// Frames answered while the reloads ran (the last frame not counted).
    pub frames: u64,
    /// Everything that went wrong, one line each.
    pub errors: Vec<String>,
    /// The versions that answered, in order, each change once.
    pub versions: Vec<String>,
    /// A last frame was answered after the reloads.
    pub still_open: bool,
}

impl ClientReport {
    /// Asserts that client `who` ("client 3", "stream 7") followed reloads
    /// from 1.0.0 (the version [`crate::DaemonOptions`] starts with)
    /// through `reloads` in order: no error, still open after them, saw
    /// the version change, ended on the last of `reloads`, and never went
    /// back to an older version.
    pub fn assert_followed(&self, who: &str, reloads: &[String]) {
        assert!(
            self.errors.is_empty(),
            "{who} saw errors: {:?}",
            self.errors
        );
        assert!(self.still_open, "{who} did not survive the reloads");
        assert!(
            self.versions.len() >= 2,
            "{who} never saw the version change: {:?}",
            self.versions
        );
        assert_eq!(
            self.versions.last().map(String::as_str),
            Some(reloads.last().unwrap().as_str()),
            "{who}"
        );
        // Versions only move forward under one connection or stream.
        let idx: Vec<usize> = self
            .versions
            .iter()
            .map(|v| {
                if v == "1.0.0" {
                    0
                } else {
                    reloads.iter().position(|x| x == v).unwrap() + 1
                }
            })
            .collect();
        assert!(
            idx.windows(2).all(|w| w[0] < w[1]),
            "{who} saw versions out of order: {:?}",
            self.versions
        );
    }
}
