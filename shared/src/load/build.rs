//! Builds a [`LlamaForCausalLM`] from a [`TensorSource`], checking every tensor's shape against the config.

use burn::tensor::{Device, Tensor, TensorData};

use super::{LoadError, TensorSource};
use crate::model::{
    Embedding, Linear, LlamaAttention, LlamaConfig, LlamaDecoderLayer, LlamaForCausalLM, LlamaMlp, LlamaModel,
    RmsNorm,
};

struct Builder<'a> {
    source: &'a dyn TensorSource,
    device: &'a Device,
}

impl Builder<'_> {
    fn data(&self, name: &str, expected: &[usize]) -> Result<TensorData, LoadError> {
        if !self.source.contains(name) {
            return Err(LoadError::MissingTensor { path: self.source.path().into(), tensor: name.into() });
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
        Ok(TensorData::new(t.data, t.shape))
    }

    fn tensor1(&self, name: &str, n: usize) -> Result<Tensor<1>, LoadError> {
        Ok(Tensor::from_data(self.data(name, &[n])?, self.device))
    }

    fn tensor2(&self, name: &str, rows: usize, cols: usize) -> Result<Tensor<2>, LoadError> {
        Ok(Tensor::from_data(self.data(name, &[rows, cols])?, self.device))
    }

    fn linear(&self, prefix: &str, out: usize, inp: usize, bias: bool) -> Result<Linear, LoadError> {
        let weight = self.tensor2(&format!("{prefix}.weight"), out, inp)?;
        let bias = if bias { Some(self.tensor1(&format!("{prefix}.bias"), out)?) } else { None };
        Ok(Linear::new(weight, bias))
    }
}

pub(crate) fn build_model(
    config: &LlamaConfig,
    source: &dyn TensorSource,
    device: &Device,
) -> Result<LlamaForCausalLM, LoadError> {
    let b = Builder { source, device };
    let (h, i, d) = (config.hidden_size, config.intermediate_size, config.head_dim);
    let (q, kv) = (config.num_attention_heads * d, config.num_key_value_heads * d);
    let eps = config.rms_norm_eps;
    let embed_tokens = Embedding::new(b.tensor2("model.embed_tokens.weight", config.vocab_size, h)?);
    let mut layers = Vec::with_capacity(config.num_hidden_layers);
    for n in 0..config.num_hidden_layers {
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
            post_attention_layernorm: RmsNorm::new(
                b.tensor1(&format!("{p}.post_attention_layernorm.weight"), h)?,
                eps,
            ),
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
    let model = LlamaModel { embed_tokens, layers, norm };
    Ok(LlamaForCausalLM::from_parts(config.clone(), model, lm_head, device))
}
