//! One federated round on a client: start from the global adapter, train locally (FedProx when μ > 0), return the
//! delta. The model stays prepared (adapter attached, on its autodiff device) between rounds.

use std::collections::HashMap;

use burn::tensor::{Tensor as BurnTensor, TensorData};

use super::model_state::{adapter_state, load_state};
use super::params::{Params, Tensor};
use super::FedError;
use crate::data::Example;
use crate::model::LlamaForCausalLM;
use crate::protocol::LocalSettings;
use crate::train::{AdamWConfig, StepReport, TrainConfig, Trainer};

/// What a round of local training produced.
#[derive(Debug, Clone)]
pub struct RoundResult {
    /// Local minus global, per adapter parameter.
    pub delta: Params,
    /// Mean loss over the applied steps.
    pub train_loss: f64,
    /// Steps applied (non-finite steps skipped are not counted).
    pub steps: u32,
}

/// The trainer settings of a task.
fn train_config(s: &LocalSettings) -> Result<TrainConfig, FedError> {
    if s.steps == 0 || s.batch_size == 0 {
        return Err(FedError::Config("a task needs steps > 0 and batch_size > 0".into()));
    }
    Ok(TrainConfig {
        steps: s.steps as usize,
        batch_size: s.batch_size as usize,
        grad_accum: 1,
        lr: s.lr,
        min_lr: s.min_lr,
        warmup_steps: s.warmup_steps as usize,
        max_grad_norm: (s.max_grad_norm > 0.0).then_some(s.max_grad_norm),
        adamw: AdamWConfig {
            weight_decay: s.weight_decay,
            ..AdamWConfig::default()
        },
        seed: s.seed,
        ..TrainConfig::default()
    })
}

/// Trains `model` (adapter prepared, on an autodiff device) from `global` on `examples` as `settings` say. Returns
/// the trained model (to reuse next round) and the result.
pub fn train_round(
    model: LlamaForCausalLM,
    global: &Params,
    settings: &LocalSettings,
    examples: &[Example],
    on_step: &mut dyn FnMut(&StepReport),
) -> Result<(LlamaForCausalLM, RoundResult), FedError> {
    let model = load_state(model, global)?;
    let mut trainer = Trainer::new(train_config(settings)?)?;
    if settings.proximal_mu > 0.0 {
        let device = model.device();
        let anchor: HashMap<String, BurnTensor<1>> = global
            .iter()
            .map(|(name, t)| {
                let n = t.values.len();
                (name.clone(), BurnTensor::from_data(TensorData::new(t.values.clone(), [n]), &device))
            })
            .collect();
        trainer = trainer.with_proximal(settings.proximal_mu, anchor);
    }
    let (mut loss_sum, mut applied) = (0.0, 0u32);
    let model = trainer.run(model, examples, &mut |r| {
        if !r.skipped {
            loss_sum += r.loss;
            applied += 1;
        }
        on_step(r);
    })?;
    let local = adapter_state(&model)?;
    let mut delta = Params::new();
    for (name, g) in global {
        let l = local
            .get(name)
            .ok_or_else(|| FedError::Shape(format!("`{name}` is not trained by this client's model")))?;
        let values = l.values.iter().zip(&g.values).map(|(a, b)| a - b).collect();
        delta.insert(name.clone(), Tensor { shape: g.shape.clone(), values });
    }
    let train_loss = if applied > 0 { loss_sum / applied as f64 } else { f64::NAN };
    Ok((
        model,
        RoundResult {
            delta,
            train_loss,
            steps: applied,
        },
    ))
}
