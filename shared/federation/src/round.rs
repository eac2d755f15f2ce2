//! Pure pieces of a round: which clients take part, and whether an update may be aggregated.

use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::params::{check_like, from_wire, l2_norm, Params};
use super::strategy::ClientUpdate;
use offsite_protocol::Update;

/// How many of `ready` clients a round samples: the `fraction` share rounded up, at least `min_clients`, at most
/// all.
pub fn sampled_count(ready: usize, fraction: f64, min_clients: usize) -> usize {
    ((fraction * ready as f64).ceil() as usize).max(min_clients).min(ready)
}

/// Picks `max(min_clients, ⌈fraction·n⌉)` (at most n) of the `ready` clients, deterministically from the seed and
/// the round; the result is sorted.
pub fn sample_clients(ready: &[String], fraction: f64, min_clients: usize, seed: u64, round: u64) -> Vec<String> {
    let mut ids = ready.to_vec();
    ids.sort();
    let want = sampled_count(ids.len(), fraction, min_clients);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ round.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    ids.shuffle(&mut rng);
    ids.truncate(want);
    ids.sort();
    ids
}

/// Checks an update against the current round and global adapter: right round, same names and shapes, finite
/// values, at least one example, and an L2 norm within `max_norm` when set. The error is the reason sent back.
pub fn validate(
    client: &str,
    update: &Update,
    round: u64,
    global: &Params,
    max_norm: Option<f64>,
) -> Result<ClientUpdate, String> {
    if update.round != round {
        return Err(format!(
            "stale update: it answers round {}, the current round is {round}",
            update.round
        ));
    }
    if update.num_examples == 0 {
        return Err("the update claims zero examples".into());
    }
    let delta = from_wire(&update.delta).map_err(|e| e.to_string())?;
    check_like(global, &delta).map_err(|e| e.to_string())?;
    let norm = l2_norm(&delta);
    if let Some(max) = max_norm {
        if norm > max {
            return Err(format!("update norm {norm:.4} exceeds the limit {max}"));
        }
    }
    Ok(ClientUpdate::single(client, update.num_examples, delta))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::{to_wire, Tensor};
    use offsite_protocol::{Encoding, WireTensor};

    fn global() -> Params {
        Params::from([(
            "w".to_string(),
            Tensor {
                shape: vec![2],
                values: vec![0.0, 0.0],
            },
        )])
    }

    fn update(round: u64, values: &[f32]) -> Update {
        Update {
            round,
            num_examples: 4,
            train_loss: 1.0,
            steps: 1,
            delta: vec![WireTensor::encode("w", &[values.len()], values, Encoding::F32)],
        }
    }

    #[test]
    fn sampling_is_deterministic_and_respects_the_minimum() {
        let ids: Vec<String> = (0..10).map(|i| format!("c{i}")).collect();
        let a = sample_clients(&ids, 0.3, 2, 7, 1);
        assert_eq!(a.len(), 3);
        assert_eq!(a, sample_clients(&ids, 0.3, 2, 7, 1));
        assert_ne!(a, sample_clients(&ids, 0.3, 2, 7, 2));
        assert_eq!(sample_clients(&ids, 0.0, 4, 7, 1).len(), 4);
        assert_eq!(sample_clients(&ids[..2], 1.0, 4, 7, 1).len(), 2);
    }

    #[test]
    fn bad_updates_are_refused_with_a_reason() {
        let g = global();
        assert!(validate("a", &update(2, &[0.1, 0.2]), 2, &g, Some(1.0)).is_ok());
        let e = validate("a", &update(1, &[0.1, 0.2]), 2, &g, None).unwrap_err();
        assert!(e.starts_with("stale update"), "{e}");
        let e = validate("a", &update(2, &[0.1, 0.2, 0.3]), 2, &g, None).unwrap_err();
        assert!(e.contains("shape [3]"), "{e}");
        let e = validate("a", &update(2, &[f32::NAN, 0.0]), 2, &g, None).unwrap_err();
        assert!(e.contains("not finite"), "{e}");
        let e = validate("a", &update(2, &[3.0, 4.0]), 2, &g, Some(1.0)).unwrap_err();
        assert!(e.contains("norm 5.0000 exceeds"), "{e}");
        let mut u = update(2, &[0.0, 0.0]);
        u.delta.extend(to_wire(&g, Encoding::F16));
        assert!(validate("a", &u, 2, &g, None).unwrap_err().contains("twice"));
    }
}
