//! ggml tensor types and their dequantization to f32 (block layouts as in ggml's `ggml-quants.c`).

use half::f16;

/// A ggml storage type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    /// A type id this reader does not know.
    Other(u32),
}

impl GgmlType {
    pub(crate) fn from_id(id: u32) -> Self {
        match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            6 => Self::Q5_0,
            7 => Self::Q5_1,
            8 => Self::Q8_0,
            10 => Self::Q2K,
            11 => Self::Q3K,
            12 => Self::Q4K,
            13 => Self::Q5K,
            14 => Self::Q6K,
            30 => Self::BF16,
            other => Self::Other(other),
        }
    }

    pub(crate) fn name(&self) -> String {
        match self {
            Self::F32 => "F32".into(),
            Self::F16 => "F16".into(),
            Self::BF16 => "BF16".into(),
            Self::Q4_0 => "Q4_0".into(),
            Self::Q4_1 => "Q4_1".into(),
            Self::Q5_0 => "Q5_0".into(),
            Self::Q5_1 => "Q5_1".into(),
            Self::Q8_0 => "Q8_0".into(),
            Self::Q2K => "Q2_K".into(),
            Self::Q3K => "Q3_K".into(),
            Self::Q4K => "Q4_K".into(),
            Self::Q5K => "Q5_K".into(),
            Self::Q6K => "Q6_K".into(),
            Self::Other(id) => format!("ggml type {id}"),
        }
    }

    /// `(values per block, bytes per block)`; `None` for unknown types.
    fn block(&self) -> Option<(usize, usize)> {
        Some(match self {
            Self::F32 => (1, 4),
            Self::F16 | Self::BF16 => (1, 2),
            Self::Q4_0 => (32, 18),
            Self::Q4_1 => (32, 20),
            Self::Q5_0 => (32, 22),
            Self::Q5_1 => (32, 24),
            Self::Q8_0 => (32, 34),
            Self::Q2K => (256, 84),
            Self::Q3K => (256, 110),
            Self::Q4K => (256, 144),
            Self::Q5K => (256, 176),
            Self::Q6K => (256, 210),
            Self::Other(_) => return None,
        })
    }

    /// Whether [`dequantize`] decodes this type.
    pub(crate) fn is_supported(&self) -> bool {
        !matches!(self, Self::Q2K | Self::Q3K | Self::Other(_))
    }

    /// Bytes a tensor of `numel` values with rows of `row` values occupies.
    pub(crate) fn byte_len(&self, row: usize, numel: usize) -> Result<usize, String> {
        let (values, bytes) = self.block().ok_or_else(|| format!("unknown {}", self.name()))?;
        if !row.is_multiple_of(values) {
            return Err(format!(
                "rows of {row} values are not a multiple of the {} block of {values}",
                self.name()
            ));
        }
        (numel / values)
            .checked_mul(bytes)
            .ok_or_else(|| "size overflows".into())
    }
}

fn half(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Decodes `numel` values; `bytes` must be exactly the tensor's bytes.
pub(crate) fn dequantize(ty: GgmlType, bytes: &[u8], numel: usize) -> Result<Vec<f32>, String> {
    let (values, block_bytes) = ty.block().ok_or_else(|| format!("unknown {}", ty.name()))?;
    if !numel.is_multiple_of(values) || bytes.len() != numel / values * block_bytes {
        return Err(format!(
            "{} bytes do not hold {numel} {} values",
            bytes.len(),
            ty.name()
        ));
    }
    let mut out = Vec::with_capacity(numel);
    let blocks = bytes.chunks_exact(block_bytes);
    match ty {
        GgmlType::F32 => out.extend(super::super::reader::f32s(bytes)),
        GgmlType::F16 => out.extend(super::super::reader::f16s(bytes)),
        GgmlType::BF16 => out.extend(super::super::reader::bf16s(bytes)),
        GgmlType::Q8_0 => blocks.for_each(|b| {
            let d = half(b, 0);
            out.extend(b[2..34].iter().map(|&q| q as i8 as f32 * d));
        }),
        GgmlType::Q4_0 => blocks.for_each(|b| {
            let d = half(b, 0);
            let qs = &b[2..18];
            out.extend(qs.iter().map(|&q| ((q & 0xf) as i32 - 8) as f32 * d));
            out.extend(qs.iter().map(|&q| ((q >> 4) as i32 - 8) as f32 * d));
        }),
        GgmlType::Q4_1 => blocks.for_each(|b| {
            let (d, m) = (half(b, 0), half(b, 2));
            let qs = &b[4..20];
            out.extend(qs.iter().map(|&q| (q & 0xf) as f32 * d + m));
            out.extend(qs.iter().map(|&q| (q >> 4) as f32 * d + m));
        }),
        GgmlType::Q5_0 | GgmlType::Q5_1 => blocks.for_each(|b| {
            let (d, m, rest) = if ty == GgmlType::Q5_0 {
                (half(b, 0), None, &b[2..])
            } else {
                (half(b, 0), Some(half(b, 2)), &b[4..])
            };
            let qh = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
            let qs = &rest[4..20];
            let value = |q: u32| match m {
                None => (q as i32 - 16) as f32 * d,
                Some(m) => q as f32 * d + m,
            };
            out.extend((0..16).map(|j| value((qs[j] & 0xf) as u32 | ((qh >> j) & 1) << 4)));
            out.extend((0..16).map(|j| value((qs[j] >> 4) as u32 | ((qh >> (j + 16)) & 1) << 4)));
        }),
        GgmlType::Q4K | GgmlType::Q5K => blocks.for_each(|b| {
            let (d, dmin) = (half(b, 0), half(b, 2));
            let scales = &b[4..16];
            let (qh, qs) = if ty == GgmlType::Q5K {
                (Some(&b[16..48]), &b[48..176])
            } else {
                (None, &b[16..144])
            };
            for (chunk, q) in qs.chunks_exact(32).enumerate() {
                let (sc1, m1) = scale_min_k4(2 * chunk, scales);
                let (sc2, m2) = scale_min_k4(2 * chunk + 1, scales);
                let (d1, d2, m1, m2) = (d * sc1 as f32, d * sc2 as f32, dmin * m1 as f32, dmin * m2 as f32);
                let high = |l: usize, bit: usize| qh.map_or(0.0, |h| if h[l] & (1 << bit) != 0 { 16.0 } else { 0.0 });
                out.extend((0..32).map(|l| d1 * ((q[l] & 0xf) as f32 + high(l, 2 * chunk)) - m1));
                out.extend((0..32).map(|l| d2 * ((q[l] >> 4) as f32 + high(l, 2 * chunk + 1)) - m2));
            }
        }),
        GgmlType::Q6K => blocks.for_each(|b| {
            let (ql, qh, sc, d) = (&b[0..128], &b[128..192], &b[192..208], half(b, 208));
            for half_block in 0..2 {
                let (ql, qh, sc) = (&ql[64 * half_block..], &qh[32 * half_block..], &sc[8 * half_block..]);
                let mut y = [0.0f32; 128];
                for l in 0..32 {
                    let is = l / 16;
                    let q1 = ((ql[l] & 0xf) | ((qh[l] & 3) << 4)) as i32 - 32;
                    let q2 = ((ql[l + 32] & 0xf) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                    let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                    let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                    y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
                    y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
                    y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
                    y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
                }
                out.extend_from_slice(&y);
            }
        }),
        GgmlType::Q2K | GgmlType::Q3K | GgmlType::Other(_) => {
            return Err(format!("{} tensors are not supported", ty.name()))
        }
    }
    Ok(out)
}

/// 6-bit scale and min `j` of a Q4_K/Q5_K block's packed 12-byte scale array.
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xf) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}
