//! The LLaMA-family decoder (`LlamaForCausalLM`), with Hugging Face's module tree and parameter names.

mod attention;
mod cache;
mod config;
mod layers;
mod params;
mod prompt;
mod rmsnorm;
mod rope;
mod swiglu;

use burn::module::Module;
use burn::tensor::{Device, Int, Tensor, TensorData};

pub use attention::{LlamaAttention, LlamaMlp};
pub use cache::KvCache;
pub use config::{LlamaConfig, RopeScaling};
pub use layers::{Embedding, EmbeddingWeight, Int8Weight, Linear, LinearWeight, LoraBranch, RmsNorm};
pub use params::{FlatTensor, NamedParam};
pub use prompt::{PromptEncoder, PromptKind};

use attention::AttentionContext;
use prompt::Prompt;
use rope::Rope;

/// Added to attention scores where a query must not look (future or padding); finite, so a fully masked row (a
/// left-padding query) gives a uniform distribution instead of NaN.
const MASKED: f32 = -1.0e9;

/// Errors about a model's configuration or its inputs.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The configuration is malformed or inconsistent.
    #[error("invalid model configuration: {0}")]
    Config(String),
    /// The architecture or one of its options is not implemented.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// The inputs of a forward pass are inconsistent (ids out of range, mask of the wrong size).
    #[error("invalid model input: {0}")]
    Input(String),
}

/// `model.layers.{i}`: pre-norm attention and MLP blocks with residual connections.
#[derive(Module, Debug)]
pub struct LlamaDecoderLayer {
    /// Norm before attention.
    pub input_layernorm: RmsNorm,
    /// Grouped-query self-attention.
    pub self_attn: LlamaAttention,
    /// Norm before the MLP.
    pub post_attention_layernorm: RmsNorm,
    /// SwiGLU MLP.
    pub mlp: LlamaMlp,
}

impl LlamaDecoderLayer {
    /// # Shapes
    /// - `x`: `[batch, seq, hidden]` → same
    fn forward(
        &self,
        x: Tensor<3>,
        ctx: &AttentionContext,
        cache: Option<&mut cache::LayerCache>,
        prefix: Option<(Tensor<4>, Tensor<4>)>,
        prefixed: bool,
    ) -> Tensor<3> {
        let h = x.clone().add(
            self.self_attn
                .forward(self.input_layernorm.forward(x), ctx, cache, prefix, prefixed),
        );
        h.clone()
            .add(self.mlp.forward(self.post_attention_layernorm.forward(h)))
    }
}

/// `model`: embeddings, decoder layers and the final norm.
#[derive(Module, Debug)]
pub struct LlamaModel {
    /// `model.embed_tokens`.
    pub embed_tokens: Embedding,
    /// `model.layers.{i}`.
    pub layers: Vec<LlamaDecoderLayer>,
    /// `model.norm`.
    pub norm: RmsNorm,
    /// The full model's index of each entry of `layers` (`0..n` for a full model; an emulator keeps a subset of the
    /// layers under their original names).
    #[module(skip)]
    pub layer_ids: Vec<usize>,
}

/// A causal language model: `model` plus the LM head (`lm_head`, or the embedding matrix when tied).
#[derive(Module, Debug)]
pub struct LlamaForCausalLM {
    /// The decoder.
    pub model: LlamaModel,
    /// `lm_head` when untied; `None` means the head reuses `model.embed_tokens.weight`.
    pub lm_head: Option<Linear>,
    /// `prompt_encoder`: virtual tokens or attention prefixes (prompt tuning, P-tuning, prefix tuning), when
    /// attached.
    pub prompt_encoder: Option<PromptEncoder>,
    #[module(skip)]
    config: LlamaConfig,
    #[module(skip)]
    rope: Rope,
    /// Mixed precision: the tied LM head multiplies in f16 (projections carry their own flag).
    #[module(skip)]
    half: bool,
}

impl LlamaForCausalLM {
    /// Assembles a model from its parts; `lm_head` must be `None` exactly when the config ties embeddings.
    pub fn from_parts(config: LlamaConfig, model: LlamaModel, lm_head: Option<Linear>, device: &Device) -> Self {
        let rope = Rope::new(&config, device);
        Self {
            model,
            lm_head,
            prompt_encoder: None,
            config,
            rope,
            half: false,
        }
    }

    /// The same model on the inner device, sharing the parameter values: forward passes then record no autodiff
    /// graph (evaluation during training needs no more memory than inference).
    pub fn without_autodiff(&self) -> Self {
        self.valid()
    }

    /// Mixed precision on or off: every decoder projection and the LM head multiply in f16 (inputs and weights
    /// cast, outputs back to f32), while norms, rotary embeddings, attention softmax, residual sums and the loss
    /// stay in f32, as PyTorch's autocast does. Parameters and their gradients stay f32.
    pub fn set_half_matmuls(&mut self, on: bool) {
        for name in self.linear_names() {
            if let Some(l) = self.linear_mut(&name) {
                l.half = on;
            }
        }
        if let Some(head) = &mut self.lm_head {
            head.half = on;
        }
        self.half = on;
    }

    /// Whether [`LlamaForCausalLM::set_half_matmuls`] is on.
    pub fn half_matmuls(&self) -> bool {
        self.half
    }

    /// The architecture.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// The device the parameters live on.
    pub fn device(&self) -> Device {
        self.model.embed_tokens.device()
    }

    /// Logits of every position.
    ///
    /// `mask`, when given, says per row which of the new positions are real tokens (false: padding); padded keys
    /// are never attended to and positions count real tokens only, so left- and right-padded batches both work.
    /// With a cache, the new positions follow the cached ones and the cache is extended.
    ///
    /// # Shapes
    /// - `ids`: `[batch, seq]` → `[batch, seq, vocab]`
    pub fn forward(
        &self,
        ids: Tensor<2, Int>,
        mask: Option<&[Vec<bool>]>,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor<3>, ModelError> {
        let hidden = self.forward_hidden(ids, mask, cache)?;
        Ok(self.lm_head(hidden))
    }

    /// Hidden states after the final norm (the LM head's input).
    ///
    /// # Shapes
    /// - `ids`: `[batch, seq]` → `[batch, seq, hidden]`
    pub fn forward_hidden(
        &self,
        ids: Tensor<2, Int>,
        mask: Option<&[Vec<bool>]>,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor<3>, ModelError> {
        let (_, x) = self.decode(ids, mask, cache, self.model.layers.len(), &[])?;
        Ok(self.model.norm.forward(x))
    }

    /// The residual stream after the first `layers` decoder layers of this model (`0`: the embeddings), without the
    /// final norm; later layers are not run.
    ///
    /// # Shapes
    /// - `ids`: `[batch, seq]` → `[batch, seq, hidden]`
    pub fn hidden_after(
        &self,
        ids: Tensor<2, Int>,
        mask: Option<&[Vec<bool>]>,
        layers: usize,
    ) -> Result<Tensor<3>, ModelError> {
        Ok(self.decode(ids, mask, None, layers, &[])?.1)
    }

    /// The residual stream after the first `taps[k]` decoder layers, for each `k`, from one pass that stops at the
    /// last boundary asked for (`taps` ascending).
    ///
    /// # Shapes
    /// - `ids`: `[batch, seq]` → each `[batch, seq, hidden]`
    pub fn hidden_at(
        &self,
        ids: Tensor<2, Int>,
        mask: Option<&[Vec<bool>]>,
        taps: &[usize],
    ) -> Result<Vec<Tensor<3>>, ModelError> {
        let until = taps.last().copied().unwrap_or(0);
        Ok(self.decode(ids, mask, None, until, taps)?.0)
    }

    /// Logits, and the residual stream after the first `taps[k]` decoder layers for each `k` (ascending), from one
    /// pass.
    ///
    /// # Shapes
    /// - `ids`: `[batch, seq]` → each `[batch, seq, hidden]`, `[batch, seq, vocab]`
    pub fn forward_tapped(
        &self,
        ids: Tensor<2, Int>,
        mask: Option<&[Vec<bool>]>,
        taps: &[usize],
    ) -> Result<(Vec<Tensor<3>>, Tensor<3>), ModelError> {
        let (tapped, x) = self.decode(ids, mask, None, self.model.layers.len(), taps)?;
        Ok((tapped, self.lm_head(self.model.norm.forward(x))))
    }

    /// Runs the first `until` decoder layers; returns the residual stream after `taps[k]` layers for each `k`
    /// (ascending, at most `until`) and after `until` layers, virtual-token positions removed.
    fn decode(
        &self,
        ids: Tensor<2, Int>,
        mask: Option<&[Vec<bool>]>,
        mut cache: Option<&mut KvCache>,
        until: usize,
        taps: &[usize],
    ) -> Result<(Vec<Tensor<3>>, Tensor<3>), ModelError> {
        let depth = self.model.layers.len();
        let ascending = taps.windows(2).all(|w| w[0] < w[1]);
        if until > depth || taps.iter().any(|&t| t > until) || !ascending || (until < depth && cache.is_some()) {
            return Err(ModelError::Input(format!(
                "cannot stop after {until} of {depth} layers (taps {taps:?}, cache: {})",
                cache.is_some()
            )));
        }
        let [batch, seq] = ids.dims();
        let device = ids.device();
        let mut new_valid: Vec<Vec<bool>> = match mask {
            Some(m) => {
                if m.len() != batch || m.iter().any(|r| r.len() != seq) {
                    return Err(ModelError::Input(format!(
                        "attention mask must be {batch} rows of {seq}"
                    )));
                }
                m.to_vec()
            }
            None => vec![vec![true; seq]; batch],
        };
        if let Some(c) = cache.as_deref() {
            if c.valid.len() != batch {
                return Err(ModelError::Input(format!(
                    "cache holds {} rows, batch has {batch}",
                    c.valid.len()
                )));
            }
        }
        // The prompt enters once: on a call without a cache, or on the first call that fills one.
        let fresh = cache.as_deref().is_none_or(KvCache::is_empty);
        let prompt = match &self.prompt_encoder {
            Some(enc) if fresh => Some(enc.prompt(
                batch,
                &self.model.layer_ids,
                self.config.num_key_value_heads,
                self.config.head_dim,
            )),
            _ => None,
        };
        let prefix_len = match &self.prompt_encoder {
            Some(enc) if enc.kind() == PromptKind::Prefix => enc.num_virtual_tokens(),
            _ => 0,
        };
        let mut x = self.model.embed_tokens.forward(ids);
        let mut virtual_tokens = 0;
        let mut prefixes = vec![None; self.model.layers.len()];
        let mut past: Vec<Vec<bool>> = match cache.as_deref() {
            Some(c) => c.valid.clone(),
            None => vec![Vec::new(); batch],
        };
        match prompt {
            Some(Prompt::Tokens(t)) => {
                virtual_tokens = t.dims()[1];
                x = Tensor::cat(vec![t, x], 1);
                for row in &mut new_valid {
                    row.splice(0..0, std::iter::repeat_n(true, virtual_tokens));
                }
            }
            Some(Prompt::Prefix(kv)) => {
                past = vec![vec![true; prefix_len]; batch];
                match cache.as_deref_mut() {
                    // The prefix becomes the first cached positions; layers without one hold zeros there,
                    // masked out below.
                    Some(c) => {
                        let capacity = KvCache::capacity_for(prefix_len + seq);
                        for (layer, p) in c.layers.iter_mut().zip(kv) {
                            let (k, v) = p.unwrap_or_else(|| {
                                let shape = [batch, self.config.num_key_value_heads, prefix_len, self.config.head_dim];
                                (Tensor::zeros(shape, &device), Tensor::zeros(shape, &device))
                            });
                            layer.append(k, v, 0, capacity);
                        }
                        c.valid = past.clone();
                    }
                    None => prefixes = kv,
                }
            }
            None => {}
        }
        let seq = seq + virtual_tokens;
        let past_len = past.first().map_or(0, Vec::len);
        let valid: Vec<Vec<bool>> = past
            .iter()
            .zip(&new_valid)
            .map(|(p, n)| [p.as_slice(), n].concat())
            .collect();
        let keys = if cache.is_some() {
            KvCache::capacity_for(past_len + seq)
        } else {
            past_len + seq
        };
        let (positions, bias) = positions_and_mask(&valid, past_len, seq, keys);
        let positions = Tensor::<2, Int>::from_data(TensorData::new(positions, [batch, seq]), &device);
        let (cos, sin) = self.rope.cos_sin(positions);
        let mask = Tensor::<4>::from_data(TensorData::new(bias, [batch, 1, seq, keys]), &device);
        // Layers without a prefix must not see the prefix positions: without a cache they have no such keys, with
        // one those slots hold zeros.
        let unprefixed_mask = (prefix_len > 0).then(|| {
            if cache.is_some() {
                mask.clone().slice_assign(
                    [0..batch, 0..1, 0..seq, 0..prefix_len],
                    Tensor::full([batch, 1, seq, prefix_len], MASKED, &device),
                )
            } else {
                mask.clone().slice([0..batch, 0..1, 0..seq, prefix_len..keys])
            }
        });
        let ctx = AttentionContext {
            cos,
            sin,
            mask,
            unprefixed_mask,
            past: past_len,
        };
        let prefixed = |id: &usize| match &self.prompt_encoder {
            Some(enc) if enc.kind() == PromptKind::Prefix => enc.layers().contains(id),
            _ => false,
        };
        let strip = |x: Tensor<3>| {
            if virtual_tokens > 0 {
                let hidden = x.dims()[2];
                x.slice([0..batch, virtual_tokens..seq, 0..hidden])
            } else {
                x
            }
        };
        let mut tapped = Vec::with_capacity(taps.len());
        for ((i, layer), prefix) in self.model.layers.iter().enumerate().zip(prefixes).take(until) {
            if taps.contains(&i) {
                tapped.push(strip(x.clone()));
            }
            let layer_cache = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            let id = &self.model.layer_ids[i];
            x = layer.forward(x, &ctx, layer_cache, prefix, prefixed(id));
        }
        if taps.contains(&until) {
            tapped.push(strip(x.clone()));
        }
        if let Some(c) = cache {
            c.valid = valid;
        }
        Ok((tapped, strip(x)))
    }

    /// Applies the LM head (tied or not).
    ///
    /// # Shapes
    /// - `hidden`: `[batch, seq, hidden]` → `[batch, seq, vocab]`
    pub fn lm_head(&self, hidden: Tensor<3>) -> Tensor<3> {
        match &self.lm_head {
            Some(head) => head.forward(hidden),
            None => {
                let [b, s, h] = hidden.dims();
                let logits = self.model.embed_tokens.head(hidden.reshape([b * s, h]), self.half);
                let vocab = logits.dims()[1];
                logits.reshape([b, s, vocab])
            }
        }
    }

    /// Hugging Face module names of every decoder projection (`model.layers.{i}.self_attn.q_proj`, ...), in layer
    /// order. The LM head is not included (PEFT's `all-linear` leaves it out too).
    pub fn linear_names(&self) -> Vec<String> {
        self.model
            .layer_ids
            .iter()
            .flat_map(|&i| PROJECTIONS.iter().map(move |p| format!("model.layers.{i}.{p}")))
            .collect()
    }

    /// The projection with that Hugging Face module name.
    pub fn linear(&self, name: &str) -> Option<&Linear> {
        let (i, part) = split_layer_name(name)?;
        let pos = self.model.layer_ids.iter().position(|&id| id == i)?;
        let layer = &self.model.layers[pos];
        let (a, m) = (&layer.self_attn, &layer.mlp);
        Some(match part {
            "self_attn.q_proj" => &a.q_proj,
            "self_attn.k_proj" => &a.k_proj,
            "self_attn.v_proj" => &a.v_proj,
            "self_attn.o_proj" => &a.o_proj,
            "mlp.gate_proj" => &m.gate_proj,
            "mlp.up_proj" => &m.up_proj,
            "mlp.down_proj" => &m.down_proj,
            _ => return None,
        })
    }

    /// The projection with that Hugging Face module name, mutably.
    pub fn linear_mut(&mut self, name: &str) -> Option<&mut Linear> {
        let (i, part) = split_layer_name(name)?;
        let pos = self.model.layer_ids.iter().position(|&id| id == i)?;
        let layer = &mut self.model.layers[pos];
        let (a, m) = (&mut layer.self_attn, &mut layer.mlp);
        Some(match part {
            "self_attn.q_proj" => &mut a.q_proj,
            "self_attn.k_proj" => &mut a.k_proj,
            "self_attn.v_proj" => &mut a.v_proj,
            "self_attn.o_proj" => &mut a.o_proj,
            "mlp.gate_proj" => &mut m.gate_proj,
            "mlp.up_proj" => &mut m.up_proj,
            "mlp.down_proj" => &mut m.down_proj,
            _ => return None,
        })
    }

    /// Checks that every id is inside the vocabulary.
    pub fn check_ids(&self, ids: &[u32]) -> Result<(), ModelError> {
        match ids.iter().find(|&&id| id as usize >= self.config.vocab_size) {
            Some(id) => Err(ModelError::Input(format!(
                "token id {id} is outside the vocabulary ({})",
                self.config.vocab_size
            ))),
            None => Ok(()),
        }
    }
}

/// Projection names inside a decoder layer, as Hugging Face names them.
pub const PROJECTIONS: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// `model.layers.{i}.{part}` → `(i, part)`: the one parser of Hugging Face layer names.
pub fn split_layer_name(name: &str) -> Option<(usize, &str)> {
    let (i, part) = name.strip_prefix("model.layers.")?.split_once('.')?;
    Some((i.parse().ok()?, part))
}

/// `model.layers.{i}.…` → `i`.
pub fn layer_of(name: &str) -> Option<usize> {
    split_layer_name(name).map(|(i, _)| i)
}

/// Rotary positions of the new tokens (count of real tokens before each, per row) and the additive mask
/// `[batch, 1, seq, keys]` allowing each new query the real keys at or before it (`keys ≥ past + seq`; slots beyond
/// are unused cache capacity, always masked).
fn positions_and_mask(valid: &[Vec<bool>], past: usize, seq: usize, keys: usize) -> (Vec<i64>, Vec<f32>) {
    let total = keys;
    let mut positions = Vec::with_capacity(valid.len() * seq);
    let mut bias = Vec::with_capacity(valid.len() * seq * total);
    for row in valid {
        let mut seen = row[..past].iter().filter(|&&v| v).count() as i64;
        for i in 0..seq {
            positions.push((seen - if row[past + i] { 0 } else { 1 }).max(0));
            if row[past + i] {
                seen += 1;
            }
            let query = past + i;
            bias.extend((0..total).map(|j| if j <= query && row[j] { 0.0 } else { MASKED }));
        }
    }
    (positions, bias)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn left_padding_positions_count_real_tokens() {
        let valid = vec![vec![false, false, true, true], vec![true, true, true, true]];
        let (pos, bias) = positions_and_mask(&valid, 0, 4, 4);
        assert_eq!(pos, vec![0, 0, 0, 1, 0, 1, 2, 3]);
        // Row 0, query 2 sees only key 2.
        assert_eq!(&bias[8..12], &[MASKED, MASKED, 0.0, MASKED]);
        // Row 1, query 1 sees keys 0 and 1.
        assert_eq!(&bias[16 + 4..16 + 8], &[0.0, 0.0, MASKED, MASKED]);
    }

    #[test]
    fn cached_positions_continue() {
        let valid = vec![vec![true, true, true]];
        let (pos, bias) = positions_and_mask(&valid, 2, 1, 5);
        assert_eq!(pos, vec![2]);
        assert_eq!(bias, vec![0.0, 0.0, 0.0, MASKED, MASKED]);
    }
}
