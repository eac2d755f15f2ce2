//! [`EmulatorTrainer`]: the edge client's local trainer. It opens the emulator the network layer verified, attaches
//! the server's adapter, loads the local data once, and trains each task on burn (on a GPU through wgpu, or the
//! CPU); the model and data stay loaded between rounds while the emulator and adapter stay the same.

use std::path::PathBuf;
use std::sync::Arc;

use burn::tensor::Device;
use offsite_fed::{FedError, LocalOutcome, LocalTask, LocalTrainer};
use tracing::{info, warn};

use super::{train_round, LocalError};
use crate::adapters::AdapterSpec;
use crate::data::{DataConfig, Example};
use crate::emulator::Emulator;
use crate::model::LlamaForCausalLM;
use crate::progress::Progress;
use crate::train::Precision;

/// Where a client's training examples come from.
#[derive(Debug, Clone)]
pub enum LocalData {
    /// Files tokenized with the emulator's tokenizer once it is here.
    Files {
        /// JSONL or text files.
        paths: Vec<PathBuf>,
        /// How to read them.
        config: Box<DataConfig>,
    },
    /// Examples already tokenized (simulation).
    Examples(Vec<Example>),
}

/// What stays loaded between rounds: for which emulator and adapter, the prepared model and the examples.
struct Loaded {
    key: (PathBuf, String),
    model: LlamaForCausalLM,
    examples: Arc<Vec<Example>>,
}

/// Trains federated tasks on an emulator with burn.
pub struct EmulatorTrainer {
    device: Device,
    data: LocalData,
    loaded: Option<Loaded>,
    /// Whether the device computes f16 fast (shader-f16); mixed precision falls back to f32 otherwise.
    fast_f16: bool,
}

impl EmulatorTrainer {
    /// A trainer on `device` (the autodiff wrapper is added here) over `data`, which never leaves this machine.
    pub fn new(device: Device, data: LocalData) -> Self {
        EmulatorTrainer {
            device,
            data,
            loaded: None,
            fast_f16: false,
        }
    }

    /// Says whether the device computes f16 fast (`offsite::device::fast_f16`); only then does a task asking for
    /// `mixed_f16` train in mixed precision (otherwise f32, with a warning), as `offsite-edge train` does.
    pub fn with_fast_f16(mut self, fast: bool) -> Self {
        self.fast_f16 = fast;
        self
    }

    fn load(&self, task: &LocalTask<'_>) -> Result<Loaded, LocalError> {
        let spec: AdapterSpec = serde_json::from_str(task.adapter)
            .map_err(|e| LocalError::Config(format!("the server's adapter settings: {e}")))?;
        let emu = Emulator::open(task.emulator)?;
        let model = emu.load_model(&self.device.clone().autodiff())?;
        // The global adapter's values replace the initial ones every round.
        let (model, _) = spec.structure().prepare(model, &emu.manifest().adapter_layers, None)?;
        let examples = match &self.data {
            LocalData::Examples(e) => e.clone(),
            LocalData::Files { paths, config } => config
                .load_all(paths, &emu.tokenizer()?)
                .map_err(|e| LocalError::Config(e.to_string()))?,
        };
        if examples.is_empty() {
            return Err(LocalError::Config("no local training examples".into()));
        }
        info!(examples = examples.len(), "model and local data ready");
        Ok(Loaded {
            key: (task.emulator.to_path_buf(), task.adapter.to_string()),
            model,
            examples: Arc::new(examples),
        })
    }
}

impl LocalTrainer for EmulatorTrainer {
    fn train(&mut self, task: &LocalTask<'_>) -> Result<LocalOutcome, FedError> {
        let key = (task.emulator.to_path_buf(), task.adapter.to_string());
        let loaded = match self.loaded.take() {
            Some(l) if l.key == key => l,
            _ => self.load(task)?,
        };
        let mut bar = Progress::new(
            &format!("round {}", task.round),
            "{bar:30} {pos}/{len} steps {msg} [{eta}]",
            task.settings.steps as u64,
            0,
        );
        let mut settings = task.settings.clone();
        if settings.precision == Precision::MixedF16 && !self.fast_f16 {
            warn!(
                round = task.round,
                "the task asks for mixed precision, which this device has no fast f16 for; training in f32"
            );
            settings.precision = Precision::F32;
        }
        let (model, outcome) = train_round(
            loaded.model,
            task.global,
            &settings,
            task.proximal_mu,
            &loaded.examples,
            &mut |r| {
                bar.message(&format!("loss {:.4}", r.loss));
                bar.inc(1);
            },
        )?;
        drop(bar);
        self.loaded = Some(Loaded { model, ..loaded });
        info!(
            round = task.round,
            loss = format!("{:.4}", outcome.train_loss),
            steps = outcome.steps,
            "round trained"
        );
        Ok(outcome)
    }
}
