//! Parameter-efficient adapters attached to the model by module name. LoRA in Hugging Face PEFT's own file layout (so
//! adapters move between Offsite and peft both ways) and Offsite's adapter layers, plugged in by name.

mod lora;
mod offsite;
mod prompt;

pub use lora::{export_peft, import_peft, LoraConfig, TargetModules};
pub use offsite::{apply, read_manifest, save, AdapterManifest, AdapterSpec, Method, MANIFEST_FILE};
pub use prompt::{export_peft_prompt, PromptConfig};

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
