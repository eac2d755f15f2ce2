//! One client connection: moves bytes between the QUIC stream and its `ServerConn` state machine, checks the token,
//! streams emulator chunks, and tells the round loop what happened (ready, update, gone). However the connection
//! ends, the client's ready entry goes with it and the coordinator hears of it ([`Departure`]).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use offsite_fed::{Event, Outgoing, TokenStore};
use offsite_protocol::{ProtocolError, ServerConn, ServerInput, Welcome};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::{ClientHandle, Shared};
use crate::{NetError, READ_BUF};

async fn write(shared: &Shared, send: &mut quinn::SendStream, bytes: &[u8]) -> Result<(), NetError> {
    send.write_all(bytes)
        .await
        .map_err(|e| NetError::Connection(e.to_string()))?;
    shared.bytes_out.fetch_add(bytes.len() as u64, Ordering::Relaxed);
    Ok(())
}

/// Ends a ready client's entry when the connection task ends, on every path (early returns included).
struct Departure {
    shared: Arc<Shared>,
    conn: u64,
    client: Option<String>,
}

impl Drop for Departure {
    fn drop(&mut self) {
        let Some(client) = self.client.take() else { return };
        if let Ok(mut m) = self.shared.ready.lock() {
            if m.get(&client).is_some_and(|h| h.conn == self.conn) {
                m.remove(&client);
            }
        }
        let _ = self.shared.events.send(Event::Disconnected {
            client,
            conn: self.conn,
        });
    }
}

/// One client connection: the protocol state machine between the stream and the round loop.
pub(super) async fn connection(shared: Arc<Shared>, incoming: quinn::Incoming) -> Result<(), NetError> {
    let conn = incoming.await.map_err(|e| NetError::Connection(e.to_string()))?;
    let conn_id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
    let (mut send, mut recv) = tokio::time::timeout(shared.hello_timeout, conn.accept_bi())
        .await
        .map_err(|_| NetError::Connection("no stream opened before the hello deadline".into()))?
        .map_err(|e| NetError::Connection(e.to_string()))?;
    let mut sm = ServerConn::new(shared.limits, Instant::now(), shared.hello_timeout);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut tx = Some(tx);
    let mut client: Option<String> = None;
    let mut departure = Departure {
        shared: shared.clone(),
        conn: conn_id,
        client: None,
    };
    let hello_deadline = tokio::time::sleep(shared.hello_timeout);
    tokio::pin!(hello_deadline);
    let mut buf = vec![0u8; READ_BUF];
    let result: Result<(), NetError> = loop {
        tokio::select! {
            r = recv.read(&mut buf) => {
                let n = match r {
                    Ok(Some(n)) => n,
                    Ok(None) => match sm.finish() {
                        Ok(()) => break Ok(()),
                        Err(e) => {
                            warn!(client = ?client, error = %e, "stream ended inside a frame; closing");
                            let _ = write(&shared, &mut send, &sm.reject(&e.to_string())).await;
                            break Err(e.into());
                        }
                    },
                    Err(e) => break Err(NetError::Connection(e.to_string())),
                };
                shared.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
                let inputs = match sm.receive(&buf[..n], Instant::now()) {
                    Ok(i) => i,
                    Err(e) => {
                        warn!(client = ?client, error = %e, "protocol error; closing");
                        let _ = write(&shared, &mut send, &sm.reject(&e.to_string())).await;
                        break Err(e.into());
                    }
                };
                let mut stop = None;
                for input in inputs {
                    match input {
                        ServerInput::Hello(h) => {
                            let id = TokenStore::load(&shared.tokens)
                                .ok()
                                .and_then(|s| s.authenticate(&h.token).map(str::to_string));
                            let Some(id) = id else {
                                warn!(name = %h.client_name, "unknown or revoked token");
                                let _ = write(&shared, &mut send, &sm.reject("unknown or revoked token")).await;
                                stop = Some(Err(NetError::Refused("unknown or revoked token".into())));
                                break;
                            };
                            info!(client = %id, name = %h.client_name, "client authenticated");
                            let welcome = Welcome {
                                client_id: id.clone(),
                                emulator: shared.emulator.offer.clone(),
                                adapter: shared.adapter_json.clone(),
                            };
                            write(&shared, &mut send, &sm.accept(welcome)?).await?;
                            client = Some(id);
                        }
                        ServerInput::FetchEmulator { from_chunk } => {
                            let chunks = shared.emulator.offer.chunks();
                            info!(client = ?client, from_chunk, chunks, "sending the emulator");
                            for i in from_chunk..chunks {
                                let em = shared.emulator.clone();
                                let data = tokio::task::spawn_blocking(move || em.read_chunk(i))
                                    .await
                                    .map_err(|e| NetError::Connection(e.to_string()))?
                                    .map_err(|e| NetError::File { path: shared.emulator.path.clone(), reason: e.to_string() })?;
                                write(&shared, &mut send, &sm.chunk(i, data)?).await?;
                            }
                        }
                        ServerInput::Ready => {
                            let (Some(id), Some(tx)) = (client.clone(), tx.take()) else { continue };
                            if let Ok(mut m) = shared.ready.lock() {
                                m.insert(id.clone(), ClientHandle { conn: conn_id, tx });
                            }
                            departure.client = Some(id.clone());
                            let _ = shared.events.send(Event::Ready { client: id, conn: conn_id });
                        }
                        ServerInput::Update(u) => {
                            if let Some(id) = &client {
                                debug!(client = %id, round = u.round, bytes = n, "update received");
                                let event = Event::Update { client: id.clone(), conn: conn_id, update: u };
                                let _ = shared.events.send(event);
                            }
                        }
                        ServerInput::Goodbye(reason) => {
                            info!(client = ?client, %reason, "client left");
                            stop = Some(Ok(()));
                            break;
                        }
                    }
                }
                if let Some(r) = stop { break r; }
            }
            out = rx.recv() => {
                let bytes = match out {
                    Some(Outgoing::Task(t)) => sm.task(&t)?,
                    Some(Outgoing::Ack(a)) => sm.ack(a),
                    Some(Outgoing::Goodbye(reason)) => {
                        let bytes = sm.goodbye(&reason);
                        write(&shared, &mut send, &bytes).await?;
                        let _ = send.finish();
                        let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
                        break Ok(());
                    }
                    // Replaced by a newer connection of the same client.
                    None => break Ok(()),
                };
                write(&shared, &mut send, &bytes).await?;
            }
            _ = &mut hello_deadline, if !sm.is_authenticated() && client.is_none() => {
                let e = sm.timeout(Instant::now()).unwrap_or(ProtocolError::HelloTimeout(shared.hello_timeout));
                let _ = write(&shared, &mut send, &sm.reject(&e.to_string())).await;
                break Err(e.into());
            }
        }
    };
    drop(departure);
    // Let what was written (a rejection with its reason, say) reach the peer before closing.
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
    conn.close(0u32.into(), b"bye");
    result
}
