//! One federated round on a client: start from the global adapter, train locally (FedProx when μ > 0), return the
//! delta. The model stays prepared (adapter attached, on its autodiff device) between rounds.

use std::collections::HashMap;

use burn::tensor::{Tensor as BurnTensor, TensorData};
use offsite_fed::{LocalOutcome, Params, Tensor};

use super::model_state::{adapter_state, load_state};
use super::LocalError;
use crate::data::Example;
use crate::model::LlamaForCausalLM;
use crate::train::{StepReport, TrainConfig, Trainer};

/// Trains `model` (adapter prepared, on an autodiff device) from `global` on `examples` as `settings` say, with the
/// proximal term μ/2·‖w − global‖² when `proximal_mu` > 0. Returns the trained model (to reuse next round) and the
/// outcome (its `num_examples` is the number of local examples).
pub fn train_round(
    model: LlamaForCausalLM,
    global: &Params,
    settings: &TrainConfig,
    proximal_mu: f64,
    examples: &[Example],
    on_step: &mut dyn FnMut(&StepReport),
) -> Result<(LlamaForCausalLM, LocalOutcome), LocalError> {
    let model = load_state(model, global)?;
    let mut trainer = Trainer::new(settings.clone())?;
    if proximal_mu > 0.0 {
        let device = model.device();
        let anchor: HashMap<String, BurnTensor<1>> = global
            .iter()
            .map(|(name, t)| {
                let n = t.values.len();
                (
                    name.clone(),
                    BurnTensor::from_data(TensorData::new(t.values.clone(), [n]), &device),
                )
            })
            .collect();
        trainer = trainer.with_proximal(proximal_mu, anchor);
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
            .ok_or_else(|| LocalError::Shape(format!("`{name}` is not trained by this client's model")))?;
        let values = l.values.iter().zip(&g.values).map(|(a, b)| a - b).collect();
        delta.insert(
            name.clone(),
            Tensor {
                shape: g.shape.clone(),
                values,
            },
        );
    }
    let train_loss = if applied > 0 {
        loss_sum / applied as f64
    } else {
        f64::NAN
    };
    let outcome = LocalOutcome {
        delta,
        num_examples: examples.len() as u64,
        train_loss,
        steps: applied,
    };
    Ok((model, outcome))
}
