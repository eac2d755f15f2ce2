use std::time::{Duration, Instant};

use super::*;
use crate::{Encoding, TrainConfig, WireTensor};

fn offer(size: u64) -> EmulatorOffer {
    EmulatorOffer {
        sha256: "ab".repeat(32),
        size,
        chunk_size: 4,
    }
}

fn welcome(id: &str, size: u64) -> Welcome {
    Welcome {
        client_id: id.into(),
        emulator: offer(size),
        adapter: "{}".into(),
        max_update_bytes: 0,
    }
}

fn hello() -> Hello {
    Hello {
        client_name: "alice".into(),
        token: "secret".into(),
    }
}

fn task(round: u64) -> Task {
    Task {
        round,
        global: vec![WireTensor::encode("w", &[2], &[1.0, 2.0], Encoding::F32)],
        settings: TrainConfig {
            steps: 1,
            batch_size: 1,
            lr: 1e-3,
            seed: 7,
            ..TrainConfig::default()
        },
        proximal_mu: 0.0,
        update_encoding: Encoding::F16,
        deadline_ms: 1000,
        secagg: None,
    }
}

#[test]
fn a_whole_session_runs_through_both_machines() {
    let t0 = Instant::now();
    let file: Vec<u8> = (0..10u8).collect();
    let mut server = ServerConn::new(Limits::default(), t0, Duration::from_secs(5));
    let (mut client, bytes) = ClientConn::new(Limits::default(), hello());
    assert_eq!(server.receive(&bytes, t0).unwrap(), vec![ServerInput::Hello(hello())]);
    let welcome = server.accept(welcome("c1", 10)).unwrap();
    let events = client.receive(&welcome).unwrap();
    assert!(matches!(&events[..], [ClientEvent::Welcome(w)] if w.client_id == "c1"));
    // Resume a download from chunk 1: the server sends chunks 1 and 2 (the last is 2 bytes).
    let fetch = client.fetch(1).unwrap();
    assert_eq!(
        server.receive(&fetch, t0).unwrap(),
        vec![ServerInput::FetchEmulator { from_chunk: 1 }]
    );
    for i in 1..3u32 {
        let data = file[i as usize * 4..(i as usize * 4 + 4).min(10)].to_vec();
        let ev = client.receive(&server.chunk(i, data.clone()).unwrap()).unwrap();
        assert!(matches!(&ev[..], [ClientEvent::Chunk(c)] if c.index == i && c.data == data));
    }
    assert_eq!(
        server.receive(&client.ready().unwrap(), t0).unwrap(),
        vec![ServerInput::Ready]
    );
    let ev = client.receive(&server.task(&task(1)).unwrap()).unwrap();
    assert_eq!(ev, vec![ClientEvent::Task(task(1))]);
    let update = Update {
        round: 1,
        num_examples: 3,
        train_loss: 2.5,
        steps: 1,
        delta: vec![WireTensor::encode("w", &[2], &[0.5, -0.5], Encoding::F16)],
    };
    let got = server.receive(&client.update(&update).unwrap(), t0).unwrap();
    assert_eq!(got, vec![ServerInput::Update(update)]);
    let ack = UpdateAck {
        round: 1,
        accepted: true,
        reason: None,
    };
    assert_eq!(
        client.receive(&server.ack(ack.clone())).unwrap(),
        vec![ClientEvent::Ack(ack)]
    );
    let bye = client.goodbye("done");
    assert_eq!(
        server.receive(&bye, t0).unwrap(),
        vec![ServerInput::Goodbye("done".into())]
    );
}

#[test]
fn an_unauthenticated_peer_gets_no_emulator_byte_and_no_task() {
    let t0 = Instant::now();
    let mut server = ServerConn::new(Limits::default(), t0, Duration::from_secs(5));
    assert!(matches!(server.chunk(0, vec![1]), Err(ProtocolError::Forbidden { .. })));
    let (_, bytes) = ClientConn::new(Limits::default(), hello());
    server.receive(&bytes, t0).unwrap();
    // Still verifying: nothing goes out.
    assert!(server.chunk(0, vec![1]).is_err());
    assert!(server.task(&task(1)).is_err());
    let reject = server.reject("unknown token");
    assert!(server.chunk(0, vec![1]).is_err());
    let (mut client, _) = ClientConn::new(Limits::default(), hello());
    assert_eq!(
        client.receive(&reject).unwrap(),
        vec![ClientEvent::Rejected("unknown token".into())]
    );
}

#[test]
fn out_of_order_messages_and_silence_end_the_connection() {
    let t0 = Instant::now();
    let mut server = ServerConn::new(Limits::default(), t0, Duration::from_secs(5));
    // Asking for the emulator before saying hello.
    let fetch = encode_frame(&Message::FetchEmulator {
        sha256: "x".into(),
        from_chunk: 0,
    });
    let e = server.receive(&fetch, t0).unwrap_err();
    assert_eq!(e.to_string(), "unexpected fetch-emulator while awaiting hello");
    // An update before ready.
    let mut server = ServerConn::new(Limits::default(), t0, Duration::from_secs(5));
    let (_, hello_bytes) = ClientConn::new(Limits::default(), hello());
    server.receive(&hello_bytes, t0).unwrap();
    server.accept(welcome("c", 8)).unwrap();
    let upd = encode_frame(&Message::Update(Update {
        round: 1,
        num_examples: 1,
        train_loss: 0.0,
        steps: 0,
        delta: vec![],
    }));
    assert!(matches!(
        server.receive(&upd, t0),
        Err(ProtocolError::Unexpected { got: "update", .. })
    ));
    // Silence past the hello deadline.
    let server = ServerConn::new(Limits::default(), t0, Duration::from_secs(5));
    assert_eq!(server.timeout(t0 + Duration::from_secs(4)), None);
    assert!(matches!(
        server.timeout(t0 + Duration::from_secs(5)),
        Some(ProtocolError::HelloTimeout(_))
    ));
}

#[test]
fn a_corrupted_or_misplaced_chunk_is_refused() {
    let t0 = Instant::now();
    let mut server = ServerConn::new(Limits::default(), t0, Duration::from_secs(5));
    let (mut client, bytes) = ClientConn::new(Limits::default(), hello());
    server.receive(&bytes, t0).unwrap();
    client.receive(&server.accept(welcome("c", 8)).unwrap()).unwrap();
    client.fetch(0).unwrap();
    let mut frame = server.chunk(0, vec![1, 2, 3, 4]).unwrap();
    let last = frame.len() - 1;
    frame[last] ^= 1;
    assert_eq!(client.receive(&frame), Err(ProtocolError::ChunkHash { index: 0 }));

    let (mut client, _) = ClientConn::new(Limits::default(), hello());
    client
        .receive(&encode_frame(&Message::Welcome(welcome("c", 8))))
        .unwrap();
    client.fetch(0).unwrap();
    let skipped = server.chunk(1, vec![5, 6, 7, 8]).unwrap();
    assert!(client
        .receive(&skipped)
        .unwrap_err()
        .to_string()
        .contains("expected chunk 0"));
}

#[test]
fn an_unauthenticated_peer_cannot_declare_a_large_frame() {
    let t0 = Instant::now();
    let mut server = ServerConn::new(Limits::default(), t0, Duration::from_secs(5));
    let mut header = crate::MAGIC.to_vec();
    header.extend_from_slice(&crate::PROTOCOL_VERSION.to_le_bytes());
    header.extend_from_slice(&0u16.to_le_bytes());
    header.extend_from_slice(&(1u32 << 20).to_le_bytes());
    assert!(matches!(
        server.receive(&header, t0),
        Err(ProtocolError::Oversized { limit: 65536, .. })
    ));
    // After authentication the configured limit applies.
    let mut server = ServerConn::new(Limits::default(), t0, Duration::from_secs(5));
    let (_, hello) = ClientConn::new(Limits::default(), hello());
    server.receive(&hello, t0).unwrap();
    server.accept(welcome("c", 8)).unwrap();
    assert_eq!(server.receive(&header, t0).unwrap(), vec![]);
}

#[test]
fn a_welcome_whose_hash_could_name_a_path_is_refused() {
    for sha in [
        "../../etc/passwd".to_string(),
        "ab".repeat(31),
        format!("{}/x", "ab".repeat(31)),
        String::new(),
    ] {
        let t0 = Instant::now();
        let mut server = ServerConn::new(Limits::default(), t0, Duration::from_secs(5));
        let (mut client, bytes) = ClientConn::new(Limits::default(), hello());
        server.receive(&bytes, t0).unwrap();
        let mut w = welcome("c1", 10);
        w.emulator.sha256 = sha.clone();
        let e = client.receive(&server.accept(w).unwrap()).unwrap_err().to_string();
        assert!(e.contains("not 64 hex digits"), "{sha}: {e}");
    }
}

#[test]
fn the_welcome_carries_the_servers_update_limit_and_the_client_keeps_to_it() {
    let t0 = Instant::now();
    let mut server = ServerConn::new(Limits::server(128), t0, Duration::from_secs(5));
    let (mut client, bytes) = ClientConn::new(Limits::default(), hello());
    server.receive(&bytes, t0).unwrap();
    let events = client.receive(&server.accept(welcome("c1", 0)).unwrap()).unwrap();
    assert!(matches!(&events[..], [ClientEvent::Welcome(w)] if w.max_update_bytes == 128));
    server.receive(&client.ready().unwrap(), t0).unwrap();
    client.receive(&server.task(&task(1)).unwrap()).unwrap();
    let update = |n: usize| Update {
        round: 1,
        num_examples: 3,
        train_loss: 2.5,
        steps: 1,
        delta: vec![WireTensor::encode("w", &[n], &vec![0.5; n], Encoding::F32)],
    };
    // One f32 fits (77 bytes in all); 16 of them (60 bytes more) do not, and the error names both sizes.
    let small = client.update(&update(1)).unwrap();
    assert_eq!(
        server.receive(&small, t0).unwrap(),
        vec![ServerInput::Update(update(1))]
    );
    let big = encode_frame(&Message::Update(update(16)));
    let len = (big.len() - crate::frame::HEADER_LEN) as u64;
    assert_eq!(
        client.update(&update(16)),
        Err(ProtocolError::UpdateTooLarge { len, limit: 128 })
    );
    // The server would have refused it as oversized.
    assert!(matches!(server.receive(&big, t0), Err(ProtocolError::Oversized { .. })));
}

/// A ready pair of machines (welcome taken, no download).
fn ready_pair(limit: u32) -> (ServerConn, ClientConn) {
    let t0 = Instant::now();
    let limits = Limits { max_frame: limit };
    let mut server = ServerConn::new(limits, t0, Duration::from_secs(5));
    let (mut client, bytes) = ClientConn::new(Limits::default(), hello());
    server.receive(&bytes, t0).unwrap();
    client.receive(&server.accept(welcome("c1", 0)).unwrap()).unwrap();
    server.receive(&client.ready().unwrap(), t0).unwrap();
    (server, client)
}

#[test]
fn secure_aggregation_messages_go_only_their_own_way_and_only_when_ready() {
    use crate::secagg::{SecAggKeys, SecAggMasked, SecAggShares, SecAggUnmask};
    let t0 = Instant::now();
    let keys = SecAggMessage::Keys(SecAggKeys {
        round: 1,
        cipher_pk: [1; 32],
        mask_pk: [2; 32],
        self_mask_commit: [3; 32],
    });
    let unmask = SecAggMessage::Unmask(SecAggUnmask {
        round: 1,
        survived: vec![0, 2],
        dropped: vec![1],
    });
    let shares = SecAggMessage::Shares(SecAggShares {
        round: 1,
        sealed: Vec::new(),
    });
    // Before the client is ready neither side may send one.
    let mut early = ServerConn::new(Limits::default(), t0, Duration::from_secs(5));
    assert!(early.secagg(&unmask).is_err());
    let (mut c, bytes) = ClientConn::new(Limits::default(), hello());
    assert!(c.secagg(&keys).is_err());
    early.receive(&bytes, t0).unwrap();
    c.receive(&early.accept(welcome("c1", 0)).unwrap()).unwrap();
    assert!(c.secagg(&keys).is_err(), "authenticated but not ready");

    let (mut server, mut client) = ready_pair(1 << 20);
    // Each side sends its own kinds and refuses to send the other's.
    assert!(server.secagg(&keys).is_err());
    assert!(client.secagg(&unmask).is_err());
    assert_eq!(
        server.receive(&client.secagg(&keys).unwrap(), t0).unwrap(),
        vec![ServerInput::SecAgg(keys.clone())]
    );
    assert_eq!(
        client.receive(&server.secagg(&unmask).unwrap()).unwrap(),
        vec![ClientEvent::SecAgg(unmask.clone())]
    );
    // Shares go both ways.
    assert_eq!(
        server.receive(&client.secagg(&shares).unwrap(), t0).unwrap(),
        vec![ServerInput::SecAgg(shares.clone())]
    );
    assert_eq!(
        client.receive(&server.secagg(&shares).unwrap()).unwrap(),
        vec![ClientEvent::SecAgg(shares)]
    );
    // A peer that sends the other side's kind breaks the protocol: the frame is built by hand, as a hostile peer
    // would.
    let forged = encode_frame(&Message::SecAgg(unmask));
    assert!(matches!(
        server.receive(&forged, t0),
        Err(ProtocolError::Unexpected {
            got: "secagg-unmask",
            ..
        })
    ));
    let (_, mut client) = ready_pair(1 << 20);
    assert!(matches!(
        client.receive(&encode_frame(&Message::SecAgg(keys))),
        Err(ProtocolError::Unexpected { got: "secagg-keys", .. })
    ));

    // A masked update larger than the server takes is not sent.
    let (_, client) = ready_pair(1000);
    let masked = |bytes: usize| {
        SecAggMessage::Masked(SecAggMasked {
            round: 1,
            weight: 1.0,
            train_loss: 2.0,
            masked: vec![7; bytes],
        })
    };
    assert!(client.secagg(&masked(100)).is_ok());
    assert!(matches!(
        client.secagg(&masked(4000)),
        Err(ProtocolError::UpdateTooLarge { limit: 1000, .. })
    ));
}
