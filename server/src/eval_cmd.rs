//! `offsite-server eval`: perplexity of the zero-shot full model, of an emulator (with and without the adapter) and
//! of the plug-in model (full model + adapter) on the same data.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;

use offsite::device::{self, DeviceChoice};
use offsite::emulator::Emulator;
use offsite::load::Checkpoint;
use offsite::model::LlamaForCausalLM;
use offsite::train::{evaluate, EvalReport, TrainJob};
use tracing::info;

#[derive(Args)]
pub(crate) struct EvalArgs {
    /// The full model: Hugging Face directory or `.gguf` file.
    #[arg(long)]
    model: PathBuf,
    /// An adapter directory (PEFT LoRA or Offsite): evaluated plugged into the full model, and into the emulator.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// An emulator of the model: evaluated as it is (and with the adapter).
    #[arg(long)]
    emulator: Option<PathBuf>,
    /// Evaluation data: JSONL instruction records or plain text (repeatable).
    #[arg(long, required = true)]
    data: Vec<PathBuf>,
    /// A TOML job whose `[data]` table says how the data is read (defaults otherwise).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Evaluate at most this many examples, spread evenly over the data.
    #[arg(long)]
    max_examples: Option<usize>,
    /// Examples per batch.
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    /// auto, cpu, gpu or gpu:N.
    #[arg(long, default_value = "auto")]
    device: DeviceChoice,
    /// Also write the results as a JSON object to this file; `-`: print the JSON on stdout instead of the table.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// `n` examples (or prompts) at evenly spaced positions (all of them when there are fewer).
pub(crate) fn spread<T: Clone>(examples: Vec<T>, n: Option<usize>) -> Vec<T> {
    match n {
        Some(n) if n < examples.len() => {
            let len = examples.len();
            (0..n).map(|i| examples[i * len / n].clone()).collect()
        }
        _ => examples,
    }
}

pub(crate) fn run(args: EvalArgs) -> Result<()> {
    if args.batch_size == 0 {
        bail!("--batch-size must be positive");
    }
    let checkpoint =
        Checkpoint::open(&args.model).with_context(|| format!("opening model {}", args.model.display()))?;
    let job = match &args.config {
        Some(p) => TrainJob::from_file(p)?,
        None => TrainJob::default(),
    };
    let tokenizer = checkpoint.tokenizer()?;
    let examples = spread(job.data.load_all(&args.data, &tokenizer)?, args.max_examples);
    let emulator = match &args.emulator {
        Some(p) => {
            let emu = Emulator::open(p).with_context(|| format!("opening emulator {}", p.display()))?;
            if emu.manifest().base_model_sha256 != checkpoint.sha256()? {
                bail!("emulator {} was built from another model", p.display());
            }
            Some(emu)
        }
        None => None,
    };
    let (device, described) = device::resolve(args.device)?;
    info!(device = %described, examples = examples.len(), "evaluating");

    let mut rows: Vec<(&str, EvalReport)> = Vec::new();
    let mut measure = |label: &'static str, model: LlamaForCausalLM| -> Result<()> {
        let start = Instant::now();
        let r = evaluate(&model, &examples, args.batch_size)?;
        info!(
            model = label,
            perplexity = format!("{:.3}", r.perplexity),
            seconds = format!("{:.1}", start.elapsed().as_secs_f64()),
            "evaluated"
        );
        rows.push((label, r));
        Ok(())
    };
    measure("zero-shot full model", checkpoint.load_model(&device)?)?;
    if let Some(emu) = &emulator {
        measure("emulator", emu.load_model(&device)?)?;
        if let Some(dir) = &args.adapter {
            let model = offsite::adapters::apply(emu.load_model(&device)?, dir)
                .with_context(|| format!("applying adapter {} to the emulator", dir.display()))?;
            measure("emulator + adapter", model)?;
        }
    }
    if let Some(dir) = &args.adapter {
        let model = crate::plug::plug_in(&checkpoint, checkpoint.load_model(&device)?, dir)?;
        measure("plug-in (full model + adapter)", model)?;
    }

    let to_stdout = args.json.as_deref() == Some(std::path::Path::new("-"));
    if !to_stdout {
        println!("{:<32} {:>10} {:>12} {:>8}", "model", "loss", "perplexity", "tokens");
        for (label, r) in &rows {
            println!("{label:<32} {:>10.4} {:>12.3} {:>8}", r.loss, r.perplexity, r.tokens);
        }
    }
    if let Some(path) = &args.json {
        let json: serde_json::Map<String, serde_json::Value> = rows
            .iter()
            .map(|(label, r)| {
                let v = serde_json::json!({"loss": r.loss, "perplexity": r.perplexity, "tokens": r.tokens});
                (label.to_string(), v)
            })
            .collect();
        let text = serde_json::to_string_pretty(&json)?;
        if to_stdout {
            println!("{text}");
        } else {
            std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
        }
    }
    Ok(())
}
