//! Builds a Hugging Face `tokenizers` tokenizer from GGUF `tokenizer.ggml.*` metadata.
//!
//! The tokenizer is expressed as the `tokenizer.json` Hugging Face itself would ship for that model (BPE model,
//! pre-tokenizer chosen by `tokenizer.ggml.pre`, control tokens as special added tokens), so ids match Hugging Face.

use std::collections::BTreeMap;

use serde_json::{json, Value as Json};

use super::Value;
use crate::model::LlamaConfig;
use crate::tokenizer::{Tokenizer, TokenizerError};

/// Split regex of LLaMA 3's `tokenizer.json`.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Split regex of Qwen2's `tokenizer.json` (single digits).
const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GGUF token types.
const TOKEN_NORMAL: u64 = 1;
const TOKEN_UNKNOWN: u64 = 2;
const TOKEN_CONTROL: u64 = 3;
const TOKEN_USER_DEFINED: u64 = 4;
const TOKEN_BYTE: u64 = 6;

fn err(msg: impl Into<String>) -> TokenizerError {
    TokenizerError::Build(msg.into())
}

fn strings<'a>(meta: &'a BTreeMap<String, Value>, key: &str) -> Result<Vec<&'a str>, TokenizerError> {
    let array = meta
        .get(key)
        .and_then(Value::as_array)
        .ok_or_else(|| err(format!("GGUF metadata lacks `{key}`")))?;
    array
        .iter()
        .map(|v| v.as_str().ok_or_else(|| err(format!("`{key}` holds a non-string"))))
        .collect()
}

pub(crate) fn build(meta: &BTreeMap<String, Value>, config: &LlamaConfig) -> Result<Tokenizer, TokenizerError> {
    let model = meta.get("tokenizer.ggml.model").and_then(Value::as_str).unwrap_or("");
    let tokens = strings(meta, "tokenizer.ggml.tokens")?;
    let types: Vec<u64> = match meta.get("tokenizer.ggml.token_type").and_then(Value::as_array) {
        Some(a) => a.iter().map(|v| v.as_u64().unwrap_or(TOKEN_NORMAL)).collect(),
        None => vec![TOKEN_NORMAL; tokens.len()],
    };
    if types.len() != tokens.len() {
        return Err(err(format!("{} token types for {} tokens", types.len(), tokens.len())));
    }
    let mut vocab = serde_json::Map::with_capacity(tokens.len());
    for (id, t) in tokens.iter().enumerate() {
        vocab.insert((*t).to_string(), json!(id));
    }
    let added: Vec<Json> = tokens
        .iter()
        .zip(&types)
        .enumerate()
        .filter(|(_, (_, &ty))| ty == TOKEN_CONTROL || ty == TOKEN_USER_DEFINED || ty == TOKEN_UNKNOWN)
        .map(|(id, (t, &ty))| {
            json!({"id": id, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": ty == TOKEN_USER_DEFINED, "special": ty != TOKEN_USER_DEFINED})
        })
        .collect();
    let spec = match model {
        "gpt2" => {
            let merges = strings(meta, "tokenizer.ggml.merges")?;
            let pre = meta
                .get("tokenizer.ggml.pre")
                .and_then(Value::as_str)
                .unwrap_or("default");
            let (normalizer, pre_tokenizer, ignore_merges) = byte_level_pre(pre)?;
            json!({
                "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
                "normalizer": normalizer, "pre_tokenizer": pre_tokenizer, "post_processor": null,
                "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
                "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                          "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                          "ignore_merges": ignore_merges, "vocab": vocab, "merges": merges}
            })
        }
        "llama" => {
            let scores: Vec<f64> = match meta.get("tokenizer.ggml.scores").and_then(Value::as_array) {
                Some(a) => a.iter().map(|v| v.as_f64().unwrap_or(0.0)).collect(),
                None => return Err(err("SentencePiece GGUF tokenizer lacks `tokenizer.ggml.scores`")),
            };
            if scores.len() != tokens.len() {
                return Err(err(format!("{} scores for {} tokens", scores.len(), tokens.len())));
            }
            let merges = sentencepiece_merges(&tokens, &types, &scores);
            let add_space = meta
                .get("tokenizer.ggml.add_space_prefix")
                .and_then(Value::as_bool)
                .unwrap_or(true);
            let unk = meta
                .get("tokenizer.ggml.unknown_token_id")
                .and_then(Value::as_u64)
                .and_then(|i| tokens.get(i as usize))
                .map(|s| s.to_string());
            let mut normalizers = vec![];
            if add_space {
                normalizers.push(json!({"type": "Prepend", "prepend": "▁"}));
            }
            normalizers.push(json!({"type": "Replace", "pattern": {"String": " "}, "content": "▁"}));
            let mut decoders = vec![
                json!({"type": "Replace", "pattern": {"String": "▁"}, "content": " "}),
                json!({"type": "ByteFallback"}),
                json!({"type": "Fuse"}),
            ];
            if add_space {
                decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
            }
            json!({
                "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
                "normalizer": {"type": "Sequence", "normalizers": normalizers},
                "pre_tokenizer": null, "post_processor": null,
                "decoder": {"type": "Sequence", "decoders": decoders},
                "model": {"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
                          "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true,
                          "ignore_merges": false, "vocab": vocab, "merges": merges}
            })
        }
        other => {
            return Err(err(format!(
                "GGUF tokenizer model `{other}` (supported: gpt2 BPE, llama SentencePiece)"
            )))
        }
    };
    let inner = tokenizers::Tokenizer::from_bytes(spec.to_string().as_bytes())
        .map_err(|e| err(format!("GGUF tokenizer rejected: {e}")))?;
    let template = meta
        .get("tokenizer.chat_template")
        .and_then(Value::as_str)
        .map(str::to_string);
    let token = |k: &str| {
        meta.get(&format!("tokenizer.ggml.{k}"))
            .and_then(Value::as_u64)
            .map(|x| x as u32)
    };
    Tokenizer::from_parts(
        inner,
        template,
        token("bos_token_id").or(config.bos_token_id),
        config.eos_token_ids.clone(),
    )
}

/// `(normalizer, pre_tokenizer, ignore_merges)` for llama.cpp's pre-tokenizer names of byte-level BPE models.
fn byte_level_pre(pre: &str) -> Result<(Json, Json, bool), TokenizerError> {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split = |pattern: &str| json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false});
    Ok(match pre {
        "default" | "gpt-2" | "gpt2" => (Json::Null, byte_level(true), false),
        "smollm" | "starcoder" | "refact" => (
            Json::Null,
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
            false,
        ),
        "llama3" | "llama-bpe" | "llama-v3" => (
            Json::Null,
            json!({"type": "Sequence", "pretokenizers": [split(LLAMA3_SPLIT), byte_level(false)]}),
            true,
        ),
        "qwen2" => (
            json!({"type": "NFC"}),
            json!({"type": "Sequence", "pretokenizers": [split(QWEN2_SPLIT), byte_level(false)]}),
            false,
        ),
        other => {
            return Err(err(format!(
                "GGUF pre-tokenizer `{other}` (supported: default, gpt-2, smollm, starcoder, llama-bpe, qwen2)"
            )))
        }
    })
}

/// BPE merges implied by a SentencePiece vocabulary, as Hugging Face's `SentencePieceExtractor` derives them: every
/// split of a piece into two pieces of the vocabulary, ranked by the merged piece's score (highest first).
fn sentencepiece_merges(tokens: &[&str], types: &[u64], scores: &[f64]) -> Vec<Json> {
    let ids: BTreeMap<&str, usize> = tokens.iter().enumerate().map(|(i, t)| (*t, i)).collect();
    let mut merges: Vec<(f64, usize, usize, usize)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        if types[id] != TOKEN_NORMAL && types[id] != TOKEN_USER_DEFINED {
            continue;
        }
        for (split, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(split);
            if let (Some(&li), Some(&ri)) = (ids.get(l), ids.get(r)) {
                if types[li] != TOKEN_BYTE && types[ri] != TOKEN_BYTE {
                    merges.push((scores[id], id, li, ri));
                }
            }
        }
    }
    merges.sort_by(|a, b| {
        b.0.total_cmp(&a.0)
            .then(a.1.cmp(&b.1))
            .then(a.2.cmp(&b.2))
            .then(a.3.cmp(&b.3))
    });
    merges
        .into_iter()
        .map(|(_, _, l, r)| json!([tokens[l], tokens[r]]))
        .collect()
}
