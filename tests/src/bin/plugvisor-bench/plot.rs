//! PNG charts for `docs/plots/`, drawn with plotters' bitmap backend and
//! a font shipped in a crate (DejaVu Sans), so drawing text needs no
//! system font libraries.
use std::path::Path;

use plotters::prelude::*;

/// How a series is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Joined by a line.
    Line,
    /// A dot per point.
    Points,
}

/// One named series.
pub struct Series {
    /// Legend text.
    pub name: String,
    /// (x, y) points, x in the axis' unit (not yet log-transformed).
    pub points: Vec<(f64, f64)>,
    /// How to draw it.
    pub kind: Kind,
}

/// An empirical CDF of `values`: (value, fraction of values ≤ it).
pub fn cdf(values: &[f64]) -> Vec<(f64, f64)> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    let n = v.len() as f64;
    v.into_iter()
        .enumerate()
        .map(|(i, x)| (x, (i + 1) as f64 / n))
        .collect()
}

const COLORS: [RGBColor; 7] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
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

fn fmt_tick(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

/// Axes of a chart.
pub struct Axes<'a> {
    /// Title above the chart.
    pub title: &'a str,
    /// What x is.
    pub x: &'a str,
    /// What y is.
    pub y: &'a str,
    /// A logarithmic x axis (values ≤ 0 are dropped).
    pub log_x: bool,
    /// Clip y at this value (spikes would squash the rest).
    pub y_max: Option<f64>,
}

/// Draws `series` into a 1000×560 PNG at `path`.
pub fn chart(path: &Path, axes: &Axes<'_>, series: &[Series]) -> Result<(), String> {
    let (title, x_desc, y_desc, log_x) = (axes.title, axes.x, axes.y, axes.log_x);
    let clip = axes.y_max.unwrap_or(f64::INFINITY);
    register_font();
    let tx = |x: f64| if log_x { x.log10() } else { x };
    let pts: Vec<Vec<(f64, f64)>> = series
        .iter()
        .map(|s| {
            s.points
                .iter()
                .filter(|(x, y)| x.is_finite() && y.is_finite() && (!log_x || *x > 0.0))
                .map(|&(x, y)| (tx(x), y.min(clip)))
                .collect()
        })
        .collect();
    let all = pts.iter().flatten();
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, 0f64, f64::MIN);
    for &(x, y) in all {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        return Err(format!("{title}: no data to draw"));
    }
    if (x1 - x0).abs() < f64::EPSILON {
        x1 = x0 + 1.0;
    }
    if (y1 - y0).abs() < f64::EPSILON {
        y1 = y0 + 1.0;
    }
    let pad = (x1 - x0) * 0.02;
    let e = |e: &dyn std::fmt::Display| format!("drawing {}: {e}", path.display());
    let root = BitMapBackend::new(path, (1000, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let mut c = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d((x0 - pad)..(x1 + pad), y0..(y1 * 1.05))
        .map_err(|x| e(&x))?;
    let xf = move |v: &f64| {
        if log_x {
            fmt_tick(10f64.powf(*v))
        } else {
            fmt_tick(*v)
        }
    };
    c.configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .x_label_formatter(&xf)
        .y_label_formatter(&|v: &f64| fmt_tick(*v))
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 16))
        .draw()
        .map_err(|x| e(&x))?;
    for (i, (s, p)) in series.iter().zip(pts).enumerate() {
        let color = COLORS[i % COLORS.len()];
        let anno = match s.kind {
            Kind::Line => c
                .draw_series(LineSeries::new(p, color.stroke_width(2)))
                .map_err(|x| e(&x))?,
            Kind::Points => c
                .draw_series(p.into_iter().map(|xy| Circle::new(xy, 2, color.filled())))
                .map_err(|x| e(&x))?,
        };
        anno.label(s.name.clone()).legend(move |(x, y)| {
            PathElement::new(vec![(x, y), (x + 22, y)], color.stroke_width(3))
        });
    }
    c.configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(|x| e(&x))?;
    root.present().map_err(|x| e(&x))?;
    Ok(())
}
