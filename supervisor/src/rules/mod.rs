//! The rules engine: thresholds the operator tunes, evaluated against the
//! very registry Prometheus scrapes, every `evaluation_interval`.
//!
//! Each tick gathers the registry once, keeps per-series sample history as
//! long as the longest window needs, and walks each rule through
//! ok → pending (`for`) → firing, back to ok only past `clear`
//! (hysteresis). Firing yields a [`Decision`]; the daemon task carries it
//! out through `actions` (the engine itself changes nothing), so actions and
//! reloads never interleave. `dry_run` rules are evaluated and reported but
//! decide nothing. The tick numbers of the breach and of the decision are
//! kept, so "acted within two ticks of the breach" is checkable.
pub mod file;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::proto::{MetricFamily, MetricType};
use serde::{Deserialize, Serialize};

pub use file::{Action, Function, OnNoData, Op, Rule, Thresholds, ThresholdsError};

use crate::fswatch::{self, Change};
use crate::metrics::Metrics;

/// A rule's state, as `plugvisor_rule_state` exports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Not breaching.
    Ok = 0,
    /// Breaching, for less than `for`.
    Pending = 1,
    /// Breaching long enough: acting.
    Firing = 2,
}

/// What a rule decided this tick.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// The rule.
    pub rule: String,
    /// What to do.
    pub kind: DecisionKind,
    /// The plugin to do it to (`None`: nothing to act on, alert only).
    pub plugin: Option<String>,
    /// The value that crossed.
    pub observed: f64,
    /// The threshold it crossed.
    pub threshold: f64,
    /// Tick at which the breach was first seen.
    pub breach_tick: u64,
    /// Tick of this decision.
    pub tick: u64,
}

/// The kinds of decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecisionKind {
    /// Roll the plugin back to its known-good version.
    Rollback,
    /// Degrade the plugin at this level.
    Degrade(u32),
    /// The degrading rule cleared: restore full service.
    ClearDegrade,
    /// Report only.
    Alert,
}

/// A rule's state as `plugvisor status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RuleStatus {
    /// Name.
    pub name: String,
    /// ok | pending | firing.
    pub state: State,
    /// Last computed value (the worst series), if any.
    pub observed: Option<f64>,
    /// Threshold.
    pub threshold: f64,
    /// The action.
    pub action: String,
    /// Evaluate-only.
    pub dry_run: bool,
    /// Tick at which the current or last breach began.
    pub breach_tick: Option<u64>,
    /// Tick of the last decision.
    pub acted_tick: Option<u64>,
}

/// Samples of one series.
type History = VecDeque<(Instant, f64)>;

struct RuleRun {
    rule: Rule,
    state: State,
    pending_since: Option<Instant>,
    breach_tick: Option<u64>,
    acted_tick: Option<u64>,
    last_action: Option<Instant>,
    observed: Option<f64>,
    // The plugin a degrade went to, so clearing restores the same one.
    degraded: Option<String>,
    // The plugin the rule is firing for, if it names one.
    target: Option<String>,
    // Evaluations so far: a series that appears after the first one was
    // born during this rule's watch, at 0 (a new counter series starts at
    // 0), so its first sample already counts as an increase.
    evaluations: u64,
    history: HashMap<String, (BTreeMap<String, String>, History)>,
}

impl RuleRun {
    fn new(rule: Rule) -> RuleRun {
        RuleRun {
            rule,
            state: State::Ok,
            pending_since: None,
            breach_tick: None,
            acted_tick: None,
            last_action: None,
            observed: None,
            degraded: None,
            target: None,
            evaluations: 0,
            history: HashMap::new(),
        }
    }
}

/// The engine. Not shared between threads: the daemon owns it in one task.
pub struct Engine {
    runs: Vec<RuleRun>,
    interval: Duration,
    metrics: Arc<Metrics>,
    listener_plugins: HashMap<String, String>,
    tick: u64,
}

/// One flattened series: name, labels, value.
type Series = (String, BTreeMap<String, String>, f64);

/// The registry as (name, labels, value) rows, histograms and summaries
/// expanded into their `_bucket`/`_sum`/`_count` series as Prometheus does.
fn flatten(families: &[MetricFamily]) -> Vec<Series> {
    let mut out = Vec::new();
    for f in families {
        let name = f.name();
        for m in f.get_metric() {
            let labels: BTreeMap<String, String> = m
                .get_label()
                .iter()
                .map(|l| (l.name().to_owned(), l.value().to_owned()))
                .collect();
            match f.get_field_type() {
                MetricType::COUNTER => out.push((name.to_owned(), labels, m.get_counter().value())),
                MetricType::GAUGE => out.push((name.to_owned(), labels, m.get_gauge().value())),
                MetricType::HISTOGRAM => {
                    let h = m.get_histogram();
                    out.push((
                        format!("{name}_count"),
                        labels.clone(),
                        h.get_sample_count() as f64,
                    ));
                    out.push((format!("{name}_sum"), labels.clone(), h.get_sample_sum()));
                    for b in h.get_bucket() {
                        let mut l = labels.clone();
                        l.insert("le".into(), b.upper_bound().to_string());
                        out.push((format!("{name}_bucket"), l, b.cumulative_count() as f64));
                    }
                    let mut l = labels;
                    l.insert("le".into(), "+Inf".into());
                    out.push((format!("{name}_bucket"), l, h.get_sample_count() as f64));
                }
                MetricType::SUMMARY => {
                    let s = m.get_summary();
                    out.push((
                        format!("{name}_count"),
                        labels.clone(),
                        s.sample_count() as f64,
                    ));
                    out.push((format!("{name}_sum"), labels, s.sample_sum()));
                }
                // plugvisor registers no untyped families.
                MetricType::UNTYPED => {}
            }
        }
    }
    out
}

/// Whether `value` matches `pattern`, where `*` matches any run of characters.
pub fn glob(pattern: &str, value: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == value;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !value.starts_with(first) || value.len() < first.len() + last.len() || !value.ends_with(last)
    {
        return false;
    }
    let mut rest = &value[first.len()..value.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

/// Increase of a counter over the samples, counting through resets.
fn increase(h: &History) -> f64 {
    h.iter()
        .zip(h.iter().skip(1))
        .map(|((_, a), (_, b))| if b >= a { b - a } else { *b })
        .sum()
}

impl Engine {
    /// An engine with no rules; `listener_plugins` maps listener names to
    /// the plugin behind them (for rules on `listener` labels).
    pub fn new(metrics: Arc<Metrics>, listener_plugins: HashMap<String, String>) -> Engine {
        Engine {
            runs: Vec::new(),
            interval: Duration::from_secs(1),
            metrics,
            listener_plugins,
            tick: 0,
        }
    }

    /// How often to evaluate.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// Replaces the rules. A rule that keeps its name keeps its state and
    /// history, so editing a threshold does not re-fire what is firing.
    pub fn replace(&mut self, t: Thresholds) {
        let mut old: HashMap<String, RuleRun> = self
            .runs
            .drain(..)
            .map(|r| (r.rule.name.clone(), r))
            .collect();
        for run in old.values() {
            if !t.rules.iter().any(|r| r.name == run.rule.name) {
                self.metrics.forget_rule(&run.rule.name);
            }
        }
        self.runs = t
            .rules
            .into_iter()
            .map(|rule| match old.remove(&rule.name) {
                Some(mut run) => {
                    run.rule = rule;
                    run
                }
                None => RuleRun::new(rule),
            })
            .collect();
        for run in &self.runs {
            // Series a rule can move exist at 0 from the moment it is
            // loaded, so its first action is an increase PromQL can see.
            if let Some(p) = &run.rule.plugin {
                match run.rule.action {
                    Action::Rollback => self.metrics.rollback_at_zero(p, &run.rule.name),
                    Action::Degrade => self.metrics.degradation_at_zero(p, &run.rule.name),
                    Action::Alert => {}
                }
            }
            self.metrics.rule_state(&run.rule.name, run.state as i64);
        }
        self.interval = t.evaluation_interval;
    }

    /// Plugins that some rule is firing for right now (a trial does not
    /// pass while one is).
    pub fn firing_plugins(&self) -> Vec<String> {
        self.runs
            .iter()
            .filter(|r| r.state == State::Firing)
            .filter_map(|r| r.target.clone())
            .collect()
    }

    /// Whether any rule is firing at all.
    pub fn any_firing(&self) -> bool {
        self.runs.iter().any(|r| r.state == State::Firing)
    }

    /// Every rule's state.
    pub fn status(&self) -> Vec<RuleStatus> {
        self.runs
            .iter()
            .map(|r| RuleStatus {
                name: r.rule.name.clone(),
                state: r.state,
                observed: r.observed,
                threshold: r.rule.threshold,
                action: r.rule.action.as_str().to_owned(),
                dry_run: r.rule.dry_run,
                breach_tick: r.breach_tick,
                acted_tick: r.acted_tick,
            })
            .collect()
    }

    /// One evaluation of every rule against the registry, now.
    pub fn evaluate(&mut self) -> Vec<Decision> {
        self.tick += 1;
        let now = Instant::now();
        let series = flatten(&self.metrics.gather());
        let mut decisions = Vec::new();
        for i in 0..self.runs.len() {
            if let Some(d) = self.evaluate_rule(i, &series, now) {
                decisions.push(d);
            }
            let run = &self.runs[i];
            self.metrics.rule_state(&run.rule.name, run.state as i64);
        }
        decisions
    }

    /// The worst computed value over the matching series, with the labels
    /// of the series it came from.
    fn observe(
        &mut self,
        i: usize,
        series: &[Series],
        now: Instant,
    ) -> Option<(f64, BTreeMap<String, String>)> {
        let run = &mut self.runs[i];
        let rule = &run.rule;
        let keep = rule.window;
        let mut seen = Vec::new();
        for (name, labels, value) in series {
            if *name != rule.metric
                || !rule
                    .labels
                    .iter()
                    .all(|(k, pat)| labels.get(k).is_some_and(|v| glob(pat, v)))
            {
                continue;
            }
            let key = format!("{labels:?}");
            let born_here = run.evaluations > 0 && rule.function != Function::Value;
            let entry = run.history.entry(key.clone()).or_insert_with(|| {
                let mut h = VecDeque::new();
                if born_here {
                    h.push_back((now, 0.0));
                }
                (labels.clone(), h)
            });
            entry.1.push_back((now, *value));
            // Keep one sample at or before the window's start, so the
            // increase covers the whole window.
            while entry.1.len() > 2
                && entry
                    .1
                    .get(1)
                    .is_some_and(|(t, _)| now.duration_since(*t) >= keep)
            {
                entry.1.pop_front();
            }
            seen.push(key);
        }
        // Series that disappeared stop counting.
        run.history.retain(|k, _| seen.contains(k));
        run.evaluations += 1;
        let upper = matches!(rule.op, Op::Gt | Op::Ge | Op::Eq | Op::Ne);
        let mut worst: Option<(f64, BTreeMap<String, String>)> = None;
        for (labels, h) in run.history.values() {
            let v = match rule.function {
                Function::Value => h.back().map(|(_, v)| *v),
                Function::Increase => (h.len() >= 2).then(|| increase(h)),
                Function::Rate => {
                    let span = h
                        .back()
                        .zip(h.front())
                        .map(|((b, _), (a, _))| b.duration_since(*a).as_secs_f64());
                    span.filter(|s| *s > 0.0).map(|s| increase(h) / s)
                }
            };
            let Some(v) = v else { continue };
            let better = worst
                .as_ref()
                .is_none_or(|(w, _)| if upper { v > *w } else { v < *w });
            if better {
                worst = Some((v, labels.clone()));
            }
        }
        worst
    }

    fn evaluate_rule(&mut self, i: usize, series: &[Series], now: Instant) -> Option<Decision> {
        let tick = self.tick;
        let observed = self.observe(i, series, now);
        let run = &mut self.runs[i];
        let rule = run.rule.clone();
        run.observed = observed.as_ref().map(|(v, _)| *v);
        let (breaching, cleared) = match &observed {
            Some((v, _)) => (
                rule.op.holds(*v, rule.threshold),
                rule.op.cleared(*v, rule.threshold, rule.clear_at()),
            ),
            None => match rule.on_no_data {
                OnNoData::Ok => (false, true),
                OnNoData::Breach => (true, false),
                OnNoData::Hold => return None,
            },
        };
        let value = run.observed.unwrap_or(f64::NAN);
        match run.state {
            State::Ok | State::Pending if breaching => {
                if run.state == State::Ok {
                    run.breach_tick = Some(tick);
                    run.pending_since = Some(now);
                }
                let held = run
                    .pending_since
                    .map_or(Duration::ZERO, |t| now.duration_since(t));
                if held < rule.for_ {
                    run.state = State::Pending;
                    return None;
                }
                run.state = State::Firing;
                let plugin = self.target(i, observed.as_ref().map(|(_, l)| l));
                let run = &mut self.runs[i];
                run.target.clone_from(&plugin);
                tracing::warn!(
                    rule = %rule.name,
                    observed = value,
                    threshold = rule.threshold,
                    op = rule.op.as_str(),
                    action = rule.action.as_str(),
                    plugin = plugin.as_deref().unwrap_or("-"),
                    dry_run = rule.dry_run,
                    "rule firing"
                );
                let cooling = run
                    .last_action
                    .is_some_and(|t| now.duration_since(t) < rule.cooldown);
                if rule.dry_run {
                    tracing::info!(rule = %rule.name, "dry run: would {} {}", rule.action.as_str(), plugin.as_deref().unwrap_or("nothing"));
                    return None;
                }
                if cooling {
                    tracing::info!(rule = %rule.name, cooldown = ?rule.cooldown, "in cooldown: not acting again yet");
                    return None;
                }
                let kind = match (rule.action, &plugin) {
                    (Action::Rollback, Some(_)) => DecisionKind::Rollback,
                    (Action::Degrade, Some(_)) => DecisionKind::Degrade(rule.level),
                    _ => DecisionKind::Alert,
                };
                if kind == DecisionKind::Degrade(rule.level) {
                    run.degraded.clone_from(&plugin);
                }
                run.last_action = Some(now);
                run.acted_tick = Some(tick);
                Some(Decision {
                    rule: rule.name,
                    kind,
                    plugin,
                    observed: value,
                    threshold: rule.threshold,
                    breach_tick: run.breach_tick.unwrap_or(tick),
                    tick,
                })
            }
            State::Pending => {
                run.state = State::Ok;
                run.pending_since = None;
                None
            }
            State::Firing if cleared => {
                run.state = State::Ok;
                run.pending_since = None;
                run.target = None;
                tracing::info!(rule = %rule.name, observed = value, clear = rule.clear_at(), "rule cleared");
                let plugin = run.degraded.take()?;
                let clear_at = rule.clear_at();
                Some(Decision {
                    rule: rule.name,
                    kind: DecisionKind::ClearDegrade,
                    plugin: Some(plugin),
                    observed: value,
                    threshold: clear_at,
                    breach_tick: run.breach_tick.unwrap_or(tick),
                    tick,
                })
            }
            State::Ok | State::Firing => None,
        }
    }

    /// The plugin a rule acts on: its own `plugin`, else the breaching
    /// series' `plugin` label, else the plugin behind its `listener` label.
    fn target(&self, i: usize, labels: Option<&BTreeMap<String, String>>) -> Option<String> {
        let rule = &self.runs[i].rule;
        rule.plugin.clone().or_else(|| {
            let labels = labels?;
            labels
                .get("plugin")
                .filter(|p| !p.is_empty())
                .cloned()
                .or_else(|| {
                    labels
                        .get("listener")
                        .and_then(|l| self.listener_plugins.get(l).cloned())
                })
        })
    }
}

/// Watches the thresholds file for changes (its directory, since editors
/// and config management replace the file rather than write it in place).
/// Dropping the watcher stops watching.
pub fn watch_file(
    path: &std::path::Path,
    debounce: Duration,
    tx: tokio::sync::mpsc::UnboundedSender<()>,
) -> Result<fswatch::Watcher, fswatch::WatchError> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."))
        .to_owned();
    let name = path.file_name().map(std::ffi::OsStr::to_owned);
    fswatch::watch(&dir, false, debounce, move |change| {
        let ours = match change {
            Change::Paths(paths) => paths
                .iter()
                .any(|p| p.file_name().map(std::ffi::OsStr::to_owned) == name),
            // As before the watchers were shared: lost events alone do
            // not re-read the file (SIGHUP does).
            Change::Lost(_) => false,
        };
        if ours {
            let _ = tx.send(());
        }
    })
}

#[cfg(test)]
#[expect(
    clippy::float_cmp,
    reason = "exact values are set by the tests themselves"
)]
mod tests {
    use std::path::Path;

    use super::*;

    fn engine(rules: &str) -> (Engine, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::new());
        let mut e = Engine::new(
            metrics.clone(),
            HashMap::from([("echo-tcp".to_owned(), "echo".to_owned())]),
        );
        e.replace(Thresholds::parse(rules, Path::new("t")).unwrap());
        (e, metrics)
    }

    #[test]
    fn globs() {
        assert!(glob("*", "anything"));
        assert!(glob("echo-*", "echo-tcp"));
        assert!(glob("*-tcp", "echo-tcp"));
        assert!(glob("e*o*p", "echo-tcp"));
        assert!(!glob("echo-*", "slow-tcp"));
        assert!(!glob("exact", "exactly"));
    }

    #[test]
    fn increase_counts_through_resets() {
        let t = Instant::now();
        let h: History = [(t, 5.0), (t, 7.0), (t, 1.0), (t, 4.0)]
            .into_iter()
            .collect();
        assert_eq!(increase(&h), 2.0 + 1.0 + 3.0);
    }

    const ERRORS: &str = r#"
evaluation_interval = "250ms"
[[rule]]
name = "errors"
metric = "plugvisor_requests_total"
labels = { plugin = "*", outcome = "error" }
function = "increase"
window = "10s"
op = ">"
threshold = 2
action = "rollback"
cooldown = "0s"
"#;

    #[test]
    fn fires_on_the_tick_that_crosses_and_targets_the_series_plugin() {
        let (mut e, m) = engine(ERRORS);
        let c = m
            .requests_total
            .with_label_values(&["echo", "2.0.0", "error"]);
        assert!(e.evaluate().is_empty(), "first sample: no increase yet");
        c.inc_by(2);
        assert!(e.evaluate().is_empty(), "2 is not > 2");
        c.inc();
        let d = e.evaluate();
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].kind, DecisionKind::Rollback);
        assert_eq!(d[0].plugin.as_deref(), Some("echo"));
        assert_eq!(d[0].observed, 3.0);
        assert_eq!(d[0].breach_tick, d[0].tick);
        assert_eq!(m.rule_state.vec().with_label_values(&["errors"]).get(), 2);
        assert!(e.evaluate().is_empty(), "firing acts once");
    }

    #[test]
    fn for_hysteresis_and_degrade_clear() {
        let rules = r#"
[[rule]]
name = "rss"
metric = "plugvisor_tcp_connections"
labels = { listener = "echo-tcp" }
op = ">"
threshold = 10
clear = 5
for = "0s"
action = "degrade"
level = 2
"#;
        let (mut e, m) = engine(rules);
        let g = m.tcp_connections.with_label_values(&["echo-tcp"]);
        g.set(11);
        let d = e.evaluate();
        assert_eq!(d[0].kind, DecisionKind::Degrade(2));
        assert_eq!(
            d[0].plugin.as_deref(),
            Some("echo"),
            "plugin behind the listener"
        );
        g.set(7);
        assert!(e.evaluate().is_empty(), "7 is not yet below clear");
        g.set(5);
        let d = e.evaluate();
        assert_eq!(d[0].kind, DecisionKind::ClearDegrade);
        assert_eq!(m.rule_state.vec().with_label_values(&["rss"]).get(), 0);
    }

    #[test]
    fn dry_run_decides_nothing_and_no_data_follows_the_rule() {
        let (mut e, m) =
            engine(&ERRORS.replace("cooldown = \"0s\"", "cooldown = \"0s\"\ndry_run = true"));
        let c = m
            .requests_total
            .with_label_values(&["echo", "2.0.0", "error"]);
        e.evaluate();
        c.inc_by(5);
        assert!(e.evaluate().is_empty());
        assert_eq!(
            m.rule_state.vec().with_label_values(&["errors"]).get(),
            2,
            "reported as firing"
        );

        let breach = ERRORS
            .replace("plugvisor_requests_total", "plugvisor_nothing_total")
            .replace(
                "cooldown = \"0s\"",
                "on_no_data = \"breach\"\nplugin = \"echo\"",
            );
        let (mut e, _) = engine(&breach);
        assert_eq!(e.evaluate()[0].kind, DecisionKind::Rollback);
    }

    #[test]
    fn a_series_born_after_the_first_evaluation_counts_from_zero() {
        let (mut e, m) = engine(ERRORS);
        assert!(e.evaluate().is_empty());
        // A new version's error series appears already at 5.
        m.requests_total
            .with_label_values(&["echo", "3.0.0", "error"])
            .inc_by(5);
        let d = e.evaluate();
        assert_eq!(d.len(), 1, "fires on the series' first sample");
        assert_eq!(d[0].observed, 5.0);
    }

    #[test]
    fn pending_until_for_elapses() {
        let (mut e, m) = engine(&ERRORS.replace("cooldown = \"0s\"", "for = \"1h\""));
        let c = m
            .requests_total
            .with_label_values(&["echo", "2.0.0", "error"]);
        e.evaluate();
        c.inc_by(5);
        assert!(e.evaluate().is_empty());
        assert_eq!(m.rule_state.vec().with_label_values(&["errors"]).get(), 1);
    }
}
