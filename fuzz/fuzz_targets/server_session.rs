//! Bytes from a client, in two pieces split where the input says, through the server's state machine as the
//! server drives it: a hello is accepted (so every later state is reached), a fetch answered, an update validated
//! against a small global adapter, secure aggregation's stage messages taken by a real SecAgg+ server of a
//! three-client round (the sender as client 0; each stage closed after its message). Nothing may panic; errors are
//! fine.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use offsite_fed::{validate, Params, SecAggParams, SecAggServer, Tensor};
use offsite_protocol::{EmulatorOffer, Limits, SecAggMessage, ServerConn, ServerInput, Welcome};

fuzz_target!(|data: &[u8]| {
    let Some((&cut, bytes)) = data.split_first() else {
        return;
    };
    let cut = (cut as usize * bytes.len() / 255).min(bytes.len());
    let now = Instant::now();
    let mut sm = ServerConn::new(Limits::server(1 << 20), now, Duration::from_secs(10));
    let global = Params::from([(
        "w".to_string(),
        Tensor {
            shape: vec![2, 3],
            values: vec![0.5; 6],
        },
    )]);
    let params = SecAggParams {
        round: 1,
        participants: 3,
        neighbours: 2,
        threshold: 2,
        graph_seed: 5,
        clip: 1.0,
        length: 6,
    };
    let Ok(mut secure) = SecAggServer::new(params) else { return };
    for piece in [&bytes[..cut], &bytes[cut..]] {
        let Ok(inputs) = sm.receive(piece, now) else { return };
        for input in inputs {
            match input {
                ServerInput::Hello(_) => {
                    let welcome = Welcome {
                        client_id: "c".into(),
                        emulator: EmulatorOffer {
                            sha256: "ab".repeat(32),
                            size: 10,
                            chunk_size: 4,
                        },
                        adapter: "{}".into(),
                        max_update_bytes: 0,
                    };
                    if sm.accept(welcome).is_err() {
                        return;
                    }
                }
                ServerInput::FetchEmulator { from_chunk } => {
                    let _ = sm.chunk(from_chunk, vec![0; 4]);
                }
                ServerInput::Update(u) => {
                    let _ = validate("c", &u, u.round, &global, Some(1000.0));
                }
                ServerInput::SecAgg(m) => {
                    let _ = match m {
                        SecAggMessage::Keys(m) => secure.keys(0, m).and_then(|()| secure.close_keys().map(drop)),
                        SecAggMessage::Shares(m) => secure.shares(0, m).and_then(|()| secure.close_shares().map(drop)),
                        SecAggMessage::Masked(m) => secure.masked(0, m).and_then(|()| secure.close_masked().map(drop)),
                        SecAggMessage::Reveal(m) => secure.reveal(0, m),
                        _ => Ok(()),
                    };
                }
                ServerInput::Ready | ServerInput::Goodbye(_) => {}
            }
        }
    }
    let _ = sm.finish();
});
