//! Training: the causal language-modelling loss, AdamW with a warmup + cosine schedule, the local training loop and
//! evaluation (loss, perplexity; ROUGE-L and exact match of generated text).

mod answer;
mod eval;
mod job;
mod loss;
mod optim;
mod rouge;
mod scaler;
mod trainer;
mod xent;

use std::path::PathBuf;

pub use answer::{exact_match, final_number};
pub use eval::{evaluate, EvalReport};
pub use job::TrainJob;
pub use loss::{causal_lm_loss, IGNORE_INDEX};
pub use offsite_protocol::{AdamWConfig, Precision, TrainConfig};
pub use optim::{AdamW, Moments, Schedule};
pub use rouge::rouge_l;
pub use trainer::{Objective, StepReport, Trainer};

use crate::model::ModelError;

/// Errors while training or evaluating.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The settings are invalid.
    #[error("training config: {0}")]
    Config(String),
    /// Too many consecutive steps had a non-finite loss or gradient.
    #[error("{steps} steps in a row had a non-finite loss or gradient (last: step {last_step}); stopping")]
    NonFinite {
        /// Consecutive non-finite steps.
        steps: usize,
        /// The last of them.
        last_step: usize,
    },
    /// The device failed to run a computation (a kernel did not compile or launch, the device was lost).
    #[error("the device failed: {0}")]
    Device(String),
    /// The model rejected its inputs.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A checkpoint file could not be read or written.
    #[error("{path}: {reason}")]
    File {
        /// The file or directory.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
}
