//! SmolLM2-135M-Instruct (Q4_1 GGUF) against transformers' reference: tokenizer ids, chat template, logits, top-10
//! ids at every position and 24 greedy chat tokens (alone, and batched with other prompts).

use std::sync::OnceLock;

use burn::tensor::Device;
use offsite::data::DataConfig;
use offsite::generate::{generate, greedy_batch, GenerationConfig};
use offsite::load::Checkpoint;
use offsite::model::LlamaForCausalLM;
use offsite::tokenizer::{ChatMessage, Tokenizer};
use offsite_tests::{fixture, logits, smollm2_gguf, Tensors};

struct Loaded {
    model: LlamaForCausalLM,
    tokenizer: Tokenizer,
}

fn loaded() -> &'static Loaded {
    static LOADED: OnceLock<Loaded> = OnceLock::new();
    LOADED.get_or_init(|| {
        let checkpoint = Checkpoint::open(&smollm2_gguf()).unwrap();
        Loaded {
            model: checkpoint.load_model(&Device::flex()).unwrap(),
            tokenizer: checkpoint.tokenizer().unwrap(),
        }
    })
}

fn expected_json() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("smollm2/expected.json")).unwrap()).unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn tokenizer_ids_are_exact() {
    let exp = expected_json();
    let tok = &loaded().tokenizer;
    for case in exp["tokenizer"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(tok.encode(text).unwrap(), ids(&case["ids"]), "text {text:?}");
        assert_eq!(tok.decode(&ids(&case["ids"]), false).unwrap(), text);
    }
}

/// The tokenizer as `export --format merged` writes it (tokenizer.json + tokenizer_config.json) reads back the same.
#[test]
fn exported_tokenizer_round_trips() {
    let exp = expected_json();
    let tok = &loaded().tokenizer;
    let config = Checkpoint::open(&smollm2_gguf()).unwrap().config().clone();
    let back = Tokenizer::from_hf(&tok.to_json().unwrap(), Some(&tok.tokenizer_config_json()), &config).unwrap();
    for case in exp["tokenizer"].as_array().unwrap() {
        assert_eq!(back.encode(case["text"].as_str().unwrap()).unwrap(), ids(&case["ids"]));
    }
    let messages = [ChatMessage::user("What is the capital of France?")];
    assert_eq!(
        back.apply_chat_template(&messages, true).unwrap(),
        exp["chat_prompt"].as_str().unwrap()
    );
    assert_eq!(back.eos_ids(), tok.eos_ids());
}

#[test]
fn chat_template_matches_reference() {
    let exp = expected_json();
    let tok = &loaded().tokenizer;
    let prompt = tok
        .apply_chat_template(&[ChatMessage::user("What is the capital of France?")], true)
        .unwrap();
    assert_eq!(prompt, exp["chat_prompt"].as_str().unwrap());
    assert_eq!(tok.encode(&prompt).unwrap(), ids(&exp["chat_prompt_ids"]));
}

/// `|ours − ref| / max(|ref|, 1)`: relative where logits are large, absolute near zero.
fn worst_relative(ours: &[f32], reference: &[f32]) -> f32 {
    ours.iter()
        .zip(reference)
        .map(|(a, b)| (a - b).abs() / b.abs().max(1.0))
        .fold(0.0, f32::max)
}

#[test]
fn logits_and_top10_match_reference() {
    let exp = Tensors::read(&fixture("smollm2/expected.safetensors"));
    let model = &loaded().model;
    let vocab = 49152;
    for i in 0..2 {
        let input = exp.i64(&format!("input_ids.{i}"));
        let all = logits(model, &input);
        let last = &all[(input.len() - 1) * vocab..];
        let worst = worst_relative(last, &exp.f32(&format!("last_logits.{i}")));
        eprintln!("prompt {i}: worst relative last-logit difference {worst:.2e}");
        assert!(worst < 1e-3, "prompt {i}: {worst}");
        let ref_ids = exp.i64(&format!("top10_ids.{i}"));
        let ref_logits = exp.f32(&format!("top10_logits.{i}"));
        for p in 0..input.len() {
            let row = &all[p * vocab..(p + 1) * vocab];
            let mut order: Vec<usize> = (0..vocab).collect();
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
            for r in 0..10 {
                let (want, got) = (ref_ids[p * 10 + r] as usize, order[r]);
                if want != got {
                    // Only a tie (equal logits up to float noise) may swap ranks.
                    let gap = (row[got] - ref_logits[p * 10 + r]).abs();
                    assert!(
                        gap < 1e-3 * ref_logits[p * 10 + r].abs().max(1.0),
                        "prompt {i} pos {p} rank {r}: {got} vs {want}"
                    );
                }
            }
        }
    }
}

#[test]
fn greedy_chat_generation_is_exact() {
    let exp = expected_json();
    let Loaded { model, tokenizer } = loaded();
    let prompt = ids(&exp["chat_prompt_ids"]);
    let config = GenerationConfig {
        max_new_tokens: 24,
        ..Default::default()
    };
    let out = generate(model, &prompt, tokenizer.eos_ids(), &config).unwrap();
    assert_eq!(out, ids(&exp["greedy_24_ids"]));
    assert_eq!(
        tokenizer.decode(&out, false).unwrap(),
        exp["greedy_24_text"].as_str().unwrap()
    );
}

/// Batched greedy decoding (left padding, length bucketing, one cache per batch) gives every row what decoding it
/// alone gives, and transformers' 24 greedy tokens for the reference prompt among prompts of other lengths; the
/// prompts of a JSONL file are its training examples' prompt tokens, with their reference answers.
#[test]
fn batched_greedy_matches_one_by_one_and_the_reference() {
    let exp = expected_json();
    let Loaded { model, tokenizer } = loaded();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qa.jsonl");
    std::fs::write(
        &path,
        concat!(
            r#"{"instruction": "Name a colour.", "output": "Blue.", "references": ["Blue.", "red"]}"#,
            "\n",
            r#"{"instruction": "Answer the question.", "input": "What is two plus two?", "output": "Four."}"#,
            "\n"
        ),
    )
    .unwrap();
    let data = DataConfig::default();
    let examples = data.load(&path, tokenizer).unwrap();
    let records = data.load_prompts(&path, tokenizer).unwrap();
    assert_eq!(records.len(), 2);
    for (e, r) in examples.iter().zip(&records) {
        let prompt_len = e.labels.iter().take_while(|&&l| l < 0).count();
        assert_eq!(r.ids, e.ids[..prompt_len]);
    }
    assert_eq!(records[0].references, ["Blue.", "red"]);
    assert_eq!(records[1].references, ["Four."]);
    std::fs::write(&path, r#"{"instruction": "x", "output": "y", "references": [1]}"#).unwrap();
    let err = data.load_prompts(&path, tokenizer).unwrap_err().to_string();
    assert!(err.contains(":1:") && err.contains("references"), "{err}");

    let chat = ids(&exp["chat_prompt_ids"]);
    let mut prompts: Vec<Vec<u32>> = records.into_iter().map(|r| r.ids).collect();
    prompts.insert(1, chat.clone());
    prompts.push(chat[..chat.len() / 2].to_vec());
    let config = GenerationConfig {
        max_new_tokens: 24,
        ..Default::default()
    };
    let alone: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| generate(model, p, tokenizer.eos_ids(), &config).unwrap())
        .collect();
    assert_eq!(alone[1], ids(&exp["greedy_24_ids"]));
    for batch in [1, 3, 4] {
        let out = greedy_batch(model, &prompts, tokenizer.eos_ids(), 24, batch).unwrap();
        assert_eq!(out, alone, "batch {batch}");
    }
    assert!(greedy_batch(model, &[vec![]], &[], 4, 2).is_err());
}

/// Chat records: rendered by the model's template (the prompt of the last assistant turn equals transformers'
/// `apply_chat_template(..., add_generation_prompt=True)` ids), the loss on each assistant turn and its end of turn
/// only.
#[test]
fn chat_records_train_on_the_assistant_turns_only() {
    let exp = expected_json();
    let tokenizer = &loaded().tokenizer;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("chat.jsonl");
    let turn = |role: &str, content: &str| serde_json::json!({"role": role, "content": content});
    let one = serde_json::json!({"messages": [
        turn("user", "What is the capital of France?"), turn("assistant", "Paris."),
    ], "category": "geo"});
    let two = serde_json::json!({"messages": [
        turn("user", "Name a colour."), turn("assistant", "Blue."),
        turn("user", "Another?"), turn("assistant", "Red, or green."),
    ]});
    std::fs::write(&path, format!("{one}\n{two}\n")).unwrap();
    let data = DataConfig::default();
    let examples = data.load(&path, tokenizer).unwrap();
    let records = data.load_prompts(&path, tokenizer).unwrap();
    assert_eq!(
        records[0].ids,
        ids(&exp["chat_prompt_ids"]),
        "the prompt as transformers renders it"
    );
    assert_eq!(records[0].references, ["Paris."]);
    assert_eq!(records[0].category.as_deref(), Some("geo"));
    assert_eq!(records[1].references, ["Red, or green."]);
    let runs = |labels: &[i64]| {
        let mut runs: Vec<Vec<u32>> = Vec::new();
        let mut last = None;
        for (i, &l) in labels.iter().enumerate() {
            if l >= 0 {
                if last != Some(i.wrapping_sub(1)) {
                    runs.push(Vec::new());
                }
                runs.last_mut().unwrap().push(l as u32);
                last = Some(i);
            }
        }
        runs.iter()
            .map(|r| tokenizer.decode(r, false).unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(runs(&examples[0].labels), ["Paris.<|im_end|>\n"]);
    assert_eq!(
        runs(&examples[1].labels),
        ["Blue.<|im_end|>\n", "Red, or green.<|im_end|>\n"]
    );
    assert_eq!(
        examples[1].ids,
        tokenizer
            .encode(
                &tokenizer
                    .apply_chat_template(
                        &serde_json::from_value::<Vec<ChatMessage>>(two["messages"].clone()).unwrap(),
                        false
                    )
                    .unwrap()
            )
            .unwrap()
    );
    for (e, r) in examples.iter().zip(&records) {
        assert_eq!(r.ids, e.ids[..r.ids.len()], "the prompt is the example's beginning");
    }

    std::fs::write(&path, r#"{"messages": [{"role": "user", "content": "hi"}]}"#).unwrap();
    let err = data.load(&path, tokenizer).unwrap_err().to_string();
    assert!(err.contains(":1:") && err.contains("assistant"), "{err}");
    std::fs::write(&path, r#"{"messages": [{"role": "user", "content": 3}]}"#).unwrap();
    let err = data.load(&path, tokenizer).unwrap_err().to_string();
    assert!(err.contains("content"), "{err}");
}
