//! Training and evaluation data: JSONL instruction records rendered through a prompt template (loss on the response
//! only), JSONL chat records rendered through the model's chat template (loss on the assistant turns only), or plain
//! text cut into token blocks; held-out splits and padded batches.

mod batch;
mod chat;
mod split;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use batch::{batches, split_holdout, Batch};
pub use split::Split;

use crate::tokenizer::Tokenizer;
use crate::train::IGNORE_INDEX;

/// Errors about data files and records.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A record is malformed (the message names the line and what is wrong).
    #[error("{path}:{line}: {reason}")]
    Record {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// Tokenization failed.
    #[error("{path}: tokenizer: {reason}")]
    Tokenize {
        /// The file.
        path: PathBuf,
        /// The cause.
        reason: String,
    },
    /// The settings are invalid, or the data gives nothing to train on.
    #[error("data: {0}")]
    Config(String),
    /// Examples cannot be split across clients as asked.
    #[error("data split: {0}")]
    Split(String),
}

/// How a data file is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataFormat {
    /// One JSON object per line: an instruction record (instruction, optional input, output, optional category)
    /// or a chat record (`messages`: [{"role", "content"}, ...], optional category).
    Jsonl,
    /// Plain text, tokenized whole and cut into blocks of `max_len` tokens.
    Text,
}

/// Data settings (`[data]` in a TOML config; unknown keys rejected).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// File format; by default from the extension (`.jsonl`/`.json` → JSONL, otherwise text).
    pub format: Option<DataFormat>,
    /// Longest example in tokens (instruction records are truncated, text is cut into blocks of this size).
    pub max_len: usize,
    /// JSONL field holding the instruction.
    pub instruction_field: String,
    /// JSONL field holding the optional input (context).
    pub input_field: String,
    /// JSONL field holding the response (the tokens the loss is computed on).
    pub output_field: String,
    /// JSONL field holding an optional category (for splits by category).
    pub category_field: String,
    /// JSONL field holding a conversation (`[{"role", "content"}, ...]`); a record with it is a chat record,
    /// rendered with the model's chat template, the loss on its assistant turns.
    pub messages_field: String,
    /// JSONL field holding the acceptable answers (an array of strings) that generated text is scored against;
    /// without it, the response field is the one reference.
    pub references_field: String,
    /// Prompt for records with an input; `{instruction}` and `{input}` are replaced.
    pub prompt_template: String,
    /// Prompt for records without an input.
    pub prompt_template_no_input: String,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            format: None,
            max_len: 256,
            instruction_field: "instruction".into(),
            input_field: "input".into(),
            output_field: "output".into(),
            category_field: "category".into(),
            messages_field: "messages".into(),
            references_field: "references".into(),
            prompt_template: "Below is an instruction that describes a task, paired with an input that provides \
                further context. Write a response that appropriately completes the request.\n\n\
                ### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
                .into(),
            prompt_template_no_input: "Below is an instruction that describes a task. Write a response that \
                appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
                .into(),
        }
    }
}

/// One evaluation prompt: what a model is asked to continue, and the answers its continuation is scored against.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptRecord {
    /// Token ids of the rendered prompt (BOS included), as in training.
    pub ids: Vec<u32>,
    /// Acceptable answers.
    pub references: Vec<String>,
    /// The record's category, when it has one.
    pub category: Option<String>,
}

/// A parsed, tokenized record.
struct Rendered {
    ids: Vec<u32>,
    /// Ids of the prompt a model continues (for a chat record: everything before its last assistant turn).
    prompt_len: usize,
    /// Chat records: per id, whether the loss counts it (assistant turns); instruction records: from `prompt_len`.
    in_loss: Option<Vec<bool>>,
    category: Option<String>,
    references: Vec<String>,
}

/// One tokenized example.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// Token ids.
    pub ids: Vec<u32>,
    /// Per position: the id itself where the loss counts, [`IGNORE_INDEX`] elsewhere (prompt tokens).
    pub labels: Vec<i64>,
    /// The record's category, when it has one.
    pub category: Option<String>,
}

impl DataConfig {
    /// Reads and tokenizes several data files, pooling their examples in order.
    pub fn load_all(&self, paths: &[PathBuf], tokenizer: &Tokenizer) -> Result<Vec<Example>, DataError> {
        let mut examples = Vec::new();
        for path in paths {
            examples.extend(self.load(path, tokenizer)?);
        }
        Ok(examples)
    }

    /// How `path` is read: `format`, or by its extension.
    fn format(&self, path: &Path) -> DataFormat {
        self.format
            .unwrap_or_else(|| match path.extension().and_then(|e| e.to_str()) {
                Some("jsonl" | "json") => DataFormat::Jsonl,
                _ => DataFormat::Text,
            })
    }

    /// Reads and tokenizes a data file.
    pub fn load(&self, path: &Path, tokenizer: &Tokenizer) -> Result<Vec<Example>, DataError> {
        if self.max_len < 2 {
            return Err(DataError::Config(format!(
                "max_len {} must be at least 2",
                self.max_len
            )));
        }
        let text = std::fs::read_to_string(path).map_err(|source| DataError::Io {
            path: path.into(),
            source,
        })?;
        let examples = match self.format(path) {
            DataFormat::Jsonl => self.instructions(path, &text, tokenizer)?,
            DataFormat::Text => self.blocks(path, &text, tokenizer)?,
        };
        if examples.is_empty() {
            return Err(DataError::Config(format!(
                "{}: no examples (file empty, or shorter than 2 tokens)",
                path.display()
            )));
        }
        Ok(examples)
    }

    fn instructions(&self, path: &Path, text: &str, tokenizer: &Tokenizer) -> Result<Vec<Example>, DataError> {
        Ok(self
            .records(path, text, tokenizer)?
            .into_iter()
            .map(|r| {
                let counts = |i: usize| match &r.in_loss {
                    Some(mask) => mask[i],
                    None => i >= r.prompt_len,
                };
                let labels = r
                    .ids
                    .iter()
                    .enumerate()
                    .map(|(i, &id)| if counts(i) { id as i64 } else { IGNORE_INDEX })
                    .collect();
                Example {
                    ids: r.ids,
                    labels,
                    category: r.category,
                }
            })
            .collect())
    }

    /// Reads a JSONL instruction file for evaluation by generation: each record's prompt (as training renders it)
    /// and its reference answers. The records are those [`DataConfig::load`] keeps, in the same order, so the
    /// n-th prompt is the n-th example's.
    pub fn load_prompts(&self, path: &Path, tokenizer: &Tokenizer) -> Result<Vec<PromptRecord>, DataError> {
        let text = std::fs::read_to_string(path).map_err(|source| DataError::Io {
            path: path.into(),
            source,
        })?;
        if self.format(path) != DataFormat::Jsonl {
            return Err(DataError::Config(format!(
                "{}: evaluation by generation needs JSONL instruction records (prompt and reference answers), not \
                 plain text",
                path.display()
            )));
        }
        Ok(self
            .records(path, &text, tokenizer)?
            .into_iter()
            .map(|mut r| {
                r.ids.truncate(r.prompt_len);
                PromptRecord {
                    ids: r.ids,
                    references: r.references,
                    category: r.category,
                }
            })
            .collect())
    }

    /// Several files' prompts, pooled in order (as [`DataConfig::load_all`]).
    pub fn load_all_prompts(&self, paths: &[PathBuf], tokenizer: &Tokenizer) -> Result<Vec<PromptRecord>, DataError> {
        let mut out = Vec::new();
        for path in paths {
            out.extend(self.load_prompts(path, tokenizer)?);
        }
        Ok(out)
    }

    /// The records of a JSONL file that leave something of the response within `max_len` tokens.
    fn records(&self, path: &Path, text: &str, tokenizer: &Tokenizer) -> Result<Vec<Rendered>, DataError> {
        let mut out = Vec::new();
        for (n, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let bad = |reason: String| DataError::Record {
                path: path.into(),
                line: n + 1,
                reason,
            };
            let record: serde_json::Value = serde_json::from_str(line).map_err(|e| bad(format!("not JSON: {e}")))?;
            let object = record.as_object().ok_or_else(|| bad("not a JSON object".into()))?;
            let field = |name: &str, required: bool| -> Result<Option<String>, DataError> {
                match object.get(name) {
                    None | Some(serde_json::Value::Null) if !required => Ok(None),
                    None => Err(bad(format!("missing field `{name}`"))),
                    Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
                    Some(other) => Err(bad(format!("field `{name}` must be a string, found {other}"))),
                }
            };
            let category = field(&self.category_field, false)?;
            let references = |fallback: &str| match object.get(&self.references_field) {
                None | Some(serde_json::Value::Null) => Ok(vec![fallback.to_string()]),
                Some(serde_json::Value::Array(items)) if !items.is_empty() => items
                    .iter()
                    .map(|v| v.as_str().map(str::to_string))
                    .collect::<Option<Vec<String>>>()
                    .ok_or_else(|| bad(format!("field `{}` must hold strings only", self.references_field))),
                Some(other) => Err(bad(format!(
                    "field `{}` must be a non-empty array of strings, found {other}",
                    self.references_field
                ))),
            };
            if let Some(value) = object.get(&self.messages_field).filter(|v| !v.is_null()) {
                let messages = chat::messages(value, &self.messages_field).map_err(&bad)?;
                let c = chat::render(&messages, tokenizer).map_err(|reason| DataError::Tokenize {
                    path: path.into(),
                    reason: format!("line {}: {reason}", n + 1),
                })?;
                let (mut ids, mut in_loss) = (c.ids, c.in_loss);
                ids.truncate(self.max_len);
                in_loss.truncate(self.max_len);
                if c.last_prompt_len >= ids.len() {
                    // The last assistant turn starts beyond max_len: as for instruction records, a record is kept
                    // only with its (last) response to learn from, so its prompt is a whole prompt.
                    continue;
                }
                out.push(Rendered {
                    ids,
                    prompt_len: c.last_prompt_len,
                    in_loss: Some(in_loss),
                    category,
                    references: references(&c.last_answer)?,
                });
                continue;
            }
            let instruction = field(&self.instruction_field, true)?.unwrap_or_default();
            let input = field(&self.input_field, false)?.unwrap_or_default();
            let output = field(&self.output_field, true)?.unwrap_or_default();
            let references = references(&output)?;
            let prompt = if input.trim().is_empty() {
                self.prompt_template_no_input.replace("{instruction}", &instruction)
            } else {
                self.prompt_template
                    .replace("{instruction}", &instruction)
                    .replace("{input}", &input)
            };
            let tok = |s: &str| {
                tokenizer.encode(s).map_err(|e| DataError::Tokenize {
                    path: path.into(),
                    reason: format!("line {}: {e}", n + 1),
                })
            };
            let mut ids: Vec<u32> = tokenizer.bos_id().into_iter().collect();
            ids.extend(tok(&prompt)?);
            let prompt_len = ids.len();
            ids.extend(tok(&output)?);
            ids.extend(tokenizer.eos_ids().first().copied());
            ids.truncate(self.max_len);
            if ids.len() <= prompt_len {
                // The prompt fills max_len: nothing of the response is left to learn from.
                continue;
            }
            out.push(Rendered {
                ids,
                prompt_len,
                in_loss: None,
                category,
                references,
            });
        }
        Ok(out)
    }

    fn blocks(&self, path: &Path, text: &str, tokenizer: &Tokenizer) -> Result<Vec<Example>, DataError> {
        let ids = tokenizer.encode(text).map_err(|e| DataError::Tokenize {
            path: path.into(),
            reason: e.to_string(),
        })?;
        Ok(ids
            .chunks(self.max_len)
            .filter(|c| c.len() >= 2)
            .map(|c| Example {
                ids: c.to_vec(),
                labels: c.iter().map(|&i| i as i64).collect(),
                category: None,
            })
            .collect())
    }
}
