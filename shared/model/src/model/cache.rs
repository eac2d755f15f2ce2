//! Key/value cache for incremental decoding.
//!
//! The cache grows in blocks of [`BLOCK`] positions and attention always runs over the whole capacity, unused slots
//! masked out: tensor shapes then change once per block instead of once per token, so GPU backends tune and compile
//! their kernels for a handful of shapes rather than for every context length.

use burn::tensor::Tensor;

/// Positions added to the capacity at a time.
pub(crate) const BLOCK: usize = 128;

/// Keys and values of one layer, `[batch, kv_heads, capacity, head_dim]` each.
#[derive(Debug, Default)]
pub(crate) struct LayerCache {
    pub(super) kv: Option<(Tensor<4>, Tensor<4>)>,
}

impl LayerCache {
    /// Writes this step's keys and values at `past..past + seq` (growing the buffers to `capacity` when needed) and
    /// returns the whole buffers.
    ///
    /// # Shapes
    /// - `k`, `v`: `[batch, kv_heads, seq, head_dim]` → `[batch, kv_heads, capacity, head_dim]` each
    pub(crate) fn append(
        &mut self,
        k: Tensor<4>,
        v: Tensor<4>,
        past: usize,
        capacity: usize,
    ) -> (Tensor<4>, Tensor<4>) {
        let [b, h, s, d] = k.dims();
        let device = k.device();
        let grow = |buf: Option<Tensor<4>>| -> Tensor<4> {
            match buf {
                Some(t) if t.dims()[2] >= capacity => t,
                Some(t) => {
                    let have = t.dims()[2];
                    Tensor::cat(vec![t, Tensor::zeros([b, h, capacity - have, d], &device)], 2)
                }
                None => Tensor::zeros([b, h, capacity, d], &device),
            }
        };
        let (pk, pv) = match self.kv.take() {
            Some((pk, pv)) => (Some(pk), Some(pv)),
            None => (None, None),
        };
        let range = [0..b, 0..h, past..past + s, 0..d];
        let keys = grow(pk).slice_assign(range.clone(), k);
        let values = grow(pv).slice_assign(range, v);
        self.kv = Some((keys.clone(), values.clone()));
        (keys, values)
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
        Self {
            layers: (0..num_layers).map(|_| LayerCache::default()).collect(),
            valid: vec![Vec::new(); batch],
        }
    }

    /// Number of positions already cached.
    pub fn len(&self) -> usize {
        self.valid.first().map_or(0, Vec::len)
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Buffer length needed to hold `total` positions.
    pub(crate) fn capacity_for(total: usize) -> usize {
        total.div_ceil(BLOCK) * BLOCK
    }
}
