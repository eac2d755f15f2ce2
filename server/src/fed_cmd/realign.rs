//! `[realign]`: the server re-aligns a trained adapter to the full model on the operator's public data
//! ([`offsite::emulator::realign`]) before the adapter is plugged in.

use anyhow::{bail, Context, Result};
use burn::tensor::Device;
use offsite::data::DataConfig;
use offsite::emulator::{realign, Emulator, RealignTeachers};
use offsite::federated::{adapter_state, plug_state};
use offsite::load::Checkpoint;
use offsite::progress::Progress;
use offsite_fed::Params;
use tracing::info;

use super::config::FedFile;

/// The adapter `state` (trained on `emulator`) re-aligned to the full model when the config has a `[realign]`
/// table; `None` without one.
pub(crate) fn realigned(
    file: &FedFile,
    checkpoint: &Checkpoint,
    emulator: &Emulator,
    state: &Params,
    device: &Device,
) -> Result<Option<Params>> {
    let Some(settings) = &file.realign else {
        return Ok(None);
    };
    let public = &file.model.distill_data;
    if public.is_empty() {
        bail!("[realign] needs the operator's public data: [model] distill_data = [...] (or --distill-data)");
    }
    let tokenizer = checkpoint.tokenizer()?;
    let data = DataConfig {
        max_len: settings.max_len,
        ..DataConfig::default()
    };
    let examples = data
        .load_all(public, &tokenizer)
        .context("reading the re-alignment data")?;
    if examples.is_empty() {
        bail!("the re-alignment data ([model] distill_data) holds no example");
    }
    let layers = &emulator.manifest().adapter_layers;
    let spec = &file.adapter;
    let teachers = RealignTeachers {
        full: checkpoint.load_model(device)?,
        emulator: emulator.load_model(device)?,
        adapted: plug_state(emulator.load_model(device)?, layers, spec, state)?,
    };
    let student = plug_state(checkpoint.load_model(&device.clone().autodiff())?, layers, spec, state)?;
    info!(
        steps = settings.steps,
        examples = examples.len(),
        "re-aligning the adapter to the full model"
    );
    let mut bar = Progress::new(
        "realign",
        "{bar:30} {pos}/{len} steps {msg} [{elapsed} < {eta}]",
        settings.steps as u64,
        0,
    );
    let student = realign(student, teachers, settings, &examples, &mut |s| {
        bar.message(&format!("KL {:.4}", s.kl));
        bar.inc(1);
        if s.step == 1 || s.step % 10 == 0 || s.step == settings.steps {
            info!(
                step = s.step,
                kl = format!("{:.5}", s.kl),
                grad_norm = format!("{:.3}", s.grad_norm),
                "realign"
            );
        }
    })?;
    drop(bar);
    Ok(Some(adapter_state(&student)?))
}
