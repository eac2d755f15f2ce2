//! Parameter-efficient adapters attached to the model by module name. LoRA so far, in Hugging Face PEFT's own file
//! layout so adapters move between Offsite and peft both ways.

mod lora;

pub use lora::{export_peft, import_peft, LoraConfig, TargetModules};

/// Errors about adapters: their configuration, their files, or a mismatch with the model.
#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    /// The adapter configuration is malformed or asks for something not implemented.
    #[error("adapter config: {0}")]
    Config(String),
    /// An adapter file could not be read or written.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: std::path::PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The adapter does not fit the model (unknown module, wrong shape).
    #[error("adapter does not fit the model: {0}")]
    Mismatch(String),
}
