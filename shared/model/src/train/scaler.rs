//! Dynamic loss scaling for mixed precision (as PyTorch's `GradScaler`): the loss is multiplied by a scale before
//! the backward pass so small gradients survive f16, the gradients are divided by it again, and the scale halves on
//! overflow (that step is skipped) and doubles after a run of good steps.

use serde::{Deserialize, Serialize};

use super::Precision;

/// The scale a mixed-precision run starts with.
const INITIAL: f64 = 4096.0;
/// The largest scale (f16's largest finite value is 65504).
const MAX: f64 = 65536.0;
/// Good steps in a row before the scale doubles.
const GROWTH_INTERVAL: usize = 200;

/// The current loss scale and its bookkeeping.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct LossScaler {
    /// Factor applied to the loss before the backward pass (1 in f32).
    pub scale: f64,
    /// Good steps since the last change.
    pub good_steps: usize,
}

impl LossScaler {
    /// The scaler a run of this precision starts with.
    pub fn new(precision: Precision) -> Self {
        let scale = match precision {
            Precision::F32 => 1.0,
            Precision::MixedF16 => INITIAL,
        };
        Self { scale, good_steps: 0 }
    }

    /// After a step whose gradients were `finite`. Returns true when a non-finite step is explained by the scale
    /// (it was reduced; the step is skipped without counting as a failure).
    pub fn update(&mut self, finite: bool) -> bool {
        if !finite {
            self.good_steps = 0;
            if self.scale > 1.0 {
                self.scale = (self.scale / 2.0).max(1.0);
                return true;
            }
            return false;
        }
        if self.scale > 1.0 || self.good_steps > 0 {
            self.good_steps += 1;
            if self.good_steps >= GROWTH_INTERVAL {
                self.scale = (self.scale * 2.0).min(MAX);
                self.good_steps = 0;
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn halves_on_overflow_and_grows_after_good_steps() {
        let mut s = LossScaler::new(Precision::MixedF16);
        assert!(s.update(false));
        assert_eq!(s.scale, INITIAL / 2.0);
        for _ in 0..GROWTH_INTERVAL - 1 {
            assert!(!s.update(true));
        }
        assert_eq!(s.scale, INITIAL / 2.0);
        s.update(true);
        assert_eq!(s.scale, INITIAL);
        // At scale 1 an overflow is a real failure.
        let mut f = LossScaler::new(Precision::F32);
        assert!(!f.update(false));
        assert!(!f.update(true));
        assert_eq!(f.scale, 1.0);
    }
}
