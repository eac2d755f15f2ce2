//! Adapter state in and out of a burn model, by Hugging Face parameter name (module layout, flattened + shape).

use offsite_fed::{Params, Tensor};

use super::LocalError;
use crate::adapters::AdapterSpec;
use crate::model::LlamaForCausalLM;

/// The trainable parameters of `model` (what an adapter trains), by name.
pub fn adapter_state(model: &LlamaForCausalLM) -> Result<Params, LocalError> {
    let mut out = Params::new();
    for p in model.named_params().into_iter().filter(|p| p.trainable) {
        let values: Vec<f32> = p
            .value
            .into_data()
            .convert::<f32>()
            .try_into_vec()
            .map_err(|e| LocalError::Shape(format!("`{}`: {e:?}", p.name)))?;
        out.insert(p.name, Tensor { shape: p.shape, values });
    }
    if out.is_empty() {
        return Err(LocalError::Shape("the model has no trainable parameter".into()));
    }
    Ok(out)
}

/// Sets `state` into `model` by name; every tensor must name a parameter of the model with its shape.
pub fn load_state(model: LlamaForCausalLM, state: &Params) -> Result<LlamaForCausalLM, LocalError> {
    let tensors = state
        .iter()
        .map(|(n, t)| (n.clone(), t.values.clone(), t.shape.clone()))
        .collect();
    model
        .set_params(tensors, false)
        .map_err(|e| LocalError::Shape(e.to_string()))
}

/// Plugs an adapter state into `model` (a full model or an emulator) by name: the adapter's structure is attached
/// to `layers` (the emulator's adapter layers), then `state` is loaded into it.
pub fn plug_state(
    model: LlamaForCausalLM,
    layers: &[usize],
    spec: &AdapterSpec,
    state: &Params,
) -> Result<LlamaForCausalLM, LocalError> {
    let (model, _) = spec.structure().prepare(model, layers, None)?;
    load_state(model, state)
}
