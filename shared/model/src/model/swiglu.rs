//! The LLaMA MLP's gate, `silu(g) · u = g · σ(g) · u`, as one differentiable op.
//!
//! Autodiff through burn's composite (sigmoid, two products, and their backward) walks the `[tokens, intermediate]`
//! activations about nine times per layer, on one thread on the CPU backend. The CPU body here makes one
//! rayon-parallel pass forward and one backward; other backends run the composite default bodies. The backward keeps
//! `g` and `u` only (the composite also kept `silu(g)`).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::Autodiff;
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{backend_extension, Backend, Cube, Dispatch, Flex, TensorMetadata};
use burn::tensor::{Tensor, TensorData};
use rayon::prelude::*;

/// Elements per parallel chunk.
const CHUNK: usize = 16 * 1024;

/// The gated activation and its gradient.
#[backend_extension(Flex, Cube: cfg(all()), Autodiff)]
pub(crate) trait SwigluOps: Backend {
    /// `g · σ(g) · u`, element-wise (same shapes).
    fn swiglu(g: FloatTensor<Self>, u: FloatTensor<Self>) -> FloatTensor<Self> {
        composite::<Self>(g, u)
    }

    /// Gradients of [`SwigluOps::swiglu`] for an upstream `dy`: `(dy · u · σ(g) · (1 + g · (1 − σ(g))),
    /// dy · g · σ(g))`.
    fn swiglu_backward(
        g: FloatTensor<Self>,
        u: FloatTensor<Self>,
        dy: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        composite_backward::<Self>(g, u, dy)
    }
}

/// [`SwigluOps::swiglu`] from burn's primitives.
fn composite<B: Backend>(g: FloatTensor<B>, u: FloatTensor<B>) -> FloatTensor<B> {
    let silu = B::float_mul(g.clone(), B::sigmoid(g));
    B::float_mul(silu, u)
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

impl SwigluOps for Flex {
    fn swiglu(g: FloatTensor<Self>, u: FloatTensor<Self>) -> FloatTensor<Self> {
        let shape = g.shape();
        match (g.as_slice::<f32>(), u.as_slice::<f32>()) {
            (Some(gs), Some(us)) if u.shape() == shape => {
                let mut out = vec![0.0f32; gs.len()];
                out.par_chunks_mut(CHUNK)
                    .zip(gs.par_chunks(CHUNK).zip(us.par_chunks(CHUNK)))
                    .for_each(|(o, (gc, uc))| {
                        for ((o, &g), &u) in o.iter_mut().zip(gc).zip(uc) {
                            *o = g * sigmoid(g) * u;
                        }
                    });
                FlexTensor::from_data(TensorData::new(out, shape))
            }
            _ => composite::<Self>(g, u),
        }
    }

    fn swiglu_backward(
        g: FloatTensor<Self>,
        u: FloatTensor<Self>,
        dy: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let shape = g.shape();
        let fast = match (g.as_slice::<f32>(), u.as_slice::<f32>(), dy.as_slice::<f32>()) {
            (Some(gs), Some(us), Some(ds)) if u.shape() == shape && dy.shape() == shape => {
                let (mut dg, mut du) = (vec![0.0f32; gs.len()], vec![0.0f32; gs.len()]);
                dg.par_chunks_mut(CHUNK)
                    .zip(du.par_chunks_mut(CHUNK))
                    .zip(gs.par_chunks(CHUNK).zip(us.par_chunks(CHUNK)).zip(ds.par_chunks(CHUNK)))
                    .for_each(|((dgc, duc), ((gc, uc), dc))| {
                        for i in 0..gc.len() {
                            let (g, u, d) = (gc[i], uc[i], dc[i]);
                            let s = sigmoid(g);
                            duc[i] = d * g * s;
                            dgc[i] = d * u * s * (1.0 + g * (1.0 - s));
                        }
                    });
                Some((
                    FlexTensor::from_data(TensorData::new(dg, shape.clone())),
                    FlexTensor::from_data(TensorData::new(du, shape.clone())),
                ))
            }
            _ => None,
        };
        fast.unwrap_or_else(|| composite_backward::<Self>(g, u, dy))
    }
}

/// [`SwigluOps::swiglu_backward`] from burn's primitives.
fn composite_backward<B: Backend>(
    g: FloatTensor<B>,
    u: FloatTensor<B>,
    dy: FloatTensor<B>,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let s = B::sigmoid(g.clone());
    let silu = B::float_mul(g, s.clone());
    let du = B::float_mul(dy.clone(), silu.clone());
    // d silu / dg = σ + g·σ·(1 − σ) = σ + silu − silu·σ
    let dsilu = B::float_sub(B::float_add(s.clone(), silu.clone()), B::float_mul(silu, s));
    (B::float_mul(B::float_mul(dy, u), dsilu), du)
}

impl SwigluOps for Cube {}

/// Backward of [`SwigluOps::swiglu`].
#[derive(Debug)]
struct SwigluBackward;

impl<B: Backend + SwigluOps> Backward<B, 2> for SwigluBackward {
    /// `g` and `u`.
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_g, node_u] = ops.parents;
        let dy = grads.consume::<B>(&ops.node);
        let (g, u) = ops.state;
        let (dg, du) = B::swiglu_backward(g, u, dy);
        if let Some(node) = node_g {
            grads.register::<B>(node.id, dg);
        }
        if let Some(node) = node_u {
            grads.register::<B>(node.id, du);
        }
    }
}

impl<B: Backend + SwigluOps, C: CheckpointStrategy> SwigluOps for Autodiff<B, C> {
    fn swiglu(g: FloatTensor<Self>, u: FloatTensor<Self>) -> FloatTensor<Self> {
        let (g, guard_g) = g.into_parts();
        let (u, guard_u) = u.into_parts();
        match SwigluBackward
            .prepare::<C>([guard_g, guard_u])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let out = B::swiglu(g.clone(), u.clone());
                prep.finish((g, u), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::swiglu(g, u)),
        }
    }
}

/// `silu(g) · u` through [`SwigluOps`].
///
/// # Shapes
/// - `g`, `u`: the same shape → that shape
pub(crate) fn swiglu<const D: usize>(g: Tensor<D>, u: Tensor<D>) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as SwigluOps>::swiglu(g.into_dispatch(), u.into_dispatch()))
}

#[cfg(test)]
mod tests {
    use burn::tensor::activation::silu;
    use burn::tensor::{Device, Distribution, Tensor};

    use super::swiglu;
    use crate::testing::max_rel;

    /// The fused op and its gradients against burn's composite `silu(g) · u` under autodiff.
    fn check(device: &Device) {
        let ad = device.clone().autodiff();
        // More elements than one parallel chunk, with large magnitudes (σ saturates both ways).
        let g0 = Tensor::<2>::random([37, 1000], Distribution::Normal(0.0, 6.0), device).into_data();
        let u0 = Tensor::<2>::random([37, 1000], Distribution::Normal(0.0, 1.0), device).into_data();
        let up = Tensor::<2>::random([37, 1000], Distribution::Normal(0.0, 1.0), device);
        let run = |fused: bool| {
            let g = Tensor::<2>::from_data(g0.clone(), &ad).require_grad();
            let u = Tensor::<2>::from_data(u0.clone(), &ad).require_grad();
            let y = if fused {
                swiglu(g.clone(), u.clone())
            } else {
                silu(g.clone()).mul(u.clone())
            };
            let grads = y.clone().mul(up.clone().to_device(&ad)).sum().backward();
            let v = |t: Tensor<2>| t.into_data().convert::<f32>().try_into_vec::<f32>().unwrap();
            (v(y.inner()), v(g.grad(&grads).unwrap()), v(u.grad(&grads).unwrap()))
        };
        let (got, want) = (run(true), run(false));
        for (name, a, b) in [
            ("value", &got.0, &want.0),
            ("dg", &got.1, &want.1),
            ("du", &got.2, &want.2),
        ] {
            let err = max_rel(a, b);
            assert!(err < 1e-5, "{name}: max relative error {err}");
        }
    }

    #[test]
    fn swiglu_matches_the_composite_on_cpu() {
        check(&Device::flex());
    }

    #[test]
    fn swiglu_matches_the_composite_on_wgpu() {
        let Some(gpu) = crate::device::gpu_for_tests("swiglu_matches_the_composite_on_wgpu") else {
            return;
        };
        check(&gpu);
    }
}
