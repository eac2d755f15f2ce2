//! `offsite-server emulator ...`: build an emulator from the full model, or show one.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use offsite::data::DataConfig;
use offsite::device::{self, DeviceChoice};
use offsite::emulator::{self, DistillConfig, DistillStep, DistilledLayers, Emulator, EmulatorConfig};
use offsite::load::Checkpoint;
use offsite::progress::Progress;
use tracing::{info, warn};

#[derive(Subcommand)]
pub(crate) enum EmulatorCommand {
    /// Compress the full model into an emulator: adapter layers kept, middle layers dropped, the frozen middle
    /// quantized.
    Build {
        /// The full model: Hugging Face directory or `.gguf` file.
        #[arg(long)]
        model: PathBuf,
        /// TOML file with an `[emulator]` table (see configs/emulator-smollm2.toml).
        #[arg(long)]
        config: PathBuf,
        /// The emulator file to write.
        #[arg(long)]
        out: PathBuf,
        /// The base model's name in the manifest (default: the model's file or directory name).
        #[arg(long)]
        name: Option<String>,
        /// Public text (or JSONL) to distil the kept middle layers on; the config's `[distill]` table sets the
        /// steps (repeatable).
        #[arg(long)]
        distill_data: Vec<PathBuf>,
        /// Where the distillation loss log goes (JSON lines; default `<out>.distill.jsonl`).
        #[arg(long)]
        distill_log: Option<PathBuf>,
        /// Device for distillation: auto, cpu, gpu or gpu:N.
        #[arg(long, default_value = "auto")]
        device: DeviceChoice,
    },
    /// Verify an emulator file and describe it.
    Info {
        /// The emulator file.
        #[arg(long)]
        emulator: PathBuf,
        /// Print the whole manifest as JSON (the tokenizer as a presence flag) instead of a summary.
        #[arg(long)]
        json: bool,
    },
}

pub(crate) fn run(command: EmulatorCommand) -> Result<()> {
    match command {
        EmulatorCommand::Build {
            model,
            config,
            out,
            name,
            distill_data,
            distill_log,
            device,
        } => {
            let text = std::fs::read_to_string(&config).with_context(|| format!("reading {}", config.display()))?;
            let settings = EmulatorConfig::from_toml(&text).with_context(|| format!("in {}", config.display()))?;
            let distill = DistillConfig::from_toml(&text).with_context(|| format!("in {}", config.display()))?;
            let checkpoint = Checkpoint::open(&model).with_context(|| format!("opening model {}", model.display()))?;
            let name = name.unwrap_or_else(|| {
                model
                    .file_name()
                    .map_or("model".into(), |n| n.to_string_lossy().into_owned())
            });
            match (distill, distill_data.is_empty()) {
                (None, true) => {
                    warn!(
                        "{} has no [distill] table: the emulator's middle is not distilled, and what clients learn on \
                         it transfers poorly to the full model (see configs/emulator-smollm2.toml)",
                        config.display()
                    );
                    build_with_progress(&checkpoint, &name, &settings, None, &out)
                }
                (None, false) => bail!("--distill-data given, but {} has no [distill] table", config.display()),
                (Some(_), true) => bail!(
                    "{} asks for distillation: name its data with --distill-data",
                    config.display()
                ),
                (Some(d), false) => {
                    let log = distill_log.unwrap_or_else(|| out.with_extension("distill.jsonl"));
                    let key = crate::fed_cmd::emulator_key(&checkpoint, &settings, Some(&d), &distill_data)?;
                    let layers = distill_middle(&checkpoint, &settings, &d, &distill_data, device, &log, &out, &key)?;
                    build_with_progress(&checkpoint, &name, &settings, Some(layers), &out)?;
                    remove_progress(&out)
                }
            }
        }
        EmulatorCommand::Info { emulator, json } => {
            let emu = Emulator::open(&emulator).with_context(|| format!("opening {}", emulator.display()))?;
            if !json {
                let m = emu.manifest();
                let layers = m.config["num_hidden_layers"]
                    .as_u64()
                    .map(|n| n.to_string())
                    .unwrap_or("?".into());
                println!("sha256:          {}", emu.sha256());
                println!("base model:      {} (sha256 {})", m.base_model, m.base_model_sha256);
                println!("layers kept:     {} of {layers}: {:?}", m.layers.len(), m.layers);
                println!("adapter layers:  {:?} (trainable)", m.adapter_layers);
                println!("middle dropped:  {:.0}%", m.drop_ratio * 100.0);
                println!("frozen weights:  {:?} (scales {:?})", m.quant, m.scale_dtype);
                println!("distilled:       {}", if m.distilled { "yes" } else { "no" });
                println!("format version:  {}", m.format_version);
                return Ok(());
            }
            let mut manifest = serde_json::to_value(emu.manifest())?;
            if let Some(m) = manifest.as_object_mut() {
                // The tokenizer is large and not informative here.
                for key in ["tokenizer", "tokenizer_config"] {
                    if let Some(v) = m.get_mut(key) {
                        *v = serde_json::Value::Bool(!v.is_null());
                    }
                }
                m.insert("sha256".into(), emu.sha256().into());
            }
            println!("{}", serde_json::to_string_pretty(&manifest)?);
            Ok(())
        }
    }
}

/// Where the distillation of the emulator `out` keeps its progress.
fn progress_dir(out: &Path) -> PathBuf {
    out.with_extension("distill-progress")
}

/// Removes the distillation progress of `out` once the emulator is written.
pub(crate) fn remove_progress(out: &Path) -> Result<()> {
    let dir = progress_dir(out);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    Ok(())
}

/// Distils the middle layers the emulator `out` keeps on `data`, with a progress bar and a JSON-lines loss log.
/// Progress is saved beside `out` (`.distill-progress/`, about every tenth of the steps): a killed distillation of
/// the same `key` (model, settings, data) resumes there, and its log keeps the steps up to that point.
#[allow(clippy::too_many_arguments)]
pub(crate) fn distill_middle(
    checkpoint: &Checkpoint,
    settings: &EmulatorConfig,
    distill: &DistillConfig,
    data: &[PathBuf],
    device: DeviceChoice,
    log_path: &Path,
    out: &Path,
    key: &str,
) -> Result<DistilledLayers> {
    let tokenizer = checkpoint
        .tokenizer()
        .context("distillation reads its data with the model's tokenizer")?;
    let data_config = DataConfig {
        max_len: distill.max_len,
        ..DataConfig::default()
    };
    let examples = data_config.load_all(data, &tokenizer)?;
    if examples.is_empty() {
        bail!("the distillation data holds no example");
    }
    let (device, described) = device::resolve(device)?;
    info!(device = %described, examples = examples.len(), steps = distill.steps, "distilling the middle layers");
    let dir = progress_dir(out);
    let resume = emulator::DistillCheckpoint {
        dir: &dir,
        key,
        every: (distill.steps / 10).max(10),
    };
    let done = resume.step().unwrap_or(0);
    // The log keeps the steps the resumed run does not repeat.
    let kept: String = std::fs::read_to_string(log_path)
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            let step = serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64());
            step.is_some_and(|s| s as usize <= done)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    let mut log = std::fs::File::create(log_path).with_context(|| format!("creating {}", log_path.display()))?;
    log.write_all(kept.as_bytes())?;
    let mut bar = Progress::new(
        "distill",
        "{bar:30} {pos}/{len} steps {msg} [{elapsed} < {eta}]",
        distill.steps as u64,
        done as u64,
    );
    let mut log_err = None;
    let mut first = None;
    let layers = emulator::distill(
        checkpoint,
        settings,
        distill,
        &examples,
        &device,
        Some(&resume),
        &mut |s: &DistillStep| {
            first.get_or_insert(s.mse);
            bar.message(&format!("nmse {:.4}", s.mse));
            bar.inc(1);
            let line = serde_json::to_string(s).unwrap_or_default();
            if let Err(e) = writeln!(log, "{line}") {
                log_err.get_or_insert(e);
            }
            if s.skipped {
                warn!(step = s.step, "non-finite distillation step skipped");
            }
        },
    )?;
    drop(bar);
    if let Some(e) = log_err {
        return Err(e).with_context(|| format!("writing {}", log_path.display()));
    }
    info!(first_nmse = ?first, log = %log_path.display(), "distillation finished");
    Ok(layers)
}

/// Builds an emulator of `checkpoint` into `out` (with distilled middle layers when given) with a progress bar, and
/// logs what was written.
pub(crate) fn build_with_progress(
    checkpoint: &Checkpoint,
    name: &str,
    settings: &EmulatorConfig,
    distilled: Option<DistilledLayers>,
    out: &std::path::Path,
) -> Result<()> {
    if settings.drop_ratio == 0.0 && settings.quant == offsite::quant::QuantFormat::F32 {
        warn!("this emulator drops no layer and keeps f32 weights: it is the full model, no protection for its owner");
    }
    let mut bar = Progress::new("emulator", "{bar:30} {pos}/{len} tensors [{elapsed}]", 0, 0);
    let mut progress = |done, total| bar.set(done as u64, total as u64);
    let (manifest, sha) = match distilled {
        Some(d) => emulator::build_distilled(checkpoint, name, settings, d, out, &mut progress)?,
        None => emulator::build(checkpoint, name, settings, out, &mut progress)?,
    };
    drop(bar);
    let bytes = std::fs::metadata(out).map(|m| m.len()).unwrap_or(0);
    info!(
        out = %out.display(),
        layers = ?manifest.layers,
        adapter_layers = ?manifest.adapter_layers,
        quant = ?manifest.quant,
        quantize_embeddings = manifest.quantize_embeddings,
        distilled = manifest.distilled,
        mib = format!("{:.1}", bytes as f64 / (1 << 20) as f64),
        sha256 = %sha,
        "emulator written"
    );
    Ok(())
}
