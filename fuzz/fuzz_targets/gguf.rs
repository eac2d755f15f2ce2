//! GGUF checkpoints from whatever bytes are there, through the loader's own entry point: header, metadata, tensor
//! table, the architecture read from the metadata, the tokenizer built from its vocabulary, every tensor decoded
//! (each block format), and the model built on the CPU when the architecture is tiny. A bad file is an error, never
//! a panic, and nothing is allocated from a size the file claims before it is checked against the file.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use offsite::load::Checkpoint;

fuzz_target!(|data: &[u8]| {
    let path = common::scratch().join("model.gguf");
    std::fs::write(&path, data).expect("the scratch file");
    let Ok(ckpt) = Checkpoint::open(&path) else { return };
    let _ = ckpt.tokenizer();
    for t in ckpt.tensors() {
        let _ = ckpt.read_tensor(&t.name);
    }
    if common::tiny(ckpt.config()) {
        let _ = ckpt.load_model(&burn::tensor::Device::flex());
    }
});
