//! The stored fuzz corpora of the protocol targets speak the current protocol. A protocol version bump turns every
//! stored input into one the frame decoder refuses at the header, and the CI smoke run (`scripts/fuzz 10`) would then
//! fuzz little more than the header check: this happened at version 3 (coverage at load fell to ~100 edges from
//! ~450). Regrow the corpora after a bump: `scripts/fuzz 60 server_session client_session update`.

use offsite_protocol::{MAGIC, PROTOCOL_VERSION};

#[test]
fn protocol_corpora_carry_the_current_version() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    for target in ["server_session", "client_session", "update"] {
        let dir = root.join(target);
        let mut current = 0;
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let data = std::fs::read(entry.unwrap().path()).unwrap();
            // Each target reads one parameter byte, then frame bytes.
            if data.len() >= 7 && data[1..5] == MAGIC && data[5..7] == PROTOCOL_VERSION.to_le_bytes() {
                current += 1;
            }
        }
        assert!(
            current >= 20,
            "fuzz/corpus/{target}: {current} inputs start with a version-{PROTOCOL_VERSION} frame; regrow the corpus"
        );
    }
}
