//! `offsite-server bench --config configs/bench/<task>.toml --out DIR`: the arms of one task — zero-shot, central
//! baselines, each client alone, and the federated arms over the real protocol on loopback — each trained on the
//! same number of examples and evaluated on the same held-out examples, then `DIR/report.{md,json}` and plots.
//! Each run is a child process writing `DIR/runs/<run>.json`; a killed bench resumes at the first unfinished run.

mod arms;
pub(crate) mod config;
mod report;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use offsite::device::{self, DeviceChoice};
use offsite::emulator::EmulatorConfig;
use offsite::load::Checkpoint;
use offsite::quant::{QuantFormat, ScaleDType};
use sha2::{Digest, Sha256};
use tracing::info;

use arms::{ArmResult, Ctx, RunFile};
use config::{Arm, BenchFile};

#[derive(Args)]
pub(crate) struct BenchArgs {
    /// The bench config (TOML): a federation config with a [bench] table (see configs/bench/).
    #[arg(long)]
    config: PathBuf,
    /// Output directory: report.md, report.json, rounds.svg, arms.svg, runs/.
    #[arg(long)]
    out: PathBuf,
    /// Overrides [model] path.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Overrides [sim] data: the clients' files (repeatable).
    #[arg(long)]
    data: Vec<PathBuf>,
    /// Overrides [eval] data (repeatable).
    #[arg(long)]
    eval_data: Vec<PathBuf>,
    /// Overrides [model] distill_data (repeatable).
    #[arg(long)]
    distill_data: Vec<PathBuf>,
    /// Relative data file names of the config ([sim] data, [eval] data, [model] distill_data) and of --data,
    /// --eval-data and --distill-data are looked up here (default: the config's folder for the config's names, the
    /// working directory for the flags').
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Run only these arms (comma-separated; default: [bench] arms).
    #[arg(long, value_delimiter = ',')]
    arms: Vec<Arm>,
    /// Where training and evaluation run: auto, cpu, gpu or gpu:N.
    #[arg(long, default_value = "auto")]
    device: DeviceChoice,
    /// Where built emulators are kept, by the hash of what they are built from (default: the platform cache
    /// directory, offsite/emulators).
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Internal: run one run in this process (the parent starts one child per run).
    #[arg(long, hide = true)]
    run: Option<String>,
    /// Internal: the offsite-tuning emulator the parent built.
    #[arg(long, hide = true)]
    ot_emulator: Option<PathBuf>,
    /// Internal: the full model as an emulator, for `fed_lora`.
    #[arg(long, hide = true)]
    full_emulator: Option<PathBuf>,
}

impl BenchArgs {
    /// The config with the command line's overrides.
    fn file(&self) -> Result<BenchFile> {
        let mut file = BenchFile::load(&self.config)?;
        let fed = &mut file.fed;
        // Absolute first: the config's folder must not be joined in front of a relative --data-dir.
        let data_dir = match &self.data_dir {
            Some(d) => Some(std::path::absolute(d).with_context(|| format!("--data-dir {}", d.display()))?),
            None => None,
        };
        let under = |paths: &mut Vec<PathBuf>| {
            for p in paths.iter_mut().filter(|p| p.is_relative()) {
                *p = data_dir.as_deref().unwrap_or(Path::new(".")).join(&*p);
            }
        };
        // The config's data files: under --data-dir when given; every other relative path (and the data files
        // without --data-dir) from the config's folder.
        if self.data_dir.is_some() {
            under(&mut fed.model.distill_data);
            for data in [
                fed.sim.as_mut().map(|s| &mut s.data),
                fed.eval.as_mut().map(|e| &mut e.data),
            ] {
                data.into_iter().for_each(under);
            }
        }
        fed.resolve_paths(self.config.parent().unwrap_or(Path::new("")));
        // Files on the command line: under --data-dir when given, otherwise from the working directory.
        if let Some(m) = &self.model {
            fed.model.path = m.clone();
        }
        if !self.data.is_empty() {
            let data = &mut fed.sim.as_mut().context("--data needs a [sim] table")?.data;
            *data = self.data.clone();
            under(data);
        }
        if !self.eval_data.is_empty() {
            let data = &mut fed.eval.as_mut().context("--eval-data needs an [eval] table")?.data;
            *data = self.eval_data.clone();
            under(data);
        }
        if !self.distill_data.is_empty() {
            fed.model.distill_data = self.distill_data.clone();
            under(&mut fed.model.distill_data);
        }
        if fed.sim.is_none() || fed.eval.is_none() {
            bail!("a bench config needs [sim] (the clients' data) and [eval] (the held-out data) tables");
        }
        if fed.federation.fraction != 1.0 {
            bail!(
                "[federation] fraction = {}: a bench compares arms on the same examples, so every client takes part \
                 in every round (fraction = 1.0)",
                fed.federation.fraction
            );
        }
        if fed.model.emulator.is_some() {
            bail!("a bench builds its emulator from [emulator] and [distill]; remove [model] emulator");
        }
        Ok(file)
    }

    /// What the results depend on: the config's text and every override, as a SHA-256.
    fn key(&self) -> Result<String> {
        let mut h = Sha256::new();
        h.update(std::fs::read(&self.config).with_context(|| format!("reading {}", self.config.display()))?);
        for p in [&self.model, &self.data_dir]
            .into_iter()
            .flatten()
            .chain(&self.data)
            .chain(&self.eval_data)
            .chain(&self.distill_data)
        {
            h.update(p.to_string_lossy().as_bytes());
            h.update([0]);
        }
        Ok(hex::encode(h.finalize()))
    }
}

pub(crate) fn run(args: BenchArgs) -> Result<()> {
    let file = args.file()?;
    if let Some(run) = &args.run {
        return child(&args, file, run);
    }
    let key = args.key()?;
    let arms: Vec<Arm> = if args.arms.is_empty() {
        file.bench.arms.clone()
    } else {
        args.arms.clone()
    };
    let mut runs: Vec<&str> = Vec::new();
    for a in &arms {
        if !runs.contains(&a.run()) {
            runs.push(a.run());
        }
    }
    std::fs::create_dir_all(args.out.join("runs")).with_context(|| format!("creating {}", args.out.display()))?;
    let checkpoint = Checkpoint::open(&file.fed.model.path)
        .with_context(|| format!("opening model {}", file.fed.model.path.display()))?;
    let cache = match &args.cache {
        Some(c) => c.clone(),
        None => dirs::cache_dir()
            .context("no cache directory on this platform: pass --cache")?
            .join("offsite/emulators"),
    };
    let needs_ot = arms.iter().any(|a| {
        !matches!(
            a,
            Arm::ZeroShot | Arm::CentralFullFt | Arm::CentralLora | Arm::CentralAdapterCeiling | Arm::FedLora
        )
    });
    let started = Instant::now();
    let ot = needs_ot
        .then(|| emulator(&file.fed, &checkpoint, args.device, &cache))
        .transpose()?;
    let full = arms
        .contains(&Arm::FedLora)
        .then(|| {
            let mut fed = file.fed.clone();
            let n = checkpoint.config().num_hidden_layers;
            fed.emulator = Some(EmulatorConfig {
                bottom_layers: n / 2,
                top_layers: n - n / 2,
                drop_ratio: 0.0,
                quant: QuantFormat::F32,
                scale_dtype: ScaleDType::F32,
                quantize_embeddings: false,
            });
            fed.distill = None;
            fed.model.distill_data.clear();
            emulator(&fed, &checkpoint, args.device, &cache)
        })
        .transpose()?;
    let built = ot
        .as_ref()
        .is_some_and(|e| e.1)
        .then(|| started.elapsed().as_secs_f64());
    let exe = std::env::current_exe().context("finding this executable")?;
    for (k, run) in runs.iter().enumerate() {
        let path = arms::run_file(&args.out, run);
        if read_run(&path, &key)?.is_some() {
            info!(run, "already done (resumed)");
            continue;
        }
        info!(run, "[{}/{}] running", k + 1, runs.len());
        let mut cmd = std::process::Command::new(&exe);
        cmd.arg("bench")
            .arg("--config")
            .arg(&args.config)
            .arg("--out")
            .arg(&args.out);
        cmd.arg("--device").arg(args.device.to_string()).arg("--run").arg(run);
        for (flag, paths) in [
            ("--data", &args.data),
            ("--eval-data", &args.eval_data),
            ("--distill-data", &args.distill_data),
        ] {
            for p in paths {
                cmd.arg(flag).arg(p);
            }
        }
        for (flag, path) in [("--model", &args.model), ("--data-dir", &args.data_dir)] {
            if let Some(p) = path {
                cmd.arg(flag).arg(p);
            }
        }
        if let Some((p, _)) = &ot {
            cmd.arg("--ot-emulator").arg(p);
        }
        if let Some((p, _)) = &full {
            cmd.arg("--full-emulator").arg(p);
        }
        let status = cmd.status().with_context(|| {
            format!(
                "starting run {run} ({}: was the binary rebuilt or removed during the bench? rerun to resume)",
                exe.display()
            )
        })?;
        if !status.success() {
            bail!("run {run} failed ({status}); rerun the same command to resume from it");
        }
    }
    let mut results: BTreeMap<Arm, ArmResult> = BTreeMap::new();
    for run in &runs {
        let file =
            read_run(&arms::run_file(&args.out, run), &key)?.with_context(|| format!("run {run} left no result"))?;
        for (name, r) in file.arms {
            let arm = Arm::named(&name).with_context(|| format!("unknown arm {name}"))?;
            if arms.contains(&arm) {
                results.insert(arm, r);
            }
        }
    }
    // Every training arm records the examples it saw (the table shows each); the budget is their common value.
    let examples = results.values().map(|r| r.train_examples as usize).max().unwrap_or(0);
    let report = report::Report {
        task: &file.bench.task,
        metric: file.bench.metric,
        budget: (examples, file.fed.data.max_len),
        emulator_build_s: built,
        emulator: ot.as_ref().map(|e| e.0.as_path()),
        arms: results,
    };
    report.write(&args.out)?;
    print!("{}", std::fs::read_to_string(args.out.join("report.md"))?);
    info!(out = %args.out.display(), seconds = format!("{:.0}", started.elapsed().as_secs_f64()), "bench done");
    Ok(())
}

/// The emulator `fed` describes, built once into `cache` under the hash of its inputs; returns it and whether it
/// was built now.
fn emulator(
    fed: &crate::fed_cmd::config::FedFile,
    checkpoint: &Checkpoint,
    device: DeviceChoice,
    cache: &std::path::Path,
) -> Result<(PathBuf, bool)> {
    let settings = fed
        .emulator
        .as_ref()
        .context("a bench config needs an [emulator] table")?;
    let key = crate::fed_cmd::emulator_key(checkpoint, settings, fed.distill.as_ref(), &fed.model.distill_data)?;
    let out = cache.join(format!("{}.emu", &key[..16]));
    let fresh = !out.exists();
    crate::fed_cmd::build_emulator_once(fed, checkpoint, device, &out)?;
    Ok((out, fresh))
}

/// A run's result when it belongs to this bench (`key`); a result of another config is an error.
fn read_run(path: &std::path::Path, key: &str) -> Result<Option<RunFile>> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(None);
    };
    let file: RunFile = serde_json::from_str(&text).with_context(|| format!("reading {}", path.display()))?;
    if file.key != key {
        bail!(
            "{} is a result of another bench config or other data; choose another --out or delete it",
            path.display()
        );
    }
    Ok(Some(file))
}

/// One run in this process: its arms into `runs/<run>.json`.
fn child(args: &BenchArgs, file: BenchFile, run: &str) -> Result<()> {
    let (device, described) = device::resolve(args.device)?;
    info!(run, device = %described, "run started");
    let ctx = Ctx {
        file,
        out: args.out.clone(),
        device,
        fast_f16: device::fast_f16(args.device),
        ot_emulator: args.ot_emulator.clone(),
        full_emulator: args.full_emulator.clone(),
    };
    let results = arms::run(&ctx, run)?;
    let out = RunFile {
        key: args.key()?,
        arms: results.into_iter().map(|(a, r)| (a.name().to_string(), r)).collect(),
    };
    offsite_fed::write_atomic(
        &arms::run_file(&args.out, run),
        serde_json::to_string_pretty(&out)?.as_bytes(),
    )?;
    Ok(())
}
