//! `offsite-edge bench kernels`: products through a frozen int8 or f16 weight, ours (the tuned product training runs,
//! and each of its routes) against the alternatives burn offers, side by side on one device: time, GB/s, GFLOP/s and
//! the speedup over burn's path for the same storage, per shape.

use std::time::Instant;

use anyhow::Result;
use burn::tensor::quantization::{QuantScheme, QuantStore, QuantValue};
use burn::tensor::{DType, Device, Distribution, FloatDType, Tensor, TensorCreationOptions, TensorData};
use clap::Args;
use offsite::device::{self, DeviceChoice};
use offsite::quant::{
    f16_matmul, f16_matmul_by, int8_dequantize, int8_matmul, int8_matmul_by, max_buffer_bytes, quantize_int8,
    QuantFormat, Route, ScaleDType,
};
use tracing::info;

#[derive(Args)]
pub(crate) struct BenchArgs {
    /// auto, cpu, gpu or gpu:N.
    #[arg(long, default_value = "auto")]
    device: DeviceChoice,
    /// Timed repetitions per measurement (after two warm-up runs).
    #[arg(long, default_value_t = 10)]
    iters: usize,
    /// Rows of x for the batched (GEMM) measurements: a training micro-batch of tokens.
    #[arg(long, default_value_t = 512)]
    rows: usize,
    /// Also run the 7B-class 4096×11008 shapes (slow on a CPU).
    #[arg(long)]
    large: bool,
    /// Also measure burn's built-in Q8S PackedU32 matmul (batched rows only). On wgpu, burn 0.22 panics inside its
    /// device thread for a single row ("quantized view float vector size 2 must be a positive multiple of
    /// num_quants 4"), which would end the run, so that row is skipped; other shapes may fail the same way, hence
    /// opt-in.
    #[arg(long)]
    burn_q8s: bool,
}

/// `(name, out, in)` of the weights measured.
fn shapes(large: bool) -> Vec<(&'static str, usize, usize)> {
    let mut s = vec![
        ("smollm2 q/o_proj", 576, 576),
        ("smollm2 k/v_proj", 192, 576),
        ("smollm2 gate/up_proj", 1536, 576),
        ("smollm2 down_proj", 576, 1536),
    ];
    if large {
        s.push(("7B up_proj", 11008, 4096));
        s.push(("7B down_proj", 4096, 11008));
    }
    s
}

/// Mean seconds of `f` over `iters` runs after two warm-ups, the device drained before and after.
fn time(device: &Device, iters: usize, f: &dyn Fn() -> Tensor<2>) -> Result<f64> {
    for _ in 0..2 {
        drop(f());
    }
    device.sync().map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let start = Instant::now();
    let mut keep = Vec::with_capacity(iters);
    for _ in 0..iters {
        keep.push(f());
    }
    device.sync().map_err(|e| anyhow::anyhow!("{e:?}"))?;
    Ok(start.elapsed().as_secs_f64() / iters as f64)
}

pub(crate) fn run(args: BenchArgs) -> Result<()> {
    let (device, described) = device::resolve(args.device)?;
    info!(device = %described, iters = args.iters, "benchmarking products through frozen int8 and f16 weights");
    println!("device: {described}");
    println!(
        "{:<22} {:>6} {:<40} {:>10} {:>9} {:>9} {:>10}",
        "weight [out×in]", "rows", "path", "time (µs)", "GB/s", "GFLOP/s", "vs burn"
    );
    for (name, out, inp) in shapes(args.large) {
        let w: Vec<f32> = Tensor::<2>::random([out, inp], Distribution::Normal(0.0, 0.05), &Device::flex())
            .into_data()
            .try_into_vec()
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let q8 = quantize_int8(&w, out, inp, ScaleDType::F32);
        let (q, scale) = q8.to_tensors(&device);
        // The weight as the products want it, [in, out]: f16 always, f32 only where one buffer holds it.
        let wt = transposed(&w, out, inp);
        let f32_matrix = (4 * out * inp) as u64;
        let limit = max_buffer_bytes(&device);
        let fits = limit.is_none_or(|limit| f32_matrix <= limit);
        let options = |dtype| TensorCreationOptions::new(device.clone()).with_dtype(dtype);
        let half = Tensor::<2>::from_data(TensorData::new(wt.clone(), [inp, out]), options(DType::F16));
        let dense = fits.then(|| Tensor::<2>::from_data(TensorData::new(wt, [inp, out]), &device));
        let scheme = QuantScheme::default()
            .with_value(QuantValue::Q8S)
            .with_store(QuantStore::PackedU32(0));
        let burn_q8 = dense
            .as_ref()
            .filter(|_| args.burn_q8s)
            .map(|d| d.clone().quantize_dynamic(&scheme));
        let unfit = format!(
            "n/a: needs a {:.0} MB f32 matrix, over the device's {:.0} MB buffer limit",
            f32_matrix as f64 / 1e6,
            limit.unwrap_or(0) as f64 / 1e6
        );
        for rows in [1, args.rows] {
            let x = Tensor::<2>::random([rows, inp], Distribution::Normal(0.0, 1.0), &device);
            let io = 4.0 * (rows * (inp + out)) as f64;
            let flops = 2.0 * (rows * inp * out) as f64;
            let int8_bytes = (out * inp + 4 * out) as f64 + io;
            let f32_bytes = 4.0 * (out * inp) as f64 + io;
            let f16_bytes = 2.0 * (out * inp) as f64 + io;
            // (path, bytes moved, the burn path it replaces (index into `paths`), whether it needs the whole f32
            // matrix, the product)
            type Path<'a> = (&'static str, f64, Option<usize>, bool, Box<dyn Fn() -> Tensor<2> + 'a>);
            let (xr, qr, sr, hr) = (&x, &q, &scale, &half);
            let int8 = |route| -> Box<dyn Fn() -> Tensor<2> + '_> {
                Box::new(move || int8_matmul_by(route, xr.clone(), qr.clone(), sr.clone()))
            };
            let f16 = |route| -> Box<dyn Fn() -> Tensor<2> + '_> {
                Box::new(move || f16_matmul_by(route, xr.clone(), hr.clone()))
            };
            // Never called where the dense matrix does not exist (such paths are skipped).
            let f32_matmul: Box<dyn Fn() -> Tensor<2>> = match &dense {
                Some(d) => Box::new(move || xr.clone().matmul(d.clone())),
                None => Box::new(|| unreachable!("paths needing the dense matrix are skipped")),
            };
            let mut paths: Vec<Path> = vec![
                (
                    "burn: dequantize, then f32 matmul",
                    int8_bytes,
                    None,
                    true,
                    Box::new(|| x.clone().matmul(int8_dequantize(q.clone(), scale.clone(), inp))),
                ),
                (
                    "ours: int8, tuned (what training runs)",
                    int8_bytes,
                    Some(0),
                    false,
                    int8(None),
                ),
                (
                    "ours: int8, kernel route",
                    int8_bytes,
                    Some(0),
                    false,
                    int8(Some(Route::Kernel)),
                ),
                (
                    "ours: int8, dense route",
                    int8_bytes,
                    Some(0),
                    false,
                    int8(Some(Route::Dense)),
                ),
                (
                    "burn: cast f16 to f32, then matmul",
                    f16_bytes,
                    None,
                    true,
                    Box::new(|| x.clone().matmul(half.clone().cast(FloatDType::F32))),
                ),
                (
                    "ours: f16, tuned (what training runs)",
                    f16_bytes,
                    Some(4),
                    false,
                    f16(None),
                ),
                (
                    "ours: f16, kernel route",
                    f16_bytes,
                    Some(4),
                    false,
                    f16(Some(Route::Kernel)),
                ),
                (
                    "ours: f16, dense route",
                    f16_bytes,
                    Some(4),
                    false,
                    f16(Some(Route::Dense)),
                ),
                ("burn: f32 matmul", f32_bytes, None, true, f32_matmul),
            ];
            match &burn_q8 {
                Some(w8) if rows > 1 => {
                    let q8s: Box<dyn Fn() -> Tensor<2>> = Box::new(|| x.clone().matmul(w8.clone()));
                    paths.push(("burn: Q8S PackedU32 matmul", int8_bytes, None, true, q8s));
                }
                Some(_) => println!(
                    "{:<22} {:>6} {:<40} skipped: burn 0.22 panics on a single row",
                    format!("{name} {out}×{inp}"),
                    rows,
                    "burn: Q8S PackedU32 matmul"
                ),
                None => {}
            }
            let mut times: Vec<Option<f64>> = Vec::with_capacity(paths.len());
            for (path, bytes, against, needs_dense, f) in &paths {
                if *needs_dense && !fits {
                    println!("{:<22} {:>6} {:<40} {unfit}", format!("{name} {out}×{inp}"), rows, path);
                    times.push(None);
                    continue;
                }
                let seconds = time(&device, args.iters, f.as_ref());
                let line = match &seconds {
                    Ok(s) => {
                        let speedup = against
                            .and_then(|i| times[i])
                            .map_or(String::new(), |burn: f64| format!(" {:>9.2}×", burn / s));
                        format!(
                            "{:>10.1} {:>9.2} {:>9.2}{speedup}",
                            s * 1e6,
                            bytes / s / 1e9,
                            flops / s / 1e9
                        )
                    }
                    Err(e) => format!("failed: {e}"),
                };
                times.push(seconds.ok());
                println!("{:<22} {:>6} {:<40} {line}", format!("{name} {out}×{inp}"), rows, path);
            }
        }
    }
    step_memory(&device, args.rows, args.large)
}

/// `w` (`[out, inp]`, row-major) as `[inp, out]`.
fn transposed(w: &[f32], out: usize, inp: usize) -> Vec<f32> {
    let mut t = vec![0.0f32; w.len()];
    for (o, row) in w.chunks_exact(inp).enumerate() {
        for (i, &v) in row.iter().enumerate() {
            t[i * out + o] = v;
        }
    }
    t
}

/// Device memory the allocator holds after one training step (forward and input gradient) through an MLP block of
/// frozen weights (`down(gate(x) ⊙ up(x))`), int8 and f16 through the tuned product against the same block with
/// dense f32 weights resident (where the device can hold them). The CPU backend reports no pools.
fn step_memory(device: &Device, rows: usize, large: bool) -> Result<()> {
    let (hidden, inter) = if large { (4096, 11008) } else { (576, 1536) };
    println!("\ntraining step through a frozen MLP block ({hidden}→{inter}→{hidden}, {rows} rows): device memory held");
    for storage in [QuantFormat::Int8, QuantFormat::F16, QuantFormat::F32] {
        let label = match storage {
            QuantFormat::Int8 => "int8 weights, tuned product",
            QuantFormat::F16 => "f16 weights, tuned product",
            QuantFormat::F32 => "f32 weights resident",
        };
        if storage == QuantFormat::F32
            && max_buffer_bytes(device).is_some_and(|limit| (4 * hidden * inter) as u64 > limit)
        {
            println!("  {label:<28} n/a: an f32 {inter}×{hidden} matrix is over the device's buffer limit");
            continue;
        }
        device.memory_cleanup();
        let ad = device.clone().autodiff();
        let weight = |out: usize, inp: usize| -> Result<Box<dyn Fn(Tensor<2>) -> Tensor<2>>> {
            let w: Vec<f32> = Tensor::<2>::random([out, inp], Distribution::Normal(0.0, 0.05), &Device::flex())
                .into_data()
                .try_into_vec()
                .map_err(|e| anyhow::anyhow!("{e:?}"))?;
            Ok(match storage {
                QuantFormat::Int8 => {
                    let (q, scale) = quantize_int8(&w, out, inp, ScaleDType::F32).to_tensors(&ad);
                    Box::new(move |x| int8_matmul(x, q.clone(), scale.clone()))
                }
                QuantFormat::F16 => {
                    let options = TensorCreationOptions::new(ad.clone()).with_dtype(DType::F16);
                    let half = Tensor::<2>::from_data(TensorData::new(transposed(&w, out, inp), [inp, out]), options);
                    Box::new(move |x| f16_matmul(x, half.clone()))
                }
                QuantFormat::F32 => {
                    let dense = Tensor::<2>::from_data(TensorData::new(w, [out, inp]), &ad).transpose();
                    Box::new(move |x: Tensor<2>| x.matmul(dense.clone()))
                }
            })
        };
        let (gate, up, down) = (weight(inter, hidden)?, weight(inter, hidden)?, weight(hidden, inter)?);
        let x = Tensor::<2>::random([rows, hidden], Distribution::Normal(0.0, 1.0), &ad).require_grad();
        let y = down(gate(x.clone()).mul(up(x.clone())));
        let grads = y.sum().backward();
        let dx = x.grad(&grads).map(|g| g.sum().into_scalar::<f32>());
        device.sync().map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let held = device
            .memory_pool_usage()
            .map_or("n/a (backend reports no pools)".to_string(), |u| {
                format!(
                    "{:.1} MiB reserved, {:.1} MiB in use",
                    u.bytes_reserved as f64 / 1048576.0,
                    u.bytes_in_use as f64 / 1048576.0
                )
            });
        println!("  {label:<28} {held}  (Σdx = {:.3})", dx.unwrap_or(f32::NAN));
    }
    Ok(())
}
