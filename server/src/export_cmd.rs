//! `offsite-server export`: an adapter as a PEFT directory, or merged into a Hugging Face checkpoint.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use offsite::adapters::{self, export_peft, export_peft_prompt, import_peft, Method};
use offsite::device::{self, DeviceChoice};
use offsite::export::write_merged;
use offsite::load::Checkpoint;
use tracing::{info, warn};

/// What `export` writes.
#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum ExportFormat {
    /// A PEFT adapter directory (`adapter_config.json` + `adapter_model.safetensors`).
    Peft,
    /// A full Hugging Face checkpoint with the adapter merged into the weights.
    Merged,
}

#[derive(Args)]
pub(crate) struct ExportArgs {
    /// The base model: Hugging Face directory or `.gguf` file.
    #[arg(long)]
    model: PathBuf,
    /// The adapter: a PEFT directory, or an Offsite adapter directory (`layers` adapters export as `merged` only,
    /// prompt-learning adapters as `peft` only).
    #[arg(long)]
    adapter: PathBuf,
    /// peft or merged.
    #[arg(long, value_enum)]
    format: ExportFormat,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    /// `base_model_name_or_path` written into a PEFT adapter (a hub id, say); by default the model's own name (its
    /// directory or file name, without `.gguf`), never the server's local path.
    #[arg(long)]
    base_model_name: Option<String>,
    /// auto, cpu, gpu or gpu:N: where the adapter is applied and merged.
    #[arg(long, default_value = "auto")]
    device: DeviceChoice,
}

pub(crate) fn run(args: ExportArgs) -> Result<()> {
    let checkpoint =
        Checkpoint::open(&args.model).with_context(|| format!("opening model {}", args.model.display()))?;
    let (device, described) = device::resolve(args.device)?;
    info!(device = %described, "loading the base model");
    let model = checkpoint.load_model(&device)?;
    let manifest = adapters::read_manifest(&args.adapter)?;
    let layers = manifest.as_ref().is_some_and(|m| m.method == Method::Layers);
    let prompt = manifest.as_ref().is_some_and(|m| m.method.prompt_kind().is_some());
    let base = args.base_model_name.clone().unwrap_or_else(|| model_name(&args.model));
    match args.format {
        ExportFormat::Peft if layers => bail!(
            "{} trains whole adapter layers, which PEFT cannot express; export it with --format merged",
            args.adapter.display()
        ),
        ExportFormat::Peft if prompt => {
            let model = crate::plug::plug_in(&checkpoint, model, &args.adapter)?;
            export_peft_prompt(&model, Some(&base), &args.out)?;
        }
        ExportFormat::Peft => {
            let mut model = model;
            let config = import_peft(&mut model, &args.adapter)
                .with_context(|| format!("reading adapter {}", args.adapter.display()))?;
            export_peft(&model, &config, Some(&base), &args.out)?;
        }
        ExportFormat::Merged => {
            let model = crate::plug::plug_in(&checkpoint, model, &args.adapter)?;
            if model.prompt_encoder.is_some() {
                bail!(
                    "{} adds virtual tokens or attention prefixes, which no merged weight can hold; export it with \
                     --format peft",
                    args.adapter.display()
                );
            }
            let tokenizer = match checkpoint.tokenizer() {
                Ok(t) => Some(t),
                Err(e) => {
                    warn!("writing the checkpoint without a tokenizer: {e}");
                    None
                }
            };
            write_merged(&model, tokenizer.as_ref(), &args.out)?
        }
    }
    info!(out = %args.out.display(), "exported");
    Ok(())
}

/// A model's own name: its directory's or file's name, without a `.gguf` extension.
fn model_name(path: &std::path::Path) -> String {
    let name = path
        .file_name()
        .map_or_else(|| path.to_string_lossy(), |n| n.to_string_lossy())
        .into_owned();
    name.strip_suffix(".gguf").map(str::to_string).unwrap_or(name)
}
