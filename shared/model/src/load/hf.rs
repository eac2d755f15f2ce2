//! Hugging Face checkpoint directories: `config.json`, `model.safetensors` or a sharded
//! `model.safetensors.index.json`, f32/f16/bf16 tensors, memory-mapped.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::tensor::{Dtype, Metadata};

use super::reader::{bf16s, f16s, f32s};
use super::{F32Tensor, LoadError, TensorInfo, TensorSource};
use crate::model::LlamaConfig;
use crate::tokenizer::{Tokenizer, TokenizerError};

/// One memory-mapped safetensors file and its parsed header (every tensor's byte range checked on open).
pub(crate) struct Shard {
    pub(crate) path: PathBuf,
    map: Mmap,
    data_start: usize,
    pub(crate) metadata: Metadata,
}

/// All shards of a checkpoint, with a tensor-name → shard index.
pub(crate) struct SafetensorsSource {
    dir: PathBuf,
    shards: Vec<Shard>,
    index: BTreeMap<String, usize>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> LoadError + '_ {
    move |source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn format_err(path: &Path, reason: impl Into<String>) -> LoadError {
    LoadError::Format {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Reads `config.json` and maps the weights.
pub(crate) fn open(dir: &Path) -> Result<(LlamaConfig, SafetensorsSource), LoadError> {
    let config_path = dir.join("config.json");
    let text = std::fs::read_to_string(&config_path).map_err(io_err(&config_path))?;
    let config = LlamaConfig::from_hf_json(&text).map_err(|source| LoadError::Model {
        path: config_path.clone(),
        source,
    })?;
    let source = SafetensorsSource::open(dir)?;
    Ok((config, source))
}

impl SafetensorsSource {
    pub(crate) fn open(dir: &Path) -> Result<Self, LoadError> {
        let index_path = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index_path.exists() {
            let text = std::fs::read_to_string(&index_path).map_err(io_err(&index_path))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| format_err(&index_path, format!("not JSON: {e}")))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| format_err(&index_path, "no `weight_map` object"))?;
            let mut names: Vec<&str> = map.values().filter_map(|f| f.as_str()).collect();
            names.sort_unstable();
            names.dedup();
            for name in &names {
                if name.contains('/') || name.contains('\\') || name.starts_with('.') {
                    return Err(format_err(
                        &index_path,
                        format!("shard name `{name}` must be a plain file name"),
                    ));
                }
            }
            names.into_iter().map(|n| dir.join(n)).collect()
        } else {
            vec![dir.join("model.safetensors")]
        };
        let mut shards = Vec::with_capacity(files.len());
        let mut index = BTreeMap::new();
        for (i, path) in files.into_iter().enumerate() {
            let shard = Shard::open(path)?;
            for name in shard.metadata.tensors().keys() {
                if index.insert(name.clone(), i).is_some() {
                    return Err(format_err(
                        &shard.path,
                        format!("tensor `{name}` appears in two shards"),
                    ));
                }
            }
            shards.push(shard);
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            shards,
            index,
        })
    }
}

impl Shard {
    pub(crate) fn open(path: PathBuf) -> Result<Self, LoadError> {
        let file = File::open(&path).map_err(io_err(&path))?;
        // SAFETY: the map is read-only and private to this process; the file is not modified while loading.
        let map = unsafe { Mmap::map(&file) }.map_err(io_err(&path))?;
        let (header_len, metadata) = safetensors::SafeTensors::read_metadata(&map[..])
            .map_err(|e| format_err(&path, format!("bad safetensors header: {e}")))?;
        let data_start = 8 + header_len;
        let data_len = map.len().saturating_sub(data_start);
        for (name, info) in metadata.tensors() {
            let (start, end) = info.data_offsets;
            if start > end || end > data_len {
                return Err(format_err(
                    &path,
                    format!("tensor `{name}` spans bytes {start}..{end} but the data section has {data_len}"),
                ));
            }
        }
        Ok(Self {
            path,
            map,
            data_start,
            metadata,
        })
    }
}

impl Shard {
    /// A tensor's dtype, shape and bytes (length checked against the shape).
    pub(crate) fn raw(&self, name: &str) -> Result<(Dtype, &[usize], &[u8]), LoadError> {
        let info = self.metadata.info(name).ok_or_else(|| LoadError::MissingTensor {
            path: self.path.clone(),
            tensor: name.into(),
        })?;
        let (start, end) = info.data_offsets;
        let bytes = &self.map[self.data_start + start..self.data_start + end];
        let numel: usize = info.shape.iter().product();
        if numel.checked_mul(info.dtype.bitsize()) != Some(bytes.len() * 8) {
            return Err(format_err(
                &self.path,
                format!(
                    "tensor `{name}` holds {} bytes for shape {:?} of {}",
                    bytes.len(),
                    info.shape,
                    dtype_name(info.dtype)
                ),
            ));
        }
        Ok((info.dtype, &info.shape, bytes))
    }

    /// A float tensor decoded to f32.
    pub(crate) fn read_f32(&self, name: &str) -> Result<F32Tensor, LoadError> {
        let (dtype, shape, bytes) = self.raw(name)?;
        let data = match dtype {
            Dtype::F32 => f32s(bytes),
            Dtype::F16 => f16s(bytes),
            Dtype::BF16 => bf16s(bytes),
            other => {
                return Err(LoadError::UnsupportedType {
                    path: self.path.clone(),
                    tensor: name.into(),
                    dtype: dtype_name(other),
                })
            }
        };
        Ok(F32Tensor {
            data,
            shape: shape.to_vec(),
        })
    }
}

pub(crate) fn dtype_name(d: Dtype) -> String {
    format!("{d:?}")
}

impl Shard {
    /// Every tensor's name, dtype, shape and size.
    pub(crate) fn infos(&self) -> Vec<TensorInfo> {
        let mut out: Vec<TensorInfo> = self
            .metadata
            .tensors()
            .into_iter()
            .map(|(name, info)| TensorInfo {
                name,
                dtype: dtype_name(info.dtype),
                shape: info.shape.clone(),
                bytes: info.data_offsets.1 - info.data_offsets.0,
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }
}

impl TensorSource for SafetensorsSource {
    fn path(&self) -> &Path {
        &self.dir
    }

    fn infos(&self) -> Vec<TensorInfo> {
        self.index
            .iter()
            .filter_map(|(name, &s)| {
                let info = self.shards[s].metadata.info(name)?;
                Some(TensorInfo {
                    name: name.clone(),
                    dtype: dtype_name(info.dtype),
                    shape: info.shape.clone(),
                    bytes: info.data_offsets.1 - info.data_offsets.0,
                })
            })
            .collect()
    }

    fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    fn read(&self, name: &str) -> Result<F32Tensor, LoadError> {
        let shard = self
            .index
            .get(name)
            .map(|&s| &self.shards[s])
            .ok_or_else(|| LoadError::MissingTensor {
                path: self.dir.clone(),
                tensor: name.into(),
            })?;
        shard.read_f32(name)
    }
}

/// Loads `tokenizer.json` (and the chat template, special tokens from `tokenizer_config.json`) when present.
pub(crate) fn tokenizer(dir: &Path, config: &LlamaConfig) -> Result<Option<Tokenizer>, TokenizerError> {
    let path = dir.join("tokenizer.json");
    if !path.exists() {
        return Ok(None);
    }
    let json = std::fs::read_to_string(&path).map_err(|e| TokenizerError::Build(format!("{}: {e}", path.display())))?;
    let tokenizer_config = match std::fs::read_to_string(dir.join("tokenizer_config.json")) {
        Ok(text) => Some(
            serde_json::from_str::<serde_json::Value>(&text)
                .map_err(|e| TokenizerError::Build(format!("tokenizer_config.json is not JSON: {e}")))?,
        ),
        Err(_) => None,
    };
    Tokenizer::from_hf(&json, tokenizer_config.as_ref(), config).map(Some)
}
