//! Emulators built from a 6-layer tiny model: which layers they keep, what they compute, and that a damaged file is
//! refused.

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Int, Tensor, TensorData};
use offsite::emulator::{self, Emulator, EmulatorConfig, EmulatorError};
use offsite::load::Checkpoint;
use offsite::quant::{QuantFormat, ScaleDType};
use offsite::train::causal_lm_loss;
use offsite_tests::{logits, max_abs_diff, tiny_llama_6_layers};

const IDS: [i64; 8] = [1, 15, 27, 99, 3, 200, 7, 42];

fn build(dir: &Path, quant: QuantFormat) -> (PathBuf, PathBuf) {
    let model = tiny_llama_6_layers(&dir.join("model"));
    build_from(&model, dir, quant, false)
}

/// 1 + 1 adapter layers, half the middle dropped, the middle in `quant`.
fn settings(quant: QuantFormat, quantize_embeddings: bool) -> EmulatorConfig {
    EmulatorConfig {
        bottom_layers: 1,
        top_layers: 1,
        drop_ratio: 0.5,
        quant,
        scale_dtype: ScaleDType::F32,
        quantize_embeddings,
    }
}

fn build_from(model: &Path, dir: &Path, quant: QuantFormat, quantize_embeddings: bool) -> (PathBuf, PathBuf) {
    let config = settings(quant, quantize_embeddings);
    let out = dir.join(format!("{quant:?}-{quantize_embeddings}.emu"));
    let ckpt = Checkpoint::open(model).unwrap();
    let mut calls = 0;
    emulator::build(&ckpt, "tiny-6", &config, &out, &mut |_, _| calls += 1).unwrap();
    assert!(calls > 0);
    (model.to_path_buf(), out)
}

fn rel(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    max_abs_diff(a, b) / scale
}

#[test]
fn f32_emulator_equals_the_full_model_without_the_dropped_layers() {
    let dir = tempfile::tempdir().unwrap();
    let (model_dir, path) = build(dir.path(), QuantFormat::F32);
    let emu = Emulator::open(&path).unwrap();
    // Middle layers 1..5, half kept, spread uniformly: 1 and 4.
    assert_eq!(emu.manifest().layers, vec![0, 1, 4, 5]);
    assert_eq!(emu.manifest().adapter_layers, vec![0, 5]);
    let device = Device::flex();
    let got = logits(&emu.load_model(&device).unwrap(), &IDS);

    let mut full = Checkpoint::open(&model_dir).unwrap().load_model(&device).unwrap();
    for id in [3, 2] {
        full.model.layers.remove(id);
        full.model.layer_ids.remove(id);
    }
    let want = logits(&full, &IDS);
    let diff = max_abs_diff(&got, &want);
    assert!(diff < 1e-5, "max |diff| {diff}");
    // And dropping layers changed the function (the check above is not vacuous).
    let whole = logits(
        &Checkpoint::open(&model_dir).unwrap().load_model(&device).unwrap(),
        &IDS,
    );
    assert!(max_abs_diff(&whole, &want) > 1e-3);
}

#[test]
fn quantized_emulators_stay_close_and_keep_names() {
    let dir = tempfile::tempdir().unwrap();
    let device = Device::flex();
    let reference = logits(
        &Emulator::open(&build(dir.path(), QuantFormat::F32).1)
            .unwrap()
            .load_model(&device)
            .unwrap(),
        &IDS,
    );
    for (quant, tol) in [(QuantFormat::Int8, 2e-2), (QuantFormat::F16, 2e-3)] {
        let (_, path) = build(dir.path(), quant);
        let emu = Emulator::open(&path).unwrap();
        let model = emu.load_model(&device).unwrap();
        let r = rel(&logits(&model, &IDS), &reference);
        assert!(r < tol, "{quant:?}: relative logit error {r}");
        assert!(r > 0.0, "{quant:?}: quantization changed nothing");
        let names: Vec<String> = model.named_params().into_iter().map(|p| p.name).collect();
        assert!(names.contains(&"model.layers.4.input_layernorm.weight".to_string()));
        assert!(!names.iter().any(|n| n.starts_with("model.layers.2.")));
        assert!(emu.is_adapter_param("model.layers.5.mlp.up_proj.weight"));
        assert!(!emu.is_adapter_param("model.layers.4.mlp.up_proj.weight"));
        // The frozen middle is stored quantized, the adapters in f32.
        let file = std::fs::read(&path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&file).unwrap();
        let dtype = |n: &str| st.tensor(n).unwrap().dtype();
        let frozen = match quant {
            QuantFormat::Int8 => safetensors::Dtype::I8,
            _ => safetensors::Dtype::F16,
        };
        assert_eq!(dtype("model.layers.4.mlp.up_proj.weight"), frozen);
        assert_eq!(dtype("model.layers.5.mlp.up_proj.weight"), safetensors::Dtype::F32);
        assert!(st.names().iter().all(|n| !n.starts_with("model.layers.3.")));
    }
}

/// The 6-layer tiny model with tied embeddings (its `lm_head.weight` dropped), as SmolLM2 has them.
fn tied_copy(model: &Path, dir: &Path) -> PathBuf {
    let file = std::fs::read(model.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&file).unwrap();
    let views: Vec<_> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| n != "lm_head.weight")
        .collect();
    std::fs::create_dir_all(dir).unwrap();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("config.json")).unwrap()).unwrap();
    config["tie_word_embeddings"] = true.into();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    dir.to_path_buf()
}

/// A table as the file stores it, widened: int8 codes times their row's scale, or f16.
fn stored_f32(st: &safetensors::SafeTensors, name: &str) -> (Vec<f32>, Vec<usize>) {
    let t = st.tensor(name).unwrap();
    let values = match t.dtype() {
        safetensors::Dtype::I8 => {
            let scale: Vec<f32> = st
                .tensor(&format!("{name}_scale"))
                .unwrap()
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            let cols = t.shape()[1];
            t.data()
                .iter()
                .enumerate()
                .map(|(i, &c)| c as i8 as f32 * scale[i / cols])
                .collect()
        }
        safetensors::Dtype::F16 => t
            .data()
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        other => panic!("`{name}` is stored as {other:?}"),
    };
    (values, t.shape().to_vec())
}

/// Loss and adapter gradients on an autodiff device.
fn loss_and_grads(emu: &Emulator, replace: Vec<(String, Vec<f32>, Vec<usize>)>) -> (Vec<f32>, Vec<(String, Vec<f32>)>) {
    let device = Device::flex().autodiff();
    let model = emu.load_model(&device).unwrap().set_params(replace, true).unwrap();
    let model = model.with_trainable(&|n| emu.is_adapter_param(n));
    let x = Tensor::<2, Int>::from_data(TensorData::new(IDS.to_vec(), [1, IDS.len()]), &device);
    let out = model.forward(x, None, None).unwrap();
    let loss = causal_lm_loss(out.clone(), &[IDS.to_vec()]).unwrap();
    let grads = loss.backward();
    let mut named: Vec<(String, Vec<f32>)> = model
        .named_grads(&grads)
        .into_iter()
        .map(|(n, g)| (n, g.into_data().try_into_vec().unwrap()))
        .collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    (out.inner().into_data().try_into_vec().unwrap(), named)
}

#[test]
fn quantized_embeddings_compute_through_the_stored_table() {
    let dir = tempfile::tempdir().unwrap();
    let untied = tiny_llama_6_layers(&dir.path().join("model"));
    let tied = tied_copy(&untied, &dir.path().join("tied"));
    for (model, heads) in [(&untied, vec!["lm_head.weight"]), (&tied, vec![])] {
        for quant in [QuantFormat::Int8, QuantFormat::F16] {
            let (_, small) = build_from(model, model, quant, true);
            let (_, plain) = build_from(model, model, quant, false);
            let emu = Emulator::open(&small).unwrap();
            assert!(emu.manifest().quantize_embeddings);
            let file = std::fs::read(&small).unwrap();
            let st = safetensors::SafeTensors::deserialize(&file).unwrap();
            let tables: Vec<&str> = ["model.embed_tokens.weight"]
                .into_iter()
                .chain(heads.iter().copied())
                .collect();
            for name in &tables {
                assert_ne!(
                    st.tensor(name).unwrap().dtype(),
                    safetensors::Dtype::F32,
                    "{name} ({quant:?})"
                );
            }
            assert_eq!(st.tensor("model.norm.weight").unwrap().dtype(), safetensors::Dtype::F32);
            let (small_len, plain_len) = (file.len(), std::fs::metadata(&plain).unwrap().len() as usize);
            assert!(small_len < plain_len, "{quant:?}: {small_len} vs {plain_len} bytes");

            // Reference: the same emulator with dense tables holding exactly the stored (widened) values. Lookups,
            // the head and its input gradient through the stored codes must give what the dense path gives.
            let replace: Vec<_> = tables
                .iter()
                .map(|n| {
                    let (v, shape) = stored_f32(&st, n);
                    (n.to_string(), v, shape)
                })
                .collect();
            let (got, got_grads) = loss_and_grads(&emu, Vec::new());
            let (want, want_grads) = loss_and_grads(&Emulator::open(&plain).unwrap(), replace);
            let r = rel(&got, &want);
            assert!(
                r < 1e-5,
                "{quant:?} tied={}: relative logit error {r}",
                heads.is_empty()
            );
            assert_eq!(got_grads.len(), want_grads.len());
            assert!(!got_grads.is_empty());
            for ((n, g), (m, w)) in got_grads.iter().zip(&want_grads) {
                assert_eq!(n, m);
                let r = rel(g, w);
                assert!(
                    r < 1e-4,
                    "{quant:?} tied={}: {n} gradient relative error {r}",
                    heads.is_empty()
                );
            }
        }
    }
}

#[test]
fn damaged_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_, path) = build(dir.path(), QuantFormat::Int8);
    let bytes = std::fs::read(&path).unwrap();
    // One flipped bit in the last tensor byte: the content hash no longer matches.
    let mut flipped = bytes.clone();
    *flipped.last_mut().unwrap() ^= 1;
    let bad = dir.path().join("flipped.emu");
    std::fs::write(&bad, &flipped).unwrap();
    assert!(matches!(Emulator::open(&bad), Err(EmulatorError::Integrity { .. })));
    // Truncation anywhere gives an error, never a panic.
    for cut in [0, 7, 100, bytes.len() / 2, bytes.len() - 1] {
        std::fs::write(&bad, &bytes[..cut]).unwrap();
        assert!(Emulator::open(&bad).is_err(), "truncated at {cut}");
    }
    // A plain checkpoint is not an emulator.
    let plain = dir.path().join("model/model.safetensors");
    let err = Emulator::open(&plain).err().unwrap().to_string();
    assert!(err.contains("not an Offsite emulator"), "{err}");
}

/// Normalised MSE between the emulator's and the full model's hidden state entering the top adapter layer.
fn boundary_nmse(
    emu: &offsite::model::LlamaForCausalLM,
    full: &offsite::model::LlamaForCausalLM,
    seqs: &[Vec<i64>],
) -> f64 {
    let (mut err, mut norm) = (0.0f64, 0.0f64);
    for s in seqs {
        let ids = burn::tensor::Tensor::<2, burn::tensor::Int>::from_data(
            burn::tensor::TensorData::new(s.clone(), [1, s.len()]),
            &Device::flex(),
        );
        let a: Vec<f32> = emu
            .hidden_after(ids.clone(), None, emu.model.layers.len() - 1)
            .unwrap()
            .into_data()
            .try_into_vec()
            .unwrap();
        let b: Vec<f32> = full
            .hidden_after(ids, None, 5)
            .unwrap()
            .into_data()
            .try_into_vec()
            .unwrap();
        err += a.iter().zip(&b).map(|(x, y)| ((x - y) as f64).powi(2)).sum::<f64>();
        norm += b.iter().map(|y| (*y as f64).powi(2)).sum::<f64>();
    }
    err / norm
}

#[test]
fn distillation_pulls_the_middle_towards_the_full_model_and_touches_nothing_else() {
    use offsite::data::Example;
    use offsite::emulator::{DistillConfig, KdAt, KdNorm};
    let dir = tempfile::tempdir().unwrap();
    let (model_dir, plain_path) = build(dir.path(), QuantFormat::F32);
    let ckpt = Checkpoint::open(&model_dir).unwrap();
    let seq = |i: u32, n: u32| -> Vec<u32> { (0..n).map(|t| (i * 11 + t * 17 + t * t) % 250 + 3).collect() };
    let examples: Vec<Example> = (0..24).map(|i| offsite_tests::lm_example(seq(i, 16))).collect();
    let held: Vec<Vec<i64>> = (100..106)
        .map(|i| seq(i, 16).iter().map(|&x| x as i64).collect())
        .collect();
    let config = settings(QuantFormat::F32, false);
    let full = ckpt.load_model(&Device::flex()).unwrap();
    let plain = Emulator::open(&plain_path).unwrap();
    let before = boundary_nmse(&plain.load_model(&Device::flex()).unwrap(), &full, &held);

    for (lm_weight, kl_weight, kd_at, kd_norm) in [
        (0.0, 0.0, KdAt::Top, KdNorm::Batch),
        (0.5, 0.0, KdAt::Top, KdNorm::Batch),
        (0.0, 0.0, KdAt::EveryLayer, KdNorm::Batch),
        (0.0, 0.5, KdAt::EveryLayer, KdNorm::Token),
    ] {
        let settings = DistillConfig {
            steps: 30,
            batch_size: 8,
            max_len: 16,
            lr: 3e-3,
            warmup_steps: 2,
            lm_weight,
            kl_weight,
            max_grad_norm: 1.0,
            seed: 1,
            kd_at,
            kd_norm,
        };
        let mut steps = Vec::new();
        let layers = emulator::distill(&ckpt, &config, &settings, &examples, &Device::flex(), None, &mut |s| {
            steps.push(s.clone())
        })
        .unwrap();
        assert_eq!(steps.len(), 30);
        assert_eq!(steps[0].lm.is_some(), lm_weight > 0.0);
        assert_eq!(steps[0].kl.is_some(), kl_weight > 0.0);
        let out = dir
            .path()
            .join(format!("distilled-{lm_weight}-{kl_weight}-{kd_at:?}-{kd_norm:?}.emu"));
        let (manifest, _) = emulator::build_distilled(&ckpt, "tiny-6", &config, layers, &out, &mut |_, _| {}).unwrap();
        assert!(manifest.distilled);
        let distilled = Emulator::open(&out).unwrap();
        let after = boundary_nmse(&distilled.load_model(&Device::flex()).unwrap(), &full, &held);
        eprintln!(
            "lm_weight {lm_weight}, kl_weight {kl_weight}, kd at {kd_at:?} ({kd_norm:?}): training nmse {:.4} → {:.4}; held-out boundary nmse {before:.4} → {after:.4}",
            steps[0].mse, steps[29].mse
        );
        assert!(
            steps[29].mse < steps[0].mse * 0.8,
            "training nmse {} → {}",
            steps[0].mse,
            steps[29].mse
        );
        // The LM term pulls elsewhere too, so only the pure-MSE run must close a fifth of the gap on held-out data.
        let bound = if lm_weight == 0.0 { 0.8 } else { 1.0 };
        assert!(after < before * bound, "held-out boundary nmse {before} → {after}");

        // Only the kept middle layers changed; embeddings, adapter layers, norm and head are the full model's.
        let (a, b) = (
            plain.load_model(&Device::flex()).unwrap(),
            distilled.load_model(&Device::flex()).unwrap(),
        );
        let values = |m: &offsite::model::LlamaForCausalLM| -> std::collections::HashMap<String, Vec<f32>> {
            m.named_params()
                .into_iter()
                .map(|p| (p.name, p.value.into_data().convert::<f32>().try_into_vec().unwrap()))
                .collect()
        };
        let (va, vb) = (values(&a), values(&b));
        for (name, v) in &va {
            let middle = name.starts_with("model.layers.")
                && !name.starts_with("model.layers.0.")
                && !name.starts_with("model.layers.5.");
            let changed = max_abs_diff(v, &vb[name]) > 0.0;
            assert_eq!(
                changed,
                middle && name.ends_with("weight"),
                "`{name}` changed: {changed}"
            );
        }
    }
}

#[test]
fn a_killed_distillation_resumes_from_its_last_save_and_ends_as_the_uninterrupted_one() {
    use offsite::data::Example;
    use offsite::emulator::{DistillCheckpoint, DistillConfig, DistilledLayers, KdAt, KdNorm};
    let dir = tempfile::tempdir().unwrap();
    let (model_dir, _) = build(dir.path(), QuantFormat::F32);
    let ckpt = Checkpoint::open(&model_dir).unwrap();
    let examples: Vec<Example> = (0..16u32)
        .map(|i| offsite_tests::lm_example((0..16u32).map(|t| (i * 13 + t * 7 + t * t) % 250 + 3).collect()))
        .collect();
    let config = settings(QuantFormat::F32, false);
    let settings = DistillConfig {
        steps: 6,
        batch_size: 4,
        max_len: 16,
        lr: 3e-3,
        warmup_steps: 1,
        lm_weight: 0.0,
        kl_weight: 0.5,
        max_grad_norm: 1.0,
        seed: 3,
        kd_at: KdAt::EveryLayer,
        kd_norm: KdNorm::Token,
    };
    let run = |resume: Option<&DistillCheckpoint<'_>>, kill_after: usize, steps: &mut Vec<usize>| {
        emulator::distill(
            &ckpt,
            &config,
            &settings,
            &examples,
            &Device::flex(),
            resume,
            &mut |s| {
                steps.push(s.step);
                assert!(s.step < kill_after, "killed after step {}", s.step);
            },
        )
    };
    let written = |layers: DistilledLayers, name: &str| {
        let out = dir.path().join(name);
        // The content hash (manifest and tensors by name), not the bytes: the file's tensor order may vary.
        emulator::build_distilled(&ckpt, "tiny-6", &config, layers, &out, &mut |_, _| {})
            .unwrap()
            .1
    };
    let whole = written(run(None, usize::MAX, &mut Vec::new()).unwrap(), "whole.emu");
    let again = written(run(None, usize::MAX, &mut Vec::new()).unwrap(), "again.emu");
    assert_eq!(
        again, whole,
        "two uninterrupted distillations differ: nothing to compare a resumed one with"
    );

    let progress = dir.path().join("progress");
    let resume = DistillCheckpoint {
        dir: &progress,
        key: "k1",
        every: 2,
    };
    let mut steps = Vec::new();
    // A kill at step 5: the saves after steps 2 and 4 are on disk.
    let killed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(Some(&resume), 5, &mut steps)));
    assert!(killed.is_err());
    assert_eq!(resume.step(), Some(4));
    assert_eq!(
        DistillCheckpoint { key: "other", ..resume }.step(),
        None,
        "another key never resumes"
    );
    let mut steps = Vec::new();
    let resumed = written(run(Some(&resume), usize::MAX, &mut steps).unwrap(), "resumed.emu");
    assert_eq!(steps, vec![5, 6], "only the steps after the last save run again");
    assert_eq!(
        resumed, whole,
        "the resumed distillation differs from the uninterrupted one"
    );
}
