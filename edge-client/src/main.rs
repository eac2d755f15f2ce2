//! `offsite-edge`: the laptop side of Offsite.

mod bench_cmd;
mod join_cmd;
mod train_cmd;

use anyhow::Result;
use clap::{Parser, Subcommand};
use offsite::device::{self, gpu_adapters, DeviceChoice};

/// Offsite edge client: trains adapters on local data on this machine's GPU or CPU.
#[derive(Parser)]
#[command(name = "offsite-edge", version, about, after_help = offsite_cli::EXIT_CODES_HELP)]
struct Cli {
    #[command(flatten)]
    log: offsite_cli::LogArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List the GPU adapters wgpu finds and the device `--device auto` would choose.
    Devices {
        /// Print one JSON object ({"adapters": [...], "auto": ...}) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Train the adapter of an emulator on local data (no network); writes a resumable adapter directory.
    Train(train_cmd::TrainArgs),
    /// Join a federation: download the emulator, train each round on local data, upload only adapter updates.
    Join(join_cmd::JoinArgs),
    /// Benchmarks on this machine's device.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Products through frozen int8 weights: our kernels against burn's paths, per shape (time, GB/s, GFLOP/s).
    Kernels(bench_cmd::BenchArgs),
}

/// Freed pages stay with the process for reuse (see `offsite::alloc`).
#[global_allocator]
static ALLOC: offsite::alloc::MiMalloc = offsite::alloc::MiMalloc;

fn main() -> std::process::ExitCode {
    offsite::alloc::keep_freed_pages();
    let cli = Cli::parse();
    offsite_cli::init_logging(&cli.log);
    offsite_cli::run(|| run(cli.command))
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::Train(args) => train_cmd::run(args),
        Command::Join(args) => join_cmd::run(args),
        Command::Bench(BenchCommand::Kernels(args)) => bench_cmd::run(args),
        Command::Devices { json } => {
            let adapters = gpu_adapters();
            if json {
                let (_, chosen) = device::resolve(DeviceChoice::Auto)?;
                let list: Vec<_> = adapters
                    .iter()
                    .enumerate()
                    .map(|(i, a)| {
                        serde_json::json!({
                            "device": format!("gpu:{i}"), "name": a.name, "backend": a.backend.to_string(),
                            "type": format!("{:?}", a.device_type), "shader_f16": a.shader_f16,
                            "max_storage_buffer_binding_size": a.max_storage_buffer_binding_size,
                        })
                    })
                    .collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({"adapters": list, "auto": chosen.to_string()}))?
                );
                return Ok(());
            }
            if adapters.is_empty() {
                println!("no wgpu adapters found");
            }
            for (i, a) in adapters.iter().enumerate() {
                println!(
                    "gpu:{i}  {}  backend {}  type {:?}  shader-f16 {}  max storage binding {} MiB",
                    a.name,
                    a.backend,
                    a.device_type,
                    if a.shader_f16 { "yes" } else { "no" },
                    a.max_storage_buffer_binding_size >> 20
                );
            }
            let (_, chosen) = device::resolve(DeviceChoice::Auto)?;
            println!("auto chooses: {chosen}");
            Ok(())
        }
    }
}
