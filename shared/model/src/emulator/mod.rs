//! Offsite-tuning emulators: the operator's model with its middle compressed. The bottom and top decoder layers stay
//! as trainable adapter layers; a uniform subset of the middle is kept, frozen and quantized; the rest is dropped and
//! never written. [`build`] makes one from a checkpoint, [`Emulator::open`] reads and verifies one.

mod config;
mod distill;
mod file;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::module::{Param, ParamId};
use burn::tensor::{DType, Device, Tensor, TensorCreationOptions, TensorData};
use safetensors::tensor::Dtype;

pub use config::EmulatorConfig;
pub use distill::{distill, DistillCheckpoint, DistillConfig, DistillStep, DistilledLayers, KdAt, KdNorm};
pub use file::{EmulatorManifest, MANIFEST_VERSION};

use file::Entry;

use crate::load::{build_layers, hf::Shard, Checkpoint, F32Tensor, FrozenSource, LoadError, TensorInfo, TensorSource};
use crate::model::{layer_of, Int8Weight, LinearWeight, LlamaConfig, LlamaForCausalLM};
use crate::quant::{quantize_int8, Int8Matrix, QuantFormat, ScaleDType};
use crate::tokenizer::Tokenizer;

/// Errors about emulators: their settings, their files, or their integrity.
#[derive(Debug, thiserror::Error)]
pub enum EmulatorError {
    /// The emulator settings are invalid (the message names the key).
    #[error("emulator config: {0}")]
    Config(String),
    /// The file is not a readable emulator of this version.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The content does not match the SHA-256 recorded in the file.
    #[error("{path}: content SHA-256 is {found}, the file says {expected}: the file is corrupt or was altered")]
    Integrity {
        /// The file.
        path: PathBuf,
        /// Recorded hash.
        expected: String,
        /// Computed hash.
        found: String,
    },
    /// Reading the base model or a tensor failed.
    #[error(transparent)]
    Load(#[from] LoadError),
}

/// Whether a tensor is a middle-layer projection weight (quantized in the emulator).
fn is_projection(name: &str, shape: &[usize]) -> bool {
    shape.len() == 2 && name.ends_with("_proj.weight")
}

fn f32_entry(name: String, t: F32Tensor) -> Entry {
    Entry {
        name,
        dtype: Dtype::F32,
        shape: t.shape,
        bytes: bytemuck::cast_slice(&t.data).to_vec(),
    }
}

/// Builds an emulator of `checkpoint` into `out`; `progress(done, total)` is called per tensor. Returns the manifest
/// and the content hash.
pub fn build(
    checkpoint: &Checkpoint,
    base_model: &str,
    config: &EmulatorConfig,
    out: &Path,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(EmulatorManifest, String), EmulatorError> {
    write(checkpoint, base_model, config, &mut HashMap::new(), out, progress)
}

/// As [`build`], with the middle layers [`distill`] trained in place of the full model's (the manifest records
/// `distilled`). Every distilled tensor must be one the emulator keeps.
pub fn build_distilled(
    checkpoint: &Checkpoint,
    base_model: &str,
    config: &EmulatorConfig,
    distilled: DistilledLayers,
    out: &Path,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(EmulatorManifest, String), EmulatorError> {
    let mut tensors = distilled.0;
    if tensors.is_empty() {
        return Err(EmulatorError::Config("no distilled tensor".into()));
    }
    write(checkpoint, base_model, config, &mut tensors, out, progress)
}

fn write(
    checkpoint: &Checkpoint,
    base_model: &str,
    config: &EmulatorConfig,
    replaced: &mut HashMap<String, F32Tensor>,
    out: &Path,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(EmulatorManifest, String), EmulatorError> {
    let distilled = !replaced.is_empty();
    let full = checkpoint.config();
    let layers = config.choose_layers(full.num_hidden_layers)?;
    let adapter_layers: Vec<usize> = (0..config.bottom_layers)
        .chain(full.num_hidden_layers - config.top_layers..full.num_hidden_layers)
        .collect();
    let source = checkpoint.source();
    let wanted: Vec<TensorInfo> = source
        .infos()
        .into_iter()
        .filter(|t| match layer_of(&t.name) {
            Some(i) => layers.contains(&i),
            None => matches!(
                t.name.as_str(),
                "model.embed_tokens.weight" | "model.norm.weight" | "lm_head.weight"
            ),
        })
        .collect();
    let mut entries = Vec::with_capacity(wanted.len() * 2);
    for (done, info) in wanted.iter().enumerate() {
        let t = match replaced.remove(&info.name) {
            Some(t) if t.shape == info.shape => t,
            Some(t) => {
                return Err(EmulatorError::Config(format!(
                    "distilled `{}` has shape {:?}, the model's is {:?}",
                    info.name, t.shape, info.shape
                )))
            }
            None => source.read(&info.name)?,
        };
        let frozen = match layer_of(&info.name) {
            Some(i) => !adapter_layers.contains(&i) && is_projection(&info.name, &t.shape),
            None => config.quantize_embeddings && info.name != "model.norm.weight",
        };
        if frozen {
            entries.extend(quantized_entries(&info.name, t, config));
        } else {
            entries.push(f32_entry(info.name.clone(), t));
        }
        progress(done + 1, wanted.len());
    }
    let tokenizer = checkpoint.tokenizer().ok();
    let manifest = EmulatorManifest {
        format_version: MANIFEST_VERSION,
        base_model: base_model.to_string(),
        base_model_sha256: checkpoint.sha256()?,
        config: crate::export::hf_config_json(full).map_err(|e| EmulatorError::Config(e.to_string()))?,
        layers,
        adapter_layers,
        drop_ratio: config.drop_ratio,
        quant: config.quant,
        scale_dtype: config.scale_dtype,
        quantize_embeddings: config.quantize_embeddings && config.quant != QuantFormat::F32,
        distilled,
        tokenizer: tokenizer.as_ref().and_then(|t| t.to_json().ok()),
        tokenizer_config: tokenizer.as_ref().map(Tokenizer::tokenizer_config_json),
    };
    if let Some(name) = replaced.keys().next() {
        return Err(EmulatorError::Config(format!(
            "distilled `{name}` is not a tensor the emulator keeps"
        )));
    }
    let sha = file::write(out, &manifest, &entries)?;
    Ok((manifest, sha))
}

/// A frozen projection in the configured storage.
fn quantized_entries(name: &str, t: F32Tensor, config: &EmulatorConfig) -> Vec<Entry> {
    let (out, inp) = (t.shape[0], t.shape[1]);
    match config.quant {
        QuantFormat::F32 => vec![f32_entry(name.to_string(), t)],
        QuantFormat::F16 => vec![Entry {
            name: name.to_string(),
            dtype: Dtype::F16,
            shape: t.shape,
            bytes: t
                .data
                .iter()
                .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
                .collect(),
        }],
        QuantFormat::Int8 => {
            let m = quantize_int8(&t.data, out, inp, config.scale_dtype);
            let scale = match config.scale_dtype {
                ScaleDType::F32 => (Dtype::F32, bytemuck::cast_slice(&m.scale).to_vec()),
                ScaleDType::F16 => (
                    Dtype::F16,
                    m.scale
                        .iter()
                        .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
                        .collect(),
                ),
            };
            vec![
                Entry {
                    name: name.to_string(),
                    dtype: Dtype::I8,
                    shape: vec![out, inp],
                    bytes: bytemuck::cast_slice(&m.q).to_vec(),
                },
                Entry {
                    name: format!("{name}_scale"),
                    dtype: scale.0,
                    shape: vec![out],
                    bytes: scale.1,
                },
            ]
        }
    }
}

/// An opened, verified emulator file.
pub struct Emulator {
    shard: Shard,
    manifest: EmulatorManifest,
    config: LlamaConfig,
    sha256: String,
}

impl Emulator {
    /// Opens `path`, checks its manifest and verifies its content hash.
    pub fn open(path: &Path) -> Result<Self, EmulatorError> {
        let bad = |reason: String| EmulatorError::File {
            path: path.into(),
            reason,
        };
        let shard = Shard::open(path.to_path_buf())?;
        let meta = shard.metadata.metadata().clone().unwrap_or_default();
        if meta.get("format").map(String::as_str) != Some(file::FORMAT) {
            return Err(bad(format!(
                "not an Offsite emulator (metadata `format` is {:?}, expected `{}`)",
                meta.get("format"),
                file::FORMAT
            )));
        }
        let json = meta
            .get("manifest")
            .ok_or_else(|| bad("no `manifest` in the metadata".into()))?;
        let version: Option<u64> = serde_json::from_str::<serde_json::Value>(json)
            .ok()
            .and_then(|v| v.get("format_version")?.as_u64());
        if !version.is_some_and(|v| (1..=MANIFEST_VERSION as u64).contains(&v)) {
            return Err(bad(format!(
                "manifest format_version {version:?}; this build reads versions 1 to {MANIFEST_VERSION}"
            )));
        }
        let manifest: EmulatorManifest = serde_json::from_str(json).map_err(|e| bad(format!("manifest: {e}")))?;
        let expected = meta
            .get("sha256")
            .ok_or_else(|| bad("no `sha256` in the metadata".into()))?;
        let names: Vec<String> = shard.metadata.tensors().keys().cloned().collect();
        let mut raws = Vec::with_capacity(names.len());
        for name in &names {
            if let Some(i) = layer_of(name) {
                if !manifest.layers.contains(&i) {
                    return Err(bad(format!(
                        "tensor `{name}` belongs to layer {i}, which the manifest does not list"
                    )));
                }
            }
            let (dtype, shape, bytes) = shard.raw(name)?;
            raws.push((name.as_str(), dtype, shape, bytes));
        }
        let found = file::content_hash(json, raws);
        // Fuzz builds go on past a wrong hash: a hostile server can send a file whose hash matches, so what
        // follows must hold against any content.
        if &found != expected && !cfg!(fuzzing) {
            return Err(EmulatorError::Integrity {
                path: path.into(),
                expected: expected.clone(),
                found,
            });
        }
        let config = LlamaConfig::from_hf_json(&manifest.config.to_string())
            .map_err(|e| bad(format!("manifest config: {e}")))?;
        let ascending = manifest.layers.windows(2).all(|w| w[0] < w[1]);
        if !ascending || manifest.layers.iter().any(|&i| i >= config.num_hidden_layers) {
            return Err(bad(format!(
                "layers {:?} must be ascending and below the model's {}",
                manifest.layers, config.num_hidden_layers
            )));
        }
        if let Some(i) = manifest.adapter_layers.iter().find(|i| !manifest.layers.contains(i)) {
            return Err(bad(format!("adapter layer {i} is not among the layers")));
        }
        Ok(Self {
            shard,
            manifest,
            config,
            sha256: expected.clone(),
        })
    }

    /// The manifest.
    pub fn manifest(&self) -> &EmulatorManifest {
        &self.manifest
    }

    /// The content hash (identifies the emulator; clients cache by it).
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// The full model's architecture.
    pub fn full_config(&self) -> &LlamaConfig {
        &self.config
    }

    /// The tokenizer carried in the manifest.
    pub fn tokenizer(&self) -> Result<Tokenizer, EmulatorError> {
        let json = self.manifest.tokenizer.as_deref().ok_or_else(|| EmulatorError::File {
            path: self.shard.path.clone(),
            reason: "the emulator carries no tokenizer".into(),
        })?;
        Tokenizer::from_hf(json, self.manifest.tokenizer_config.as_ref(), &self.config).map_err(|e| {
            EmulatorError::File {
                path: self.shard.path.clone(),
                reason: e.to_string(),
            }
        })
    }

    /// Whether a parameter (Hugging Face name) belongs to a trainable adapter layer.
    pub fn is_adapter_param(&self, name: &str) -> bool {
        layer_of(name).is_some_and(|i| self.manifest.adapter_layers.contains(&i))
    }

    /// Builds the emulator model on `device`: adapter layers and norms in f32, the frozen middle (and the embeddings
    /// and LM head, when `quantize_embeddings`) in its stored precision. Every parameter starts frozen; the trainer
    /// chooses what trains.
    pub fn load_model(&self, device: &Device) -> Result<LlamaForCausalLM, EmulatorError> {
        let model = build_layers(&self.config, &self.manifest.layers, self, Some(self), device)?;
        Ok(model.with_trainable(&|_| false))
    }
}

impl TensorSource for Emulator {
    fn path(&self) -> &Path {
        &self.shard.path
    }

    fn infos(&self) -> Vec<TensorInfo> {
        self.shard.infos()
    }

    fn contains(&self, name: &str) -> bool {
        self.shard.metadata.info(name).is_some()
    }

    fn read(&self, name: &str) -> Result<F32Tensor, LoadError> {
        self.shard.read_f32(name)
    }
}

impl FrozenSource for Emulator {
    fn frozen(&self, prefix: &str, out: usize, inp: usize, device: &Device) -> Result<Option<LinearWeight>, LoadError> {
        let name = format!("{prefix}.weight");
        let (dtype, shape, bytes) = self.shard.raw(&name)?;
        if dtype == Dtype::F32 {
            return Ok(None);
        }
        if shape != [out, inp] {
            return Err(LoadError::Shape {
                path: self.shard.path.clone(),
                tensor: name,
                expected: vec![out, inp],
                found: shape.to_vec(),
            });
        }
        let frozen = |t| Param::initialized(ParamId::new(), t);
        match dtype {
            Dtype::I8 => {
                let scale = self.shard.read_f32(&format!("{name}_scale"))?;
                if scale.shape != [out] {
                    return Err(LoadError::Shape {
                        path: self.shard.path.clone(),
                        tensor: format!("{name}_scale"),
                        expected: vec![out],
                        found: scale.shape,
                    });
                }
                let m = Int8Matrix {
                    q: bytemuck::cast_slice(bytes).to_vec(),
                    scale: scale.data,
                    out,
                    inp,
                };
                let (q, scale) = m.to_tensors(device);
                Ok(Some(LinearWeight::Int8(Int8Weight {
                    q: frozen(q),
                    scale: Param::initialized(ParamId::new(), scale),
                    in_features: inp,
                })))
            }
            Dtype::F16 => {
                let mut t = vec![half::f16::ZERO; out * inp];
                for (o, row) in bytes.chunks_exact(2 * inp).enumerate() {
                    for (i, b) in row.chunks_exact(2).enumerate() {
                        t[i * out + o] = half::f16::from_le_bytes([b[0], b[1]]);
                    }
                }
                let w = Tensor::<2>::from_data(
                    TensorData::new(t, [inp, out]),
                    TensorCreationOptions::new(device.clone()).with_dtype(DType::F16),
                );
                Ok(Some(LinearWeight::F16(Param::initialized(ParamId::new(), w))))
            }
            other => Err(LoadError::UnsupportedType {
                path: self.shard.path.clone(),
                tensor: name,
                dtype: format!("{other:?}"),
            }),
        }
    }
}
