//! `offsite-train-bench`: training tokens/s and peak memory for LoRA on the full model, offsite-tuning on an emulator
//! (int8 and f32 frozen middle), and offsite-tuning + LoRA, side by side in one run.
//!
//! Each configuration runs in its own child process so that its peak RSS is its own.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;
use offsite::adapters::{AdapterSpec, LoraConfig, Method, TargetModules};
use offsite::data::{Batch, Example};
use offsite::device::{self, DeviceChoice};
use offsite::emulator::{self, Emulator, EmulatorConfig};
use offsite::load::{peak_rss_bytes, Checkpoint};
use offsite::quant::{QuantFormat, ScaleDType};
use offsite::train::{TrainConfig, Trainer};

const MODES: [(&str, &str); 6] = [
    ("full-lora", "LoRA r=8 q/v, full model"),
    ("full-ft", "full fine-tuning, full model"),
    ("emu-int8", "offsite 2+2, int8 emulator"),
    ("emu-int8-emb", "offsite 2+2, int8 emulator + int8 embeddings"),
    ("emu-f32", "offsite 2+2, f32 emulator"),
    ("emu-int8-lora", "offsite 2+2 + LoRA r=8 all-linear, int8"),
];

#[derive(Parser)]
#[command(
    name = "offsite-train-bench",
    about = "Training tokens/s and peak memory per configuration"
)]
struct Args {
    /// Hugging Face directory or `.gguf` file.
    #[arg(long)]
    model: PathBuf,
    /// auto, cpu, gpu or gpu:N.
    #[arg(long, default_value = "auto")]
    device: DeviceChoice,
    /// Sequence length.
    #[arg(long, default_value_t = 256)]
    seq: usize,
    /// Sequences per step.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Timed optimizer steps (after one warm-up step).
    #[arg(long, default_value_t = 2)]
    steps: usize,
    /// Only these configurations (comma-separated); all by default.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Internal: run one configuration in this process and print its result.
    #[arg(long, hide = true)]
    child: Option<String>,
    /// Internal: where the emulators are.
    #[arg(long, hide = true)]
    workdir: Option<PathBuf>,
}

fn lora(targets: TargetModules) -> LoraConfig {
    LoraConfig {
        r: 8,
        lora_alpha: 16.0,
        target_modules: targets,
        lora_dropout: 0.0,
        use_rslora: false,
        layers_to_transform: None,
    }
}

fn emulator_config(quant: QuantFormat, quantize_embeddings: bool) -> EmulatorConfig {
    EmulatorConfig {
        bottom_layers: 2,
        top_layers: 2,
        drop_ratio: 0.5,
        quant,
        scale_dtype: ScaleDType::F32,
        quantize_embeddings,
    }
}

/// The emulators measured: (file, storage of the frozen middle, quantized embeddings).
const EMULATORS: [(&str, QuantFormat, bool); 3] = [
    ("int8.emu", QuantFormat::Int8, false),
    ("int8-emb.emu", QuantFormat::Int8, true),
    ("f32.emu", QuantFormat::F32, false),
];

/// Runs one configuration: returns (tokens/s, seconds per step).
fn child(args: &Args, mode: &str, workdir: &Path) -> Result<(f64, f64)> {
    let (device, _) = device::resolve(args.device)?;
    let ad = device.clone().autodiff();
    let (model, layers) = if mode.starts_with("full") {
        let model = Checkpoint::open(&args.model)?.load_model(&ad)?;
        let n = model.config().num_hidden_layers;
        (model, (0..n).collect::<Vec<_>>())
    } else {
        let file = match mode {
            "emu-f32" => "f32.emu",
            "emu-int8-emb" => "int8-emb.emu",
            _ => "int8.emu",
        };
        let emu = Emulator::open(&workdir.join(file))?;
        (emu.load_model(&ad)?, emu.manifest().adapter_layers.clone())
    };
    let spec = match mode {
        "full-lora" => AdapterSpec {
            method: Method::Lora,
            lora: Some(lora(TargetModules::Names(vec!["q_proj".into(), "v_proj".into()]))),
            prompt: None,
        },
        "emu-int8-lora" => AdapterSpec {
            method: Method::Lora,
            lora: Some(lora(TargetModules::Preset("all-linear".into()))),
            prompt: None,
        },
        _ => AdapterSpec {
            method: Method::Layers,
            lora: None,
            prompt: None,
        },
    };
    let (model, _) = spec.prepare(model, &layers, None)?;
    let vocab = model.config().vocab_size as u32;
    let examples: Vec<Example> = (0..args.batch)
        .map(|b| {
            let ids: Vec<u32> = (0..args.seq)
                .map(|t| ((b * 7919 + t * 104729) as u32) % vocab)
                .collect();
            let labels = ids.iter().map(|&i| i as i64).collect();
            Example {
                ids,
                labels,
                category: None,
            }
        })
        .collect();
    let batch = Batch::new(&examples.iter().collect::<Vec<_>>());
    let mut trainer = Trainer::new(TrainConfig {
        steps: args.steps + 1,
        ..Default::default()
    })?;
    let (mut model, _) = trainer.train_step(model, std::slice::from_ref(&batch))?;
    let start = Instant::now();
    for _ in 0..args.steps {
        model = trainer.train_step(model, std::slice::from_ref(&batch))?.0;
    }
    model.device().sync().map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let secs = start.elapsed().as_secs_f64() / args.steps as f64;
    Ok(((args.batch * args.seq) as f64 / secs, secs))
}

/// Freed pages stay with the process for reuse (see `offsite::alloc`).
#[global_allocator]
static ALLOC: offsite::alloc::MiMalloc = offsite::alloc::MiMalloc;

fn main() -> Result<()> {
    offsite::alloc::keep_freed_pages();
    let args = Args::parse();
    if let Some(mode) = &args.child {
        let workdir = args.workdir.clone().context("--workdir")?;
        let (tps, secs) = child(&args, mode, &workdir)?;
        println!("{tps} {secs} {}", peak_rss_bytes().unwrap_or(0));
        return Ok(());
    }
    let work = std::env::temp_dir().join(format!("offsite-train-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let checkpoint = Checkpoint::open(&args.model)?;
    for (file, quant, embeddings) in EMULATORS {
        let config = emulator_config(quant, embeddings);
        emulator::build(&checkpoint, "bench", &config, &work.join(file), &mut |_, _| {})?;
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "model {}  device {}  threads {threads}  seq {}  batch {}  timed steps {}",
        args.model.display(),
        args.device,
        args.seq,
        args.batch,
        args.steps
    );
    println!(
        "{:<44} {:>10} {:>10} {:>14}",
        "configuration", "tokens/s", "s/step", "peak RSS MiB"
    );
    let exe = std::env::current_exe()?;
    for (mode, label) in MODES {
        if !args.only.is_empty() && !args.only.iter().any(|m| m == mode) {
            continue;
        }
        let out = Command::new(&exe)
            .arg("--model")
            .arg(&args.model)
            .args(["--device", &args.device.to_string(), "--seq", &args.seq.to_string()])
            .args(["--batch", &args.batch.to_string(), "--steps", &args.steps.to_string()])
            .args(["--child", mode, "--workdir"])
            .arg(&work)
            .output()?;
        if !out.status.success() {
            bail!("{mode} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let v: Vec<f64> = text.split_whitespace().filter_map(|x| x.parse().ok()).collect();
        let [tps, secs, rss] = v[..] else {
            bail!("{mode}: unexpected output {text:?}");
        };
        println!("{label:<44} {tps:>10.1} {secs:>10.2} {:>14.0}", rss / 1048576.0);
    }
    std::fs::remove_dir_all(&work)?;
    Ok(())
}
