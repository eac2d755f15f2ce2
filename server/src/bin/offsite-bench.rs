//! `offsite-bench`: forward throughput of a model (prompt/batch and KV-cache decode) and loading memory.
//!
//! Prints a table; run it with `--device cpu` and `--device gpu` side by side to compare.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use burn::tensor::{Int, Tensor, TensorData};
use clap::Parser;
use offsite::device::{self, DeviceChoice};
use offsite::load::{peak_rss_bytes, Checkpoint};
use offsite::model::{KvCache, LlamaForCausalLM};

#[derive(Parser)]
#[command(name = "offsite-bench", about = "Forward tokens/s and loading memory of a model")]
struct Args {
    /// Hugging Face directory or `.gguf` file.
    #[arg(long)]
    model: PathBuf,
    /// auto, cpu, gpu or gpu:N.
    #[arg(long, default_value = "auto")]
    device: DeviceChoice,
    /// Prompt length of the prefill measurements.
    #[arg(long, default_value_t = 128)]
    seq: usize,
    /// Decode steps measured.
    #[arg(long, default_value_t = 64)]
    decode: usize,
    /// Timed repetitions of each prefill measurement (after one warm-up).
    #[arg(long, default_value_t = 3)]
    reps: usize,
}

fn ids(model: &LlamaForCausalLM, batch: usize, seq: usize) -> Tensor<2, Int> {
    let vocab = model.config().vocab_size as i64;
    let data: Vec<i64> = (0..batch * seq).map(|i| (i as i64 * 7919 + 13) % vocab).collect();
    Tensor::from_data(TensorData::new(data, [batch, seq]), &model.device())
}

fn sync(model: &LlamaForCausalLM) -> Result<()> {
    model.device().sync().map_err(|e| anyhow::anyhow!("{e:?}"))
}

fn prefill(model: &LlamaForCausalLM, batch: usize, seq: usize, reps: usize) -> Result<f64> {
    let run = || -> Result<()> {
        let logits = model.forward(ids(model, batch, seq), None, None)?;
        let _ = logits.slice([0..1, 0..1, 0..1]).into_data();
        Ok(())
    };
    run()?;
    let start = Instant::now();
    for _ in 0..reps {
        run()?;
    }
    sync(model)?;
    Ok((batch * seq * reps) as f64 / start.elapsed().as_secs_f64())
}

fn decode(model: &LlamaForCausalLM, prompt: usize, steps: usize) -> Result<f64> {
    let mut cache = KvCache::new(model.config().num_hidden_layers, 1);
    let hidden = model.forward_hidden(ids(model, 1, prompt), None, Some(&mut cache))?;
    let _ = hidden.into_data();
    let start = Instant::now();
    for step in 0..steps {
        let id = Tensor::<2, Int>::from_data(
            TensorData::new(vec![(step % 1000) as i64 + 100], [1, 1]),
            &model.device(),
        );
        let h = model.forward_hidden(id, None, Some(&mut cache))?;
        // Decoding needs the logits of each step on the host to pick the next token.
        let _ = model.lm_head(h).into_data();
    }
    Ok(steps as f64 / start.elapsed().as_secs_f64())
}

/// Freed pages stay with the process for reuse (see `offsite::alloc`).
#[global_allocator]
static ALLOC: offsite::alloc::MiMalloc = offsite::alloc::MiMalloc;

fn main() -> Result<()> {
    offsite::alloc::keep_freed_pages();
    let args = Args::parse();
    let (device, described) = device::resolve(args.device)?;
    let checkpoint = Checkpoint::open(&args.model)?;
    let before = peak_rss_bytes().unwrap_or(0);
    let start = Instant::now();
    let model = checkpoint.load_model(&device)?;
    let load_s = start.elapsed().as_secs_f64();
    let peak = peak_rss_bytes().unwrap_or(0);
    let f32_bytes = model.config().num_parameters() as f64 * 4.0;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("model {}  device {described}  threads {threads}", args.model.display());
    println!(
        "load {:.2} s; peak RSS {:.0} MiB (before load {:.0} MiB) = {:.2}x the f32 weights ({:.0} MiB)",
        load_s,
        peak as f64 / 1048576.0,
        before as f64 / 1048576.0,
        peak as f64 / f32_bytes,
        f32_bytes / 1048576.0
    );
    println!("{:<28} {:>12}", "measurement", "tokens/s");
    for batch in [1, 4] {
        let tps = prefill(&model, batch, args.seq, args.reps)?;
        println!("{:<28} {:>12.1}", format!("prefill batch {batch} x {}", args.seq), tps);
    }
    let tps = decode(&model, args.seq, args.decode)?;
    println!("{:<28} {:>12.1}", format!("decode (kv cache, ctx {})", args.seq), tps);
    Ok(())
}
