//! Hugging Face's causal-LM loss: mean cross-entropy of `logits[:, t]` against `labels[:, t + 1]`, skipping
//! positions labelled [`IGNORE_INDEX`] (prompt tokens, padding).

use burn::backend::Dispatch;
use burn::tensor::{Int, Tensor, TensorData};

use super::xent::CrossEntropyOps;
use crate::model::ModelError;

/// Label of positions that do not count in the loss (PyTorch's `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

/// Mean next-token cross-entropy over the positions whose label is not [`IGNORE_INDEX`].
///
/// # Shapes
/// - `logits`: `[batch, seq, vocab]`; `labels`: `batch` rows of `seq` → `[1]`
pub fn causal_lm_loss(logits: Tensor<3>, labels: &[Vec<i64>]) -> Result<Tensor<1>, ModelError> {
    let [b, s, v] = logits.dims();
    if labels.len() != b || labels.iter().any(|r| r.len() != s) {
        return Err(ModelError::Input(format!("labels must be {b} rows of {s}")));
    }
    if s < 2 {
        return Err(ModelError::Input(
            "a sequence needs at least 2 tokens to predict one".into(),
        ));
    }
    // Every position is a row; the last of each sequence predicts nothing (weight 0), which spares slicing the
    // `[batch, seq, vocab]` logits into a copy.
    let mut targets = Vec::with_capacity(b * s);
    let mut weights = Vec::with_capacity(b * s);
    for row in labels {
        for &l in row[1..].iter().chain(std::iter::once(&IGNORE_INDEX)) {
            if l == IGNORE_INDEX {
                targets.push(0i64);
                weights.push(0.0f32);
            } else if (0..v as i64).contains(&l) {
                targets.push(l);
                weights.push(1.0);
            } else {
                return Err(ModelError::Input(format!("label {l} is outside the vocabulary ({v})")));
            }
        }
    }
    let count: f32 = weights.iter().sum();
    if count == 0.0 {
        return Err(ModelError::Input(
            "every label is ignored: nothing to learn from".into(),
        ));
    }
    let device = logits.device();
    let targets = Tensor::<1, Int>::from_data(TensorData::new(targets, [b * s]), &device);
    let weights = Tensor::<1>::from_data(TensorData::new(weights, [b * s]), &device);
    let per_row: Tensor<1> = Tensor::from_dispatch(<Dispatch as CrossEntropyOps>::xent_rows(
        logits.reshape([b * s, v]).into_dispatch(),
        targets.into_dispatch(),
    ));
    Ok(per_row.mul(weights).sum().div_scalar(count).reshape([1]))
}
