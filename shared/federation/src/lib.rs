//! Federation core: what a federation server decides, without IO. Named tensors (`params`), aggregation strategies
//! behind one open trait (`strategy`: which clients and settings a round uses, and how updates become the next
//! global state), the round coordinator (`coordinator`: a sans-IO state machine in quinn-proto's style that takes
//! events and `now` and returns actions), update validation, client tokens, the server's persisted state, and the
//! trait an edge client's local training implements (`LocalTrainer`).
//!
//! Invariant: no burn, tokio or quinn here (a test keeps it so); the network layer (`offsite-net`) moves bytes and
//! timers, the model crate (`offsite`) trains.

mod config;
mod coordinator;
mod crash;
mod files;
mod local;
pub mod params;
mod privacy;
mod round;
mod secagg;
mod state;
mod strategy;
mod tokens;

pub use config::{FederationConfig, SecureAggregationConfig};
pub use coordinator::{Action, Coordinator, Event, Outgoing, RoundReport};
pub use crash::{arm_crash_points, crash_point};
pub use files::{
    f32_bytes, parse_safetensors, read_safetensors, write_atomic, write_safetensors, write_tensors, TensorBytes,
};
pub use local::{LocalOutcome, LocalTask, LocalTrainer};
pub use params::{Params, Tensor};
pub use privacy::{clients_for_noise_to_clip, noise_to_clip, Accountant, DpStrategy, NoiseSite, PrivacyConfig};
pub use round::{sample_clients, sampled_count, validate};
pub use secagg::{
    default_neighbours, default_threshold, prepare_update, SecAggClient, SecAggError, SecAggParams, SecAggServer,
    SecAggSum,
};
pub use state::{ClientRecord, ServerState, STATE_FILE};
pub use strategy::{ClientDp, ClientUpdate, FedOptConfig, RoundContext, RoundPlan, Strategy, StrategyConfig};
pub use tokens::{TokenEntry, TokenStore};

use std::path::PathBuf;

use offsite_protocol::ProtocolError;

/// Errors of the federation core.
#[derive(Debug, thiserror::Error)]
pub enum FedError {
    /// A federation setting is invalid.
    #[error("federation config: {0}")]
    Config(String),
    /// Tensors do not match the global adapter (names or shapes).
    #[error("adapter state mismatch: {0}")]
    Shape(String),
    /// A peer broke the protocol.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// A file could not be read or written.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// Too few clients became ready in time for a round.
    #[error("round {round}: only {ready} of the {needed} clients needed were ready after {waited_s} s")]
    NotEnoughClients {
        /// The round that could not start.
        round: u64,
        /// Clients ready.
        ready: usize,
        /// Clients needed.
        needed: usize,
        /// Seconds waited.
        waited_s: f64,
    },
    /// A round was tried too often without enough good updates or without a finite aggregate.
    #[error(
        "round {round} failed {attempts} times (too few good updates, or an aggregate that is not finite); stopping"
    )]
    RoundFailed {
        /// The round.
        round: u64,
        /// Tries made.
        attempts: u32,
    },
    /// A client's local training failed (the trainer's own error is the source).
    #[error("local training: {0}")]
    Local(#[source] Box<dyn std::error::Error + Send + Sync>),
}
