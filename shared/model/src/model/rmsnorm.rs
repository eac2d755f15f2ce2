//! LLaMA's RMSNorm, `y = x · r · w` with `r = 1 / sqrt(mean(x²) + eps)` per row, as one differentiable op.
//!
//! Autodiff through burn's composite (square, mean, add, sqrt, divide, multiply, and their backward) walks the
//! `[tokens, hidden]` activations about a dozen times per norm, on one thread on the CPU backend, and keeps several
//! of those intermediates for the backward. The CPU body here makes one rayon-parallel pass over the rows forward and
//! one backward (per-chunk partial weight gradients, then their sum) and keeps only `x` and `w`; other backends run
//! the composite default bodies.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::Autodiff;
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{backend_extension, Backend, Cube, Dispatch, Flex, TensorMetadata};
use burn::tensor::{FloatDType, Shape, Tensor, TensorData};
use rayon::prelude::*;

/// Rows per parallel chunk.
const ROWS: usize = 16;

/// The normalisation and its gradients, on `[rows, hidden]` inputs and a `[hidden]` weight.
#[backend_extension(Flex, Cube: cfg(all()), Autodiff)]
pub(crate) trait RmsNormOps: Backend {
    /// `x · r · w` per row.
    ///
    /// # Shapes
    /// - `x`: `[rows, hidden]`, `w`: `[hidden]` → `[rows, hidden]`
    fn rms_norm(x: FloatTensor<Self>, w: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        composite::<Self>(x, w, eps)
    }

    /// Gradients of [`RmsNormOps::rms_norm`] for an upstream `dy`: with `g = dy · w`,
    /// `dx = r · g − x · r³ · mean(x · g)` per row and `dw = Σ_rows dy · x · r`.
    ///
    /// # Shapes
    /// - `x`, `dy`: `[rows, hidden]`, `w`: `[hidden]` → (`[rows, hidden]`, `[hidden]`)
    fn rms_norm_backward(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        dy: FloatTensor<Self>,
        eps: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        composite_backward::<Self>(x, w, dy, eps)
    }
}

/// `r` per row, `[rows, 1]`.
fn inverse_rms<B: Backend>(x: FloatTensor<B>, eps: f64) -> FloatTensor<B> {
    let mean_square = B::float_mean_dim(B::float_powi_scalar(x, 2.into()), 1);
    B::float_recip(B::float_sqrt(B::float_add_scalar(mean_square, eps.into())))
}

/// `w` as a `[1, hidden]` row in `like`'s precision.
fn weight_row<B: Backend>(w: FloatTensor<B>, like: &FloatTensor<B>) -> FloatTensor<B> {
    let hidden = w.shape().num_elements();
    B::float_reshape(
        B::float_cast(w, FloatDType::from(like.dtype())),
        Shape::new([1, hidden]),
    )
}

/// [`RmsNormOps::rms_norm`] from burn's primitives.
fn composite<B: Backend>(x: FloatTensor<B>, w: FloatTensor<B>, eps: f64) -> FloatTensor<B> {
    let r = inverse_rms::<B>(x.clone(), eps);
    let w = weight_row::<B>(w, &x);
    B::float_mul(B::float_mul(x, r), w)
}

/// [`RmsNormOps::rms_norm_backward`] from burn's primitives.
fn composite_backward<B: Backend>(
    x: FloatTensor<B>,
    w: FloatTensor<B>,
    dy: FloatTensor<B>,
    eps: f64,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let hidden = x.shape().dims::<2>()[1];
    let wdtype = FloatDType::from(w.dtype());
    let r = inverse_rms::<B>(x.clone(), eps);
    let g = B::float_mul(dy.clone(), weight_row::<B>(w, &x));
    let dot = B::float_sum_dim(B::float_mul(x.clone(), g.clone()), 1);
    let r3 = B::float_mul(B::float_mul(r.clone(), r.clone()), r.clone());
    let coef = B::float_div_scalar(B::float_mul(r3, dot), (hidden as f64).into());
    let dx = B::float_sub(B::float_mul(g, r.clone()), B::float_mul(x.clone(), coef));
    let dw = B::float_sum_dim(B::float_mul(B::float_mul(dy, x), r), 0);
    let dw = B::float_cast(B::float_reshape(dw, Shape::new([hidden])), wdtype);
    (dx, dw)
}

/// `1 / sqrt(mean(row²) + eps)`, accumulated in f64.
fn row_inverse_rms(row: &[f32], eps: f64) -> f32 {
    let ss: f64 = row.iter().map(|&v| (v as f64) * (v as f64)).sum();
    (1.0 / (ss / row.len() as f64 + eps).sqrt()) as f32
}

impl RmsNormOps for Flex {
    fn rms_norm(x: FloatTensor<Self>, w: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        let shape = x.shape();
        let hidden = shape.dims::<2>()[1];
        match (x.as_slice::<f32>(), w.as_slice::<f32>()) {
            (Some(xs), Some(ws)) if ws.len() == hidden && hidden > 0 => {
                let mut out = vec![0.0f32; xs.len()];
                out.par_chunks_mut(ROWS * hidden)
                    .zip(xs.par_chunks(ROWS * hidden))
                    .for_each(|(o, xc)| {
                        for (orow, xrow) in o.chunks_mut(hidden).zip(xc.chunks(hidden)) {
                            let r = row_inverse_rms(xrow, eps);
                            for ((o, &x), &w) in orow.iter_mut().zip(xrow).zip(ws) {
                                *o = x * r * w;
                            }
                        }
                    });
                FlexTensor::from_data(TensorData::new(out, shape))
            }
            _ => composite::<Self>(x, w, eps),
        }
    }

    fn rms_norm_backward(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        dy: FloatTensor<Self>,
        eps: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let shape = x.shape();
        let hidden = shape.dims::<2>()[1];
        let fast = match (x.as_slice::<f32>(), w.as_slice::<f32>(), dy.as_slice::<f32>()) {
            (Some(xs), Some(ws), Some(ds)) if ws.len() == hidden && hidden > 0 && dy.shape() == shape => {
                let mut dx = vec![0.0f32; xs.len()];
                let dw = dx
                    .par_chunks_mut(ROWS * hidden)
                    .zip(xs.par_chunks(ROWS * hidden).zip(ds.par_chunks(ROWS * hidden)))
                    .map(|(dxc, (xc, dc))| {
                        let mut dw = vec![0.0f32; hidden];
                        for ((dxrow, xrow), drow) in
                            dxc.chunks_mut(hidden).zip(xc.chunks(hidden)).zip(dc.chunks(hidden))
                        {
                            let r = row_inverse_rms(xrow, eps);
                            let dot: f32 = xrow.iter().zip(drow).zip(ws).map(|((&x, &d), &w)| x * d * w).sum();
                            let coef = r * r * r * dot / hidden as f32;
                            for j in 0..hidden {
                                dxrow[j] = r * drow[j] * ws[j] - xrow[j] * coef;
                                dw[j] += drow[j] * xrow[j] * r;
                            }
                        }
                        dw
                    })
                    .reduce(
                        || vec![0.0f32; hidden],
                        |mut a, b| {
                            a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
                            a
                        },
                    );
                Some((
                    FlexTensor::from_data(TensorData::new(dx, shape.clone())),
                    FlexTensor::from_data(TensorData::new(dw, [hidden])),
                ))
            }
            _ => None,
        };
        fast.unwrap_or_else(|| composite_backward::<Self>(x, w, dy, eps))
    }
}

impl RmsNormOps for Cube {}

/// Backward of [`RmsNormOps::rms_norm`].
#[derive(Debug)]
struct RmsNormBackward {
    eps: f64,
}

impl<B: Backend + RmsNormOps> Backward<B, 2> for RmsNormBackward {
    /// `x` and `w`.
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_w] = ops.parents;
        let dy = grads.consume::<B>(&ops.node);
        let (x, w) = ops.state;
        let (dx, dw) = B::rms_norm_backward(x, w, dy, self.eps);
        if let Some(node) = node_x {
            grads.register::<B>(node.id, dx);
        }
        if let Some(node) = node_w {
            grads.register::<B>(node.id, dw);
        }
    }
}

impl<B: Backend + RmsNormOps, C: CheckpointStrategy> RmsNormOps for Autodiff<B, C> {
    fn rms_norm(x: FloatTensor<Self>, w: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        let (x, guard_x) = x.into_parts();
        let (w, guard_w) = w.into_parts();
        match (RmsNormBackward { eps })
            .prepare::<C>([guard_x, guard_w])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let out = B::rms_norm(x.clone(), w.clone(), eps);
                prep.finish((x, w), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::rms_norm(x, w, eps)),
        }
    }
}

/// `x / sqrt(mean(x²) + eps) · w` over the last dimension, through [`RmsNormOps`].
///
/// # Shapes
/// - `x`: `[batch, seq, hidden]`, `w`: `[hidden]` → `[batch, seq, hidden]`
pub(crate) fn rms_norm(x: Tensor<3>, w: Tensor<1>, eps: f64) -> Tensor<3> {
    let [batch, seq, hidden] = x.dims();
    let x = x.reshape([batch * seq, hidden]);
    let y: Tensor<2> = Tensor::from_dispatch(<Dispatch as RmsNormOps>::rms_norm(
        x.into_dispatch(),
        w.into_dispatch(),
        eps,
    ));
    y.reshape([batch, seq, hidden])
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Device, Distribution, Tensor};

    use super::rms_norm;
    use crate::testing::max_rel;

    /// The fused op and its gradients against burn's composite under autodiff.
    fn check(device: &Device) {
        let ad = device.clone().autodiff();
        // More rows than one parallel chunk; rows of very different scales.
        let x0 = Tensor::<3>::random([3, 13, 96], Distribution::Normal(0.0, 1.0), device)
            .mul(Tensor::<3>::random(
                [3, 13, 1],
                Distribution::Uniform(0.01, 30.0),
                device,
            ))
            .into_data();
        let w0 = Tensor::<1>::random([96], Distribution::Normal(1.0, 0.5), device).into_data();
        let up = Tensor::<3>::random([3, 13, 96], Distribution::Normal(0.0, 1.0), device);
        let eps = 1e-5;
        let run = |fused: bool| {
            let x = Tensor::<3>::from_data(x0.clone(), &ad).require_grad();
            let w = Tensor::<1>::from_data(w0.clone(), &ad).require_grad();
            let y = if fused {
                rms_norm(x.clone(), w.clone(), eps)
            } else {
                let rms = x.clone().square().mean_dim(2).add_scalar(eps).sqrt();
                x.clone().div(rms).mul(w.clone().unsqueeze::<3>())
            };
            let grads = y.clone().mul(up.clone().to_device(&ad)).sum().backward();
            let flat = |t: burn::tensor::TensorData| t.convert::<f32>().try_into_vec::<f32>().unwrap();
            (
                flat(y.inner().into_data()),
                flat(x.grad(&grads).unwrap().into_data()),
                flat(w.grad(&grads).unwrap().into_data()),
            )
        };
        let (got, want) = (run(true), run(false));
        for (name, a, b) in [
            ("value", &got.0, &want.0),
            ("dx", &got.1, &want.1),
            ("dw", &got.2, &want.2),
        ] {
            let err = max_rel(a, b);
            assert!(err < 1e-4, "{name}: max relative error {err}");
        }
    }

    #[test]
    fn rms_norm_matches_the_composite_on_cpu() {
        check(&Device::flex());
    }

    #[test]
    fn rms_norm_matches_the_composite_on_wgpu() {
        let Some(gpu) = crate::device::gpu_for_tests("rms_norm_matches_the_composite_on_wgpu") else {
            return;
        };
        check(&gpu);
    }
}
