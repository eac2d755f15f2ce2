//! Offsite adapters: what an edge client trains on an emulator and the server plugs back into the full model, by
//! Hugging Face parameter name. Two methods: the emulator's adapter layers trained in full (`layers`), or LoRA inside
//! those layers only (`lora`, written in PEFT's own layout with `layers_to_transform`).

use std::collections::HashMap;
use std::path::Path;

use burn::tensor::{Tensor, TensorData};
use serde::{Deserialize, Serialize};

use super::{export_peft, import_peft, AdapterError, LoraConfig};
use crate::load::{read_f32_safetensors, transpose, write_f32_safetensors};
use crate::model::LlamaForCausalLM;

/// The manifest file of an Offsite adapter directory.
pub const MANIFEST_FILE: &str = "offsite_adapter.json";
/// The tensors of a `layers` adapter (Hugging Face names and layouts, f32).
const TENSORS_FILE: &str = "adapter_model.safetensors";

/// What is trained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Every parameter of the adapter layers.
    Layers,
    /// LoRA on the adapter layers' projections; the layers themselves stay frozen.
    Lora,
}

/// The `[adapter]` table of a training config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdapterSpec {
    /// What is trained.
    pub method: Method,
    /// LoRA settings (required for `lora`; `layers_to_transform` is set to the adapter layers).
    #[serde(default)]
    pub lora: Option<LoraConfig>,
}

/// `offsite_adapter.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdapterManifest {
    /// Format version (1).
    pub format_version: u32,
    /// What was trained.
    pub method: Method,
    /// SHA-256 of the full model the emulator came from.
    pub base_model_sha256: String,
    /// SHA-256 of the emulator it was trained on.
    pub emulator_sha256: Option<String>,
    /// The adapter layers (full-model indices).
    pub layers: Vec<usize>,
}

impl AdapterManifest {
    /// The manifest of a `method` adapter trained on `emulator` (its adapter layers, its and its base model's hashes).
    pub fn for_emulator(method: Method, emulator: &crate::emulator::Emulator) -> Self {
        AdapterManifest {
            format_version: 1,
            method,
            base_model_sha256: emulator.manifest().base_model_sha256.clone(),
            emulator_sha256: Some(emulator.sha256().to_string()),
            layers: emulator.manifest().adapter_layers.clone(),
        }
    }
}

/// Whether a parameter is stored transposed in the module tree (linear and LoRA matrices are `[in, out]`; the
/// embedding table is not).
fn stored_transposed(name: &str, shape: &[usize]) -> bool {
    shape.len() == 2 && name != "model.embed_tokens.weight"
}

/// `model.layers.{i}.…` → `i`.
fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("model.layers.")?.split_once('.')?.0.parse().ok()
}

impl AdapterSpec {
    /// Marks what trains in `model` (an emulator or a full model on an autodiff device): the parameters of
    /// `layers`, or fresh LoRA branches on their projections. Returns the LoRA config actually used.
    pub fn prepare(
        &self,
        mut model: LlamaForCausalLM,
        layers: &[usize],
    ) -> Result<(LlamaForCausalLM, Option<LoraConfig>), AdapterError> {
        let lora = match self.method {
            Method::Layers => None,
            Method::Lora => {
                let mut lora = self.lora.clone().ok_or_else(|| {
                    AdapterError::Config("method `lora` needs an [adapter.lora] table".into())
                })?;
                lora.layers_to_transform = Some(layers.to_vec());
                lora.attach(&mut model)?;
                Some(lora)
            }
        };
        Ok((self.mark_trainable(model, layers), lora))
    }

    /// As [`AdapterSpec::prepare`], then loads the values an earlier run saved to `dir` (to resume it).
    pub fn resume(
        &self,
        model: LlamaForCausalLM,
        layers: &[usize],
        dir: &Path,
    ) -> Result<(LlamaForCausalLM, Option<LoraConfig>), AdapterError> {
        let saved = read_manifest(dir)?.ok_or_else(|| AdapterError::File {
            path: dir.join(MANIFEST_FILE),
            reason: "missing: not an Offsite adapter directory".into(),
        })?;
        if saved.method != self.method || saved.layers != layers {
            return Err(AdapterError::Mismatch(format!(
                "{} holds a `{:?}` adapter of layers {:?}, this run trains `{:?}` on {layers:?}",
                dir.display(),
                saved.method,
                saved.layers,
                self.method
            )));
        }
        let (model, lora) = self.prepare(model, layers)?;
        // Loading LoRA re-creates its branches, so what trains is marked again.
        let model = apply(model, dir)?;
        Ok((self.mark_trainable(model, layers), lora))
    }

    fn mark_trainable(&self, model: LlamaForCausalLM, layers: &[usize]) -> LlamaForCausalLM {
        match self.method {
            Method::Layers => {
                model.with_trainable(&|n: &str| layer_of(n).is_some_and(|i| layers.contains(&i)))
            }
            Method::Lora => model.with_trainable(&|n: &str| n.contains(".lora_a") || n.contains(".lora_b")),
        }
    }
}

/// Writes the trained adapter to `dir`: for `layers`, the parameters of the adapter layers in Hugging Face layout;
/// for `lora`, a PEFT directory. Plus `offsite_adapter.json`.
pub fn save(
    dir: &Path,
    model: &LlamaForCausalLM,
    manifest: &AdapterManifest,
    lora: Option<&LoraConfig>,
) -> Result<(), AdapterError> {
    let err = |path: &Path, reason: String| AdapterError::File {
        path: path.into(),
        reason,
    };
    std::fs::create_dir_all(dir).map_err(|e| err(dir, e.to_string()))?;
    match (manifest.method, lora) {
        (Method::Lora, Some(config)) => export_peft(model, config, None, dir)?,
        (Method::Lora, None) => {
            return Err(AdapterError::Config("a LoRA adapter needs its config".into()))
        }
        (Method::Layers, _) => {
            let mut tensors = Vec::new();
            for p in model.named_params() {
                if !layer_of(&p.name).is_some_and(|i| manifest.layers.contains(&i)) {
                    continue;
                }
                let data: Vec<f32> = p
                    .value
                    .into_data()
                    .convert::<f32>()
                    .try_into_vec()
                    .map_err(|e| err(dir, format!("{}: {e:?}", p.name)))?;
                let (data, shape) = if stored_transposed(&p.name, &p.shape) {
                    let (r, c) = (p.shape[0], p.shape[1]);
                    (transpose(&data, r, c), vec![c, r])
                } else {
                    (data, p.shape)
                };
                tensors.push((p.name, data, shape));
            }
            if tensors.is_empty() {
                return Err(AdapterError::Mismatch(format!(
                    "the model holds none of the adapter layers {:?}",
                    manifest.layers
                )));
            }
            let path = dir.join(TENSORS_FILE);
            write_f32_safetensors(&path, tensors).map_err(|e| err(&path, e))?;
        }
    }
    let path = dir.join(MANIFEST_FILE);
    let json = serde_json::to_string_pretty(manifest).map_err(|e| err(&path, e.to_string()))?;
    std::fs::write(&path, json).map_err(|e| err(&path, e.to_string()))
}

/// Reads an adapter directory's manifest, when it is an Offsite adapter.
pub fn read_manifest(dir: &Path) -> Result<Option<AdapterManifest>, AdapterError> {
    let path = dir.join(MANIFEST_FILE);
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(|e| AdapterError::File {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    let m: AdapterManifest = serde_json::from_str(&text).map_err(|e| AdapterError::File {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    if m.format_version != 1 {
        return Err(AdapterError::File {
            path,
            reason: format!("format_version {} (this build reads 1)", m.format_version),
        });
    }
    Ok(Some(m))
}

/// Plugs an adapter directory into `model` by parameter name: an Offsite `layers` adapter replaces the adapter
/// layers' parameters; an Offsite `lora` adapter or any PEFT LoRA directory attaches its branches. Every tensor must
/// name a parameter of the model with the right shape.
pub fn apply(model: LlamaForCausalLM, dir: &Path) -> Result<LlamaForCausalLM, AdapterError> {
    let manifest = read_manifest(dir)?;
    if manifest.as_ref().is_none_or(|m| m.method == Method::Lora) {
        let mut model = model;
        import_peft(&mut model, dir)?;
        return Ok(model);
    }
    let path = dir.join(TENSORS_FILE);
    let tensors = read_f32_safetensors(&path).map_err(|e| AdapterError::File {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    let shapes: HashMap<String, Vec<usize>> = model
        .named_params()
        .into_iter()
        .map(|p| (p.name, p.shape))
        .collect();
    let device = model.device();
    let mut values = HashMap::with_capacity(tensors.len());
    for (name, data) in tensors {
        let shape = shapes.get(&name).ok_or_else(|| {
            AdapterError::Mismatch(format!("`{name}` is not a parameter of the model"))
        })?;
        let n: usize = shape.iter().product();
        if data.len() != n {
            return Err(AdapterError::Mismatch(format!(
                "`{name}` holds {} values, the model's parameter {shape:?} has {n}",
                data.len()
            )));
        }
        let data = if stored_transposed(&name, shape) {
            transpose(&data, shape[1], shape[0])
        } else {
            data
        };
        values.insert(name, Tensor::<1>::from_data(TensorData::new(data, [n]), &device));
    }
    let model = model.replace_params(&mut values);
    match values.keys().next() {
        Some(left) => Err(AdapterError::Mismatch(format!("`{left}` could not be applied"))),
        None => Ok(model),
    }
}
