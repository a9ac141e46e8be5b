//! The Prometheus text exposition format, parsed for assertions: series by
//! name and labels, sums, and histogram quantiles computed as PromQL does,
//! so a test can state a latency bound without a Prometheus server.
use std::collections::HashMap;

/// A scrape, indexed by series.
#[derive(Debug, Clone)]
pub struct Metrics {
    series: Vec<(String, HashMap<String, String>, f64)>,
}

impl Metrics {
    /// Parses the text exposition format.
    pub fn parse(text: &str) -> Metrics {
        let mut series = Vec::new();
        for line in text.lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let (head, value) = line.rsplit_once(' ').unwrap();
            let value: f64 = value.parse().unwrap_or(f64::NAN);
            let (name, labels) = match head.split_once('{') {
                None => (head.to_owned(), HashMap::new()),
                Some((n, rest)) => {
                    let rest = rest.trim_end_matches('}');
                    let mut labels = HashMap::new();
                    for kv in rest.split("\",").filter(|s| !s.is_empty()) {
                        let (k, v) = kv.split_once('=').unwrap();
                        labels.insert(k.to_owned(), v.trim_matches('"').to_owned());
                    }
                    (n.to_owned(), labels)
                }
            };
            series.push((name, labels, value));
        }
        Metrics { series }
    }

    /// Sum of every series of `name` whose labels include `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).map(|(_, v)| v).sum()
    }

    /// The one series of `name` matching `labels`, if present.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.matching(name, labels).map(|(_, v)| v).next()
    }

    /// Label sets and values of `name` matching `labels`.
    pub fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = (&'a HashMap<String, String>, f64)> + 'a {
        self.series
            .iter()
            .filter(move |(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, l, v)| (l, *v))
    }

    /// The `q` quantile of histogram `name` (filtered by `labels`), by
    /// linear interpolation inside the bucket, as PromQL does.
    pub fn quantile(&self, name: &str, labels: &[(&str, &str)], q: f64) -> Option<f64> {
        let bucket = format!("{name}_bucket");
        let mut buckets: Vec<(f64, f64)> = self
            .matching(&bucket, labels)
            .map(|(l, v)| {
                let le = l["le"].as_str();
                (
                    if le == "+Inf" {
                        f64::INFINITY
                    } else {
                        le.parse().unwrap()
                    },
                    v,
                )
            })
            .collect();
        buckets.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
        let total = buckets.last()?.1;
        if total == 0.0 {
            return None;
        }
        let rank = q * total;
        let mut prev = (0.0, 0.0);
        for (le, count) in buckets {
            if count >= rank {
                if le.is_infinite() {
                    return Some(prev.0);
                }
                let span = count - prev.1;
                let frac = if span > 0.0 {
                    (rank - prev.1) / span
                } else {
                    1.0
                };
                return Some(prev.0 + (le - prev.0) * frac);
            }
            prev = (le, count);
        }
        None
    }
}
