//! Whole GGUF files: the tiny LLaMA fixture converted the way llama.cpp does (names, reversed dimensions, permuted
//! attn_q/attn_k, byte-level vocabulary) must give transformers' logits; truncated and corrupted files are errors.

use std::path::Path;

use burn::tensor::Device;
use offsite::load::{Checkpoint, Format};
use offsite_tests::{fixture, llama_cpp_permute, logits, max_abs_diff, write_gguf, Meta, Tensors};

/// GPT-2's byte → printable character map, as in its `bytes_to_unicode`.
fn byte_chars() -> Vec<char> {
    let mut printable: Vec<u32> = (0x21..=0x7e).chain(0xa1..=0xac).chain(0xae..=0xff).collect();
    let mut chars: Vec<u32> = printable.clone();
    let mut extra = 0;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            printable.push(b);
            chars.push(256 + extra);
            extra += 1;
        }
    }
    let mut out = vec![' '; 256];
    for (b, c) in printable.iter().zip(chars) {
        out[*b as usize] = char::from_u32(c).unwrap();
    }
    out
}

/// The tiny LLaMA as llama.cpp's converter would write it (all F32).
fn tiny_llama_gguf() -> Vec<u8> {
    let st = Tensors::read(&fixture("tiny-llama/model.safetensors"));
    let (heads, kv_heads) = (4, 2);
    let mut tensors = Vec::new();
    for name in st.names() {
        let shape = st.shape(&name);
        let mut data = st.f32(&name);
        let gguf = if name == "model.embed_tokens.weight" {
            "token_embd.weight".to_string()
        } else if name == "model.norm.weight" {
            "output_norm.weight".to_string()
        } else if name == "lm_head.weight" {
            "output.weight".to_string()
        } else {
            let (layer, part) = offsite::model::split_layer_name(&name).unwrap();
            let part = part.strip_suffix(".weight").unwrap();
            let short = match part {
                "input_layernorm" => "attn_norm",
                "post_attention_layernorm" => "ffn_norm",
                "self_attn.q_proj" => {
                    data = llama_cpp_permute(&data, shape[0], shape[1], heads);
                    "attn_q"
                }
                "self_attn.k_proj" => {
                    data = llama_cpp_permute(&data, shape[0], shape[1], kv_heads);
                    "attn_k"
                }
                "self_attn.v_proj" => "attn_v",
                "self_attn.o_proj" => "attn_output",
                "mlp.gate_proj" => "ffn_gate",
                "mlp.up_proj" => "ffn_up",
                "mlp.down_proj" => "ffn_down",
                other => panic!("unexpected tensor {other}"),
            };
            format!("blk.{layer}.{short}.weight")
        };
        tensors.push((gguf, shape, data));
    }
    let mut tokens: Vec<String> = byte_chars().iter().map(|c| c.to_string()).collect();
    tokens[0] = "<unk>".into();
    tokens[1] = "<s>".into();
    tokens[2] = "</s>".into();
    let types: Vec<i32> = (0..256).map(|i| if i < 3 { 3 } else { 1 }).collect();
    let meta = vec![
        ("general.architecture", Meta::Str("llama".into())),
        ("llama.context_length", Meta::U32(64)),
        ("llama.embedding_length", Meta::U32(64)),
        ("llama.feed_forward_length", Meta::U32(160)),
        ("llama.block_count", Meta::U32(2)),
        ("llama.attention.head_count", Meta::U32(heads as u32)),
        ("llama.attention.head_count_kv", Meta::U32(kv_heads as u32)),
        ("llama.rope.freq_base", Meta::F32(10000.0)),
        ("llama.attention.layer_norm_rms_epsilon", Meta::F32(1e-5)),
        ("tokenizer.ggml.model", Meta::Str("gpt2".into())),
        ("tokenizer.ggml.pre", Meta::Str("default".into())),
        ("tokenizer.ggml.tokens", Meta::Strs(tokens)),
        ("tokenizer.ggml.token_type", Meta::I32s(types)),
        ("tokenizer.ggml.merges", Meta::Strs(vec![])),
        ("tokenizer.ggml.bos_token_id", Meta::U32(1)),
        ("tokenizer.ggml.eos_token_id", Meta::U32(2)),
    ];
    write_gguf(&meta, &tensors)
}

fn write(dir: &Path, bytes: &[u8]) -> std::path::PathBuf {
    let path = dir.join("tiny.gguf");
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn converted_tiny_llama_matches_transformers() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), &tiny_llama_gguf());
    let checkpoint = Checkpoint::open(&path).unwrap();
    assert_eq!(checkpoint.format(), Format::Gguf);
    let c = checkpoint.config();
    assert_eq!(
        (c.head_dim, c.num_key_value_heads, c.tie_word_embeddings),
        (16, 2, false)
    );
    assert_eq!(c.eos_token_ids, vec![2]);
    let model = checkpoint.load_model(&Device::flex()).unwrap();
    let exp = Tensors::read(&fixture("tiny-llama/expected.safetensors"));
    for i in 0..3 {
        let diff = max_abs_diff(
            &logits(&model, &exp.i64(&format!("input_ids.{i}"))),
            &exp.f32(&format!("logits.{i}")),
        );
        assert!(diff < 1e-4, "case {i}: {diff}");
    }
    let tok = checkpoint.tokenizer().unwrap();
    // Byte-level: 'h' is byte 104, ' ' maps to 'Ġ' (byte 32); control tokens written in the text are recognised.
    assert_eq!(tok.encode("h i</s>").unwrap(), vec![104, 32, 105, 2]);
    assert_eq!(tok.decode(&[104, 32, 105], false).unwrap(), "h i");
}

#[test]
fn truncated_files_are_errors_never_panics() {
    let bytes = tiny_llama_gguf();
    let dir = tempfile::tempdir().unwrap();
    // Every length through the header and metadata, then a spread of lengths through the tensor data.
    let head = 6000;
    let lengths: Vec<usize> = (0..head)
        .chain((0..64).map(|k| head + k * (bytes.len() - head) / 64))
        .collect();
    for len in lengths.into_iter().filter(|&l| l < bytes.len()) {
        let path = write(dir.path(), &bytes[..len]);
        match Checkpoint::open(&path) {
            Err(e) => assert!(e.to_string().contains("tiny.gguf"), "length {len}: {e}"),
            Ok(c) => panic!(
                "length {len} of {} accepted ({} tensors)",
                bytes.len(),
                c.tensors().len()
            ),
        }
    }
}

#[test]
fn corrupted_files_never_panic() {
    let bytes = tiny_llama_gguf();
    let dir = tempfile::tempdir().unwrap();
    let mut state = 0x9e3779b97f4a7c15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut opened = 0;
    for _ in 0..300 {
        let mut b = bytes.clone();
        // Corrupt the header and metadata region, where structure lives.
        for _ in 0..4 {
            let i = (next() as usize) % 6000.min(b.len());
            b[i] = next() as u8;
        }
        let path = write(dir.path(), &b);
        if let Ok(c) = Checkpoint::open(&path) {
            opened += 1;
            let _ = c.load_model(&Device::flex());
            if let Ok(t) = c.tokenizer() {
                let _ = t.encode("hello");
            }
        }
    }
    // Most corruptions land in token strings and still open; what matters is that none panicked.
    assert!(opened > 0);
}

#[test]
fn unsupported_architecture_is_named() {
    let mut bytes = tiny_llama_gguf();
    let at = bytes.windows(5).position(|w| w == b"llama").unwrap();
    bytes[at..at + 5].copy_from_slice(b"gpt2x");
    let dir = tempfile::tempdir().unwrap();
    let err = Checkpoint::open(&write(dir.path(), &bytes)).err().unwrap().to_string();
    assert!(err.contains("gpt2x") && err.contains("tiny.gguf"), "{err}");
}
