//! Hugging Face's causal-LM loss: mean cross-entropy of `logits[:, t]` against `labels[:, t + 1]`, skipping
//! positions labelled [`IGNORE_INDEX`] (prompt tokens, padding).

use burn::tensor::activation::log_softmax;
use burn::tensor::{Int, Tensor, TensorData};

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
    let mut targets = Vec::with_capacity(b * (s - 1));
    let mut weights = Vec::with_capacity(b * (s - 1));
    for row in labels {
        for &l in &row[1..] {
            if l == IGNORE_INDEX {
                targets.push(0i64);
                weights.push(0.0f32);
            } else if (0..v as i64).contains(&l) {
                targets.push(l);
                weights.push(1.0);
            } else {
                return Err(ModelError::Input(format!(
                    "label {l} is outside the vocabulary ({v})"
                )));
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
    let targets = Tensor::<3, Int>::from_data(TensorData::new(targets, [b, s - 1, 1]), &device);
    let weights = Tensor::<3>::from_data(TensorData::new(weights, [b, s - 1, 1]), &device);
    let log_probs = log_softmax(logits.slice([0..b, 0..s - 1, 0..v]), 2);
    let picked = log_probs.gather(2, targets).mul(weights);
    Ok(picked.sum().neg().div_scalar(count).reshape([1]))
}
