//! Hyper-parameters of a LLaMA-family decoder, read from a Hugging Face `config.json` or built from GGUF metadata.

use serde::{Deserialize, Serialize};

use super::ModelError;

/// Architecture of a LLaMA-family causal language model (LLaMA 2/3, SmolLM/SmolLM2, TinyLlama, Mistral, Qwen2).
///
/// Field names follow Hugging Face's `config.json`, so the struct can be serialised back next to exported weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// Hugging Face `model_type` (`llama`, `mistral`, `qwen2`).
    pub model_type: String,
    /// Number of token ids the embedding and the LM head cover.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Inner width of the SwiGLU MLP.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Number of query heads.
    pub num_attention_heads: usize,
    /// Number of key/value heads (grouped-query attention when smaller than `num_attention_heads`).
    pub num_key_value_heads: usize,
    /// Width of one attention head.
    pub head_dim: usize,
    /// Epsilon of every RMSNorm.
    pub rms_norm_eps: f64,
    /// Base of the rotary position embedding frequencies.
    pub rope_theta: f64,
    /// Optional RoPE frequency scaling (`linear` or `llama3`).
    pub rope_scaling: Option<RopeScaling>,
    /// Longest context the model was trained for.
    pub max_position_embeddings: usize,
    /// Whether the LM head reuses the token embedding matrix.
    pub tie_word_embeddings: bool,
    /// Whether q/k/v projections carry a bias (Qwen2).
    pub attention_bias: bool,
    /// Beginning-of-sequence token id, when the model has one.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token ids: generation stops on any of them.
    pub eos_token_ids: Vec<u32>,
}

/// RoPE frequency scaling, as in Hugging Face's `rope_scaling` / `rope_parameters`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rope_type", rename_all = "lowercase")]
pub enum RopeScaling {
    /// Positions divided by `factor` (linear interpolation).
    Linear {
        /// Divisor of the positions.
        factor: f64,
    },
    /// LLaMA 3.1's piecewise frequency scaling.
    Llama3 {
        /// Scaling of low frequencies.
        factor: f64,
        /// Wavelength threshold (as a fraction) below which frequencies are scaled.
        low_freq_factor: f64,
        /// Wavelength threshold above which frequencies are kept.
        high_freq_factor: f64,
        /// Context length of the original pre-training.
        original_max_position_embeddings: usize,
    },
    /// Per-frequency divisors stored in the checkpoint (GGUF `rope_freqs.weight`).
    Factors {
        /// One divisor per rotary frequency (`head_dim / 2` values).
        factors: Vec<f32>,
    },
}

impl LlamaConfig {
    /// Parses a Hugging Face `config.json` (transformers 4.x `rope_theta`/`rope_scaling` or 5.x `rope_parameters`).
    pub fn from_hf_json(text: &str) -> Result<Self, ModelError> {
        let v: serde_json::Value =
            serde_json::from_str(text).map_err(|e| ModelError::Config(format!("config.json is not JSON: {e}")))?;
        let model_type = str_field(&v, "model_type")?.to_string();
        if !matches!(model_type.as_str(), "llama" | "mistral" | "qwen2") {
            return Err(ModelError::Unsupported(format!(
                "model_type `{model_type}` (supported: llama, mistral, qwen2)"
            )));
        }
        let hidden_size = usize_field(&v, "hidden_size")?;
        let num_attention_heads = usize_field(&v, "num_attention_heads")?;
        let head_dim = match v.get("head_dim") {
            Some(x) if !x.is_null() => as_usize(x, "head_dim")?,
            _ => hidden_size / num_attention_heads.max(1),
        };
        let rope = v.get("rope_parameters").filter(|x| !x.is_null());
        let rope_theta = rope
            .and_then(|r| r.get("rope_theta"))
            .or_else(|| v.get("rope_theta"))
            .and_then(|x| x.as_f64())
            .unwrap_or(10_000.0);
        let scaling_value = rope.or_else(|| v.get("rope_scaling").filter(|x| !x.is_null()));
        let rope_scaling = match scaling_value {
            Some(s) => parse_rope_scaling(s)?,
            None => None,
        };
        let eos_token_ids = match v.get("eos_token_id") {
            Some(serde_json::Value::Array(a)) => a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32).collect(),
            Some(x) => x.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
            None => vec![],
        };
        let config = Self {
            attention_bias: v
                .get("attention_bias")
                .and_then(|x| x.as_bool())
                .unwrap_or(model_type == "qwen2"),
            model_type,
            vocab_size: usize_field(&v, "vocab_size")?,
            hidden_size,
            intermediate_size: usize_field(&v, "intermediate_size")?,
            num_hidden_layers: usize_field(&v, "num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads: match v.get("num_key_value_heads") {
                Some(x) if !x.is_null() => as_usize(x, "num_key_value_heads")?,
                _ => num_attention_heads,
            },
            head_dim,
            rms_norm_eps: v.get("rms_norm_eps").and_then(|x| x.as_f64()).unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: v
                .get("max_position_embeddings")
                .and_then(|x| x.as_u64())
                .unwrap_or(2048) as usize,
            tie_word_embeddings: v.get("tie_word_embeddings").and_then(|x| x.as_bool()).unwrap_or(false),
            bos_token_id: v.get("bos_token_id").and_then(|x| x.as_u64()).map(|x| x as u32),
            eos_token_ids,
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks that the sizes are consistent (heads divide evenly, nothing is zero).
    pub fn validate(&self) -> Result<(), ModelError> {
        let nonzero = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
        ];
        for (name, value) in nonzero {
            if value == 0 {
                return Err(ModelError::Config(format!("{name} must be positive")));
            }
        }
        if !self.num_attention_heads.is_multiple_of(self.num_key_value_heads) {
            return Err(ModelError::Config(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads, self.num_key_value_heads
            )));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(ModelError::Config(format!(
                "head_dim {} must be even for RoPE",
                self.head_dim
            )));
        }
        if let Some(RopeScaling::Factors { factors }) = &self.rope_scaling {
            if factors.len() != self.head_dim / 2 {
                return Err(ModelError::Config(format!(
                    "rope frequency factors have {} values, expected head_dim/2 = {}",
                    factors.len(),
                    self.head_dim / 2
                )));
            }
        }
        Ok(())
    }

    /// Number of parameters of the model (embedding counted once when tied).
    pub fn num_parameters(&self) -> usize {
        let (h, i, d) = (self.hidden_size, self.intermediate_size, self.head_dim);
        let q = self.num_attention_heads * d;
        let kv = self.num_key_value_heads * d;
        let bias = if self.attention_bias { q + 2 * kv } else { 0 };
        let layer = h * q + 2 * h * kv + q * h + bias + 3 * h * i + 2 * h;
        let head = if self.tie_word_embeddings {
            0
        } else {
            self.vocab_size * h
        };
        self.vocab_size * h + self.num_hidden_layers * layer + h + head
    }
}

fn parse_rope_scaling(s: &serde_json::Value) -> Result<Option<RopeScaling>, ModelError> {
    let kind = s
        .get("rope_type")
        .or_else(|| s.get("type"))
        .and_then(|x| x.as_str())
        .unwrap_or("default");
    let factor = || {
        s.get("factor")
            .and_then(|x| x.as_f64())
            .ok_or_else(|| ModelError::Config(format!("rope scaling `{kind}` needs `factor`")))
    };
    match kind {
        "default" => Ok(None),
        "linear" => Ok(Some(RopeScaling::Linear { factor: factor()? })),
        "llama3" => Ok(Some(RopeScaling::Llama3 {
            factor: factor()?,
            low_freq_factor: s.get("low_freq_factor").and_then(|x| x.as_f64()).unwrap_or(1.0),
            high_freq_factor: s.get("high_freq_factor").and_then(|x| x.as_f64()).unwrap_or(4.0),
            original_max_position_embeddings: s
                .get("original_max_position_embeddings")
                .and_then(|x| x.as_u64())
                .unwrap_or(8192) as usize,
        })),
        other => Err(ModelError::Unsupported(format!(
            "rope scaling type `{other}` (supported: linear, llama3)"
        ))),
    }
}

fn str_field<'a>(v: &'a serde_json::Value, key: &str) -> Result<&'a str, ModelError> {
    v.get(key)
        .and_then(|x| x.as_str())
        .ok_or_else(|| ModelError::Config(format!("config.json lacks string field `{key}`")))
}

fn usize_field(v: &serde_json::Value, key: &str) -> Result<usize, ModelError> {
    let x = v
        .get(key)
        .ok_or_else(|| ModelError::Config(format!("config.json lacks field `{key}`")))?;
    as_usize(x, key)
}

fn as_usize(x: &serde_json::Value, key: &str) -> Result<usize, ModelError> {
    x.as_u64()
        .map(|x| x as usize)
        .ok_or_else(|| ModelError::Config(format!("config.json field `{key}` is not a non-negative integer")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_transformers5_rope_parameters() {
        let text = r#"{"model_type":"llama","vocab_size":256,"hidden_size":64,"intermediate_size":160,
            "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"head_dim":16,
            "rms_norm_eps":1e-5,"rope_parameters":{"rope_theta":10000.0,"rope_type":"default"},
            "tie_word_embeddings":false,"eos_token_id":2,"bos_token_id":1}"#;
        let c = LlamaConfig::from_hf_json(text).unwrap();
        assert_eq!(c.rope_theta, 10000.0);
        assert_eq!(c.rope_scaling, None);
        assert_eq!(c.eos_token_ids, vec![2]);
        assert_eq!(c.head_dim, 16);
    }

    #[test]
    fn parses_llama3_scaling_and_rejects_unknown() {
        let base = r#"{"model_type":"llama","vocab_size":8,"hidden_size":8,"intermediate_size":8,
            "num_hidden_layers":1,"num_attention_heads":2,"rope_theta":500000.0,"#;
        let c = LlamaConfig::from_hf_json(&format!(
            "{base}\"rope_scaling\":{{\"rope_type\":\"llama3\",\"factor\":8.0,\"low_freq_factor\":1.0,\
             \"high_freq_factor\":4.0,\"original_max_position_embeddings\":8192}}}}"
        ))
        .unwrap();
        assert!(matches!(c.rope_scaling, Some(RopeScaling::Llama3 { factor, .. }) if factor == 8.0));
        let err = LlamaConfig::from_hf_json(&format!("{base}\"rope_scaling\":{{\"type\":\"yarn\",\"factor\":2}}}}"))
            .unwrap_err();
        assert!(err.to_string().contains("yarn"), "{err}");
        let err = LlamaConfig::from_hf_json(r#"{"model_type":"gpt2"}"#).unwrap_err();
        assert!(err.to_string().contains("gpt2"), "{err}");
    }
}
