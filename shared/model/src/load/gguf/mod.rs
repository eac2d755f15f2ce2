//! GGUF v2/v3 files: metadata, tensor directory, dequantization and the tokenizer stored in the metadata.
//!
//! Tensors are served under Hugging Face names in Hugging Face shapes: GGUF stores dimensions fastest-first (they
//! are reversed here) and llama.cpp's converter permutes the rows of `attn_q`/`attn_k` of LLaMA models for its RoPE
//! layout (undone here).

mod quant;
mod vocab;

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::reader::Cursor;
use super::{F32Tensor, LoadError, TensorInfo, TensorSource};
use crate::model::{LlamaConfig, RopeScaling};
use crate::tokenizer::{Tokenizer, TokenizerError};

pub(crate) use quant::GgmlType;

const MAGIC: &[u8; 4] = b"GGUF";
/// Longest string accepted in metadata (token strings, chat templates): 16 MiB.
const MAX_STRING: usize = 16 << 20;
/// Most dimensions a tensor may have.
const MAX_DIMS: u32 = 4;

/// A metadata value.
#[derive(Debug, Clone)]
pub(crate) enum Value {
    UInt(u64),
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
}

impl Value {
    pub(crate) fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::UInt(x) => Some(x),
            Value::Int(x) => u64::try_from(x).ok(),
            _ => None,
        }
    }

    pub(crate) fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::Float(x) => Some(x),
            Value::UInt(x) => Some(x as f64),
            Value::Int(x) => Some(x as f64),
            _ => None,
        }
    }

    pub(crate) fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub(crate) fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub(crate) fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// Where one tensor lives in the file.
#[derive(Debug, Clone)]
struct GgufTensor {
    gguf_name: String,
    /// Hugging Face shape (GGUF's dimensions reversed).
    shape: Vec<usize>,
    ty: GgmlType,
    /// Absolute byte range in the file.
    start: usize,
    len: usize,
}

/// A memory-mapped GGUF file.
pub(crate) struct GgufSource {
    path: PathBuf,
    map: Mmap,
    metadata: BTreeMap<String, Value>,
    /// Hugging Face name → tensor.
    tensors: BTreeMap<String, GgufTensor>,
    arch: String,
}

fn format_err(path: &Path, reason: impl Into<String>) -> LoadError {
    LoadError::Format {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

impl GgufSource {
    pub(crate) fn open(path: &Path) -> Result<Self, LoadError> {
        let file = File::open(path).map_err(|source| LoadError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        // SAFETY: read-only private map; the file is not modified while loading.
        let map = unsafe { Mmap::map(&file) }.map_err(|source| LoadError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let (metadata, directory) = parse(&map).map_err(|reason| format_err(path, reason))?;
        let arch = metadata
            .get("general.architecture")
            .and_then(Value::as_str)
            .ok_or_else(|| format_err(path, "no `general.architecture` in the metadata"))?
            .to_string();
        let mut tensors = BTreeMap::new();
        for t in directory {
            let hf = hf_name(&t.gguf_name).unwrap_or_else(|| t.gguf_name.clone());
            tensors.insert(hf, t);
        }
        Ok(Self {
            path: path.to_path_buf(),
            map,
            metadata,
            tensors,
            arch,
        })
    }

    fn meta(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    fn arch_usize(&self, key: &str) -> Result<usize, LoadError> {
        let full = format!("{}.{key}", self.arch);
        self.meta(&full)
            .and_then(Value::as_u64)
            .map(|x| x as usize)
            .ok_or_else(|| format_err(&self.path, format!("metadata `{full}` is missing or not an integer")))
    }

    /// The architecture, from the `{arch}.*` metadata keys and the tensors present.
    pub(crate) fn config(&self) -> Result<LlamaConfig, LoadError> {
        let model_type = match self.arch.as_str() {
            "llama" | "mistral" => "llama",
            "qwen2" => "qwen2",
            other => {
                return Err(LoadError::Model {
                    path: self.path.clone(),
                    source: crate::model::ModelError::Unsupported(format!(
                        "GGUF architecture `{other}` (supported: llama, mistral, qwen2)"
                    )),
                })
            }
        };
        let a = &self.arch;
        let hidden_size = self.arch_usize("embedding_length")?;
        let num_attention_heads = self.arch_usize("attention.head_count")?;
        let num_key_value_heads = self
            .arch_usize("attention.head_count_kv")
            .unwrap_or(num_attention_heads);
        let vocab_size = match self.arch_usize("vocab_size") {
            Ok(v) => v,
            Err(_) => self
                .tensors
                .get("model.embed_tokens.weight")
                .map(|t| t.shape[0])
                .ok_or_else(|| format_err(&self.path, "cannot tell the vocabulary size"))?,
        };
        let head_dim = self
            .arch_usize("attention.key_length")
            .or_else(|_| self.arch_usize("rope.dimension_count"))
            .unwrap_or(hidden_size / num_attention_heads.max(1));
        let f = |k: &str| self.meta(&format!("{a}.{k}")).and_then(Value::as_f64);
        let rope_scaling = if let Some(t) = self.tensors.get("rope_freqs.weight") {
            Some(RopeScaling::Factors {
                factors: self.read_gguf(t)?.data,
            })
        } else {
            match self.meta(&format!("{a}.rope.scaling.type")).and_then(Value::as_str) {
                None | Some("none") => None,
                Some("linear") => Some(RopeScaling::Linear {
                    factor: f("rope.scaling.factor").unwrap_or(1.0),
                }),
                Some(other) => {
                    return Err(LoadError::Model {
                        path: self.path.clone(),
                        source: crate::model::ModelError::Unsupported(format!("GGUF rope scaling `{other}`")),
                    })
                }
            }
        };
        let token = |k: &str| {
            self.meta(&format!("tokenizer.ggml.{k}"))
                .and_then(Value::as_u64)
                .map(|x| x as u32)
        };
        let mut eos_token_ids: Vec<u32> = [token("eos_token_id"), token("eot_token_id")]
            .into_iter()
            .flatten()
            .collect();
        eos_token_ids.dedup();
        let config = LlamaConfig {
            model_type: model_type.into(),
            vocab_size,
            hidden_size,
            intermediate_size: self.arch_usize("feed_forward_length")?,
            num_hidden_layers: self.arch_usize("block_count")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: f("attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
            rope_theta: f("rope.freq_base").unwrap_or(10_000.0),
            rope_scaling,
            max_position_embeddings: self.arch_usize("context_length").unwrap_or(2048),
            tie_word_embeddings: !self.tensors.contains_key("lm_head.weight"),
            attention_bias: self.tensors.contains_key("model.layers.0.self_attn.q_proj.bias"),
            bos_token_id: token("bos_token_id"),
            eos_token_ids,
        };
        config.validate().map_err(|source| LoadError::Model {
            path: self.path.clone(),
            source,
        })?;
        Ok(config)
    }

    /// The tokenizer described by the `tokenizer.ggml.*` metadata.
    pub(crate) fn tokenizer(&self, config: &LlamaConfig) -> Result<Tokenizer, TokenizerError> {
        vocab::build(&self.metadata, config)
    }

    fn read_gguf(&self, t: &GgufTensor) -> Result<F32Tensor, LoadError> {
        let bytes = &self.map[t.start..t.start + t.len];
        let numel = t.shape.iter().product();
        let data = quant::dequantize(t.ty, bytes, numel)
            .map_err(|reason| format_err(&self.path, format!("tensor `{}`: {reason}", t.gguf_name)))?;
        Ok(F32Tensor {
            data,
            shape: t.shape.clone(),
        })
    }

    /// Heads whose rows llama.cpp permuted in this tensor, if any.
    fn permuted_heads(&self, hf: &str) -> Option<usize> {
        if self.arch != "llama" {
            return None;
        }
        let key = if hf.ends_with("self_attn.q_proj.weight") || hf.ends_with("self_attn.q_proj.bias") {
            "attention.head_count"
        } else if hf.ends_with("self_attn.k_proj.weight") || hf.ends_with("self_attn.k_proj.bias") {
            "attention.head_count_kv"
        } else {
            return None;
        };
        self.arch_usize(key)
            .ok()
            .or_else(|| self.arch_usize("attention.head_count").ok())
    }
}

impl TensorSource for GgufSource {
    fn path(&self) -> &Path {
        &self.path
    }

    fn infos(&self) -> Vec<TensorInfo> {
        self.tensors
            .iter()
            .map(|(name, t)| TensorInfo {
                name: name.clone(),
                dtype: t.ty.name(),
                shape: t.shape.clone(),
                bytes: t.len,
            })
            .collect()
    }

    fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    fn read(&self, name: &str) -> Result<F32Tensor, LoadError> {
        let t = self.tensors.get(name).ok_or_else(|| LoadError::MissingTensor {
            path: self.path.clone(),
            tensor: name.into(),
        })?;
        if !t.ty.is_supported() {
            return Err(LoadError::UnsupportedType {
                path: self.path.clone(),
                tensor: t.gguf_name.clone(),
                dtype: t.ty.name(),
            });
        }
        let mut out = self.read_gguf(t)?;
        if let Some(heads) = self.permuted_heads(name) {
            out.data = unpermute_rows(&out.data, &out.shape, heads)
                .map_err(|reason| format_err(&self.path, format!("tensor `{}`: {reason}", t.gguf_name)))?;
        }
        Ok(out)
    }
}

/// Undoes llama.cpp's `permute(w, n_head)`: within each head, GGUF row `2i + j` is Hugging Face row `j·(d/2) + i`.
pub(crate) fn unpermute_rows(data: &[f32], shape: &[usize], heads: usize) -> Result<Vec<f32>, String> {
    let rows = shape[0];
    let cols: usize = shape[1..].iter().product();
    if heads == 0 || !rows.is_multiple_of(heads) || !(rows / heads).is_multiple_of(2) {
        return Err(format!("{rows} rows cannot be split into {heads} heads of even width"));
    }
    if rows.checked_mul(cols) != Some(data.len()) {
        return Err(format!("{} values do not fill {rows} rows of {cols}", data.len()));
    }
    if data.is_empty() {
        // No values to move: a file may claim 2^29 rows of width 0, and walking them costs minutes for nothing.
        return Ok(Vec::new());
    }
    let d = rows / heads;
    let half = d / 2;
    let mut out = vec![0.0; data.len()];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let src = h * d + 2 * i + j;
                let dst = h * d + j * half + i;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&data[src * cols..(src + 1) * cols]);
            }
        }
    }
    Ok(out)
}

/// Hugging Face name of a llama.cpp tensor name.
fn hf_name(gguf: &str) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.into());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (part, kind) = rest.rsplit_once('.')?;
    let hf = match part {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

/// Parses the header, metadata and tensor directory; checks every tensor lies inside the file.
fn parse(bytes: &[u8]) -> Result<(BTreeMap<String, Value>, Vec<GgufTensor>), String> {
    let mut c = Cursor::new(bytes);
    if c.take(4, "magic")? != MAGIC {
        return Err("not a GGUF file (bad magic)".into());
    }
    let version = c.u32("version")?;
    if !(2..=3).contains(&version) {
        return Err(format!("GGUF version {version} (supported: 2, 3)"));
    }
    // A tensor entry takes at least 8 (name length) + 4 + 8 + 4 + 8 bytes; a metadata pair at least 8 + 4 + 1.
    let n_tensors = c.count(32, "tensor count")?;
    let n_kv = c.count(13, "metadata count")?;
    let mut metadata = BTreeMap::new();
    for _ in 0..n_kv {
        let key = string(&mut c, "metadata key")?;
        let ty = c.u32("metadata type")?;
        let value = value(&mut c, ty, &key, 0)?;
        metadata.insert(key, value);
    }
    let mut raw = Vec::with_capacity(n_tensors);
    for _ in 0..n_tensors {
        let name = string(&mut c, "tensor name")?;
        let n_dims = c.u32("tensor rank")?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(format!("tensor `{name}` has {n_dims} dimensions"));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            let d = c.u64("tensor dimension")?;
            dims.push(usize::try_from(d).map_err(|_| format!("tensor `{name}` dimension {d} too large"))?);
        }
        let ty = GgmlType::from_id(c.u32("tensor type")?);
        let offset = c.u64("tensor offset")?;
        raw.push((name, dims, ty, offset));
    }
    let alignment = match metadata.get("general.alignment") {
        Some(v) => v
            .as_u64()
            .filter(|a| *a > 0 && a.is_power_of_two())
            .ok_or("bad general.alignment")? as usize,
        None => 32,
    };
    let data_start = c.position().div_ceil(alignment) * alignment;
    let data_len = bytes
        .len()
        .checked_sub(data_start)
        .ok_or("truncated before the tensor data")?;
    let mut tensors = Vec::with_capacity(raw.len());
    for (name, dims, ty, offset) in raw {
        let numel = dims
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| format!("tensor `{name}` has too many elements"))?;
        let len = ty
            .byte_len(dims[0], numel)
            .map_err(|e| format!("tensor `{name}`: {e}"))?;
        let start = usize::try_from(offset).map_err(|_| format!("tensor `{name}` offset too large"))?;
        if start.checked_add(len).is_none_or(|end| end > data_len) {
            return Err(format!(
                "tensor `{name}` ({len} bytes at offset {start}) runs past the end of the data section ({data_len} bytes): truncated file?"
            ));
        }
        let shape = dims.iter().rev().copied().collect();
        tensors.push(GgufTensor {
            gguf_name: name,
            shape,
            ty,
            start: data_start + start,
            len,
        });
    }
    Ok((metadata, tensors))
}

fn string(c: &mut Cursor, what: &str) -> Result<String, String> {
    let n = c.count(1, what)?;
    if n > MAX_STRING {
        return Err(format!("{what} of {n} bytes exceeds the {MAX_STRING}-byte limit"));
    }
    String::from_utf8(c.take(n, what)?.to_vec()).map_err(|_| format!("{what} is not UTF-8"))
}

fn value(c: &mut Cursor, ty: u32, key: &str, depth: u32) -> Result<Value, String> {
    let what = key;
    Ok(match ty {
        0 => Value::UInt(c.u8(what)? as u64),
        1 => Value::Int(c.u8(what)? as i8 as i64),
        2 => Value::UInt(u16::from_le_bytes(c.take(2, what)?.try_into().expect("2")) as u64),
        3 => Value::Int(i16::from_le_bytes(c.take(2, what)?.try_into().expect("2")) as i64),
        4 => Value::UInt(c.u32(what)? as u64),
        5 => Value::Int(c.u32(what)? as i32 as i64),
        6 => Value::Float(f32::from_bits(c.u32(what)?) as f64),
        7 => Value::Bool(c.u8(what)? != 0),
        8 => Value::Str(string(c, what)?),
        9 => {
            if depth > 0 {
                return Err(format!("metadata `{key}`: nested arrays are not supported"));
            }
            let elem = c.u32(what)?;
            let min = match elem {
                0 | 1 | 7 => 1,
                2 | 3 => 2,
                4..=6 => 4,
                8 | 10..=12 => 8,
                _ => return Err(format!("metadata `{key}`: unknown array element type {elem}")),
            };
            let n = c.count(min, what)?;
            let mut items = Vec::with_capacity(n);
            for _ in 0..n {
                items.push(value(c, elem, key, depth + 1)?);
            }
            Value::Array(items)
        }
        10 => Value::UInt(c.u64(what)?),
        11 => Value::Int(c.u64(what)? as i64),
        12 => Value::Float(f64::from_bits(c.u64(what)?)),
        other => return Err(format!("metadata `{key}` has unknown type {other}")),
    })
}

#[cfg(test)]
mod tests;
