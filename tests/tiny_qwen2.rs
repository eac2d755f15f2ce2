//! The tiny Qwen2 fixture (q/k/v bias, untied LM head, grouped-query attention, `rope_parameters` as transformers 5
//! writes them) against transformers' reference logits: a second architecture beside tiny-llama.

use burn::tensor::Device;
use offsite::load::Checkpoint;
use offsite::model::LlamaForCausalLM;
use offsite_tests::{assert_cached_decoding, assert_fixture_logits, fixture, Tensors};

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
    assert_fixture_logits(&model(), &expected());
}

#[test]
fn kv_cache_decoding_matches_the_reference() {
    assert_cached_decoding(&model(), &expected(), 5);
}
