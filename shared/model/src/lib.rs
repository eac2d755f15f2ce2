//! Offsite's model and training crate: the LLaMA-family model, checkpoint loading (Hugging Face safetensors and
//! GGUF), tokenizer, generation, device selection, frozen int8/f16 weights and their kernels, adapters (LoRA, prompt
//! learning, Offsite adapter layers), emulators, the trainer, data, evaluation, export, and the model side of
//! federation (`federated`: the edge client's local trainer). The wire protocol (`offsite_protocol`), the
//! federation core (`offsite_fed`) and the network layer (`offsite_net`) are crates of their own.

pub mod adapters;
pub mod alloc;
pub mod data;
pub mod device;
pub mod emulator;
pub mod export;
pub mod federated;
pub mod generate;
pub mod load;
pub mod model;
pub mod progress;
pub mod quant;
#[cfg(test)]
mod testing;
pub mod tokenizer;
pub mod train;
