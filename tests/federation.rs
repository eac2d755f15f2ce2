//! Federation end to end on 127.0.0.1:0 with an emulator of the 6-layer tiny model: FedAvg over real QUIC
//! connections checked against an independent computation, authentication, bad frames, a client lost mid-round
//! and a server restart.

use std::time::Duration;

use offsite::emulator::Emulator;
use offsite::federated::train_round;
use offsite::train::TrainConfig;
use offsite_fed::params::{hash, l2_norm};
use offsite_fed::{read_safetensors, RoundReport, ServerState, TokenStore};
use offsite_net::{quic_client, EmulatorSource, Identity, JoinSummary, NetError, Server, Trust, SERVER_NAME};
use offsite_protocol::{encode_frame, ClientConn, ClientEvent, Hello, Limits, Message};

mod fed_common;
use fed_common::*;

#[test]
fn three_clients_two_rounds_give_the_fedavg_of_their_updates() {
    let f = fixture();
    let state = f.dir.join("state");
    let tokens = issue(&state, &["a", "b", "c"]);
    let rt = runtime();
    let (final_state, summaries) = rt.block_on(async {
        // Claims above 6 examples are clipped to 6 (the default cap would be steps × batch = 4 for all three).
        let mut s = settings(&f, &state, 2, 3);
        s.federation.max_examples_per_update = Some(6);
        let server = Server::bind(s, Identity::self_signed_in(&state).unwrap()).unwrap();
        let handles: Vec<_> = ["a", "b", "c"]
            .iter()
            .zip(&tokens)
            .enumerate()
            .map(|(i, (name, token))| {
                // Different amounts of data, so the weights matter.
                tokio::spawn(join_with(
                    client(&server, &f.dir, name, token),
                    examples(i as u32, 4 + 2 * i as u32),
                ))
            })
            .collect();
        let st = server.run(f.initial.clone(), None, &mut |_| {}).await.unwrap();
        let mut sums: Vec<JoinSummary> = Vec::new();
        for h in handles {
            sums.push(h.await.unwrap().unwrap());
        }
        (st, sums)
    });
    assert!(
        summaries.iter().all(|s| s.rounds == 2 && s.accepted == 2),
        "{summaries:?}"
    );
    let mut global = f.initial.clone();
    for round in 1..=2 {
        let ups: Vec<_> = ["a", "b", "c"].iter().map(|n| saved_update(&f.dir, n, round)).collect();
        assert_eq!(ups.iter().map(|u| u.0).collect::<Vec<_>>(), vec![4, 6, 8]);
        assert!(ups.iter().all(|u| l2_norm(&u.1) > 0.0), "clients trained");
        let weighted: Vec<_> = ups.into_iter().map(|(n, d)| (n.min(6), d)).collect();
        global = fedavg(&global, &weighted);
    }
    let diff = max_diff(&global, &final_state.global);
    assert!(
        diff < 1e-6,
        "global adapter differs from the independent FedAvg by {diff}"
    );
    assert_ne!(hash(&final_state.global), hash(&f.initial));
    let m = metrics(&state);
    assert_eq!(m.len(), 2);
    assert!(m
        .iter()
        .all(|r| r["participants"] == 3 && r["rejected"] == 0 && r["bytes_in"].as_u64().unwrap() > 0));
    assert_eq!(
        m[1]["global_sha256"],
        serde_json::Value::String(hash(&final_state.global))
    );
    assert_eq!(ServerState::load(&state).unwrap().unwrap().global, final_state.global);
}

#[test]
fn securely_aggregated_rounds_give_the_fedavg_of_the_updates_the_server_never_saw() {
    let f = fixture();
    let state = f.dir.join("state");
    let tokens = issue(&state, &["a", "b", "c", "d"]);
    let rt = runtime();
    let final_state = rt.block_on(async {
        // All four must be in every round (min_clients = 4), or the first could start before the last has joined.
        let mut s = settings(&f, &state, 2, 4);
        s.federation.max_examples_per_update = Some(6);
        s.federation.secure_aggregation = Some(offsite_fed::SecureAggregationConfig::default());
        let server = Server::bind(s, Identity::self_signed_in(&state).unwrap()).unwrap();
        let handles: Vec<_> = ["a", "b", "c", "d"]
            .iter()
            .zip(&tokens)
            .enumerate()
            .map(|(i, (name, token))| {
                tokio::spawn(join_with(
                    client(&server, &f.dir, name, token),
                    examples(i as u32, 4 + 2 * i as u32),
                ))
            })
            .collect();
        let st = server.run(f.initial.clone(), None, &mut |_| {}).await.unwrap();
        for h in handles {
            let sum = h.await.unwrap().unwrap();
            assert_eq!((sum.rounds, sum.accepted), (2, 2), "{sum:?}");
        }
        st
    });
    // The clients kept what they masked; the server only ever held the masked vectors and their sum.
    let mut global = f.initial.clone();
    for round in 1..=2 {
        let ups: Vec<_> = ["a", "b", "c", "d"]
            .iter()
            .map(|n| saved_update(&f.dir, n, round))
            .collect();
        assert!(ups.iter().all(|u| l2_norm(&u.1) > 0.0), "clients trained");
        let weighted: Vec<_> = ups.into_iter().map(|(n, d)| (n.min(6), d)).collect();
        global = fedavg(&global, &weighted);
    }
    // The fixed-point error is below 4² · 1.0 / 2³² per coordinate; the rest is f32 rounding.
    let diff = max_diff(&global, &final_state.global);
    assert!(
        diff < 1e-5,
        "the secure sum differs from the independent FedAvg by {diff}"
    );
    let m = metrics(&state);
    assert_eq!(m.len(), 2);
    assert!(m
        .iter()
        .all(|r| r["participants"] == 4 && r["masks_recovered"] == 0 && r["rejected"] == 0));
}

#[test]
fn bad_tokens_and_bad_frames_are_refused_and_the_server_keeps_serving() {
    let f = fixture();
    let state = f.dir.join("state");
    let tokens = issue(&state, &["good", "gone"]);
    let mut store = TokenStore::load(&TokenStore::path(&state)).unwrap();
    store.revoke("gone").unwrap();
    store.save(&TokenStore::path(&state)).unwrap();
    let rt = runtime();
    rt.block_on(async {
        let server = Server::bind(settings(&f, &state, 1, 1), Identity::self_signed_in(&state).unwrap()).unwrap();
        let (addr, fp) = (server.local_addr().unwrap(), server.fingerprint().to_string());
        for (token, what) in [("ofs_wrong", "wrong"), (tokens[1].as_str(), "revoked")] {
            let (_, hello) = ClientConn::new(
                Limits::default(),
                Hello {
                    client_name: what.into(),
                    token: token.into(),
                },
            );
            let got = raw(addr, &fp, hello, false).await;
            assert_eq!(
                events(&got),
                vec![ClientEvent::Rejected("unknown or revoked token".into())],
                "{what}"
            );
            // Nothing else came: no welcome, no chunk.
            assert_eq!(
                got,
                encode_frame(&Message::Reject {
                    reason: "unknown or revoked token".into()
                })
            );
        }
        let got = raw(addr, &fp, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), false).await;
        assert!(
            matches!(&events(&got)[..], [ClientEvent::Rejected(r)] if r.contains("not an Offsite frame")),
            "{got:?}"
        );
        let (_, hello) = ClientConn::new(
            Limits::default(),
            Hello {
                client_name: "t".into(),
                token: tokens[0].clone(),
            },
        );
        let got = raw(addr, &fp, hello[..hello.len() - 3].to_vec(), true).await;
        assert!(
            matches!(&events(&got)[..], [ClientEvent::Rejected(r)] if r.contains("truncated frame")),
            "{got:?}"
        );
        // Asking for the emulator in the same breath as the hello, before the token is checked: refused, no chunk.
        let mut frames = hello.clone();
        frames.extend(encode_frame(&Message::FetchEmulator {
            sha256: "00".repeat(32),
            from_chunk: 0,
        }));
        let got = raw(addr, &fp, frames, false).await;
        let ev = events(&got);
        assert!(
            matches!(&ev[..], [ClientEvent::Rejected(r)] if r.contains("unexpected fetch-emulator while verifying")),
            "{ev:?}"
        );
        // The server still serves a good client through a whole federation.
        let h = tokio::spawn(join_with(client(&server, &f.dir, "good", &tokens[0]), examples(0, 4)));
        let st = server.run(f.initial.clone(), None, &mut |_| {}).await.unwrap();
        assert_eq!(st.round, 1);
        assert_eq!(h.await.unwrap().unwrap().accepted, 1);
    });
}

#[test]
fn a_client_lost_mid_round_does_not_stop_the_round_and_can_come_back() {
    let f = fixture();
    let state = f.dir.join("state");
    let tokens = issue(&state, &["a", "b", "flaky"]);
    let rt = runtime();
    rt.block_on(async {
        let server = Server::bind(settings(&f, &state, 3, 2), Identity::self_signed_in(&state).unwrap()).unwrap();
        let (addr, fp) = (server.local_addr().unwrap(), server.fingerprint().to_string());
        // The flaky client authenticates and gets ready by hand, so it is sampled in round 1; it drops out when its
        // task arrives.
        let (task_tx, task_rx) = tokio::sync::oneshot::channel();
        let flaky_token = tokens[2].clone();
        let fp2 = fp.clone();
        let flaky = tokio::spawn(async move {
            let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
            ep.set_default_client_config(quic_client(&Trust::Pinned(fp2), None).unwrap());
            let conn = ep.connect(addr, SERVER_NAME).unwrap().await.unwrap();
            let (mut send, mut recv) = conn.open_bi().await.unwrap();
            let (mut sm, hello) = ClientConn::new(
                Limits::default(),
                Hello {
                    client_name: "flaky".into(),
                    token: flaky_token,
                },
            );
            send.write_all(&hello).await.unwrap();
            let mut buf = vec![0u8; 65536];
            let mut task_tx = Some(task_tx);
            loop {
                let n = recv.read(&mut buf).await.unwrap().unwrap();
                for ev in sm.receive(&buf[..n]).unwrap() {
                    match ev {
                        ClientEvent::Welcome(_) => send.write_all(&sm.ready().unwrap()).await.unwrap(),
                        ClientEvent::Task(t) => {
                            conn.close(1u32.into(), b"killed");
                            task_tx.take().unwrap().send(t.round).unwrap();
                            return;
                        }
                        other => panic!("unexpected {other:?}"),
                    }
                }
            }
        });
        while server.ready_clients().is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let a = tokio::spawn(join_with(client(&server, &f.dir, "a", &tokens[0]), examples(0, 4)));
        let b = tokio::spawn(join_with(client(&server, &f.dir, "b", &tokens[1]), examples(1, 4)));
        while server.ready_clients().len() < 3 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let comeback = {
            let s = client(&server, &f.dir, "flaky", &tokens[2]);
            tokio::spawn(async move {
                assert_eq!(task_rx.await.unwrap(), 1);
                flaky.await.unwrap();
                join_with(s, examples(2, 4)).await
            })
        };
        let st = server.run(f.initial.clone(), None, &mut |_| {}).await.unwrap();
        assert_eq!(st.round, 3);
        let m = metrics(&state);
        assert_eq!(m[0]["sampled"], 3);
        assert_eq!(m[0]["participants"], 2, "round 1 completes with the two clients left");
        assert!(a.await.unwrap().unwrap().accepted == 3 && b.await.unwrap().unwrap().accepted == 3);
        let back = comeback.await.unwrap().unwrap();
        assert!(
            back.accepted >= 1,
            "the client that came back took part in a later round: {back:?}"
        );
        assert_eq!(st.clients["flaky"].accepted, back.accepted);
    });
}

#[test]
fn a_restarted_server_resumes_at_the_next_round_with_the_same_global_adapter() {
    let f = fixture();
    let state = f.dir.join("state");
    let tokens = issue(&state, &["a", "b"]);
    let rt = runtime();
    // `kill_after`: the server is dropped in the middle of the next round, once this round has completed (a crash:
    // no goodbye, the round in flight never finishes).
    let run = |rounds: u64, tag: &str, kill_after: Option<u64>| {
        let tag = tag.to_string();
        rt.block_on(async {
            let server = Server::bind(
                settings(&f, &state, rounds, 2),
                Identity::self_signed_in(&state).unwrap(),
            )
            .unwrap();
            let hs: Vec<_> = ["a", "b"]
                .iter()
                .zip(&tokens)
                .enumerate()
                .map(|(i, (n, t))| {
                    let mut s = client(&server, &f.dir, n, t);
                    s.save_updates = Some(f.dir.join(format!("{n}-{tag}")));
                    tokio::spawn(join_with(s, examples(i as u32, 4)))
                })
                .collect();
            let (done_tx, mut done_rx) = tokio::sync::watch::channel(0u64);
            let mut on_round = move |r: &RoundReport| {
                let _ = done_tx.send(r.round);
            };
            let killed = async {
                match kill_after {
                    Some(k) => {
                        // Fires at the first await after round k completed: the next round's tasks are out, no
                        // update of it can have been processed.
                        let _ = done_rx.wait_for(|&r| r >= k).await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            let st = tokio::select! {
                st = server.run(f.initial.clone(), None, &mut on_round) => Some(st.unwrap()),
                _ = killed => None,
            };
            for h in hs {
                if st.is_some() {
                    h.await.unwrap().unwrap();
                } else {
                    h.abort();
                }
            }
            st
        })
    };
    assert!(run(2, "first", Some(1)).is_none());
    let saved = ServerState::load(&state).unwrap().unwrap();
    assert_eq!(saved.round, 1, "the state on disk is the last completed round");
    let second = run(2, "second", None).unwrap();
    assert_eq!(second.round, 2);
    let rounds: Vec<u64> = metrics(&state).iter().map(|r| r["round"].as_u64().unwrap()).collect();
    assert_eq!(
        rounds,
        vec![1, 2],
        "round 2 was lost in the crash and run once by the restarted server"
    );
    // Round 2 started from the saved global adapter: the result is exactly its FedAvg with round 2's updates.
    let load = |n: &str| {
        let (p, meta) = read_safetensors(&f.dir.join(format!("{n}-second/round-2.safetensors"))).unwrap();
        (meta["num_examples"].parse::<u64>().unwrap(), p)
    };
    let expected = fedavg(&saved.global, &[load("a"), load("b")]);
    assert!(max_diff(&expected, &second.global) < 1e-6);
    assert!(!f.dir.join("a-second/round-1.safetensors").exists());
}

#[test]
fn fedprox_keeps_local_training_closer_to_the_global_adapter() {
    let f = fixture();
    let emu = Emulator::open(&f.emulator).unwrap();
    let device = burn::tensor::Device::flex();
    let layers = emu.manifest().adapter_layers.clone();
    let settings = TrainConfig {
        steps: 6,
        batch_size: 2,
        lr: 2e-2,
        min_lr: 2e-2,
        max_grad_norm: None,
        seed: 1,
        ..TrainConfig::default()
    };
    let norm = |mu: f64| {
        let (model, _) = spec()
            .prepare(emu.load_model(&device.clone().autodiff()).unwrap(), &layers, None)
            .unwrap();
        let (_, r) = train_round(model, &f.initial, &settings, mu, &examples(0, 8), &mut |_| {}).unwrap();
        l2_norm(&r.delta)
    };
    let (plain, same, prox) = (norm(0.0), norm(0.0), norm(50.0));
    assert_eq!(plain, same, "local training is deterministic");
    assert!(
        prox < 0.9 * plain,
        "μ = 50 pulls towards the global adapter: ‖Δ‖ {prox} vs {plain}"
    );
}

#[test]
fn an_interrupted_download_resumes_and_a_corrupt_partial_file_is_discarded() {
    let f = fixture();
    let state = f.dir.join("state");
    let tokens = issue(&state, &["a", "b"]);
    let emulator = std::fs::read(&f.emulator).unwrap();
    let source = EmulatorSource::open(f.emulator.clone(), 64 * 1024).unwrap();
    assert!(source.offer.chunks() >= 3, "the test needs a multi-chunk emulator");
    let sha = source.offer.sha256.clone();
    // Client a stopped after 1.5 chunks; client b holds 2 chunks of which the first was corrupted on disk.
    let cache_a = f.dir.join("a-cache");
    std::fs::create_dir_all(&cache_a).unwrap();
    std::fs::write(cache_a.join(format!("{sha}.part")), &emulator[..96 * 1024]).unwrap();
    let cache_b = f.dir.join("b-cache");
    std::fs::create_dir_all(&cache_b).unwrap();
    let mut bad = emulator[..128 * 1024].to_vec();
    bad[10] ^= 0xff;
    std::fs::write(cache_b.join(format!("{sha}.part")), &bad).unwrap();
    let rt = runtime();
    let (a, b) = rt.block_on(async {
        let server = Server::bind(settings(&f, &state, 1, 2), Identity::self_signed_in(&state).unwrap()).unwrap();
        let a = tokio::spawn(join_with(client(&server, &f.dir, "a", &tokens[0]), examples(0, 4)));
        let b = tokio::spawn(join_with(client(&server, &f.dir, "b", &tokens[1]), examples(1, 4)));
        server.run(f.initial.clone(), None, &mut |_| {}).await.unwrap();
        (a.await.unwrap().unwrap(), b.await.unwrap().unwrap())
    });
    assert_eq!(
        (a.connections, a.accepted),
        (1, 1),
        "a resumed and finished on its first connection"
    );
    // b resumed from chunk 2, the whole-file hash failed, the part was discarded and the next connection
    // downloaded it all.
    assert_eq!((b.connections, b.accepted), (2, 1));
    for cache in [cache_a, cache_b] {
        assert_eq!(std::fs::read(cache.join(format!("{sha}.emu"))).unwrap(), emulator);
        assert!(!cache.join(format!("{sha}.part")).exists());
    }
}

#[test]
fn a_wrong_pinned_fingerprint_is_refused_before_anything_is_sent() {
    let f = fixture();
    let state = f.dir.join("state");
    let tokens = issue(&state, &["a"]);
    let rt = runtime();
    rt.block_on(async {
        let server = Server::bind(settings(&f, &state, 1, 1), Identity::self_signed_in(&state).unwrap()).unwrap();
        let mut s = client(&server, &f.dir, "a", &tokens[0]);
        // The real fingerprint with its last hex digit changed.
        let real = server.fingerprint().to_string();
        let last = if real.ends_with('0') { '1' } else { '0' };
        s.trust = Trust::Pinned(format!("{}{last}", &real[..real.len() - 1]));
        s.max_reconnects = 0;
        let e = join_with(s, examples(0, 4)).await.unwrap_err();
        assert!(matches!(e, NetError::Connection(_)), "{e}");
        assert!(
            !f.dir.join("a-cache").exists(),
            "no emulator byte reached a client that does not trust the server"
        );
        assert!(server.ready_clients().is_empty());
    });
}

#[test]
fn mutual_tls_admits_only_clients_with_a_certificate_from_the_ca() {
    let f = fixture();
    let state = f.dir.join("state");
    let tokens = issue(&state, &["client-a", "b", "client-c"]);
    // A CA and a client certificate it issued, to client-a.
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap()).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["client-a".to_string()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    let pems = f.dir.join("pki");
    std::fs::create_dir_all(&pems).unwrap();
    std::fs::write(pems.join("ca.pem"), ca.pem()).unwrap();
    std::fs::write(pems.join("a.pem"), cert.pem()).unwrap();
    std::fs::write(pems.join("a.key"), key.serialize_pem()).unwrap();
    let rt = runtime();
    rt.block_on(async {
        let mut s = settings(&f, &state, 1, 1);
        s.client_ca = Some(pems.join("ca.pem"));
        let server = Server::bind(s, Identity::self_signed_in(&state).unwrap()).unwrap();
        // Without a certificate the handshake fails, even with a valid token.
        let mut no_cert = client(&server, &f.dir, "b", &tokens[1]);
        no_cert.max_reconnects = 0;
        let e = join_with(no_cert, examples(1, 4)).await.unwrap_err();
        assert!(matches!(e, NetError::Connection(_)), "{e}");
        assert!(!f.dir.join("b-cache").exists());
        // client-a's certificate with client-c's token: refused, the certificate names another client.
        let mut borrowed = client(&server, &f.dir, "c", &tokens[2]);
        borrowed.client_cert = Some((pems.join("a.pem"), pems.join("a.key")));
        borrowed.max_reconnects = 0;
        let e = join_with(borrowed, examples(2, 4)).await.unwrap_err();
        assert!(
            matches!(&e, NetError::Refused(r) if r.contains("not issued to `client-c`")),
            "{e}"
        );
        let mut with_cert = client(&server, &f.dir, "a", &tokens[0]);
        with_cert.client_cert = Some((pems.join("a.pem"), pems.join("a.key")));
        let h = tokio::spawn(join_with(with_cert, examples(0, 4)));
        server.run(f.initial.clone(), None, &mut |_| {}).await.unwrap();
        assert_eq!(h.await.unwrap().unwrap().accepted, 1);
    });
}
