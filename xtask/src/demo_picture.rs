//! The demo as a picture: answers per second on each version over time,
//! the reloads marked, and the kernel's counters beside them — drawn with
//! plotters' bitmap backend and a bundled font (DejaVu Sans), as the
//! bench's plots are, so it needs no system font libraries.
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{Result, anyhow};
use plotters::prelude::*;

/// Width of one bin of answers, in seconds.
const BIN: f64 = 0.1;

/// What happened when, recorded while the demo runs.
pub struct Timeline {
    start: Instant,
    // (bin, version) → answers.
    answers: Mutex<BTreeMap<(u32, String), u64>>,
    // bin → failed exchanges.
    errors: Mutex<BTreeMap<u32, u64>>,
    // (seconds, connections, broken in a reload window) as /metrics said.
    kernel: Mutex<Vec<(f64, f64, f64)>>,
    // (seconds the manifest was written, version).
    reloads: Mutex<Vec<(f64, String)>>,
}

impl Timeline {
    /// An empty timeline starting now.
    pub fn new() -> Timeline {
        Timeline {
            start: Instant::now(),
            answers: Mutex::new(BTreeMap::new()),
            errors: Mutex::new(BTreeMap::new()),
            kernel: Mutex::new(Vec::new()),
            reloads: Mutex::new(Vec::new()),
        }
    }

    fn now(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    fn bin(&self) -> u32 {
        (self.now() / BIN) as u32
    }

    /// One answer from `version`.
    pub fn answer(&self, version: &str) {
        let bin = self.bin();
        let mut a = self
            .answers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *a.entry((bin, version.to_owned())).or_default() += 1;
    }

    /// One failed exchange.
    pub fn error(&self) {
        let bin = self.bin();
        let mut e = self
            .errors
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *e.entry(bin).or_default() += 1;
    }

    /// What the kernel counted at this moment.
    pub fn kernel(&self, connections: f64, broken: f64) {
        let t = self.now();
        self.kernel
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push((t, connections, broken));
    }

    /// The manifest of `version` was written at `at`.
    pub fn reload(&self, at: Instant, version: &str) {
        let t = at.saturating_duration_since(self.start).as_secs_f64();
        self.reloads
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push((t, version.to_owned()));
    }

    /// Draws the timeline into a 1100×700 PNG at `path`.
    pub fn draw(&self, path: &Path) -> Result<()> {
        register_font();
        let lock = || anyhow!("timeline lock poisoned");
        let t = Snapshot {
            answers: self.answers.lock().map_err(|_| lock())?.clone(),
            errors: self.errors.lock().map_err(|_| lock())?.clone(),
            kernel: self.kernel.lock().map_err(|_| lock())?.clone(),
            reloads: self.reloads.lock().map_err(|_| lock())?.clone(),
        };
        // The last bin is cut short by the clients' stop: leave it out.
        let last_bin = t
            .answers
            .keys()
            .map(|(b, _)| *b)
            .max()
            .unwrap_or(1)
            .saturating_sub(1);
        let x_max = f64::from(last_bin + 1) * BIN;
        let root = BitMapBackend::new(path, (1100, 700)).into_drawing_area();
        let e = |x: &dyn std::fmt::Display| anyhow!("drawing {}: {x}", path.display());
        root.fill(&WHITE).map_err(|x| e(&x))?;
        let (top, bottom) = root.split_vertically(440);
        t.draw_answers(&top, last_bin, x_max).map_err(|x| e(&x))?;
        t.draw_kernel(&bottom, x_max).map_err(|x| e(&x))?;
        root.present().map_err(|x| e(&x))?;
        Ok(())
    }
}

/// The timeline as it stood when the picture was drawn.
struct Snapshot {
    answers: BTreeMap<(u32, String), u64>,
    errors: BTreeMap<u32, u64>,
    kernel: Vec<(f64, f64, f64)>,
    reloads: Vec<(f64, String)>,
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;
type DrawResult<'a> =
    Result<(), DrawingAreaErrorKind<<BitMapBackend<'a> as DrawingBackend>::ErrorType>>;

fn rate(n: u64) -> f64 {
    n as f64 / BIN
}

impl Snapshot {
    fn draw_answers<'a>(&self, area: &Area<'a>, last_bin: u32, x_max: f64) -> DrawResult<'a> {
        let versions: BTreeSet<&String> = self.answers.keys().map(|(_, v)| v).collect();
        let y_max = self.answers.values().copied().map(rate).fold(1.0, f64::max) * 1.15;
        let mut c = ChartBuilder::on(area)
            .caption(
                "answers per second on each version, while plugvisor reloads the plugin",
                ("sans-serif", 20),
            )
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(70)
            .build_cartesian_2d(0.0..x_max, 0.0..y_max)?;
        c.configure_mesh()
            .x_desc("seconds since the clients started")
            .y_desc("answers / s")
            .y_label_formatter(&|v: &f64| format!("{v:.0}"))
            .label_style(("sans-serif", 13))
            .axis_desc_style(("sans-serif", 15))
            .draw()?;
        for (i, v) in versions.into_iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            let points: Vec<(f64, f64)> = (0..=last_bin)
                .map(|b| {
                    let n = self.answers.get(&(b, v.clone())).copied().unwrap_or(0);
                    (f64::from(b) * BIN, rate(n))
                })
                .collect();
            c.draw_series(LineSeries::new(points, color.stroke_width(2)))?
                .label(format!("echo {v}"))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 22, y)], color.stroke_width(3))
                });
        }
        let failed: u64 = self.errors.values().sum();
        c.draw_series(
            self.errors
                .iter()
                .map(|(b, n)| Circle::new((f64::from(*b) * BIN, rate(*n)), 4, RED.filled())),
        )?
        .label(format!("failed exchanges ({failed})"))
        .legend(|(x, y)| Circle::new((x + 11, y), 4, RED.filled()));
        for (t, v) in &self.reloads {
            c.draw_series(LineSeries::new(
                vec![(*t, 0.0), (*t, y_max)],
                BLACK.mix(0.6).stroke_width(1),
            ))?;
            c.draw_series(std::iter::once(Text::new(
                format!("reload → {v}"),
                (*t + x_max * 0.005, y_max * 0.97),
                ("sans-serif", 13),
            )))?;
        }
        c.configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 13))
            .position(SeriesLabelPosition::LowerRight)
            .draw()
    }

    fn draw_kernel<'a>(&self, area: &Area<'a>, x_max: f64) -> DrawResult<'a> {
        let k_max = self
            .kernel
            .iter()
            .map(|(_, c, b)| c.max(*b))
            .fold(1.0, f64::max)
            * 1.25;
        let mut k = ChartBuilder::on(area)
            .caption(
                "what the kernel saw (eBPF, via /metrics)",
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(70)
            .build_cartesian_2d(0.0..x_max, 0.0..k_max)?;
        k.configure_mesh()
            .x_desc("seconds since the clients started")
            .y_desc("connections")
            .y_label_formatter(&|v: &f64| format!("{v:.0}"))
            .label_style(("sans-serif", 13))
            .axis_desc_style(("sans-serif", 15))
            .draw()?;
        let established: Vec<(f64, f64)> = self.kernel.iter().map(|s| (s.0, s.1)).collect();
        let broken: Vec<(f64, f64)> = self.kernel.iter().map(|s| (s.0, s.2)).collect();
        for (name, color, points) in [
            ("established connections (echo-tcp)", COLORS[0], established),
            ("broken inside a reload window", RED, broken),
        ] {
            k.draw_series(LineSeries::new(points, color.stroke_width(2)))?
                .label(name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 22, y)], color.stroke_width(3))
                });
        }
        for (t, _) in &self.reloads {
            k.draw_series(LineSeries::new(
                vec![(*t, 0.0), (*t, k_max)],
                BLACK.mix(0.6).stroke_width(1),
            ))?;
        }
        k.configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 13))
            .position(SeriesLabelPosition::MiddleRight)
            .draw()
    }
}

const COLORS: [RGBColor; 5] = [
    RGBColor(31, 119, 180),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(23, 190, 207),
];

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            dejavu::sans::regular(),
        );
    });
}
