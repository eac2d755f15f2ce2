//! The edge client's side of a round, as a trait: the network layer (`offsite-net`) hands a local trainer the
//! verified emulator and each task's global state and uploads what it returns, so it never touches burn; the
//! trainer (in `offsite`, on burn) never touches a socket.

use std::path::Path;

use offsite_protocol::TrainConfig;

use super::params::Params;
use super::FedError;

/// One round's work, as the network layer hands it over.
#[derive(Debug, Clone, Copy)]
pub struct LocalTask<'a> {
    /// The round (from 1).
    pub round: u64,
    /// The emulator file, in the client's cache, its SHA-256 checked against the server's offer.
    pub emulator: &'a Path,
    /// What to train: the server's `[adapter]` table as JSON (data, to be checked field by field; never code).
    pub adapter: &'a str,
    /// The global adapter state to start from.
    pub global: &'a Params,
    /// How to train.
    pub settings: &'a TrainConfig,
    /// FedProx proximal weight μ (0 = plain local training).
    pub proximal_mu: f64,
}

/// What a round of local training produced.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalOutcome {
    /// Local minus global, with the global state's names and shapes.
    pub delta: Params,
    /// Training examples the client holds (the FedAvg weight it claims).
    pub num_examples: u64,
    /// Mean training loss over the applied steps.
    pub train_loss: f64,
    /// Steps applied (skipped non-finite steps excluded).
    pub steps: u32,
}

/// Trains one round on the client's private data. Called from a blocking thread, one task at a time; it may keep
/// its model between rounds (the emulator path tells when it changed).
pub trait LocalTrainer: Send {
    /// Trains from `task.global` as `task.settings` say. Failures are [`FedError::Local`] (the source kept) or a
    /// [`FedError::Shape`] when the task does not fit the model.
    fn train(&mut self, task: &LocalTask<'_>) -> Result<LocalOutcome, FedError>;
}
