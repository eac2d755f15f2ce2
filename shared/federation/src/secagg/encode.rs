//! Fixed-point encoding of weighted updates in Z_{2³²}, where masks add and cancel. Each client clips every
//! coordinate of `weight · delta` to ±clip and encodes `round(x · scale)` in two's complement; with
//! `scale = (2³¹ − 1 − n) / (n · clip)` the sum over n clients cannot wrap, so the masked sum decodes exactly to the
//! sum of the encoded values. Rounding costs at most 1/(2·scale) per client and coordinate.

/// The largest scale with which `participants` encoded values of magnitude at most `clip` sum without wrapping.
pub(crate) fn scale_for(participants: u32, clip: f32) -> f64 {
    let n = f64::from(participants);
    (f64::from(i32::MAX) - n) / (n * f64::from(clip))
}

/// The bound on the decoded sum's error per coordinate that rounding allows: half a step per contributing client.
pub(crate) fn sum_error_bound(contributors: usize, scale: f64) -> f64 {
    contributors as f64 * 0.5 / scale
}

/// Encodes `weight · x`, clipped to ±clip; returns the encoded vector and how many coordinates were clipped.
pub(crate) fn encode(x: &[f32], weight: f64, clip: f32, scale: f64) -> (Vec<u32>, usize) {
    let clip = f64::from(clip);
    let mut clipped = 0;
    let out = x
        .iter()
        .map(|&v| {
            let w = weight * f64::from(v);
            if w.abs() > clip {
                clipped += 1;
            }
            (w.clamp(-clip, clip) * scale).round() as i64 as i32 as u32
        })
        .collect();
    (out, clipped)
}

/// Decodes a sum of encoded vectors.
pub(crate) fn decode(sum: &[u32], scale: f64) -> Vec<f64> {
    sum.iter().map(|&s| f64::from(s as i32) / scale).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_of_extremes_do_not_wrap_and_rounding_stays_in_bound() {
        let (n, clip) = (1000u32, 2.5f32);
        let scale = scale_for(n, clip);
        for extreme in [clip, -clip] {
            let (one, _) = encode(&[extreme * 10.0], 1.0, clip, scale);
            let sum = (0..n).fold(0u32, |acc, _| acc.wrapping_add(one[0]));
            let got = decode(&[sum], scale)[0];
            let want = f64::from(n) * f64::from(extreme);
            assert!(
                (got - want).abs() <= sum_error_bound(n as usize, scale),
                "{got} vs {want}"
            );
        }
        let xs = [0.123_456_7f32, -0.000_31, 1e-7, 0.0];
        let (enc, clipped) = encode(&xs, 0.5, clip, scale);
        assert_eq!(clipped, 0);
        for (d, x) in decode(&enc, scale).iter().zip(xs) {
            assert!((d - 0.5 * f64::from(x)).abs() <= sum_error_bound(1, scale));
        }
        assert_eq!(encode(&[3.0, -4.0, 1.0], 1.0, clip, scale).1, 2);
    }
}
