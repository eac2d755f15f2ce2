//! The tiny Qwen2 fixture (q/k/v bias, untied LM head, grouped-query attention, `rope_parameters` as transformers 5
//! writes them) against transformers' reference logits: a second architecture beside tiny-llama.

use burn::tensor::{Device, Int, Tensor, TensorData};
use offsite::load::Checkpoint;
use offsite::model::{KvCache, LlamaForCausalLM};
use offsite_tests::{fixture, logits, max_abs_diff, Tensors};

fn model() -> LlamaForCausalLM {
    Checkpoint::open(&fixture("tiny-qwen2"))
        .unwrap()
        .load_model(&Device::flex())
        .unwrap()
}

fn expected() -> Tensors {
    Tensors::read(&fixture("tiny-qwen2/expected.safetensors"))
}

#[test]
fn the_config_is_read_as_transformers_reads_it() {
    let checkpoint = Checkpoint::open(&fixture("tiny-qwen2")).unwrap();
    let c = checkpoint.config();
    assert_eq!(c.model_type, "qwen2");
    assert!(c.attention_bias, "Qwen2 has q/k/v biases");
    assert!(!c.tie_word_embeddings);
    assert_eq!((c.num_attention_heads, c.num_key_value_heads), (4, 2));
    assert_eq!(c.rope_theta, 1e6, "from rope_parameters");
}

#[test]
fn logits_match_transformers_for_every_case() {
    let model = model();
    let exp = expected();
    for i in 0..3 {
        let ids = exp.i64(&format!("input_ids.{i}"));
        let want = exp.f32(&format!("logits.{i}"));
        let got = logits(&model, &ids);
        let diff = max_abs_diff(&got, &want);
        assert!(diff < 1e-4, "case {i} (len {}): max |diff| {diff}", ids.len());
    }
}

#[test]
fn kv_cache_decoding_matches_the_reference() {
    let model = model();
    let exp = expected();
    let ids = exp.i64("input_ids.2");
    let want = exp.f32("logits.2");
    let mut cache = KvCache::new(2, 1);
    let mut got = Vec::new();
    let mut step = |chunk: &[i64]| {
        let input = Tensor::<2, Int>::from_data(TensorData::new(chunk.to_vec(), [1, chunk.len()]), &Device::flex());
        let out: Vec<f32> = model
            .forward(input, None, Some(&mut cache))
            .unwrap()
            .into_data()
            .try_into_vec()
            .unwrap();
        got.extend(out);
    };
    step(&ids[..5]);
    for id in &ids[5..] {
        step(std::slice::from_ref(id));
    }
    assert_eq!(cache.len(), ids.len());
    let diff = max_abs_diff(&got, &want);
    assert!(diff < 1e-4, "max |diff| {diff}");
}
