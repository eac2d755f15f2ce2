//! How a product through a frozen int8 or f16 weight runs on wgpu. Two routes compute it:
//! - **kernel**: our WGSL kernels read the packed weight directly (`wgsl.rs`; GEMV for a few rows, tiled otherwise);
//! - **dense**: the weight is widened into transient f32 slabs of at most 64 MiB (our one-pass int8 kernel, or a
//!   cast for f16) that burn's own autotuned matmul consumes one by one; each slab is dropped after its product, so
//!   no widened weight stays resident and the transient copy is bounded whatever the model's size (a 7B-class
//!   4096×11008 matrix, 180 MB in f32, is over wgpu's common 128 MiB binding limit and goes in three slabs).
//!
//! Which is faster depends on the device and the shape (on a software Vulkan device burn's matmul beats our tiled
//! kernel; on decode shapes our GEMV reads a quarter of the bytes), so, as burn does for its own matmul, CubeCL's
//! autotuner measures both routes once per device and shape class (rows rounded up to a power of two) and reuses
//! the winner. The dense route is burn's dequantize-then-matmul path with a cheaper widening, so the tuned product
//! is never slower than that path.
//!
//! Every route computes in f32; inputs in another precision are cast around it.

use burn::backend::ops::{FloatTensorOps, IntTensorOps};
use burn::backend::{BackendTensor, Cube, DispatchTensor, DispatchTensorKind};
use burn::tensor::{DType, FloatDType, Shape, Slice};
use burn_cubecl::cubecl::tune::{local_tuner, LocalTuner, Tunable, TunableSet};
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeTuneId;

use super::wgsl;

/// A frozen weight as the kernels store it.
// A handful exist per product, moved by value; boxing the larger variant would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub(crate) enum Weight {
    /// int8 codes packed four to an i32 word along each stored row, `[rows, ⌈cols/4⌉]`, one f32 scale per row.
    Int8 { q: CubeTensor, scale: CubeTensor },
    /// f16, `[rows, cols]`, fully packed into u32 words (see [`wgsl::f16_readable`]).
    F16(CubeTensor),
}

/// How a product through a frozen weight is computed on wgpu (see [`crate::quant::int8_matmul_by`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Our kernels read the packed weight.
    Kernel,
    /// A transient f32 copy of the weight, then burn's matmul.
    Dense,
}

/// One product of `a` (`[m, k]`, f32) and a frozen weight `W` (its scales applied), giving `[m, n]` f32: the
/// forward `a · Wᵀ` for int8 (`W` stored `[n, k]`) and `a · W` for f16 (`[k, n]`); with `transposed`, the input
/// gradient of that forward (int8 `a · W`, W `[k, n]`; f16 `a · Wᵀ`, W `[n, k]`).
#[derive(Debug, Clone)]
pub(crate) struct Problem {
    pub(crate) a: CubeTensor,
    pub(crate) weight: Weight,
    pub(crate) transposed: bool,
    pub(crate) n: usize,
}

impl Problem {
    /// The autotune key: the product and its shape, rows rounded up to a power of two.
    fn key(&self) -> String {
        let (m, k) = (self.a.meta.shape()[0], self.a.meta.shape()[1]);
        let storage = match self.weight {
            Weight::Int8 { .. } => "int8",
            Weight::F16(_) => "f16",
        };
        let direction = if self.transposed { "input-gradient" } else { "forward" };
        format!("{storage} {direction} m{} k{k} n{}", m.next_power_of_two(), self.n)
    }

    /// The product by `route`.
    pub(crate) fn run(self, route: Route) -> CubeTensor {
        let budget = (self.a.client.properties().memory.max_page_size as usize).min(SLAB_BYTES);
        self.run_in_slabs(route, budget)
    }

    /// The product by `route`, the dense route widening at most `budget` bytes of the weight at a time.
    fn run_in_slabs(self, route: Route, budget: usize) -> CubeTensor {
        let Problem {
            a,
            weight,
            transposed,
            n,
        } = self;
        let k = a.meta.shape()[1];
        match (route, weight, transposed) {
            (Route::Kernel, Weight::Int8 { q, scale }, false) => wgsl::int8_product(a, q, scale),
            (Route::Kernel, Weight::Int8 { q, scale }, true) => {
                let a = Cube::float_mul(a, Cube::float_reshape(scale.clone(), Shape::new([1, k])));
                wgsl::int8_product_t(a, q, scale, n)
            }
            (Route::Kernel, Weight::F16(w), false) => wgsl::f16_product(a, w),
            (Route::Kernel, Weight::F16(w), true) => wgsl::f16_product_t(a, w),
            (Route::Dense, weight, transposed) => dense(a, weight, transposed, n, budget),
        }
    }
}

/// The dense route: the weight widened slab by slab (stored rows, at most `budget` bytes of f32 each), every slab
/// multiplied by burn's matmul as soon as it exists. Where the stored rows are output columns (int8 forward, f16
/// input gradient) the slabs' products are output blocks, concatenated; otherwise (the rows run along the
/// reduction) they are partial sums, added.
fn dense(a: CubeTensor, weight: Weight, transposed: bool, n: usize, budget: usize) -> CubeTensor {
    let (m, k) = (a.meta.shape()[0], a.meta.shape()[1]);
    let rows_are_outputs = matches!(
        (&weight, transposed),
        (Weight::Int8 { .. }, false) | (Weight::F16(_), true)
    );
    let (rows, cols) = if rows_are_outputs { (n, k) } else { (k, n) };
    let per_slab = (budget / (cols * std::mem::size_of::<f32>()).max(1)).max(1);
    let mut parts = Vec::with_capacity(rows.div_ceil(per_slab));
    for start in (0..rows).step_by(per_slab) {
        let span = start..(start + per_slab).min(rows);
        let slab = match &weight {
            Weight::Int8 { q, scale } => {
                let words = q.meta.shape()[1];
                let q = Cube::int_slice(q.clone(), &[Slice::from(span.clone()), Slice::from(0..words)]);
                let scale = Cube::float_slice(scale.clone(), &[Slice::from(span.clone())]);
                wgsl::int8_widen(q, scale, cols)
            }
            Weight::F16(w) => cast(
                Cube::float_slice(w.clone(), &[Slice::from(span.clone()), Slice::from(0..cols)]),
                DType::F32,
            ),
        };
        parts.push(if rows_are_outputs {
            Cube::float_matmul(a.clone(), Cube::float_transpose(slab))
        } else {
            let a = Cube::float_slice(a.clone(), &[Slice::from(0..m), Slice::from(span)]);
            Cube::float_matmul(a, slab)
        });
    }
    match (rows_are_outputs, parts.len()) {
        (_, 1) => parts.remove(0),
        (true, _) => Cube::float_cat(parts, 1),
        (false, _) => parts.into_iter().reduce(Cube::float_add).unwrap_or_else(|| {
            // An empty reduction (k = 0): the product is zero.
            Cube::float_zeros(Shape::new([m, n]), &a.device, FloatDType::F32)
        }),
    }
}

/// The most bytes of widened weight the dense route holds at once (less where the device's largest buffer is
/// smaller): a 7B-class 4096×11008 matrix, 180 MB in f32, is widened and multiplied in three slabs.
const SLAB_BYTES: usize = 64 << 20;

/// The tuner that picks a [`Route`] per device and [`Problem::key`].
static TUNER: LocalTuner<String, CubeTuneId> = local_tuner!();

/// The product by the route measured fastest for this device and shape class (measuring both the first time).
fn tuned(problem: Problem) -> CubeTensor {
    let client = problem.a.client.clone();
    let id = CubeTuneId::new(&client, &problem.a.device);
    let set = TUNER.init(&id, || {
        // Names are the cache's identity for a result: spelled out, not derived from the variants.
        TunableSet::<String, Problem, CubeTensor>::new_cloning_inputs(|p: &Problem| p.key())
            .with(Tunable::new("kernel", |p: Problem| {
                Ok::<_, String>(p.run(Route::Kernel))
            }))
            .with(Tunable::new("dense", |p: Problem| Ok::<_, String>(p.run(Route::Dense))))
    });
    TUNER.execute(&id, &client, set, problem)
}

/// `t` in `dtype`.
fn cast(t: CubeTensor, dtype: DType) -> CubeTensor {
    Cube::float_cast(t, FloatDType::from(dtype))
}

/// `problem`'s product in f32 by the tuned route, cast back to `dtype`.
fn product(mut problem: Problem, dtype: DType) -> CubeTensor {
    problem.a = cast(problem.a, DType::F32);
    cast(tuned(problem), dtype)
}

/// `x · (q ⊙ scale)ᵀ` with `q` packed `[out, ⌈in/4⌉]`.
///
/// # Shapes
/// - `x`: `[m, in]` → `[m, out]`
pub(crate) fn int8_matmul(x: CubeTensor, q: CubeTensor, scale: CubeTensor) -> CubeTensor {
    let (dtype, n) = (x.dtype, scale.meta.shape()[0]);
    product(
        Problem {
            a: x,
            weight: Weight::Int8 { q, scale },
            transposed: false,
            n,
        },
        dtype,
    )
}

/// `dy · (q ⊙ scale)` with `q` packed `[out, ⌈in/4⌉]`: the input gradient of [`int8_matmul`].
///
/// # Shapes
/// - `dy`: `[m, out]` → `[m, inp]`
pub(crate) fn int8_matmul_t(dy: CubeTensor, q: CubeTensor, scale: CubeTensor, inp: usize) -> CubeTensor {
    let dtype = dy.dtype;
    product(
        Problem {
            a: dy,
            weight: Weight::Int8 { q, scale },
            transposed: true,
            n: inp,
        },
        dtype,
    )
}

/// `x · w` with `w` f16 `[in, out]` (see [`wgsl::f16_readable`]).
///
/// # Shapes
/// - `x`: `[m, in]` → `[m, out]`
pub(crate) fn f16_matmul(x: CubeTensor, w: CubeTensor) -> CubeTensor {
    let (dtype, n) = (x.dtype, w.meta.shape()[1]);
    product(
        Problem {
            a: x,
            weight: Weight::F16(w),
            transposed: false,
            n,
        },
        dtype,
    )
}

/// `dy · wᵀ` with `w` f16 `[in, out]`: the input gradient of [`f16_matmul`].
///
/// # Shapes
/// - `dy`: `[m, out]` → `[m, in]`
pub(crate) fn f16_matmul_t(dy: CubeTensor, w: CubeTensor) -> CubeTensor {
    let (dtype, n) = (dy.dtype, w.meta.shape()[0]);
    product(
        Problem {
            a: dy,
            weight: Weight::F16(w),
            transposed: true,
            n,
        },
        dtype,
    )
}

/// The largest buffer, in bytes, that the wgpu device of `t` binds; `None` off wgpu.
pub(crate) fn max_buffer_bytes(t: DispatchTensor) -> Option<u64> {
    wgpu_tensor(t).map(|c| c.client.properties().memory.max_page_size)
}

/// The wgpu tensor inside `t` (float or int, not under autodiff), if it is one.
pub(crate) fn wgpu_tensor(t: DispatchTensor) -> Option<CubeTensor> {
    match t.kind {
        DispatchTensorKind::Cube(BackendTensor::Float(c) | BackendTensor::Int(c)) => Some(c),
        _ => None,
    }
}

/// A wgpu float tensor as a dispatch tensor.
pub(crate) fn from_wgpu(c: CubeTensor) -> DispatchTensor {
    DispatchTensor {
        kind: DispatchTensorKind::Cube(BackendTensor::Float(c)),
        autodiff: Default::default(),
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::DispatchTensor;
    use burn::tensor::{Distribution, FloatDType, Tensor, TensorData};

    use super::*;
    use crate::quant::{quantize_int8, ScaleDType};

    fn cube(t: DispatchTensor) -> CubeTensor {
        wgpu_tensor(t).expect("a wgpu tensor")
    }

    fn tensor(c: CubeTensor) -> Tensor<2> {
        Tensor::from_dispatch(from_wgpu(c))
    }

    fn max_rel(got: Tensor<2>, want: Tensor<2>) -> f32 {
        assert_eq!(got.dims(), want.dims());
        ((got - want.clone()).abs() / want.abs().clamp_min(1.0))
            .max()
            .into_scalar::<f32>()
    }

    fn random(rows: usize, cols: usize) -> Vec<f32> {
        crate::testing::uniform(rows * cols, (rows * 1000 + cols) as u64)
    }

    /// Both routes of all four products against a dense f32 matmul on the CPU-emulated GPU: GEMV and tiled shapes,
    /// widths off every tile and word, a long reduction, more rows than one tile.
    #[test]
    fn every_route_of_every_product_matches_a_dense_reference() {
        let Some(device) = crate::device::gpu_for_tests("every_route_of_every_product_matches_a_dense_reference")
        else {
            return;
        };
        for (m, k, n) in [(5, 37, 18), (1, 64, 48), (3, 4096, 12), (17, 4099, 10), (70, 33, 66)] {
            let a = Tensor::<2>::random([m, k], Distribution::Normal(0.0, 1.0), &device);
            let tol = 1e-5 * (k as f32 / 64.0).max(1.0);
            for transposed in [false, true] {
                // int8 is stored [out, in]: the forward reads W [n, k], its input gradient W [k, n].
                let (rows, cols) = if transposed { (k, n) } else { (n, k) };
                let q8 = quantize_int8(&random(rows, cols), rows, cols, ScaleDType::F32);
                let dense = Tensor::<2>::from_data(TensorData::new(q8.dequantize(), [rows, cols]), &device);
                let want = a.clone().matmul(if transposed { dense } else { dense.transpose() });
                let (q, scale) = q8.to_tensors(&device);
                // f16 is stored [in, out]: the forward reads W [k, n], its input gradient W [n, k].
                let (rows, cols) = (cols, rows);
                let half = Tensor::<2>::from_data(TensorData::new(random(rows, cols), [rows, cols]), &device)
                    .cast(FloatDType::F16);
                let wide = half.clone().cast(FloatDType::F32);
                let want_f16 = a.clone().matmul(if transposed { wide.transpose() } else { wide });
                // The dense route whole, and in slabs of 3 stored rows (a budget that splits every weight here).
                for (route, budget) in [
                    (Route::Kernel, None),
                    (Route::Dense, None),
                    (Route::Dense, Some(3 * 4 * k.max(n))),
                ] {
                    let int8 = Weight::Int8 {
                        q: cube(q.clone().into_dispatch()),
                        scale: cube(scale.clone().into_dispatch()),
                    };
                    let f16 = Weight::F16(cube(half.clone().into_dispatch()));
                    for (weight, want) in [(int8, &want), (f16, &want_f16)] {
                        let what = format!("{weight:?}").split(' ').next().unwrap_or_default().to_string();
                        let problem = Problem {
                            a: cube(a.clone().into_dispatch()),
                            weight,
                            transposed,
                            n,
                        };
                        let got = match budget {
                            Some(budget) => problem.run_in_slabs(route, budget),
                            None => problem.run(route),
                        };
                        let err = max_rel(tensor(got), want.clone());
                        assert!(
                            err < tol,
                            "{what} {route:?} {budget:?} transposed={transposed} ({m}, {k}, {n}): {err}"
                        );
                    }
                }
            }
        }
    }

    /// A weight whose widened f32 copy is over the device's buffer limit (lavapipe: 128 MiB) multiplies by either
    /// route (the dense one in slabs) and the tuned product, all matching a host reference.
    #[test]
    fn a_weight_too_large_to_widen_at_once_multiplies_by_every_route() {
        let Some(device) =
            crate::device::gpu_for_tests("a_weight_too_large_to_widen_at_once_multiplies_by_every_route")
        else {
            return;
        };
        let limit = crate::quant::max_buffer_bytes(&device).expect("a wgpu device has a buffer limit");
        if limit > 1 << 30 {
            eprintln!("skipped: this device binds buffers of {limit} bytes; the test needs one of at most 1 GiB");
            return;
        }
        let (m, k) = (2, 4096);
        let n = limit as usize / (4 * k) + 1;
        let w = random(n, k);
        let q8 = quantize_int8(&w, n, k, ScaleDType::F32);
        drop(w);
        let x: Vec<f32> = (0..m * k).map(|i| ((i % 13) as f32 - 6.0) / 7.0).collect();
        let dense = q8.dequantize();
        let want: Vec<f32> = (0..m)
            .flat_map(|r| {
                let (x, dense) = (&x, &dense);
                (0..n).map(move |o| {
                    let row = &dense[o * k..(o + 1) * k];
                    row.iter()
                        .zip(&x[r * k..(r + 1) * k])
                        .map(|(&w, &x)| (w as f64) * (x as f64))
                        .sum::<f64>() as f32
                })
            })
            .collect();
        let (q, scale) = q8.to_tensors(&device);
        let xt = Tensor::<2>::from_data(TensorData::new(x, [m, k]), &device);
        let weight = || Weight::Int8 {
            q: cube(q.clone().into_dispatch()),
            scale: cube(scale.clone().into_dispatch()),
        };
        let by_route = |route| {
            Problem {
                a: cube(xt.clone().into_dispatch()),
                weight: weight(),
                transposed: false,
                n,
            }
            .run(route)
        };
        let outputs = [
            ("kernel route", tensor(by_route(Route::Kernel))),
            ("dense route", tensor(by_route(Route::Dense))),
            ("tuned", crate::quant::int8_matmul(xt.clone(), q.clone(), scale.clone())),
        ];
        for (what, got) in outputs {
            let err = crate::testing::max_rel(&got.into_data().try_into_vec::<f32>().unwrap(), &want);
            assert!(err < 1e-3, "{what}: max relative error {err} over {n}×{k}");
        }
    }
}
