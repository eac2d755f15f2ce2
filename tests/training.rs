//! Local training on an emulator of the 6-layer tiny model: gradients through the int8 middle, what trains and
//! what stays frozen, determinism, resume, non-finite steps, and plugging the result back into the full model.

use std::collections::HashMap;
use std::path::Path;

use burn::module::Param;
use burn::tensor::{Device, Tensor, TensorData};
use offsite::adapters::{self, AdapterManifest, AdapterSpec, LoraConfig, Method, TargetModules};
use offsite::data::{Batch, Example};
use offsite::emulator::Emulator;
use offsite::load::Checkpoint;
use offsite::model::{LinearWeight, LlamaForCausalLM};
use offsite::train::{TrainConfig, TrainError, Trainer};
use offsite_tests::{logits, max_abs_diff, tiny_emulator};

fn emulator_file(dir: &Path) -> (std::path::PathBuf, Emulator) {
    let (model, emu) = tiny_emulator(dir);
    (model, Emulator::open(&emu).unwrap())
}

/// Sixteen short sequences from a fixed pattern, prompt tokens (the first 3) ignored.
fn examples() -> Vec<Example> {
    (0..16u32)
        .map(|i| {
            let ids: Vec<u32> = (0..12).map(|t| (i * 7 + t * 13) % 250 + 3).collect();
            let labels = ids
                .iter()
                .enumerate()
                .map(|(t, &id)| if t < 3 { -100 } else { id as i64 })
                .collect();
            Example {
                ids,
                labels,
                category: None,
            }
        })
        .collect()
}

fn config(steps: usize) -> TrainConfig {
    TrainConfig {
        steps,
        batch_size: 4,
        grad_accum: 2,
        lr: 5e-3,
        warmup_steps: 1,
        ..Default::default()
    }
}

fn params(model: &LlamaForCausalLM) -> HashMap<String, Vec<f32>> {
    model
        .named_params()
        .into_iter()
        .map(|p| (p.name, p.value.into_data().convert::<f32>().try_into_vec().unwrap()))
        .collect()
}

fn layers_spec() -> AdapterSpec {
    AdapterSpec {
        method: Method::Layers,
        lora: None,
        prompt: None,
    }
}

fn prepared(emu: &Emulator, spec: &AdapterSpec) -> (LlamaForCausalLM, Option<LoraConfig>) {
    let model = emu.load_model(&Device::flex().autodiff()).unwrap();
    spec.prepare(model, &emu.manifest().adapter_layers, None).unwrap()
}

#[test]
fn gradients_through_the_int8_middle_match_a_dense_copy() {
    let dir = tempfile::tempdir().unwrap();
    let (_, emu) = emulator_file(dir.path());
    let (quantized, _) = prepared(&emu, &layers_spec());
    // The same emulator with every int8 matrix widened to a dense f32 parameter (frozen).
    let mut dense = quantized.clone();
    for name in dense.linear_names() {
        let linear = dense.linear_mut(&name).unwrap();
        if let LinearWeight::Int8(_) = &linear.weight {
            let w = linear.weight.to_f32().detach();
            linear.weight = LinearWeight::Dense(Param::from_tensor(w).set_require_grad(false));
        }
    }
    let batch = Batch::new(&examples().iter().take(4).collect::<Vec<_>>());
    let grads = |m: &LlamaForCausalLM| {
        let device = m.device();
        let flat: Vec<i64> = batch.ids.iter().flatten().map(|&x| x as i64).collect();
        let ids = Tensor::from_data(TensorData::new(flat, [4, 12]), &device);
        let logits = m.forward(ids, Some(&batch.mask), None).unwrap();
        let g = offsite::train::causal_lm_loss(logits, &batch.labels)
            .unwrap()
            .backward();
        m.named_grads(&g)
            .into_iter()
            .map(|(n, t)| (n, t.into_data().try_into_vec::<f32>().unwrap()))
            .collect::<HashMap<_, _>>()
    };
    let (gq, gd) = (grads(&quantized), grads(&dense));
    // Exactly the adapter layers (0 and 5) receive gradients: 9 tensors each.
    assert_eq!(gq.len(), 18, "{:?}", gq.keys().collect::<Vec<_>>());
    assert!(gq
        .keys()
        .all(|n| n.starts_with("model.layers.0.") || n.starts_with("model.layers.5.")));
    for (name, q) in &gq {
        let d = &gd[name];
        let scale = d.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        let rel = max_abs_diff(q, d) / scale;
        assert!(scale > 0.0 && rel < 1e-4, "{name}: relative difference {rel}");
    }
}

#[test]
fn training_lowers_the_loss_and_only_moves_the_adapter_layers() {
    let dir = tempfile::tempdir().unwrap();
    let (_, emu) = emulator_file(dir.path());
    let (model, _) = prepared(&emu, &layers_spec());
    let before = params(&model);
    let data = examples();
    let eval_before = offsite::train::evaluate(&model, &data, 8).unwrap();
    let mut trainer = Trainer::new(config(12)).unwrap();
    let mut reports = Vec::new();
    let model = trainer.run(model, &data, &mut |r| reports.push(*r)).unwrap();
    let eval_after = offsite::train::evaluate(&model, &data, 8).unwrap();
    assert_eq!(reports.len(), 12);
    assert!(reports.iter().all(|r| !r.skipped && r.grad_norm > 0.0));
    assert!(
        eval_after.loss < eval_before.loss - 0.1,
        "loss {} -> {}",
        eval_before.loss,
        eval_after.loss
    );
    let after = params(&model);
    for (name, b) in &before {
        let moved = max_abs_diff(b, &after[name]) > 0.0;
        let adapter = name.starts_with("model.layers.0.") || name.starts_with("model.layers.5.");
        assert_eq!(moved, adapter, "{name}");
    }
}

#[test]
fn same_seed_same_run_and_resume_continues_it() {
    let dir = tempfile::tempdir().unwrap();
    let (_, emu) = emulator_file(dir.path());
    let data = examples();
    let run = |steps: usize| {
        let (model, _) = prepared(&emu, &layers_spec());
        let mut trainer = Trainer::new(config(steps)).unwrap();
        let model = trainer.run(model, &data, &mut |_| {}).unwrap();
        (model, trainer)
    };
    let (a, _) = run(4);
    let (b, _) = run(4);
    let (pa, pb) = (params(&a), params(&b));
    for (n, v) in &pa {
        assert_eq!(max_abs_diff(v, &pb[n]), 0.0, "{n}: two runs with one seed differ");
    }

    // Two steps, checkpoint, then a fresh process state resumes for the last two.
    let (half, trainer) = {
        let (model, _) = prepared(&emu, &layers_spec());
        let mut trainer = Trainer::new(config(2)).unwrap();
        (trainer.run(model, &data, &mut |_| {}).unwrap(), trainer)
    };
    let ckpt = dir.path().join("ckpt");
    let manifest = AdapterManifest::for_emulator(Method::Layers, &emu);
    adapters::save(&ckpt, &half, &manifest, None).unwrap();
    trainer.save(&ckpt).unwrap();
    drop((half, trainer));
    let device = Device::flex().autodiff();
    let resumed = Trainer::load(&ckpt, &device.clone().inner()).unwrap();
    assert_eq!(resumed.step(), 2);
    let (model, _) = prepared(&emu, &layers_spec());
    let model = adapters::apply(model, &ckpt).unwrap();
    assert_eq!(resumed.config().steps, 2);
    let mut resumed = resumed.with_steps(4);
    let model = resumed.run(model, &data, &mut |_| {}).unwrap();
    let pr = params(&model);
    for (n, v) in &pa {
        let d = max_abs_diff(v, &pr[n]);
        assert!(d < 1e-6, "{n}: resumed run differs by {d}");
    }
}

#[test]
fn non_finite_steps_are_skipped_then_stop_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let (_, emu) = emulator_file(dir.path());
    let (model, _) = prepared(&emu, &layers_spec());
    let name = "model.layers.0.input_layernorm.weight";
    let n = params(&model)[name].len();
    let mut poison = HashMap::from([(
        name.to_string(),
        Tensor::<1>::from_data(TensorData::new(vec![f32::NAN; n], [n]), &model.device()),
    )]);
    let model = model.replace_params(&mut poison);
    assert!(poison.is_empty(), "the poisoned parameter was not replaced");
    let mut trainer = Trainer::new(config(10)).unwrap();
    let mut reports = Vec::new();
    let err = trainer.run(model, &examples(), &mut |r| reports.push(*r)).unwrap_err();
    assert!(matches!(err, TrainError::NonFinite { steps: 5, .. }), "{err}");
    assert_eq!(reports.len(), 4);
    assert!(reports.iter().all(|r| r.skipped));
    assert_eq!(trainer.skipped(), 5);
    // A skipped step still consumes its batch, so the next step sees new data.
    assert_eq!(trainer.step(), 5);
}

#[test]
fn plug_in_puts_trained_layers_and_lora_into_the_full_model_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let (model_dir, emu) = emulator_file(dir.path());
    let data = examples();
    let full = || {
        Checkpoint::open(&model_dir)
            .unwrap()
            .load_model(&Device::flex())
            .unwrap()
    };
    let base_logits = logits(&full(), &[5, 9, 33, 100]);
    for spec in [
        layers_spec(),
        AdapterSpec {
            method: Method::Lora,
            lora: Some(LoraConfig {
                r: 4,
                lora_alpha: 8.0,
                target_modules: TargetModules::Preset("all-linear".into()),
                lora_dropout: 0.0,
                use_rslora: false,
                layers_to_transform: None,
            }),
            prompt: None,
        },
    ] {
        let (model, lora) = prepared(&emu, &spec);
        let mut trainer = Trainer::new(config(3)).unwrap();
        let trained = trainer.run(model, &data, &mut |_| {}).unwrap();
        let out = dir.path().join(format!("{:?}", spec.method));
        let manifest = AdapterManifest::for_emulator(spec.method, &emu);
        adapters::save(&out, &trained, &manifest, lora.as_ref()).unwrap();
        let plugged = adapters::apply(full(), &out).unwrap();
        let (t, p, f) = (params(&trained), params(&plugged), params(&full()));
        for (name, v) in &p {
            let adapter = name.starts_with("model.layers.0.") || name.starts_with("model.layers.5.");
            if adapter || name.contains("lora_") {
                assert_eq!(v, &t[name], "{name} was not plugged in");
            } else {
                assert_eq!(v, &f[name], "{name} changed");
            }
        }
        if spec.method == Method::Lora {
            assert_eq!(
                plugged
                    .linear_names()
                    .iter()
                    .filter(|n| plugged.linear(n).unwrap().lora.is_some())
                    .count(),
                14
            );
        }
        assert!(max_abs_diff(&logits(&plugged, &[5, 9, 33, 100]), &base_logits) > 1e-4);
    }
}

#[test]
fn mixed_precision_runs_products_in_f16_and_tracks_f32_training() {
    use offsite::train::Precision;
    let dir = tempfile::tempdir().unwrap();
    let (_, emu) = emulator_file(dir.path());
    let data = examples();
    let probe = [5i64, 9, 33, 100, 2, 17];
    // Products in f16 stay close to f32 but are not bit-identical: the f16 path really runs.
    let (mut half, _) = prepared(&emu, &layers_spec());
    let (full, _) = prepared(&emu, &layers_spec());
    half.set_half_matmuls(true);
    let (a, b) = (logits(&half, &probe), logits(&full, &probe));
    let scale = b.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    let d = max_abs_diff(&a, &b) / scale;
    assert!(d > 0.0 && d < 1e-2, "f16 products: relative difference {d}");

    let run = |precision| {
        let (model, _) = prepared(&emu, &layers_spec());
        let mut losses = Vec::new();
        let mut trainer = Trainer::new(TrainConfig { precision, ..config(6) }).unwrap();
        trainer
            .run(model, &data, &mut |r| losses.push((r.loss, r.skipped)))
            .unwrap();
        losses
    };
    let (mixed, f32_run) = (run(Precision::MixedF16), run(Precision::F32));
    eprintln!("mixed: {mixed:?}\nf32:   {f32_run:?}");
    assert!(
        mixed.iter().all(|(_, skipped)| !skipped),
        "no step overflowed at the initial scale"
    );
    for ((m, _), (f, _)) in mixed.iter().zip(&f32_run) {
        assert!((m - f).abs() / f < 2e-2, "mixed loss {m} vs f32 {f}");
    }
    assert!(
        mixed[5].0 < mixed[0].0,
        "mixed-precision training lowers the loss: {mixed:?}"
    );
}
