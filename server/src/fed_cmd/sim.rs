//! `offsite-server sim --config FILE`: a whole federation on one machine — the server and N edge clients over the
//! real protocol on loopback QUIC, the data split across clients — with zero-shot, emulator and plug-in
//! perplexities before and after.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use offsite::device::{self, DeviceChoice};
use offsite::emulator::Emulator;
use offsite::federated::plug_state;
use offsite::load::Checkpoint;
use offsite_fed::RoundReport;
use tracing::info;

use super::config::FedFile;
use super::loopback::Loopback;

#[derive(Args)]
pub(crate) struct SimArgs {
    /// The federation config (TOML), with a [sim] table.
    #[arg(long)]
    config: PathBuf,
    /// Overrides [model] path.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Overrides [sim] data (repeatable).
    #[arg(long)]
    data: Vec<PathBuf>,
    /// Overrides [eval] data (repeatable).
    #[arg(long)]
    eval_data: Vec<PathBuf>,
    /// Overrides [server] state_dir.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Overrides [federation] rounds.
    #[arg(long)]
    rounds: Option<u64>,
    /// Overrides [model] distill_data: public text the emulator is distilled on (repeatable).
    #[arg(long)]
    distill_data: Vec<PathBuf>,
    /// Delete a previous run's state, metrics and tokens in the state directory (refused without it).
    #[arg(long)]
    fresh: bool,
    /// Where clients train and the server evaluates: auto, cpu, gpu or gpu:N.
    #[arg(long, default_value = "auto")]
    device: DeviceChoice,
}

pub(crate) fn run(args: SimArgs) -> Result<()> {
    let mut file = FedFile::load(&args.config)?;
    if let Some(m) = args.model {
        file.model.path = m;
    }
    if let Some(d) = args.state_dir {
        file.server.state_dir = d;
    }
    if let Some(r) = args.rounds {
        file.federation.rounds = r;
    }
    if !args.eval_data.is_empty() {
        file.eval.as_mut().context("--eval-data needs an [eval] table")?.data = args.eval_data;
    }
    let mut sim = file.sim.clone().context("the config has no [sim] table")?;
    if !args.data.is_empty() {
        sim.data = args.data;
    }
    let dir = file.server.state_dir.clone();
    // A simulation starts from round 0 with fresh tokens (the emulator and certificate are reused); a previous
    // run's state, metrics and tokens are only deleted when asked.
    let previous = previous_run(&dir)?;
    if !previous.is_empty() {
        if !args.fresh {
            bail!(
                "{} holds a previous run ({}); pass --fresh to delete its state, metrics and tokens and start over \
                 (the emulator and certificate are kept), or choose another --state-dir",
                dir.display(),
                previous
                    .iter()
                    .map(|p| p.file_name().unwrap_or_default().to_string_lossy())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        for f in &previous {
            std::fs::remove_file(f).with_context(|| format!("removing {}", f.display()))?;
        }
        info!(dir = %dir.display(), files = previous.len(), "previous run deleted (--fresh)");
    }
    std::fs::create_dir_all(&dir)?;

    let checkpoint =
        Checkpoint::open(&file.model.path).with_context(|| format!("opening model {}", file.model.path.display()))?;
    if !args.distill_data.is_empty() {
        file.model.distill_data = args.distill_data.clone();
    }
    let emu_path = super::emulator_for(&file, &checkpoint, args.device)?;
    let emu = Emulator::open(&emu_path)?;
    let tokenizer = emu.tokenizer()?;
    let clients = super::loopback::client_examples(&file, &sim, &tokenizer)?;
    let (device, described) = device::resolve(args.device)?;
    let fast_f16 = device::fast_f16(args.device);
    let eval = file
        .eval
        .clone()
        .context("a simulation reports perplexities: add an [eval] table")?;
    let examples = super::eval_examples(&file.data, &eval.data, &checkpoint.tokenizer()?, eval.max_examples)?;
    info!(device = %described, examples = examples.len(), "evaluating before federation");
    let full = checkpoint.load_model(&device)?;
    let zero_shot = super::measure("zero-shot full model", &full, &examples, eval.batch_size)?;
    let emu_before = super::measure("emulator", &emu.load_model(&device)?, &examples, eval.batch_size)?;
    let layers = emu.manifest().adapter_layers.clone();
    let evaluator = super::evaluator(
        full.clone(),
        layers.clone(),
        file.adapter.clone(),
        examples.clone(),
        eval.batch_size,
    );
    let initial = super::initial_state(&emu, &file.adapter, file.federation.seed)?;
    let private = file.privacy.is_some();
    let secure = file.federation.secure_aggregation.is_some();
    println!(
        "{:>5} {:>12} {:>8} {:>11} {:>11} {:>10} {:>10} {:>8}{}{}",
        "round",
        "participants",
        "rejected",
        "bytes in",
        "bytes out",
        "train loss",
        "plug-in",
        "seconds",
        if secure { "  masks recovered" } else { "" },
        if private { "  epsilon (delta)" } else { "" }
    );
    let mut print = |r: &RoundReport| {
        let recovered = r.masks_recovered.map_or(String::new(), |m| format!("  {m:>15}"));
        let spent = match (r.epsilon, r.delta) {
            (Some(e), Some(d)) => format!("  {e:.3} ({d:e})"),
            _ => String::new(),
        };
        println!(
            "{:>5} {:>12} {:>8} {:>11} {:>11} {:>10.4} {:>10} {:>8.1}{recovered}{spent}",
            r.round,
            r.participants,
            r.rejected,
            r.bytes_in,
            r.bytes_out,
            r.train_loss,
            r.eval_perplexity.map_or("-".into(), |p| format!("{p:.3}")),
            r.wall_s
        );
    };
    let loopback = Loopback {
        file: &file,
        emulator: emu_path,
        clients,
        device: device.clone(),
        fast_f16,
    };
    let values = offsite_fed::params::count(&initial);
    let noise = file.dp_noise(values, loopback.per_round())?;
    let state = loopback.run(initial, Some(evaluator), &mut print)?;

    let emu_model = plug_state(emu.load_model(&device)?, &layers, &file.adapter, &state.global)?;
    let emu_after = super::measure("emulator + global adapter", &emu_model, &examples, eval.batch_size)?;
    let plugged = plug_state(full, &layers, &file.adapter, &state.global)?;
    let plug = super::measure(
        "plug-in (full model + global adapter)",
        &plugged,
        &examples,
        eval.batch_size,
    )?;
    super::save_adapter(&emu, &file.adapter, &state.global, &dir.join("global-adapter"))?;
    super::plot::write(&dir)?;
    println!();
    let (zero, plugged) = (zero_shot.perplexity, plug.perplexity);
    println!("held-out perplexity");
    for (label, r) in [
        ("zero-shot full model", zero_shot),
        ("emulator before federation", emu_before),
        ("emulator + global adapter", emu_after),
        ("plug-in (full model + global adapter)", plug),
    ] {
        println!("{label:<40} {:>12.3}", r.perplexity);
    }
    println!(
        "plug-in vs zero-shot: {:+.3} perplexity ({:+.1}%)",
        plugged - zero,
        100.0 * (plugged - zero) / zero
    );
    if let Some(n) = noise {
        println!(
            "DP noise on each round's mean update: about {:.1}× the clip ({} values, {} updates a round; noise no \
             larger than the clip needs {} a round)",
            n.ratio, n.values, n.clients, n.needed
        );
    }
    println!(
        "(on {} held-out examples, {} tokens; state in {})",
        examples.len(),
        zero_shot.tokens,
        dir.display()
    );
    Ok(())
}

/// The files of a previous run in `dir`: every generation of the server state, the metrics, the tokens.
fn previous_run(dir: &std::path::Path) -> Result<Vec<PathBuf>> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for e in entries {
        let path = e?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let state = name.starts_with("server_state") && name.ends_with(".safetensors");
        if state || name == "metrics.jsonl" || name == "tokens.json" {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}
