//! The runs of a bench, each in its own process (so its peak memory is its own): each trains what its arm names
//! on the same number of examples and evaluates the result on the same held-out examples.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use burn::tensor::Device;
use offsite::adapters::{self, AdapterManifest, AdapterSpec, Method};
use offsite::data::{Example, PromptRecord};
use offsite::emulator::Emulator;
use offsite::federated::{adapter_state, plug_state};
use offsite::load::{peak_rss_bytes, Checkpoint};
use offsite::model::LlamaForCausalLM;
use offsite::progress::Progress;
use offsite::tokenizer::Tokenizer;
use offsite::train::{exact_match, rouge_l, TrainConfig, Trainer};
use offsite_fed::RoundReport;
use serde::{Deserialize, Serialize};
use tracing::info;

use super::config::{Arm, BenchFile, Metric};
use crate::fed_cmd::config::SimSection;
use crate::fed_cmd::loopback::{client_examples, Loopback};

/// One arm's outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct ArmResult {
    /// The task's metric.
    pub metric: f64,
    /// Perplexity of the `[eval]` data.
    pub perplexity: f64,
    /// Metrics by generation: tokens generated per second in the arm's (last) scoring.
    #[serde(default)]
    pub generation_tokens_per_s: Option<f64>,
    /// Seconds the run took (training and evaluation; one federation gives two arms the same time).
    pub wall_s: f64,
    /// Peak resident memory of the process after training, before any evaluation model was loaded: what a client
    /// doing this training needs (MiB). None where no client trains alone in the process (federations run the
    /// server and every client in one process; see `process_peak_rss_mib`).
    pub client_peak_rss_mib: Option<u64>,
    /// Peak resident memory of the whole run's process (MiB).
    pub process_peak_rss_mib: Option<u64>,
    /// Mean bytes a client sent per round (federated arms).
    pub bytes_up_per_client_round: Option<f64>,
    /// Mean bytes the server sent a sampled client per round (federated arms).
    pub bytes_down_per_client_round: Option<f64>,
    /// Parameters trained.
    pub trainable_params: Option<u64>,
    /// Examples trained on, over every step, client and round.
    pub train_examples: u64,
    /// Offsite-tuning arms: perplexity of the emulator with the trained adapter (what the client holds).
    pub emulator_perplexity: Option<f64>,
    /// `local_only`: each client's metric.
    pub per_client: Option<Vec<f64>>,
    /// Federated arms: the plug-in's perplexity after each evaluated round.
    pub rounds: Vec<(u64, f64)>,
    /// Differential-privacy arms: the ε spent (δ = 1e-5).
    #[serde(default)]
    pub epsilon: Option<f64>,
}

/// A run's result file, `runs/NAME.json`.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct RunFile {
    /// The bench key the run belongs to.
    pub key: String,
    /// The arms it produced, by name.
    pub arms: BTreeMap<String, ArmResult>,
}

/// What every run shares.
pub(crate) struct Ctx {
    /// The config, overrides applied.
    pub file: BenchFile,
    /// The bench's output directory.
    pub out: PathBuf,
    /// Where training and evaluation run.
    pub device: Device,
    /// Whether the device computes f16 fast.
    pub fast_f16: bool,
    /// The offsite-tuning emulator (built by the parent).
    pub ot_emulator: Option<PathBuf>,
    /// The full model as an "emulator" clients hold whole (`fed_lora`).
    pub full_emulator: Option<PathBuf>,
}

/// The held-out data of every arm: examples for perplexity, prompts for metrics by generation.
struct EvalSet {
    examples: Vec<Example>,
    /// Empty unless the metric generates.
    prompts: Vec<PromptRecord>,
    tokenizer: Tokenizer,
}

/// A model's scores on the [`EvalSet`].
#[derive(Debug, Clone, Copy)]
struct Score {
    metric: f64,
    perplexity: f64,
    generation_tokens_per_s: Option<f64>,
}

/// A run's measurements before they become arms.
struct Outcome {
    score: Score,
    client_rss: Option<u64>,
    trainable: Option<u64>,
    examples: u64,
}

fn mib() -> Option<u64> {
    peak_rss_bytes().map(|b| b >> 20)
}

impl Ctx {
    fn checkpoint(&self) -> Result<Checkpoint> {
        let path = &self.file.fed.model.path;
        Checkpoint::open(path).with_context(|| format!("opening model {}", path.display()))
    }

    fn sim(&self) -> Result<&SimSection> {
        self.file
            .fed
            .sim
            .as_ref()
            .context("a bench config needs a [sim] table (the clients' data)")
    }

    fn emulator(path: Option<&PathBuf>) -> Result<Emulator> {
        let path = path.context("the parent names the emulator")?;
        Emulator::open(path).with_context(|| format!("opening emulator {}", path.display()))
    }

    fn eval_set(&self, checkpoint: &Checkpoint) -> Result<EvalSet> {
        let eval = self
            .file
            .fed
            .eval
            .as_ref()
            .context("a bench config needs an [eval] table")?;
        let tokenizer = checkpoint.tokenizer()?;
        let data = &self.file.fed.data;
        let examples = crate::fed_cmd::eval_examples(data, &eval.data, &tokenizer, eval.max_examples)?;
        let prompts = match self.file.bench.metric {
            Metric::Perplexity => Vec::new(),
            Metric::RougeL | Metric::ExactMatch => {
                let all = data.load_all_prompts(&eval.data, &tokenizer)?;
                crate::eval_cmd::spread(all, eval.max_examples)
            }
        };
        Ok(EvalSet {
            examples,
            prompts,
            tokenizer,
        })
    }

    fn batch(&self) -> usize {
        self.file.fed.eval.as_ref().map_or(4, |e| e.batch_size)
    }

    fn perplexity(&self, label: &str, model: &LlamaForCausalLM, eval: &EvalSet) -> Result<f64> {
        Ok(crate::fed_cmd::measure(label, model, &eval.examples, self.batch())?.perplexity)
    }

    /// The model's metric and perplexity (`perplexity` when already measured).
    fn score(&self, label: &str, model: &LlamaForCausalLM, eval: &EvalSet, perplexity: Option<f64>) -> Result<Score> {
        let perplexity = match perplexity {
            Some(p) => p,
            None => self.perplexity(label, model, eval)?,
        };
        let scorer: fn(&str, &[String]) -> f64 = match self.file.bench.metric {
            Metric::Perplexity => {
                return Ok(Score {
                    metric: perplexity,
                    perplexity,
                    generation_tokens_per_s: None,
                })
            }
            Metric::RougeL => rouge_l,
            Metric::ExactMatch => exact_match,
        };
        let (metric, tps) = self.generated(label, model, eval, scorer)?;
        Ok(Score {
            metric,
            perplexity,
            generation_tokens_per_s: Some(tps),
        })
    }

    /// The mean score (%) of greedy generations for the prompts against their references, and tokens generated
    /// per second.
    fn generated(
        &self,
        label: &str,
        model: &LlamaForCausalLM,
        eval: &EvalSet,
        scorer: fn(&str, &[String]) -> f64,
    ) -> Result<(f64, f64)> {
        let start = Instant::now();
        let prompts: Vec<Vec<u32>> = eval.prompts.iter().map(|p| p.ids.clone()).collect();
        let eos = eval.tokenizer.eos_ids();
        let out = offsite::generate::greedy_batch(model, &prompts, eos, self.file.bench.max_new_tokens, self.batch())?;
        let seconds = start.elapsed().as_secs_f64();
        let mut total = 0.0;
        for (record, ids) in eval.prompts.iter().zip(&out) {
            let answer: Vec<u32> = ids.iter().copied().filter(|t| !eos.contains(t)).collect();
            let text = eval.tokenizer.decode(&answer, true)?;
            total += scorer(&text, &record.references);
        }
        let score = 100.0 * total / eval.prompts.len().max(1) as f64;
        let tokens: usize = out.iter().map(Vec::len).sum();
        let tps = tokens as f64 / seconds.max(1e-9);
        info!(
            model = label,
            metric = self.file.bench.metric.name(),
            score = format!("{score:.2}"),
            tokens_per_s = format!("{tps:.1}"),
            seconds = format!("{seconds:.1}"),
            "generated"
        );
        Ok((score, tps))
    }

    /// The emulator's adapter layers, from `[emulator]` (the same as any emulator built from it).
    fn adapter_layers(&self, depth: usize) -> Result<Vec<usize>> {
        let e = self
            .file
            .fed
            .emulator
            .as_ref()
            .context("a bench config needs an [emulator] table")?;
        if e.bottom_layers + e.top_layers > depth {
            bail!(
                "{} + {} adapter layers exceed the model's {depth}",
                e.bottom_layers,
                e.top_layers
            );
        }
        Ok((0..e.bottom_layers).chain(depth - e.top_layers..depth).collect())
    }

    fn lora_spec(&self) -> AdapterSpec {
        AdapterSpec {
            method: Method::Lora,
            lora: Some(self.file.bench.lora.clone()),
            prompt: None,
        }
    }

    fn layers_spec() -> AdapterSpec {
        AdapterSpec {
            method: Method::Layers,
            lora: None,
            prompt: None,
        }
    }
}

/// Trains `model` with a progress bar; returns it and the examples it saw.
fn train(
    label: &str,
    model: LlamaForCausalLM,
    examples: &[Example],
    config: TrainConfig,
) -> Result<(LlamaForCausalLM, u64)> {
    let mut bar = Progress::new(
        label,
        "{bar:30} {pos}/{len} steps {msg} [{elapsed} < {eta}]",
        config.steps as u64,
        0,
    );
    let seen = (config.steps * config.batch_size * config.grad_accum.max(1)) as u64;
    let mut trainer = Trainer::new(config)?;
    let model = trainer.run(model, examples, &mut |r| {
        bar.message(&format!("loss {:.4}", r.loss));
        bar.inc(1);
    })?;
    drop(bar);
    Ok((model, seen))
}

fn count(model: &LlamaForCausalLM) -> u64 {
    model
        .named_params()
        .iter()
        .filter(|p| p.trainable)
        .map(|p| p.shape.iter().product::<usize>() as u64)
        .sum()
}

/// Runs `run` and returns its arms.
pub(crate) fn run(ctx: &Ctx, run: &str) -> Result<BTreeMap<Arm, ArmResult>> {
    let start = Instant::now();
    let checkpoint = ctx.checkpoint()?;
    let eval = ctx.eval_set(&checkpoint)?;
    let tokenizer = checkpoint.tokenizer()?;
    let clients = client_examples(&ctx.file.fed, ctx.sim()?, &tokenizer)?;
    let pooled: Vec<Example> = clients.iter().flatten().cloned().collect();
    let n = clients.len();
    let depth = checkpoint.config().num_hidden_layers;
    let ad = ctx.device.clone().autodiff();
    let (c_lr, c_min) = (ctx.file.bench.central.lr, ctx.file.bench.central.min_lr);
    let lora_lr = ctx.file.bench.lora_lr;
    let single = |arm: Arm, o: Outcome| -> BTreeMap<Arm, ArmResult> {
        BTreeMap::from([(arm, arm_result(o, start, None, None, Vec::new()))])
    };
    Ok(match run {
        "zero_shot" => {
            let score = ctx.score(
                "zero-shot full model",
                &checkpoint.load_model(&ctx.device)?,
                &eval,
                None,
            )?;
            single(
                Arm::ZeroShot,
                Outcome {
                    score,
                    client_rss: None,
                    trainable: None,
                    examples: 0,
                },
            )
        }
        "emulator_zero_shot" => {
            let emu = Ctx::emulator(ctx.ot_emulator.as_ref())?;
            let score = ctx.score("emulator", &emu.load_model(&ctx.device)?, &eval, None)?;
            single(
                Arm::EmulatorZeroShot,
                Outcome {
                    score,
                    client_rss: None,
                    trainable: None,
                    examples: 0,
                },
            )
        }
        "central_full_ft" | "central_adapter_ceiling" | "central_lora" => {
            let (arm, spec, layers, lr, min) = match run {
                "central_full_ft" => (
                    Arm::CentralFullFt,
                    Ctx::layers_spec(),
                    (0..depth).collect(),
                    c_lr,
                    c_min,
                ),
                "central_adapter_ceiling" => (
                    Arm::CentralAdapterCeiling,
                    Ctx::layers_spec(),
                    ctx.adapter_layers(depth)?,
                    c_lr,
                    c_min,
                ),
                _ => (
                    Arm::CentralLora,
                    ctx.lora_spec(),
                    (0..depth).collect(),
                    lora_lr,
                    lora_lr / 10.0,
                ),
            };
            let (model, _) = spec.prepare(checkpoint.load_model(&ad)?, &layers, None)?;
            let trainable = count(&model);
            let (model, examples) = train(arm.name(), model, &pooled, ctx.file.central_train(n, lr, min)?)?;
            let client_rss = mib();
            let score = ctx.score(arm.name(), &model.without_autodiff(), &eval, None)?;
            single(
                arm,
                Outcome {
                    score,
                    client_rss,
                    trainable: Some(trainable),
                    examples,
                },
            )
        }
        "central_ot_plugin" => {
            let emu = Ctx::emulator(ctx.ot_emulator.as_ref())?;
            let layers = emu.manifest().adapter_layers.clone();
            let spec = &ctx.file.fed.adapter;
            let (model, lora) = spec.prepare(emu.load_model(&ad)?, &layers, Some(&tokenizer))?;
            let trainable = count(&model);
            // The ceiling's settings: the two differ only in the model the adapter layers train in.
            let config = ctx.file.central_train(n, c_lr, c_min)?;
            let (model, examples) = train("central_ot_plugin", model, &pooled, config)?;
            let client_rss = mib();
            let dir = ctx.out.join("runs").join(run).join("adapter");
            adapters::save(
                &dir,
                &model,
                &AdapterManifest::for_emulator(spec.method, &emu),
                lora.as_ref(),
            )?;
            let state = adapter_state(&model)?;
            let emu_p = ctx.perplexity("emulator + adapter", &model.without_autodiff(), &eval)?;
            let plugged = plug_state(checkpoint.load_model(&ctx.device)?, &layers, spec, &state)?;
            let score = ctx.score("plug-in", &plugged, &eval, None)?;
            let o = Outcome {
                score,
                client_rss,
                trainable: Some(trainable),
                examples,
            };
            BTreeMap::from([(
                Arm::CentralOtPlugin,
                arm_result(o, start, Some(emu_p), None, Vec::new()),
            )])
        }
        "local_only" => local_only(ctx, &checkpoint, &clients, &eval, start)?,
        "fed_ot" | "fed_lora" | "fed_ot_lora_plugin" | "fed_ot_plugin_dp8" | "fed_ot_plugin_dp1" => {
            federated(ctx, run, &checkpoint, clients, &eval, start)?
        }
        other => bail!("no run named `{other}`"),
    })
}

fn arm_result(
    o: Outcome,
    start: Instant,
    emu: Option<f64>,
    per_client: Option<Vec<f64>>,
    rounds: Vec<(u64, f64)>,
) -> ArmResult {
    ArmResult {
        metric: o.score.metric,
        perplexity: o.score.perplexity,
        generation_tokens_per_s: o.score.generation_tokens_per_s,
        wall_s: start.elapsed().as_secs_f64(),
        client_peak_rss_mib: o.client_rss,
        process_peak_rss_mib: mib(),
        bytes_up_per_client_round: None,
        bytes_down_per_client_round: None,
        trainable_params: o.trainable,
        train_examples: o.examples,
        emulator_perplexity: emu,
        per_client,
        rounds,
        epsilon: None,
    }
}

/// Each client alone: the emulator's adapter trained on its own data for the steps it trains in the federation
/// (so all clients together see the budget), plugged in; the metric is the mean over clients.
fn local_only(
    ctx: &Ctx,
    checkpoint: &Checkpoint,
    clients: &[Vec<Example>],
    eval: &EvalSet,
    start: Instant,
) -> Result<BTreeMap<Arm, ArmResult>> {
    let emu = Ctx::emulator(ctx.ot_emulator.as_ref())?;
    let layers = emu.manifest().adapter_layers.clone();
    let spec = &ctx.file.fed.adapter;
    let tokenizer = emu.tokenizer()?;
    let ad = ctx.device.clone().autodiff();
    let fed = &ctx.file.fed;
    let (mut states, mut examples, mut trainable, mut client_rss) = (Vec::new(), 0u64, None, None);
    for (i, data) in clients.iter().enumerate() {
        let (model, _) = spec.prepare(emu.load_model(&ad)?, &layers, Some(&tokenizer))?;
        trainable.get_or_insert(count(&model));
        let config = TrainConfig {
            steps: fed.federation.rounds as usize * fed.local.steps,
            seed: fed.federation.seed.wrapping_add(i as u64),
            ..fed.local.clone()
        };
        let (model, seen) = train(&format!("local_only client {i}"), model, data, config)?;
        examples += seen;
        client_rss.get_or_insert(mib().unwrap_or(0));
        states.push(adapter_state(&model)?);
    }
    let full = checkpoint.load_model(&ctx.device)?;
    let mut scores = Vec::new();
    for (i, state) in states.iter().enumerate() {
        let plugged = plug_state(full.clone(), &layers, spec, state)?;
        scores.push(ctx.score(&format!("local_only client {i} plug-in"), &plugged, eval, None)?);
    }
    let mean = |f: fn(&Score) -> f64| scores.iter().map(f).sum::<f64>() / scores.len().max(1) as f64;
    let per_client = scores.iter().map(|s| s.metric).collect();
    let o = Outcome {
        score: Score {
            metric: mean(|s| s.metric),
            perplexity: mean(|s| s.perplexity),
            generation_tokens_per_s: scores.last().and_then(|s| s.generation_tokens_per_s),
        },
        client_rss,
        trainable,
        examples,
    };
    Ok(BTreeMap::from([(
        Arm::LocalOnly,
        arm_result(o, start, None, Some(per_client), Vec::new()),
    )]))
}

/// A federation over the real protocol on loopback: `fed_ot` (the config's adapter on the offsite-tuning
/// emulator), `fed_ot_lora_plugin` (LoRA on its adapter layers) or `fed_lora` (LoRA, clients hold the full model).
fn federated(
    ctx: &Ctx,
    run: &str,
    checkpoint: &Checkpoint,
    clients: Vec<Vec<Example>>,
    eval: &EvalSet,
    start: Instant,
) -> Result<BTreeMap<Arm, ArmResult>> {
    let mut file = ctx.file.fed.clone();
    let dir = ctx.out.join("runs").join(run);
    file.server.state_dir = dir.join("state");
    if file.server.state_dir.exists() {
        std::fs::remove_dir_all(&file.server.state_dir)
            .with_context(|| format!("removing the unfinished run in {}", file.server.state_dir.display()))?;
    }
    let emulator = if run == "fed_lora" {
        &ctx.full_emulator
    } else {
        &ctx.ot_emulator
    };
    let emulator = emulator.clone().context("the parent names the emulator")?;
    let dp = Arm::named(run).and_then(Arm::dp_epsilon);
    if let Some(epsilon) = dp {
        file.privacy = Some(offsite_fed::PrivacyConfig {
            clip_norm: ctx.file.bench.dp_clip_norm,
            noise_multiplier: None,
            target_epsilon: Some(epsilon),
            delta: 1e-5,
            noise: Default::default(),
        });
    } else if run != "fed_ot" {
        file.adapter = ctx.lora_spec();
        file.local.lr = ctx.file.bench.lora_lr;
        file.local.min_lr = ctx.file.bench.lora_lr / 10.0;
    }
    let emu = Emulator::open(&emulator)?;
    let layers = emu.manifest().adapter_layers.clone();
    let full = checkpoint.load_model(&ctx.device)?;
    let batch = file.eval.as_ref().map_or(4, |e| e.batch_size);
    let evaluator = crate::fed_cmd::evaluator(
        full.clone(),
        layers.clone(),
        file.adapter.clone(),
        eval.examples.clone(),
        batch,
    );
    let initial = crate::fed_cmd::initial_state(&emu, &file.adapter, file.federation.seed)?;
    let trainable = initial.values().map(|t| t.values.len() as u64).sum();
    let mut reports: Vec<RoundReport> = Vec::new();
    let loopback = Loopback {
        file: &file,
        emulator: emulator.clone(),
        clients,
        device: ctx.device.clone(),
        fast_f16: ctx.fast_f16,
    };
    let state = loopback.run(initial, Some(evaluator), &mut |r| {
        info!(run, round = r.round, loss = format!("{:.4}", r.train_loss), perplexity = ?r.eval_perplexity, "round");
        reports.push(r.clone());
    })?;
    crate::fed_cmd::save_adapter(&emu, &file.adapter, &state.global, &dir.join("adapter"))?;
    let rounds: Vec<(u64, f64)> = reports
        .iter()
        .filter_map(|r| r.eval_perplexity.map(|p| (r.round, p)))
        .collect();
    let last = reports.last().map(|r| r.round);
    let known = match rounds.last() {
        Some(&(round, p)) if Some(round) == last => Some(p),
        _ => None,
    };
    let plugged = plug_state(full, &layers, &file.adapter, &state.global)?;
    let plug = ctx.score("plug-in", &plugged, eval, known)?;
    drop(plugged);
    let (up, down, participants, sampled) = reports.iter().fold((0u64, 0u64, 0u64, 0u64), |a, r| {
        (
            a.0 + r.bytes_in,
            a.1 + r.bytes_out,
            a.2 + r.participants as u64,
            a.3 + r.sampled as u64,
        )
    });
    let local = &file.local;
    let examples = participants * (local.steps * local.batch_size * local.grad_accum.max(1)) as u64;
    let result = |score: Score, emu_p: Option<f64>, rounds: Vec<(u64, f64)>| ArmResult {
        bytes_up_per_client_round: Some(up as f64 / participants.max(1) as f64),
        bytes_down_per_client_round: Some(down as f64 / sampled.max(1) as f64),
        ..arm_result(
            Outcome {
                score,
                client_rss: None,
                trainable: Some(trainable),
                examples,
            },
            start,
            emu_p,
            None,
            rounds,
        )
    };
    let emulator_model = || plug_state(emu.load_model(&ctx.device)?, &layers, &file.adapter, &state.global);
    Ok(match run {
        "fed_ot" => {
            let emu_score = ctx.score("emulator + global adapter", &emulator_model()?, eval, None)?;
            BTreeMap::from([
                (Arm::FedOtPlugin, result(plug, Some(emu_score.perplexity), rounds)),
                (Arm::FedOtEmulator, result(emu_score, None, Vec::new())),
            ])
        }
        "fed_lora" => BTreeMap::from([(Arm::FedLora, result(plug, None, rounds))]),
        "fed_ot_lora_plugin" => {
            let emu_p = ctx.perplexity("emulator + global adapter", &emulator_model()?, eval)?;
            BTreeMap::from([(Arm::FedOtLoraPlugin, result(plug, Some(emu_p), rounds))])
        }
        _ => {
            let arm = Arm::named(run).with_context(|| format!("no arm is run `{run}`"))?;
            let emu_p = ctx.perplexity("emulator + global adapter", &emulator_model()?, eval)?;
            let epsilon = reports.last().and_then(|r| r.epsilon);
            info!(run, epsilon = ?epsilon, "privacy spent");
            BTreeMap::from([(
                arm,
                ArmResult {
                    epsilon,
                    ..result(plug, Some(emu_p), rounds)
                },
            )])
        }
    })
}

/// Where a run's result goes.
pub(crate) fn run_file(out: &Path, run: &str) -> PathBuf {
    out.join("runs").join(format!("{run}.json"))
}
