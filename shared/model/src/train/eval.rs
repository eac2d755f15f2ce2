//! Evaluation: token-weighted mean loss and perplexity over a set of examples.

use super::{causal_lm_loss, TrainError};
use crate::data::{batches, Example};
use crate::model::LlamaForCausalLM;

/// Loss and perplexity over an evaluation set.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EvalReport {
    /// Mean next-token cross-entropy per counted token (nats).
    pub loss: f64,
    /// `exp(loss)`.
    pub perplexity: f64,
    /// Tokens counted.
    pub tokens: usize,
}

/// Evaluates `model` on `examples` in batches of `batch_size` (no gradients).
pub fn evaluate(model: &LlamaForCausalLM, examples: &[Example], batch_size: usize) -> Result<EvalReport, TrainError> {
    let device = model.device();
    let (mut nll, mut tokens) = (0.0f64, 0usize);
    for batch in batches(examples, batch_size, None) {
        let n = batch.target_tokens();
        if n == 0 {
            continue;
        }
        let logits = model.forward(batch.ids_tensor(&device), Some(&batch.mask), None)?;
        let loss: f32 = causal_lm_loss(logits, &batch.labels)?.into_scalar::<f32>();
        nll += loss as f64 * n as f64;
        tokens += n;
    }
    if tokens == 0 {
        return Err(TrainError::Config("the evaluation set holds no target token".into()));
    }
    let loss = nll / tokens as f64;
    Ok(EvalReport {
        loss,
        perplexity: loss.exp(),
        tokens,
    })
}
