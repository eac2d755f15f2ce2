//! Named f32 tensors: an adapter's state, an update's delta, a strategy's server state. Pure data (no burn).

use std::collections::BTreeMap;

use offsite_protocol::{Encoding, TensorSet, WireTensor};

use super::FedError;

/// One tensor's shape and row-major values.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    /// Its shape.
    pub shape: Vec<usize>,
    /// Its values.
    pub values: Vec<f32>,
}

/// Tensors by parameter name, in name order (so every sum over them runs in the same order).
pub type Params = BTreeMap<String, Tensor>;

/// Encodes `params` for the wire.
pub fn to_wire(params: &Params, encoding: Encoding) -> TensorSet {
    params
        .iter()
        .map(|(name, t)| WireTensor::encode(name, &t.shape, &t.values, encoding))
        .collect()
}

/// Decodes tensors from the wire (sizes checked, non-finite values refused); a name may appear once.
pub fn from_wire(set: &TensorSet) -> Result<Params, FedError> {
    let mut out = Params::new();
    for t in set {
        let values = t.decode()?;
        if out
            .insert(
                t.name.clone(),
                Tensor {
                    shape: t.dims(),
                    values,
                },
            )
            .is_some()
        {
            return Err(FedError::Shape(format!("`{}` appears twice", t.name)));
        }
    }
    Ok(out)
}

/// Checks that `delta` has exactly the names and shapes of `global`.
pub fn check_like(global: &Params, delta: &Params) -> Result<(), FedError> {
    for (name, g) in global {
        match delta.get(name) {
            None => return Err(FedError::Shape(format!("`{name}` is missing"))),
            Some(d) if d.shape != g.shape => {
                return Err(FedError::Shape(format!(
                    "`{name}` has shape {:?}, the global adapter {:?}",
                    d.shape, g.shape
                )))
            }
            Some(_) => {}
        }
    }
    if let Some(extra) = delta.keys().find(|k| !global.contains_key(*k)) {
        return Err(FedError::Shape(format!(
            "`{extra}` is not a parameter of the global adapter"
        )));
    }
    Ok(())
}

/// The number of values in all tensors.
pub fn count(params: &Params) -> usize {
    params.values().map(|t| t.values.len()).sum()
}

/// The L2 norm over every value (f64 accumulation).
pub fn l2_norm(params: &Params) -> f64 {
    params
        .values()
        .flat_map(|t| t.values.iter())
        .map(|&v| (v as f64) * (v as f64))
        .sum::<f64>()
        .sqrt()
}

/// `‖decode(encoded) − params‖ / ‖params‖` over every value (L2, f64): the relative error an encoding of `params`
/// adds (0 for an all-zero state).
pub fn relative_error(params: &Params, encoded: &TensorSet) -> Result<f64, FedError> {
    let decoded = from_wire(encoded)?;
    let mut err = 0.0f64;
    for (name, t) in params {
        let d = decoded
            .get(name)
            .filter(|d| d.values.len() == t.values.len())
            .ok_or_else(|| FedError::Shape(format!("`{name}` is not encoded with its shape")))?;
        err += t
            .values
            .iter()
            .zip(&d.values)
            .map(|(&a, &b)| (a as f64 - b as f64).powi(2))
            .sum::<f64>();
    }
    let norm = l2_norm(params);
    Ok(if norm > 0.0 { err.sqrt() / norm } else { 0.0 })
}

/// `a + b` by name (same names and shapes).
pub fn add(a: &Params, b: &Params) -> Params {
    a.iter()
        .map(|(name, t)| {
            let values = match b.get(name) {
                Some(d) => t.values.iter().zip(&d.values).map(|(x, y)| x + y).collect(),
                None => t.values.clone(),
            };
            (
                name.clone(),
                Tensor {
                    shape: t.shape.clone(),
                    values,
                },
            )
        })
        .collect()
}

/// SHA-256 over names, shapes and little-endian values: the identity of a global adapter.
pub fn hash(params: &Params) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for (name, t) in params {
        h.update((name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        for d in &t.shape {
            h.update((*d as u64).to_le_bytes());
        }
        for v in &t.values {
            h.update(v.to_le_bytes());
        }
    }
    hex::encode(h.finalize())
}
