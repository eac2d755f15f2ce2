//! The tiny LLaMA fixture (Hugging Face layout) against transformers' reference logits.

use burn::tensor::{Device, Int, Tensor, TensorData};
use offsite::load::{Checkpoint, LoadError};
use offsite::model::LlamaForCausalLM;
use offsite_tests::{assert_cached_decoding, assert_fixture_logits, fixture, logits, max_abs_diff, Tensors};

fn model() -> LlamaForCausalLM {
    Checkpoint::open(&fixture("tiny-llama"))
        .unwrap()
        .load_model(&Device::flex())
        .unwrap()
}

fn expected() -> Tensors {
    Tensors::read(&fixture("tiny-llama/expected.safetensors"))
}

#[test]
fn logits_match_transformers_for_every_case() {
    assert_fixture_logits(&model(), &expected());
}

/// Rows of unequal length in one batch, left- and right-padded: every real position matches the reference.
#[test]
fn padded_batches_match_unpadded_reference() {
    let model = model();
    let exp = expected();
    let short = exp.i64("input_ids.1");
    let long = exp.i64("input_ids.2");
    let vocab = 256;
    for left in [true, false] {
        let pad = long.len() - short.len();
        let mut row0 = vec![0i64; pad];
        let mut mask0 = vec![false; pad];
        if left {
            row0.extend(&short);
            mask0.extend(vec![true; short.len()]);
        } else {
            row0 = [short.clone(), vec![0; pad]].concat();
            mask0 = [vec![true; short.len()], vec![false; pad]].concat();
        }
        let ids = [row0, long.clone()].concat();
        let mask = vec![mask0, vec![true; long.len()]];
        let input = Tensor::<2, Int>::from_data(TensorData::new(ids, [2, long.len()]), &Device::flex());
        let out: Vec<f32> = model
            .forward(input, Some(&mask), None)
            .unwrap()
            .into_data()
            .try_into_vec()
            .unwrap();
        let row = |r: usize, from: usize, n: usize| {
            let start = (r * long.len() + from) * vocab;
            out[start..start + n * vocab].to_vec()
        };
        let offset = if left { pad } else { 0 };
        let d0 = max_abs_diff(&row(0, offset, short.len()), &exp.f32("logits.1"));
        let d1 = max_abs_diff(&row(1, 0, long.len()), &exp.f32("logits.2"));
        assert!(d0 < 1e-4 && d1 < 1e-4, "left={left}: diffs {d0} {d1}");
    }
}

/// Prefill then one token at a time through the KV cache gives the reference logits.
#[test]
fn kv_cache_decoding_matches_full_forward() {
    assert_cached_decoding(&model(), &expected(), 7);
}

fn copy_fixture(dir: &std::path::Path) {
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture("tiny-llama").join(f), dir.join(f)).unwrap();
    }
}

/// Writes `config` into `dir` and returns the error loading the model gives.
fn load_with_config(dir: &std::path::Path, config: &str) -> LoadError {
    std::fs::write(dir.join("config.json"), config).unwrap();
    Checkpoint::open(dir).unwrap().load_model(&Device::flex()).unwrap_err()
}

#[test]
fn wrong_shapes_missing_tensors_and_truncation_are_named_errors() {
    let dir = tempfile::tempdir().unwrap();
    copy_fixture(dir.path());
    // A config that disagrees with the weights: the error names the tensor and both shapes.
    let config = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
    let err = load_with_config(
        dir.path(),
        &config.replace("\"intermediate_size\": 160", "\"intermediate_size\": 128"),
    );
    assert!(
        matches!(&err, LoadError::Shape { tensor, .. } if tensor.ends_with("mlp.gate_proj.weight")),
        "{err}"
    );
    // One layer more than the file holds: the first missing tensor is named.
    let err = load_with_config(
        dir.path(),
        &config.replace("\"num_hidden_layers\": 2", "\"num_hidden_layers\": 3"),
    );
    assert!(
        matches!(&err, LoadError::MissingTensor { tensor, .. } if tensor == "model.layers.2.input_layernorm.weight"),
        "{err}"
    );
    // Truncated weights at several lengths: errors naming the file, never a panic.
    std::fs::write(dir.path().join("config.json"), &config).unwrap();
    let full = std::fs::read(fixture("tiny-llama/model.safetensors")).unwrap();
    for len in [0, 7, 8, 100, full.len() / 2, full.len() - 1] {
        std::fs::write(dir.path().join("model.safetensors"), &full[..len]).unwrap();
        let err = Checkpoint::open(dir.path())
            .err()
            .unwrap_or_else(|| panic!("length {len} accepted"));
        assert!(err.to_string().contains("model.safetensors"), "{err}");
    }
    // Garbage header.
    let mut bad = full.clone();
    bad[8..24].copy_from_slice(b"{\"x\":[1,2,3]}   ");
    std::fs::write(dir.path().join("model.safetensors"), &bad).unwrap();
    assert!(Checkpoint::open(dir.path()).is_err());
    // Unsupported architecture named.
    std::fs::write(
        dir.path().join("config.json"),
        config.replace("\"model_type\": \"llama\"", "\"model_type\": \"gpt_neox\""),
    )
    .unwrap();
    let err = Checkpoint::open(dir.path()).err().unwrap().to_string();
    assert!(err.contains("gpt_neox") && err.contains("config.json"), "{err}");
}

#[test]
fn out_of_vocabulary_ids_are_rejected() {
    let model = model();
    assert!(model.check_ids(&[1, 2, 255]).is_ok());
    assert!(model.check_ids(&[256]).unwrap_err().to_string().contains("256"));
}

/// A sharded checkpoint (`model.safetensors.index.json`) with f32, f16 and bf16 shards loads and runs.
#[test]
fn sharded_half_precision_checkpoint_loads() {
    use safetensors::tensor::TensorView;
    use safetensors::Dtype;
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(fixture("tiny-llama/config.json"), dir.path().join("config.json")).unwrap();
    let st = Tensors::read(&fixture("tiny-llama/model.safetensors"));
    let names = st.names();
    let mut weight_map = serde_json::Map::new();
    let encodings: [(&str, Dtype); 3] = [("f32", Dtype::F32), ("f16", Dtype::F16), ("bf16", Dtype::BF16)];
    for (shard, (label, dtype)) in encodings.iter().enumerate() {
        let file = format!("model-{label}.safetensors");
        let mine: Vec<&String> = names
            .iter()
            .enumerate()
            .filter(|(i, _)| i % 3 == shard)
            .map(|(_, n)| n)
            .collect();
        let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = mine
            .iter()
            .map(|n| {
                let values = st.f32(n);
                let raw: Vec<u8> = match dtype {
                    Dtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
                    Dtype::F16 => values
                        .iter()
                        .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                        .collect(),
                    _ => values
                        .iter()
                        .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                        .collect(),
                };
                weight_map.insert(n.to_string(), serde_json::json!(file));
                (n.to_string(), raw, st.shape(n))
            })
            .collect();
        let views: Vec<(String, TensorView)> = bytes
            .iter()
            .map(|(n, raw, shape)| (n.clone(), TensorView::new(*dtype, shape.clone(), raw).unwrap()))
            .collect();
        safetensors::serialize_to_file(views, None, &dir.path().join(&file)).unwrap();
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(dir.path().join("model.safetensors.index.json"), index.to_string()).unwrap();
    let checkpoint = Checkpoint::open(dir.path()).unwrap();
    let dtypes: std::collections::BTreeSet<String> = checkpoint.tensors().into_iter().map(|t| t.dtype).collect();
    assert_eq!(dtypes.into_iter().collect::<Vec<_>>(), vec!["BF16", "F16", "F32"]);
    let model = checkpoint.load_model(&Device::flex()).unwrap();
    let exp = expected();
    let diff = max_abs_diff(&logits(&model, &exp.i64("input_ids.2")), &exp.f32("logits.2"));
    // bf16 keeps 8 bits of mantissa: the logits move, but only by rounding of the weights.
    assert!(diff < 5e-2, "max |diff| {diff}");
    // A shard named in the index but absent is an error naming it.
    std::fs::remove_file(dir.path().join("model-f16.safetensors")).unwrap();
    let err = Checkpoint::open(dir.path()).err().unwrap().to_string();
    assert!(err.contains("model-f16.safetensors"), "{err}");
}
