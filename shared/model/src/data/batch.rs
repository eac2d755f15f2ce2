//! Held-out splits and padded batches.

use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::Example;
use crate::train::IGNORE_INDEX;

/// A right-padded batch: padding has mask `false` and label [`IGNORE_INDEX`].
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// `batch` rows of `seq` ids (padding filled with 0).
    pub ids: Vec<Vec<u32>>,
    /// Which positions are real tokens.
    pub mask: Vec<Vec<bool>>,
    /// Labels, [`IGNORE_INDEX`] on prompt tokens and padding.
    pub labels: Vec<Vec<i64>>,
}

impl Batch {
    /// The ids as a tensor on `device`.
    ///
    /// # Shapes
    /// - → `[batch, seq]`
    pub fn ids_tensor(&self, device: &burn::tensor::Device) -> burn::tensor::Tensor<2, burn::tensor::Int> {
        let (b, s) = (self.ids.len(), self.ids.first().map_or(0, Vec::len));
        let flat: Vec<i64> = self.ids.iter().flatten().map(|&x| x as i64).collect();
        burn::tensor::Tensor::from_data(burn::tensor::TensorData::new(flat, [b, s]), device)
    }

    /// Pads `examples` to the longest.
    pub fn new(examples: &[&Example]) -> Self {
        let seq = examples.iter().map(|e| e.ids.len()).max().unwrap_or(0);
        let pad = |e: &Example| {
            let n = e.ids.len();
            let mut ids = e.ids.clone();
            ids.resize(seq, 0);
            let mut labels = e.labels.clone();
            labels.resize(seq, IGNORE_INDEX);
            let mask = (0..seq).map(|i| i < n).collect();
            (ids, mask, labels)
        };
        let (mut ids, mut mask, mut labels) = (Vec::new(), Vec::new(), Vec::new());
        for e in examples {
            let (i, m, l) = pad(e);
            ids.push(i);
            mask.push(m);
            labels.push(l);
        }
        Self { ids, mask, labels }
    }

    /// Number of positions whose next token is predicted and counted (labels after the first, not ignored).
    pub fn target_tokens(&self) -> usize {
        self.labels
            .iter()
            .map(|r| r.iter().skip(1).filter(|&&l| l != IGNORE_INDEX).count())
            .sum()
    }
}

/// Splits off `fraction` of the examples (at least one when there are two or more) for evaluation, after a seeded
/// shuffle. Returns `(train, held_out)`.
pub fn split_holdout(mut examples: Vec<Example>, fraction: f64, seed: u64) -> (Vec<Example>, Vec<Example>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    examples.shuffle(&mut rng);
    let n = examples.len();
    let k = ((n as f64 * fraction).round() as usize).clamp(usize::from(fraction > 0.0 && n > 1), n.saturating_sub(1));
    let held = examples.split_off(n - k);
    (examples, held)
}

/// Batches of `size` over `examples`, in an order shuffled by `seed` when given.
pub fn batches(examples: &[Example], size: usize, seed: Option<u64>) -> Vec<Batch> {
    let mut order: Vec<&Example> = examples.iter().collect();
    if let Some(seed) = seed {
        order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
    }
    order.chunks(size.max(1)).map(Batch::new).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(n: usize) -> Example {
        Example {
            ids: (1..=n as u32).collect(),
            labels: (1..=n as i64).map(|i| if i == 1 { IGNORE_INDEX } else { i }).collect(),
            category: None,
        }
    }

    #[test]
    fn padding_is_masked_and_ignored() {
        let (a, b) = (ex(3), ex(5));
        let batch = Batch::new(&[&a, &b]);
        assert_eq!(batch.ids[0], vec![1, 2, 3, 0, 0]);
        assert_eq!(batch.mask[0], vec![true, true, true, false, false]);
        assert_eq!(batch.labels[0], vec![IGNORE_INDEX, 2, 3, IGNORE_INDEX, IGNORE_INDEX]);
        assert_eq!(batch.target_tokens(), 2 + 4);
    }

    #[test]
    fn holdout_is_seeded_and_disjoint() {
        let all: Vec<Example> = (2..22).map(ex).collect();
        let (train, held) = split_holdout(all.clone(), 0.1, 7);
        assert_eq!((train.len(), held.len()), (18, 2));
        assert_eq!(split_holdout(all.clone(), 0.1, 7).1, held);
        assert!(held.iter().all(|h| !train.contains(h)));
        assert_eq!(split_holdout(all, 0.001, 7).1.len(), 1);
    }
}
