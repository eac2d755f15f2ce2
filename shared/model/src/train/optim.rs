//! AdamW (Loshchilov & Hutter, PyTorch's `torch.optim.AdamW` semantics) over flattened parameters keyed by Hugging
//! Face name, so its state can be saved, resumed and (later) aggregated by name. Plus the warmup + cosine schedule.

use std::collections::HashMap;

use burn::tensor::Tensor;

use super::AdamWConfig;

/// Per-parameter moments.
#[derive(Debug, Clone)]
pub struct Moments {
    /// First moment (`exp_avg`).
    pub m: Tensor<1>,
    /// Second moment (`exp_avg_sq`).
    pub v: Tensor<1>,
    /// Updates applied to this parameter.
    pub step: u64,
}

/// AdamW state: moments by parameter name.
#[derive(Debug, Clone, Default)]
pub struct AdamW {
    /// Settings.
    pub config: AdamWConfig,
    /// Moments by Hugging Face name.
    pub state: HashMap<String, Moments>,
}

impl AdamW {
    /// Fresh state.
    pub fn new(config: AdamWConfig) -> Self {
        Self {
            config,
            state: HashMap::new(),
        }
    }

    /// One update of `param` (flattened, `matrix` says whether weight decay applies) with `grad` at rate `lr`;
    /// returns the new value.
    pub fn update(&mut self, name: &str, param: Tensor<1>, grad: Tensor<1>, lr: f64, matrix: bool) -> Tensor<1> {
        let c = &self.config;
        let moments = self.state.entry(name.to_string()).or_insert_with(|| Moments {
            m: grad.zeros_like(),
            v: grad.zeros_like(),
            step: 0,
        });
        moments.step += 1;
        let t = moments.step as i32;
        moments.m = moments
            .m
            .clone()
            .mul_scalar(c.beta1)
            .add(grad.clone().mul_scalar(1.0 - c.beta1));
        moments.v = moments
            .v
            .clone()
            .mul_scalar(c.beta2)
            .add(grad.square().mul_scalar(1.0 - c.beta2));
        let bias1 = 1.0 - c.beta1.powi(t);
        let bias2 = 1.0 - c.beta2.powi(t);
        let denom = moments.v.clone().div_scalar(bias2).sqrt().add_scalar(c.eps);
        let step = moments.m.clone().div_scalar(bias1).div(denom).mul_scalar(lr);
        let decayed = if matrix && c.weight_decay > 0.0 {
            param.mul_scalar(1.0 - lr * c.weight_decay)
        } else {
            param
        };
        decayed.sub(step)
    }
}

/// Learning-rate schedule: linear warmup from 0 over `warmup` steps, then cosine decay from `lr` to `min_lr` at
/// step `total`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    /// Peak rate.
    pub lr: f64,
    /// Final rate.
    pub min_lr: f64,
    /// Warmup steps.
    pub warmup: usize,
    /// Total optimizer steps.
    pub total: usize,
}

impl Schedule {
    /// The rate of 0-based optimizer step `step`.
    pub fn at(&self, step: usize) -> f64 {
        if step < self.warmup {
            return self.lr * (step + 1) as f64 / self.warmup as f64;
        }
        let span = self.total.saturating_sub(self.warmup).max(1);
        let progress = ((step - self.warmup) as f64 / span as f64).min(1.0);
        self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, TensorData};

    fn t(v: &[f32]) -> Tensor<1> {
        Tensor::from_data(TensorData::new(v.to_vec(), [v.len()]), &Device::flex())
    }

    #[test]
    fn adamw_matches_the_pytorch_update() {
        // torch.optim.AdamW(lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01), two steps on p=[1, -2]
        // with grads [0.5, -1] then [0.25, 2], computed by hand from the published algorithm.
        let mut opt = AdamW::new(AdamWConfig {
            weight_decay: 0.01,
            ..Default::default()
        });
        let mut p = t(&[1.0, -2.0]);
        let mut expect = [1.0f64, -2.0];
        let (mut m, mut v) = ([0.0f64; 2], [0.0f64; 2]);
        for (step, g) in [[0.5f64, -1.0], [0.25, 2.0]].iter().enumerate() {
            p = opt.update("w", p, t(&[g[0] as f32, g[1] as f32]), 0.1, true);
            let k = step as i32 + 1;
            for i in 0..2 {
                expect[i] *= 1.0 - 0.1 * 0.01;
                m[i] = 0.9 * m[i] + 0.1 * g[i];
                v[i] = 0.999 * v[i] + 0.001 * g[i] * g[i];
                let mh = m[i] / (1.0 - 0.9f64.powi(k));
                let vh = v[i] / (1.0 - 0.999f64.powi(k));
                expect[i] -= 0.1 * mh / (vh.sqrt() + 1e-8);
            }
        }
        let got: Vec<f32> = p.into_data().try_into_vec().unwrap();
        for (g, e) in got.iter().zip(expect) {
            assert!((*g as f64 - e).abs() < 1e-6, "{g} vs {e}");
        }
    }

    #[test]
    fn schedule_warms_up_then_decays_to_min() {
        let s = Schedule {
            lr: 1.0,
            min_lr: 0.1,
            warmup: 4,
            total: 14,
        };
        assert_eq!(s.at(0), 0.25);
        assert_eq!(s.at(3), 1.0);
        assert!((s.at(4) - 1.0).abs() < 1e-12);
        assert!((s.at(9) - 0.55).abs() < 1e-12);
        assert!((s.at(14) - 0.1).abs() < 1e-12);
        assert!((s.at(99) - 0.1).abs() < 1e-12);
    }
}
