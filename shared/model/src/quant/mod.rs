//! Frozen low-precision weights: int8 (symmetric, one scale per output channel) and f16, and the products that
//! compute through them without keeping a full-precision copy.

mod ops;
mod route;
mod wgsl;

use burn::backend::Dispatch;
use burn::tensor::{DType, Device, Int, Tensor, TensorCreationOptions, TensorData};
use serde::{Deserialize, Serialize};

use ops::FrozenOps;
pub use route::Route;

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

/// An int8 matrix in PyTorch's `[out, in]` layout with one scale per output row: `W[o][i] ≈ q[o][i] · scale[o]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Int8Matrix {
    /// Codes in `[-127, 127]`, `out × inp`, row-major.
    pub q: Vec<i8>,
    /// One per output row.
    pub scale: Vec<f32>,
    /// Output width (rows).
    pub out: usize,
    /// Input width (columns).
    pub inp: usize,
}

/// Quantizes `w` (`[out, inp]` row-major): `scale[o] = max_i |w[o][i]| / 127` (rounded to f16 first when the scales
/// are stored in f16, so codes and scales agree), codes rounded to nearest. An all-zero row gets scale 0.
pub fn quantize_int8(w: &[f32], out: usize, inp: usize, scale_dtype: ScaleDType) -> Int8Matrix {
    debug_assert_eq!(w.len(), out * inp);
    let mut q = Vec::with_capacity(w.len());
    let mut scale = Vec::with_capacity(out);
    for row in w.chunks_exact(inp) {
        let amax = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let s = match scale_dtype {
            ScaleDType::F32 => amax / 127.0,
            ScaleDType::F16 => half::f16::from_f32(amax / 127.0).to_f32(),
        };
        let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
        q.extend(row.iter().map(|&v| (v * inv).round().clamp(-127.0, 127.0) as i8));
        scale.push(s);
    }
    Int8Matrix { q, scale, out, inp }
}

impl Int8Matrix {
    /// The dequantized matrix, `[out, inp]` (for references and export).
    pub fn dequantize(&self) -> Vec<f32> {
        self.q
            .chunks_exact(self.inp)
            .zip(&self.scale)
            .flat_map(|(row, &s)| row.iter().map(move |&c| c as f32 * s))
            .collect()
    }

    /// The codes and the scales `[out]` on `device`: on the CPU the codes are i8 transposed to the runtime's
    /// `[in, out]`; on wgpu (WGSL has no 8-bit integers) they stay `[out, in]` with four inputs per i32 word, still
    /// one byte per code, as our WGSL kernels read them.
    pub fn to_tensors(&self, device: &Device) -> (Tensor<2, Int>, Tensor<1>) {
        let mut t = vec![0i8; self.q.len()];
        for (o, row) in self.q.chunks_exact(self.inp).enumerate() {
            for (i, &c) in row.iter().enumerate() {
                t[i * self.out + o] = c;
            }
        }
        let options = |dtype| TensorCreationOptions::new(device.clone()).with_dtype(dtype);
        let q = if !packed_codes(device) {
            Tensor::<2, Int>::from_data(TensorData::new(t, [self.inp, self.out]), options(DType::I8))
        } else {
            let words = self.inp.div_ceil(4);
            let mut packed = Vec::with_capacity(self.out * words);
            for row in self.q.chunks_exact(self.inp) {
                for c in row.chunks(4) {
                    let mut b = [0u8; 4];
                    for (d, &s) in b.iter_mut().zip(c) {
                        *d = s as u8;
                    }
                    packed.push(i32::from_le_bytes(b));
                }
            }
            Tensor::<2, Int>::from_data(TensorData::new(packed, [self.out, words]), options(DType::I32))
        };
        let scale = Tensor::<1>::from_data(TensorData::new(self.scale.clone(), [self.out]), device);
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

/// The int8 weight as f32 `[in, out]` (`q ⊙ scale`), whatever the device's code storage (for export and merging).
pub fn int8_dequantize(q: Tensor<2, Int>, scale: Tensor<1>, inp: usize) -> Tensor<2> {
    let out = scale.dims()[0];
    let codes: Tensor<2> =
        Tensor::from_dispatch(<Dispatch as FrozenOps>::int8_codes(q.into_dispatch(), inp, out, false));
    codes.mul(scale.unsqueeze::<2>())
}

/// Output channels `ids` of the int8 weight in f32, `[n, in]` (`(q ⊙ scale)ᵀ[ids]`): an embedding lookup through a
/// quantized table; only the selected codes are widened.
pub(crate) fn int8_channels(q: Tensor<2, Int>, scale: Tensor<1>, inp: usize, ids: Tensor<1, Int>) -> Tensor<2> {
    let n = ids.dims()[0];
    // The channel is a column of the CPU's `[in, out]` codes, a row of wgpu's `[out, words]`.
    let dim = if packed_codes(&q.device()) { 0 } else { 1 };
    let codes: Tensor<2> = Tensor::from_dispatch(<Dispatch as FrozenOps>::int8_codes(
        q.select(dim, ids.clone()).into_dispatch(),
        inp,
        n,
        true,
    ));
    codes.mul(scale.select(0, ids).unsqueeze_dim(1))
}

/// Whether int8 codes live on `device` as packed i32 words (wgpu) rather than i8 (the CPU).
fn packed_codes(device: &Device) -> bool {
    device.as_dispatch().identity().is_some()
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

/// The largest buffer, in bytes, that `device` can allocate and bind (wgpu); `None` on the CPU, which has no such
/// limit. A dense f32 weight larger than this cannot be used there at all; our kernels never need one.
pub fn max_buffer_bytes(device: &Device) -> Option<u64> {
    route::max_buffer_bytes(Tensor::<1>::zeros([1], device).into_dispatch())
}

/// [`int8_matmul`] by a chosen route (`None`: the tuned one the model takes), without autodiff: for benchmarks and
/// diagnostics. Only wgpu has routes; elsewhere (or for tensors under autodiff) this is [`int8_matmul`].
pub fn int8_matmul_by(route: Option<Route>, x: Tensor<2>, q: Tensor<2, Int>, scale: Tensor<1>) -> Tensor<2> {
    let n = scale.dims()[0];
    let parts = (
        route::wgpu_tensor(x.clone().into_dispatch()),
        route::wgpu_tensor(q.clone().into_dispatch()),
    );
    match (route, parts, route::wgpu_tensor(scale.clone().into_dispatch())) {
        (Some(route), (Some(a), Some(q)), Some(scale)) if a.dtype == DType::F32 => {
            let problem = route::Problem {
                a,
                weight: route::Weight::Int8 { q, scale },
                transposed: false,
                n,
            };
            Tensor::from_dispatch(route::from_wgpu(problem.run(route)))
        }
        _ => int8_matmul(x, q, scale),
    }
}

/// [`f16_matmul`] by a chosen route, as [`int8_matmul_by`].
pub fn f16_matmul_by(route: Option<Route>, x: Tensor<2>, w: Tensor<2>) -> Tensor<2> {
    let n = w.dims()[1];
    match (
        route,
        route::wgpu_tensor(x.clone().into_dispatch()),
        route::wgpu_tensor(w.clone().into_dispatch()),
    ) {
        (Some(route), Some(a), Some(w)) if a.dtype == DType::F32 && wgsl::f16_readable(&w) => {
            let problem = route::Problem {
                a,
                weight: route::Weight::F16(w),
                transposed: false,
                n,
            };
            Tensor::from_dispatch(route::from_wgpu(problem.run(route)))
        }
        _ => f16_matmul(x, w),
    }
}

#[cfg(test)]
mod tests;
