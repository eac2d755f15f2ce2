//! `offsite-server`: the operator's side of Offsite.

mod bench_cmd;
mod config_cmd;
mod emulator_cmd;
mod eval_cmd;
mod export_cmd;
mod fed_cmd;
mod model_cmd;
mod plug;

use clap::{Parser, Subcommand};

/// Offsite operator tools: inspect and run models, build emulators, evaluate and export adapters.
#[derive(Parser)]
#[command(name = "offsite-server", version, about, after_help = offsite_cli::EXIT_CODES_HELP)]
struct Cli {
    #[command(flatten)]
    log: offsite_cli::LogArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Inspect and run a model (Hugging Face directory or GGUF file).
    Model {
        #[command(subcommand)]
        command: model_cmd::ModelCommand,
    },
    /// Build or inspect an emulator (the compressed model clients train against).
    Emulator {
        #[command(subcommand)]
        command: emulator_cmd::EmulatorCommand,
    },
    /// Perplexity of the full model, an emulator and the plug-in model (full model + adapter) on the same data.
    Eval(eval_cmd::EvalArgs),
    /// Export an adapter: as a PEFT directory, or merged into a Hugging Face checkpoint.
    Export(export_cmd::ExportArgs),
    /// Run a federation server for edge clients (QUIC, TLS 1.3, token authentication).
    Serve(fed_cmd::serve::ServeArgs),
    /// Simulate a federation on this machine: the server and N clients over the real protocol on loopback.
    Sim(fed_cmd::sim::SimArgs),
    /// Run the arms of a benchmark task (zero-shot, central baselines, local-only, federated offsite-tuning over the
    /// real protocol) on the same training budget and write a report with plots.
    Bench(bench_cmd::BenchArgs),
    /// Show a config file as the binaries read it (defaults filled in, relative paths resolved).
    Config {
        #[command(subcommand)]
        command: config_cmd::ConfigCommand,
    },
    /// Issue, revoke or list client tokens.
    Token {
        #[command(subcommand)]
        command: fed_cmd::token::TokenCommand,
    },
}

/// Freed pages stay with the process for reuse (see `offsite::alloc`).
#[global_allocator]
static ALLOC: offsite::alloc::MiMalloc = offsite::alloc::MiMalloc;

fn main() -> std::process::ExitCode {
    offsite::alloc::keep_freed_pages();
    let cli = Cli::parse();
    offsite_cli::init_logging(&cli.log);
    offsite_cli::run(|| match cli.command {
        Command::Model { command } => model_cmd::run(command),
        Command::Export(args) => export_cmd::run(args),
        Command::Emulator { command } => emulator_cmd::run(command),
        Command::Eval(args) => eval_cmd::run(args),
        Command::Serve(args) => fed_cmd::serve::run(args),
        Command::Sim(args) => fed_cmd::sim::run(args),
        Command::Bench(args) => bench_cmd::run(args),
        Command::Token { command } => fed_cmd::token::run(command),
        Command::Config { command } => config_cmd::run(command),
    })
}
