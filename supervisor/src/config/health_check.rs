//! `[[health_check]]`: the dependencies a plugin relies on, checked from
//! plugvisor so that a rule can act when one is down.
//!
//! ```toml
//! [[health_check]]
//! name = "redis"                   # the `check` label; [a-z0-9_-], at most 64
//! kind = "tcp"                     # tcp: a connect succeeds
//! target = "127.0.0.1:6379"        # host:port ([v6]:port for IPv6)
//! interval = "5s"                  # default 5s
//! timeout = "1s"                   # default 1s; at most `interval`
//! failures_before_down = 3         # default 3
//! plugin = "echo"                  # optional: the plugin that relies on it (`plugin` label)
//!
//! [[health_check]]
//! name = "api"
//! kind = "http"                    # http: GET answers with `expect_status`
//! target = "http://127.0.0.1:8080/healthz"
//! expect_status = 200              # default 200; http only
//! ```
//!
//! `http` checks speak plain HTTP/1.1 (one `GET`, `Connection: close`):
//! no TLS, no redirects followed, no proxy. A dependency served only over
//! https is checked with `kind = "tcp"` on its port.
use std::collections::HashSet;
use std::time::Duration;

use serde::Deserialize;

use crate::name::valid_name;

/// What a check does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthCheckKind {
    /// Up when a TCP connect to `target` succeeds within `timeout`.
    Tcp,
    /// Up when `GET target` answers with `expect_status` within `timeout`.
    Http,
}

impl HealthCheckKind {
    /// The config value.
    pub const fn as_str(self) -> &'static str {
        match self {
            HealthCheckKind::Tcp => "tcp",
            HealthCheckKind::Http => "http",
        }
    }
}

/// One `[[health_check]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckConfig {
    /// The `check` label value; unique, `[a-z0-9_-]`, at most 64 bytes.
    pub name: String,
    /// tcp | http.
    pub kind: HealthCheckKind,
    /// `host:port` for tcp, `http://host[:port][/path]` for http.
    pub target: String,
    /// The status an http check expects (default 200); refused on tcp.
    #[serde(default)]
    pub expect_status: Option<u16>,
    /// Time between the starts of two attempts.
    #[serde(default = "default_interval", deserialize_with = "super::duration")]
    pub interval: Duration,
    /// Bound on one attempt: connect, request and status line.
    #[serde(default = "default_timeout", deserialize_with = "super::duration")]
    pub timeout: Duration,
    /// Consecutive failed attempts before the check reads down (at least 1).
    #[serde(default = "default_failures_before_down")]
    pub failures_before_down: u32,
    /// The plugin that relies on this dependency: exported as the `plugin`
    /// label, which is how a rule on this check finds the plugin to act on.
    #[serde(default)]
    pub plugin: Option<String>,
}

fn default_interval() -> Duration {
    Duration::from_secs(5)
}

fn default_timeout() -> Duration {
    Duration::from_secs(1)
}

fn default_failures_before_down() -> u32 {
    3
}

/// Where a check connects, parsed from `target`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthTarget {
    /// `host:port`.
    Tcp {
        /// Host name or address (IPv6 without brackets).
        host: String,
        /// Port.
        port: u16,
    },
    /// `http://host[:port][/path]`.
    Http(HttpTarget),
}

/// The parts of an `http://` URL a minimal GET needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpTarget {
    /// Host name or address (IPv6 without brackets), to connect to.
    pub host: String,
    /// Port (80 unless given).
    pub port: u16,
    /// `host[:port]` as written, for the `Host` header.
    pub authority: String,
    /// Path and query, at least `/`.
    pub path: String,
}

/// Splits `host:port` (`[v6]:port` for IPv6); `None` if either is missing
/// or the port is not 1..=65535.
fn host_port(s: &str) -> Option<(String, u16)> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        (host, after.strip_prefix(':')?)
    } else {
        let (host, port) = s.rsplit_once(':')?;
        if host.contains(':') {
            return None;
        }
        (host, port)
    };
    let port: u16 = port.parse().ok().filter(|&p| p != 0)?;
    let host_ok = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':'));
    host_ok.then(|| (host.to_owned(), port))
}

impl HealthCheckConfig {
    /// The status an http check expects.
    pub fn expected_status(&self) -> u16 {
        self.expect_status.unwrap_or(200)
    }

    /// Parses `target` for this check's kind.
    pub fn parsed_target(&self) -> Result<HealthTarget, String> {
        let t = self.target.trim();
        match self.kind {
            HealthCheckKind::Tcp => {
                if t.contains("://") {
                    return Err(format!(
                        "target {t:?}: a tcp check takes host:port, not a URL"
                    ));
                }
                let (host, port) = host_port(t).ok_or_else(|| {
                    format!("target {t:?}: expected host:port, e.g. 127.0.0.1:6379")
                })?;
                Ok(HealthTarget::Tcp { host, port })
            }
            HealthCheckKind::Http => {
                let scheme_end = t.find("://").map_or(0, |i| i + 3);
                if !t[..scheme_end].eq_ignore_ascii_case("http://") {
                    return Err(format!(
                        "target {t:?}: http checks take a plain http:// URL (no TLS; check an https service with kind = \"tcp\")"
                    ));
                }
                let rest = &t[scheme_end..];
                let rest = rest.split_once('#').map_or(rest, |(r, _)| r);
                let split = rest.find(['/', '?']).unwrap_or(rest.len());
                let (authority, path) = rest.split_at(split);
                if authority.contains('@') {
                    return Err(format!(
                        "target {t:?}: credentials in the URL are not supported"
                    ));
                }
                let with_port = if authority.ends_with(']') || !authority.contains(':') {
                    format!("{authority}:80")
                } else {
                    authority.to_owned()
                };
                let (host, port) = host_port(&with_port)
                    .ok_or_else(|| format!("target {t:?}: expected http://host[:port][/path]"))?;
                if path
                    .bytes()
                    .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
                {
                    return Err(format!(
                        "target {t:?}: the path holds spaces or control characters"
                    ));
                }
                let path = match path {
                    "" => "/".to_owned(),
                    p if p.starts_with('?') => format!("/{p}"),
                    p => p.to_owned(),
                };
                Ok(HealthTarget::Http(HttpTarget {
                    host,
                    port,
                    authority: authority.to_owned(),
                    path,
                }))
            }
        }
    }

    fn validate(&self) -> Result<(), String> {
        let name = &self.name;
        if !valid_name(name) {
            return Err(format!(
                "health_check name {name:?}: use [a-z0-9_-], at most 64"
            ));
        }
        self.parsed_target()
            .map_err(|e| format!("health_check {name:?}: {e}"))?;
        match (self.kind, self.expect_status) {
            (HealthCheckKind::Tcp, Some(_)) => {
                return Err(format!(
                    "health_check {name:?}: expect_status only applies to kind = \"http\""
                ));
            }
            (HealthCheckKind::Http, Some(s)) if !(100..=599).contains(&s) => {
                return Err(format!(
                    "health_check {name:?}: expect_status {s} is not an HTTP status"
                ));
            }
            _ => {}
        }
        if self.interval.is_zero() || self.timeout.is_zero() {
            return Err(format!(
                "health_check {name:?}: interval and timeout must be longer than 0"
            ));
        }
        if self.timeout > self.interval {
            return Err(format!(
                "health_check {name:?}: timeout {:?} is longer than interval {:?}; an attempt must end before the next is due",
                self.timeout, self.interval
            ));
        }
        if self.failures_before_down == 0 {
            return Err(format!(
                "health_check {name:?}: failures_before_down must be at least 1"
            ));
        }
        if let Some(p) = &self.plugin {
            if !valid_name(p) {
                return Err(format!(
                    "health_check {name:?}: plugin name {p:?} is not valid"
                ));
            }
        }
        Ok(())
    }
}

/// Validates every check and that their names are unique.
pub(super) fn validate_all(checks: &[HealthCheckConfig]) -> Result<(), String> {
    let mut names = HashSet::new();
    for c in checks {
        c.validate()?;
        if !names.insert(c.name.as_str()) {
            return Err(format!("health_check {:?} is defined twice", c.name));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::Config;
    use super::*;

    fn load(text: &str) -> Result<Config, String> {
        Config::parse(text, Path::new("t"))
            .and_then(|c| c.validate(Path::new("t")))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn readme_example_parses_with_defaults() {
        let c = load(
            r#"
[[health_check]]
name = "redis"
kind = "tcp"
target = "127.0.0.1:6379"
interval = "5s"
timeout = "1s"
failures_before_down = 3
plugin = "echo"

[[health_check]]
name = "api"
kind = "http"
target = "http://127.0.0.1:8080/healthz"
expect_status = 204
"#,
        )
        .unwrap();
        let [redis, api] = &c.health_checks[..] else {
            panic!("two checks")
        };
        assert_eq!(redis.kind, HealthCheckKind::Tcp);
        assert_eq!(redis.plugin.as_deref(), Some("echo"));
        assert_eq!(
            redis.parsed_target().unwrap(),
            HealthTarget::Tcp {
                host: "127.0.0.1".into(),
                port: 6379
            }
        );
        assert_eq!(api.interval, Duration::from_secs(5));
        assert_eq!(api.timeout, Duration::from_secs(1));
        assert_eq!(api.failures_before_down, 3);
        assert_eq!(api.expected_status(), 204);
        assert_eq!(
            api.parsed_target().unwrap(),
            HealthTarget::Http(HttpTarget {
                host: "127.0.0.1".into(),
                port: 8080,
                authority: "127.0.0.1:8080".into(),
                path: "/healthz".into(),
            })
        );
        assert!(Config::embedded_default().health_checks.is_empty());
    }

    #[test]
    fn targets_parse_for_their_kind() {
        let check = |kind, target: &str| HealthCheckConfig {
            name: "c".into(),
            kind,
            target: target.into(),
            expect_status: None,
            interval: default_interval(),
            timeout: default_timeout(),
            failures_before_down: 3,
            plugin: None,
        };
        let http = |t: &str| match check(HealthCheckKind::Http, t).parsed_target() {
            Ok(HealthTarget::Http(h)) => Ok((h.host, h.port, h.authority, h.path)),
            Ok(other) => panic!("{other:?}"),
            Err(e) => Err(e),
        };
        assert_eq!(
            http("http://db.local").unwrap(),
            ("db.local".into(), 80, "db.local".into(), "/".into())
        );
        assert_eq!(
            http("HTTP://[::1]:9000/h?x=1#frag").unwrap(),
            ("::1".into(), 9000, "[::1]:9000".into(), "/h?x=1".into())
        );
        assert_eq!(http("http://h?ready").unwrap().3, "/?ready");
        for bad in [
            "https://h/healthz",
            "127.0.0.1:80",
            "http://",
            "http://h:0/",
            "http://h:99999/",
            "http://u:p@h/",
            "http://h/a b",
        ] {
            assert!(http(bad).is_err(), "{bad} accepted");
        }
        assert!(http("https://h/").unwrap_err().contains("no TLS"));

        let tcp = |t: &str| check(HealthCheckKind::Tcp, t).parsed_target();
        assert_eq!(
            tcp("[::1]:6379").unwrap(),
            HealthTarget::Tcp {
                host: "::1".into(),
                port: 6379
            }
        );
        assert!(tcp("redis.svc:6379").is_ok());
        for bad in ["6379", "::1:6379", "h:", ":80", "http://h:80", "h :80"] {
            assert!(tcp(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn bad_checks_are_refused_with_a_reason() {
        let base = "name = \"dep\"\nkind = \"tcp\"\ntarget = \"127.0.0.1:1\"\n";
        for (extra, why) in [
            ("expect_status = 200\n", "only applies"),
            (
                "interval = \"1s\"\ntimeout = \"2s\"\n",
                "longer than interval",
            ),
            ("timeout = \"0s\"\n", "longer than 0"),
            ("failures_before_down = 0\n", "at least 1"),
            ("plugin = \"Echo\"\n", "plugin name"),
        ] {
            let err = load(&format!("[[health_check]]\n{base}{extra}")).unwrap_err();
            assert!(err.contains(why), "{extra}: {err}");
        }
        let err = load("[[health_check]]\nname = \"plugin:x\"\nkind = \"tcp\"\ntarget = \"h:1\"\n")
            .unwrap_err();
        assert!(err.contains("[a-z0-9_-]"), "{err}");
        let err = load(&format!("[[health_check]]\n{base}[[health_check]]\n{base}")).unwrap_err();
        assert!(err.contains("defined twice"), "{err}");
        let err = load(&format!("[[health_check]]\n{base}port = 1\n")).unwrap_err();
        assert!(err.contains("port"), "unknown keys are named: {err}");
        let err = load(&format!("[[health_check]]\n{base}interval = \"often\"\n")).unwrap_err();
        assert!(err.contains("often"), "{err}");
        let err =
            load("[[health_check]]\nname = \"x\"\nkind = \"udp\"\ntarget = \"h:1\"\n").unwrap_err();
        assert!(err.contains("udp"), "{err}");
        let err = load(
            "[[health_check]]\nname = \"x\"\nkind = \"http\"\ntarget = \"http://h/\"\nexpect_status = 42\n",
        )
        .unwrap_err();
        assert!(err.contains("not an HTTP status"), "{err}");
    }
}
