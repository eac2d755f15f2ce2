//! Grouped-query self-attention (`self_attn`) and the SwiGLU MLP (`mlp`) of a decoder layer.

use burn::module::Module;
use burn::tensor::activation::softmax;
use burn::tensor::Tensor;

use super::cache::LayerCache;
use super::layers::Linear;
use super::rope::apply_rotary;
use super::swiglu::swiglu;

/// `model.layers.{i}.self_attn`: q/k/v/o projections with grouped-query attention.
#[derive(Module, Debug)]
pub struct LlamaAttention {
    /// `[heads·head_dim, hidden]` (+ bias for Qwen2).
    pub q_proj: Linear,
    /// `[kv_heads·head_dim, hidden]`.
    pub k_proj: Linear,
    /// `[kv_heads·head_dim, hidden]`.
    pub v_proj: Linear,
    /// `[hidden, heads·head_dim]`.
    pub o_proj: Linear,
    #[module(skip)]
    pub(crate) num_heads: usize,
    #[module(skip)]
    pub(crate) num_kv_heads: usize,
    #[module(skip)]
    pub(crate) head_dim: usize,
}

/// What every layer of one forward pass shares: rotary tables and the additive attention mask.
pub(crate) struct AttentionContext {
    /// `[batch, 1, seq, head_dim]`.
    pub cos: Tensor<4>,
    /// `[batch, 1, seq, head_dim]`.
    pub sin: Tensor<4>,
    /// `[batch, 1, seq, keys]`: 0 where a query may attend, a large negative number elsewhere. `keys` is
    /// `past + seq` without a cache, the cache's capacity with one.
    pub mask: Tensor<4>,
    /// The mask for layers without an attention prefix when the model has one (the prefix positions masked out or
    /// cut off); `None` when no layer has a prefix.
    pub unprefixed_mask: Option<Tensor<4>>,
    /// Positions already in the cache.
    pub past: usize,
}

impl LlamaAttention {
    /// `prefix`: this layer's prefix keys and values (prefix tuning), prepended to the keys and values when there is
    /// no cache (with a cache they are its first positions already). `prefixed`: whether this layer has a prefix at
    /// all (with or without a cache).
    ///
    /// # Shapes
    /// - `x`: `[batch, seq, hidden]` → `[batch, seq, hidden]`
    /// - `prefix`: `[batch, kv_heads, virtual, head_dim]` each
    pub(crate) fn forward(
        &self,
        x: Tensor<3>,
        ctx: &AttentionContext,
        cache: Option<&mut LayerCache>,
        prefix: Option<(Tensor<4>, Tensor<4>)>,
        prefixed: bool,
    ) -> Tensor<3> {
        let [b, s, _] = x.dims();
        let (nh, nkv, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let heads = |t: Tensor<3>, n: usize| t.reshape([b, s, n, d]).swap_dims(1, 2);
        let q = apply_rotary(heads(self.q_proj.forward(x.clone()), nh), &ctx.cos, &ctx.sin);
        let k = apply_rotary(heads(self.k_proj.forward(x.clone()), nkv), &ctx.cos, &ctx.sin);
        let v = heads(self.v_proj.forward(x), nkv);
        let (k, v) = match (cache, prefix) {
            (Some(cache), _) => cache.append(k, v, ctx.past, ctx.mask.dims()[3]),
            (None, Some((pk, pv))) => (Tensor::cat(vec![pk, k], 2), Tensor::cat(vec![pv, v], 2)),
            (None, None) => (k, v),
        };
        let mask = match &ctx.unprefixed_mask {
            Some(m) if !prefixed => m.clone(),
            _ => ctx.mask.clone(),
        };
        let t = k.dims()[2];
        let rep = nh / nkv;
        // Group the query heads that share a KV head instead of repeating K and V in memory.
        let q = q.reshape([b, nkv, rep * s, d]);
        let scores = q.matmul(k.swap_dims(2, 3)).mul_scalar(1.0 / (d as f64).sqrt());
        let scores = scores.reshape([b, nh, s, t]).add(mask);
        let probs = softmax(scores, 3).reshape([b, nkv, rep * s, t]);
        let out = probs
            .matmul(v)
            .reshape([b, nh, s, d])
            .swap_dims(1, 2)
            .reshape([b, s, nh * d]);
        self.o_proj.forward(out)
    }
}

/// `model.layers.{i}.mlp`: `down(silu(gate(x)) · up(x))`.
#[derive(Module, Debug)]
pub struct LlamaMlp {
    /// `[intermediate, hidden]`.
    pub gate_proj: Linear,
    /// `[intermediate, hidden]`.
    pub up_proj: Linear,
    /// `[hidden, intermediate]`.
    pub down_proj: Linear,
}

impl LlamaMlp {
    /// # Shapes
    /// - `x`: `[batch, seq, hidden]` → `[batch, seq, hidden]`
    pub(crate) fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let gated = swiglu(self.gate_proj.forward(x.clone()), self.up_proj.forward(x));
        self.down_proj.forward(gated)
    }
}
