//! What the model-file targets share: a scratch folder for the files they write, and the bound under which a
//! fuzzed architecture is small enough to build on the CPU for every input.

use std::path::PathBuf;
use std::sync::OnceLock;

use offsite::model::LlamaConfig;

/// A folder of this process's own, in memory where the system has one (`/dev/shm`).
pub fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let shm = PathBuf::from("/dev/shm");
        let base = if shm.is_dir() { shm } else { std::env::temp_dir() };
        let dir = base.join(format!("offsite-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a scratch folder");
        dir
    })
}

/// Whether building the model costs microseconds: a handful of small layers.
pub fn tiny(c: &LlamaConfig) -> bool {
    c.hidden_size <= 64
        && c.intermediate_size <= 256
        && c.num_hidden_layers <= 4
        && c.vocab_size <= 1024
        && c.num_attention_heads <= 16
        && c.head_dim <= 64
}
