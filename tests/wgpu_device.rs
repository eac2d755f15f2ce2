//! The same model code on a wgpu device (in CI: Mesa's lavapipe, a software Vulkan GPU) against the reference.

use burn::tensor::{Int, Tensor, TensorData};
use offsite::device::{gpu_adapters, resolve, DeviceChoice};
use offsite::generate::{generate, GenerationConfig};
use offsite::load::Checkpoint;
use offsite::model::KvCache;
use offsite_tests::{fixture, logits, max_abs_diff, Tensors};

#[test]
fn tiny_llama_on_wgpu_matches_transformers() {
    assert!(
        !gpu_adapters().is_empty(),
        "no Vulkan/Metal/DX12 adapter: install a GPU driver or Mesa's software one (apt-get install mesa-vulkan-drivers)"
    );
    let (device, described) = resolve(DeviceChoice::Gpu(0)).unwrap();
    eprintln!("running on {described}");
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
