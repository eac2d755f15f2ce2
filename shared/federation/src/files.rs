//! Files the federation writes: atomic replacement (so a crash leaves the old file or the new one, never a mix) and
//! named f32 tensors as safetensors.

use std::collections::HashMap;
use std::path::Path;

use super::params::{Params, Tensor};
use super::FedError;

/// Replaces `path` atomically: `write` fills a fresh temporary file in the same directory (created readable by the
/// owner only), which is then flushed to disk, renamed over `path`, and the directory synced so the rename itself
/// survives a crash. A crash leaves the old file or the new one, never a mix; a failed `write` leaves `path` as it
/// was and removes the temporary file.
fn replace_atomically(path: &Path, write: impl FnOnce(&Path) -> Result<(), String>) -> Result<(), FedError> {
    let err = |reason: String| FedError::File {
        path: path.into(),
        reason,
    };
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
    let tmp = tempfile::NamedTempFile::new_in(dir).map_err(|e| err(e.to_string()))?;
    write(tmp.path()).map_err(err)?;
    tmp.as_file().sync_all().map_err(|e| err(e.to_string()))?;
    let file = path.file_name().unwrap_or_default().to_string_lossy();
    crate::crash_point(&format!("before-rename:{file}"));
    tmp.persist(path).map_err(|e| err(e.error.to_string()))?;
    // A directory cannot be opened for syncing on every platform (Windows); the file itself is already durable.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Writes `bytes` to `path` atomically: a temporary file readable by the owner only, flushed, renamed over `path`,
/// the directory synced.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), FedError> {
    replace_atomically(path, |tmp| std::fs::write(tmp, bytes).map_err(|e| e.to_string()))
}

/// One tensor to write: its name, dtype, shape and little-endian bytes.
pub type TensorBytes<'a> = (String, safetensors::Dtype, Vec<usize>, &'a [u8]);

/// Writes tensors and string metadata as one safetensors file, atomically: streamed into a temporary file in the
/// same directory (no second copy of the data in memory), flushed, renamed over `path`, the directory synced. An
/// inconsistent tensor is an error naming it. The one safetensors writer of the workspace.
pub fn write_tensors(
    path: &Path,
    tensors: Vec<TensorBytes<'_>>,
    metadata: Option<HashMap<String, String>>,
) -> Result<(), FedError> {
    let views = tensors
        .into_iter()
        .map(
            |(name, dtype, shape, bytes)| match safetensors::tensor::TensorView::new(dtype, shape, bytes) {
                Ok(v) => Ok((name, v)),
                Err(e) => Err(FedError::Shape(format!("`{name}`: {e}"))),
            },
        )
        .collect::<Result<Vec<_>, _>>()?;
    replace_atomically(path, |tmp| {
        safetensors::serialize_to_file(views, metadata, tmp).map_err(|e| e.to_string())
    })
}

/// Little-endian bytes of f32 values.
pub fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Writes named tensor sets (each name prefixed) and string metadata as one f32 safetensors file, atomically.
pub fn write_safetensors(
    path: &Path,
    sets: &[(&str, &Params)],
    metadata: HashMap<String, String>,
) -> Result<(), FedError> {
    let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = sets
        .iter()
        .flat_map(|(prefix, set)| {
            set.iter()
                .map(move |(name, t)| (format!("{prefix}{name}"), f32_bytes(&t.values), t.shape.clone()))
        })
        .collect();
    let tensors = bytes
        .iter()
        .map(|(n, b, s)| (n.clone(), safetensors::Dtype::F32, s.clone(), b.as_slice()))
        .collect();
    write_tensors(path, tensors, Some(metadata))
}

/// Reads an f32 safetensors file: every tensor by its full name, and the string metadata.
pub fn read_safetensors(path: &Path) -> Result<(Params, HashMap<String, String>), FedError> {
    let data = std::fs::read(path).map_err(|e| FedError::File {
        path: path.into(),
        reason: e.to_string(),
    })?;
    parse_safetensors(&data).map_err(|reason| FedError::File {
        path: path.into(),
        reason,
    })
}

/// [`read_safetensors`] of bytes already read; the error says what is wrong with them.
pub fn parse_safetensors(data: &[u8]) -> Result<(Params, HashMap<String, String>), String> {
    let err = |reason: String| reason;
    let (_, header) = safetensors::SafeTensors::read_metadata(data).map_err(|e| err(e.to_string()))?;
    let metadata = header.metadata().clone().unwrap_or_default();
    let st = safetensors::SafeTensors::deserialize(data).map_err(|e| err(e.to_string()))?;
    let mut out = Params::new();
    for (name, view) in st.tensors() {
        if view.dtype() != safetensors::Dtype::F32 {
            return Err(err(format!("`{name}` is {:?}, not F32", view.dtype())));
        }
        let values = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        out.insert(
            name,
            Tensor {
                shape: view.shape().to_vec(),
                values,
            },
        );
    }
    Ok((out, metadata))
}
