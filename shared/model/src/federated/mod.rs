//! The model side of federation: adapter state in and out of a burn model by name, one round of local training
//! (FedProx when μ > 0), and [`EmulatorTrainer`], the edge client's `offsite_fed::LocalTrainer` on an emulator.

mod local;
mod model_state;
mod trainer;

pub use local::train_round;
pub use model_state::{adapter_state, load_state, plug_state};
pub use trainer::{EmulatorTrainer, LocalData};

use crate::adapters::AdapterError;
use crate::emulator::EmulatorError;
use crate::train::TrainError;

/// Errors of the model side of federation.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// Tensors do not fit the model (names or shapes).
    #[error("adapter state mismatch: {0}")]
    Shape(String),
    /// The task or the local data cannot be trained on.
    #[error("{0}")]
    Config(String),
    /// Local training failed.
    #[error(transparent)]
    Train(#[from] TrainError),
    /// An adapter could not be prepared or applied.
    #[error(transparent)]
    Adapter(#[from] AdapterError),
    /// The emulator could not be read.
    #[error(transparent)]
    Emulator(#[from] EmulatorError),
}

impl From<LocalError> for offsite_fed::FedError {
    fn from(e: LocalError) -> Self {
        match e {
            LocalError::Shape(s) => offsite_fed::FedError::Shape(s),
            e => offsite_fed::FedError::Local(Box::new(e)),
        }
    }
}
