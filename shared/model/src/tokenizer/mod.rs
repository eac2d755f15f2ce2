//! Text ↔ token ids (Hugging Face `tokenizers`) and the model's chat template (rendered with minijinja).

mod chat;
mod stream;

pub use chat::ChatMessage;
pub use stream::{StreamStep, TextStream};

/// Errors from tokenization or chat templating.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TokenizerError {
    /// The tokenizer description is invalid or unsupported.
    #[error("cannot build tokenizer: {0}")]
    Build(String),
    /// Text could not be encoded or ids could not be decoded.
    #[error("tokenization failed: {0}")]
    Encode(String),
    /// The chat template is invalid or failed to render.
    #[error("chat template: {0}")]
    Template(String),
}

/// Token ids and each id's byte range in the text they encode.
pub type IdsAndOffsets = (Vec<u32>, Vec<(usize, usize)>);

/// A tokenizer with the special ids and chat template of its model.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    chat_template: Option<String>,
    bos_id: Option<u32>,
    eos_ids: Vec<u32>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos_id", &self.bos_id)
            .field("eos_ids", &self.eos_ids)
            .field("chat_template", &self.chat_template.is_some())
            .finish()
    }
}

impl Tokenizer {
    pub(crate) fn from_parts(
        inner: tokenizers::Tokenizer,
        chat_template: Option<String>,
        bos_id: Option<u32>,
        eos_ids: Vec<u32>,
    ) -> Result<Self, TokenizerError> {
        if let Some(t) = &chat_template {
            chat::check(t)?;
        }
        Ok(Self {
            inner,
            chat_template,
            bos_id,
            eos_ids,
        })
    }

    /// From a `tokenizer.json`, with the chat template and EOS token of `tokenizer_config.json` when given.
    pub fn from_hf(
        tokenizer_json: &str,
        tokenizer_config: Option<&serde_json::Value>,
        config: &crate::model::LlamaConfig,
    ) -> Result<Self, TokenizerError> {
        // tokenizers 0.23 panics (an `expect` in its decoder's deserializer) on a syntax error inside `decoder`
        // (found by fuzz/model_files): the JSON is checked to be well-formed first.
        serde_json::from_str::<serde::de::IgnoredAny>(tokenizer_json)
            .map_err(|e| TokenizerError::Build(format!("tokenizer.json is not JSON: {e}")))?;
        let inner = tokenizers::Tokenizer::from_bytes(tokenizer_json.as_bytes())
            .map_err(|e| TokenizerError::Build(format!("tokenizer.json: {e}")))?;
        let template = tokenizer_config
            .and_then(|c| c.get("chat_template"))
            .and_then(|t| t.as_str());
        let mut eos_ids = config.eos_token_ids.clone();
        let named = |key: &str| {
            tokenizer_config
                .and_then(|c| c.get(key))
                .and_then(|v| v.as_str().or_else(|| v.get("content").and_then(|c| c.as_str())))
                .and_then(|t| inner.token_to_id(t))
        };
        if let Some(id) = named("eos_token") {
            if !eos_ids.contains(&id) {
                eos_ids.push(id);
            }
        }
        let bos_id = config.bos_token_id.or_else(|| named("bos_token"));
        Self::from_parts(inner, template.map(str::to_string), bos_id, eos_ids)
    }

    /// Ids of `text`; special tokens written in the text (like `<|im_end|>`) are recognised, no BOS is added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// [`Tokenizer::encode`] with each id's byte range in `text`.
    pub fn encode_with_offsets(&self, text: &str) -> Result<IdsAndOffsets, TokenizerError> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }

    /// Text of `ids`; special tokens are kept unless `skip_special`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, TokenizerError> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| TokenizerError::Encode(e.to_string()))
    }

    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Beginning-of-sequence id, if the model has one.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// Ids that end generation.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// The model's chat template, if it ships one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// The tokenizer as a Hugging Face `tokenizer.json`.
    pub fn to_json(&self) -> Result<String, TokenizerError> {
        self.inner
            .to_string(false)
            .map_err(|e| TokenizerError::Build(e.to_string()))
    }

    /// A Hugging Face `tokenizer_config.json`: special tokens and chat template.
    pub fn tokenizer_config_json(&self) -> serde_json::Value {
        let token = |id: Option<u32>| id.and_then(|i| self.inner.id_to_token(i));
        serde_json::json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": token(self.bos_id),
            "eos_token": token(self.eos_ids.first().copied()),
            "chat_template": self.chat_template,
        })
    }

    /// Renders `messages` with the model's chat template (ChatML when the model has none).
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, TokenizerError> {
        let token = |id: Option<u32>| id.and_then(|i| self.inner.id_to_token(i)).unwrap_or_default();
        let special = chat::SpecialTokens {
            bos_token: token(self.bos_id),
            eos_token: token(self.eos_ids.first().copied()),
        };
        match &self.chat_template {
            Some(t) => chat::render(t, messages, add_generation_prompt, &special),
            None => chat::render(chat::CHATML, messages, add_generation_prompt, &special),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_syntax_error_inside_the_decoder_is_an_error_not_a_panic() {
        let config = crate::model::LlamaConfig::from_hf_json(
            r#"{"model_type": "llama", "vocab_size": 4, "hidden_size": 8, "intermediate_size": 8,
                "num_hidden_layers": 1, "num_attention_heads": 1}"#,
        )
        .unwrap();
        let good = r#"{"version": "1.0", "model": {"type": "WordLevel", "vocab": {"a": 0, "<unk>": 1},
            "unk_token": "<unk>"}, "decoder": {"type": "Fuse"}}"#;
        assert!(Tokenizer::from_hf(good, None, &config).is_ok());
        // The fuzzer's find: the decoder's value cut short (tokenizers 0.23 `expect`s it to parse).
        let bad = good.replace(r#"{"type": "Fuse"}"#, r#"{"type" "Fuse"}"#);
        let Err(e) = Tokenizer::from_hf(&bad, None, &config) else {
            panic!("a broken decoder was accepted")
        };
        assert!(e.to_string().contains("not JSON"), "{e}");
    }
}
