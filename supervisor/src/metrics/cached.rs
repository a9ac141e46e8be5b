//! Families encoded once per change instead of once per scrape.
//!
//! Encoding costs about a microsecond a series with the `prometheus`
//! crate (its gather clones every label pair, then the text is
//! formatted), and most of a large node's series are histograms that
//! change only when something rare happens: a reload, or a request on a
//! listener. Each such family carries a generation that every change
//! bumps; `GET /metrics` re-encodes a family only when its generation
//! moved and otherwise copies the text it made last time.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use prometheus::core::{Collector, Desc};
use prometheus::{Encoder as _, Histogram, HistogramOpts, HistogramVec, TextEncoder, proto};

use super::{LATENCY_BUCKETS, Phase, fine_latency_buckets};

/// A counter of changes to one family.
#[derive(Clone, Default)]
pub struct Generation(Arc<AtomicU64>);

impl Generation {
    /// Marks the family changed. Called after the change, so an encode
    /// that read the old generation re-encodes at the next scrape.
    pub fn bump(&self) {
        self.0.fetch_add(1, Ordering::Release);
    }

    fn get(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }
}

/// A family kept out of the registry's per-scrape gather, with the text
/// of its last encoding.
pub(super) struct Cached {
    collector: Box<dyn Collector>,
    generation: Generation,
    /// (generation encoded + 1, or 0 before the first; the text).
    text: Mutex<(u64, Vec<u8>)>,
}

impl Cached {
    pub(super) fn new(collector: Box<dyn Collector>, generation: Generation) -> Self {
        Cached {
            collector,
            generation,
            text: Mutex::new((0, Vec::new())),
        }
    }

    /// The family's descriptors.
    pub(super) fn desc(&self) -> Vec<&Desc> {
        self.collector.desc()
    }

    /// The family as the registry would gather it: empty families left
    /// out, series sorted by their label values.
    pub(super) fn collect(&self) -> Vec<proto::MetricFamily> {
        let mut families: Vec<proto::MetricFamily> = self
            .collector
            .collect()
            .into_iter()
            .filter(|f| !f.get_metric().is_empty())
            .collect();
        for f in &mut families {
            // Compared in place, nothing cloned: the rules engine gathers
            // every tick.
            f.mut_metric().sort_by(|a, b| {
                let (x, y) = (a.get_label().iter(), b.get_label().iter());
                x.map(proto::LabelPair::value)
                    .cmp(y.map(proto::LabelPair::value))
            });
        }
        families
    }

    /// Appends the family's text to `out`, encoding it again only if it
    /// changed since the last time.
    pub(super) fn encode_into(&self, out: &mut Vec<u8>) {
        let generation = self.generation.get();
        let mut text = self.text.lock().expect("cached text lock");
        if text.0 != generation + 1 {
            text.1.clear();
            TextEncoder::new()
                .encode(&self.collect(), &mut text.1)
                .expect("encoding into a Vec cannot fail");
            text.0 = generation + 1;
        }
        out.extend_from_slice(&text.1);
    }
}

/// A histogram family whose every change goes through [`Self::observe`],
/// so its text can be cached ([`Cached`]).
#[derive(Clone)]
pub struct TrackedHistogramVec {
    vec: HistogramVec,
    generation: Generation,
}

impl TrackedHistogramVec {
    pub(super) fn new(name: &str, help: &str, labels: &[&str]) -> Self {
        TrackedHistogramVec {
            vec: HistogramVec::new(
                HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()),
                labels,
            )
            .expect("valid metric definition"),
            generation: Generation::default(),
        }
    }

    /// Observes `value` in the series with label values `labels`.
    pub fn observe(&self, labels: &[&str], value: f64) {
        self.vec.with_label_values(labels).observe(value);
        self.generation.bump();
    }

    pub(super) fn cached(&self) -> Cached {
        Cached::new(Box::new(self.vec.clone()), self.generation.clone())
    }
}

/// `plugvisor_reload_duration_seconds{plugin,phase}`: one family whose
/// `total` phase has buckets and whose other phases, by default, only
/// `_sum` and `_count` (a `+Inf` bucket alone). Seven phases of full
/// buckets were 168 series a plugin, most of what a 50-plugin node
/// exported; the mean of a phase answers "where does a reload's time
/// go", and the p99 an operator alerts on is the total's.
#[derive(Clone)]
pub struct PhaseHistogramVec {
    /// Phases with buckets.
    bucketed: HistogramVec,
    /// Phases with `_sum` and `_count` only.
    counted: HistogramVec,
    /// Every phase bucketed (`[metrics] detail = ["reload_phases"]`).
    detail: bool,
    generation: Generation,
}

impl PhaseHistogramVec {
    pub(super) fn new(name: &str, help: &str, detail: bool) -> Self {
        let labels = ["plugin", "phase"];
        let buckets = if detail {
            fine_latency_buckets()
        } else {
            LATENCY_BUCKETS.to_vec()
        };
        let bucketed = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), &labels)
            .expect("valid metric definition");
        // The crate refills an empty bucket list with its defaults; a
        // lone +Inf is dropped as implied, which leaves none.
        let counted = HistogramVec::new(
            HistogramOpts::new(name, help).buckets(vec![f64::INFINITY]),
            &labels,
        )
        .expect("valid metric definition");
        PhaseHistogramVec {
            bucketed,
            counted,
            detail,
            generation: Generation::default(),
        }
    }

    fn phase(&self, plugin: &str, phase: Phase) -> Histogram {
        let vec = if self.detail || phase == Phase::Total {
            &self.bucketed
        } else {
            &self.counted
        };
        vec.with_label_values(&[plugin, phase.as_str()])
    }

    /// Observes `seconds` for `phase` of a reload of `plugin`.
    pub fn observe(&self, plugin: &str, phase: Phase, seconds: f64) {
        self.phase(plugin, phase).observe(seconds);
        self.generation.bump();
    }

    pub(super) fn cached(&self) -> Cached {
        Cached::new(Box::new(self.clone()), self.generation.clone())
    }
}

impl Collector for PhaseHistogramVec {
    fn desc(&self) -> Vec<&Desc> {
        self.bucketed.desc()
    }

    fn collect(&self) -> Vec<proto::MetricFamily> {
        let mut families = self.bucketed.collect();
        let counted = self
            .counted
            .collect()
            .into_iter()
            .flat_map(|mut f| f.take_metric());
        if let Some(f) = families.first_mut() {
            f.mut_metric().extend(counted);
        }
        families
    }
}

/// A labelled family of the `prometheus` crate (`IntGaugeVec`,
/// `IntCounterVec`, …) as [`Tracked`] uses it.
pub trait LabelledVec: Collector + Clone + 'static {
    /// One series' handle.
    type Series;
    /// The series with label values `labels`, created at 0 if absent.
    fn series(&self, labels: &[&str]) -> Self::Series;
    /// Removes the series with label values `labels`; whether it existed.
    fn remove(&self, labels: &[&str]) -> bool;
}

impl<T: prometheus::core::MetricVecBuilder + 'static> LabelledVec for prometheus::core::MetricVec<T>
where
    prometheus::core::MetricVec<T>: Collector,
{
    type Series = T::M;
    fn series(&self, labels: &[&str]) -> T::M {
        self.with_label_values(labels)
    }
    fn remove(&self, labels: &[&str]) -> bool {
        self.remove_label_values(labels).is_ok()
    }
}

/// A family that changes only through the record functions (a state
/// gauge, a counter of rare events): each change goes through
/// [`Tracked::update`] or [`Tracked::remove`], which mark it changed, so
/// its text is encoded once per change ([`Cached`]). No handle to one of
/// its series is handed out — a change through one would not be seen.
#[derive(Clone)]
pub struct Tracked<V: LabelledVec> {
    vec: V,
    generation: Generation,
}

impl<V: LabelledVec> Tracked<V> {
    pub(super) fn new(vec: V) -> Self {
        Tracked {
            vec,
            generation: Generation::default(),
        }
    }

    /// Applies `f` to the series with label values `labels` (created at
    /// 0 if absent) and marks the family changed.
    pub fn update<R>(&self, labels: &[&str], f: impl FnOnce(&V::Series) -> R) -> R {
        let r = f(&self.vec.series(labels));
        self.generation.bump();
        r
    }

    /// Creates the series with label values `labels` at 0 if it is absent
    /// (an existing one keeps its value).
    pub fn touch(&self, labels: &[&str]) {
        self.update(labels, |_| ());
    }

    /// Removes the series with label values `labels`.
    pub fn remove(&self, labels: &[&str]) {
        if self.vec.remove(labels) {
            self.generation.bump();
        }
    }

    /// The family, to read a series that exists (tests, status). A
    /// change through it is not encoded: change it with
    /// [`Tracked::update`].
    pub fn vec(&self) -> &V {
        &self.vec
    }

    pub(super) fn cached(&self) -> Cached {
        Cached::new(Box::new(self.vec.clone()), self.generation.clone())
    }
}
