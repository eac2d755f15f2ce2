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
    /// Updates with a larger L2 norm are rejected (default 1000, far above what an adapter round moves; `inf`
    /// turns the check off).
    pub max_update_norm: Option<f64>,
    /// The FedAvg weight a client may claim: larger `num_examples` are clipped to it, and logged (default: the
    /// examples the round's task trains on, steps × batch_size × grad_accum).
    pub max_examples_per_update: Option<u64>,
    /// A round repeated this many times (too few good updates, or an aggregate that is not finite) ends the
    /// federation with an error.
    pub max_round_attempts: u32,
    /// Generations of the server state kept on disk (`server_state.safetensors` and older `server_state.N.…`); a
    /// damaged newest file is skipped for the next good one at restart.
    pub keep_states: usize,
    /// Encoding clients use for their updates.
    pub update_encoding: Encoding,
    /// Encoding of the global adapter the server sends each round: `f16` (the default) halves the bytes down against
    /// `f32` (exact). Clients start from the decoded global and send their delta from it, so the rounding is not
    /// added into the server's global; each round's report gives its relative size (`global_rounding`).
    pub global_encoding: Encoding,
    /// Largest update accepted, in MiB.
    pub max_update_mib: u32,
    /// Evaluate the plug-in model every this many rounds (0 = never; needs `[eval]`).
    pub eval_every: u64,
    /// Seed of client sampling and of the clients' data order.
    pub seed: u64,
    /// Secure aggregation (`[federation.secure_aggregation]`): the server learns only the sum of a round's updates.
    pub secure_aggregation: Option<SecureAggregationConfig>,
}

/// `[federation.secure_aggregation]`: SecAgg+ masking of every round's updates (its presence turns it on).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecureAggregationConfig {
    /// Neighbours of each client in the masking graph (0: about 3·log₂ n for n clients, as SecAgg+; the complete
    /// graph for small rounds).
    pub neighbours: u32,
    /// Shares of a client's secrets needed to rebuild them, out of its neighbours and itself (0: a majority).
    pub threshold: u32,
    /// Every coordinate of a weighted update is clipped to ±`clip` (fixed-point range; adapter deltas are far
    /// smaller). The fixed-point error of the sum is at most n²·clip/2³² per coordinate for n clients.
    pub clip: f32,
    /// Seconds each key or share stage waits for the clients' messages (the masked updates wait `deadline_s`).
    pub stage_timeout_s: f64,
}

impl Default for SecureAggregationConfig {
    fn default() -> Self {
        Self {
            neighbours: 0,
            threshold: 0,
            clip: 1.0,
            stage_timeout_s: 60.0,
        }
    }
}

impl Default for FederationConfig {
    fn default() -> Self {
        Self {
            rounds: 3,
            fraction: 1.0,
            min_clients: 1,
            wait_for_clients_s: 600.0,
            deadline_s: 1800.0,
            max_update_norm: Some(1000.0),
            max_examples_per_update: None,
            max_round_attempts: 10,
            keep_states: 3,
            update_encoding: Encoding::F32,
            global_encoding: Encoding::F16,
            max_update_mib: 512,
            eval_every: 1,
            seed: 0,
            secure_aggregation: None,
        }
    }
}
