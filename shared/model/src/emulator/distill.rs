//! Emulator distillation (offsite-tuning's "emulator distillation"): the kept middle layers are trained so that the
//! hidden state they hand to the top adapter layers matches the full model's at the same boundary, on public data
//! the operator names. Loss: normalised MSE `Σ‖h_emu − h_full‖² / Σ‖h_full‖²` over real tokens, plus an optional
//! weight times the language-modelling loss of the whole emulator. Only the kept middle layers train; the
//! embeddings, adapter layers, norm and head stay as in the full model.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use burn::tensor::{Device, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use super::{EmulatorConfig, EmulatorError};
use crate::data::{Batch, Example};
use crate::load::{Checkpoint, F32Tensor};
use crate::model::layer_of;
use crate::model::LlamaForCausalLM;
use crate::train::{causal_lm_loss, Objective, StepReport, TrainConfig, TrainError, Trainer};

/// The `[distill]` table of an emulator config; its presence turns distillation on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistillConfig {
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
    /// Weight of the emulator's language-modelling loss added to the normalised MSE (0: MSE only).
    #[serde(default)]
    pub lm_weight: f64,
    /// Weight of `KL(full model ‖ emulator)` of the next-token distributions, mean over tokens, added to the loss
    /// (0: none; the full model then runs only up to the top adapter layers).
    #[serde(default)]
    pub kl_weight: f64,
    /// Global gradient-norm clipping.
    #[serde(default = "default_clip")]
    pub max_grad_norm: f64,
    /// Seed of the batch order.
    #[serde(default)]
    pub seed: u64,
    /// Where the emulator is matched to the full model.
    #[serde(default)]
    pub kd_at: KdAt,
    /// How a boundary's error is normalised.
    #[serde(default)]
    pub kd_norm: KdNorm,
}

/// How the squared error at a boundary is normalised.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KdNorm {
    /// `Σ‖h_emu − h_full‖² / Σ‖h_full‖²` over the batch's tokens: the tokens of largest norm (in LLaMA-family
    /// models the first position's "massive activations", hundreds of times the others) dominate.
    #[default]
    Batch,
    /// The mean over tokens of `‖h_emu,t − h_full,t‖² / ‖h_full,t‖²`: every token's relative error weighs the same,
    /// as each next layer sees its input through a per-token RMSNorm.
    Token,
}

/// The layer boundaries distillation matches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KdAt {
    /// Only the boundary below the top adapter layers (offsite-tuning's emulator distillation).
    #[default]
    Top,
    /// After every kept middle layer: each learns to stand for the block of layers it replaces (from itself up to
    /// the next kept layer, or to the top adapter layers); the loss is the mean of the boundaries' normalised MSEs.
    EveryLayer,
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
fn default_clip() -> f64 {
    1.0
}

impl DistillConfig {
    /// The `[distill]` table of an emulator config file, when present (unknown keys are named).
    pub fn from_toml(text: &str) -> Result<Option<Self>, EmulatorError> {
        #[derive(Deserialize)]
        struct File {
            distill: Option<DistillConfig>,
        }
        let file: File = toml::from_str(text).map_err(|e| EmulatorError::Config(e.to_string()))?;
        if let Some(d) = &file.distill {
            for (name, w) in [("lm_weight", d.lm_weight), ("kl_weight", d.kl_weight)] {
                if w < 0.0 || !w.is_finite() {
                    return Err(EmulatorError::Config(format!("distill.{name} {w} must be ≥ 0")));
                }
            }
            if d.max_len < 2 {
                return Err(EmulatorError::Config("distill.max_len must be at least 2".into()));
            }
        }
        Ok(file.distill)
    }
}

/// One distillation step, for progress and the loss log.
#[derive(Debug, Clone, Serialize)]
pub struct DistillStep {
    /// 1-based step.
    pub step: usize,
    /// `mse + lm_weight · lm + kl_weight · kl`.
    pub loss: f64,
    /// Normalised MSE at the boundary.
    pub mse: f64,
    /// The emulator's language-modelling loss (computed only when `lm_weight > 0`).
    pub lm: Option<f64>,
    /// `KL(full model ‖ emulator)` per token (computed only when `kl_weight > 0`).
    pub kl: Option<f64>,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Whether the step was skipped (non-finite loss or gradient).
    pub skipped: bool,
}

/// The loss terms of the forward passes of one step (gradient accumulation makes several), summed.
#[derive(Default)]
struct Parts {
    mse: f64,
    lm: f64,
    kl: f64,
    n: usize,
}

/// Where a distillation keeps its progress so that a killed one resumes: the kept middle layers and the optimizer
/// state, every `every` steps.
pub struct DistillCheckpoint<'a> {
    /// The directory (created when first saved).
    pub dir: &'a Path,
    /// What is distilled (model, settings, data): a checkpoint of another key is started over, never resumed.
    pub key: &'a str,
    /// Save every this many steps.
    pub every: usize,
}

const MIDDLE_FILE: &str = "middle.safetensors";
const KEY_FILE: &str = "key";

impl DistillCheckpoint<'_> {
    /// The step a resumed distillation starts at: the checkpoint's, when it is complete and of this key.
    pub fn step(&self) -> Option<usize> {
        let key = std::fs::read_to_string(self.dir.join(KEY_FILE)).ok()?;
        if key != self.key {
            return None;
        }
        let (_, meta) = offsite_fed::read_safetensors(&self.dir.join(MIDDLE_FILE)).ok()?;
        let step: usize = meta.get("step")?.parse().ok()?;
        // The optimizer state is written after the layers: both must be of the same step.
        let trainer = Trainer::load(self.dir, &Device::flex()).ok()?;
        (trainer.step() == step).then_some(step)
    }

    fn save(&self, student: &LlamaForCausalLM, trainer: &Trainer) -> Result<(), EmulatorError> {
        let err = |reason: String| EmulatorError::File {
            path: self.dir.to_path_buf(),
            reason,
        };
        std::fs::create_dir_all(self.dir).map_err(|e| err(e.to_string()))?;
        offsite_fed::write_atomic(&self.dir.join(KEY_FILE), self.key.as_bytes()).map_err(|e| err(e.to_string()))?;
        let state = crate::federated::adapter_state(student).map_err(|e| err(e.to_string()))?;
        let meta = HashMap::from([("step".to_string(), trainer.step().to_string())]);
        offsite_fed::write_safetensors(&self.dir.join(MIDDLE_FILE), &[("", &state)], meta)
            .map_err(|e| err(e.to_string()))?;
        trainer.save(self.dir).map_err(|e| err(e.to_string()))
    }

    fn load(&self, student: LlamaForCausalLM, device: &Device) -> Result<(LlamaForCausalLM, Trainer), EmulatorError> {
        let err = |reason: String| EmulatorError::File {
            path: self.dir.to_path_buf(),
            reason,
        };
        let (state, _) = offsite_fed::read_safetensors(&self.dir.join(MIDDLE_FILE)).map_err(|e| err(e.to_string()))?;
        let student = crate::federated::load_state(student, &state).map_err(|e| err(e.to_string()))?;
        let trainer = Trainer::load(self.dir, device).map_err(|e| err(e.to_string()))?;
        Ok((student, trainer))
    }
}

/// The distilled middle layers, by Hugging Face name and in Hugging Face layout, for [`super::build_distilled`].
pub struct DistilledLayers(pub(super) HashMap<String, F32Tensor>);

impl DistilledLayers {
    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The positions `mask` keeps as weights 1/0 beside `like` (`[batch, seq, 1]`), and how many it keeps (at least 1).
fn token_weights(mask: &[Vec<bool>], like: &Tensor<3>) -> (Tensor<3>, f32) {
    let [batch, seq, _] = like.dims();
    let w: Vec<f32> = mask.iter().flatten().map(|&m| if m { 1.0 } else { 0.0 }).collect();
    let kept = w.iter().sum::<f32>().max(1.0);
    (
        Tensor::<3>::from_data(TensorData::new(w, [batch, seq, 1]), &like.device()),
        kept,
    )
}

/// `Σ w‖a − b‖² / Σ w‖b‖²` (`KdNorm::Batch`) or `Σ_t w_t ‖a_t − b_t‖² / ‖b_t‖² / Σ_t w_t` (`KdNorm::Token`) over
/// the positions `mask` keeps.
///
/// # Shapes
/// - `a`, `b`: `[batch, seq, hidden]` → `[1]`
fn normalised_mse(a: Tensor<3>, b: Tensor<3>, mask: &[Vec<bool>], norm: KdNorm) -> Tensor<1> {
    let (w, kept) = token_weights(mask, &a);
    match norm {
        KdNorm::Batch => {
            let err = a.sub(b.clone()).square().mul(w.clone()).sum();
            let scale = b.square().mul(w).sum().add_scalar(1e-12);
            err.div(scale).reshape([1])
        }
        KdNorm::Token => {
            let err = a.sub(b.clone()).square().sum_dim(2);
            let scale = b.square().sum_dim(2).add_scalar(1e-12);
            err.div(scale).mul(w).sum().div_scalar(kept).reshape([1])
        }
    }
}

/// Mean over the positions `mask` keeps of `KL(softmax(teacher) ‖ softmax(student))`.
///
/// # Shapes
/// - `student`, `teacher`: `[batch, seq, vocab]` → `[1]`
fn kl_div(student: Tensor<3>, teacher: Tensor<3>, mask: &[Vec<bool>]) -> Tensor<1> {
    use burn::tensor::activation::log_softmax;
    let (w, kept) = token_weights(mask, &student);
    let log_p = log_softmax(teacher, 2);
    let p = log_p.clone().exp();
    let per_token = p.mul(log_p.sub(log_softmax(student, 2))).sum_dim(2);
    per_token.mul(w).sum().div_scalar(kept).reshape([1])
}

/// The boundaries distillation matches, as layer counts of the emulator (`layers`: the full-model indices it
/// keeps; `middle`: its kept middle ones) and of the full model, ascending. The last pair is always the boundary
/// below the top adapter layers.
fn boundaries(layers: &[usize], middle: &[usize], depth: usize, top: usize, at: KdAt) -> (Vec<usize>, Vec<usize>) {
    let top_pair = (layers.len() - top, depth - top);
    match at {
        KdAt::Top => (vec![top_pair.0], vec![top_pair.1]),
        KdAt::EveryLayer => {
            let bottom = layers.len() - top - middle.len();
            // After kept middle layer j the emulator has run bottom + j + 1 layers; the block it stands for ends
            // where the next kept layer starts (or below the top adapter layers).
            (0..middle.len())
                .map(|j| (bottom + j + 1, middle.get(j + 1).copied().unwrap_or(top_pair.1)))
                .unzip()
        }
    }
}

/// Trains the middle layers `config` keeps so the emulator matches the full model at the boundary below its top
/// adapter layers. `device` is the inner device (the student trains on its autodiff twin). With `resume`, progress
/// is saved there and a run killed earlier continues from its last save (the data order depends only on the seed
/// and the step, so the result is the uninterrupted run's).
pub fn distill(
    checkpoint: &Checkpoint,
    config: &EmulatorConfig,
    settings: &DistillConfig,
    examples: &[Example],
    device: &Device,
    resume: Option<&DistillCheckpoint<'_>>,
    on_step: &mut dyn FnMut(&DistillStep),
) -> Result<DistilledLayers, EmulatorError> {
    let depth = checkpoint.config().num_hidden_layers;
    let layers = config.choose_layers(depth)?;
    let middle: Vec<usize> = layers
        .iter()
        .copied()
        .filter(|&i| i >= config.bottom_layers && i < depth - config.top_layers)
        .collect();
    if middle.is_empty() {
        return Err(EmulatorError::Config(
            "the emulator keeps no middle layer: nothing to distil".into(),
        ));
    }
    let teacher = checkpoint.load_model(device)?;
    let mut student = checkpoint.load_model(&device.clone().autodiff())?;
    let keep: Vec<bool> = student.model.layer_ids.iter().map(|i| layers.contains(i)).collect();
    let mut flags = keep.iter();
    student.model.layers.retain(|_| *flags.next().unwrap_or(&false));
    student.model.layer_ids = layers.clone();
    let student = student.with_trainable(&|n: &str| layer_of(n).is_some_and(|i| middle.contains(&i)));
    let (student_taps, teacher_taps) = boundaries(&layers, &middle, depth, config.top_layers, settings.kd_at);
    let (lm_weight, kl_weight) = (settings.lm_weight, settings.kl_weight);
    let kd_norm = settings.kd_norm;
    let parts = Arc::new(Mutex::new(Parts::default()));
    let record = parts.clone();
    let objective = Objective(Arc::new(move |model: &LlamaForCausalLM, batch: &Batch| {
        let teacher_ids = batch.ids_tensor(&teacher.device());
        let (targets, teacher_logits) = if kl_weight > 0.0 {
            let (t, logits) = teacher.forward_tapped(teacher_ids, Some(&batch.mask), &teacher_taps)?;
            (t, Some(logits))
        } else {
            (teacher.hidden_at(teacher_ids, Some(&batch.mask), &teacher_taps)?, None)
        };
        let ids = batch.ids_tensor(&model.device());
        let (hidden, lm, kl) = if lm_weight > 0.0 || kl_weight > 0.0 {
            let (hidden, logits) = model.forward_tapped(ids, Some(&batch.mask), &student_taps)?;
            let lm = if lm_weight > 0.0 {
                Some(causal_lm_loss(logits.clone(), &batch.labels)?)
            } else {
                None
            };
            let kl = teacher_logits.map(|t| kl_div(logits, Tensor::<3>::from_inner(t), &batch.mask));
            (hidden, lm, kl)
        } else {
            (model.hidden_at(ids, Some(&batch.mask), &student_taps)?, None, None)
        };
        let n = hidden.len().max(1) as f64;
        let mse = hidden
            .into_iter()
            .zip(targets)
            .map(|(h, t)| normalised_mse(h, Tensor::<3>::from_inner(t), &batch.mask, kd_norm))
            .reduce(|a, b| a.add(b))
            .ok_or_else(|| TrainError::Config("no distillation boundary".into()))?
            .div_scalar(n);
        let value = |t: &Option<Tensor<1>>| t.as_ref().map_or(0.0, |l| l.clone().into_scalar::<f32>() as f64);
        if let Ok(mut p) = record.lock() {
            p.mse += mse.clone().into_scalar::<f32>() as f64;
            p.lm += value(&lm);
            p.kl += value(&kl);
            p.n += 1;
        }
        let mut loss = mse;
        if let Some(lm) = lm {
            loss = loss.add(lm.mul_scalar(lm_weight));
        }
        if let Some(kl) = kl {
            loss = loss.add(kl.mul_scalar(kl_weight));
        }
        Ok(loss)
    }));
    let train = TrainConfig {
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
    let train_err = |e: TrainError| EmulatorError::Config(format!("distillation: {e}"));
    let (mut student, trainer) = match resume {
        Some(c) if c.step().is_some() => {
            let (student, trainer) = c.load(student, device)?;
            tracing::info!(step = trainer.step(), dir = %c.dir.display(), "resuming the distillation");
            (student, trainer)
        }
        _ => (student, Trainer::new(train).map_err(train_err)?),
    };
    let mut trainer = trainer.with_objective(objective);
    let mut report = |r: &StepReport| {
        let p = parts.lock().map(|mut p| std::mem::take(&mut *p)).unwrap_or_default();
        let n = p.n.max(1) as f64;
        on_step(&DistillStep {
            step: r.step + 1,
            loss: r.loss,
            mse: p.mse / n,
            lm: (lm_weight > 0.0).then_some(p.lm / n),
            kl: (kl_weight > 0.0).then_some(p.kl / n),
            grad_norm: r.grad_norm,
            lr: r.lr,
            skipped: r.skipped,
        });
    };
    let every = resume.map_or(settings.steps, |c| c.every).max(1);
    while trainer.step() < settings.steps {
        let until = (trainer.step() / every + 1) * every;
        student = trainer
            .run_until(student, examples, until, &mut report)
            .map_err(train_err)?;
        if let Some(c) = resume {
            c.save(&student, &trainer)?;
        }
    }
    let tensors = student
        .hf_tensors(&|n: &str| layer_of(n).is_some_and(|i| middle.contains(&i)))
        .map_err(|e| EmulatorError::Config(e.to_string()))?;
    Ok(DistilledLayers(
        tensors
            .into_iter()
            .map(|(name, data, shape)| (name, F32Tensor { data, shape }))
            .collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalised_mse_is_relative_and_skips_padding() {
        let device = Device::flex();
        let b = Tensor::<3>::from_floats([[[3.0, 4.0], [100.0, 0.0]]], &device);
        let a = Tensor::<3>::from_floats([[[3.0, 5.0], [0.0, 0.0]]], &device);
        // Only the first position counts: ‖(0, 1)‖² / ‖(3, 4)‖² = 1 / 25.
        for norm in [KdNorm::Batch, KdNorm::Token] {
            let v = normalised_mse(a.clone(), b.clone(), &[vec![true, false]], norm).into_scalar::<f32>();
            assert!((v - 0.04).abs() < 1e-7, "{norm:?}: {v}");
        }
    }

    #[test]
    fn per_token_normalisation_weighs_every_token_alike() {
        let device = Device::flex();
        // A large token with a small relative error and a small one with a large relative error.
        let b = Tensor::<3>::from_floats([[[30.0, 40.0], [0.3, 0.4]]], &device);
        let a = Tensor::<3>::from_floats([[[30.0, 45.0], [0.3, 0.9]]], &device);
        let mask = [vec![true, true]];
        // Batch: (25 + 0.25) / (2500 + 0.25); token: (25 / 2500 + 0.25 / 0.25) / 2.
        let batch = normalised_mse(a.clone(), b.clone(), &mask, KdNorm::Batch).into_scalar::<f32>();
        let token = normalised_mse(a, b, &mask, KdNorm::Token).into_scalar::<f32>();
        assert!((batch - 25.25 / 2500.25).abs() < 1e-6, "{batch}");
        assert!((token - 0.505).abs() < 1e-6, "{token}");
    }

    #[test]
    fn kl_matches_a_direct_computation_and_skips_padding() {
        let device = Device::flex();
        let t = [[1.0f32, 2.0, 0.5], [0.0, 0.0, 0.0]];
        let s = [[0.5f32, 2.5, -1.0], [9.0, -9.0, 0.0]];
        let softmax = |x: &[f32; 3]| {
            let z: f32 = x.iter().map(|v| v.exp()).sum();
            x.map(|v| v.exp() / z)
        };
        let (p, q) = (softmax(&t[0]), softmax(&s[0]));
        let want: f32 = (0..3).map(|i| p[i] * (p[i] / q[i]).ln()).sum();
        let kl = kl_div(
            Tensor::<3>::from_floats([s], &device),
            Tensor::<3>::from_floats([t], &device),
            &[vec![true, false]],
        )
        .into_scalar::<f32>();
        assert!((kl - want).abs() < 1e-6 && want > 0.01, "{kl} vs {want}");
    }

    #[test]
    fn every_kept_layer_stands_for_the_block_up_to_the_next_kept_one() {
        // 10 layers, 2 + 2 adapter layers, middle 2..8 of which 2, 5, 7 are kept.
        let layers = [0, 1, 2, 5, 7, 8, 9];
        let (s, t) = boundaries(&layers, &[2, 5, 7], 10, 2, KdAt::EveryLayer);
        // Emulator after 3 layers (0, 1, 2) ↔ full model after 5 (0–4); after 4 ↔ 7; after 5 ↔ 8.
        assert_eq!((s, t), (vec![3, 4, 5], vec![5, 7, 8]));
        assert_eq!(boundaries(&layers, &[2, 5, 7], 10, 2, KdAt::Top), (vec![5], vec![8]));
    }

    #[test]
    fn the_table_is_optional_and_checked() {
        assert_eq!(
            DistillConfig::from_toml("[emulator]\nbottom_layers = 1\n").unwrap(),
            None
        );
        let d = DistillConfig::from_toml("[distill]\nsteps = 5\nlm_weight = 0.5\n")
            .unwrap()
            .unwrap();
        assert_eq!((d.steps, d.batch_size, d.max_len, d.lm_weight), (5, 4, 128, 0.5));
        assert_eq!(d.kd_at, KdAt::Top);
        let d = DistillConfig::from_toml("[distill]\nsteps = 5\nkd_at = \"every_layer\"\n")
            .unwrap()
            .unwrap();
        assert_eq!((d.kd_at, d.kd_norm), (KdAt::EveryLayer, KdNorm::Batch));
        let d = DistillConfig::from_toml("[distill]\nsteps = 5\nkd_norm = \"token\"\n")
            .unwrap()
            .unwrap();
        assert_eq!(d.kd_norm, KdNorm::Token);
        let err = DistillConfig::from_toml("[distill]\nsteps = 5\nlr_max = 1\n").unwrap_err();
        assert!(err.to_string().contains("lr_max"), "{err}");
        assert!(DistillConfig::from_toml("[distill]\nsteps = 5\nlm_weight = -1\n").is_err());
        assert!(DistillConfig::from_toml("[distill]\nsteps = 5\nkl_weight = nan\n").is_err());
    }
}
