//! Offsite adapters: what an edge client trains on an emulator and the server plugs back into the full model, by
//! Hugging Face parameter name. The emulator's adapter layers trained in full (`layers`), LoRA inside those layers
//! only (`lora`, written in PEFT's own layout with `layers_to_transform`), or a prompt encoder (`prompt_tuning`,
//! `p_tuning`, `prefix_tuning`; prefixes on the adapter layers) with everything else frozen.

use std::collections::HashMap;
use std::path::Path;

use burn::tensor::{Tensor, TensorData};
use serde::{Deserialize, Serialize};

use super::prompt::{import_peft_prompt, PromptConfig};
use super::{export_peft, import_peft, AdapterError, LoraConfig};
use crate::load::{read_f32_safetensors, transpose, write_f32_safetensors};
use crate::model::{layer_of, Linear, LlamaForCausalLM, PromptEncoder, PromptKind};
use crate::tokenizer::Tokenizer;

/// The manifest file of an Offsite adapter directory.
pub const MANIFEST_FILE: &str = "offsite_adapter.json";
/// The tensors of a `layers` adapter (Hugging Face names and layouts, f32).
const TENSORS_FILE: &str = "adapter_model.safetensors";

/// What is trained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// Every parameter of the adapter layers.
    Layers,
    /// LoRA on the adapter layers' projections; the layers themselves stay frozen.
    Lora,
    /// Trainable virtual-token embeddings prepended to the input.
    PromptTuning,
    /// Virtual tokens produced by a trainable MLP prompt encoder.
    PTuning,
    /// Trainable attention keys/values prepended in the adapter layers.
    PrefixTuning,
}

impl Method {
    /// The prompt encoder this method trains, if it is a prompt-learning method.
    pub fn prompt_kind(self) -> Option<PromptKind> {
        match self {
            Method::Layers | Method::Lora => None,
            Method::PromptTuning => Some(PromptKind::Tokens),
            Method::PTuning => Some(PromptKind::EncodedTokens),
            Method::PrefixTuning => Some(PromptKind::Prefix),
        }
    }
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
    /// Prompt-learning settings (required for `prompt_tuning`, `p_tuning` and `prefix_tuning`).
    #[serde(default)]
    pub prompt: Option<PromptConfig>,
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

/// Whether a `method` adapter of `layers` holds the parameter `name`.
fn holds(method: Method, layers: &[usize], name: &str) -> bool {
    match method {
        Method::Layers => layer_of(name).is_some_and(|i| layers.contains(&i)),
        Method::Lora => name.contains(".lora_a") || name.contains(".lora_b"),
        Method::PromptTuning | Method::PTuning | Method::PrefixTuning => name.starts_with("prompt_encoder."),
    }
}

impl AdapterSpec {
    /// Checks that the method's settings are present and valid.
    pub fn validate(&self) -> Result<(), AdapterError> {
        match (self.method.prompt_kind(), &self.prompt) {
            (Some(_), None) => Err(AdapterError::Config(format!(
                "method `{:?}` needs an [adapter.prompt] table",
                self.method
            ))),
            (Some(kind), Some(p)) => p.validate(kind),
            (None, _) if self.method == Method::Lora => match &self.lora {
                Some(l) => l.validate(),
                None => Err(AdapterError::Config(
                    "method `lora` needs an [adapter.lora] table".into(),
                )),
            },
            (None, _) => Ok(()),
        }
    }

    /// Marks what trains in `model` (an emulator or a full model on an autodiff device): the parameters of
    /// `layers`, fresh LoRA branches on their projections, or a fresh prompt encoder (prefixes on `layers`;
    /// `tokenizer` encodes a prompt's `init_text`). Returns the LoRA config actually used.
    pub fn prepare(
        &self,
        mut model: LlamaForCausalLM,
        layers: &[usize],
        tokenizer: Option<&Tokenizer>,
    ) -> Result<(LlamaForCausalLM, Option<LoraConfig>), AdapterError> {
        self.validate()?;
        if let (Some(kind), Some(prompt)) = (self.method.prompt_kind(), &self.prompt) {
            prompt.attach(&mut model, kind, layers, tokenizer)?;
        }
        let lora = match self.method {
            Method::Layers | Method::PromptTuning | Method::PTuning | Method::PrefixTuning => None,
            Method::Lora => {
                let mut lora = self
                    .lora
                    .clone()
                    .ok_or_else(|| AdapterError::Config("method `lora` needs an [adapter.lora] table".into()))?;
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
        tokenizer: Option<&Tokenizer>,
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
        let (model, lora) = self.prepare(model, layers, tokenizer)?;
        // Loading re-creates LoRA branches and prompt encoders, so what trains is marked again.
        let model = apply(model, dir)?;
        Ok((self.mark_trainable(model, layers), lora))
    }

    /// The same adapter without settings that only choose initial values (a prompt's `init_text`): for building
    /// the structure that saved or received values are then loaded into.
    pub fn structure(&self) -> AdapterSpec {
        let mut s = self.clone();
        if let Some(p) = &mut s.prompt {
            p.init_text = None;
        }
        s
    }

    fn mark_trainable(&self, model: LlamaForCausalLM, layers: &[usize]) -> LlamaForCausalLM {
        let method = self.method;
        model.with_trainable(&|n: &str| holds(method, layers, n))
    }
}

/// Writes the trained adapter to `dir`: for `layers`, the parameters of the adapter layers in Hugging Face layout;
/// for `lora`, a PEFT directory; for prompt learning, the prompt encoder's parameters (`prompt_encoder.*`, linear
/// weights `[out, in]`). Plus `offsite_adapter.json`.
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
        (Method::Lora, None) => return Err(AdapterError::Config("a LoRA adapter needs its config".into())),
        (method, _) => {
            let tensors = model
                .hf_tensors(&|n: &str| holds(method, &manifest.layers, n))
                .map_err(|e| err(dir, e.to_string()))?;
            if tensors.is_empty() {
                return Err(AdapterError::Mismatch(format!(
                    "the model holds nothing of a `{method:?}` adapter of layers {:?}",
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
/// layers' parameters; an Offsite `lora` adapter or any PEFT LoRA directory attaches its branches; an Offsite
/// prompt-learning adapter or a PEFT prompt-tuning, P-tuning or prefix-tuning directory attaches its prompt
/// encoder. Every tensor must name a parameter of the model with the right shape.
pub fn apply(mut model: LlamaForCausalLM, dir: &Path) -> Result<LlamaForCausalLM, AdapterError> {
    let manifest = read_manifest(dir)?;
    match manifest.as_ref().map(|m| m.method) {
        None if peft_type(dir)? != "LORA" => {
            import_peft_prompt(&mut model, dir)?;
            return Ok(model);
        }
        None | Some(Method::Lora) => {
            import_peft(&mut model, dir)?;
            return Ok(model);
        }
        _ => {}
    }
    let path = dir.join(TENSORS_FILE);
    let tensors = read_f32_safetensors(&path).map_err(|e| AdapterError::File {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    if let Some(kind) = manifest.as_ref().and_then(|m| m.method.prompt_kind()) {
        let layers = manifest.map(|m| m.layers).unwrap_or_default();
        model.prompt_encoder = Some(encoder_from(&model, kind, layers, tensors, &path)?);
        return Ok(model);
    }
    let tensors = tensors.into_iter().map(|(name, t)| (name, t.data, t.shape)).collect();
    model
        .set_params(tensors, true)
        .map_err(|e| AdapterError::Mismatch(format!("{}: {e}", path.display())))
}

/// PEFT's `peft_type` in `dir/adapter_config.json` (`LORA` when absent, as PEFT's own default reader assumes).
fn peft_type(dir: &Path) -> Result<String, AdapterError> {
    let path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| AdapterError::File {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| AdapterError::File {
        path: path.clone(),
        reason: format!("not JSON: {e}"),
    })?;
    Ok(v.get("peft_type")
        .and_then(|x| x.as_str())
        .unwrap_or("LORA")
        .to_string())
}

/// Rebuilds a saved prompt encoder from its tensors (`prompt_encoder.embedding.weight`, `prompt_encoder.mlp_head.{i}.
/// {weight,bias}` with weights `[out, in]`), checking that they fit the model.
fn encoder_from(
    model: &LlamaForCausalLM,
    kind: PromptKind,
    layers: Vec<usize>,
    tensors: Vec<(String, crate::load::F32Tensor)>,
    path: &Path,
) -> Result<PromptEncoder, AdapterError> {
    let device = model.device();
    let mismatch = |m: String| AdapterError::Mismatch(format!("{}: {m}", path.display()));
    let mut map: HashMap<String, crate::load::F32Tensor> = tensors.into_iter().collect();
    let matrix = |t: crate::load::F32Tensor, name: &str| -> Result<Tensor<2>, AdapterError> {
        match t.shape.as_slice() {
            &[r, c] if r * c == t.data.len() => Ok(Tensor::from_data(TensorData::new(t.data, [r, c]), &device)),
            s => Err(mismatch(format!("`{name}` has shape {s:?}, expected a matrix"))),
        }
    };
    let table_name = "prompt_encoder.embedding.weight";
    let table = map
        .remove(table_name)
        .ok_or_else(|| mismatch(format!("`{table_name}` is missing")))?;
    let table = matrix(table, table_name)?;
    let mut mlp = Vec::new();
    for i in 0.. {
        let (wn, bn) = (
            format!("prompt_encoder.mlp_head.{i}.weight"),
            format!("prompt_encoder.mlp_head.{i}.bias"),
        );
        let Some(w) = map.remove(&wn) else { break };
        let [out, inp] = match w.shape.as_slice() {
            &[o, i] if o * i == w.data.len() => [o, i],
            s => return Err(mismatch(format!("`{wn}` has shape {s:?}, expected a matrix"))),
        };
        let w = Tensor::from_data(TensorData::new(transpose(&w.data, out, inp), [inp, out]), &device);
        let b = match map.remove(&bn) {
            Some(b) if b.data.len() == out => Tensor::from_data(TensorData::new(b.data, [out]), &device),
            Some(b) => {
                return Err(mismatch(format!(
                    "`{bn}` holds {} values, expected {out}",
                    b.data.len()
                )))
            }
            None => return Err(mismatch(format!("`{bn}` is missing"))),
        };
        mlp.push(Linear::new(w, Some(b)));
    }
    if let Some(left) = map.keys().next() {
        return Err(mismatch(format!("`{left}` is not part of a prompt encoder")));
    }
    let c = model.config();
    let out_width = match kind {
        PromptKind::Prefix => layers.len() * 2 * c.num_key_value_heads * c.head_dim,
        _ => c.hidden_size,
    };
    if let Some(l) = layers
        .iter()
        .find(|l| kind == PromptKind::Prefix && !model.model.layer_ids.contains(l))
    {
        return Err(mismatch(format!(
            "the adapter prefixes layer {l}, which the model does not have"
        )));
    }
    PromptEncoder::new(kind, table, mlp, layers, out_width).map_err(|e| mismatch(e.to_string()))
}
