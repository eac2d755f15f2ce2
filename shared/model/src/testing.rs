//! Helpers shared by the unit tests.

/// The largest `|a − b| / max(|b|, 1)` over paired elements: relative error, absolute near zero.
pub(crate) fn max_rel(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "compared slices differ in length");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / y.abs().max(1.0))
        .fold(0.0, f32::max)
}

/// `len` values uniform in [-1, 1) from a small LCG seeded with `seed`: independent of any RNG crate's stream and of
/// burn's global RNG (which parallel tests share).
pub(crate) fn uniform(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..len)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}
