//! Cross-entropy per row of `[n, vocab]` logits, `logsumexp(x[r]) − x[r, t[r]]`, as one differentiable op with a
//! hand-written backward `(softmax(x[r]) − onehot(t[r])) · g[r]`.
//!
//! Autodiff through burn's composite `log_softmax` walks the `[n, vocab]` logits about six times each way (max,
//! shift, exp, sum, log, subtract, and their backward), each pass a fresh `[n, vocab]` tensor and, on the CPU
//! backend, on one thread. The CPU body here makes one pass forward (row maxima and sums) and one backward, rows in
//! parallel; other backends run the composite default bodies. Only the log-sum-exp per row is kept for the backward.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::Autodiff;
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{backend_extension, Backend, Cube, Flex, TensorMetadata};
use burn::tensor::{DType, IndexingUpdateOp, Shape, TensorData};
use rayon::prelude::*;

/// Row-wise cross-entropy through logits.
#[backend_extension(Flex, Cube: cfg(all()), Autodiff)]
pub(crate) trait CrossEntropyOps: Backend {
    /// `log Σ_j exp(x[r, j])` per row.
    ///
    /// # Shapes
    /// - `x`: `[n, v]` → `[n]`
    fn logsumexp_rows(x: FloatTensor<Self>) -> FloatTensor<Self> {
        logsumexp_composite::<Self>(x)
    }

    /// `logsumexp(x[r]) − x[r, t[r]]` per row; differentiable with respect to `x`.
    ///
    /// # Shapes
    /// - `x`: `[n, v]`, `targets`: `[n]` (in `0..v`) → `[n]`
    fn xent_rows(x: FloatTensor<Self>, targets: IntTensor<Self>) -> FloatTensor<Self> {
        let lse = Self::logsumexp_rows(x.clone());
        xent_from_lse::<Self>(x, lse, targets)
    }

    /// The gradient of [`CrossEntropyOps::xent_rows`] for an upstream `g`: `(exp(x − lse) − onehot(t)) ⊙ g`, rows
    /// scaled by `g[r]`.
    ///
    /// # Shapes
    /// - `x`: `[n, v]`, `lse`, `targets`, `g`: `[n]` → `[n, v]`
    fn xent_rows_backward(
        x: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        targets: IntTensor<Self>,
        g: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        xent_backward_composite::<Self>(x, lse, targets, g)
    }
}

/// [`CrossEntropyOps::logsumexp_rows`] from burn's primitives, shifted by the row maxima.
fn logsumexp_composite<B: Backend>(x: FloatTensor<B>) -> FloatTensor<B> {
    let n = x.shape().dims::<2>()[0];
    let max = B::float_max_dim(x.clone(), 1);
    let sum = B::float_sum_dim(B::float_exp(B::float_sub(x, max.clone())), 1);
    B::float_reshape(B::float_add(B::float_log(sum), max), Shape::new([n]))
}

/// [`CrossEntropyOps::xent_rows_backward`] from burn's primitives.
fn xent_backward_composite<B: Backend>(
    x: FloatTensor<B>,
    lse: FloatTensor<B>,
    targets: IntTensor<B>,
    g: FloatTensor<B>,
) -> FloatTensor<B> {
    let n = x.shape().dims::<2>()[0];
    let column = |t| B::float_reshape(t, Shape::new([n, 1]));
    let g = column(g);
    let p = B::float_exp(B::float_sub(x, column(lse)));
    let idx = B::int_reshape(targets, Shape::new([n, 1]));
    B::float_scatter(
        1,
        B::float_mul(p, g.clone()),
        idx,
        B::float_neg(g),
        IndexingUpdateOp::Add,
    )
}

/// `lse[r] − x[r, t[r]]`.
fn xent_from_lse<B: Backend>(x: FloatTensor<B>, lse: FloatTensor<B>, targets: IntTensor<B>) -> FloatTensor<B> {
    let n = x.shape().dims::<2>()[0];
    let picked = B::float_gather(1, x, B::int_reshape(targets, Shape::new([n, 1])));
    B::float_sub(lse, B::float_reshape(picked, Shape::new([n])))
}

/// `log Σ exp(row)`, shifted by the row's maximum (a row of −∞ gives −∞, one holding +∞ or NaN gives NaN or +∞
/// as the composite does).
fn lse_row(row: &[f32]) -> f32 {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    if !max.is_finite() {
        return max;
    }
    let sum: f32 = row.iter().map(|&v| (v - max).exp()).sum();
    max + sum.ln()
}

/// Targets as `usize`, whatever integer type the CPU backend holds them in.
fn targets_usize(t: &FlexTensor) -> Option<Vec<usize>> {
    match t.dtype() {
        DType::I64 => t.as_slice::<i64>().map(|s| s.iter().map(|&v| v as usize).collect()),
        DType::I32 => t.as_slice::<i32>().map(|s| s.iter().map(|&v| v as usize).collect()),
        _ => None,
    }
}

impl CrossEntropyOps for Flex {
    fn logsumexp_rows(x: FloatTensor<Self>) -> FloatTensor<Self> {
        let [n, v] = x.shape().dims::<2>();
        match x.as_slice::<f32>() {
            Some(data) if v > 0 => {
                let mut out = vec![0.0f32; n];
                out.par_iter_mut()
                    .zip(data.par_chunks(v))
                    .for_each(|(o, row)| *o = lse_row(row));
                FlexTensor::from_data(TensorData::new(out, [n]))
            }
            _ => logsumexp_composite::<Self>(x),
        }
    }

    fn xent_rows_backward(
        x: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        targets: IntTensor<Self>,
        g: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let [n, v] = x.shape().dims::<2>();
        let fast = match (
            x.as_slice::<f32>(),
            lse.as_slice::<f32>(),
            g.as_slice::<f32>(),
            targets_usize(&targets),
        ) {
            (Some(data), Some(lse), Some(g), Some(t)) if v > 0 => {
                let mut out = vec![0.0f32; n * v];
                out.par_chunks_mut(v)
                    .zip(data.par_chunks(v))
                    .enumerate()
                    .for_each(|(r, (o, row))| {
                        let (l, gr) = (lse[r], g[r]);
                        for (oj, &xj) in o.iter_mut().zip(row) {
                            *oj = (xj - l).exp() * gr;
                        }
                        if let Some(ot) = o.get_mut(t[r]) {
                            *ot -= gr;
                        }
                    });
                Some(FlexTensor::from_data(TensorData::new(out, [n, v])))
            }
            _ => None,
        };
        fast.unwrap_or_else(|| xent_backward_composite::<Self>(x, lse, targets, g))
    }
}

impl CrossEntropyOps for Cube {}

/// Backward of [`CrossEntropyOps::xent_rows`]: the logits get `(softmax − onehot) · g`.
#[derive(Debug)]
struct XentBackward;

impl<B: Backend + CrossEntropyOps> Backward<B, 1> for XentBackward {
    /// Logits, per-row log-sum-exp, targets.
    type State = (FloatTensor<B>, FloatTensor<B>, IntTensor<B>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x] = ops.parents;
        let g = grads.consume::<B>(&ops.node);
        if let Some(node) = node_x {
            let (x, lse, targets) = ops.state;
            grads.register::<B>(node.id, B::xent_rows_backward(x, lse, targets, g));
        }
    }
}

impl<B: Backend + CrossEntropyOps, C: CheckpointStrategy> CrossEntropyOps for Autodiff<B, C> {
    fn xent_rows(x: FloatTensor<Self>, targets: IntTensor<Self>) -> FloatTensor<Self> {
        let (x, guard) = x.into_parts();
        match XentBackward.prepare::<C>([guard]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let lse = B::logsumexp_rows(x.clone());
                let out = xent_from_lse::<B>(x.clone(), lse.clone(), targets.clone());
                prep.finish((x, lse, targets), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::xent_rows(x, targets)),
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Device, Tensor, TensorData};

    use super::super::causal_lm_loss;

    /// Plain f64 reference: mean over weighted rows of `logsumexp − x[t]`, and its gradient.
    fn reference(x: &[f32], v: usize, t: &[usize], w: &[f64]) -> (f64, Vec<f64>) {
        let count: f64 = w.iter().sum();
        let mut loss = 0.0;
        let mut grad = vec![0.0; x.len()];
        for (r, row) in x.chunks(v).enumerate() {
            let max = row.iter().fold(f64::NEG_INFINITY, |m, &a| m.max(a as f64));
            let lse = max + row.iter().map(|&a| (a as f64 - max).exp()).sum::<f64>().ln();
            loss += w[r] * (lse - row[t[r]] as f64) / count;
            for (j, &a) in row.iter().enumerate() {
                let onehot = if j == t[r] { 1.0 } else { 0.0 };
                grad[r * v + j] = w[r] * ((a as f64 - lse).exp() - onehot) / count;
            }
        }
        (loss, grad)
    }

    /// The loss and the logits' gradient through [`causal_lm_loss`] (so through the fused op) match the reference,
    /// with large logits (no overflow), ignored labels and the last position of each sequence predicting nothing.
    fn check(device: &Device) {
        let (b, s, v) = (2, 5, 37);
        let mut x: Vec<f32> = (0..b * s * v).map(|i| ((i * 7919 % 101) as f32 / 10.0) - 5.0).collect();
        x[3] = 1000.0; // a huge logit: exp would overflow without the shift
        let labels = vec![vec![-100, 4, 36, 0, 9], vec![2, -100, -100, 17, 30]];
        let ad = device.clone().autodiff();
        let logits = Tensor::<3>::from_data(TensorData::new(x.clone(), [b, s, v]), &ad).require_grad();
        let loss = causal_lm_loss(logits.clone(), &labels).unwrap();
        let grads = loss.backward();
        let got_loss = loss.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()[0] as f64;
        let got_grad: Vec<f32> = logits
            .grad(&grads)
            .unwrap()
            .into_data()
            .convert::<f32>()
            .try_to_vec()
            .unwrap();

        // Row (i, j) predicts labels[i][j + 1].
        let (mut t, mut w) = (Vec::new(), Vec::new());
        for row in &labels {
            for j in 0..s {
                let l = row.get(j + 1).copied().unwrap_or(-100);
                t.push(if l < 0 { 0 } else { l as usize });
                w.push(if l < 0 { 0.0 } else { 1.0 });
            }
        }
        let (want_loss, want_grad) = reference(&x, v, &t, &w);
        assert!(
            (got_loss - want_loss).abs() < 1e-4 * want_loss.abs().max(1.0),
            "loss {got_loss} vs {want_loss}"
        );
        for (i, (g, r)) in got_grad.iter().zip(&want_grad).enumerate() {
            assert!((*g as f64 - r).abs() < 1e-5, "gradient {i}: {g} vs {r}");
        }
        // Ignored rows (and each sequence's last position) get exactly zero gradient.
        let ignored: Vec<usize> = (0..b * s).filter(|&r| w[r] == 0.0).collect();
        assert_eq!(ignored, vec![4, 5, 6, 9]);
        for r in ignored {
            assert!(got_grad[r * v..(r + 1) * v].iter().all(|&g| g == 0.0), "row {r}");
        }
    }

    #[test]
    fn fused_cross_entropy_matches_a_plain_reference_on_cpu() {
        check(&Device::flex());
    }

    #[test]
    fn fused_cross_entropy_matches_a_plain_reference_on_wgpu() {
        let Some(gpu) = crate::device::gpu_for_tests("fused_cross_entropy_matches_a_plain_reference_on_wgpu") else {
            return;
        };
        check(&gpu);
    }

    #[test]
    fn targets_may_be_any_in_range_and_an_empty_label_set_is_refused() {
        let device = Device::flex();
        let logits = Tensor::<3>::zeros([1, 3, 4], &device);
        let loss = causal_lm_loss(logits.clone(), &[vec![0, 3, 0]]).unwrap();
        // Uniform logits: the loss is ln(4) whatever the targets.
        let got = loss.into_data().try_to_vec::<f32>().unwrap()[0];
        assert!((got - 4f32.ln()).abs() < 1e-6, "{got}");
        assert!(causal_lm_loss(logits.clone(), &[vec![0, -100, -100]]).is_err());
        assert!(causal_lm_loss(logits, &[vec![0, 4, 0]]).is_err());
    }
}
