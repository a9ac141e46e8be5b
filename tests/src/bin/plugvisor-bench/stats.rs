//! The summary statistics every measure reports in.

/// Nearest-rank percentile of sorted `v`.
fn pct(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let rank = (q * v.len() as f64).ceil().max(1.0) as usize;
    v[rank.min(v.len()) - 1]
}

/// p50, p99, max and mean of a sample.
#[derive(Debug, Clone, Copy, Default)]
pub struct Dist {
    /// Finite values in the sample.
    pub n: usize,
    /// Median.
    pub p50: f64,
    /// 99th percentile (nearest rank, so the max below 100 values).
    pub p99: f64,
    /// Largest value.
    pub max: f64,
    /// Mean.
    pub mean: f64,
}

impl Dist {
    /// The distribution of the finite values of `values`. Percentiles and
    /// max of an empty sample are NaN, so a measure that found nothing does
    /// not read as 0.
    pub fn of(values: &[f64]) -> Dist {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        v.sort_by(f64::total_cmp);
        Dist {
            n: v.len(),
            p50: pct(&v, 0.5),
            p99: pct(&v, 0.99),
            max: v.last().copied().unwrap_or(f64::NAN),
            mean: v.iter().sum::<f64>() / v.len().max(1) as f64,
        }
    }
}
