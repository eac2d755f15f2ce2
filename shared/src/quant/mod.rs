//! Frozen low-precision weights: int8 (symmetric, one scale per output channel) and f16, and the products that
//! compute through them without keeping a full-precision copy.

mod ops;

use burn::backend::Dispatch;
use burn::tensor::{DType, Device, Int, Tensor, TensorCreationOptions, TensorData};
use serde::{Deserialize, Serialize};

use ops::FrozenOps;

/// How a frozen matrix is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuantFormat {
    /// Full precision (not quantized).
    F32,
    /// IEEE half precision.
    F16,
    /// Symmetric int8 with one scale per output channel.
    Int8,
}

/// Precision of int8 scales as stored in a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ScaleDType {
    /// 32-bit scales.
    #[default]
    F32,
    /// 16-bit scales (rounded before quantizing, so codes and scales agree).
    F16,
}

/// An int8 matrix `[in, out]` (row-major) with one scale per output column: `W[i][j] ≈ q[i][j] · scale[j]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Int8Matrix {
    /// Codes in `[-127, 127]`, `rows × cols`.
    pub q: Vec<i8>,
    /// One per column.
    pub scale: Vec<f32>,
    /// Input width.
    pub rows: usize,
    /// Output width.
    pub cols: usize,
}

/// Quantizes `w` (`[rows, cols]` row-major, columns are output channels): `scale[j] = max_i |w[i][j]| / 127`, codes
/// rounded to nearest. An all-zero column gets scale 0 and zero codes.
pub fn quantize_int8(w: &[f32], rows: usize, cols: usize, scale_dtype: ScaleDType) -> Int8Matrix {
    debug_assert_eq!(w.len(), rows * cols);
    let mut amax = vec![0.0f32; cols];
    for row in w.chunks_exact(cols) {
        for (m, &v) in amax.iter_mut().zip(row) {
            *m = m.max(v.abs());
        }
    }
    let scale: Vec<f32> = amax
        .iter()
        .map(|&m| {
            let s = m / 127.0;
            match scale_dtype {
                ScaleDType::F32 => s,
                ScaleDType::F16 => half::f16::from_f32(s).to_f32(),
            }
        })
        .collect();
    let inv: Vec<f32> = scale
        .iter()
        .map(|&s| if s > 0.0 { 1.0 / s } else { 0.0 })
        .collect();
    let q = w
        .chunks_exact(cols)
        .flat_map(|row| {
            row.iter()
                .zip(&inv)
                .map(|(&v, &i)| (v * i).round().clamp(-127.0, 127.0) as i8)
        })
        .collect();
    Int8Matrix {
        q,
        scale,
        rows,
        cols,
    }
}

impl Int8Matrix {
    /// The dequantized matrix (for references and export).
    pub fn dequantize(&self) -> Vec<f32> {
        self.q
            .chunks_exact(self.cols)
            .flat_map(|row| row.iter().zip(&self.scale).map(|(&c, &s)| c as f32 * s))
            .collect()
    }
}

impl Int8Matrix {
    /// The codes (`[rows, cols]`, kept as i8) and scales (`[cols]`) as tensors on `device`.
    pub fn to_tensors(&self, device: &Device) -> (Tensor<2, Int>, Tensor<1>) {
        let q = Tensor::<2, Int>::from_data(
            TensorData::new(self.q.clone(), [self.rows, self.cols]),
            TensorCreationOptions::new(device.clone()).with_dtype(DType::I8),
        );
        let scale = Tensor::<1>::from_data(TensorData::new(self.scale.clone(), [self.cols]), device);
        (q, scale)
    }
}

/// `x · (q ⊙ scale)` through the int8 weight; differentiable with respect to `x` only.
///
/// # Shapes
/// - `x`: `[m, in]`, `q`: `[in, out]`, `scale`: `[out]` → `[m, out]`
pub fn int8_matmul(x: Tensor<2>, q: Tensor<2, Int>, scale: Tensor<1>) -> Tensor<2> {
    Tensor::from_dispatch(<Dispatch as FrozenOps>::int8_matmul(
        x.into_dispatch(),
        q.into_dispatch(),
        scale.into_dispatch(),
    ))
}

/// `x · w` through an f16 weight; differentiable with respect to `x` only.
///
/// # Shapes
/// - `x`: `[m, in]`, `w`: `[in, out]` → `[m, out]`
pub fn f16_matmul(x: Tensor<2>, w: Tensor<2>) -> Tensor<2> {
    Tensor::from_dispatch(<Dispatch as FrozenOps>::f16_matmul(
        x.into_dispatch(),
        w.into_dispatch(),
    ))
}

#[cfg(test)]
mod tests;
