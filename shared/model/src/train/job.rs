//! A local training job as a TOML file: what `offsite-edge train --config` reads, and what a federated round task
//! carries. Unknown keys are rejected with their name.

use serde::{Deserialize, Serialize};

use super::{TrainConfig, TrainError};
use crate::adapters::{AdapterSpec, Method};
use crate::data::DataConfig;

/// `[train]`, `[data]` and `[adapter]` tables plus the held-out share.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainJob {
    /// Share of the examples held out for evaluation (0 keeps them all for training).
    pub eval_fraction: f64,
    /// Examples per evaluation batch.
    pub eval_batch_size: usize,
    /// Write a checkpoint every this many steps (0: only at the end).
    pub save_every: usize,
    /// Optimizer and schedule.
    pub train: TrainConfig,
    /// How the data file is read.
    pub data: DataConfig,
    /// What is trained.
    pub adapter: AdapterSpec,
}

impl Default for TrainJob {
    fn default() -> Self {
        Self {
            eval_fraction: 0.05,
            eval_batch_size: 4,
            save_every: 0,
            train: TrainConfig::default(),
            data: DataConfig::default(),
            adapter: AdapterSpec {
                method: Method::Layers,
                lora: None,
                prompt: None,
            },
        }
    }
}

impl TrainJob {
    /// Reads a TOML job file; errors name the file.
    pub fn from_file(path: &std::path::Path) -> Result<Self, TrainError> {
        let text = std::fs::read_to_string(path).map_err(|e| TrainError::File {
            path: path.into(),
            reason: e.to_string(),
        })?;
        Self::from_toml(&text).map_err(|e| TrainError::File {
            path: path.into(),
            reason: e.to_string(),
        })
    }

    /// Parses a TOML job; absent keys take their defaults.
    pub fn from_toml(text: &str) -> Result<Self, TrainError> {
        let job: Self = toml::from_str(text).map_err(|e| TrainError::Config(e.to_string()))?;
        if !(0.0..1.0).contains(&job.eval_fraction) {
            return Err(TrainError::Config(format!(
                "eval_fraction {} must be in [0, 1)",
                job.eval_fraction
            )));
        }
        job.adapter.validate().map_err(|e| TrainError::Config(e.to_string()))?;
        if job.eval_batch_size == 0 {
            return Err(TrainError::Config("eval_batch_size must be positive".into()));
        }
        Ok(job)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_nested_tables_and_names_unknown_keys() {
        let job = TrainJob::from_toml(
            "eval_fraction = 0.1\n[train]\nsteps = 7\nlr = 3e-4\n[train.adamw]\nweight_decay = 0.1\n\
             [data]\nmax_len = 128\n[adapter]\nmethod = \"lora\"\n[adapter.lora]\nr = 8\nlora_alpha = 16.0\n\
             target_modules = \"all-linear\"\n",
        )
        .unwrap();
        assert_eq!((job.train.steps, job.data.max_len, job.eval_fraction), (7, 128, 0.1));
        assert_eq!(job.train.adamw.weight_decay, 0.1);
        assert_eq!(job.adapter.method, Method::Lora);
        assert_eq!(job.adapter.lora.unwrap().r, 8);
        for (text, key) in [
            ("[train]\nstepz = 3\n", "stepz"),
            ("[data]\nmax_length = 3\n", "max_length"),
            ("[adapter]\nmethod = \"layers\"\nrank = 2\n", "rank"),
            ("learning_rate = 1.0\n", "learning_rate"),
        ] {
            let err = TrainJob::from_toml(text).unwrap_err().to_string();
            assert!(err.contains(key), "{err}");
        }
        assert!(TrainJob::from_toml("eval_fraction = 1.5").is_err());
    }

    #[test]
    fn the_shipped_configs_parse() {
        for text in [
            include_str!("../../../../configs/train-shakespeare.toml"),
            include_str!("../../../../configs/train-lora.toml"),
            include_str!("../../../../configs/train-alpaca.toml"),
        ] {
            TrainJob::from_toml(text).unwrap();
        }
        let emu = include_str!("../../../../configs/emulator-smollm2.toml");
        let distill = crate::emulator::DistillConfig::from_toml(emu).unwrap().unwrap();
        assert_eq!(distill.kd_at, crate::emulator::KdAt::EveryLayer);
        let emu = crate::emulator::EmulatorConfig::from_toml(emu).unwrap();
        // 2 + 2 adapter layers and 18 of the 26 middle ones.
        assert_eq!(emu.choose_layers(30).unwrap().len(), 22);
    }
}
