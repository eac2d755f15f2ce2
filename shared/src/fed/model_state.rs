//! Adapter state in and out of a burn model, by Hugging Face parameter name (module layout, flattened + shape).

use std::collections::HashMap;

use burn::tensor::{Tensor as BurnTensor, TensorData};

use super::params::{Params, Tensor};
use super::FedError;
use crate::model::LlamaForCausalLM;

/// The trainable parameters of `model` (what an adapter trains), by name.
pub fn adapter_state(model: &LlamaForCausalLM) -> Result<Params, FedError> {
    let mut out = Params::new();
    for p in model.named_params().into_iter().filter(|p| p.trainable) {
        let values: Vec<f32> = p
            .value
            .into_data()
            .convert::<f32>()
            .try_into_vec()
            .map_err(|e| FedError::Shape(format!("`{}`: {e:?}", p.name)))?;
        out.insert(p.name, Tensor { shape: p.shape, values });
    }
    if out.is_empty() {
        return Err(FedError::Shape("the model has no trainable parameter".into()));
    }
    Ok(out)
}

/// Sets `state` into `model` by name; every tensor must name a parameter of the model with its shape.
pub fn load_state(model: LlamaForCausalLM, state: &Params) -> Result<LlamaForCausalLM, FedError> {
    let shapes: HashMap<String, Vec<usize>> = model
        .named_params()
        .into_iter()
        .map(|p| (p.name, p.shape))
        .collect();
    let device = model.device();
    let mut values = HashMap::with_capacity(state.len());
    for (name, t) in state {
        match shapes.get(name) {
            None => return Err(FedError::Shape(format!("`{name}` is not a parameter of the model"))),
            Some(s) if *s != t.shape => {
                return Err(FedError::Shape(format!("`{name}` has shape {:?}, the model's {s:?}", t.shape)))
            }
            Some(_) => {}
        }
        let n = t.values.len();
        values.insert(name.clone(), BurnTensor::<1>::from_data(TensorData::new(t.values.clone(), [n]), &device));
    }
    let model = model.replace_params(&mut values);
    match values.keys().next() {
        Some(left) => Err(FedError::Shape(format!("`{left}` could not be set"))),
        None => Ok(model),
    }
}
