//! The federation part of a server config: `[federation]` (rounds, sampling, deadlines, limits) and `[local]` (how
//! clients train each round). Unknown keys are rejected with their name.

use serde::{Deserialize, Serialize};

use crate::protocol::{Encoding, LocalSettings};

/// `[federation]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FederationConfig {
    /// Rounds to run (a restarted server runs the remaining ones).
    pub rounds: u64,
    /// Fraction of the ready clients sampled each round.
    pub fraction: f64,
    /// Clients a round needs: it starts when this many are ready and is repeated when fewer updates are accepted.
    pub min_clients: usize,
    /// Seconds to wait for `min_clients` ready clients before giving up.
    pub wait_for_clients_s: f64,
    /// Seconds a round waits for updates; later ones are rejected as late.
    pub deadline_s: f64,
    /// Updates with a larger L2 norm are rejected (none when absent).
    pub max_update_norm: Option<f64>,
    /// Encoding clients use for their updates.
    pub update_encoding: Encoding,
    /// Largest update accepted, in MiB.
    pub max_update_mib: u32,
    /// Evaluate the plug-in model every this many rounds (0 = never; needs `[eval]`).
    pub eval_every: u64,
    /// Seed of client sampling and of the clients' data order.
    pub seed: u64,
}

impl Default for FederationConfig {
    fn default() -> Self {
        Self {
            rounds: 3,
            fraction: 1.0,
            min_clients: 1,
            wait_for_clients_s: 600.0,
            deadline_s: 1800.0,
            max_update_norm: None,
            update_encoding: Encoding::F32,
            max_update_mib: 512,
            eval_every: 1,
            seed: 0,
        }
    }
}

/// `[local]`: what each client does in a round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LocalConfig {
    /// Optimizer steps per round.
    pub steps: u32,
    /// Sequences per step.
    pub batch_size: u32,
    /// Peak learning rate.
    pub lr: f64,
    /// Final learning rate of the round's cosine decay.
    pub min_lr: f64,
    /// Warm-up steps.
    pub warmup_steps: u32,
    /// Gradient-norm clip (0 = none).
    pub max_grad_norm: f64,
    /// AdamW weight decay.
    pub weight_decay: f64,
}

impl Default for LocalConfig {
    fn default() -> Self {
        Self {
            steps: 10,
            batch_size: 4,
            lr: 1e-4,
            min_lr: 1e-5,
            warmup_steps: 0,
            max_grad_norm: 1.0,
            weight_decay: 0.0,
        }
    }
}

impl LocalConfig {
    /// The settings sent in round `round`'s task.
    pub fn settings(&self, proximal_mu: f64, seed: u64, round: u64) -> LocalSettings {
        LocalSettings {
            steps: self.steps,
            batch_size: self.batch_size,
            lr: self.lr,
            min_lr: self.min_lr,
            warmup_steps: self.warmup_steps,
            max_grad_norm: self.max_grad_norm,
            weight_decay: self.weight_decay,
            proximal_mu,
            seed: seed.wrapping_mul(1_000_003).wrapping_add(round),
        }
    }
}
