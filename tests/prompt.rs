//! Prompt tuning, P-tuning and prefix tuning: gradients against finite differences, training on an int8 emulator
//! with everything but the prompt encoder frozen, save / plug-in by name, PEFT export and import, config errors.

use std::collections::HashMap;

use burn::tensor::{Device, Int, Tensor, TensorData};
use offsite::adapters::{self, export_peft_prompt, AdapterManifest, AdapterSpec, Method, PromptConfig};
use offsite::data::Example;
use offsite::emulator::Emulator;
use offsite::load::Checkpoint;
use offsite::model::LlamaForCausalLM;
use offsite::train::{causal_lm_loss, evaluate, TrainConfig, TrainJob, Trainer};
use offsite_tests::{fixture, logits, max_abs_diff, tiny_emulator, word_tokenizer};

/// Tests here seed the backend's global RNG and then draw initial values; running them one at a time keeps every
/// run's initial values (and so its numbers) the same.
static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn prompt(n: usize, hidden: Option<usize>, projection: bool) -> PromptConfig {
    PromptConfig {
        num_virtual_tokens: n,
        init_text: None,
        encoder_hidden_size: hidden,
        prefix_projection: projection,
    }
}

/// Every prompt-learning variant: method and settings.
fn variants() -> Vec<(&'static str, AdapterSpec)> {
    let spec = |method, p| AdapterSpec {
        method,
        lora: None,
        prompt: Some(p),
    };
    vec![
        ("prompt tuning", spec(Method::PromptTuning, prompt(4, None, false))),
        ("p-tuning", spec(Method::PTuning, prompt(4, Some(16), false))),
        ("prefix tuning", spec(Method::PrefixTuning, prompt(3, None, false))),
        (
            "prefix tuning + projection",
            spec(Method::PrefixTuning, prompt(3, Some(16), true)),
        ),
    ]
}

/// Sixteen short sequences from a fixed pattern, the first 3 tokens a prompt (ignored).
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

fn values(model: &LlamaForCausalLM) -> HashMap<String, Vec<f32>> {
    model
        .named_params()
        .into_iter()
        .map(|p| (p.name, p.value.into_data().convert::<f32>().try_into_vec().unwrap()))
        .collect()
}

fn loss(model: &LlamaForCausalLM, ids: &[i64], labels: &[i64]) -> Tensor<1> {
    let x = Tensor::<2, Int>::from_data(TensorData::new(ids.to_vec(), [1, ids.len()]), &model.device());
    causal_lm_loss(model.forward(x, None, None).unwrap(), &[labels.to_vec()]).unwrap()
}

#[test]
fn prompt_encoder_gradients_match_finite_differences() {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let ids = [5i64, 9, 33, 100, 2, 17, 64];
    let labels = [-100i64, -100, 33, 100, 2, 17, 64];
    let all_layers = [0usize, 1];
    for (label, spec) in variants() {
        let device = Device::flex().autodiff();
        device.seed(7);
        let base = Checkpoint::open(&fixture("tiny-llama"))
            .unwrap()
            .load_model(&device)
            .unwrap();
        let (model, _) = spec.prepare(base, &all_layers, None).unwrap();
        let grads = loss(&model, &ids, &labels).backward();
        let grads: HashMap<String, Vec<f32>> = model
            .named_grads(&grads)
            .into_iter()
            .map(|(n, g)| (n, g.into_data().try_into_vec().unwrap()))
            .collect();
        let mut names: Vec<&String> = grads.keys().collect();
        names.sort();
        assert!(
            !names.is_empty() && names.iter().all(|n| n.starts_with("prompt_encoder.")),
            "{label}: {names:?}"
        );
        let plain = model.without_autodiff();
        let current = values(&plain);
        for name in names {
            let g = &grads[name];
            // The three largest components of this parameter's gradient, by central differences.
            let mut order: Vec<usize> = (0..g.len()).collect();
            order.sort_by(|&a, &b| g[b].abs().total_cmp(&g[a].abs()));
            for &i in &order[..3] {
                let eps = 1e-2f32;
                let at = |delta: f32| {
                    let mut v = current[name].clone();
                    v[i] += delta;
                    let n = v.len();
                    let mut map = HashMap::from([(
                        name.clone(),
                        Tensor::<1>::from_data(TensorData::new(v, [n]), &plain.device()),
                    )]);
                    let m = plain.clone().replace_params(&mut map);
                    assert!(map.is_empty());
                    loss(&m, &ids, &labels).into_scalar::<f32>() as f64
                };
                let numeric = (at(eps) - at(-eps)) / (2.0 * eps as f64);
                let rel = (numeric - g[i] as f64).abs() / (g[i] as f64).abs().max(1e-3);
                assert!(
                    rel < 2e-2,
                    "{label} {name}[{i}]: autodiff {} vs numeric {numeric:.6} (rel {rel:.2e})",
                    g[i]
                );
            }
        }
    }
}

#[test]
fn each_method_trains_on_the_int8_emulator_and_plugs_into_the_full_model() {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let (model_dir, emu_path) = tiny_emulator(dir.path());
    let emu = Emulator::open(&emu_path).unwrap();
    let layers = emu.manifest().adapter_layers.clone();
    let data = examples();
    let full = || {
        Checkpoint::open(&model_dir)
            .unwrap()
            .load_model(&Device::flex())
            .unwrap()
    };
    let probe = [5i64, 9, 33, 100];
    let base_full = logits(&full(), &probe);
    for (label, spec) in variants() {
        let device = Device::flex().autodiff();
        device.seed(3);
        let (model, _) = spec.prepare(emu.load_model(&device).unwrap(), &layers, None).unwrap();
        let trainable: Vec<String> = model
            .named_params()
            .into_iter()
            .filter(|p| p.trainable)
            .map(|p| p.name)
            .collect();
        assert!(
            trainable.iter().all(|n| n.starts_with("prompt_encoder.")),
            "{label}: {trainable:?}"
        );
        let before = values(&model);
        let loss_before = evaluate(&model.without_autodiff(), &data, 8).unwrap().loss;
        let config = TrainConfig {
            steps: 12,
            batch_size: 8,
            lr: 3e-2,
            warmup_steps: 1,
            ..Default::default()
        };
        let trained = Trainer::new(config).unwrap().run(model, &data, &mut |_| {}).unwrap();
        let loss_after = evaluate(&trained.without_autodiff(), &data, 8).unwrap().loss;
        eprintln!("{label}: loss {loss_before:.4} → {loss_after:.4}");
        assert!(
            loss_after < loss_before - 0.05,
            "{label}: loss {loss_before} → {loss_after}"
        );
        for (name, v) in values(&trained) {
            let changed = max_abs_diff(&v, &before[&name]) > 0.0;
            assert_eq!(
                changed,
                name.starts_with("prompt_encoder."),
                "{label}: `{name}` changed: {changed}"
            );
        }

        // Saved and applied by name to a fresh emulator: the same model.
        let out = dir.path().join(label.replace(' ', "-"));
        let manifest = AdapterManifest::for_emulator(spec.method, &emu);
        adapters::save(&out, &trained, &manifest, None).unwrap();
        let reloaded = adapters::apply(emu.load_model(&Device::flex()).unwrap(), &out).unwrap();
        let d = max_abs_diff(&logits(&reloaded, &probe), &logits(&trained.without_autodiff(), &probe));
        assert!(d < 1e-5, "{label}: reloaded adapter differs by {d}");

        // Plugged into the full model: prefixes land on the adapter layers by name, and the output changes.
        let plugged = adapters::apply(full(), &out).unwrap();
        let enc = plugged.prompt_encoder.as_ref().unwrap();
        if spec.method == Method::PrefixTuning {
            assert_eq!(enc.layers(), layers.as_slice());
        }
        assert!(
            max_abs_diff(&logits(&plugged, &probe), &base_full) > 1e-4,
            "{label}: plug-in changed nothing"
        );
    }
}

#[test]
fn peft_export_and_import_of_prompt_adapters_round_trip() {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let probe = [5i64, 9, 33, 100, 2];
    for (label, spec) in variants() {
        let device = Device::flex();
        device.seed(11);
        let base = Checkpoint::open(&fixture("tiny-llama"))
            .unwrap()
            .load_model(&device)
            .unwrap();
        let (model, _) = spec.prepare(base, &[0, 1], None).unwrap();
        let out = dir.path().join(label.replace(' ', "-"));
        export_peft_prompt(&model, Some("tiny-llama"), &out).unwrap();
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
        let (peft_type, token_dim) = match spec.method {
            Method::PromptTuning => ("PROMPT_TUNING", 64),
            Method::PTuning => ("P_TUNING", 64),
            _ => ("PREFIX_TUNING", 32),
        };
        assert_eq!(config["peft_type"], peft_type, "{label}");
        assert_eq!(config["token_dim"], token_dim, "{label}");
        assert_eq!(config["inference_mode"], true, "{label}");
        let n = spec.prompt.as_ref().unwrap().num_virtual_tokens;
        let st = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&st).unwrap();
        let width = if spec.method == Method::PrefixTuning {
            2 * 2 * 32
        } else {
            64
        };
        assert_eq!(st.tensor("prompt_embeddings").unwrap().shape(), &[n, width], "{label}");
        let fresh = Checkpoint::open(&fixture("tiny-llama"))
            .unwrap()
            .load_model(&Device::flex())
            .unwrap();
        let imported = adapters::apply(fresh, &out).unwrap();
        let d = max_abs_diff(&logits(&imported, &probe), &logits(&model, &probe));
        assert!(d < 1e-5, "{label}: PEFT round trip differs by {d}");
    }
    // PEFT prefixes every layer: a prefix on some layers is refused with the reason.
    let device = Device::flex();
    let base = Checkpoint::open(&fixture("tiny-llama"))
        .unwrap()
        .load_model(&device)
        .unwrap();
    let spec = &variants()[2].1;
    let (model, _) = spec.prepare(base, &[1], None).unwrap();
    let err = export_peft_prompt(&model, None, &dir.path().join("partial"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("prefixes layers [1]"), "{err}");
}

#[test]
fn init_text_starts_the_virtual_tokens_at_its_embeddings() {
    let dir = tempfile::tempdir().unwrap();
    let (model_dir, _) = tiny_emulator(dir.path());
    word_tokenizer(&model_dir);
    let checkpoint = Checkpoint::open(&model_dir).unwrap();
    let tokenizer = checkpoint.tokenizer().unwrap();
    let model = checkpoint.load_model(&Device::flex()).unwrap();
    let table = values(&model)["model.embed_tokens.weight"].clone();
    let mut config = prompt(5, None, false);
    config.init_text = Some("w5 w9".into());
    let spec = AdapterSpec {
        method: Method::PromptTuning,
        lora: None,
        prompt: Some(config),
    };
    let (model, _) = spec.prepare(model, &[], Some(&tokenizer)).unwrap();
    let got = &values(&model)["prompt_encoder.embedding.weight"];
    let expected: Vec<f32> = [5usize, 9, 5, 9, 5]
        .iter()
        .flat_map(|&i| table[i * 64..(i + 1) * 64].to_vec())
        .collect();
    assert_eq!(got, &expected);
    // Without a tokenizer the text cannot be used: an error, not a silent random start.
    let model = checkpoint.load_model(&Device::flex()).unwrap();
    let err = spec.prepare(model, &[], None).unwrap_err().to_string();
    assert!(err.contains("init_text"), "{err}");
}

#[test]
fn prompt_configs_are_checked() {
    let parse = |text: &str| TrainJob::from_toml(text).map_err(|e| e.to_string());
    let job =
        parse("[adapter]\nmethod = \"p_tuning\"\n[adapter.prompt]\nnum_virtual_tokens = 8\nencoder_hidden_size = 32\n")
            .unwrap();
    assert_eq!(job.adapter.method, Method::PTuning);
    let err =
        parse("[adapter]\nmethod = \"prefix_tuning\"\n[adapter.prompt]\nnum_virtual_tokens = 8\nprefix_proj = true\n")
            .unwrap_err();
    assert!(err.contains("prefix_proj"), "{err}");
    let err = parse("[adapter]\nmethod = \"prompt_tuning\"\n").unwrap_err();
    assert!(err.contains("[adapter.prompt]"), "{err}");
    let err =
        parse("[adapter]\nmethod = \"prefix_tuning\"\n[adapter.prompt]\nnum_virtual_tokens = 8\ninit_text = \"Hi\"\n")
            .unwrap_err();
    assert!(err.contains("init_text"), "{err}");
    let device = Device::flex();
    let model = || {
        Checkpoint::open(&fixture("tiny-llama"))
            .unwrap()
            .load_model(&device)
            .unwrap()
    };
    let missing = AdapterSpec {
        method: Method::PromptTuning,
        lora: None,
        prompt: None,
    };
    let err = missing.prepare(model(), &[0], None).unwrap_err().to_string();
    assert!(err.contains("[adapter.prompt]"), "{err}");
    let mut bad = prompt(0, None, false);
    let spec = |p: PromptConfig, m| AdapterSpec {
        method: m,
        lora: None,
        prompt: Some(p),
    };
    let err = spec(bad.clone(), Method::PromptTuning)
        .prepare(model(), &[0], None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("num_virtual_tokens"), "{err}");
    bad.num_virtual_tokens = 4;
    bad.prefix_projection = true;
    let err = spec(bad, Method::PTuning)
        .prepare(model(), &[0], None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("prefix_projection"), "{err}");
    let err = spec(prompt(4, None, false), Method::PrefixTuning)
        .prepare(model(), &[7], None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("[7]"), "{err}");
}
