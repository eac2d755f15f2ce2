//! Prompt learning, the other three methods FederatedScope-LLM offers: prompt tuning (Lester et al.: trainable
//! virtual-token embeddings), P-tuning (Liu et al.: virtual tokens from a small MLP prompt encoder) and prefix
//! tuning (Li & Liang: trainable keys and values prepended in the attention of every adapted layer, optionally
//! reparameterised through an MLP). The encoder is the model's `prompt_encoder`; PEFT export writes the encoder's
//! output as PEFT's `prompt_embeddings` (what PEFT loads in inference mode).

use std::path::Path;

use burn::tensor::{Distribution, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::AdapterError;
use crate::load::write_f32_safetensors;
use crate::model::{Linear, LlamaForCausalLM, PromptEncoder, PromptKind};
use crate::tokenizer::Tokenizer;

/// The `[adapter.prompt]` table; field names follow PEFT's prompt-learning configs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromptConfig {
    /// Number of virtual tokens (prefix positions for prefix tuning).
    pub num_virtual_tokens: usize,
    /// Prompt tuning and P-tuning: start the virtual tokens at the embeddings of this text's tokens (repeated or
    /// cut to `num_virtual_tokens`, PEFT's `prompt_tuning_init_text`); without it they start at the embeddings
    /// of randomly drawn vocabulary tokens.
    #[serde(default)]
    pub init_text: Option<String>,
    /// Width of P-tuning's MLP and of prefix tuning's reparameterisation (default: the model's hidden size).
    #[serde(default)]
    pub encoder_hidden_size: Option<usize>,
    /// Prefix tuning: produce the prefixes with `Linear → tanh → Linear` from a `[virtual, hidden]` table (PEFT's
    /// `prefix_projection`) instead of training them directly.
    #[serde(default)]
    pub prefix_projection: bool,
}

fn linear(inp: usize, out: usize, device: &burn::tensor::Device) -> Linear {
    // PyTorch's `nn.Linear` initialisation: U(±1/√in) for weight and bias.
    let bound = 1.0 / (inp as f64).sqrt();
    let dist = Distribution::Uniform(-bound, bound);
    Linear::new(
        Tensor::random([inp, out], dist, device),
        Some(Tensor::random([out], dist, device)),
    )
}

impl PromptConfig {
    /// Checks the values for a method producing `kind`.
    pub fn validate(&self, kind: PromptKind) -> Result<(), AdapterError> {
        if self.num_virtual_tokens == 0 || self.num_virtual_tokens > 4096 {
            return Err(AdapterError::Config(format!(
                "num_virtual_tokens {} must be in 1..=4096",
                self.num_virtual_tokens
            )));
        }
        if self.encoder_hidden_size == Some(0) {
            return Err(AdapterError::Config("encoder_hidden_size must be positive".into()));
        }
        if kind == PromptKind::Prefix && self.init_text.is_some() {
            return Err(AdapterError::Config(
                "init_text applies to prompt tuning and P-tuning, not prefix tuning".into(),
            ));
        }
        if kind != PromptKind::Prefix && self.prefix_projection {
            return Err(AdapterError::Config(
                "prefix_projection applies to prefix tuning only".into(),
            ));
        }
        Ok(())
    }

    /// Attaches a fresh prompt encoder to `model` (random values come from the device's seed). `layers`: the
    /// decoder layers that get a prefix (prefix tuning). `tokenizer` turns `init_text` into ids.
    pub fn attach(
        &self,
        model: &mut LlamaForCausalLM,
        kind: PromptKind,
        layers: &[usize],
        tokenizer: Option<&Tokenizer>,
    ) -> Result<(), AdapterError> {
        self.validate(kind)?;
        let device = model.device();
        let c = model.config();
        let (hidden, n) = (c.hidden_size, self.num_virtual_tokens);
        let kv = c.num_key_value_heads * c.head_dim;
        let enc_hidden = self.encoder_hidden_size.unwrap_or(hidden);
        let (table, mlp_head, out_width) = match kind {
            PromptKind::Tokens | PromptKind::EncodedTokens => {
                let ids = self.init_ids(model, tokenizer)?;
                let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, n]), &device);
                // A fresh leaf, not a view of the (frozen) embedding table.
                let rows = model.model.embed_tokens.forward(ids).reshape([n, hidden]).into_data();
                let table = Tensor::from_data(rows, &device);
                let mlp = if kind == PromptKind::EncodedTokens {
                    vec![
                        linear(hidden, enc_hidden, &device),
                        linear(enc_hidden, enc_hidden, &device),
                        linear(enc_hidden, hidden, &device),
                    ]
                } else {
                    Vec::new()
                };
                (table, mlp, hidden)
            }
            PromptKind::Prefix => {
                let width = layers.len() * 2 * kv;
                if self.prefix_projection {
                    let table = Tensor::random([n, hidden], Distribution::Normal(0.0, 1.0), &device);
                    let mlp = vec![linear(hidden, enc_hidden, &device), linear(enc_hidden, width, &device)];
                    (table, mlp, width)
                } else {
                    (
                        Tensor::random([n, width], Distribution::Normal(0.0, 1.0), &device),
                        Vec::new(),
                        width,
                    )
                }
            }
        };
        let missing: Vec<&usize> = layers.iter().filter(|l| !model.model.layer_ids.contains(l)).collect();
        if kind == PromptKind::Prefix && !missing.is_empty() {
            return Err(AdapterError::Mismatch(format!(
                "the model has no decoder layers {missing:?}"
            )));
        }
        let enc = PromptEncoder::new(kind, table, mlp_head, layers.to_vec(), out_width)
            .map_err(|e| AdapterError::Config(e.to_string()))?;
        model.prompt_encoder = Some(enc);
        Ok(())
    }

    /// The token ids the virtual tokens start from.
    fn init_ids(&self, model: &LlamaForCausalLM, tokenizer: Option<&Tokenizer>) -> Result<Vec<i64>, AdapterError> {
        let n = self.num_virtual_tokens;
        let vocab = model.config().vocab_size;
        let Some(text) = &self.init_text else {
            let draws = Tensor::<1>::random([n], Distribution::Uniform(0.0, vocab as f64), &model.device());
            let draws: Vec<f32> = draws.into_data().convert::<f32>().try_into_vec().unwrap_or_default();
            return Ok(draws.iter().map(|&x| (x as i64).clamp(0, vocab as i64 - 1)).collect());
        };
        let tokenizer = tokenizer.ok_or_else(|| {
            AdapterError::Config("init_text needs the model's tokenizer, and none is available".into())
        })?;
        let ids = tokenizer
            .encode(text)
            .map_err(|e| AdapterError::Config(format!("init_text: {e}")))?;
        if ids.is_empty() {
            return Err(AdapterError::Config("init_text encodes to no token".into()));
        }
        Ok(ids.iter().cycle().take(n).map(|&i| i as i64).collect())
    }
}

/// Writes the model's prompt encoder as a PEFT prompt-learning adapter: `adapter_config.json` (in inference mode)
/// and `prompt_embeddings` = the encoder's output, which PEFT uses directly in inference mode. Prefix tuning is
/// exported only when every decoder layer has a prefix (PEFT has no per-layer choice), with the key/value width of
/// the model's KV heads.
pub fn export_peft_prompt(model: &LlamaForCausalLM, base_model: Option<&str>, dir: &Path) -> Result<(), AdapterError> {
    let enc = model
        .prompt_encoder
        .as_ref()
        .ok_or_else(|| AdapterError::Mismatch("the model has no prompt encoder to export".into()))?;
    let c = model.config();
    let out = enc.output();
    let [n, width] = out.dims();
    let mut config = json!({
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "inference_mode": true,
        "num_virtual_tokens": n,
        "num_transformer_submodules": 1,
        "num_layers": c.num_hidden_layers,
        "revision": null,
    });
    match enc.kind() {
        PromptKind::Tokens => {
            config["peft_type"] = json!("PROMPT_TUNING");
            config["token_dim"] = json!(width);
            config["num_attention_heads"] = json!(c.num_attention_heads);
            config["prompt_tuning_init"] = json!("RANDOM");
        }
        PromptKind::EncodedTokens => {
            config["peft_type"] = json!("P_TUNING");
            config["token_dim"] = json!(width);
            config["num_attention_heads"] = json!(c.num_attention_heads);
            config["encoder_reparameterization_type"] = json!("MLP");
            config["encoder_hidden_size"] = json!(enc.hidden_width());
        }
        PromptKind::Prefix => {
            let all: Vec<usize> = (0..c.num_hidden_layers).collect();
            if enc.layers() != all.as_slice() {
                return Err(AdapterError::Mismatch(format!(
                    "PEFT's prefix tuning prefixes every layer; this adapter prefixes layers {:?} of {}",
                    enc.layers(),
                    c.num_hidden_layers
                )));
            }
            config["peft_type"] = json!("PREFIX_TUNING");
            config["token_dim"] = json!(c.num_key_value_heads * c.head_dim);
            config["num_attention_heads"] = json!(c.num_key_value_heads);
            config["prefix_projection"] = json!(false);
        }
    }
    std::fs::create_dir_all(dir).map_err(|e| file_err(dir, e.to_string()))?;
    let values: Vec<f32> = out
        .into_data()
        .convert::<f32>()
        .try_into_vec()
        .map_err(|e| AdapterError::Mismatch(format!("prompt embeddings: {e:?}")))?;
    let path = dir.join("adapter_model.safetensors");
    write_f32_safetensors(&path, vec![("prompt_embeddings".to_string(), values, vec![n, width])])
        .map_err(|e| file_err(&path, e))?;
    let path = dir.join("adapter_config.json");
    let text = serde_json::to_string_pretty(&config).expect("JSON value");
    std::fs::write(&path, text).map_err(|e| file_err(&path, e.to_string()))
}

fn file_err(path: &Path, reason: impl Into<String>) -> AdapterError {
    AdapterError::File {
        path: path.into(),
        reason: reason.into(),
    }
}

/// Loads a PEFT prompt-tuning, P-tuning or prefix-tuning directory into `model`: its `prompt_embeddings` become a
/// prompt encoder without MLP (what PEFT itself uses in inference mode). A prefix must cover every layer.
pub fn import_peft_prompt(model: &mut LlamaForCausalLM, dir: &Path) -> Result<(), AdapterError> {
    let config_path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&config_path).map_err(|e| file_err(&config_path, e.to_string()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| file_err(&config_path, format!("not JSON: {e}")))?;
    let peft_type = v.get("peft_type").and_then(|x| x.as_str()).unwrap_or("LORA");
    let kind = match peft_type {
        "PROMPT_TUNING" => PromptKind::Tokens,
        "P_TUNING" => PromptKind::EncodedTokens,
        "PREFIX_TUNING" => PromptKind::Prefix,
        other => {
            return Err(file_err(
                &config_path,
                format!("peft_type `{other}` (supported: LORA, PROMPT_TUNING, P_TUNING, PREFIX_TUNING)"),
            ))
        }
    };
    if v.get("num_transformer_submodules")
        .and_then(|x| x.as_u64())
        .unwrap_or(1)
        != 1
    {
        return Err(file_err(
            &config_path,
            "`num_transformer_submodules` must be 1 for a decoder",
        ));
    }
    let path = dir.join("adapter_model.safetensors");
    let mut tensors = crate::load::read_f32_safetensors(&path).map_err(|e| file_err(&path, e.to_string()))?;
    let t = match tensors.iter().position(|(n, _)| n == "prompt_embeddings") {
        Some(i) if tensors.len() == 1 => tensors.swap_remove(i).1,
        _ => {
            let names: Vec<&str> = tensors.iter().map(|(n, _)| n.as_str()).collect();
            return Err(file_err(
                &path,
                format!("expected exactly `prompt_embeddings`, found {names:?}"),
            ));
        }
    };
    let [n, width] = match t.shape.as_slice() {
        &[n, w] if n > 0 => [n, w],
        s => return Err(file_err(&path, format!("`prompt_embeddings` has shape {s:?}"))),
    };
    if t.data.iter().any(|x| !x.is_finite()) {
        return Err(file_err(&path, "`prompt_embeddings` holds non-finite values"));
    }
    let c = model.config();
    let (layers, out_width) = match kind {
        PromptKind::Prefix => {
            let layers: Vec<usize> = (0..c.num_hidden_layers).collect();
            if model.model.layer_ids != layers {
                return Err(AdapterError::Mismatch(
                    "a PEFT prefix covers every layer of the full model; this model lacks some".into(),
                ));
            }
            let width = layers.len() * 2 * c.num_key_value_heads * c.head_dim;
            (layers, width)
        }
        _ => (Vec::new(), c.hidden_size),
    };
    let table = Tensor::from_data(TensorData::new(t.data, [n, width]), &model.device());
    let enc = PromptEncoder::new(kind, table, Vec::new(), layers, out_width)
        .map_err(|e| AdapterError::Mismatch(format!("{}: {e}", path.display())))?;
    model.prompt_encoder = Some(enc);
    Ok(())
}
