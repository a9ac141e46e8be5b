//! The thresholds file: operator-tuned rules, parsed and validated, or
//! refused with line and column.
//!
//! ```toml
//! evaluation_interval = "1s"   # optional; default 1s
//! [[rule]]
//! name = "no-broken-connections-on-reload"
//! metric = "plugvisor_reload_broken_connections_total"
//! labels = { listener = "*" }
//! function = "increase"        # value | rate | increase, over `window`
//! window = "30s"
//! op = ">"
//! threshold = 0                # a number, or a size ("512MiB") or duration ("300ms", in seconds)
//! for = "0s"
//! clear = 0
//! on_no_data = "ok"            # ok | breach | hold
//! action = "rollback"          # rollback | degrade | alert
//! cooldown = "60s"
//! dry_run = false
//! ```
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// Largest thresholds file read.
pub const MAX_FILE_BYTES: u64 = 1024 * 1024;
/// Most rules in one file.
pub const MAX_RULES: usize = 1000;

/// Why a thresholds file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ThresholdsError {
    /// The file could not be read.
    #[error("reading thresholds {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Too big to be a thresholds file.
    #[error("thresholds {path} is {size} bytes, more than the {max} allowed")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// Not valid TOML, or not the schema; with line and column.
    #[error("thresholds {path}:{line}:{column}: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// The parser's message.
        message: String,
    },
    /// A rule is well-formed but unacceptable.
    #[error("thresholds {path}: rule {rule:?}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The rule's name (or index).
        rule: String,
        /// What is wrong.
        message: String,
    },
}

/// What a rule computes over its window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Function {
    /// The latest sample.
    Value,
    /// Per-second increase over the window (counter resets handled).
    Rate,
    /// Increase over the window (counter resets handled).
    Increase,
}

/// Comparison of the computed value with the threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Op {
    /// `>`
    #[serde(rename = ">")]
    Gt,
    /// `>=`
    #[serde(rename = ">=")]
    Ge,
    /// `<`
    #[serde(rename = "<")]
    Lt,
    /// `<=`
    #[serde(rename = "<=")]
    Le,
    /// `==`
    #[serde(rename = "==")]
    Eq,
    /// `!=`
    #[serde(rename = "!=")]
    Ne,
}

impl Op {
    /// Whether `value op threshold` holds.
    pub fn holds(self, value: f64, threshold: f64) -> bool {
        match self {
            Op::Gt => value > threshold,
            Op::Ge => value >= threshold,
            Op::Lt => value < threshold,
            Op::Le => value <= threshold,
            Op::Eq => (value - threshold).abs() < f64::EPSILON,
            Op::Ne => (value - threshold).abs() >= f64::EPSILON,
        }
    }

    /// Whether a firing rule may return to ok at `value` (hysteresis): for
    /// an upper bound only at or below `clear`, for a lower bound only at
    /// or above it; equality rules clear when they stop holding.
    pub fn cleared(self, value: f64, threshold: f64, clear: f64) -> bool {
        match self {
            Op::Gt | Op::Ge => value <= clear,
            Op::Lt | Op::Le => value >= clear,
            Op::Eq | Op::Ne => !self.holds(value, threshold),
        }
    }

    /// The operator as written.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Gt => ">",
            Op::Ge => ">=",
            Op::Lt => "<",
            Op::Le => "<=",
            Op::Eq => "==",
            Op::Ne => "!=",
        }
    }
}

/// What an absent series means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnNoData {
    /// Absence is fine.
    #[default]
    Ok,
    /// Absence is a breach.
    Breach,
    /// Keep the previous state.
    Hold,
}

/// What a firing rule does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Back to the last known-good version.
    Rollback,
    /// A step down that keeps serving; clears with the rule.
    Degrade,
    /// Only report.
    Alert,
}

impl Action {
    /// The action as written.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Rollback => "rollback",
            Action::Degrade => "degrade",
            Action::Alert => "alert",
        }
    }
}

/// One rule, validated.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Name: the `rule` label and the `reason` of what it does.
    pub name: String,
    /// A family in the registry (`_count`, `_sum`, `_bucket` of histograms too).
    pub metric: String,
    /// Label matchers; `*` matches any run of characters.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// value | rate | increase.
    #[serde(default = "default_function")]
    pub function: Function,
    /// Window of `rate` and `increase`.
    #[serde(default = "default_window", deserialize_with = "duration")]
    pub window: Duration,
    /// Comparison.
    pub op: Op,
    /// Threshold (numbers, sizes like `512MiB`, durations like `300ms` in seconds).
    #[serde(deserialize_with = "quantity")]
    pub threshold: f64,
    /// How long the breach must hold before the rule fires.
    #[serde(default, rename = "for", deserialize_with = "duration")]
    pub for_: Duration,
    /// Hysteresis: where a firing rule returns to ok (default: the threshold).
    #[serde(default, deserialize_with = "opt_quantity")]
    pub clear: Option<f64>,
    /// What an absent series means.
    #[serde(default)]
    pub on_no_data: OnNoData,
    /// What firing does.
    pub action: Action,
    /// The plugin acted on (else the breaching series' `plugin`, else the
    /// plugin behind its `listener`).
    #[serde(default)]
    pub plugin: Option<String>,
    /// Degrade level passed to the plugin's hook.
    #[serde(default = "default_level")]
    pub level: u32,
    /// Minimum time between two actions of this rule.
    #[serde(default = "default_cooldown", deserialize_with = "duration")]
    pub cooldown: Duration,
    /// Evaluate and report, take no action.
    #[serde(default)]
    pub dry_run: bool,
}

impl Rule {
    /// Where a firing rule returns to ok.
    pub fn clear_at(&self) -> f64 {
        self.clear.unwrap_or(self.threshold)
    }
}

fn default_function() -> Function {
    Function::Value
}
fn default_window() -> Duration {
    Duration::from_secs(60)
}
fn default_level() -> u32 {
    1
}
fn default_cooldown() -> Duration {
    Duration::from_secs(60)
}
fn default_interval() -> Duration {
    Duration::from_secs(1)
}

/// The whole file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Thresholds {
    /// How often rules are evaluated.
    #[serde(default = "default_interval", deserialize_with = "duration")]
    pub evaluation_interval: Duration,
    /// The rules.
    #[serde(default, rename = "rule")]
    pub rules: Vec<Rule>,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            evaluation_interval: default_interval(),
            rules: Vec::new(),
        }
    }
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s)
        .map_err(|e| serde::de::Error::custom(format!("duration {s:?}: {e}")))
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawQuantity {
    Int(i64),
    Float(f64),
    Text(String),
}

/// Parses `512MiB`, `2GB`, `300ms`, `1.5`: sizes to bytes, durations to
/// seconds, plain numbers as they are.
pub fn parse_quantity(s: &str) -> Result<f64, String> {
    let t = s.trim();
    if let Ok(v) = t.parse::<f64>() {
        return Ok(v);
    }
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let unit = unit.trim();
    if let Ok(n) = num.parse::<f64>() {
        let mult = match unit {
            "B" => Some(1.0),
            "KB" | "kB" => Some(1e3),
            "MB" => Some(1e6),
            "GB" => Some(1e9),
            "TB" => Some(1e12),
            "KiB" => Some(1024.0),
            "MiB" => Some(1024.0 * 1024.0),
            "GiB" => Some(1024.0 * 1024.0 * 1024.0),
            "TiB" => Some(1024.0f64.powi(4)),
            _ => None,
        };
        if let Some(m) = mult {
            return Ok(n * m);
        }
    }
    humantime::parse_duration(t)
        .map(|d| d.as_secs_f64())
        .map_err(|_| format!("{s:?} is not a number, a size (512MiB, 2GB) or a duration (300ms)"))
}

fn quantity<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    match RawQuantity::deserialize(d)? {
        RawQuantity::Int(i) => Ok(i as f64),
        RawQuantity::Float(f) => Ok(f),
        RawQuantity::Text(s) => parse_quantity(&s).map_err(serde::de::Error::custom),
    }
}

fn opt_quantity<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    quantity(d).map(Some)
}

/// 1-based line and column of byte `offset` in `text`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

impl Thresholds {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Thresholds, ThresholdsError> {
        let read = |source| ThresholdsError::Read {
            path: path.to_owned(),
            source,
        };
        let size = std::fs::metadata(path).map_err(read)?.len();
        if size > MAX_FILE_BYTES {
            return Err(ThresholdsError::TooLarge {
                path: path.to_owned(),
                size,
                max: MAX_FILE_BYTES,
            });
        }
        // Read no more than the limit even if the file grew since the
        // size was taken (a writer still at work, or a hostile one).
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(
            &mut std::io::Read::take(std::fs::File::open(path).map_err(read)?, MAX_FILE_BYTES + 1),
            &mut bytes,
        )
        .map_err(read)?;
        if bytes.len() as u64 > MAX_FILE_BYTES {
            return Err(ThresholdsError::TooLarge {
                path: path.to_owned(),
                size: std::fs::metadata(path).map_or(bytes.len() as u64, |m| m.len()),
                max: MAX_FILE_BYTES,
            });
        }
        let text = String::from_utf8(bytes)
            .map_err(|e| read(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))?;
        Self::parse(&text, path)
    }

    /// Parses and validates `text` (read from `path`, for messages).
    pub fn parse(text: &str, path: &Path) -> Result<Thresholds, ThresholdsError> {
        let t: Thresholds = toml::from_str(text).map_err(|e| {
            let (line, column) = e.span().map_or((1, 1), |s| line_col(text, s.start));
            ThresholdsError::Syntax {
                path: path.to_owned(),
                line,
                column,
                message: e.message().to_owned(),
            }
        })?;
        t.validate(path)
    }

    fn validate(self, path: &Path) -> Result<Thresholds, ThresholdsError> {
        let invalid = |rule: &str, message: String| ThresholdsError::Invalid {
            path: path.to_owned(),
            rule: rule.to_owned(),
            message,
        };
        if self.evaluation_interval < Duration::from_millis(50)
            || self.evaluation_interval > Duration::from_secs(3600)
        {
            return Err(invalid(
                "-",
                format!(
                    "evaluation_interval {:?} must be within 50ms..1h",
                    self.evaluation_interval
                ),
            ));
        }
        if self.rules.len() > MAX_RULES {
            return Err(invalid(
                "-",
                format!("{} rules; at most {MAX_RULES}", self.rules.len()),
            ));
        }
        let mut names = HashSet::new();
        for r in &self.rules {
            if !crate::name::valid_name(&r.name) {
                return Err(invalid(
                    &r.name,
                    "name: use [a-z0-9_-], at most 64 characters".into(),
                ));
            }
            if !names.insert(r.name.as_str()) {
                return Err(invalid(&r.name, "defined twice".into()));
            }
            let metric_ok = !r.metric.is_empty()
                && r.metric
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':')
                && !r.metric.as_bytes()[0].is_ascii_digit();
            if !metric_ok {
                return Err(invalid(
                    &r.name,
                    format!("metric {:?} is not a Prometheus metric name", r.metric),
                ));
            }
            if !r.threshold.is_finite() || r.clear.is_some_and(|c| !c.is_finite()) {
                return Err(invalid(
                    &r.name,
                    "threshold and clear must be finite".into(),
                ));
            }
            if r.function != Function::Value && r.window < Duration::from_millis(100) {
                return Err(invalid(
                    &r.name,
                    "window must be at least 100ms for rate and increase".into(),
                ));
            }
            if let Some(p) = &r.plugin
                && !crate::name::valid_name(p)
            {
                return Err(invalid(
                    &r.name,
                    format!("plugin {p:?} is not a plugin name"),
                ));
            }
            if let Some(c) = r.clear {
                let wrong_side = match r.op {
                    Op::Gt | Op::Ge => c > r.threshold,
                    Op::Lt | Op::Le => c < r.threshold,
                    Op::Eq | Op::Ne => false,
                };
                if wrong_side {
                    return Err(invalid(
                        &r.name,
                        format!(
                            "clear {c} is on the breaching side of threshold {} for op {}",
                            r.threshold,
                            r.op.as_str()
                        ),
                    ));
                }
            }
        }
        Ok(self)
    }
}

#[cfg(test)]
#[expect(
    clippy::float_cmp,
    reason = "exact values are set by the tests themselves"
)]
mod tests {
    use super::*;

    fn parse(t: &str) -> Result<Thresholds, ThresholdsError> {
        Thresholds::parse(t, Path::new("thresholds.toml"))
    }

    const DESIGN: &str = r#"
[[rule]]
name = "no-broken-connections-on-reload"
metric = "plugvisor_reload_broken_connections_total"
labels = { listener = "*" }
function = "increase"
window = "30s"
op = ">"
threshold = 0
for = "0s"
clear = 0
on_no_data = "ok"
action = "rollback"
cooldown = "60s"
dry_run = false
"#;

    #[test]
    fn design_example_parses() {
        let t = parse(DESIGN).unwrap();
        let r = &t.rules[0];
        assert_eq!(r.function, Function::Increase);
        assert_eq!(r.window, Duration::from_secs(30));
        assert_eq!(r.action, Action::Rollback);
        assert_eq!(r.labels["listener"], "*");
        assert_eq!(t.evaluation_interval, Duration::from_secs(1));
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_quantity("512MiB").unwrap(), 512.0 * 1024.0 * 1024.0);
        assert_eq!(parse_quantity("2GB").unwrap(), 2e9);
        assert!((parse_quantity("300ms").unwrap() - 0.3).abs() < 1e-12);
        assert_eq!(parse_quantity("1.5").unwrap(), 1.5);
        assert!(parse_quantity("lots").is_err());
        let t = parse(
            &DESIGN
                .replace("threshold = 0", "threshold = \"512MiB\"")
                .replace("clear = 0", "clear = \"256MiB\""),
        )
        .unwrap();
        assert_eq!(t.rules[0].threshold, 512.0 * 1024.0 * 1024.0);
    }

    #[test]
    fn errors_carry_line_and_column() {
        let err = parse("[[rule]]\nname = \"x\"\nmetric = \"m\"\nop = \">\"\nthreshold = 1\naction = \"explode\"\n").unwrap_err();
        match err {
            ThresholdsError::Syntax { line, column, .. } => assert_eq!((line, column), (6, 10)),
            other => panic!("{other}"),
        }
        let err =
            parse(&DESIGN.replace("dry_run = false", "dry_run = false\ncolour = 1")).unwrap_err();
        let s = err.to_string();
        assert!(
            s.contains("colour") && s.contains("thresholds.toml:"),
            "{s}"
        );
    }

    #[test]
    fn invalid_rules_are_refused() {
        assert!(
            parse(&format!("{DESIGN}{DESIGN}"))
                .unwrap_err()
                .to_string()
                .contains("defined twice")
        );
        assert!(
            parse(&DESIGN.replace("clear = 0", "clear = 5"))
                .unwrap_err()
                .to_string()
                .contains("breaching side")
        );
        assert!(
            parse(&DESIGN.replace("plugvisor_reload_broken_connections_total", "9bad name"))
                .is_err()
        );
        assert!(parse("evaluation_interval = \"1ms\"\n").is_err());
        assert!(parse(&DESIGN.replace("window = \"30s\"", "window = \"1ms\"")).is_err());
    }

    #[test]
    fn hysteresis() {
        assert!(Op::Gt.holds(5.0, 3.0));
        assert!(!Op::Gt.cleared(2.5, 3.0, 2.0));
        assert!(Op::Gt.cleared(2.0, 3.0, 2.0));
        assert!(Op::Lt.cleared(10.0, 5.0, 8.0));
        assert!(!Op::Lt.cleared(7.0, 5.0, 8.0));
    }
}
