//! Writing a model as a Hugging Face checkpoint directory (`config.json`, `model.safetensors`, `tokenizer.json`,
//! `tokenizer_config.json`) that transformers loads, with any LoRA branches merged into the weights.

use std::path::Path;

use burn::tensor::Tensor;
use serde_json::json;

use crate::adapters::AdapterError;
use crate::load::{transpose, write_f32_safetensors};
use crate::model::{Linear, LlamaConfig, LlamaForCausalLM, RopeScaling};
use crate::tokenizer::Tokenizer;

fn err(path: &Path, reason: impl Into<String>) -> AdapterError {
    AdapterError::File {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn host(t: Tensor<2>, what: &str) -> Result<Vec<f32>, AdapterError> {
    t.into_data()
        .try_into_vec()
        .map_err(|e| AdapterError::Mismatch(format!("{what}: {e:?}")))
}

/// `W + scale · A·B` in PyTorch's `[out, in]` layout.
fn merged(linear: &Linear, name: &str) -> Result<Vec<f32>, AdapterError> {
    let mut w = linear.weight.to_f32();
    if let Some(l) = &linear.lora {
        w = w.add(l.lora_a.val().matmul(l.lora_b.val()).mul_scalar(l.scale));
    }
    let [inp, out] = w.dims();
    Ok(transpose(&host(w, name)?, inp, out))
}

/// Hugging Face `config.json` for the architecture.
pub fn hf_config_json(config: &LlamaConfig) -> Result<serde_json::Value, AdapterError> {
    let architecture = match config.model_type.as_str() {
        "qwen2" => "Qwen2ForCausalLM",
        "mistral" => "MistralForCausalLM",
        _ => "LlamaForCausalLM",
    };
    let rope_scaling = match &config.rope_scaling {
        None => json!(null),
        Some(RopeScaling::Linear { factor }) => json!({"rope_type": "linear", "factor": factor}),
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) => {
            json!({"rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
                   "high_freq_factor": high_freq_factor,
                   "original_max_position_embeddings": original_max_position_embeddings})
        }
        Some(RopeScaling::Factors { .. }) => {
            return Err(AdapterError::Mismatch(
                "per-frequency RoPE factors from a GGUF file have no Hugging Face config equivalent".into(),
            ))
        }
    };
    Ok(json!({
        "architectures": [architecture], "model_type": config.model_type, "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers, "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads, "head_dim": config.head_dim,
        "hidden_act": "silu", "rms_norm_eps": config.rms_norm_eps, "rope_theta": config.rope_theta,
        "rope_scaling": rope_scaling, "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings, "attention_bias": config.attention_bias,
        "mlp_bias": false, "bos_token_id": config.bos_token_id,
        "eos_token_id": if config.eos_token_ids.len() == 1 { json!(config.eos_token_ids[0]) } else { json!(config.eos_token_ids) },
        "torch_dtype": "float32", "use_cache": true,
    }))
}

/// Writes `model` (LoRA merged) and, when given, its tokenizer as a Hugging Face checkpoint in `dir`.
pub fn write_merged(model: &LlamaForCausalLM, tokenizer: Option<&Tokenizer>, dir: &Path) -> Result<(), AdapterError> {
    std::fs::create_dir_all(dir).map_err(|e| err(dir, e.to_string()))?;
    let config = model.config();
    let mut tensors: Vec<(String, Vec<f32>, Vec<usize>)> = Vec::new();
    let vector = |t: Tensor<1>, what: &str| -> Result<Vec<f32>, AdapterError> {
        t.into_data()
            .try_into_vec()
            .map_err(|e| AdapterError::Mismatch(format!("{what}: {e:?}")))
    };
    let (v, h) = (config.vocab_size, config.hidden_size);
    tensors.push((
        "model.embed_tokens.weight".into(),
        host(model.model.embed_tokens.to_f32(), "embed")?,
        vec![v, h],
    ));
    for (i, layer) in model.model.layers.iter().enumerate() {
        let p = format!("model.layers.{i}");
        for (n, norm) in [
            ("input_layernorm", &layer.input_layernorm),
            ("post_attention_layernorm", &layer.post_attention_layernorm),
        ] {
            tensors.push((format!("{p}.{n}.weight"), vector(norm.weight.val(), n)?, vec![h]));
        }
    }
    for name in model.linear_names() {
        let linear = model.linear(&name).expect("name from linear_names");
        let shape = vec![linear.out_features(), linear.in_features()];
        tensors.push((format!("{name}.weight"), merged(linear, &name)?, shape));
        if let Some(b) = &linear.bias {
            tensors.push((
                format!("{name}.bias"),
                vector(b.val(), &name)?,
                vec![linear.out_features()],
            ));
        }
    }
    tensors.push((
        "model.norm.weight".into(),
        vector(model.model.norm.weight.val(), "norm")?,
        vec![h],
    ));
    if let Some(head) = &model.lm_head {
        tensors.push(("lm_head.weight".into(), merged(head, "lm_head")?, vec![v, h]));
    }
    let path = dir.join("model.safetensors");
    write_f32_safetensors(&path, tensors).map_err(|e| err(&path, e))?;
    let write_json = |file: &str, value: &serde_json::Value| {
        let path = dir.join(file);
        std::fs::write(&path, serde_json::to_string_pretty(value).expect("JSON")).map_err(|e| err(&path, e.to_string()))
    };
    write_json("config.json", &hf_config_json(config)?)?;
    let Some(tokenizer) = tokenizer else {
        return Ok(());
    };
    let path = dir.join("tokenizer.json");
    let text = tokenizer.to_json().map_err(|e| err(&path, e.to_string()))?;
    std::fs::write(&path, text).map_err(|e| err(&path, e.to_string()))?;
    write_json("tokenizer_config.json", &tokenizer.tokenizer_config_json())
}
