//! An update message decoded straight from a frame payload, its wire tensors decoded and validated against a
//! global adapter of the shapes the input's first bytes choose: sizes from the wire must be checked before use.
#![no_main]

use libfuzzer_sys::fuzz_target;
use offsite_fed::{validate, Params, Tensor};
use offsite_protocol::{FrameDecoder, Limits, Message};

fuzz_target!(|data: &[u8]| {
    let Some((&rows, bytes)) = data.split_first() else {
        return;
    };
    let shape = vec![rows as usize % 7 + 1, 3];
    let global = Params::from([(
        "w".to_string(),
        Tensor {
            values: vec![0.25; shape.iter().product()],
            shape,
        },
    )]);
    let mut d = FrameDecoder::new(Limits { max_frame: 1 << 20 });
    d.push(bytes);
    while let Ok(Some(m)) = d.next_message() {
        if let Message::Update(u) = m {
            for t in &u.delta {
                let _ = t.decode();
            }
            let _ = validate("c", &u, u.round, &global, None);
        }
    }
});
