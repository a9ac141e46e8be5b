//! Field offsets of tracepoints, read from the running kernel's tracefs
//! `format` files — never hard-coded for one kernel.
use std::path::{Path, PathBuf};

use plugvisor_probes_common::{Probe, TracepointLayout};

/// Where tracefs may be mounted, in the order tried.
const TRACEFS_ROOTS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// Why a layout could not be read.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// No tracefs with this event was found (and mounting one failed).
    #[error("tracepoint {category}/{name}: no format file under {tried:?} (is tracefs mounted?)")]
    NoFormat {
        /// Category.
        category: String,
        /// Event.
        name: String,
        /// Paths tried.
        tried: Vec<PathBuf>,
    },
    /// The format file lacks a field the probe needs.
    #[error("tracepoint format {path}: field {field:?} not found")]
    MissingField {
        /// The format file.
        path: PathBuf,
        /// The field.
        field: &'static str,
    },
}

/// Reads `events/<category>/<name>/format`, mounting tracefs at
/// `/sys/kernel/tracing` if no tracefs is mounted yet.
pub fn read_format(category: &str, name: &str) -> Result<(PathBuf, String), LayoutError> {
    let candidates = || {
        TRACEFS_ROOTS.iter().map(|r| {
            Path::new(r)
                .join("events")
                .join(category)
                .join(name)
                .join("format")
        })
    };
    for p in candidates() {
        if let Ok(text) = std::fs::read_to_string(&p) {
            return Ok((p, text));
        }
    }
    mount_tracefs();
    for p in candidates() {
        if let Ok(text) = std::fs::read_to_string(&p) {
            return Ok((p, text));
        }
    }
    Err(LayoutError::NoFormat {
        category: category.to_owned(),
        name: name.to_owned(),
        tried: candidates().collect(),
    })
}

fn mount_tracefs() {
    let target = c"/sys/kernel/tracing";
    // SAFETY: plain mount(2) with static NUL-terminated strings; failure is
    // reported through the NoFormat error that follows.
    let rc = unsafe {
        libc::mount(
            c"tracefs".as_ptr(),
            target.as_ptr(),
            c"tracefs".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "mounting tracefs at /sys/kernel/tracing");
    }
}

/// Offset of `field` in a tracefs format description.
pub fn field_offset(format: &str, field: &str) -> Option<u32> {
    format.lines().find_map(|line| {
        let line = line.trim();
        let decl = line.strip_prefix("field:")?.split(';').next()?;
        let ident = decl.split_whitespace().last()?.split('[').next()?;
        if ident != field {
            return None;
        }
        let offset = line
            .split(';')
            .find_map(|part| part.trim().strip_prefix("offset:"))?;
        offset.trim().parse().ok()
    })
}

/// Offsets of one tracepoint's fields, looked up by name.
struct Format {
    path: PathBuf,
    text: String,
}

impl Format {
    fn read(category: &str, name: &str) -> Result<Format, LayoutError> {
        read_format(category, name).map(|(path, text)| Format { path, text })
    }

    fn get(&self, field: &'static str) -> Result<u32, LayoutError> {
        field_offset(&self.text, field).ok_or_else(|| LayoutError::MissingField {
            path: self.path.clone(),
            field,
        })
    }

    fn has(&self, field: &str) -> bool {
        field_offset(&self.text, field).is_some()
    }
}

/// The layouts of every tracepoint the probes use, on this kernel. A
/// tracepoint this kernel lacks (or lays out unexpectedly) is reported
/// against its probe and leaves its offsets at 0; the program using it is
/// then not attached.
pub fn read_all() -> (TracepointLayout, Vec<(Probe, LayoutError)>) {
    let mut l = TracepointLayout {
        ready: 1,
        ..TracepointLayout::default()
    };
    let mut failures = Vec::new();
    let mut try_probe =
        |probe: Probe, f: &mut dyn FnMut(&mut TracepointLayout) -> Result<(), LayoutError>| {
            if let Err(e) = f(&mut l) {
                failures.push((probe, e));
            }
        };
    try_probe(Probe::SockState, &mut |l| {
        let f = Format::read("sock", "inet_sock_set_state")?;
        l.oldstate = f.get("oldstate")?;
        l.newstate = f.get("newstate")?;
        l.sport = f.get("sport")?;
        l.dport = f.get("dport")?;
        l.protocol = f.get("protocol")?;
        l.skaddr = f.get("skaddr")?;
        Ok(())
    });
    try_probe(Probe::TcpResets, &mut |l| {
        let f = Format::read("tcp", "tcp_send_reset")?;
        // Kernels up to 6.x carried host-order `sport`; newer ones carry the
        // source as a sockaddr, whose port (network order) is at +2.
        if f.has("sport") {
            l.send_reset_sport = f.get("sport")?;
            l.send_reset_sport_be = 0;
        } else {
            l.send_reset_sport = f.get("saddr")? + 2;
            l.send_reset_sport_be = 1;
        }
        l.receive_reset_sport = Format::read("tcp", "tcp_receive_reset")?.get("sport")?;
        Ok(())
    });
    try_probe(Probe::TcpRetransmits, &mut |l| {
        l.retransmit_sport = Format::read("tcp", "tcp_retransmit_skb")?.get("sport")?;
        Ok(())
    });
    try_probe(Probe::ServiceGap, &mut |l| {
        let recv = Format::read("sock", "sock_recv_length")?;
        let send = Format::read("sock", "sock_send_length")?;
        l.length_sk = recv.get("sk")?;
        l.length_ret = recv.get("ret")?;
        if send.get("sk")? != l.length_sk || send.get("ret")? != l.length_ret {
            return Err(LayoutError::MissingField {
                path: send.path.clone(),
                field: "sk/ret at the offsets of sock_recv_length",
            });
        }
        Ok(())
    });
    (l, failures)
}

#[cfg(test)]
mod tests {
    use super::*;

    // The format of this event on a 6.x kernel, verbatim.
    const FORMAT: &str = "name: inet_sock_set_state
ID: 1393
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:int oldstate;\toffset:16;\tsize:4;\tsigned:1;
\tfield:int newstate;\toffset:20;\tsize:4;\tsigned:1;
\tfield:__u16 sport;\toffset:24;\tsize:2;\tsigned:0;
\tfield:__u16 dport;\toffset:26;\tsize:2;\tsigned:0;
\tfield:__u16 family;\toffset:28;\tsize:2;\tsigned:0;
\tfield:__u16 protocol;\toffset:30;\tsize:2;\tsigned:0;
\tfield:__u8 saddr[4];\toffset:32;\tsize:4;\tsigned:0;
";

    #[test]
    fn parses_offsets() {
        assert_eq!(field_offset(FORMAT, "oldstate"), Some(16));
        assert_eq!(field_offset(FORMAT, "sport"), Some(24));
        assert_eq!(field_offset(FORMAT, "protocol"), Some(30));
        assert_eq!(field_offset(FORMAT, "saddr"), Some(32));
        assert_eq!(field_offset(FORMAT, "state"), None);
    }
}
