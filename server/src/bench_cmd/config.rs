//! A bench config: a federation config (what `sim` reads: model, emulator, distillation, adapter, strategy,
//! federation, local training, data, evaluation and the clients' data) plus a `[bench]` table naming the task,
//! the arms and the settings of the arms that are not federated offsite-tuning.

use std::path::Path;

use anyhow::{bail, Context, Result};
use offsite::adapters::LoraConfig;
use offsite::train::TrainConfig;
use serde::{Deserialize, Serialize};

use crate::fed_cmd::config::FedFile;

/// The arms a bench can run, in report order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub(crate) enum Arm {
    /// The full model as it is.
    ZeroShot,
    /// The emulator as it is (what a client starts from).
    EmulatorZeroShot,
    /// Every decoder layer of the full model trained on the pooled data.
    CentralFullFt,
    /// Only the emulator's adapter layers trained, on the full model, on the pooled data: the ceiling of
    /// offsite-tuning with these adapter layers.
    CentralAdapterCeiling,
    /// LoRA on the full model, pooled data.
    CentralLora,
    /// Offsite-tuning without federation: the adapter layers trained on the emulator on the pooled data, plugged in.
    CentralOtPlugin,
    /// Each client alone trains the emulator's adapter layers on its own data, plugged in; mean over clients.
    LocalOnly,
    /// Federated LoRA where clients hold the full model.
    FedLora,
    /// Federated offsite-tuning over the real protocol, the global adapter plugged into the full model.
    FedOtPlugin,
    /// The same federation's global adapter on the emulator: what a client holds.
    FedOtEmulator,
    /// Federated offsite-tuning with LoRA on the emulator's adapter layers, plugged in.
    FedOtLoraPlugin,
    /// `fed_ot_plugin` under central differential privacy at ε = 8 (δ = 1e-5): the price of privacy.
    FedOtPluginDp8,
    /// `fed_ot_plugin` under central differential privacy at ε = 1 (δ = 1e-5).
    FedOtPluginDp1,
}

impl Arm {
    /// Every arm, in report order.
    pub(crate) const ALL: [Arm; 13] = [
        Arm::ZeroShot,
        Arm::EmulatorZeroShot,
        Arm::CentralFullFt,
        Arm::CentralAdapterCeiling,
        Arm::CentralLora,
        Arm::CentralOtPlugin,
        Arm::LocalOnly,
        Arm::FedLora,
        Arm::FedOtPlugin,
        Arm::FedOtEmulator,
        Arm::FedOtLoraPlugin,
        Arm::FedOtPluginDp8,
        Arm::FedOtPluginDp1,
    ];

    /// The arm of this name.
    pub(crate) fn named(name: &str) -> Option<Arm> {
        Arm::ALL.into_iter().find(|a| a.name() == name)
    }

    /// The ε of a differential-privacy arm.
    pub(crate) fn dp_epsilon(self) -> Option<f64> {
        match self {
            Arm::FedOtPluginDp8 => Some(8.0),
            Arm::FedOtPluginDp1 => Some(1.0),
            _ => None,
        }
    }

    /// The arm's name in reports and on the command line.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Arm::ZeroShot => "zero_shot",
            Arm::EmulatorZeroShot => "emulator_zero_shot",
            Arm::CentralFullFt => "central_full_ft",
            Arm::CentralAdapterCeiling => "central_adapter_ceiling",
            Arm::CentralLora => "central_lora",
            Arm::CentralOtPlugin => "central_ot_plugin",
            Arm::LocalOnly => "local_only",
            Arm::FedLora => "fed_lora",
            Arm::FedOtPlugin => "fed_ot_plugin",
            Arm::FedOtEmulator => "fed_ot_emulator",
            Arm::FedOtLoraPlugin => "fed_ot_lora_plugin",
            Arm::FedOtPluginDp8 => "fed_ot_plugin_dp8",
            Arm::FedOtPluginDp1 => "fed_ot_plugin_dp1",
        }
    }

    /// The run that produces the arm: one run (one child process, one result file) may produce several arms
    /// (`fed_ot` gives both the plug-in and the client's emulator).
    pub(crate) fn run(self) -> &'static str {
        match self {
            Arm::FedOtPlugin | Arm::FedOtEmulator => "fed_ot",
            a => a.name(),
        }
    }

    /// Whether the arm trains over the federation protocol.
    pub(crate) fn federated(self) -> bool {
        matches!(
            self,
            Arm::FedLora
                | Arm::FedOtPlugin
                | Arm::FedOtEmulator
                | Arm::FedOtLoraPlugin
                | Arm::FedOtPluginDp8
                | Arm::FedOtPluginDp1
        )
    }
}

/// The metric a task is scored by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Metric {
    /// Perplexity of the `[eval]` data (lower is better).
    Perplexity,
    /// ROUGE-L F1 (in %) of greedy generations for the `[eval]` JSONL prompts against their reference answers (the
    /// best of them), as Natural Instructions scores (higher is better).
    RougeL,
    /// Exact match (in %) of the final number of greedy generations for the `[eval]` JSONL prompts against their
    /// reference (the number after "the answer is", otherwise the last one), as FederatedScope-LLM scores GSM8K.
    ExactMatch,
}

impl Metric {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Metric::Perplexity => "perplexity",
            Metric::RougeL => "rouge_l",
            Metric::ExactMatch => "exact_match",
        }
    }

    pub(crate) fn higher_is_better(self) -> bool {
        match self {
            Metric::Perplexity => false,
            Metric::RougeL | Metric::ExactMatch => true,
        }
    }
}

/// The optimizer settings of the central arms; their steps follow from the token budget.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CentralSection {
    /// Examples per step.
    pub batch_size: usize,
    /// Peak learning rate of the central arms that train layers (`central_full_ft`, `central_adapter_ceiling`,
    /// `central_ot_plugin`).
    pub lr: f64,
    /// Final learning rate of the cosine schedule.
    pub min_lr: f64,
    /// Warmup steps.
    #[serde(default)]
    pub warmup_steps: usize,
}

/// `[bench]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BenchSection {
    /// The task's name, written into the report.
    pub task: String,
    /// What the arms are scored by.
    pub metric: Metric,
    /// Metrics by generation: tokens generated per prompt at most (greedy, batches of `[eval] batch_size`).
    #[serde(default = "max_new_tokens")]
    pub max_new_tokens: usize,
    /// The arms run unless `--arms` names others (default: every arm).
    #[serde(default = "all_arms")]
    pub arms: Vec<Arm>,
    /// Central arms' optimizer settings.
    pub central: CentralSection,
    /// The LoRA of `central_lora`, `fed_lora` and `fed_ot_lora_plugin` (`layers_to_transform` is set per arm).
    pub lora: LoraConfig,
    /// Peak learning rate of the LoRA arms, central and federated (cosine to a tenth).
    pub lora_lr: f64,
    /// The differential-privacy arms: every client delta is clipped to this L2 norm.
    #[serde(default = "dp_clip_norm")]
    pub dp_clip_norm: f64,
}

fn dp_clip_norm() -> f64 {
    1.0
}

fn max_new_tokens() -> usize {
    32
}

/// The arms run when `[bench] arms` is not given: all but the differential-privacy ones (two more federations).
fn all_arms() -> Vec<Arm> {
    Arm::ALL.into_iter().filter(|a| a.dp_epsilon().is_none()).collect()
}

/// A whole bench config.
#[derive(Debug, Clone)]
pub(crate) struct BenchFile {
    /// Everything but `[bench]`.
    pub fed: FedFile,
    /// `[bench]`.
    pub bench: BenchSection,
}

impl BenchFile {
    /// Reads a bench config; unknown keys are named. Relative paths stay as written: `bench` takes data files from
    /// `--data-dir` when given, the rest (and data otherwise) from the config's folder.
    pub(crate) fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        // Parsed once with spans kept, so an error in either part names its line and column.
        let located = |mut e: toml::de::Error| {
            e.set_input(Some(&text));
            anyhow::anyhow!("{}: {e}", path.display())
        };
        let mut root = toml::de::DeTable::parse(&text).map_err(located)?;
        let bench = root
            .get_mut()
            .remove("bench")
            .with_context(|| format!("{}: a bench config needs a [bench] table", path.display()))?;
        let bench = BenchSection::deserialize(toml::de::ValueDeserializer::from(bench)).map_err(located)?;
        let fed = FedFile::deserialize(toml::de::Deserializer::from(root)).map_err(located)?;
        if bench.metric != Metric::Perplexity && bench.max_new_tokens == 0 {
            bail!(
                "{}: [bench] max_new_tokens must be positive for a metric by generation",
                path.display()
            );
        }
        if bench.central.batch_size == 0 {
            bail!("{}: [bench.central] batch_size must be positive", path.display());
        }
        bench
            .lora
            .validate()
            .map_err(|e| anyhow::anyhow!("{}: [bench.lora]: {e}", path.display()))?;
        Ok(BenchFile { fed, bench })
    }

    /// Examples every arm trains on in all: rounds × clients × local steps × local batch (× accumulation).
    pub(crate) fn budget_examples(&self, clients: usize) -> usize {
        let l = &self.fed.local;
        self.fed.federation.rounds as usize * clients * l.steps * l.batch_size * l.grad_accum.max(1)
    }

    /// The training settings of a central arm over `clients` clients' pooled data, at peak learning rate `lr`:
    /// the clients' local settings with the `[bench.central]` batch, schedule and as many steps as see the budget.
    pub(crate) fn central_train(&self, clients: usize, lr: f64, min_lr: f64) -> Result<TrainConfig> {
        let c = &self.bench.central;
        let budget = self.budget_examples(clients);
        if !budget.is_multiple_of(c.batch_size) {
            bail!(
                "the token budget ({budget} examples: rounds × clients × local steps × local batch) is not a \
                 multiple of [bench.central] batch_size = {}",
                c.batch_size
            );
        }
        Ok(TrainConfig {
            steps: budget / c.batch_size,
            batch_size: c.batch_size,
            grad_accum: 1,
            lr,
            min_lr,
            warmup_steps: c.warmup_steps,
            seed: self.fed.federation.seed,
            ..self.fed.local.clone()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_bench_config_gives_every_arm_the_same_examples() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shakespeare.toml");
        std::fs::write(&path, include_str!("../../../configs/bench/shakespeare.toml")).unwrap();
        let file = BenchFile::load(&path).unwrap();
        assert_eq!(file.bench.arms.len(), 11);
        assert_eq!(file.bench.arms, all_arms());
        let clients = file.fed.sim.as_ref().unwrap().data.len();
        assert_eq!(clients, 6);
        // 5 rounds × 6 clients × 8 local steps × 1 block = 240 blocks = 60 central steps of 4.
        assert_eq!(file.budget_examples(clients), 240);
        let central = file.central_train(clients, 1e-4, 1e-5).unwrap();
        assert_eq!((central.steps, central.batch_size), (60, 4));
    }

    #[test]
    fn the_generation_tasks_give_every_arm_the_same_examples() {
        let dir = tempfile::tempdir().unwrap();
        for (text, metric, clients, budget, steps) in [
            (
                include_str!("../../../configs/bench/natural-instructions.toml"),
                Metric::RougeL,
                8,
                160,
                40,
            ),
            (
                include_str!("../../../configs/bench/gsm-symbolic.toml"),
                Metric::ExactMatch,
                10,
                200,
                50,
            ),
        ] {
            let path = dir.path().join("task.toml");
            std::fs::write(&path, text).unwrap();
            let file = BenchFile::load(&path).unwrap();
            assert_eq!(file.bench.metric, metric);
            assert!(file.bench.max_new_tokens > 0);
            assert_eq!(file.fed.sim.as_ref().unwrap().data.len(), clients);
            assert_eq!(file.budget_examples(clients), budget);
            let central = file.central_train(clients, 1e-4, 1e-5).unwrap();
            assert_eq!((central.steps, central.batch_size), (steps, 4));
            std::fs::write(&path, text.replace("max_new_tokens = ", "max_new_tokens = 0 #")).unwrap();
            let err = BenchFile::load(&path).unwrap_err().to_string();
            assert!(err.contains("max_new_tokens"), "{err}");
        }
    }

    #[test]
    fn bench_tables_name_unknown_keys_and_uneven_budgets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.toml");
        let text = include_str!("../../../configs/bench/shakespeare.toml");
        std::fs::write(&path, text.replace("lora_lr = 4e-4", "lora_lr = 4e-4\nlora_rate = 1")).unwrap();
        let err = BenchFile::load(&path).unwrap_err().to_string();
        assert!(err.contains("lora_rate"), "{err}");
        let line = text.lines().position(|l| l.starts_with("lora_lr = 4e-4")).unwrap() + 2;
        assert!(
            err.contains(&format!("line {line}, column 1")),
            "the unknown key's place: {err}"
        );
        std::fs::write(&path, text.replace("rounds = ", "roundz = ")).unwrap();
        let err = BenchFile::load(&path).unwrap_err().to_string();
        let line = text.lines().position(|l| l.starts_with("rounds = ")).unwrap() + 1;
        assert!(
            err.contains("roundz") && err.contains(&format!("line {line}")),
            "outside [bench] too: {err}"
        );
        std::fs::write(
            &path,
            text.replace("batch_size = 4\nlr = 1e-4", "batch_size = 7\nlr = 1e-4"),
        )
        .unwrap();
        let file = BenchFile::load(&path).unwrap();
        let err = file.central_train(6, 1e-4, 1e-5).unwrap_err().to_string();
        assert!(err.contains("not a multiple"), "{err}");
    }
}
