//! The model-side files a peer or a download can hand over, from whatever bytes are there; the first byte picks
//! which: a Hugging Face `config.json`; an emulator file (as a client opens what a server sent: a hostile server
//! can make its content hash match, so fuzz builds skip that check to reach what follows); a PEFT
//! `adapter_config.json`; the `[adapter]` settings a server sends as JSON; a Hugging Face model folder
//! (`config.json` + `model.safetensors`, the first two bytes giving the JSON's length). Tiny architectures are
//! built on the CPU. A bad file is an error, never a panic.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use offsite::adapters::{AdapterSpec, LoraConfig};
use offsite::emulator::Emulator;
use offsite::load::Checkpoint;
use offsite::model::LlamaConfig;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else { return };
    let text = std::str::from_utf8(rest).ok();
    let cpu = burn::tensor::Device::flex();
    match which % 5 {
        0 => {
            if let Some(t) = text {
                let _ = LlamaConfig::from_hf_json(t);
            }
        }
        1 => {
            let path = common::scratch().join("emulator.safetensors");
            std::fs::write(&path, rest).expect("the scratch file");
            let Ok(emu) = Emulator::open(&path) else { return };
            let _ = emu.tokenizer();
            if common::tiny(emu.full_config()) {
                let _ = emu.load_model(&cpu);
            }
        }
        2 => {
            if let Some(t) = text {
                let _ = LoraConfig::from_peft_json(t);
            }
        }
        3 => {
            if let Some(t) = text {
                if let Ok(spec) = serde_json::from_str::<AdapterSpec>(t) {
                    let _ = spec.structure();
                }
            }
        }
        _ => {
            let Some((len, files)) = rest.split_first_chunk::<2>() else { return };
            let split = (u16::from_le_bytes(*len) as usize).min(files.len());
            let dir = common::scratch().join("hf");
            std::fs::create_dir_all(&dir).expect("the scratch folder");
            std::fs::write(dir.join("config.json"), &files[..split]).expect("the scratch file");
            std::fs::write(dir.join("model.safetensors"), &files[split..]).expect("the scratch file");
            let Ok(ckpt) = Checkpoint::open(&dir) else { return };
            for t in ckpt.tensors() {
                let _ = ckpt.read_tensor(&t.name);
            }
            if common::tiny(ckpt.config()) {
                let _ = ckpt.load_model(&cpu);
            }
        }
    }
});
