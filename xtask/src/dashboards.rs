//! `cargo xtask dashboards`: writes the Grafana dashboards in
//! `dashboards/*.json` from the definitions below; `--check` fails if the
//! committed files differ from what this would write.
//!
//! A generator rather than hand-edited JSON so that every dashboard gets the
//! same skeleton — a stable `uid`, the shared tags, the `${datasource}`,
//! `$job`, `$instance` (and where it matters `$plugin`, `$listener`)
//! variables, the reload annotations, a packed grid — and a panel is one
//! line of intent: title, what it says, unit, queries. The JSON stays
//! committed, so operators import files, not a build step.
//!
//! Every query here is run against a real Prometheus that scraped the real
//! daemon by `tests/tests/prometheus.rs`; a panel that returns no data
//! fails that test by dashboard and panel title.
use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

use crate::util;

/// Flags of `cargo xtask dashboards`.
#[derive(clap::Args)]
pub struct Args {
    /// Do not write; fail if a committed dashboard is not what would be written.
    #[arg(long)]
    pub check: bool,
}

/// Tags every plugvisor dashboard carries (Grafana's dashboard links and
/// search group them by these).
const TAGS: [&str; 2] = ["plugvisor", "edge"];

/// The datasource every panel and variable queries.
const DS: &str = "${datasource}";

/// The selector every plugvisor and process series is filtered by.
const SEL: &str = r#"job=~"$job", instance=~"$instance""#;

/// Grid width Grafana lays panels on.
const GRID_WIDTH: u32 = 24;

/// Runs the subcommand.
pub fn run(args: &Args) -> Result<()> {
    let dir = util::workspace_root().join("dashboards");
    let mut stale = Vec::new();
    for (file, board) in all() {
        let path = dir.join(file);
        let text = render(&board);
        if args.check {
            let committed = std::fs::read_to_string(&path).unwrap_or_default();
            if committed != text {
                stale.push(path);
            }
        } else {
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
            println!("dashboards: wrote {}", path.display());
        }
    }
    if !stale.is_empty() {
        bail!(
            "dashboards out of date (run `cargo xtask dashboards`): {}",
            stale
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if args.check {
        println!("dashboards: committed JSON is up to date");
    }
    Ok(())
}

/// Pretty JSON with a final newline, as committed.
fn render(board: &Value) -> String {
    let mut s = serde_json::to_string_pretty(board).expect("a JSON value serializes");
    s.push('\n');
    s
}

/// Every dashboard with its file name under `dashboards/`.
fn all() -> Vec<(&'static str, Value)> {
    vec![
        ("plugvisor-overview.json", overview()),
        ("plugvisor-continuity.json", continuity()),
        ("plugvisor-latency.json", latency()),
        ("plugvisor-resources.json", resources()),
    ]
}

/// The path of a committed dashboard (for tests).
#[cfg(test)]
fn committed(file: &str) -> std::path::PathBuf {
    util::workspace_root().join("dashboards").join(file)
}

/// A dashboard under construction: panels are placed left to right, a row
/// header starts a new line.
struct Board {
    panels: Vec<Value>,
    x: u32,
    y: u32,
    row_height: u32,
    next_id: u32,
}

impl Board {
    fn new() -> Board {
        Board {
            panels: Vec::new(),
            x: 0,
            y: 0,
            row_height: 0,
            next_id: 1,
        }
    }

    fn id(&mut self) -> u32 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// A row header on a line of its own.
    fn row(&mut self, title: &str) {
        self.newline();
        let id = self.id();
        self.panels.push(json!({
            "type": "row",
            "id": id,
            "title": title,
            "collapsed": false,
            "gridPos": { "h": 1, "w": GRID_WIDTH, "x": 0, "y": self.y },
            "panels": [],
        }));
        self.y += 1;
    }

    fn newline(&mut self) {
        if self.x > 0 {
            self.y += self.row_height;
        }
        self.x = 0;
        self.row_height = 0;
    }

    /// Places `panel` `w` columns wide and `h` high.
    fn add(&mut self, w: u32, h: u32, mut panel: Value) {
        if self.x + w > GRID_WIDTH {
            self.newline();
        }
        panel["id"] = json!(self.id());
        panel["gridPos"] = json!({ "h": h, "w": w, "x": self.x, "y": self.y });
        self.panels.push(panel);
        self.x += w;
        self.row_height = self.row_height.max(h);
    }
}

/// One query of a panel.
struct Q<'a> {
    expr: String,
    legend: &'a str,
}

fn q(expr: impl Into<String>, legend: &str) -> Q<'_> {
    Q {
        expr: expr.into(),
        legend,
    }
}

fn datasource() -> Value {
    json!({ "type": "prometheus", "uid": DS })
}

/// Prometheus targets with refIds A, B, …; `kind` is `range`, `instant` or
/// `heatmap`.
fn targets(queries: &[Q<'_>], kind: &str) -> Value {
    let targets: Vec<Value> = queries
        .iter()
        .zip('A'..='Z')
        .map(|(q, ref_id)| {
            let mut t = json!({
                "datasource": datasource(),
                "refId": ref_id.to_string(),
                "expr": q.expr,
                "legendFormat": q.legend,
                "editorMode": "code",
            });
            match kind {
                "instant" => {
                    t["instant"] = json!(true);
                    t["range"] = json!(false);
                    t["format"] = json!("table");
                }
                "heatmap" => {
                    t["range"] = json!(true);
                    t["format"] = json!("heatmap");
                }
                _ => t["range"] = json!(true),
            }
            t
        })
        .collect();
    json!(targets)
}

/// A time series panel.
fn timeseries(title: &str, description: &str, unit: &str, queries: &[Q<'_>]) -> Value {
    json!({
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": datasource(),
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "custom": { "drawStyle": "line", "lineWidth": 1, "fillOpacity": 10, "showPoints": "never", "spanNulls": false },
            },
            "overrides": [],
        },
        "options": {
            "legend": { "displayMode": "table", "placement": "bottom", "showLegend": true, "calcs": ["lastNotNull", "max"] },
            "tooltip": { "mode": "multi", "sort": "desc" },
        },
        "targets": targets(queries, "range"),
    })
}

/// A time series panel drawn as bars (counts per interval).
fn bars(title: &str, description: &str, queries: &[Q<'_>]) -> Value {
    let mut p = timeseries(title, description, "short", queries);
    p["fieldConfig"]["defaults"]["custom"]["drawStyle"] = json!("bars");
    p["fieldConfig"]["defaults"]["custom"]["fillOpacity"] = json!(80);
    p["fieldConfig"]["defaults"]["custom"]["stacking"] = json!({ "mode": "normal" });
    p
}

/// A stat panel; `bad_from` (if any) turns it red from that value up.
fn stat(title: &str, description: &str, unit: &str, query: Q<'_>, bad_from: Option<f64>) -> Value {
    let steps = match bad_from {
        Some(v) => json!([{ "color": "green", "value": null }, { "color": "red", "value": v }]),
        None => json!([{ "color": "blue", "value": null }]),
    };
    json!({
        "type": "stat",
        "title": title,
        "description": description,
        "datasource": datasource(),
        "fieldConfig": {
            "defaults": { "unit": unit, "thresholds": { "mode": "absolute", "steps": steps } },
            "overrides": [],
        },
        "options": {
            "reduceOptions": { "calcs": ["lastNotNull"], "fields": "", "values": false },
            "colorMode": "background",
            "graphMode": "none",
            "textMode": "auto",
        },
        "targets": targets(&[query], "range"),
    })
}

/// A table of the current value of each series (labels as columns).
fn table(title: &str, description: &str, query: Q<'_>) -> Value {
    json!({
        "type": "table",
        "title": title,
        "description": description,
        "datasource": datasource(),
        "fieldConfig": { "defaults": {}, "overrides": [] },
        "options": { "showHeader": true, "cellHeight": "sm" },
        "transformations": [
            { "id": "organize", "options": { "excludeByName": { "Time": true } } },
        ],
        "targets": targets(&[query], "instant"),
    })
}

/// A heatmap of a histogram's buckets (`sum by (le) (increase(…_bucket[$__interval]))`).
fn heatmap(title: &str, description: &str, unit: &str, expr: String) -> Value {
    json!({
        "type": "heatmap",
        "title": title,
        "description": description,
        "datasource": datasource(),
        // Each cell is an increase() over $__interval: at least a few
        // scrapes wide, or short ranges would show empty cells.
        "interval": "1m",
        "fieldConfig": { "defaults": {}, "overrides": [] },
        "options": {
            "calculate": false,
            "cellGap": 1,
            "color": { "mode": "scheme", "scheme": "Oranges", "scale": "exponential", "exponent": 0.5 },
            "yAxis": { "unit": unit, "axisPlacement": "left" },
            "rowsFrame": { "layout": "auto" },
            "tooltip": { "show": true, "yHistogram": true },
            "legend": { "show": true },
        },
        "targets": targets(&[q(expr, "{{le}}")], "heatmap"),
    })
}

/// A query variable over the label values of a series.
fn variable(name: &str, label: &str, query: &str, all: bool) -> Value {
    json!({
        "type": "query",
        "name": name,
        "label": label,
        "datasource": datasource(),
        "definition": query,
        "query": { "query": query, "refId": format!("{name}-values") },
        "refresh": 2,
        "sort": 1,
        "multi": all,
        "includeAll": all,
        "allValue": if all { json!(".*") } else { Value::Null },
        "current": {},
        "hide": 0,
        "regex": "",
    })
}

/// The dashboard around `board`'s panels: uid, tags, variables, annotations.
fn dashboard(
    uid: &str,
    title: &str,
    description: &str,
    extra_vars: &[&str],
    board: Board,
) -> Value {
    let mut vars = vec![
        json!({
            "type": "datasource",
            "name": "datasource",
            "label": "Data source",
            "query": "prometheus",
            "current": {},
            "hide": 0,
            "refresh": 1,
            "regex": "",
        }),
        variable(
            "job",
            "Job",
            "label_values(plugvisor_build_info, job)",
            false,
        ),
        variable(
            "instance",
            "Instance",
            r#"label_values(plugvisor_build_info{job=~"$job"}, instance)"#,
            true,
        ),
    ];
    for v in extra_vars {
        vars.push(match *v {
            "plugin" => variable(
                "plugin",
                "Plugin",
                &format!("label_values(plugvisor_plugin_info{{{SEL}}}, plugin)"),
                true,
            ),
            "listener" => variable(
                "listener",
                "Listener",
                &format!("label_values(plugvisor_tcp_connections{{{SEL}}}, listener)"),
                true,
            ),
            other => panic!("unknown variable {other}"),
        });
    }
    let links: Vec<Value> = vec![json!({
        "type": "dashboards",
        "title": "plugvisor",
        "tags": TAGS,
        "asDropdown": true,
        "includeVars": true,
        "keepTime": true,
    })];
    json!({
        "uid": uid,
        "title": title,
        "description": description,
        "tags": TAGS,
        "timezone": "browser",
        "editable": true,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": { "from": "now-1h", "to": "now" },
        "links": links,
        "templating": { "list": vars },
        "annotations": { "list": [
            {
                "builtIn": 1,
                "datasource": { "type": "grafana", "uid": "-- Grafana --" },
                "enable": true,
                "hide": true,
                "iconColor": "rgba(0, 211, 255, 1)",
                "name": "Annotations & Alerts",
                "type": "dashboard",
            },
            {
                "name": "Reloads",
                "datasource": datasource(),
                "enable": true,
                "iconColor": "blue",
                "expr": format!("sum by (instance, plugin, outcome) (increase(plugvisor_reloads_total{{{SEL}}}[$__interval])) > 0"),
                "step": "1m",
                "titleFormat": "reload {{outcome}}: {{plugin}}",
                "textFormat": "{{instance}}",
            },
            {
                "name": "Rollbacks",
                "datasource": datasource(),
                "enable": true,
                "iconColor": "red",
                "expr": format!("sum by (instance, plugin, reason) (increase(plugvisor_rollbacks_total{{{SEL}}}[$__interval])) > 0"),
                "step": "1m",
                "titleFormat": "rollback of {{plugin}}: {{reason}}",
                "textFormat": "{{instance}}",
            },
        ]},
        "panels": Value::Array(board.panels),
    })
}

#[expect(
    clippy::too_many_lines,
    reason = "one statement per panel: the dashboard reads top to bottom as it is laid out"
)]
fn overview() -> Value {
    let plug = format!(r#"{SEL}, plugin=~"$plugin""#);
    let mut b = Board::new();
    b.row("Fleet");
    b.add(
        4,
        4,
        stat(
            "Daemons",
            "plugvisor processes reporting build_info.",
            "short",
            q(format!("count(plugvisor_build_info{{{SEL}}})"), ""),
            None,
        ),
    );
    b.add(
        5,
        4,
        stat(
            "Reloads in range",
            "Reload attempts by outcome over the dashboard's time range.",
            "short",
            q(
                format!("sum by (outcome) (increase(plugvisor_reloads_total{{{plug}}}[$__range]))"),
                "{{outcome}}",
            ),
            None,
        ),
    );
    b.add(
        5,
        4,
        stat(
            "Rollbacks in range",
            "Rollbacks (by an operator or a rule) over the time range.",
            "short",
            q(
                format!("sum(increase(plugvisor_rollbacks_total{{{plug}}}[$__range]))"),
                "",
            ),
            Some(1.0),
        ),
    );
    b.add(
        4,
        4,
        stat(
            "Degraded plugins",
            "Plugins running degraded now.",
            "short",
            q(format!("sum(plugvisor_degraded{{{plug}}})"), ""),
            Some(1.0),
        ),
    );
    b.add(
        3,
        4,
        stat(
            "Dependency conflicts",
            "Unresolved dependency conflicts now.",
            "short",
            q(format!("sum(plugvisor_dependency_conflicts{{{plug}}})"), ""),
            Some(1.0),
        ),
    );
    let mut valid = stat(
        "Thresholds file valid",
        "0: the last thresholds file was invalid and the previous rules stay in force.",
        "short",
        q(format!("min(plugvisor_rules_config_valid{{{SEL}}})"), ""),
        None,
    );
    valid["fieldConfig"]["defaults"]["thresholds"]["steps"] =
        json!([{ "color": "red", "value": null }, { "color": "green", "value": 1 }]);
    valid["fieldConfig"]["defaults"]["mappings"] = json!([{ "type": "value", "options": {
        "0": { "text": "invalid", "index": 0 }, "1": { "text": "valid", "index": 1 } } }]);
    b.add(3, 4, valid);

    b.row("Plugins");
    b.add(14, 8, table("Plugins, versions and states",
        "Every mapped version: state active (serving) or standby (mapped for instant rollback).",
        q(format!("max by (instance, plugin, version, state) (plugvisor_plugin_info{{{plug}}})"), "")));
    b.add(
        10,
        8,
        table(
            "plugvisor builds",
            "The running plugvisor version on each instance.",
            q(
                format!("max by (instance, version) (plugvisor_build_info{{{SEL}}})"),
                "",
            ),
        ),
    );
    b.add(12, 8, timeseries("Requests by version", "Requests per second by the plugin version that answered them, and outcome.", "reqps",
        &[q(format!("sum by (plugin, version, outcome) (rate(plugvisor_requests_total{{{plug}}}[$__rate_interval]))"), "{{plugin}} {{version}} {{outcome}}")]));
    b.add(
        12,
        8,
        timeseries(
            "Mapped versions per plugin",
            "Versions kept mapped (bounded by [reload] keep_loaded).",
            "short",
            &[q(
                format!("count by (instance, plugin) (plugvisor_plugin_info{{{plug}}})"),
                "{{instance}} {{plugin}}",
            )],
        ),
    );

    b.row("Reloads, rollbacks and degrades");
    b.add(8, 8, bars("Reloads by outcome", "success: the new version serves; rejected: bad package; failed: good package that did not start.",
        &[q(format!("sum by (plugin, outcome) (increase(plugvisor_reloads_total{{{plug}}}[$__rate_interval]))"), "{{plugin}} {{outcome}}")]));
    b.add(8, 8, bars("Rollbacks by reason", "Rollbacks, by the rule or operator action that caused them.",
        &[q(format!("sum by (plugin, reason) (increase(plugvisor_rollbacks_total{{{plug}}}[$__rate_interval]))"), "{{plugin}} {{reason}}")]));
    b.add(8, 8, bars("Degradations by reason", "Steps down that keep serving, by reason.",
        &[q(format!("sum by (plugin, reason) (increase(plugvisor_degradations_total{{{plug}}}[$__rate_interval]))"), "{{plugin}} {{reason}}")]));

    b.row("Dependencies, rules and health");
    b.add(
        8,
        8,
        table(
            "Dependency conflicts",
            "Conflicts by kind: missing, version, cycle, conflict, abi.",
            q(
                format!(
                    "max by (instance, plugin, kind) (plugvisor_dependency_conflicts{{{plug}}})"
                ),
                "",
            ),
        ),
    );
    b.add(
        8,
        8,
        timeseries(
            "Degraded",
            "1 while a plugin runs degraded.",
            "short",
            &[q(
                format!("max by (instance, plugin) (plugvisor_degraded{{{plug}}})"),
                "{{instance}} {{plugin}}",
            )],
        ),
    );
    b.add(
        8,
        8,
        timeseries(
            "Rule states",
            "State of each thresholds rule.",
            "short",
            &[q(
                format!("max by (instance, rule) (plugvisor_rule_state{{{SEL}}})"),
                "{{instance}} {{rule}}",
            )],
        ),
    );
    b.add(
        12,
        8,
        timeseries(
            "Health checks",
            "1 while a health check passes.",
            "short",
            &[q(
                format!("min by (instance, check) (plugvisor_health_check_up{{{SEL}}})"),
                "{{instance}} {{check}}",
            )],
        ),
    );
    b.add(
        12,
        8,
        timeseries(
            "Thresholds file valid",
            "1 while the loaded thresholds file is valid.",
            "short",
            &[q(
                format!("min by (instance) (plugvisor_rules_config_valid{{{SEL}}})"),
                "{{instance}}",
            )],
        ),
    );

    b.row("Fleet sync ([sync], docs/FLEET.md)");
    b.add(
        12,
        8,
        table(
            "Sync state",
            "Each plugin's fleet sync state on each node: synced, pending (repository unreachable, or a release on its way), stale (a published rollback being followed), blocked (the release was refused or rolled back here), expired (no verified metadata past max_offline).",
            q(
                format!("max by (instance, plugin, state) (plugvisor_sync_state{{{plug}}}) == 1"),
                "",
            ),
        ),
    );
    b.add(
        6,
        8,
        timeseries(
            "Since the repository was last verified",
            "Seconds since each node last read and verified the fleet's TUF repository.",
            "s",
            &[q(
                format!("time() - max by (instance) (plugvisor_sync_last_success_timestamp_seconds{{{SEL}}})"),
                "{{instance}}",
            )],
        ),
    );
    b.add(
        6,
        8,
        bars(
            "Sync errors",
            "Fleet sync failures by stage: timestamp, snapshot, targets (metadata), download, verify (a file not the one signed), commit.",
            &[q(
                format!("sum by (instance, stage) (increase(plugvisor_sync_errors_total{{{SEL}}}[$__interval])) > 0"),
                "{{instance}} {{stage}}",
            )],
        ),
    );

    b.row("Coordinator link ([report.mqtt], docs/REPORTING.md)");
    b.add(
        8,
        8,
        timeseries(
            "MQTT link up",
            "1 while the node's link to the coordinator's broker stands; 0 while it is down or refused (plugvisor status says why).",
            "short",
            &[q(
                format!("min by (instance) (plugvisor_report_connected{{{SEL}}})"),
                "{{instance}}",
            )],
        ),
    );
    b.add(
        8,
        8,
        timeseries(
            "Events waiting in the outbox",
            "Events on disk waiting for the broker's PUBACK: 0 on a healthy link, growing while the broker is away, sent in order when it is back.",
            "short",
            &[q(
                format!("max by (instance) (plugvisor_report_outbox_events{{{SEL}}})"),
                "{{instance}}",
            )],
        ),
    );
    b.add(
        8,
        8,
        bars(
            "Events reported",
            "Events acknowledged by the broker (published), and events the outbox's bound dropped (a gap the coordinator sees).",
            &[q(
                format!("sum by (instance, outcome) (increase(plugvisor_report_events_total{{{SEL}}}[$__interval])) > 0"),
                "{{instance}} {{outcome}}",
            )],
        ),
    );

    dashboard(
        "plugvisor-overview",
        "plugvisor / Overview",
        "Plugins, versions and states; reloads by outcome; rollbacks and degrades with their reasons; dependency conflicts.",
        &["plugin"],
        b,
    )
}

fn continuity() -> Value {
    let lis = format!(r#"{SEL}, listener=~"$listener""#);
    let mut b = Board::new();
    b.row("Connections, as the kernel sees them");
    b.add(
        12,
        8,
        timeseries(
            "Established connections",
            "Server-side ESTABLISHED connections per listener, counted in the kernel.",
            "short",
            &[q(
                format!("sum by (instance, listener) (plugvisor_tcp_connections{{{lis}}})"),
                "{{instance}} {{listener}}",
            )],
        ),
    );
    b.add(6, 8, stat("Broken during reloads, in range", "Connections closed or reset while a reload window was open. The headline number: it should be 0.", "short",
        q(format!("sum(increase(plugvisor_reload_broken_connections_total{{{lis}}}[$__range]))"), ""), Some(1.0)));
    b.add(6, 8, stat("Successful reloads, in range", "Reloads the broken connections are set against.", "short",
        q(format!(r#"sum(increase(plugvisor_reloads_total{{{SEL}, outcome="success"}}[$__range]))"#), ""), None));

    b.row("Broken connections");
    b.add(12, 8, bars("Broken connections during reload windows", "By listener and protocol (kernel-observed).",
        &[q(format!("sum by (instance, listener, protocol) (increase(plugvisor_reload_broken_connections_total{{{lis}}}[$__rate_interval]))"), "{{instance}} {{listener}} {{protocol}}")]));
    b.add(12, 8, timeseries("Broken connections per reload", "Broken connections divided by successful reloads, per instance.", "short",
        &[q(format!(
            r#"sum by (instance) (increase(plugvisor_reload_broken_connections_total{{{lis}}}[$__rate_interval])) / sum by (instance) (increase(plugvisor_reloads_total{{{SEL}, outcome="success"}}[$__rate_interval]))"#
        ), "{{instance}}")]));

    b.row("TCP");
    b.add(12, 8, timeseries("Resets by direction", "RSTs sent and received by the server side of each listener.", "pps",
        &[q(format!("sum by (instance, listener, direction) (rate(plugvisor_tcp_resets_total{{{lis}}}[$__rate_interval]))"), "{{instance}} {{listener}} {{direction}}")]));
    b.add(12, 8, timeseries("Retransmits", "Segments the server side retransmitted.", "pps",
        &[q(format!("sum by (instance, listener) (rate(plugvisor_tcp_retransmits_total{{{lis}}}[$__rate_interval]))"), "{{instance}} {{listener}}")]));

    b.row("HTTP/2 on gRPC listeners");
    b.add(12, 8, bars("GOAWAY sent", "GOAWAY frames a gRPC listener sent (a reload needs none; a drain sends two).",
        &[q(format!("sum by (instance, listener) (increase(plugvisor_grpc_goaway_total{{{lis}}}[$__rate_interval]))"), "{{instance}} {{listener}}")]));
    b.add(12, 8, bars("RST_STREAM sent", "Streams a gRPC listener reset.",
        &[q(format!("sum by (instance, listener) (increase(plugvisor_grpc_stream_resets_total{{{lis}}}[$__rate_interval]))"), "{{instance}} {{listener}}")]));

    dashboard(
        "plugvisor-continuity",
        "plugvisor / Continuity",
        "Kernel-observed connections, broken connections per reload, resets, retransmits, GOAWAY and RST_STREAM.",
        &["listener"],
        b,
    )
}

fn latency() -> Value {
    let plug = format!(r#"{SEL}, plugin=~"$plugin""#);
    let lis = format!(r#"{SEL}, listener=~"$listener""#);
    let user = |quantile: &str| {
        format!(
            r#"histogram_quantile({quantile}, sum by (le, plugin) (rate(plugvisor_reload_duration_seconds_bucket{{{plug}, phase="total"}}[$__rate_interval])))"#
        )
    };
    let kernel = |quantile: &str| {
        format!(
            "histogram_quantile({quantile}, sum by (le, plugin) (rate(plugvisor_kernel_reload_duration_seconds_bucket{{{plug}}}[$__rate_interval])))"
        )
    };
    let gap = |quantile: &str| {
        format!(
            "histogram_quantile({quantile}, sum by (le, listener, window) (rate(plugvisor_service_gap_seconds_bucket{{{lis}}}[$__rate_interval])))"
        )
    };
    let mut b = Board::new();
    b.row("Reload latency: userspace and kernel");
    b.add(12, 9, timeseries("Reload latency quantiles",
        "Userspace: manifest commit to new version serving (phase total). Kernel: the reload window between the begin and end uprobes.", "s",
        &[q(user("0.5"), "userspace p50 {{plugin}}"), q(user("0.99"), "userspace p99 {{plugin}}"),
          q(kernel("0.5"), "kernel p50 {{plugin}}"), q(kernel("0.99"), "kernel p99 {{plugin}}")]));
    b.add(12, 9, timeseries("Mean switch: userspace load+init+switch vs kernel window",
        "Like with like: the kernel's window spans load, init and switch.", "s",
        &[q(format!(r#"sum by (plugin) (rate(plugvisor_reload_duration_seconds_sum{{{plug}, phase=~"load|init|switch"}}[$__rate_interval])) / sum by (plugin) (rate(plugvisor_reload_duration_seconds_count{{{plug}, phase="switch"}}[$__rate_interval]))"#), "userspace {{plugin}}"),
          q(format!("sum by (plugin) (rate(plugvisor_kernel_reload_duration_seconds_sum{{{plug}}}[$__rate_interval])) / sum by (plugin) (rate(plugvisor_kernel_reload_duration_seconds_count{{{plug}}}[$__rate_interval]))"), "kernel {{plugin}}")]));
    b.add(24, 8, timeseries("Userspace mean by phase", "verify, stage (hash while copying), load (dlopen), init, switch, publish, total. Only total has buckets by default; [metrics] detail = [\"reload_phases\"] adds them to every phase, for a p99 per phase.", "s",
        &[q(format!("sum by (phase) (rate(plugvisor_reload_duration_seconds_sum{{{plug}}}[$__rate_interval])) / sum by (phase) (rate(plugvisor_reload_duration_seconds_count{{{plug}}}[$__rate_interval]))"), "{{phase}}")]));
    b.add(12, 8, heatmap("Userspace reload latency (total)", "Reloads per latency bucket.", "s",
        format!(r#"sum by (le) (increase(plugvisor_reload_duration_seconds_bucket{{{plug}, phase="total"}}[$__interval]))"#)));
    b.add(12, 8, heatmap("Kernel reload window", "Reload windows per latency bucket, measured in the kernel.", "s",
        format!("sum by (le) (increase(plugvisor_kernel_reload_duration_seconds_bucket{{{plug}}}[$__interval]))")));

    b.row("Service gap, kernel-measured");
    b.add(24, 8, timeseries("Service gap by window",
        "Request bytes in to response bytes out, inside a reload window (reload) and outside (steady). A stall shows here as plainly as a break shows on Continuity.", "s",
        &[q(gap("0.5"), "p50 {{listener}} {{window}}"), q(gap("0.99"), "p99 {{listener}} {{window}}")]));
    b.add(12, 8, heatmap("Service gap, reload window", "Requests per gap bucket while a reload window was open.", "s",
        format!(r#"sum by (le) (increase(plugvisor_service_gap_seconds_bucket{{{lis}, window="reload"}}[$__interval]))"#)));
    b.add(12, 8, heatmap("Service gap, steady", "Requests per gap bucket outside reload windows.", "s",
        format!(r#"sum by (le) (increase(plugvisor_service_gap_seconds_bucket{{{lis}, window="steady"}}[$__interval]))"#)));

    dashboard(
        "plugvisor-latency",
        "plugvisor / Latency",
        "Userspace vs kernel reload latency as quantiles and heatmaps; service gap by window.",
        &["plugin", "listener"],
        b,
    )
}

fn resources() -> Value {
    let mut b = Board::new();
    b.row("Process");
    b.add(
        12,
        8,
        timeseries(
            "Resident memory",
            "RSS of the plugvisor process, mapped plugin versions included.",
            "bytes",
            &[q(
                format!("process_resident_memory_bytes{{{SEL}}}"),
                "{{instance}}",
            )],
        ),
    );
    b.add(
        12,
        8,
        timeseries(
            "CPU",
            "CPU seconds per second (1 = one core).",
            "short",
            &[q(
                format!("rate(process_cpu_seconds_total{{{SEL}}}[$__rate_interval])"),
                "{{instance}}",
            )],
        ),
    );
    b.add(
        12,
        8,
        timeseries(
            "File descriptors",
            "Open descriptors against the limit.",
            "short",
            &[
                q(format!("process_open_fds{{{SEL}}}"), "open {{instance}}"),
                q(format!("process_max_fds{{{SEL}}}"), "max {{instance}}"),
            ],
        ),
    );
    b.add(
        12,
        8,
        timeseries(
            "Threads",
            "OS threads of the plugvisor process.",
            "short",
            &[q(format!("process_threads{{{SEL}}}"), "{{instance}}")],
        ),
    );

    b.row("eBPF probes");
    b.add(
        6,
        8,
        stat(
            "Probes down",
            "Probes not attached now: the kernel's word is missing there.",
            "short",
            q(format!("sum(1 - plugvisor_probe_up{{{SEL}}})"), ""),
            Some(1.0),
        ),
    );
    b.add(
        18,
        8,
        timeseries(
            "Probe up",
            "1 while each eBPF probe is attached.",
            "short",
            &[q(
                format!("min by (instance, probe) (plugvisor_probe_up{{{SEL}}})"),
                "{{instance}} {{probe}}",
            )],
        ),
    );
    b.add(12, 8, bars("Probe failures by stage", "load, attach, read.",
        &[q(format!("sum by (instance, probe, stage) (increase(plugvisor_probe_failures_total{{{SEL}}}[$__rate_interval]))"), "{{instance}} {{probe}} {{stage}}")]));
    b.add(12, 8, timeseries("Dropped events", "Ring buffer records the kernel could not reserve, per second.", "short",
        &[q(format!("sum by (instance, probe) (rate(plugvisor_probe_events_dropped_total{{{SEL}}}[$__rate_interval]))"), "{{instance}} {{probe}}")]));

    dashboard(
        "plugvisor-resources",
        "plugvisor / Resources and probes",
        "RSS, CPU, file descriptors and threads of the daemon; eBPF probe state, failures and dropped events.",
        &[],
        b,
    )
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn committed_dashboards_are_what_the_generator_writes() {
        for (file, board) in all() {
            let committed = std::fs::read_to_string(committed(file)).unwrap_or_default();
            assert!(
                committed == render(&board),
                "dashboards/{file} is stale: run `cargo xtask dashboards`"
            );
        }
    }

    #[test]
    fn every_dashboard_has_the_shared_skeleton() {
        let mut uids = BTreeSet::new();
        for (file, board) in all() {
            let uid = board["uid"].as_str().unwrap();
            assert!(uids.insert(uid.to_owned()), "{file}: uid {uid} reused");
            assert_eq!(board["tags"], json!(TAGS), "{file}");
            let vars = board["templating"]["list"].as_array().unwrap();
            assert_eq!(vars[0]["type"], "datasource", "{file}");
            assert_eq!(vars[0]["name"], "datasource", "{file}");
            let mut ids = BTreeSet::new();
            for p in board["panels"].as_array().unwrap() {
                assert!(
                    ids.insert(p["id"].as_u64().unwrap()),
                    "{file}: panel id reused"
                );
                let g = &p["gridPos"];
                assert!(
                    g["x"].as_u64().unwrap() + g["w"].as_u64().unwrap() <= u64::from(GRID_WIDTH)
                );
                if p["type"] == "row" {
                    continue;
                }
                assert_eq!(p["datasource"]["uid"], DS, "{file}: {}", p["title"]);
                for t in p["targets"].as_array().unwrap() {
                    assert_eq!(t["datasource"]["uid"], DS, "{file}: {}", p["title"]);
                    let expr = t["expr"].as_str().unwrap();
                    assert!(
                        expr.contains(SEL),
                        "{file}: {}: {expr} ignores $job/$instance",
                        p["title"]
                    );
                }
            }
        }
    }
}
