//! Offsite's library: the LLaMA-family model, checkpoint loading (Hugging Face safetensors and GGUF), tokenizer,
//! generation and device selection. Adapters, emulators, data and the wire protocol build on these.

pub mod adapters;
pub mod alloc;
pub mod data;
pub mod device;
pub mod emulator;
pub mod export;
pub mod fed;
pub mod generate;
pub mod load;
pub mod model;
pub mod net;
pub mod protocol;
pub mod quant;
#[cfg(test)]
mod testing;
pub mod tokenizer;
pub mod train;
