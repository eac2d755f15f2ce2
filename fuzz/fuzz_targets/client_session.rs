//! Bytes from a server, in two pieces, through the client's state machine: welcome, chunks, tasks, acks, goodbye,
//! and secure aggregation's stages through a real SecAgg+ client (a task's update masked for the sum). The input's
//! first byte also picks whether the client downloads or is ready at once. A hostile server may send anything;
//! nothing may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use offsite_fed::params::from_wire;
use offsite_fed::{prepare_update, SecAggClient};
use offsite_protocol::{ClientConn, ClientEvent, Hello, Limits, SecAggMessage};

fuzz_target!(|data: &[u8]| {
    let Some((&cut, bytes)) = data.split_first() else {
        return;
    };
    let ready_at_once = cut % 2 == 1;
    let cut = (cut as usize * bytes.len() / 255).min(bytes.len());
    let hello = Hello {
        client_name: "fuzz".into(),
        token: "ofs_x".into(),
    };
    let (mut sm, _) = ClientConn::new(Limits { max_frame: 1 << 20 }, hello);
    let mut secure: Option<SecAggClient> = None;
    for piece in [&bytes[..cut], &bytes[cut..]] {
        let Ok(events) = sm.receive(piece) else { return };
        for e in events {
            match e {
                ClientEvent::Welcome(_) if ready_at_once => {
                    let _ = sm.ready();
                }
                ClientEvent::Welcome(_) => {
                    let _ = sm.fetch(0);
                }
                ClientEvent::SecAgg(m) => {
                    let reply = match (m, secure.as_mut()) {
                        (SecAggMessage::Setup(s), _) => SecAggClient::new(s).map(|(c, _)| secure = Some(c)),
                        (SecAggMessage::Neighbours(m), Some(c)) => c.share(&m).map(|_| ()),
                        (SecAggMessage::Shares(m), Some(c)) => c.receive(&m),
                        (SecAggMessage::Unmask(m), Some(c)) => c.reveal(&m).map(|_| ()),
                        _ => Ok(()),
                    };
                    if reply.is_err() {
                        secure = None;
                    }
                }
                ClientEvent::Task(t) => {
                    let (Some(st), Some(c), Ok(global)) = (&t.secagg, secure.as_mut(), from_wire(&t.global)) else {
                        continue;
                    };
                    // The zero delta of the task's shapes, prepared and masked as the edge does.
                    let zero = global
                        .into_iter()
                        .map(|(k, mut v)| {
                            v.values.iter_mut().for_each(|x| *x = 0.0);
                            (k, v)
                        })
                        .collect();
                    if let Ok((flat, weight)) = prepare_update(&zero, 3, st) {
                        if let Ok((m, _)) = c.mask(&flat, weight) {
                            let _ = sm.secagg(&SecAggMessage::Masked(m));
                        }
                    }
                }
                _ => {}
            }
        }
    }
    let _ = sm.finish();
});
