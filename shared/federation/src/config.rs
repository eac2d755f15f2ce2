//! The federation part of a server config: `[federation]` (rounds, sampling, deadlines, limits). How clients train
//! each round (`[local]`) is an `offsite_protocol::TrainConfig`. Unknown keys are rejected with their name.

use serde::{Deserialize, Serialize};

use offsite_protocol::Encoding;

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
