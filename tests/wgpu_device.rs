//! The same model code on a wgpu device (in CI: Mesa's lavapipe, a software Vulkan GPU) against the reference.

use burn::tensor::{Int, Tensor, TensorData};
use offsite::device::{gpu_adapters, gpu_for_tests, resolve, DeviceChoice};
use offsite::generate::{generate, GenerationConfig};
use offsite::load::Checkpoint;
use offsite::model::KvCache;
use offsite_tests::{fixture, logits, max_abs_diff, Tensors};

#[test]
fn tiny_llama_on_wgpu_matches_transformers() {
    let Some(device) = gpu_for_tests("tiny_llama_on_wgpu_matches_transformers") else {
        return;
    };
    eprintln!(
        "running on {}",
        resolve(DeviceChoice::Gpu(0)).map(|d| d.1).unwrap_or_default()
    );
    let model = Checkpoint::open(&fixture("tiny-llama"))
        .unwrap()
        .load_model(&device)
        .unwrap();
    let exp = Tensors::read(&fixture("tiny-llama/expected.safetensors"));
    for i in 0..3 {
        let ids = exp.i64(&format!("input_ids.{i}"));
        let diff = max_abs_diff(&logits(&model, &ids), &exp.f32(&format!("logits.{i}")));
        assert!(diff < 1e-4, "case {i}: max |diff| {diff}");
    }
    // Incremental decoding through the block-allocated KV cache.
    let ids = exp.i64("input_ids.2");
    let mut cache = KvCache::new(2, 1);
    let prefix = Tensor::<2, Int>::from_data(TensorData::new(ids[..16].to_vec(), [1, 16]), &device);
    model.forward(prefix, None, Some(&mut cache)).unwrap();
    let last = Tensor::<2, Int>::from_data(TensorData::new(vec![ids[16]], [1, 1]), &device);
    let got: Vec<f32> = model
        .forward(last, None, Some(&mut cache))
        .unwrap()
        .into_data()
        .try_into_vec()
        .unwrap();
    let want = exp.f32("logits.2");
    assert!(max_abs_diff(&got, &want[16 * 256..]) < 1e-4);
    // Greedy generation agrees with the CPU backend.
    let cpu = Checkpoint::open(&fixture("tiny-llama"))
        .unwrap()
        .load_model(&burn::tensor::Device::flex())
        .unwrap();
    let prompt: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
    let config = GenerationConfig {
        max_new_tokens: 6,
        ..Default::default()
    };
    assert_eq!(
        generate(&model, &prompt, &[], &config).unwrap(),
        generate(&cpu, &prompt, &[], &config).unwrap()
    );
}

#[test]
fn mixed_precision_training_on_wgpu_tracks_the_cpu_in_f32() {
    use offsite::adapters::{AdapterSpec, Method};
    use offsite::data::Example;
    use offsite::emulator::Emulator;
    use offsite::train::{Precision, TrainConfig, Trainer};
    let Some(device) = gpu_for_tests("mixed_precision_training_on_wgpu_tracks_the_cpu_in_f32") else {
        return;
    };
    let adapters = gpu_adapters();
    assert!(
        adapters.first().is_some_and(|a| a.shader_f16),
        "the first adapter lacks shader-f16: {adapters:?}"
    );
    let dir = tempfile::tempdir().unwrap();
    let (_, emu_path) = offsite_tests::tiny_emulator(dir.path());
    let emu = Emulator::open(&emu_path).unwrap();
    let data: Vec<Example> = (0..8u32)
        .map(|i| offsite_tests::lm_example((0..12).map(|t| (i * 7 + t * 13) % 250 + 3).collect()))
        .collect();
    let spec = AdapterSpec {
        method: Method::Layers,
        lora: None,
        prompt: None,
    };
    let run = |device: burn::tensor::Device, precision| {
        let model = emu.load_model(&device.autodiff()).unwrap();
        let (model, _) = spec.prepare(model, &emu.manifest().adapter_layers, None).unwrap();
        let config = TrainConfig {
            steps: 3,
            batch_size: 4,
            lr: 5e-3,
            precision,
            ..Default::default()
        };
        let mut losses = Vec::new();
        Trainer::new(config)
            .unwrap()
            .run(model, &data, &mut |r| losses.push(r.loss))
            .unwrap();
        losses
    };
    let gpu = run(device, Precision::MixedF16);
    let cpu = run(burn::tensor::Device::flex(), Precision::F32);
    eprintln!("wgpu mixed f16: {gpu:?}\ncpu f32:        {cpu:?}");
    for (g, c) in gpu.iter().zip(&cpu) {
        assert!((g - c).abs() / c < 2e-2, "wgpu mixed {g} vs cpu f32 {c}");
    }
}
