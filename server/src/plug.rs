//! Plugging an adapter directory into the full model, after checking it was trained for this model.

use std::path::Path;

use anyhow::{bail, Context, Result};
use offsite::adapters;
use offsite::load::Checkpoint;
use offsite::model::LlamaForCausalLM;
use tracing::info;

/// Applies a PEFT directory (LoRA or prompt learning) or an Offsite adapter to `model` (loaded from `checkpoint`) by parameter name. An
/// Offsite adapter names the model it was trained for by hash; another model is refused.
pub(crate) fn plug_in(checkpoint: &Checkpoint, model: LlamaForCausalLM, dir: &Path) -> Result<LlamaForCausalLM> {
    let manifest = adapters::read_manifest(dir)?;
    if let Some(m) = &manifest {
        let sha = checkpoint.sha256()?;
        if m.base_model_sha256 != sha {
            bail!(
                "adapter {} was trained for the model with SHA-256 {}, this model's is {sha}",
                dir.display(),
                m.base_model_sha256
            );
        }
    }
    let model = adapters::apply(model, dir).with_context(|| format!("applying adapter {}", dir.display()))?;
    info!(
        adapter = %dir.display(),
        kind = manifest.map_or("PEFT".to_string(), |m| format!("offsite {:?} on layers {:?}", m.method, m.layers)),
        "adapter plugged in"
    );
    Ok(model)
}
