//! Federation: what the server and the edge clients do with the wire protocol. Pure parts (named tensors,
//! aggregation strategies, data splits) import no tokio/quinn/burn; `model_state` and `local` bridge to burn
//! (adapter state in and out of a model, one round of local training).

mod config;
mod local;
mod model_state;
pub mod params;
mod round;
mod state;
mod strategy;
mod tokens;

pub use config::{FederationConfig, LocalConfig};
pub use local::{train_round, RoundResult};
pub use model_state::{adapter_state, load_state};
pub use params::{Params, Tensor};
pub use round::{sample_clients, validate};
pub use state::{write_atomic, ClientRecord, ServerState, STATE_FILE};
pub use strategy::{ClientUpdate, FedOptConfig, Strategy, StrategyConfig};
pub use tokens::{TokenEntry, TokenStore};

use std::path::PathBuf;

use crate::adapters::AdapterError;
use crate::emulator::EmulatorError;
use crate::protocol::ProtocolError;
use crate::train::TrainError;

/// Errors of federation.
#[derive(Debug, thiserror::Error)]
pub enum FedError {
    /// A federation setting is invalid.
    #[error("federation config: {0}")]
    Config(String),
    /// Tensors do not match the global adapter (names or shapes).
    #[error("adapter state mismatch: {0}")]
    Shape(String),
    /// The peer broke the protocol.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// Local training failed.
    #[error(transparent)]
    Train(#[from] TrainError),
    /// An adapter could not be prepared or applied.
    #[error(transparent)]
    Adapter(#[from] AdapterError),
    /// The emulator could not be read.
    #[error(transparent)]
    Emulator(#[from] EmulatorError),
    /// A file could not be read or written.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The connection failed or closed (reconnecting may help).
    #[error("connection: {0}")]
    Connection(String),
    /// The server refused this client (bad or revoked token, wrong version); reconnecting will not help.
    #[error("refused by the server: {0}")]
    Refused(String),
}
