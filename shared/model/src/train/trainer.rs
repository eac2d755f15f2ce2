//! The local training loop: gradient accumulation over micro-batches, global gradient-norm clipping, AdamW with a
//! warmup + cosine schedule, skipping of non-finite steps, and checkpoints that resume the same run.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use burn::tensor::{Tensor, TensorData};
use serde::{Deserialize, Serialize};

use super::optim::{AdamW, Moments, Schedule};
use super::scaler::LossScaler;
use super::{causal_lm_loss, TrainError};
use super::{Precision, TrainConfig};
use crate::data::{batches, Batch, Example};
use crate::model::LlamaForCausalLM;

/// What one optimizer step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    /// 0-based step index.
    pub step: usize,
    /// Token-weighted mean loss over the micro-batches.
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Whether the update was skipped because the loss or a gradient was not finite.
    pub skipped: bool,
    /// Tokens the loss counted.
    pub tokens: usize,
}

/// A training loss other than the causal-LM loss, computed per micro-batch from the model (on an autodiff device)
/// and the batch; the trainer weights micro-batches by their target tokens as usual.
#[derive(Clone)]
pub struct Objective(
    #[allow(clippy::type_complexity)]
    pub  Arc<dyn Fn(&LlamaForCausalLM, &Batch) -> Result<Tensor<1>, TrainError> + Send + Sync>,
);

impl std::fmt::Debug for Objective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Objective(..)")
    }
}

/// Training state: optimizer, step counter, non-finite bookkeeping.
#[derive(Debug, Clone)]
pub struct Trainer {
    config: TrainConfig,
    optim: AdamW,
    step: usize,
    nonfinite_run: usize,
    skipped: usize,
    /// FedProx: μ and the global parameters the proximal term pulls towards (not checkpointed: a federated round
    /// starts a fresh trainer).
    proximal: Option<(f64, HashMap<String, Tensor<1>>)>,
    /// The loss, when not the causal-LM loss (not checkpointed either).
    objective: Option<Objective>,
    /// Loss scaling (mixed precision).
    scaler: LossScaler,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TrainerState {
    format_version: u32,
    step: usize,
    skipped: usize,
    nonfinite_run: usize,
    config: TrainConfig,
    /// Absent in files from before mixed precision.
    #[serde(default)]
    scaler: Option<LossScaler>,
}

/// A number whose mix with the seed seeds the backend RNG (dropout) for one micro-batch.
fn rng_seed(seed: u64, step: usize, micro: usize) -> u64 {
    let mut x = seed ^ ((step as u64) << 20) ^ micro as u64;
    // splitmix64 finaliser.
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d049bb133111eb);
    x ^ (x >> 31)
}

impl Trainer {
    /// A fresh run.
    pub fn new(config: TrainConfig) -> Result<Self, TrainError> {
        if config.batch_size == 0 || config.grad_accum == 0 || config.steps == 0 {
            return Err(TrainError::Config(
                "steps, batch_size and grad_accum must be positive".into(),
            ));
        }
        if !(config.lr > 0.0 && config.lr.is_finite()) {
            return Err(TrainError::Config(format!("lr {} must be positive", config.lr)));
        }
        Ok(Self {
            scaler: LossScaler::new(config.precision),
            optim: AdamW::new(config.adamw.clone()),
            config,
            step: 0,
            nonfinite_run: 0,
            skipped: 0,
            proximal: None,
            objective: None,
        })
    }

    /// Trains on `objective` instead of the causal-LM loss (emulator distillation).
    pub fn with_objective(mut self, objective: Objective) -> Self {
        self.objective = Some(objective);
        self
    }

    /// The same run extended (or shortened) to `steps` optimizer steps; the schedule follows the new total.
    pub fn with_steps(mut self, steps: usize) -> Self {
        self.config.steps = steps;
        self
    }

    /// Adds FedProx's proximal term μ/2·‖w − anchor‖² to the objective; `anchor` holds the global value of each
    /// trainable parameter by name (flattened, on the model's device).
    pub fn with_proximal(mut self, mu: f64, anchor: HashMap<String, Tensor<1>>) -> Self {
        self.proximal = (mu > 0.0).then_some((mu, anchor));
        self
    }

    /// Settings.
    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// Optimizer steps taken so far (applied or skipped).
    pub fn step(&self) -> usize {
        self.step
    }

    /// Steps skipped for non-finite values.
    pub fn skipped(&self) -> usize {
        self.skipped
    }

    /// The learning-rate schedule.
    pub fn schedule(&self) -> Schedule {
        Schedule {
            lr: self.config.lr,
            min_lr: self.config.min_lr,
            warmup: self.config.warmup_steps,
            total: self.config.steps,
        }
    }

    /// Token-weighted loss and summed gradients of `micro` batches (model on an autodiff device).
    fn gradients(
        &self,
        model: &LlamaForCausalLM,
        micro: &[Batch],
    ) -> Result<(f64, usize, BTreeMap<String, Tensor<1>>), TrainError> {
        let device = model.device();
        let total: usize = micro.iter().map(Batch::target_tokens).sum();
        if total == 0 {
            return Err(TrainError::Config("a step's batches hold no target token".into()));
        }
        let mut loss_sum = 0.0;
        // Ordered by name, so sums over parameters (the global norm) run in the same order every time.
        let mut acc: BTreeMap<String, Tensor<1>> = BTreeMap::new();
        for (i, batch) in micro.iter().enumerate() {
            let tokens = batch.target_tokens();
            if tokens == 0 {
                continue;
            }
            device.seed(rng_seed(self.config.seed, self.step, i));
            let loss = match &self.objective {
                Some(objective) => (objective.0)(model, batch)?,
                None => {
                    let logits = model.forward(batch.ids_tensor(&device), Some(&batch.mask), None)?;
                    causal_lm_loss(logits, &batch.labels)?
                }
            };
            let weight = tokens as f64 / total as f64;
            let value: f32 = loss
                .clone()
                .try_into_scalar::<f32>()
                .map_err(|e| TrainError::Device(format!("{e:?}")))?;
            loss_sum += value as f64 * weight;
            let grads = loss.mul_scalar(weight * self.scaler.scale).backward();
            for (name, g) in model.named_grads(&grads) {
                let g = match acc.remove(&name) {
                    Some(a) => a.add(g),
                    None => g,
                };
                acc.insert(name, g);
            }
        }
        Ok((loss_sum, total, acc))
    }

    /// One optimizer step over `micro` (its micro-batches; at most `grad_accum` of them). Returns the updated model
    /// (unchanged when the step is skipped) and what happened.
    pub fn train_step(
        &mut self,
        mut model: LlamaForCausalLM,
        micro: &[Batch],
    ) -> Result<(LlamaForCausalLM, StepReport), TrainError> {
        if self.config.precision == Precision::MixedF16 && !model.half_matmuls() {
            model.set_half_matmuls(true);
        }
        let (loss, tokens, mut grads) = self.gradients(&model, micro)?;
        if self.scaler.scale != 1.0 {
            let unscale = 1.0 / self.scaler.scale;
            for g in grads.values_mut() {
                *g = g.clone().mul_scalar(unscale);
            }
        }
        let current: HashMap<String, (Tensor<1>, bool)> = model
            .named_params()
            .into_iter()
            .filter(|p| p.trainable)
            .map(|p| (p.name, (p.value.inner(), p.shape.len() >= 2)))
            .collect();
        if let Some((mu, anchor)) = &self.proximal {
            // ∇ μ/2·‖w − w_global‖² = μ(w − w_global), added before the norm is taken and clipped.
            for (name, g) in grads.iter_mut() {
                if let (Some((w, _)), Some(a)) = (current.get(name), anchor.get(name)) {
                    let prox = Tensor::<1>::from_inner(w.clone().sub(a.clone().inner()).mul_scalar(*mu));
                    *g = g.clone().add(prox);
                }
            }
        }
        let sq: Vec<f32> = grads
            .values()
            .map(|g| g.clone().square().sum())
            .reduce(|a, b| a.add(b))
            .map(|t| t.into_data().try_into_vec::<f32>().unwrap_or_default())
            .unwrap_or_default();
        let grad_norm = sq.first().map_or(0.0, |&s| (s as f64).sqrt());
        let lr = self.schedule().at(self.step);
        let mut report = StepReport {
            step: self.step,
            loss,
            grad_norm,
            lr,
            skipped: false,
            tokens,
        };
        self.step += 1;
        let finite = loss.is_finite() && grad_norm.is_finite();
        if self.scaler.update(finite) {
            // An f16 overflow: the scale is halved and the step skipped, as PyTorch's GradScaler does.
            self.skipped += 1;
            report.skipped = true;
            tracing::debug!(
                step = report.step,
                scale = self.scaler.scale,
                "f16 overflow: loss scale reduced"
            );
            return Ok((model, report));
        }
        if !finite {
            self.skipped += 1;
            self.nonfinite_run += 1;
            report.skipped = true;
            tracing::warn!(step = report.step, loss, grad_norm, "non-finite step skipped");
            if self.nonfinite_run >= self.config.max_nonfinite_steps {
                return Err(TrainError::NonFinite {
                    steps: self.nonfinite_run,
                    last_step: report.step,
                });
            }
            return Ok((model, report));
        }
        self.nonfinite_run = 0;
        let clip = match self.config.max_grad_norm {
            Some(max) if grad_norm > max => max / (grad_norm + 1e-6),
            _ => 1.0,
        };
        let mut updated = HashMap::with_capacity(grads.len());
        for (name, g) in grads {
            let Some((value, matrix)) = current.get(&name) else {
                continue;
            };
            let g = if clip < 1.0 { g.mul_scalar(clip) } else { g };
            let new = self.optim.update(&name, value.clone(), g, lr, *matrix);
            updated.insert(name, Tensor::from_inner(new));
        }
        let model = model.replace_params(&mut updated);
        Ok((model, report))
    }

    /// Trains `model` on `examples` from the current step up to `steps`, calling `on_step` after each step. The data
    /// order depends only on the seed and the step, so a resumed run sees the batches the uninterrupted one would.
    pub fn run(
        &mut self,
        model: LlamaForCausalLM,
        examples: &[Example],
        on_step: &mut dyn FnMut(&StepReport),
    ) -> Result<LlamaForCausalLM, TrainError> {
        self.run_until(model, examples, self.config.steps, on_step)
    }

    /// As [`Trainer::run`], but stops after step `until` (at most `steps`), e.g. to write a checkpoint; the schedule
    /// still follows `steps`.
    pub fn run_until(
        &mut self,
        mut model: LlamaForCausalLM,
        examples: &[Example],
        until: usize,
        on_step: &mut dyn FnMut(&StepReport),
    ) -> Result<LlamaForCausalLM, TrainError> {
        if examples.is_empty() {
            return Err(TrainError::Config("no training examples".into()));
        }
        let (size, accum) = (self.config.batch_size, self.config.grad_accum);
        let per_epoch = examples.len().div_ceil(size);
        let mut epoch: Option<(usize, Vec<Batch>)> = None;
        while self.step < until.min(self.config.steps) {
            let mut micro = Vec::with_capacity(accum);
            for j in 0..accum {
                let k = self.step * accum + j;
                let e = k / per_epoch;
                if epoch.as_ref().is_none_or(|(n, _)| *n != e) {
                    let seed = self.config.seed.wrapping_add(e as u64);
                    epoch = Some((e, batches(examples, size, Some(seed))));
                }
                if let Some((_, b)) = &epoch {
                    micro.push(b[k % per_epoch].clone());
                }
            }
            let (m, report) = self.train_step(model, &micro)?;
            model = m;
            on_step(&report);
        }
        Ok(model)
    }

    /// Writes the optimizer state and counters to `dir` (`optimizer.safetensors`, `trainer_state.json`).
    pub fn save(&self, dir: &Path) -> Result<(), TrainError> {
        let io = |e: String| TrainError::File {
            path: dir.into(),
            reason: e,
        };
        std::fs::create_dir_all(dir).map_err(|e| io(e.to_string()))?;
        let mut tensors = Vec::new();
        for (name, m) in &self.optim.state {
            for (suffix, t) in [("exp_avg", &m.m), ("exp_avg_sq", &m.v)] {
                let v: Vec<f32> = t.clone().into_data().try_into_vec().map_err(|e| io(format!("{e:?}")))?;
                let n = v.len();
                tensors.push((format!("{name}.{suffix}"), v, vec![n]));
            }
            tensors.push((format!("{name}.step"), vec![m.step as f32], vec![1]));
        }
        crate::load::write_f32_safetensors(&dir.join("optimizer.safetensors"), tensors).map_err(io)?;
        let state = TrainerState {
            format_version: 1,
            step: self.step,
            skipped: self.skipped,
            nonfinite_run: self.nonfinite_run,
            config: self.config.clone(),
            scaler: Some(self.scaler.clone()),
        };
        let json = serde_json::to_string_pretty(&state).map_err(|e| io(e.to_string()))?;
        std::fs::write(dir.join("trainer_state.json"), json).map_err(|e| io(e.to_string()))
    }

    /// Reads what [`Trainer::save`] wrote; tensors go to `device`.
    pub fn load(dir: &Path, device: &burn::tensor::Device) -> Result<Self, TrainError> {
        let path = dir.join("trainer_state.json");
        let bad = |reason: String| TrainError::File {
            path: path.clone(),
            reason,
        };
        let text = std::fs::read_to_string(&path).map_err(|e| bad(e.to_string()))?;
        let state: TrainerState = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        if state.format_version != 1 {
            return Err(bad(format!("format_version {} is not 1", state.format_version)));
        }
        let mut trainer = Trainer::new(state.config)?;
        trainer.step = state.step;
        trainer.skipped = state.skipped;
        trainer.nonfinite_run = state.nonfinite_run;
        if let Some(s) = state.scaler {
            trainer.scaler = s;
        }
        let tensors =
            crate::load::read_f32_safetensors(&dir.join("optimizer.safetensors")).map_err(|e| bad(e.to_string()))?;
        let mut by_name: HashMap<String, Vec<f32>> = tensors.into_iter().map(|(n, t)| (n, t.data)).collect();
        let names: Vec<String> = by_name
            .keys()
            .filter_map(|k| k.strip_suffix(".exp_avg").map(str::to_string))
            .collect();
        for name in names {
            let mut take = |suffix: &str| {
                by_name
                    .remove(&format!("{name}.{suffix}"))
                    .ok_or_else(|| bad(format!("optimizer state lacks `{name}.{suffix}`")))
            };
            let (m, v, step) = (take("exp_avg")?, take("exp_avg_sq")?, take("step")?);
            if m.len() != v.len() || step.len() != 1 {
                return Err(bad(format!("optimizer state of `{name}` has inconsistent sizes")));
            }
            let t = |x: Vec<f32>| {
                let n = x.len();
                Tensor::<1>::from_data(TensorData::new(x, [n]), device)
            };
            trainer.optim.state.insert(
                name,
                Moments {
                    m: t(m),
                    v: t(v),
                    step: step[0] as u64,
                },
            );
        }
        Ok(trainer)
    }
}
