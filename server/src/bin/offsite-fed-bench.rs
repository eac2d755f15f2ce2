//! `offsite-fed-bench`: how many clients one federation server holds. The server runs in this process; the clients
//! run in a child process (so the server's peak memory is its own), each over its own QUIC connection on loopback
//! with a fake local trainer that answers every task at once with a fixed delta. Prints a table: aggregation (plain
//! or secure: SecAgg+ over the real protocol), clients, rounds, seconds per round, server CPU seconds per round,
//! KiB received and sent per client per round, server peak RSS, the clients' process peak RSS. With both modes the
//! runs alternate (plain, secure) per client count.
//!
//! ```sh
//! cargo run --profile test --bin offsite-fed-bench -- --clients 100,300,1000 --modes plain,secure
//! ```

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;
use offsite::train::TrainConfig;
use offsite_fed::{
    FedError, FederationConfig, LocalOutcome, LocalTask, LocalTrainer, Params, RoundReport, StrategyConfig, Tensor,
    TokenStore,
};
use offsite_net::{join, EmulatorSource, Identity, JoinSettings, ServeSettings, Server, Trust, SERVER_NAME};

#[derive(Parser)]
struct Args {
    /// Client counts to measure, one run each (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "100,300,1000")]
    clients: Vec<usize>,
    /// Rounds per run.
    #[arg(long, default_value_t = 2)]
    rounds: u64,
    /// Values in the global adapter (one f32 tensor); each task and update carries them.
    #[arg(long, default_value_t = 65536)]
    params: usize,
    /// Aggregations to measure: `plain` and/or `secure` (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "plain")]
    modes: Vec<String>,
    /// The round deadline in seconds (a round that misses clients is repeated, so a run that cannot hold its
    /// clients shows as fewer participants or a failure).
    #[arg(long, default_value_t = 60.0)]
    deadline_s: f64,
    /// Internal: run the clients (the child process).
    #[arg(long, hide = true)]
    role_clients: Option<PathBuf>,
}

/// Answers every task at once with a delta of 1e-3 everywhere, claiming one example.
struct FakeTrainer;

impl LocalTrainer for FakeTrainer {
    fn train(&mut self, task: &LocalTask<'_>) -> Result<LocalOutcome, FedError> {
        let delta = task
            .global
            .iter()
            .map(|(name, t)| {
                let values = vec![1e-3; t.values.len()];
                (
                    name.clone(),
                    Tensor {
                        shape: t.shape.clone(),
                        values,
                    },
                )
            })
            .collect();
        Ok(LocalOutcome {
            delta,
            num_examples: 1,
            train_loss: 1.0,
            steps: 1,
        })
    }
}

fn main() -> Result<()> {
    offsite::alloc::keep_freed_pages();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if let Some(job) = &args.role_clients {
        return clients(job);
    }
    if let Some(m) = args.modes.iter().find(|m| !["plain", "secure"].contains(&m.as_str())) {
        bail!("--modes: `{m}` is neither plain nor secure");
    }
    println!("| aggregation | clients | rounds | participants/round | s/round | server CPU s/round | KiB in/client/round | KiB out/client/round | server peak RSS MiB | clients' process peak RSS MiB |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for &n in &args.clients {
        for mode in &args.modes {
            let row = run(&args, n, mode == "secure").with_context(|| format!("{n} clients, {mode}"))?;
            println!("{row}");
            std::io::stdout().flush()?;
        }
    }
    Ok(())
}

/// One run with `n` clients; a row of the table. Each run is a fresh process for the server's numbers to be its
/// own: the parent re-executes itself per count.
fn run(args: &Args, n: usize, secure: bool) -> Result<String> {
    if std::env::var_os("OFFSITE_FED_BENCH_ONE").is_none() {
        let exe = std::env::current_exe()?;
        let out = Command::new(exe)
            .env("OFFSITE_FED_BENCH_ONE", "1")
            .args(["--clients", &n.to_string(), "--rounds", &args.rounds.to_string()])
            .args(["--modes", if secure { "secure" } else { "plain" }])
            .args([
                "--params",
                &args.params.to_string(),
                "--deadline-s",
                &args.deadline_s.to_string(),
            ])
            .output()?;
        if !out.status.success() {
            bail!("{}", String::from_utf8_lossy(&out.stderr));
        }
        let text = String::from_utf8_lossy(&out.stdout);
        return Ok(text.lines().last().unwrap_or_default().to_string());
    }
    let dir = std::env::temp_dir().join(format!("offsite-fed-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = serve(args, n, secure, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn serve(args: &Args, n: usize, secure: bool, dir: &Path) -> Result<String> {
    let state = dir.join("state");
    let emulator = dir.join("fake.emu");
    std::fs::write(&emulator, vec![7u8; 4096])?;
    let path = TokenStore::path(&state);
    let mut store = TokenStore::load(&path)?;
    let tokens = (0..n)
        .map(|i| store.issue(&format!("c{i}")))
        .collect::<Result<Vec<_>, _>>()?;
    store.save(&path)?;
    let settings = ServeSettings {
        listen: "127.0.0.1:0".parse()?,
        state_dir: state.clone(),
        emulator: EmulatorSource::open(emulator, 64 * 1024)?,
        adapter_json: "{}".into(),
        federation: FederationConfig {
            rounds: args.rounds,
            min_clients: n,
            wait_for_clients_s: 600.0,
            deadline_s: args.deadline_s,
            eval_every: 0,
            secure_aggregation: secure.then(offsite_fed::SecureAggregationConfig::default),
            ..FederationConfig::default()
        },
        local: TrainConfig::default(),
        strategy: StrategyConfig::FedAvg { norm_bound: None }.build()?,
        hello_timeout_s: 60.0,
        client_ca: None,
        // Every simulated client comes from 127.0.0.1.
        connections: offsite_net::ConnectionLimits {
            max: 2 * n + 16,
            per_address: n + 16,
        },
    };
    let initial = Params::from([(
        "w".to_string(),
        Tensor {
            shape: vec![args.params],
            values: vec![0.0; args.params],
        },
    )]);
    let runtime = tokio::runtime::Runtime::new()?;
    let (reports, cpu, child_rss) = runtime.block_on(async {
        let server = Server::bind(settings, Identity::self_signed_in(&state)?)?;
        let job = dir.join("clients.json");
        let spec = serde_json::json!({
            "server": server.local_addr()?.to_string(),
            "fingerprint": server.fingerprint(),
            "tokens": tokens,
            "cache": dir.join("cache"),
        });
        std::fs::write(&job, spec.to_string())?;
        let child = Command::new(std::env::current_exe()?)
            .arg("--role-clients")
            .arg(&job)
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        let mut reports = Vec::new();
        let cpu0 = cpu_seconds();
        let mut rounds_cpu = Vec::new();
        let mut last = (Instant::now(), cpu0);
        let mut on_round = |r: &RoundReport| {
            let now = cpu_seconds();
            rounds_cpu.push(now - last.1);
            last = (Instant::now(), now);
            reports.push(r.clone());
        };
        server.run(initial, None, &mut on_round).await?;
        let out = tokio::task::spawn_blocking(move || child.wait_with_output()).await??;
        let child_rss: f64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(f64::NAN);
        anyhow::Ok((reports, rounds_cpu, child_rss))
    })?;
    let rounds = reports.len().max(1) as f64;
    let wall: f64 = reports.iter().map(|r| r.wall_s).sum::<f64>() / rounds;
    let participants: f64 = reports.iter().map(|r| r.participants as f64).sum::<f64>() / rounds;
    let cpu_per_round: f64 = cpu.iter().sum::<f64>() / rounds;
    let per_client = |bytes: u64| bytes as f64 / 1024.0 / n as f64;
    let kib_in: f64 = reports.iter().map(|r| per_client(r.bytes_in)).sum::<f64>() / rounds;
    let kib_out: f64 = reports.iter().map(|r| per_client(r.bytes_out)).sum::<f64>() / rounds;
    let rss = offsite::load::peak_rss_bytes().map_or(f64::NAN, |b| b as f64 / (1 << 20) as f64);
    let mode = if secure { "secure" } else { "plain" };
    Ok(format!(
        "| {mode} | {n} | {} | {participants:.0} | {wall:.2} | {cpu_per_round:.2} | {kib_in:.1} | {kib_out:.1} | {rss:.0} | {child_rss:.0} |",
        reports.len()
    ))
}

/// The child: every client of the job joins with a fake trainer; prints its own peak RSS in MiB at the end.
fn clients(job: &Path) -> Result<()> {
    let spec: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(job)?)?;
    let server: SocketAddr = spec["server"].as_str().context("server")?.parse()?;
    let fingerprint = spec["fingerprint"].as_str().context("fingerprint")?.to_string();
    let cache = PathBuf::from(spec["cache"].as_str().context("cache")?);
    let tokens: Vec<String> = serde_json::from_value(spec["tokens"].clone())?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let handles: Vec<_> = tokens
            .into_iter()
            .enumerate()
            .map(|(i, token)| {
                let settings = JoinSettings {
                    server,
                    server_name: SERVER_NAME.into(),
                    trust: Trust::Pinned(fingerprint.clone()),
                    token,
                    name: format!("c{i}"),
                    cache_dir: cache.join(format!("c{i}")),
                    max_reconnects: 3,
                    save_updates: None,
                    client_cert: None,
                };
                tokio::spawn(join(settings, Box::new(FakeTrainer)))
            })
            .collect();
        for h in handles {
            h.await??;
        }
        anyhow::Ok(())
    })?;
    let rss = offsite::load::peak_rss_bytes().map_or(f64::NAN, |b| b as f64 / (1 << 20) as f64);
    println!("{rss:.0}");
    Ok(())
}

/// User + system CPU seconds of this process so far (Linux `/proc/self/stat`; NaN elsewhere).
fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return f64::NAN;
    };
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit(')').next().unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(f64::NAN);
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name and state.
    (ticks(11) + ticks(12)) / 100.0
}
