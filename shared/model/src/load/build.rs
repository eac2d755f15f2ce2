//! Builds a [`LlamaForCausalLM`] from a [`TensorSource`], checking every tensor's shape against the config.

use burn::tensor::{Device, Tensor, TensorData};

use super::{LoadError, TensorSource};
use crate::model::{
    Embedding, Linear, LinearWeight, LlamaAttention, LlamaConfig, LlamaDecoderLayer, LlamaForCausalLM, LlamaMlp,
    LlamaModel, RmsNorm,
};

/// Serves projection weights kept in low precision (an emulator's frozen middle), by Hugging Face name.
pub(crate) trait FrozenSource {
    /// The weight `{prefix}.weight` in low precision, `[in, out]`, if it is stored so; `None` means it is full
    /// precision and comes from the [`TensorSource`].
    fn frozen(&self, prefix: &str, out: usize, inp: usize, device: &Device) -> Result<Option<LinearWeight>, LoadError>;
}

struct Builder<'a> {
    source: &'a dyn TensorSource,
    frozen: Option<&'a dyn FrozenSource>,
    device: &'a Device,
}

impl Builder<'_> {
    /// The tensor's values, after checking its shape.
    fn values(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>, LoadError> {
        if !self.source.contains(name) {
            return Err(LoadError::MissingTensor {
                path: self.source.path().into(),
                tensor: name.into(),
            });
        }
        let t = self.source.read(name)?;
        if t.shape != expected {
            return Err(LoadError::Shape {
                path: self.source.path().into(),
                tensor: name.into(),
                expected: expected.to_vec(),
                found: t.shape,
            });
        }
        Ok(t.data)
    }

    fn tensor1(&self, name: &str, n: usize) -> Result<Tensor<1>, LoadError> {
        Ok(Tensor::from_data(
            TensorData::new(self.values(name, &[n])?, [n]),
            self.device,
        ))
    }

    fn tensor2(&self, name: &str, rows: usize, cols: usize) -> Result<Tensor<2>, LoadError> {
        Ok(Tensor::from_data(
            TensorData::new(self.values(name, &[rows, cols])?, [rows, cols]),
            self.device,
        ))
    }

    /// A PyTorch `[out, in]` weight, stored transposed as [`Linear`] wants it.
    fn linear(&self, prefix: &str, out: usize, inp: usize, bias: bool) -> Result<Linear, LoadError> {
        let bias = if bias {
            Some(self.tensor1(&format!("{prefix}.bias"), out)?)
        } else {
            None
        };
        if let Some(frozen) = self.frozen {
            if let Some(weight) = frozen.frozen(prefix, out, inp, self.device)? {
                return Ok(Linear::with_weight(weight, bias));
            }
        }
        let name = format!("{prefix}.weight");
        let values = self.values(&name, &[out, inp])?;
        let weight = Tensor::from_data(TensorData::new(transpose(&values, out, inp), [inp, out]), self.device);
        Ok(Linear::new(weight, bias))
    }
}

pub(crate) fn build_model(
    config: &LlamaConfig,
    source: &dyn TensorSource,
    device: &Device,
) -> Result<LlamaForCausalLM, LoadError> {
    let ids: Vec<usize> = (0..config.num_hidden_layers).collect();
    build_layers(config, &ids, source, None, device)
}

/// Builds a model holding only the decoder layers `layer_ids` (full-model indices, kept under their names);
/// projections that `frozen` serves stay in low precision.
pub(crate) fn build_layers(
    config: &LlamaConfig,
    layer_ids: &[usize],
    source: &dyn TensorSource,
    frozen: Option<&dyn FrozenSource>,
    device: &Device,
) -> Result<LlamaForCausalLM, LoadError> {
    let b = Builder { source, frozen, device };
    let (h, i, d) = (config.hidden_size, config.intermediate_size, config.head_dim);
    let (q, kv) = (config.num_attention_heads * d, config.num_key_value_heads * d);
    let eps = config.rms_norm_eps;
    let frozen_table = match frozen {
        Some(f) => f.frozen("model.embed_tokens", config.vocab_size, h, device)?,
        None => None,
    };
    let embed_tokens = match frozen_table {
        Some(table) => Embedding::frozen(table),
        None => Embedding::new(b.tensor2("model.embed_tokens.weight", config.vocab_size, h)?),
    };
    let mut layers = Vec::with_capacity(layer_ids.len());
    for &n in layer_ids {
        let p = format!("model.layers.{n}");
        let bias = config.attention_bias;
        layers.push(LlamaDecoderLayer {
            input_layernorm: RmsNorm::new(b.tensor1(&format!("{p}.input_layernorm.weight"), h)?, eps),
            self_attn: LlamaAttention {
                q_proj: b.linear(&format!("{p}.self_attn.q_proj"), q, h, bias)?,
                k_proj: b.linear(&format!("{p}.self_attn.k_proj"), kv, h, bias)?,
                v_proj: b.linear(&format!("{p}.self_attn.v_proj"), kv, h, bias)?,
                o_proj: b.linear(&format!("{p}.self_attn.o_proj"), h, q, false)?,
                num_heads: config.num_attention_heads,
                num_kv_heads: config.num_key_value_heads,
                head_dim: d,
            },
            post_attention_layernorm: RmsNorm::new(b.tensor1(&format!("{p}.post_attention_layernorm.weight"), h)?, eps),
            mlp: LlamaMlp {
                gate_proj: b.linear(&format!("{p}.mlp.gate_proj"), i, h, false)?,
                up_proj: b.linear(&format!("{p}.mlp.up_proj"), i, h, false)?,
                down_proj: b.linear(&format!("{p}.mlp.down_proj"), h, i, false)?,
            },
        });
    }
    let norm = RmsNorm::new(b.tensor1("model.norm.weight", h)?, eps);
    let lm_head = if config.tie_word_embeddings {
        None
    } else {
        Some(b.linear("lm_head", config.vocab_size, h, false)?)
    };
    let model = LlamaModel {
        embed_tokens,
        layers,
        norm,
        layer_ids: layer_ids.to_vec(),
    };
    let config = LlamaConfig {
        num_hidden_layers: layer_ids.len(),
        ..config.clone()
    };
    Ok(LlamaForCausalLM::from_parts(config, model, lm_head, device))
}

/// Row-major `[rows, cols]` → `[cols, rows]`, in cache-friendly tiles.
pub(crate) fn transpose(data: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    const TILE: usize = 32;
    let mut out = vec![0.0; data.len()];
    for r0 in (0..rows).step_by(TILE) {
        for c0 in (0..cols).step_by(TILE) {
            for r in r0..(r0 + TILE).min(rows) {
                for c in c0..(c0 + TILE).min(cols) {
                    out[c * rows + r] = data[r * cols + c];
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn transpose_swaps_axes() {
        let data: Vec<f32> = (0..6).map(|x| x as f32).collect();
        assert_eq!(super::transpose(&data, 2, 3), vec![0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
        let big: Vec<f32> = (0..33 * 70).map(|x| x as f32).collect();
        let t = super::transpose(&big, 33, 70);
        assert_eq!(t[5 * 33 + 32], big[32 * 70 + 5]);
        assert_eq!(super::transpose(&t, 70, 33), big);
    }
}
