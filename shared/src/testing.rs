//! Helpers shared by the unit tests.

/// The largest `|a − b| / max(|b|, 1)` over paired elements: relative error, absolute near zero.
pub(crate) fn max_rel(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "compared slices differ in length");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / y.abs().max(1.0))
        .fold(0.0, f32::max)
}
