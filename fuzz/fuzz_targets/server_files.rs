//! The server's own files read back after damage: the token store (JSON) and the saved round state (safetensors
//! with a JSON manifest), from whatever bytes are there (in memory: the parsers `load` calls after reading). A
//! damaged file is an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use offsite_fed::{parse_safetensors, ServerState, TokenStore};

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(store) = TokenStore::from_json(text) {
            let _ = store.authenticate("ofs_x");
        }
    }
    let _ = parse_safetensors(data);
    let _ = ServerState::from_bytes(data);
});
