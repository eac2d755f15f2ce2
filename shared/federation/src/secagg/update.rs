//! An adapter delta as the vector secure aggregation sums, and back: the tensors in name order, flattened. The
//! client clips (and, under distributed DP, noises) its delta here, since the server never sees it.

use offsite_protocol::SecAggTask;
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};

use super::{crypto, SecAggError};
use crate::params::{l2_norm, Params, Tensor};

/// Elements of a vector of `params`' shape.
pub(crate) fn length(params: &Params) -> u64 {
    params.values().map(|t| t.values.len() as u64).sum()
}

/// What a client masks for `task`: its delta flattened in name order, scaled down to `max_norm` when longer, plus
/// its share of the DP noise; and its weight, `min(num_examples, max_examples) / max_examples` (1 when
/// `max_examples` is 0).
pub fn prepare_update(delta: &Params, num_examples: u64, task: &SecAggTask) -> Result<(Vec<f32>, f64), SecAggError> {
    let norm = l2_norm(delta);
    let scale = if task.max_norm > 0.0 && norm > task.max_norm {
        task.max_norm / norm
    } else {
        1.0
    };
    let mut flat: Vec<f32> = delta
        .values()
        .flat_map(|t| t.values.iter())
        .map(|&v| (f64::from(v) * scale) as f32)
        .collect();
    if task.noise_std > 0.0 {
        let normal = Normal::new(0.0, task.noise_std)
            .map_err(|e| SecAggError::Setup(format!("noise standard deviation {}: {e}", task.noise_std)))?;
        // Seeded from the operating system: noise anyone could regenerate would protect nothing.
        let mut rng = StdRng::from_seed(crypto::random32()?);
        for v in &mut flat {
            *v = (f64::from(*v) + normal.sample(&mut rng)) as f32;
        }
    }
    let weight = match task.max_examples {
        0 => 1.0,
        cap => num_examples.min(cap) as f64 / cap as f64,
    };
    if weight.is_nan() || weight <= 0.0 {
        return Err(SecAggError::Setup("an update of zero examples has no weight".into()));
    }
    Ok((flat, weight))
}

/// `values` (of [`length`] elements) in the names and shapes of `like`.
pub(crate) fn unflatten(like: &Params, values: &[f32]) -> Result<Params, SecAggError> {
    if values.len() as u64 != length(like) {
        return Err(SecAggError::Setup(format!(
            "a sum of {} elements for an adapter of {}",
            values.len(),
            length(like)
        )));
    }
    let mut rest = values;
    Ok(like
        .iter()
        .map(|(name, t)| {
            let (mine, tail) = rest.split_at(t.values.len());
            rest = tail;
            let tensor = Tensor {
                shape: t.shape.clone(),
                values: mine.to_vec(),
            };
            (name.clone(), tensor)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(a: &[f32], b: &[f32]) -> Params {
        Params::from([
            (
                "b".to_string(),
                Tensor {
                    shape: vec![b.len()],
                    values: b.to_vec(),
                },
            ),
            (
                "a".to_string(),
                Tensor {
                    shape: vec![1, a.len()],
                    values: a.to_vec(),
                },
            ),
        ])
    }

    fn task(max_examples: u64, max_norm: f64, noise_std: f64) -> SecAggTask {
        SecAggTask {
            max_examples,
            max_norm,
            noise_std,
        }
    }

    #[test]
    fn a_delta_flattens_in_name_order_and_comes_back_in_its_shapes() {
        let delta = params(&[1.0, 2.0], &[3.0]);
        let (flat, weight) = prepare_update(&delta, 5, &task(10, 0.0, 0.0)).unwrap();
        assert_eq!(flat, vec![1.0, 2.0, 3.0], "a before b");
        assert_eq!(weight, 0.5);
        assert_eq!(unflatten(&delta, &flat).unwrap(), delta);
        assert!(unflatten(&delta, &flat[..2]).is_err());
        // Above the cap the weight is 1; with no cap every update weighs 1.
        assert_eq!(prepare_update(&delta, 50, &task(10, 0.0, 0.0)).unwrap().1, 1.0);
        assert_eq!(prepare_update(&delta, 3, &task(0, 0.0, 0.0)).unwrap().1, 1.0);
        assert!(prepare_update(&delta, 0, &task(10, 0.0, 0.0)).is_err());
    }

    #[test]
    fn a_long_delta_is_scaled_to_the_norm_bound_and_noise_has_its_deviation() {
        // ‖(3, 4, 0)‖ = 5, clipped to 1: (0.6, 0.8, 0).
        let delta = params(&[3.0, 4.0], &[0.0]);
        let (flat, _) = prepare_update(&delta, 1, &task(0, 1.0, 0.0)).unwrap();
        for (got, want) in flat.iter().zip([0.6, 0.8, 0.0]) {
            assert!((got - want).abs() < 1e-6, "{flat:?}");
        }
        let zeros = Params::from([(
            "w".to_string(),
            Tensor {
                shape: vec![20_000],
                values: vec![0.0; 20_000],
            },
        )]);
        let (noisy, _) = prepare_update(&zeros, 1, &task(0, 1.0, 0.5)).unwrap();
        let n = noisy.len() as f64;
        let mean = noisy.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
        let std = (noisy.iter().map(|&v| (f64::from(v) - mean).powi(2)).sum::<f64>() / n).sqrt();
        // 20,000 draws: the sample deviation is within 3% of 0.5 (its own deviation is 0.5/√40,000 = 0.25%).
        assert!(mean.abs() < 0.02 && (std - 0.5).abs() < 0.015, "mean {mean}, std {std}");
        let (again, _) = prepare_update(&zeros, 1, &task(0, 1.0, 0.5)).unwrap();
        assert_ne!(noisy, again, "fresh noise every time");
    }
}
