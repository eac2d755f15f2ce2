//! Rotary position embedding with Hugging Face's half-split layout (`rotate_half`) and RoPE frequency scaling.

use burn::tensor::{Device, Int, Tensor};

use super::config::{LlamaConfig, RopeScaling};

/// Inverse frequencies of the rotary embedding; cos/sin are computed per call from the actual positions, so no
/// table bounds the context length and per-row positions (left padding, KV cache) cost nothing extra.
#[derive(Debug, Clone)]
pub(crate) struct Rope {
    /// `[head_dim / 2]`, in f32 as Hugging Face computes them.
    inv_freq: Tensor<1>,
}

impl Rope {
    pub(crate) fn new(config: &LlamaConfig, device: &Device) -> Self {
        let inv_freq = inverse_frequencies(config);
        Self {
            inv_freq: Tensor::from_floats(inv_freq.as_slice(), device),
        }
    }

    /// Returns `(cos, sin)` for the given positions.
    ///
    /// # Shapes
    /// - `positions`: `[batch, seq]` → two `[batch, 1, seq, head_dim]`
    pub(crate) fn cos_sin(&self, positions: Tensor<2, Int>) -> (Tensor<4>, Tensor<4>) {
        let [batch, seq] = positions.dims();
        let half = self.inv_freq.dims()[0];
        let freqs = positions
            .float()
            .reshape([batch, seq, 1])
            .mul(self.inv_freq.clone().reshape([1, 1, half]));
        let emb = Tensor::cat(vec![freqs.clone(), freqs], 2).unsqueeze_dim::<4>(1);
        (emb.clone().cos(), emb.sin())
    }
}

/// Applies the rotation to queries or keys.
///
/// # Shapes
/// - `x`: `[batch, heads, seq, head_dim]`; `cos`, `sin`: `[batch, 1, seq, head_dim]` → like `x`
pub(crate) fn apply_rotary(x: Tensor<4>, cos: &Tensor<4>, sin: &Tensor<4>) -> Tensor<4> {
    let [b, h, s, d] = x.dims();
    let x1 = x.clone().slice([0..b, 0..h, 0..s, 0..d / 2]);
    let x2 = x.clone().slice([0..b, 0..h, 0..s, d / 2..d]);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    x.mul(cos.clone()).add(rotated.mul(sin.clone()))
}

/// `1 / theta^(2i/d)` for `i < d/2`, with the configured scaling applied (as transformers' `rope_init_fn`s do).
pub(crate) fn inverse_frequencies(config: &LlamaConfig) -> Vec<f32> {
    let d = config.head_dim;
    let base: Vec<f32> = (0..d / 2)
        .map(|i| (1.0 / config.rope_theta.powf((2 * i) as f64 / d as f64)) as f32)
        .collect();
    match &config.rope_scaling {
        None => base,
        Some(RopeScaling::Linear { factor }) => base.iter().map(|f| f / *factor as f32).collect(),
        Some(RopeScaling::Factors { factors }) => base.iter().zip(factors).map(|(f, s)| f / s).collect(),
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) => {
            let old = *original_max_position_embeddings as f64;
            let low_wavelen = old / low_freq_factor;
            let high_wavelen = old / high_freq_factor;
            base.iter()
                .map(|&f| {
                    let f = f as f64;
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    let scaled = if wavelen > low_wavelen { f / factor } else { f };
                    let medium = wavelen >= high_wavelen && wavelen <= low_wavelen;
                    if medium {
                        let smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                        ((1.0 - smooth) * scaled / factor + smooth * scaled) as f32
                    } else {
                        scaled as f32
                    }
                })
                .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(scaling: Option<RopeScaling>) -> LlamaConfig {
        LlamaConfig {
            model_type: "llama".into(),
            vocab_size: 8,
            hidden_size: 8,
            intermediate_size: 8,
            num_hidden_layers: 1,
            num_attention_heads: 1,
            num_key_value_heads: 1,
            head_dim: 8,
            rms_norm_eps: 1e-5,
            rope_theta: 500000.0,
            rope_scaling: scaling,
            max_position_embeddings: 128,
            tie_word_embeddings: false,
            attention_bias: false,
            bos_token_id: None,
            eos_token_ids: vec![],
        }
    }

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let plain = inverse_frequencies(&config(None));
        let scaled = inverse_frequencies(&config(Some(RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 64,
        })));
        // Wavelength 2π (i = 0) is below 64/4: unchanged. The lowest frequency has a wavelength far above 64: /8.
        assert_eq!(plain[0], scaled[0]);
        assert!((scaled[3] - plain[3] / 8.0).abs() < 1e-12);
    }

    #[test]
    fn rotation_at_position_zero_is_identity_and_preserves_norm() {
        let device = Device::flex();
        let rope = Rope::new(&config(None), &device);
        let x = Tensor::<4>::from_floats([[[[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]; 2]]], &device);
        let positions = Tensor::<2, Int>::from_ints([[0, 5]], &device);
        let (cos, sin) = rope.cos_sin(positions);
        let y = apply_rotary(x.clone(), &cos, &sin)
            .into_data()
            .try_into_vec::<f32>()
            .unwrap();
        assert_eq!(&y[..8], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]);
        let norm = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>();
        assert!((norm(&y[8..]) - norm(&y[..8])).abs() < 1e-3);
    }
}
