//! The emulator file: one safetensors file whose header metadata holds a JSON manifest and a SHA-256 over the
//! manifest and every tensor. Tensors use Hugging Face names and PyTorch layouts; a frozen int8 projection is
//! `{module}.weight` (I8, `[out, in]`) plus `{module}.weight_scale` (`[out]`, F32 or F16); quantized embeddings are `model.embed_tokens.weight` (I8,
//! `[vocab, hidden]`, one scale per vocabulary row) plus its `_scale`. No code, ever.

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::Dtype;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::EmulatorError;
use crate::quant::{QuantFormat, ScaleDType};

/// Value of the `format` metadata key.
pub(crate) const FORMAT: &str = "offsite-emulator";
/// Manifest version this build writes; it also reads version 1 (before `quantize_embeddings`).
pub const MANIFEST_VERSION: u32 = 2;

/// What an emulator is: where it came from, which layers it holds and how they are stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmulatorManifest {
    /// Format version ([`MANIFEST_VERSION`]).
    pub format_version: u32,
    /// The full model's name (its file or directory name) as the operator gave it.
    pub base_model: String,
    /// SHA-256 of the full model's content (see `Checkpoint::sha256`).
    pub base_model_sha256: String,
    /// The full model's Hugging Face `config.json`.
    pub config: serde_json::Value,
    /// Full-model indices of the layers this emulator holds, ascending.
    pub layers: Vec<usize>,
    /// The trainable adapter layers (bottom and top), a subset of `layers`.
    pub adapter_layers: Vec<usize>,
    /// Fraction of the middle layers dropped.
    pub drop_ratio: f64,
    /// Storage of the frozen middle's projections.
    pub quant: QuantFormat,
    /// Precision of int8 scales.
    pub scale_dtype: ScaleDType,
    /// Whether the token embeddings and the LM head are stored in `quant` too (absent in version 1: false).
    #[serde(default)]
    pub quantize_embeddings: bool,
    /// Whether the kept middle was distilled against the full model.
    pub distilled: bool,
    /// The tokenizer, as Hugging Face's `tokenizer.json`.
    pub tokenizer: Option<String>,
    /// Hugging Face `tokenizer_config.json` (chat template, special tokens).
    pub tokenizer_config: Option<serde_json::Value>,
}

/// One tensor to write.
pub(crate) struct Entry {
    pub(crate) name: String,
    pub(crate) dtype: Dtype,
    pub(crate) shape: Vec<usize>,
    pub(crate) bytes: Vec<u8>,
}

/// SHA-256 over the manifest text and, in name order, each tensor's name, dtype, shape and bytes.
pub(crate) fn content_hash<'a>(
    manifest_json: &str,
    tensors: impl IntoIterator<Item = (&'a str, Dtype, &'a [usize], &'a [u8])>,
) -> String {
    let mut sorted: Vec<_> = tensors.into_iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    let mut h = Sha256::new();
    h.update((manifest_json.len() as u64).to_le_bytes());
    h.update(manifest_json.as_bytes());
    for (name, dtype, shape, bytes) in sorted {
        h.update((name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update(format!("{dtype:?}").as_bytes());
        h.update((shape.len() as u64).to_le_bytes());
        for d in shape {
            h.update((*d as u64).to_le_bytes());
        }
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    }
    hex::encode(h.finalize())
}

/// Writes the emulator; returns its content hash.
pub(crate) fn write(path: &Path, manifest: &EmulatorManifest, entries: &[Entry]) -> Result<String, EmulatorError> {
    let json = serde_json::to_string(manifest).map_err(|e| EmulatorError::File {
        path: path.into(),
        reason: format!("manifest: {e}"),
    })?;
    let sha = content_hash(
        &json,
        entries
            .iter()
            .map(|e| (e.name.as_str(), e.dtype, e.shape.as_slice(), e.bytes.as_slice())),
    );
    let metadata = HashMap::from([
        ("format".to_string(), FORMAT.to_string()),
        ("manifest".to_string(), json),
        ("sha256".to_string(), sha.clone()),
    ]);
    let tensors = entries
        .iter()
        .map(|e| (e.name.clone(), e.dtype, e.shape.clone(), e.bytes.as_slice()))
        .collect();
    offsite_fed::write_tensors(path, tensors, Some(metadata)).map_err(|e| EmulatorError::File {
        path: path.into(),
        reason: e.to_string(),
    })?;
    Ok(sha)
}
