//! Training settings: one type for a local training job (`[train]`), a federation's clients (`[local]`) and the
//! wire (inside every task, so it is versioned with the protocol). Plain data; the trainer lives in `offsite`.

use bincode::{Decode, Encode};
use serde::{Deserialize, Serialize};

/// How an adapter trains (`[train]` in a job file, `[local]` in a federation config; unknown keys rejected).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Encode, Decode)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Optimizer steps (in a federation: per round).
    pub steps: usize,
    /// Examples per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Final learning rate of the cosine decay (in a federation: of each round's schedule).
    pub min_lr: f64,
    /// Linear warmup steps.
    pub warmup_steps: usize,
    /// Clip the global gradient norm to this (none when absent).
    pub max_grad_norm: Option<f64>,
    /// AdamW settings.
    pub adamw: AdamWConfig,
    /// Seed of the data order and of dropout; the same seed gives the same run. In a federation each round's seed
    /// comes from `[federation] seed` and the round instead ([`TrainConfig::for_round`]).
    pub seed: u64,
    /// Stop with an error after this many non-finite steps in a row.
    pub max_nonfinite_steps: usize,
    /// `f32`, or `mixed_f16` (f16 products with dynamic loss scaling).
    pub precision: Precision,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            steps: 100,
            batch_size: 4,
            grad_accum: 1,
            lr: 1e-4,
            min_lr: 0.0,
            warmup_steps: 0,
            max_grad_norm: Some(1.0),
            adamw: AdamWConfig::default(),
            seed: 42,
            max_nonfinite_steps: 5,
            precision: Precision::F32,
        }
    }
}

impl TrainConfig {
    /// The settings of round `round` of a federation seeded `seed`: these, with a seed of the round's own so every
    /// round draws its own data order.
    pub fn for_round(&self, seed: u64, round: u64) -> TrainConfig {
        TrainConfig {
            seed: seed.wrapping_mul(1_000_003).wrapping_add(round),
            ..self.clone()
        }
    }
}

/// AdamW's settings (PyTorch's names and defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Encode, Decode)]
#[serde(deny_unknown_fields, default)]
pub struct AdamWConfig {
    /// β₁, decay of the first moment.
    pub beta1: f64,
    /// β₂, decay of the second moment.
    pub beta2: f64,
    /// ε added to the denominator.
    pub eps: f64,
    /// Decoupled weight decay, applied to matrices only (not to norms, biases or 1-D tensors).
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// Arithmetic of the forward and backward passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, Encode, Decode)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// Everything in f32.
    #[default]
    F32,
    /// Projections and the LM head multiply in f16, with dynamic loss scaling; parameters, gradients, optimizer
    /// state, norms, softmax and the loss stay f32. Pays off on GPUs with fast f16 (shader-f16); the edge trains in
    /// f32 where the device has none.
    MixedF16,
}
