//! Hostile and broken peers over real QUIC on 127.0.0.1:0: a second connection with the same token, a token revoked
//! while its connection is live, a second emulator download on one connection, connection floods from one address,
//! and a damaged emulator in a client's cache.

use std::time::Duration;

use offsite_fed::TokenStore;
use offsite_net::{join, quic_client, ConnectionLimits, EmulatorSource, Identity, Server, Trust, SERVER_NAME};
use offsite_protocol::{ClientConn, ClientEvent, Hello, Limits};

mod fed_common;
use fed_common::*;

/// An authenticated protocol session held open: the connection, its stream halves and the client state machine.
struct Session {
    _endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    sm: ClientConn,
}

async fn connect(server: &Server) -> (quinn::Endpoint, Result<quinn::Connection, quinn::ConnectionError>) {
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(quic_client(&Trust::Pinned(server.fingerprint().into()), None).unwrap());
    let conn = ep.connect(server.local_addr().unwrap(), SERVER_NAME).unwrap().await;
    (ep, conn)
}

/// Says hello with `token` and waits for the welcome.
async fn session(server: &Server, token: &str) -> Session {
    let (endpoint, conn) = connect(server).await;
    let conn = conn.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let hello = Hello {
        client_name: "hostile\nforged log line".into(),
        token: token.into(),
    };
    let (mut sm, bytes) = ClientConn::new(Limits::default(), hello);
    send.write_all(&bytes).await.unwrap();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = recv
            .read(&mut buf)
            .await
            .unwrap()
            .expect("a welcome before the stream ends");
        let events = sm.receive(&buf[..n]).unwrap();
        if events.iter().any(|e| matches!(e, ClientEvent::Welcome(_))) {
            break;
        }
    }
    Session {
        _endpoint: endpoint,
        conn,
        send,
        recv,
        sm,
    }
}

/// How the server ended `conn`, within `secs` seconds.
async fn closed_within(conn: &quinn::Connection, secs: u64) -> quinn::ConnectionError {
    tokio::time::timeout(Duration::from_secs(secs), conn.closed())
        .await
        .expect("the server closed the connection")
}

fn reason(e: &quinn::ConnectionError) -> String {
    match e {
        quinn::ConnectionError::ApplicationClosed(c) => String::from_utf8_lossy(&c.reason).into_owned(),
        other => other.to_string(),
    }
}

#[test]
fn a_second_connection_with_the_same_token_closes_the_first() {
    let f = fixture();
    let state = f.dir.join("state");
    let tokens = issue(&state, &["a"]);
    runtime().block_on(async {
        let server = Server::bind(settings(&f, &state, 1, 1), Identity::self_signed_in(&state).unwrap()).unwrap();
        let first = session(&server, &tokens[0]).await;
        let second = session(&server, &tokens[0]).await;
        let e = closed_within(&first.conn, 5).await;
        assert!(reason(&e).contains("replaced by a newer connection"), "{e}");
        assert!(second.conn.close_reason().is_none(), "the newer session lives on");
    });
}

#[test]
fn revoking_a_token_closes_its_live_connection_at_once() {
    let f = fixture();
    let state = f.dir.join("state");
    let tokens = issue(&state, &["a", "b"]);
    runtime().block_on(async {
        let server = Server::bind(settings(&f, &state, 1, 1), Identity::self_signed_in(&state).unwrap()).unwrap();
        let a = session(&server, &tokens[0]).await;
        let b = session(&server, &tokens[1]).await;
        let path = TokenStore::path(&state);
        // Revoked and reissued at once (a stolen token replaced): the session on the old token still ends.
        let mut store = TokenStore::load(&path).unwrap();
        store.revoke("a").unwrap();
        store.issue("a").unwrap();
        store.save(&path).unwrap();
        let e = closed_within(&a.conn, 5).await;
        assert!(reason(&e).contains("token revoked"), "{e}");
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(
            b.conn.close_reason().is_none(),
            "the other client's session is untouched"
        );
    });
}

#[test]
fn the_emulator_is_sent_once_per_connection() {
    let f = fixture();
    let state = f.dir.join("state");
    let tokens = issue(&state, &["a"]);
    runtime().block_on(async {
        let server = Server::bind(settings(&f, &state, 1, 1), Identity::self_signed_in(&state).unwrap()).unwrap();
        let mut s = session(&server, &tokens[0]).await;
        // Asking twice at once for the whole file (a client pipelining downloads to make the server read and send
        // it over and over).
        let mut twice = s.sm.fetch(0).unwrap();
        twice.extend(s.sm.fetch(0).unwrap());
        s.send.write_all(&twice).await.unwrap();
        let mut got: Vec<u8> = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        let mut rejected = None;
        while rejected.is_none() {
            let Ok(Some(n)) = s.recv.read(&mut buf).await else {
                break;
            };
            got.extend(&buf[..n]);
            if let Ok(events) = s.sm.receive(&buf[..n]) {
                rejected = events.into_iter().find_map(|e| match e {
                    ClientEvent::Rejected(r) => Some(r),
                    _ => None,
                });
            }
        }
        let r = rejected.expect("the second fetch is refused");
        assert!(r.contains("already sent on this connection"), "{r}");
        let size = EmulatorSource::open(f.emulator.clone(), 64 * 1024).unwrap().offer.size as usize;
        assert!(
            got.len() < 2 * size,
            "one copy went out, not two ({} bytes for a {size}-byte file)",
            got.len()
        );
    });
}

#[test]
fn connections_over_the_per_address_cap_are_refused_and_a_closed_one_frees_its_place() {
    let f = fixture();
    let state = f.dir.join("state");
    issue(&state, &["a"]);
    runtime().block_on(async {
        let mut s = settings(&f, &state, 1, 1);
        s.connections = ConnectionLimits {
            max: 100,
            per_address: 2,
        };
        let server = Server::bind(s, Identity::self_signed_in(&state).unwrap()).unwrap();
        let (_e1, c1) = connect(&server).await;
        let (_e2, c2) = connect(&server).await;
        let (c1, _c2) = (c1.unwrap(), c2.unwrap());
        let (_e3, c3) = connect(&server).await;
        let e = c3.expect_err("a third connection from 127.0.0.1 is refused");
        assert!(e.to_string().to_lowercase().contains("refused"), "{e}");
        c1.close(0u32.into(), b"done");
        // The server's task for it ends when it hears of the close; then there is room again.
        let mut admitted = false;
        for _ in 0..50 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let (_e, c) = connect(&server).await;
            if c.is_ok() {
                admitted = true;
                break;
            }
        }
        assert!(admitted, "a closed connection gives its place back");
    });
}

#[test]
fn a_damaged_emulator_in_the_cache_is_downloaded_again() {
    let f = fixture();
    let state = f.dir.join("state");
    let tokens = issue(&state, &["a"]);
    runtime().block_on(async {
        let server = Server::bind(settings(&f, &state, 1, 1), Identity::self_signed_in(&state).unwrap()).unwrap();
        let settings = client(&server, &f.dir, "a", &tokens[0]);
        let sha = EmulatorSource::open(f.emulator.clone(), 64 * 1024)
            .unwrap()
            .offer
            .sha256;
        std::fs::create_dir_all(&settings.cache_dir).unwrap();
        let cached = settings.cache_dir.join(format!("{sha}.emu"));
        std::fs::write(&cached, b"not the emulator").unwrap();
        let h = tokio::spawn(join(settings, trainer(examples(0, 4))));
        let st = server.run(f.initial.clone(), None, &mut |_| {}).await.unwrap();
        assert_eq!(st.round, 1);
        assert_eq!(
            h.await.unwrap().unwrap().accepted,
            1,
            "the client trained on the real emulator"
        );
        assert_eq!(std::fs::read(&cached).unwrap(), std::fs::read(&f.emulator).unwrap());
    });
}
