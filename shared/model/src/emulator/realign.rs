//! Re-alignment of a trained adapter to the full model, on the server, on the operator's public data.
//!
//! Clients train the adapter inside the emulator, whose compressed middle is only a stand-in for the full model's;
//! plugged into the full model as it is, the adapter does part of what it did on the emulator. Re-alignment moves
//! what the adapter *does* rather than its weights (as proxy-tuning moves a small model's tuning onto a large one):
//! the adapter, plugged into the full model, is trained so that the full model's next-token distribution becomes
//! `softmax(full + α · (emulator with adapter − emulator))`, the full model's logits shifted by what the adapter
//! changed on the emulator. Only the server runs it, with its own models and public text; no client data is used.

use std::sync::{Arc, Mutex};

use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use super::distill::kl_div;
use crate::data::{Batch, Example};
use crate::model::LlamaForCausalLM;
use crate::train::{Objective, StepReport, TrainConfig, TrainError, Trainer};

/// The `[realign]` table of a federation or bench config; its presence turns re-alignment on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RealignConfig {
    /// Optimizer steps.
    pub steps: usize,
    /// Sequences per step.
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// Tokens per block of the public text.
    #[serde(default = "default_len")]
    pub max_len: usize,
    /// Peak learning rate (AdamW, linear warmup then cosine decay to a tenth).
    #[serde(default = "default_lr")]
    pub lr: f64,
    /// Warmup steps.
    #[serde(default)]
    pub warmup_steps: usize,
    /// α: how much of the emulator's logit shift the target adds to the full model's logits.
    #[serde(default = "default_scale")]
    pub shift_scale: f64,
    /// Global gradient-norm clipping.
    #[serde(default = "default_clip")]
    pub max_grad_norm: f64,
    /// Seed of the batch order.
    #[serde(default)]
    pub seed: u64,
}

fn default_batch() -> usize {
    4
}
fn default_len() -> usize {
    128
}
fn default_lr() -> f64 {
    1e-4
}
fn default_scale() -> f64 {
    1.0
}
fn default_clip() -> f64 {
    1.0
}

impl RealignConfig {
    /// Checks the values a TOML file may hold but that cannot work.
    pub fn check(&self) -> Result<(), TrainError> {
        if self.steps == 0 || self.batch_size == 0 {
            return Err(TrainError::Config(
                "realign.steps and realign.batch_size must be ≥ 1".into(),
            ));
        }
        if self.max_len < 2 {
            return Err(TrainError::Config("realign.max_len must be at least 2".into()));
        }
        for (name, v) in [
            ("lr", self.lr),
            ("shift_scale", self.shift_scale),
            ("max_grad_norm", self.max_grad_norm),
        ] {
            if !v.is_finite() || v < 0.0 {
                return Err(TrainError::Config(format!("realign.{name} {v} must be finite and ≥ 0")));
            }
        }
        Ok(())
    }
}

/// The frozen models re-alignment reads, all on one inner (non-autodiff) device.
pub struct RealignTeachers {
    /// The full model without the adapter.
    pub full: LlamaForCausalLM,
    /// The emulator without the adapter.
    pub emulator: LlamaForCausalLM,
    /// The emulator with the adapter, as the clients left it.
    pub adapted: LlamaForCausalLM,
}

/// One re-alignment step, for progress and logs.
#[derive(Debug, Clone, Serialize)]
pub struct RealignStep {
    /// 1-based step.
    pub step: usize,
    /// `KL(target ‖ full model with adapter)` per token.
    pub kl: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Whether the step was skipped (non-finite loss or gradient).
    pub skipped: bool,
}

/// `full + α · (adapted − emulator)`: the target logits of a batch.
///
/// # Shapes
/// - `batch` of `[batch, seq]` ids → `[batch, seq, vocab]`
fn target_logits(t: &RealignTeachers, batch: &Batch, alpha: f64) -> Result<Tensor<3>, TrainError> {
    let logits = |m: &LlamaForCausalLM| m.forward(batch.ids_tensor(&m.device()), Some(&batch.mask), None);
    let shift = logits(&t.adapted)?.sub(logits(&t.emulator)?);
    Ok(logits(&t.full)?.add(shift.mul_scalar(alpha)))
}

/// Trains the adapter of `student` (the full model with the adapter plugged in, on an autodiff device, only the
/// adapter trainable) toward [`target_logits`] on `examples` (the operator's public text); returns it.
pub fn realign(
    student: LlamaForCausalLM,
    teachers: RealignTeachers,
    settings: &RealignConfig,
    examples: &[Example],
    on_step: &mut dyn FnMut(&RealignStep),
) -> Result<LlamaForCausalLM, TrainError> {
    settings.check()?;
    let alpha = settings.shift_scale;
    let kl_sum = Arc::new(Mutex::new((0.0f64, 0usize)));
    let record = kl_sum.clone();
    let objective = Objective(Arc::new(move |model: &LlamaForCausalLM, batch: &Batch| {
        let target = target_logits(&teachers, batch, alpha)?;
        let logits = model.forward(batch.ids_tensor(&model.device()), Some(&batch.mask), None)?;
        let kl = kl_div(logits, Tensor::<3>::from_inner(target), &batch.mask);
        if let Ok(mut s) = record.lock() {
            s.0 += kl.clone().into_scalar::<f32>() as f64;
            s.1 += 1;
        }
        Ok(kl)
    }));
    let config = TrainConfig {
        steps: settings.steps,
        batch_size: settings.batch_size,
        grad_accum: 1,
        lr: settings.lr,
        min_lr: settings.lr / 10.0,
        warmup_steps: settings.warmup_steps,
        max_grad_norm: Some(settings.max_grad_norm),
        seed: settings.seed,
        ..TrainConfig::default()
    };
    let mut trainer = Trainer::new(config)?.with_objective(objective);
    trainer.run(student, examples, &mut |r: &StepReport| {
        let (sum, n) = kl_sum.lock().map(|mut s| std::mem::take(&mut *s)).unwrap_or_default();
        on_step(&RealignStep {
            step: r.step + 1,
            kl: sum / n.max(1) as f64,
            grad_norm: r.grad_norm,
            lr: r.lr,
            skipped: r.skipped,
        });
    })
}

#[cfg(test)]
mod tests {
    use burn::tensor::Device;

    use super::*;
    use crate::adapters::{AdapterSpec, Method};
    use offsite_fed::Params;

    use crate::federated::{adapter_state, plug_state};

    fn tiny(device: &Device) -> LlamaForCausalLM {
        let root = std::env::var_os("OFFSITE_FIXTURES")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures"));
        crate::load::Checkpoint::open(&root.join("tiny-llama"))
            .unwrap()
            .load_model(device)
            .unwrap()
    }

    fn spec() -> AdapterSpec {
        AdapterSpec {
            method: Method::Layers,
            lora: None,
            prompt: None,
        }
    }

    /// The adapter state of the tiny model's two layers, `shift` times noise added to every value.
    fn state(shift: f32) -> Params {
        let (model, _) = spec().prepare(tiny(&Device::flex().autodiff()), &[0, 1], None).unwrap();
        let mut state = adapter_state(&model).unwrap();
        let noise = crate::testing::uniform(1 << 20, 3);
        for t in state.values_mut() {
            for (v, n) in t.values.iter_mut().zip(&noise) {
                *v += shift * n;
            }
        }
        state
    }

    /// The tiny model with `state` plugged in as a trainable adapter.
    fn with_adapter(device: &Device, state: &Params) -> LlamaForCausalLM {
        plug_state(tiny(device), &[0, 1], &spec(), state).unwrap()
    }

    fn examples() -> Vec<Example> {
        (0..8u32)
            .map(|i| {
                let ids: Vec<u32> = (0..16).map(|j| (i * 37 + j * 11) % 200 + 3).collect();
                Example {
                    labels: ids.iter().map(|&t| t as i64).collect(),
                    ids,
                    category: None,
                }
            })
            .collect()
    }

    fn settings(steps: usize) -> RealignConfig {
        RealignConfig {
            steps,
            batch_size: 2,
            max_len: 16,
            lr: 3e-3,
            warmup_steps: 0,
            shift_scale: 1.0,
            max_grad_norm: 10.0,
            seed: 0,
        }
    }

    /// With the full model as its own "emulator", the target is the adapted model itself: an adapter that starts
    /// there has nothing to learn, and one that starts from the plain model learns its way toward it.
    #[test]
    fn with_a_perfect_emulator_the_target_is_the_adapted_model() {
        let device = Device::flex();
        let ad = device.clone().autodiff();
        let (trained, plain) = (state(0.05), state(0.0));
        let teachers = || RealignTeachers {
            full: tiny(&device),
            emulator: tiny(&device),
            adapted: with_adapter(&device, &trained),
        };
        let mut kl = Vec::new();
        realign(
            with_adapter(&ad, &trained),
            teachers(),
            &settings(1),
            &examples(),
            &mut |s| kl.push(s.kl),
        )
        .unwrap();
        assert!(kl[0].abs() < 1e-5, "already at the target: KL {}", kl[0]);
        let mut kl = Vec::new();
        realign(
            with_adapter(&ad, &plain),
            teachers(),
            &settings(30),
            &examples(),
            &mut |s| kl.push(s.kl),
        )
        .unwrap();
        assert!(
            kl[0] > 1e-3,
            "the plain model differs from the adapted one: KL {}",
            kl[0]
        );
        let last = kl[kl.len() - 2..].iter().sum::<f64>() / 2.0;
        assert!(last < 0.3 * kl[0], "KL {} → {last}", kl[0]);
    }

    #[test]
    fn settings_that_cannot_work_are_refused() {
        assert!(settings(1).check().is_ok());
        assert!(settings(0).check().is_err());
        let nan = RealignConfig {
            shift_scale: f64::NAN,
            ..settings(1)
        };
        assert!(nan.check().unwrap_err().to_string().contains("shift_scale"));
    }
}
