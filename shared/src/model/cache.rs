//! Key/value cache for incremental decoding.

use burn::tensor::Tensor;

/// Keys and values of one layer for every position seen so far.
#[derive(Debug, Default)]
pub(crate) struct LayerCache {
    kv: Option<(Tensor<4>, Tensor<4>)>,
}

impl LayerCache {
    /// Appends this step's keys and values and returns the whole history.
    ///
    /// # Shapes
    /// - `k`, `v`: `[batch, kv_heads, seq, head_dim]` → `[batch, kv_heads, past + seq, head_dim]` each
    pub(crate) fn append(&mut self, k: Tensor<4>, v: Tensor<4>) -> (Tensor<4>, Tensor<4>) {
        let (k, v) = match self.kv.take() {
            Some((pk, pv)) => (Tensor::cat(vec![pk, k], 2), Tensor::cat(vec![pv, v], 2)),
            None => (k, v),
        };
        self.kv = Some((k.clone(), v.clone()));
        (k, v)
    }
}

/// The cache of every layer, plus the attention mask of every cached position.
#[derive(Debug)]
pub struct KvCache {
    pub(crate) layers: Vec<LayerCache>,
    /// Per batch row, whether each cached position is a real token (false: padding).
    pub(crate) valid: Vec<Vec<bool>>,
}

impl KvCache {
    /// An empty cache for a model with `num_layers` layers and a batch of `batch` rows.
    pub fn new(num_layers: usize, batch: usize) -> Self {
        Self { layers: (0..num_layers).map(|_| LayerCache::default()).collect(), valid: vec![Vec::new(); batch] }
    }

    /// Number of positions already cached.
    pub fn len(&self) -> usize {
        self.valid.first().map_or(0, Vec::len)
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
