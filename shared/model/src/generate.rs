//! Autoregressive generation with a KV cache: greedy, or sampling with temperature, top-k and top-p; and greedy
//! decoding of many prompts at once (evaluation by generation).

use burn::tensor::{Int, Tensor, TensorData};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::model::{KvCache, LlamaForCausalLM, ModelError};

/// How to pick each next token.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationConfig {
    /// Upper bound on generated tokens.
    pub max_new_tokens: usize,
    /// Sampling temperature; `None` (or 0) means greedy decoding.
    pub temperature: Option<f64>,
    /// Keep only the `k` most likely tokens before sampling.
    pub top_k: Option<usize>,
    /// Keep the smallest set of tokens whose probability reaches `p` before sampling.
    pub top_p: Option<f64>,
    /// Seed of the sampler, so a sampled run can be repeated.
    pub seed: u64,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 128,
            temperature: None,
            top_k: None,
            top_p: None,
            seed: 0,
        }
    }
}

/// Generates after `prompt`, stopping at `max_new_tokens` or after emitting any of `eos_ids` (which is kept in the
/// output, as Hugging Face's `generate` does).
pub fn generate(
    model: &LlamaForCausalLM,
    prompt: &[u32],
    eos_ids: &[u32],
    config: &GenerationConfig,
) -> Result<Vec<u32>, ModelError> {
    generate_streaming(model, prompt, eos_ids, config, &mut |_| true)
}

/// [`generate`], handing each token to `on_token` as soon as it is picked; generation stops early when `on_token`
/// returns `false` (a stop string was seen), that token kept in the output.
pub fn generate_streaming(
    model: &LlamaForCausalLM,
    prompt: &[u32],
    eos_ids: &[u32],
    config: &GenerationConfig,
    on_token: &mut dyn FnMut(u32) -> bool,
) -> Result<Vec<u32>, ModelError> {
    if prompt.is_empty() {
        return Err(ModelError::Input("the prompt is empty".into()));
    }
    model.check_ids(prompt)?;
    if let Some(t) = config.temperature {
        if !t.is_finite() || t < 0.0 {
            return Err(ModelError::Input(format!(
                "temperature {t} must be a finite non-negative number"
            )));
        }
    }
    if let Some(p) = config.top_p {
        if !(p > 0.0 && p <= 1.0) {
            return Err(ModelError::Input(format!("top_p {p} must be in (0, 1]")));
        }
    }
    let device = model.device();
    let mut cache = KvCache::new(model.config().num_hidden_layers, 1);
    let mut rng = StdRng::seed_from_u64(config.seed);
    let mut out = Vec::new();
    let mut input: Vec<u32> = prompt.to_vec();
    while out.len() < config.max_new_tokens {
        let ids: Vec<i64> = input.iter().map(|&i| i as i64).collect();
        let len = ids.len();
        let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, len]), &device);
        let hidden = model.forward_hidden(ids, None, Some(&mut cache))?;
        let [_, s, h] = hidden.dims();
        let last = hidden.slice([0..1, s - 1..s, 0..h]);
        let logits: Vec<f32> = model
            .lm_head(last)
            .into_data()
            .try_into_vec()
            .map_err(|e| ModelError::Input(format!("cannot read logits: {e:?}")))?;
        let next = pick(&logits, config, &mut rng);
        out.push(next);
        if !on_token(next) || eos_ids.contains(&next) {
            break;
        }
        input = vec![next];
    }
    Ok(out)
}

/// Greedy continuations of many prompts, `batch_size` at a time: prompts are sorted by length so each batch pads
/// little (length bucketing), left-padded (padding masked, positions counting real tokens) and decoded together with
/// one KV cache; a row stops after any of `eos_ids` (kept in its output, as [`generate`] does) or `max_new_tokens`.
/// Row `i` of the result continues `prompts[i]` and equals what [`generate`] gives for it alone.
pub fn greedy_batch(
    model: &LlamaForCausalLM,
    prompts: &[Vec<u32>],
    eos_ids: &[u32],
    max_new_tokens: usize,
    batch_size: usize,
) -> Result<Vec<Vec<u32>>, ModelError> {
    if batch_size == 0 {
        return Err(ModelError::Input("the generation batch size must be positive".into()));
    }
    for (i, p) in prompts.iter().enumerate() {
        if p.is_empty() {
            return Err(ModelError::Input(format!("prompt {i} is empty")));
        }
        model.check_ids(p)?;
    }
    let mut order: Vec<usize> = (0..prompts.len()).collect();
    order.sort_by_key(|&i| prompts[i].len());
    let mut out = vec![Vec::new(); prompts.len()];
    let device = model.device();
    for rows in order.chunks(batch_size) {
        let b = rows.len();
        let width = rows.iter().map(|&i| prompts[i].len()).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(b * width);
        let mut mask = Vec::with_capacity(b);
        for &i in rows {
            let pad = width - prompts[i].len();
            ids.extend(std::iter::repeat_n(0i64, pad).chain(prompts[i].iter().map(|&t| t as i64)));
            mask.push((0..width).map(|p| p >= pad).collect::<Vec<bool>>());
        }
        let mut cache = KvCache::new(model.config().num_hidden_layers, b);
        let mut input = Tensor::<2, Int>::from_data(TensorData::new(ids, [b, width]), &device);
        let mut step_mask = Some(mask);
        let mut done = vec![max_new_tokens == 0; b];
        while !done.iter().all(|&d| d) {
            let hidden = model.forward_hidden(input, step_mask.as_deref(), Some(&mut cache))?;
            let [_, s, h] = hidden.dims();
            let logits: Vec<f32> = model
                .lm_head(hidden.slice([0..b, s - 1..s, 0..h]))
                .into_data()
                .try_into_vec()
                .map_err(|e| ModelError::Input(format!("cannot read logits: {e:?}")))?;
            let vocab = logits.len() / b;
            let mut next = Vec::with_capacity(b);
            for (r, &i) in rows.iter().enumerate() {
                let token = argmax(&logits[r * vocab..(r + 1) * vocab]);
                if !done[r] {
                    out[i].push(token);
                    done[r] = eos_ids.contains(&token) || out[i].len() >= max_new_tokens;
                }
                // A finished row keeps decoding its own argmax (its output is no longer read).
                next.push(token as i64);
            }
            input = Tensor::<2, Int>::from_data(TensorData::new(next, [b, 1]), &device);
            step_mask = None;
        }
    }
    Ok(out)
}

/// Chooses the next token from one row of logits.
pub(crate) fn pick(logits: &[f32], config: &GenerationConfig, rng: &mut StdRng) -> u32 {
    let temperature = config.temperature.unwrap_or(0.0);
    if temperature == 0.0 {
        return argmax(logits);
    }
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    if let Some(k) = config.top_k {
        order.truncate(k.max(1));
    }
    let max = logits[order[0]] as f64;
    let mut probs: Vec<f64> = order
        .iter()
        .map(|&i| ((logits[i] as f64 - max) / temperature).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if let Some(top_p) = config.top_p {
        let mut acc = 0.0;
        let keep = probs.iter().position(|p| {
            acc += p;
            acc >= top_p
        });
        let keep = keep.map_or(probs.len(), |i| i + 1);
        order.truncate(keep);
        probs.truncate(keep);
    }
    let total: f64 = probs.iter().sum();
    let mut u = rng.random::<f64>() * total;
    for (&i, p) in order.iter().zip(&probs) {
        if u < *p {
            return i as u32;
        }
        u -= p;
    }
    order[order.len() - 1] as u32
}

/// Index of the largest logit (the first one on ties, like `torch.argmax`); NaN never wins.
pub(crate) fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] || logits[best].is_nan() {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_first_maximum() {
        assert_eq!(argmax(&[0.0, 3.0, 3.0, 1.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 1.0]), 1);
    }

    #[test]
    fn top_k_one_is_greedy_and_sampling_is_seeded() {
        let logits = [0.1, 2.0, 1.9, -1.0];
        let mut rng = StdRng::seed_from_u64(1);
        let cfg = GenerationConfig {
            temperature: Some(1.0),
            top_k: Some(1),
            ..Default::default()
        };
        assert!((0..20).all(|_| pick(&logits, &cfg, &mut rng) == 1));
        let cfg = GenerationConfig {
            temperature: Some(1.0),
            top_p: Some(0.9),
            ..Default::default()
        };
        let draw = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (0..50).map(|_| pick(&logits, &cfg, &mut rng)).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        // top_p 0.9 keeps ids 1 and 2 only (their mass is ~0.8 < 0.9, so id 0 is kept too, never id 3).
        assert!(draw(7).iter().all(|&i| i != 3));
        assert!(draw(7).contains(&2));
    }
}
