//! LoRA against Hugging Face peft: loading the PEFT adapter reproduces its logits, the training loss and every
//! LoRA gradient; export writes PEFT's layout back.

use burn::module::Module;
use burn::tensor::{Device, Int, Tensor, TensorData};
use offsite::adapters::{export_peft, import_peft};
use offsite::load::Checkpoint;
use offsite::model::LlamaForCausalLM;
use offsite::train::causal_lm_loss;
use offsite_tests::{fixture, max_abs_diff, Tensors};

fn adapted(device: &Device) -> LlamaForCausalLM {
    let base = Checkpoint::open(&fixture("tiny-llama"))
        .unwrap()
        .load_model(device)
        .unwrap();
    let mut model = base.no_grad();
    let config = import_peft(&mut model, &fixture("tiny-llama-lora")).unwrap();
    assert_eq!((config.r, config.scale()), (4, 2.0));
    model
}

fn batch(exp: &Tensors, device: &Device) -> (Tensor<2, Int>, Vec<Vec<i64>>) {
    let ids = Tensor::from_data(TensorData::new(exp.i64("input_ids"), [2, 9]), device);
    let labels = exp.i64("labels").chunks(9).map(<[i64]>::to_vec).collect();
    (ids, labels)
}

#[test]
fn peft_adapter_logits_loss_and_gradients_match() {
    let exp = Tensors::read(&fixture("tiny-llama-lora/expected.safetensors"));
    let device = Device::flex().autodiff();
    let model = adapted(&device);
    let (ids, labels) = batch(&exp, &device);
    let logits = model.forward(ids, None, None).unwrap();
    let got: Vec<f32> = logits.clone().into_data().try_into_vec().unwrap();
    let diff = max_abs_diff(&got, &exp.f32("logits"));
    assert!(diff < 1e-4, "logits: max |diff| {diff}");
    eprintln!("logits: max |diff| {diff:.2e}");
    let loss = causal_lm_loss(logits, &labels).unwrap();
    let value: f32 = loss.clone().into_data().try_into_vec::<f32>().unwrap()[0];
    let want = exp.f32("loss")[0];
    assert!((value - want).abs() < 1e-5, "loss {value} vs {want}");
    eprintln!("loss {value} (peft {want})");
    let grads = loss.backward();
    let mut checked = 0;
    for name in model.linear_names() {
        let Some(lora) = model.linear(&name).and_then(|l| l.lora.as_ref()) else {
            continue;
        };
        for (suffix, param) in [("lora_A", &lora.lora_a), ("lora_B", &lora.lora_b)] {
            let g = param
                .val()
                .grad(&grads)
                .unwrap_or_else(|| panic!("no gradient for {name}.{suffix}"));
            let [rows, cols] = g.dims();
            let g: Vec<f32> = g.into_data().try_into_vec().unwrap();
            // Ours is stored transposed ([in, r] / [r, out]); PEFT's is [r, in] / [out, r].
            let ours: Vec<f32> = (0..rows * cols).map(|i| g[(i % rows) * cols + i / rows]).collect();
            let reference = exp.f32(&format!("grad.{name}.{suffix}.default.weight"));
            let scale = reference.iter().fold(0.0f32, |m, x| m.max(x.abs()));
            let rel = max_abs_diff(&ours, &reference) / scale;
            assert!(rel < 1e-4, "{name}.{suffix}: relative gradient error {rel:.2e}");
            eprintln!("{name}.{suffix}: relative gradient error {rel:.2e}");
            checked += 1;
        }
    }
    assert_eq!(checked, 8);
    // The frozen base receives no gradient.
    let q = &model.model.layers[0].self_attn.q_proj;
    assert!(q.weight.dense().unwrap().val().grad(&grads).is_none());
}

#[test]
fn export_writes_peft_layout_that_imports_back() {
    let exp = Tensors::read(&fixture("tiny-llama-lora/expected.safetensors"));
    let device = Device::flex();
    let model = adapted(&device);
    let config = offsite::adapters::LoraConfig::from_peft_json(
        &std::fs::read_to_string(fixture("tiny-llama-lora/adapter_config.json")).unwrap(),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    export_peft(&model, &config, Some("tiny-llama"), dir.path()).unwrap();
    // Same tensor names and values as peft's own file.
    let ours = Tensors::read(&dir.path().join("adapter_model.safetensors"));
    let theirs = Tensors::read(&fixture("tiny-llama-lora/adapter_model.safetensors"));
    let mut names = ours.names();
    let mut expected = theirs.names();
    names.sort();
    expected.sort();
    assert_eq!(names, expected);
    for n in &names {
        assert_eq!(ours.shape(n), theirs.shape(n), "{n}");
        assert_eq!(ours.f32(n), theirs.f32(n), "{n}");
    }
    // And a fresh model with the exported adapter gives peft's logits.
    let base = Checkpoint::open(&fixture("tiny-llama"))
        .unwrap()
        .load_model(&device)
        .unwrap();
    let mut again = base;
    import_peft(&mut again, dir.path()).unwrap();
    let (ids, _) = batch(&exp, &device);
    let got: Vec<f32> = again
        .forward(ids, None, None)
        .unwrap()
        .into_data()
        .try_into_vec()
        .unwrap();
    assert!(max_abs_diff(&got, &exp.f32("logits")) < 1e-4);
}

#[test]
fn mismatched_adapters_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture("tiny-llama-lora/adapter_model.safetensors"),
        dir.path().join("adapter_model.safetensors"),
    )
    .unwrap();
    let config = std::fs::read_to_string(fixture("tiny-llama-lora/adapter_config.json")).unwrap();
    // A rank that disagrees with the stored matrices.
    std::fs::write(
        dir.path().join("adapter_config.json"),
        config.replace("\"r\": 4", "\"r\": 8"),
    )
    .unwrap();
    let mut model = Checkpoint::open(&fixture("tiny-llama"))
        .unwrap()
        .load_model(&Device::flex())
        .unwrap();
    let err = import_peft(&mut model, dir.path()).unwrap_err().to_string();
    assert!(err.contains("q_proj") && err.contains("[8, 64]"), "{err}");
    // A truncated weights file.
    std::fs::write(dir.path().join("adapter_config.json"), &config).unwrap();
    let bytes = std::fs::read(fixture("tiny-llama-lora/adapter_model.safetensors")).unwrap();
    std::fs::write(dir.path().join("adapter_model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    let err = import_peft(&mut model, dir.path()).unwrap_err().to_string();
    assert!(err.contains("adapter_model.safetensors"), "{err}");
}
