//! `offsite-server serve --config FILE`: runs a federation for real clients.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use offsite::device::{self, DeviceChoice};
use offsite::emulator::Emulator;
use offsite::load::Checkpoint;
use offsite_net::Server;
use tracing::info;

use super::config::FedFile;

#[derive(Args)]
pub(crate) struct ServeArgs {
    /// The federation config (TOML): [server], [model], [emulator], [adapter], [strategy], [federation], [local],
    /// [data], [eval].
    #[arg(long)]
    config: PathBuf,
    /// Overrides [model] distill_data: public text the emulator is distilled on (repeatable).
    #[arg(long)]
    distill_data: Vec<PathBuf>,
    /// Where the server evaluates the plug-in model (and distils the emulator): auto, cpu, gpu or gpu:N.
    #[arg(long, default_value = "auto")]
    device: DeviceChoice,
}

pub(crate) fn run(args: ServeArgs) -> Result<()> {
    let mut file = FedFile::load(&args.config)?;
    let checkpoint =
        Checkpoint::open(&file.model.path).with_context(|| format!("opening model {}", file.model.path.display()))?;
    if !args.distill_data.is_empty() {
        file.model.distill_data = args.distill_data.clone();
    }
    let emu_path = super::emulator_for(&file, &checkpoint, args.device)?;
    let emu = Emulator::open(&emu_path).with_context(|| format!("opening emulator {}", emu_path.display()))?;
    if emu.manifest().base_model_sha256 != checkpoint.sha256()? {
        bail!("emulator {} was built from another model", emu_path.display());
    }
    let initial = super::initial_state(&emu, &file.adapter, file.federation.seed)?;
    // A round may run with as few as min_clients updates: the noise is judged at that size.
    let values = offsite_fed::params::count(&initial);
    if let Some(noise) = file.dp_noise(values, file.federation.min_clients)? {
        noise.warn_if_dominant();
    }
    let evaluator = match &file.eval {
        Some(eval) => {
            let (device, described) = device::resolve(args.device)?;
            let examples = super::eval_examples(&file.data, &eval.data, &checkpoint.tokenizer()?, eval.max_examples)?;
            info!(device = %described, examples = examples.len(), "plug-in evaluation data ready");
            Some(super::evaluator(
                checkpoint.load_model(&device)?,
                emu.manifest().adapter_layers.clone(),
                file.adapter.clone(),
                examples,
                eval.batch_size,
            ))
        }
        None => None,
    };
    let (settings, identity) = super::serve_settings(&file, emu_path)?;
    let state_dir = settings.state_dir.clone();
    let runtime = tokio::runtime::Runtime::new()?;
    let state = runtime.block_on(async move {
        let server = Server::bind(settings, identity)?;
        println!("listening on {}", server.local_addr()?);
        println!(
            "certificate fingerprint (pin with --fingerprint) {}",
            server.fingerprint()
        );
        server
            .run(initial, evaluator, &mut |_| {})
            .await
            .map_err(anyhow::Error::from)
    })?;
    super::save_adapter(&emu, &file.adapter, &state.global, &state_dir.join("global-adapter"))?;
    super::plot::write(&state_dir)?;
    Ok(())
}
