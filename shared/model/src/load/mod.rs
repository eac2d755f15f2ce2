//! Opening checkpoints: a Hugging Face directory (`config.json` + safetensors) or a GGUF file.
//!
//! Both formats are exposed as a [`TensorSource`] that serves tensors under their Hugging Face names, as f32 in
//! Hugging Face's shapes; [`Checkpoint::load_model`] then builds the model one tensor at a time, so peak memory is
//! the model plus one tensor being converted.

mod build;
mod gguf;
pub(crate) mod hf;
mod peak;
mod reader;

pub(crate) use build::{build_layers, transpose, FrozenSource};
pub use peak::peak_rss_bytes;
pub(crate) use reader::{bf16s as decode_bf16, f16s as decode_f16, f32s as decode_f32};

use std::fmt;
use std::path::{Path, PathBuf};

use burn::tensor::Device;

use crate::model::{LlamaConfig, LlamaForCausalLM, ModelError};
use crate::tokenizer::{Tokenizer, TokenizerError};

/// Errors while reading a checkpoint; each names the file and, where it applies, the tensor.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be opened or read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The file is truncated, corrupt or not in the expected format.
    #[error("{path}: malformed file: {reason}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// A tensor the architecture needs is absent.
    #[error("{path}: missing tensor `{tensor}`")]
    MissingTensor {
        /// The file (or directory) searched.
        path: PathBuf,
        /// Hugging Face name of the tensor.
        tensor: String,
    },
    /// A tensor's shape does not match the configuration.
    #[error("{path}: tensor `{tensor}` has shape {found:?}, expected {expected:?}")]
    Shape {
        /// The file.
        path: PathBuf,
        /// Hugging Face name of the tensor.
        tensor: String,
        /// Shape the configuration implies.
        expected: Vec<usize>,
        /// Shape stored in the file.
        found: Vec<usize>,
    },
    /// A tensor is stored in a type this reader does not decode.
    #[error("{path}: tensor `{tensor}` has unsupported type {dtype}")]
    UnsupportedType {
        /// The file.
        path: PathBuf,
        /// Name of the tensor in the file.
        tensor: String,
        /// The stored type.
        dtype: String,
    },
    /// The configuration in the file is invalid or describes an unsupported architecture.
    #[error("{path}: {source}")]
    Model {
        /// The file.
        path: PathBuf,
        /// What is wrong with the configuration.
        source: ModelError,
    },
    /// The tokenizer could not be built.
    #[error("{path}: {source}")]
    Tokenizer {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: TokenizerError,
    },
}

/// Description of one stored tensor, for `model info`.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// Hugging Face name.
    pub name: String,
    /// Storage type as the file names it (`F32`, `BF16`, `Q4_1`, ...).
    pub dtype: String,
    /// Hugging Face shape (slowest dimension first).
    pub shape: Vec<usize>,
    /// Bytes the tensor occupies in the file.
    pub bytes: usize,
}

/// A tensor decoded to f32 in Hugging Face's shape.
pub(crate) struct F32Tensor {
    pub data: Vec<f32>,
    pub shape: Vec<usize>,
}

/// Serves a checkpoint's tensors by Hugging Face name.
pub(crate) trait TensorSource {
    /// The file or directory, for error messages.
    fn path(&self) -> &Path;
    /// All tensors, with Hugging Face names.
    fn infos(&self) -> Vec<TensorInfo>;
    /// Whether a tensor of that name exists.
    fn contains(&self, name: &str) -> bool;
    /// Decodes one tensor to f32.
    fn read(&self, name: &str) -> Result<F32Tensor, LoadError>;
}

/// The on-disk format of a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Hugging Face directory with safetensors weights.
    HuggingFace,
    /// A single GGUF file.
    Gguf,
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::HuggingFace => "Hugging Face safetensors",
            Format::Gguf => "GGUF",
        })
    }
}

/// An opened checkpoint: its configuration, its tensors (not yet decoded) and what is needed for its tokenizer.
pub struct Checkpoint {
    config: LlamaConfig,
    format: Format,
    source: Box<dyn TensorSource>,
    tokenizer: TokenizerOrigin,
}

enum TokenizerOrigin {
    Built(Box<Tokenizer>),
    Missing(PathBuf),
    Failed(PathBuf, TokenizerError),
}

impl Checkpoint {
    /// Opens a Hugging Face directory or a `.gguf` file; reads headers and metadata only.
    pub fn open(path: &Path) -> Result<Self, LoadError> {
        if path.is_dir() {
            let (config, source) = hf::open(path)?;
            let tokenizer = match hf::tokenizer(path, &config) {
                Ok(Some(t)) => TokenizerOrigin::Built(Box::new(t)),
                Ok(None) => TokenizerOrigin::Missing(path.join("tokenizer.json")),
                Err(e) => TokenizerOrigin::Failed(path.join("tokenizer.json"), e),
            };
            Ok(Self {
                config,
                format: Format::HuggingFace,
                source: Box::new(source),
                tokenizer,
            })
        } else {
            let file = gguf::GgufSource::open(path)?;
            let config = file.config()?;
            let tokenizer = match file.tokenizer(&config) {
                Ok(t) => TokenizerOrigin::Built(Box::new(t)),
                Err(e) => TokenizerOrigin::Failed(path.to_path_buf(), e),
            };
            Ok(Self {
                config,
                format: Format::Gguf,
                source: Box::new(file),
                tokenizer,
            })
        }
    }

    /// The model's architecture.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// The checkpoint's format.
    pub fn format(&self) -> Format {
        self.format
    }

    /// Every stored tensor, by Hugging Face name.
    pub fn tensors(&self) -> Vec<TensorInfo> {
        self.source.infos()
    }

    /// Decodes the weights onto `device` and builds the model.
    pub fn load_model(&self, device: &Device) -> Result<LlamaForCausalLM, LoadError> {
        build::build_model(&self.config, self.source.as_ref(), device)
    }

    /// The tensors, by Hugging Face name.
    pub(crate) fn source(&self) -> &dyn TensorSource {
        self.source.as_ref()
    }

    /// SHA-256 (hex) of the checkpoint's content: the GGUF file, or `config.json` and the safetensors files of a
    /// directory in name order. Identifies the base model an emulator or adapter was made from.
    pub fn sha256(&self) -> Result<String, LoadError> {
        use sha2::Digest;
        let root = self.source.path();
        let files: Vec<PathBuf> = if root.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(root)
                .map_err(|source| LoadError::Io {
                    path: root.into(),
                    source,
                })?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n == "config.json" || n.ends_with(".safetensors"))
                })
                .collect();
            files.sort();
            files
        } else {
            vec![root.to_path_buf()]
        };
        let mut hasher = sha2::Sha256::new();
        for path in files {
            let mut f = std::fs::File::open(&path).map_err(|source| LoadError::Io {
                path: path.clone(),
                source,
            })?;
            std::io::copy(&mut f, &mut hasher).map_err(|source| LoadError::Io { path, source })?;
        }
        Ok(hex::encode(hasher.finalize()))
    }

    /// Decodes one stored tensor to f32 (fuzz builds only: so the fuzzer reaches every tensor's decoding, not only
    /// what a model of this architecture reads).
    #[cfg(fuzzing)]
    pub fn read_tensor(&self, name: &str) -> Result<Vec<f32>, LoadError> {
        self.source.read(name).map(|t| t.data)
    }

    /// The tokenizer (from `tokenizer.json` or from the GGUF metadata).
    pub fn tokenizer(&self) -> Result<Tokenizer, LoadError> {
        match &self.tokenizer {
            TokenizerOrigin::Built(t) => Ok(t.as_ref().clone()),
            TokenizerOrigin::Missing(path) => Err(LoadError::Tokenizer {
                path: path.clone(),
                source: TokenizerError::Build("the checkpoint has no tokenizer.json".into()),
            }),
            TokenizerOrigin::Failed(path, e) => Err(LoadError::Tokenizer {
                path: path.clone(),
                source: e.clone(),
            }),
        }
    }
}

/// Writes f32 tensors (name, values, shape) to a safetensors file tagged `format: pt`, as PyTorch writers do,
/// atomically (through `offsite_fed::write_tensors`).
pub fn write_f32_safetensors(path: &Path, tensors: Vec<(String, Vec<f32>, Vec<usize>)>) -> Result<(), String> {
    let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
        .into_iter()
        .map(|(n, d, s)| (n, offsite_fed::f32_bytes(&d), s))
        .collect();
    let views = bytes
        .iter()
        .map(|(n, b, s)| (n.clone(), safetensors::Dtype::F32, s.clone(), b.as_slice()))
        .collect();
    let metadata = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    offsite_fed::write_tensors(path, views, Some(metadata)).map_err(|e| e.to_string())
}

/// Reads every tensor of a safetensors file as f32 (f32/f16/bf16), by name.
pub(crate) fn read_f32_safetensors(path: &Path) -> Result<Vec<(String, F32Tensor)>, LoadError> {
    let shard = hf::Shard::open(path.to_path_buf())?;
    shard
        .infos()
        .into_iter()
        .map(|i| Ok((i.name.clone(), shard.read_f32(&i.name)?)))
        .collect()
}
