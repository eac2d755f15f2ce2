//! Prompt learning inside the model: virtual tokens prepended to the input embeddings (prompt tuning, P-tuning) or
//! key/value prefixes prepended in the attention of chosen layers (prefix tuning), all produced by one
//! `prompt_encoder` module whose parameters are the only trainable ones.

use burn::module::Module;
use burn::tensor::activation::relu;
use burn::tensor::Tensor;

use super::layers::{Embedding, Linear};
use super::ModelError;

/// What the prompt encoder's output is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromptKind {
    /// `[virtual, hidden]` embeddings prepended to the input (prompt tuning: the table itself).
    Tokens,
    /// `[virtual, hidden]` embeddings prepended to the input, computed by an MLP from the table (P-tuning:
    /// `Linear → ReLU → Linear → ReLU → Linear`, PEFT's `mlp_head`).
    EncodedTokens,
    /// `[virtual, layers·2·kv_dim]` keys and values per prefixed layer (prefix tuning; the table itself, or
    /// `Linear → tanh → Linear` of it with the reparameterisation).
    Prefix,
}

/// `prompt_encoder`: a table of virtual-token parameters and an optional MLP over it.
#[derive(Module, Debug)]
pub struct PromptEncoder {
    /// `prompt_encoder.embedding.weight`: `[virtual, width]`.
    pub(crate) embedding: Embedding,
    /// `prompt_encoder.mlp_head.{i}`: empty, 2 (prefix reparameterisation) or 3 (P-tuning) projections.
    pub(crate) mlp_head: Vec<Linear>,
    /// What the output means.
    #[module(skip)]
    pub(crate) kind: PromptKind,
    /// For [`PromptKind::Prefix`]: the full-model indices of the prefixed layers, in the output's order.
    #[module(skip)]
    pub(crate) layers: Vec<usize>,
}

impl PromptEncoder {
    /// Assembles an encoder, checking that the pieces fit together: `mlp_head` is empty, or 3 projections for
    /// [`PromptKind::EncodedTokens`], or 2 for [`PromptKind::Prefix`], chained from the table's width to
    /// `out_width` (the hidden size for tokens, `layers·2·kv_dim` for a prefix).
    pub fn new(
        kind: PromptKind,
        table: Tensor<2>,
        mlp_head: Vec<Linear>,
        layers: Vec<usize>,
        out_width: usize,
    ) -> Result<Self, ModelError> {
        let expected = matches!(
            (kind, mlp_head.len()),
            (_, 0) | (PromptKind::EncodedTokens, 3) | (PromptKind::Prefix, 2)
        );
        if !expected {
            return Err(ModelError::Config(format!(
                "a {kind:?} prompt encoder cannot have {} MLP projections",
                mlp_head.len()
            )));
        }
        let mut width = table.dims()[1];
        for (i, l) in mlp_head.iter().enumerate() {
            if l.in_features() != width {
                return Err(ModelError::Config(format!(
                    "prompt_encoder.mlp_head.{i} takes {} features, gets {width}",
                    l.in_features()
                )));
            }
            width = l.out_features();
        }
        if width != out_width {
            return Err(ModelError::Config(format!(
                "the prompt encoder gives {width} features per virtual token, the model needs {out_width}"
            )));
        }
        if kind == PromptKind::Prefix && layers.is_empty() {
            return Err(ModelError::Config("prefix tuning needs at least one layer".into()));
        }
        Ok(Self {
            embedding: Embedding::new(table),
            mlp_head,
            kind,
            layers,
        })
    }

    /// What the output means.
    pub fn kind(&self) -> PromptKind {
        self.kind
    }

    /// Width of the MLP's hidden layer (the table's width without an MLP).
    pub fn hidden_width(&self) -> usize {
        self.mlp_head
            .first()
            .map_or(self.embedding.dims()[1], Linear::out_features)
    }

    /// The prefixed layers (full-model indices), for a prefix.
    pub fn layers(&self) -> &[usize] {
        &self.layers
    }

    /// Number of virtual tokens.
    pub fn num_virtual_tokens(&self) -> usize {
        self.embedding.dims()[0]
    }

    /// The encoder's output: virtual-token embeddings, or every prefixed layer's keys and values side by side
    /// (PEFT's layout: layer `j` keys at `[2j·kv, (2j+1)·kv)`, values right after).
    ///
    /// # Shapes
    /// - → `[virtual, hidden]` or `[virtual, layers·2·kv_dim]`
    pub fn output(&self) -> Tensor<2> {
        let table = self.embedding.to_f32();
        match (self.kind, self.mlp_head.as_slice()) {
            (_, []) => table,
            (PromptKind::EncodedTokens, [a, b, c]) => c.forward(relu(b.forward(relu(a.forward(table))))),
            (PromptKind::Prefix, [a, b]) => b.forward(a.forward(table).tanh()),
            // `new` admits only the shapes above.
            (_, other) => unreachable!("prompt encoder with {} projections", other.len()),
        }
    }
}

/// What one forward pass gets from the prompt encoder.
// One value per forward pass, moved, never stored in bulk: boxing the larger variant would only add an allocation.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Prompt {
    /// Embeddings to prepend, `[batch, virtual, hidden]`.
    Tokens(Tensor<3>),
    /// Per decoder layer (by position in `model.layers`), its prefix keys and values
    /// (`[batch, kv_heads, virtual, head_dim]` each), or `None` for a layer without one.
    Prefix(Vec<Option<(Tensor<4>, Tensor<4>)>>),
}

impl PromptEncoder {
    /// The prompt of a batch of `batch` rows for a model with these layers.
    pub(crate) fn prompt(&self, batch: usize, layer_ids: &[usize], kv_heads: usize, head_dim: usize) -> Prompt {
        let out = self.output();
        let [n, width] = out.dims();
        match self.kind {
            PromptKind::Tokens | PromptKind::EncodedTokens => Prompt::Tokens(out.unsqueeze::<3>().repeat_dim(0, batch)),
            PromptKind::Prefix => {
                let kv = kv_heads * head_dim;
                let per_layer = |j: usize, part: usize| {
                    let start = (2 * j + part) * kv;
                    out.clone()
                        .slice([0..n, start..start + kv])
                        .reshape([1, n, kv_heads, head_dim])
                        .swap_dims(1, 2)
                        .repeat_dim(0, batch)
                };
                debug_assert_eq!(width, self.layers.len() * 2 * kv);
                Prompt::Prefix(
                    layer_ids
                        .iter()
                        .map(|id| {
                            let j = self.layers.iter().position(|l| l == id)?;
                            Some((per_layer(j, 0), per_layer(j, 1)))
                        })
                        .collect(),
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Device, Int, TensorData};

    use super::*;
    use crate::model::{KvCache, LlamaForCausalLM};

    fn tiny() -> LlamaForCausalLM {
        // `$OFFSITE_FIXTURES`, by default `../shared/fixtures` beside the project root (as the end-to-end tests).
        let root = std::env::var_os("OFFSITE_FIXTURES")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures"));
        let dir = root.join("tiny-llama");
        crate::load::Checkpoint::open(&dir)
            .unwrap()
            .load_model(&Device::flex())
            .unwrap()
    }

    fn ids(model: &LlamaForCausalLM, ids: &[i64]) -> Tensor<2, Int> {
        Tensor::from_data(TensorData::new(ids.to_vec(), [1, ids.len()]), &model.device())
    }

    fn logits(model: &LlamaForCausalLM, x: &[i64]) -> Vec<f32> {
        model
            .forward(ids(model, x), None, None)
            .unwrap()
            .into_data()
            .try_into_vec()
            .unwrap()
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    }

    const PROMPT: [i64; 3] = [7, 101, 42];
    const TEXT: [i64; 5] = [5, 9, 33, 100, 2];

    /// Logits of `TEXT` when it follows `PROMPT` as ordinary tokens.
    fn after_prompt(model: &LlamaForCausalLM) -> Vec<f32> {
        let all: Vec<i64> = PROMPT.iter().chain(&TEXT).copied().collect();
        let vocab = model.config().vocab_size;
        logits(model, &all)[PROMPT.len() * vocab..].to_vec()
    }

    /// Last-position logits when `TEXT` is fed one token at a time through a KV cache.
    fn incremental_last(model: &LlamaForCausalLM) -> Vec<f32> {
        let mut cache = KvCache::new(model.model.layers.len(), 1);
        let mut last = Vec::new();
        for &t in &TEXT {
            last = model
                .forward(ids(model, &[t]), None, Some(&mut cache))
                .unwrap()
                .into_data()
                .try_into_vec()
                .unwrap();
        }
        last
    }

    /// The model's logits of `TEXT` equal `reference`, and through a cache, token by token, the last position agrees.
    fn reproduces(model: &LlamaForCausalLM, reference: &[f32]) {
        let got = logits(model, &TEXT);
        let d = max_diff(&got, reference);
        assert!(d < 1e-5, "max |diff| {d}");
        let vocab = model.config().vocab_size;
        let d = max_diff(&incremental_last(model), &got[got.len() - vocab..]);
        assert!(d < 1e-4, "cached vs uncached: max |diff| {d}");
    }

    #[test]
    fn virtual_tokens_equal_to_embeddings_reproduce_the_text_they_embed() {
        let mut model = tiny();
        let reference = after_prompt(&model);
        let table = model.model.embed_tokens.forward(ids(&model, &PROMPT)).reshape([3, 64]);
        model.prompt_encoder = Some(PromptEncoder::new(PromptKind::Tokens, table, Vec::new(), vec![], 64).unwrap());
        reproduces(&model, &reference);
    }

    #[test]
    fn prefixes_equal_to_cached_keys_and_values_reproduce_the_text_they_cache() {
        let mut model = tiny();
        let reference = after_prompt(&model);
        // Keys and values the model itself computes for PROMPT (rotated at positions 0..3).
        let mut cache = KvCache::new(2, 1);
        model.forward(ids(&model, &PROMPT), None, Some(&mut cache)).unwrap();
        let n = PROMPT.len();
        let mut parts = Vec::new();
        for layer in &cache.layers {
            let (k, v) = layer.kv.clone().unwrap();
            for t in [k, v] {
                // [1, kv_heads, capacity, head_dim] → [n, kv_heads · head_dim]
                parts.push(t.slice([0..1, 0..2, 0..n, 0..16]).swap_dims(1, 2).reshape([n, 32]));
            }
        }
        let table = Tensor::cat(parts, 1);
        model.prompt_encoder =
            Some(PromptEncoder::new(PromptKind::Prefix, table, Vec::new(), vec![0, 1], 2 * 2 * 32).unwrap());
        reproduces(&model, &reference);
    }

    #[test]
    fn a_prefix_on_some_layers_gives_the_same_answer_with_and_without_a_cache() {
        let mut model = tiny();
        let plain = logits(&model, &TEXT);
        let table = Tensor::random(
            [4, 2 * 32],
            burn::tensor::Distribution::Normal(0.0, 1.0),
            &model.device(),
        );
        model.prompt_encoder = Some(PromptEncoder::new(PromptKind::Prefix, table, Vec::new(), vec![1], 64).unwrap());
        let got = logits(&model, &TEXT);
        assert!(max_diff(&got, &plain) > 1e-3, "the prefix changed nothing");
        let vocab = model.config().vocab_size;
        let d = max_diff(&incremental_last(&model), &got[got.len() - vocab..]);
        assert!(d < 1e-4, "cached vs uncached: max |diff| {d}");
    }

    #[test]
    fn encoders_refuse_pieces_that_do_not_fit() {
        let device = Device::flex();
        let table = || Tensor::<2>::zeros([3, 8], &device);
        let lin = |i, o| Linear::new(Tensor::zeros([i, o], &device), None);
        assert!(PromptEncoder::new(PromptKind::Tokens, table(), vec![lin(8, 8)], vec![], 8).is_err());
        assert!(PromptEncoder::new(
            PromptKind::EncodedTokens,
            table(),
            vec![lin(8, 4), lin(4, 4), lin(4, 8)],
            vec![],
            8
        )
        .is_ok());
        let err = PromptEncoder::new(
            PromptKind::EncodedTokens,
            table(),
            vec![lin(8, 4), lin(5, 4), lin(4, 8)],
            vec![],
            8,
        );
        assert!(err.unwrap_err().to_string().contains("mlp_head.1"));
        assert!(PromptEncoder::new(PromptKind::Prefix, table(), vec![], vec![], 8).is_err());
        assert!(PromptEncoder::new(PromptKind::Tokens, table(), vec![], vec![], 16).is_err());
    }
}
