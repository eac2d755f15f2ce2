//! The federation config file shared by `serve` and `sim` (TOML, unknown keys rejected with their name).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use offsite::adapters::AdapterSpec;
use offsite::data::{DataConfig, Split};
use offsite::emulator::{DistillConfig, EmulatorConfig};
use offsite::train::TrainConfig;
use offsite_fed::{FederationConfig, StrategyConfig};
use serde::Deserialize;

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FedFile {
    /// Network and state.
    pub server: ServerSection,
    /// The full model and its emulator.
    pub model: ModelSection,
    /// How the emulator is built (when `model.emulator` is not given).
    pub emulator: Option<EmulatorConfig>,
    /// Distillation of the emulator's kept middle layers on `[model] distill_data` before they are quantized.
    pub distill: Option<DistillConfig>,
    /// What clients train.
    pub adapter: AdapterSpec,
    /// Aggregation.
    #[serde(default = "fedavg")]
    pub strategy: StrategyConfig,
    /// Rounds and sampling.
    #[serde(default)]
    pub federation: FederationConfig,
    /// Clients' local training per round (the `[train]` settings of a local job; each round's seed comes from
    /// `[federation] seed`).
    #[serde(default)]
    pub local: TrainConfig,
    /// How data files are read (evaluation data, and the clients' data in a simulation).
    #[serde(default)]
    pub data: DataConfig,
    /// Validation data for the plug-in model.
    pub eval: Option<EvalSection>,
    /// Simulation only: the clients' data and how it is split.
    pub sim: Option<SimSection>,
}

fn fedavg() -> StrategyConfig {
    StrategyConfig::FedAvg { norm_bound: None }
}

/// `[server]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ServerSection {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// State directory: tokens, certificate, round state, metrics, the global adapter.
    pub state_dir: PathBuf,
    /// TLS certificate chain (PEM); a self-signed one is generated in the state directory when absent.
    pub cert: Option<PathBuf>,
    /// Its private key (PEM).
    pub key: Option<PathBuf>,
    /// Require client certificates issued by this CA (PEM) in addition to tokens (mutual TLS).
    pub client_ca: Option<PathBuf>,
    /// Seconds a new connection has to authenticate.
    #[serde(default = "hello_timeout")]
    pub hello_timeout_s: f64,
    /// Emulator download chunk size in KiB.
    #[serde(default = "chunk_kib")]
    pub chunk_kib: u32,
}

fn hello_timeout() -> f64 {
    10.0
}
fn chunk_kib() -> u32 {
    1024
}

/// `[model]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ModelSection {
    /// The full model (Hugging Face directory or GGUF file).
    pub path: PathBuf,
    /// A prebuilt emulator; otherwise one is built from `[emulator]` into the state directory.
    pub emulator: Option<PathBuf>,
    /// Public text (or JSONL) the operator distils the emulator on (`[distill]`); never the clients' data.
    #[serde(default)]
    pub distill_data: Vec<PathBuf>,
}

/// `[eval]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct EvalSection {
    /// Validation files.
    pub data: Vec<PathBuf>,
    /// At most this many examples, spread evenly over the data.
    pub max_examples: Option<usize>,
    /// Examples per batch.
    #[serde(default = "eval_batch")]
    pub batch_size: usize,
}

fn eval_batch() -> usize {
    4
}

/// `[sim]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SimSection {
    /// The clients' data files.
    pub data: Vec<PathBuf>,
    /// How the data is dealt to clients.
    pub split: Split,
    /// Keep at most this many examples per client (spread evenly), to bound a demo's time.
    pub max_examples_per_client: Option<usize>,
}

impl FedFile {
    /// Reads and parses a config file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.message()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_federation_config_parses() {
        let file: FedFile = toml::from_str(include_str!("../../../configs/federation-shakespeare.toml")).unwrap();
        let distill = file.distill.unwrap();
        assert_eq!(distill.kd_at, offsite::emulator::KdAt::EveryLayer);
        assert_eq!(file.sim.unwrap().data.len(), 3);
        assert_eq!(file.emulator.unwrap().choose_layers(30).unwrap().len(), 22);
    }
}
