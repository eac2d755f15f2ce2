//! `offsite-server emulator ...`: build an emulator from the full model, or show one.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};
use offsite::emulator::{self, Emulator, EmulatorConfig};
use offsite::load::Checkpoint;
use tracing::info;

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
    },
    /// Verify an emulator file and print its manifest.
    Info {
        /// The emulator file.
        #[arg(long)]
        emulator: PathBuf,
    },
}

pub(crate) fn run(command: EmulatorCommand) -> Result<()> {
    match command {
        EmulatorCommand::Build {
            model,
            config,
            out,
            name,
        } => {
            let text = std::fs::read_to_string(&config)
                .with_context(|| format!("reading {}", config.display()))?;
            let settings = EmulatorConfig::from_toml(&text)
                .with_context(|| format!("in {}", config.display()))?;
            let checkpoint = Checkpoint::open(&model)
                .with_context(|| format!("opening model {}", model.display()))?;
            let name = name.unwrap_or_else(|| {
                model.file_name().map_or("model".into(), |n| n.to_string_lossy().into_owned())
            });
            build_with_progress(&checkpoint, &name, &settings, &out)
        }
        EmulatorCommand::Info { emulator } => {
            let emu = Emulator::open(&emulator)
                .with_context(|| format!("opening {}", emulator.display()))?;
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

/// Builds an emulator of `checkpoint` into `out` with a progress bar, and logs what was written.
pub(crate) fn build_with_progress(
    checkpoint: &Checkpoint,
    name: &str,
    settings: &EmulatorConfig,
    out: &std::path::Path,
) -> Result<()> {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("emulator {bar:30} {pos}/{len} tensors [{elapsed}]").expect("static template"),
    );
    let (manifest, sha) = emulator::build(checkpoint, name, settings, out, &mut |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })?;
    bar.finish_and_clear();
    let bytes = std::fs::metadata(out).map(|m| m.len()).unwrap_or(0);
    info!(
        out = %out.display(),
        layers = ?manifest.layers,
        adapter_layers = ?manifest.adapter_layers,
        quant = ?manifest.quant,
        mib = format!("{:.1}", bytes as f64 / (1 << 20) as f64),
        sha256 = %sha,
        "emulator written"
    );
    Ok(())
}
