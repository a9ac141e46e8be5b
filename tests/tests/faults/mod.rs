//! The matrix's rows, one file per theme. The matrix applies them in the
//! order of [`THEMES`], each file's rows as written — the order of the one
//! table they once were — so a row that counts on what ran before it (it
//! says so; the runtime rows come after the thresholds rows, for one)
//! still finds it.
mod dependencies;
mod host;
mod identity;
mod libraries;
mod manifests;
mod runtime;
mod signatures;
mod thresholds;

use crate::Row;

/// The themes, in the order the matrix applies them.
const THEMES: &[&[Row]] = &[
    libraries::ROWS,
    signatures::ROWS,
    identity::ROWS,
    dependencies::ROWS,
    manifests::ROWS,
    thresholds::ROWS,
    runtime::ROWS,
    host::ROWS,
];

/// Every row, in the order the matrix applies them.
pub(super) fn all() -> impl Iterator<Item = &'static Row> {
    THEMES.iter().flat_map(|rows| rows.iter())
}
