//! `offsite-edge train`: trains the adapter of an emulator on local data, with no network.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use offsite::adapters::{self, AdapterManifest};
use offsite::data::{split_holdout, Example};
use offsite::device::{self, DeviceChoice};
use offsite::emulator::Emulator;
use offsite::load::peak_rss_bytes;
use offsite::model::LlamaForCausalLM;
use offsite::progress::Progress;
use offsite::train::{evaluate, Precision, StepReport, TrainJob, Trainer};
use tracing::{info, warn};

#[derive(Args)]
pub(crate) struct TrainArgs {
    /// The emulator file (from `offsite-server emulator build`).
    #[arg(long)]
    emulator: PathBuf,
    /// Training data: JSONL instruction records or plain text (repeatable; examples are pooled).
    #[arg(long, required = true)]
    data: Vec<PathBuf>,
    /// Output directory: the adapter, its manifest, the optimizer state and `train_log.jsonl`.
    #[arg(long)]
    out: PathBuf,
    /// A TOML job with `[train]`, `[data]` and `[adapter]` tables; defaults otherwise.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Overrides `[train] steps`.
    #[arg(long)]
    steps: Option<usize>,
    /// auto, cpu, gpu or gpu:N.
    #[arg(long, default_value = "auto")]
    device: DeviceChoice,
    /// Continue the run checkpointed in `--out` (same emulator, data and settings).
    #[arg(long)]
    resume: bool,
}

fn eval_loss(model: &LlamaForCausalLM, held: &[Example], job: &TrainJob, when: &str) -> Result<()> {
    if held.is_empty() {
        return Ok(());
    }
    // On the inner device: no autodiff graph is recorded, so evaluation needs no more memory than inference.
    let r = evaluate(&model.without_autodiff(), held, job.eval_batch_size)?;
    info!(
        loss = format!("{:.4}", r.loss),
        perplexity = format!("{:.3}", r.perplexity),
        tokens = r.tokens,
        "held-out {when} training"
    );
    Ok(())
}

pub(crate) fn run(args: TrainArgs) -> Result<()> {
    let emu =
        Emulator::open(&args.emulator).with_context(|| format!("opening emulator {}", args.emulator.display()))?;
    let mut job = match &args.config {
        Some(p) => TrainJob::from_file(p)?,
        None => TrainJob::default(),
    };
    if let Some(steps) = args.steps {
        job.train.steps = steps;
    }
    let tokenizer = emu.tokenizer()?;
    let examples = job.data.load_all(&args.data, &tokenizer)?;
    let (train, held) = split_holdout(examples, job.eval_fraction, job.train.seed);
    if train.is_empty() {
        bail!(
            "no training examples left after holding out {} of the data",
            job.eval_fraction
        );
    }
    let (device, described) = device::resolve(args.device)?;
    if job.train.precision == Precision::MixedF16 && !device::fast_f16(args.device) {
        warn!(device = %described, "mixed precision needs a GPU with shader-f16; training in f32");
        job.train.precision = Precision::F32;
    }
    info!(device = %described, train = train.len(), held_out = held.len(), "data ready");
    let model = emu.load_model(&device.clone().autodiff())?;
    let layers = emu.manifest().adapter_layers.clone();
    let (model, lora, mut trainer) = if args.resume {
        let (model, lora) = job.adapter.resume(model, &layers, &args.out, Some(&tokenizer))?;
        let trainer = Trainer::load(&args.out, &device)?.with_steps(job.train.steps);
        info!(step = trainer.step(), of = job.train.steps, "resuming");
        (model, lora, trainer)
    } else {
        let (model, lora) = job.adapter.prepare(model, &layers, Some(&tokenizer))?;
        (model, lora, Trainer::new(job.train.clone())?)
    };
    let manifest = AdapterManifest::for_emulator(job.adapter.method, &emu);
    eval_loss(&model, &held, &job, "before")?;

    std::fs::create_dir_all(&args.out)?;
    let log_path = args.out.join("train_log.jsonl");
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(args.resume)
        .write(true)
        .truncate(!args.resume)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let mut bar = Progress::new(
        "train",
        "{bar:30} {pos}/{len} steps {msg} [{elapsed} < {eta}]",
        job.train.steps as u64,
        trainer.step() as u64,
    );
    let (start, first_step) = (Instant::now(), trainer.step());
    let (mut tokens, mut skipped) = (0usize, 0usize);
    let mut log_err = None;
    let mut on_step = |r: &StepReport| {
        tokens += r.tokens;
        skipped += r.skipped as usize;
        bar.message(&format!("loss {:.4} lr {:.2e}", r.loss, r.lr));
        bar.inc(1);
        let line = serde_json::json!({
            "step": r.step + 1, "loss": r.loss, "grad_norm": r.grad_norm, "lr": r.lr,
            "skipped": r.skipped, "tokens": r.tokens,
        });
        if let Err(e) = writeln!(log, "{line}") {
            log_err.get_or_insert(e);
        }
    };
    let every = if job.save_every == 0 {
        job.train.steps
    } else {
        job.save_every
    };
    let mut model = model;
    while trainer.step() < job.train.steps {
        let until = (trainer.step() / every + 1) * every;
        model = trainer.run_until(model, &train, until, &mut on_step)?;
        adapters::save(&args.out, &model, &manifest, lora.as_ref())?;
        trainer.save(&args.out)?;
    }
    drop(bar);
    if let Some(e) = log_err {
        return Err(e).with_context(|| format!("writing {}", log_path.display()));
    }
    let seconds = start.elapsed().as_secs_f64();
    info!(
        steps = trainer.step() - first_step,
        skipped,
        seconds = format!("{seconds:.1}"),
        tokens_per_s = format!("{:.1}", tokens as f64 / seconds),
        peak_rss_mib = peak_rss_bytes().map(|b| b / (1 << 20)),
        out = %args.out.display(),
        "trained"
    );
    eval_loss(&model, &held, &job, "after")
}
