//! `offsite-server serve`, `sim` and `token`: the federation server, a loopback simulation of a whole federation,
//! and client token management.

pub(crate) mod config;
pub(crate) mod loopback;
pub(crate) mod plot;
pub(crate) mod serve;
pub(crate) mod sim;
pub(crate) mod token;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use offsite::adapters::{self, AdapterManifest, AdapterSpec};
use offsite::data::{DataConfig, Example};
use offsite::device::DeviceChoice;
use offsite::emulator::Emulator;
use offsite::federated::{adapter_state, load_state, plug_state};
use offsite::load::Checkpoint;
use offsite::model::LlamaForCausalLM;
use offsite::train::{evaluate, EvalReport};
use offsite_fed::Params;
use offsite_net::{EmulatorSource, Identity, ServeSettings};
use tracing::info;

use config::FedFile;

/// The emulator named in the config, or one built from `[emulator]` (distilled first when there is a `[distill]`
/// table) into the state directory, once (see [`build_emulator_once`]).
fn emulator_for(file: &FedFile, checkpoint: &Checkpoint, device: DeviceChoice) -> Result<PathBuf> {
    if let Some(p) = &file.model.emulator {
        return Ok(p.clone());
    }
    let out = file.server.state_dir.join("emulator.emu");
    build_emulator_once(file, checkpoint, device, &out)?;
    Ok(out)
}

/// Builds the emulator `[emulator]` describes into `out`, distilled first when there is a `[distill]` table (its
/// loss log beside it, `.distill.jsonl`). A built emulator is reused while the key beside it (`.key`) — a hash of
/// the model, the `[emulator]` and `[distill]` settings and the distillation data — is the same, so distillation
/// runs once.
pub(crate) fn build_emulator_once(
    file: &FedFile,
    checkpoint: &Checkpoint,
    device: DeviceChoice,
    out: &Path,
) -> Result<()> {
    let settings = file
        .emulator
        .as_ref()
        .context("the config needs [model] emulator = PATH or an [emulator] table")?;
    let key_path = out.with_extension("key");
    let key = emulator_key(checkpoint, settings, file.distill.as_ref(), &file.model.distill_data)?;
    if out.exists() && std::fs::read_to_string(&key_path).ok().as_deref() == Some(key.as_str()) {
        info!(path = %out.display(), "reusing the emulator built earlier (same model, settings and distillation data)");
        return Ok(());
    }
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    let name = file
        .model
        .path
        .file_name()
        .map_or("model".into(), |n| n.to_string_lossy().into_owned());
    let distilled = match (&file.distill, file.model.distill_data.is_empty()) {
        (None, true) => None,
        (None, false) => bail!("[model] distill_data is given, but the config has no [distill] table"),
        (Some(_), true) => bail!("[distill] needs public data: [model] distill_data = [...] (or --distill-data)"),
        (Some(d), false) => {
            let log = out.with_extension("distill.jsonl");
            let data = &file.model.distill_data;
            Some(crate::emulator_cmd::distill_middle(
                checkpoint, settings, d, data, device, &log, out, &key,
            )?)
        }
    };
    crate::emulator_cmd::build_with_progress(checkpoint, &name, settings, distilled, out)?;
    crate::emulator_cmd::remove_progress(out)?;
    offsite_fed::write_atomic(&key_path, key.as_bytes())?;
    Ok(())
}

/// What an emulator is built from, as a SHA-256: the model, the settings, and the content of the distillation data.
pub(crate) fn emulator_key(
    checkpoint: &Checkpoint,
    settings: &offsite::emulator::EmulatorConfig,
    distill: Option<&offsite::emulator::DistillConfig>,
    data: &[PathBuf],
) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(checkpoint.sha256()?.as_bytes());
    h.update(serde_json::to_string(settings)?.as_bytes());
    h.update(serde_json::to_string(&distill)?.as_bytes());
    for path in data {
        let mut f = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
        let mut file_hash = Sha256::new();
        std::io::copy(&mut f, &mut file_hash)?;
        h.update(file_hash.finalize());
    }
    Ok(hex::encode(h.finalize()))
}

/// The settings `Server::bind` needs, and the TLS identity.
pub(crate) fn serve_settings(file: &FedFile, emulator: PathBuf) -> Result<(ServeSettings, Identity)> {
    let identity = match (&file.server.cert, &file.server.key) {
        (Some(c), Some(k)) => Identity::from_pem(c, k)?,
        (None, None) => Identity::self_signed_in(&file.server.state_dir)?,
        _ => bail!("[server] needs both cert and key, or neither (self-signed)"),
    };
    let source = EmulatorSource::open(emulator, file.server.chunk_kib.saturating_mul(1024))?;
    let settings = ServeSettings {
        listen: file.server.listen,
        state_dir: file.server.state_dir.clone(),
        emulator: source,
        adapter_json: serde_json::to_string(&file.adapter)?,
        federation: file.federation.clone(),
        local: file.local.clone(),
        strategy: file.strategy()?,
        hello_timeout_s: file.server.hello_timeout_s,
        client_ca: file.server.client_ca.clone(),
        connections: offsite_net::ConnectionLimits {
            max: file.server.max_connections,
            per_address: file.server.max_connections_per_address,
        },
    };
    Ok((settings, identity))
}

/// The emulator's model with the adapter attached (on the CPU autodiff device, so trainable parameters are marked).
fn prepared_emulator(
    emu: &Emulator,
    spec: &AdapterSpec,
    seed: u64,
) -> Result<(LlamaForCausalLM, Option<adapters::LoraConfig>)> {
    let device = burn::tensor::Device::flex();
    device.seed(seed);
    let model = emu.load_model(&device.autodiff())?;
    let tokenizer = emu.tokenizer().ok();
    Ok(spec.prepare(model, &emu.manifest().adapter_layers, tokenizer.as_ref())?)
}

/// The initial global adapter: the emulator's adapter layers, or fresh LoRA branches (seeded).
pub(crate) fn initial_state(emu: &Emulator, spec: &AdapterSpec, seed: u64) -> Result<Params> {
    let (model, _) = prepared_emulator(emu, spec, seed)?;
    Ok(adapter_state(&model)?)
}

/// Writes the global adapter as an Offsite adapter directory (plug in, export or evaluate it like any other).
pub(crate) fn save_adapter(emu: &Emulator, spec: &AdapterSpec, global: &Params, dir: &Path) -> Result<()> {
    let (model, lora) = prepared_emulator(emu, &spec.structure(), 0)?;
    let model = load_state(model, global)?;
    let manifest = AdapterManifest::for_emulator(spec.method, emu);
    adapters::save(dir, &model, &manifest, lora.as_ref())?;
    info!(dir = %dir.display(), "global adapter written");
    Ok(())
}

/// Evaluation data, spread to at most `max` examples.
pub(crate) fn eval_examples(
    data: &DataConfig,
    paths: &[PathBuf],
    tok: &offsite::tokenizer::Tokenizer,
    max: Option<usize>,
) -> Result<Vec<Example>> {
    let examples = crate::eval_cmd::spread(data.load_all(paths, tok)?, max);
    if examples.is_empty() {
        bail!("the evaluation data holds no example");
    }
    Ok(examples)
}

/// Perplexity of a model, logged.
pub(crate) fn measure(label: &str, model: &LlamaForCausalLM, examples: &[Example], batch: usize) -> Result<EvalReport> {
    let start = Instant::now();
    let r = evaluate(model, examples, batch)?;
    info!(
        model = label,
        perplexity = format!("{:.3}", r.perplexity),
        seconds = format!("{:.1}", start.elapsed().as_secs_f64()),
        "evaluated"
    );
    Ok(r)
}

/// The round evaluator: perplexity of the plug-in model (full model + global adapter) on the validation data.
pub(crate) fn evaluator(
    full: LlamaForCausalLM,
    layers: Vec<usize>,
    spec: AdapterSpec,
    examples: Vec<Example>,
    batch: usize,
) -> offsite_net::Evaluator {
    Box::new(move |round, global| {
        let model = plug_state(full.clone(), &layers, &spec, global).map_err(|e| e.to_string())?;
        measure(&format!("plug-in after round {round}"), &model, &examples, batch)
            .map(|r| r.perplexity)
            .map_err(|e| e.to_string())
    })
}
