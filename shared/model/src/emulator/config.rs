//! What an emulator keeps and how it compresses the rest (TOML, unknown keys rejected).

use serde::{Deserialize, Serialize};

use super::EmulatorError;
use crate::quant::{QuantFormat, ScaleDType};

/// Emulator settings, as in `configs/emulator-*.toml` (`[emulator]` table).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmulatorConfig {
    /// Number of bottom decoder layers kept as trainable adapter layers.
    pub bottom_layers: usize,
    /// Number of top decoder layers kept as trainable adapter layers.
    pub top_layers: usize,
    /// Fraction of the middle layers dropped (FederatedScope's `drop_ratio`); the kept ones are spread uniformly
    /// (offsite-tuning's `uniform_choose_layers`).
    pub drop_ratio: f64,
    /// Storage of the frozen middle's projections.
    #[serde(default = "default_quant")]
    pub quant: QuantFormat,
    /// Precision of int8 scales in the file.
    #[serde(default)]
    pub scale_dtype: ScaleDType,
    /// Also store the token embeddings and the LM head in `quant` (int8: one scale per vocabulary row). They are
    /// frozen in every emulator, and in a small model they are its largest matrix (SmolLM2-135M: 28M of 135M).
    #[serde(default)]
    pub quantize_embeddings: bool,
}

fn default_quant() -> QuantFormat {
    QuantFormat::Int8
}

impl EmulatorConfig {
    /// Parses the `[emulator]` table of a TOML file (other tables are ignored here; unknown keys inside it are not).
    pub fn from_toml(text: &str) -> Result<Self, EmulatorError> {
        #[derive(Deserialize)]
        struct File {
            emulator: EmulatorConfig,
        }
        let file: File = toml::from_str(text).map_err(|e| EmulatorError::Config(e.to_string()))?;
        Ok(file.emulator)
    }

    /// Full-model indices of the kept layers (adapters and kept middle, ascending) for a model of `layers` layers.
    pub fn choose_layers(&self, layers: usize) -> Result<Vec<usize>, EmulatorError> {
        if !(0.0..=1.0).contains(&self.drop_ratio) {
            return Err(EmulatorError::Config(format!(
                "drop_ratio {} must be in [0, 1]",
                self.drop_ratio
            )));
        }
        if self.bottom_layers + self.top_layers > layers {
            return Err(EmulatorError::Config(format!(
                "{} bottom + {} top adapter layers exceed the model's {layers} layers",
                self.bottom_layers, self.top_layers
            )));
        }
        let middle: Vec<usize> = (self.bottom_layers..layers - self.top_layers).collect();
        let keep = round_half_even(middle.len() as f64 * (1.0 - self.drop_ratio));
        let mut ids: Vec<usize> = (0..self.bottom_layers).collect();
        ids.extend(uniform_choose(&middle, keep));
        ids.extend(layers - self.top_layers..layers);
        Ok(ids)
    }
}

/// offsite-tuning's `uniform_choose_layers`: `k` of `items`, the `i`-th at `round(i · (n − 1) / (k − 1))` (ties to
/// even, as Python rounds), so the first and last are always kept; one item keeps the middle one.
pub(crate) fn uniform_choose(items: &[usize], k: usize) -> Vec<usize> {
    let n = items.len();
    match k {
        0 => Vec::new(),
        _ if k >= n => items.to_vec(),
        1 => vec![items[(n - 1) / 2]],
        _ => (0..k)
            .map(|i| items[round_half_even((i * (n - 1)) as f64 / (k - 1) as f64)])
            .collect(),
    }
}

fn round_half_even(x: f64) -> usize {
    let r = x.round();
    let r = if (x - x.trunc()).abs() == 0.5 && r % 2.0 != 0.0 {
        r - 1.0
    } else {
        r
    };
    r.max(0.0) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(bottom: usize, top: usize, drop: f64) -> EmulatorConfig {
        EmulatorConfig {
            bottom_layers: bottom,
            top_layers: top,
            drop_ratio: drop,
            quant: QuantFormat::Int8,
            scale_dtype: ScaleDType::F32,
            quantize_embeddings: false,
        }
    }

    #[test]
    fn smollm2_two_plus_two_half_dropped() {
        // 30 layers: 26 in the middle, 13 kept, spread like Python's uniform_choose_layers(layers[2:28], 13).
        let ids = config(2, 2, 0.5).choose_layers(30).unwrap();
        assert_eq!(ids, vec![0, 1, 2, 4, 6, 8, 10, 12, 14, 17, 19, 21, 23, 25, 27, 28, 29]);
    }

    #[test]
    fn extremes() {
        assert_eq!(config(1, 1, 1.0).choose_layers(6).unwrap(), vec![0, 5]);
        assert_eq!(config(1, 1, 0.0).choose_layers(4).unwrap(), vec![0, 1, 2, 3]);
        assert!(config(3, 3, 0.5).choose_layers(4).is_err());
        assert!(config(1, 1, 1.5).choose_layers(4).is_err());
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = EmulatorConfig::from_toml(
            "[emulator]\nbottom_layers = 2\ntop_layers = 2\ndrop_ratio = 0.5\ndrop_rato = 1\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("drop_rato"), "{err}");
    }
}
