//! The federation config file shared by `serve` and `sim` (TOML, unknown keys rejected with their name).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use offsite::adapters::AdapterSpec;
use offsite::data::{DataConfig, Split};
use offsite::emulator::{DistillConfig, EmulatorConfig};
use offsite::train::TrainConfig;
use offsite_fed::{DpStrategy, FederationConfig, PrivacyConfig, Strategy, StrategyConfig};
use serde::{Deserialize, Serialize};

/// The whole file.
#[derive(Debug, Clone, Serialize, Deserialize)]
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
    /// Central differential privacy: clipping, noise and the ε budget.
    pub privacy: Option<PrivacyConfig>,
}

fn fedavg() -> StrategyConfig {
    StrategyConfig::FedAvg { norm_bound: None }
}

/// `[server]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
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
    /// Emulator download chunk size in KiB (at most 65536: a client accepts frames up to 512 MiB, and smaller
    /// chunks resume a broken download with less lost).
    #[serde(default = "chunk_kib")]
    pub chunk_kib: u32,
    /// Open connections the server holds at most, in all; over half of it, new ones first prove their address.
    #[serde(default = "max_connections")]
    pub max_connections: usize,
    /// Open connections from one IP address at most.
    #[serde(default = "max_connections_per_address")]
    pub max_connections_per_address: usize,
}

fn max_connections() -> usize {
    offsite_net::ConnectionLimits::default().max
}
fn max_connections_per_address() -> usize {
    offsite_net::ConnectionLimits::default().per_address
}

impl ServerSection {
    /// Sizes that the other side or the OS could not honour.
    pub(crate) fn check(&self) -> Result<(), String> {
        if self.chunk_kib == 0 || self.chunk_kib > 65536 {
            return Err(format!("chunk_kib = {} must be in 1..=65536", self.chunk_kib));
        }
        if self.max_connections == 0 || self.max_connections_per_address == 0 {
            return Err("max_connections and max_connections_per_address must be positive".into());
        }
        Ok(())
    }
}

fn hello_timeout() -> f64 {
    10.0
}
fn chunk_kib() -> u32 {
    1024
}

/// `[model]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
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
#[derive(Debug, Clone, Serialize, Deserialize)]
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
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SimSection {
    /// The clients' data files.
    pub data: Vec<PathBuf>,
    /// How the data is dealt to clients.
    pub split: Split,
    /// Keep at most this many examples per client (spread evenly), to bound a demo's time.
    pub max_examples_per_client: Option<usize>,
}

/// The expected size of a DP federation's noise next to its updates (it depends on the configuration only).
#[derive(Debug, Clone, Copy)]
pub(crate) struct DpNoise {
    /// z, solved from the ε budget or given.
    pub noise_multiplier: f64,
    /// Trainable values noised each round.
    pub values: usize,
    /// Updates a round.
    pub clients: usize,
    /// The expected norm of the noise on the mean update in units of the clip ([`offsite_fed::noise_to_clip`]).
    pub ratio: f64,
    /// The updates a round would need for the noise to be no larger than the clip.
    pub needed: u64,
}

impl DpNoise {
    /// Warns when the noise outweighs the largest update the clients can send: the federation would then hand out
    /// an adapter made mostly of noise.
    pub fn warn_if_dominant(&self) {
        if self.ratio > 1.0 {
            tracing::warn!(
                noise_multiplier = format!("{:.3}", self.noise_multiplier),
                values = self.values,
                clients = self.clients,
                "the DP noise on each round's mean update is expected to be {:.1}× the largest update the clients \
                 can send: the adapter will be mostly noise. Noise no larger than that needs {} clients a round at \
                 this ε, or fewer trainable values (e.g. a small LoRA adapter)",
                self.ratio,
                self.needed
            );
        }
    }
}

impl FedFile {
    /// The `[strategy]`, wrapped in central DP when there is a `[privacy]` table (FedAvg, FedProx and the server
    /// optimizers only: the robust rules need the individual updates DP averages away).
    pub fn strategy(&self) -> Result<Box<dyn Strategy>> {
        let inner = self.strategy.build()?;
        let Some(p) = &self.privacy else { return Ok(inner) };
        if matches!(
            self.strategy,
            StrategyConfig::Median { .. } | StrategyConfig::TrimmedMean { .. } | StrategyConfig::Krum { .. }
        ) {
            bail!(
                "[privacy] works with fedavg, fedprox, fedadam, fedyogi and fedadagrad, not {}",
                inner.name()
            );
        }
        let z = p.noise_multiplier(self.federation.rounds, self.federation.fraction)?;
        let s = DpStrategy::new(inner, p, z, self.federation.fraction);
        tracing::info!(
            strategy = %s.name(),
            clip_norm = p.clip_norm,
            noise_multiplier = format!("{z:.3}"),
            delta = p.delta,
            "central differential privacy"
        );
        Ok(Box::new(s))
    }

    /// With a `[privacy]` table: how the DP noise on each round's mean update compares with the updates, for
    /// `values` trainable values and `clients` updates a round (see [`DpNoise`]).
    pub fn dp_noise(&self, values: usize, clients: usize) -> Result<Option<DpNoise>> {
        let Some(p) = &self.privacy else { return Ok(None) };
        let z = p.noise_multiplier(self.federation.rounds, self.federation.fraction)?;
        Ok(Some(DpNoise {
            noise_multiplier: z,
            values,
            clients,
            ratio: offsite_fed::noise_to_clip(z, values, clients),
            needed: offsite_fed::clients_for_noise_to_clip(z, values, 1.0),
        }))
    }

    /// Reads and parses a config file; its relative paths are taken from the file's folder.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut file: Self = toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        file.resolve_paths(path.parent().unwrap_or(Path::new("")));
        file.server
            .check()
            .map_err(|e| anyhow::anyhow!("{}: [server] {e}", path.display()))?;
        Ok(file)
    }

    /// Joins every relative path in the file to `base` (the config's folder), so a config means the same files
    /// from any working directory. Paths given on the command line stay relative to the working directory.
    pub fn resolve_paths(&mut self, base: &Path) {
        let s = &mut self.server;
        let m = &mut self.model;
        let singles = [
            Some(&mut s.state_dir),
            s.cert.as_mut(),
            s.key.as_mut(),
            s.client_ca.as_mut(),
            Some(&mut m.path),
            m.emulator.as_mut(),
        ];
        let lists = [
            Some(&mut m.distill_data),
            self.eval.as_mut().map(|e| &mut e.data),
            self.sim.as_mut().map(|s| &mut s.data),
        ];
        let paths = singles
            .into_iter()
            .flatten()
            .chain(lists.into_iter().flatten().flat_map(|l| l.iter_mut()));
        for p in paths {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
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

    #[test]
    fn the_private_config_wraps_the_strategy_in_dp_and_robust_rules_are_refused() {
        let text = include_str!("../../../configs/federation-shakespeare-private.toml");
        let file: FedFile = toml::from_str(text).unwrap();
        let strategy = file.strategy().unwrap();
        // z for ε = 8 over 5 full-participation rounds at δ = 1e-5 (Opacus gives ε 8.19 at z = 1.4).
        assert!(strategy.name().starts_with("dp(C=1, z=1.4"), "{}", strategy.name());
        assert_eq!(strategy.privacy_spent().map(|p| p.1), Some(1e-5));
        let median: FedFile = toml::from_str(&text.replace("kind = \"fedavg\"", "kind = \"median\"")).unwrap();
        let Err(err) = median.strategy() else {
            panic!("median with DP was accepted")
        };
        let err = err.to_string();
        assert!(err.contains("not median"), "{err}");
    }

    #[test]
    fn the_private_demo_is_told_its_noise_outweighs_its_updates() {
        let file: FedFile =
            toml::from_str(include_str!("../../../configs/federation-shakespeare-private.toml")).unwrap();
        // 14.2M values of 2+2 SmolLM2 adapter layers, 3 clients. Python, the same RDP bisection: z = 1.42768 for
        // ε = 8, so z·√d/n = 1793.3 and ⌈z·√d⌉ = 5380.
        let noise = file.dp_noise(14_200_000, 3).unwrap().unwrap();
        assert!((noise.ratio - 1793.3).abs() < 2.0, "{noise:?}");
        assert!(noise.needed.abs_diff(5380) <= 6, "{noise:?}");
        let plain: FedFile = toml::from_str(include_str!("../../../configs/federation-shakespeare.toml")).unwrap();
        assert!(
            plain.dp_noise(14_200_000, 3).unwrap().is_none(),
            "no [privacy], no noise"
        );
    }

    #[test]
    fn relative_paths_are_taken_from_the_config_folder_and_errors_say_where() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("configs");
        std::fs::create_dir(&sub).unwrap();
        let path = sub.join("fed.toml");
        let text = include_str!("../../../configs/federation-shakespeare.toml");
        std::fs::write(&path, text).unwrap();
        let file = FedFile::load(&path).unwrap();
        assert_eq!(file.model.path, sub.join("SmolLM2-135M-Instruct.Q4_1.gguf"));
        assert_eq!(file.server.state_dir, sub.join("offsite-state"));
        assert_eq!(file.sim.unwrap().data[0], sub.join("hamlet_gut.txt"));
        assert_eq!(file.eval.unwrap().data[0], sub.join("as_you_like_it_gut.txt"));
        assert_eq!(file.model.distill_data[2], sub.join("tempest_gut.txt"));
        std::fs::write(&path, text.replace("path = \"", "path = \"/abs/")).unwrap();
        assert_eq!(
            FedFile::load(&path).unwrap().model.path,
            Path::new("/abs/SmolLM2-135M-Instruct.Q4_1.gguf"),
            "absolute paths stay"
        );
        std::fs::write(&path, text.replace("chunk_kib", "chunk_kb")).unwrap();
        let err = FedFile::load(&path).unwrap_err().to_string();
        let line = text.lines().position(|l| l.contains("chunk_kib")).unwrap() + 1;
        assert!(
            err.contains("chunk_kb") && err.contains(&format!("line {line}")),
            "{err}"
        );
    }
}
