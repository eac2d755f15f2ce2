//! Bytes from a server, in two pieces, through the client's state machine: welcome, chunks, tasks, acks, goodbye.
//! A hostile server may send anything; nothing may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use offsite_protocol::{ClientConn, ClientEvent, Hello, Limits};

fuzz_target!(|data: &[u8]| {
    let Some((&cut, bytes)) = data.split_first() else {
        return;
    };
    let cut = (cut as usize * bytes.len() / 255).min(bytes.len());
    let hello = Hello {
        client_name: "fuzz".into(),
        token: "ofs_x".into(),
    };
    let (mut sm, _) = ClientConn::new(Limits { max_frame: 1 << 20 }, hello);
    for piece in [&bytes[..cut], &bytes[cut..]] {
        let Ok(events) = sm.receive(piece) else { return };
        for e in events {
            if let ClientEvent::Welcome(_) = e {
                let _ = sm.fetch(0);
            }
        }
    }
    let _ = sm.finish();
});
