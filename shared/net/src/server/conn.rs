//! One client connection: moves bytes between the QUIC stream and its `ServerConn` state machine, checks the token,
//! streams emulator chunks, and tells the round loop what happened (ready, update, gone). However the connection
//! ends, the client's ready entry and session go with it and the coordinator hears of it ([`Departure`]). One hello
//! window runs from the connection's arrival to its authentication (handshake, stream and hello together); a client
//! has one live session (a newer connection closes the older); the emulator is sent once per connection; a large
//! frame (an update) takes its place in the round loop's bounded queue as soon as its header is in, before its body
//! is read, so the updates in memory — being received or waiting — are bounded however many clients send at once.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use offsite_fed::{Event, Outgoing, TokenStore};
use offsite_protocol::{ProtocolError, ServerConn, ServerInput, Welcome};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, info, warn};

use super::{ClientHandle, Queued, Session, Shared};
use crate::{NetError, READ_BUF};

async fn write(shared: &Shared, send: &mut quinn::SendStream, bytes: &[u8]) -> Result<(), NetError> {
    send.write_all(bytes)
        .await
        .map_err(|e| NetError::Connection(e.to_string()))?;
    shared.bytes_out.fetch_add(bytes.len() as u64, Ordering::Relaxed);
    Ok(())
}

/// Frames above this size (updates) wait for a place in the round loop's queue before their body is read.
const LARGE_FRAME: u32 = 64 << 10;

/// This connection's one place in the update queue, then one of all ([`super::UPDATE_QUEUE`]); `None` only if the
/// queues were closed, which they are not while the server lives.
async fn queue_places(own: &Arc<Semaphore>, shared: &Shared) -> Option<Vec<OwnedSemaphorePermit>> {
    let own = own.clone().acquire_owned().await.ok()?;
    let all = shared.update_queue.clone().acquire_owned().await.ok()?;
    Some(vec![own, all])
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
        if let Ok(mut m) = self.shared.sessions.lock() {
            if m.get(&client).is_some_and(|s| s.conn == self.conn) {
                m.remove(&client);
            }
        }
        if let Ok(mut m) = self.shared.ready.lock() {
            if m.get(&client).is_some_and(|h| h.conn == self.conn) {
                m.remove(&client);
            }
        }
        let event = Event::Disconnected {
            client,
            conn: self.conn,
        };
        let _ = self.shared.events.send(Queued {
            event,
            _permits: Vec::new(),
        });
    }
}

/// Mutual TLS ties a certificate to one client: its end-entity certificate must be valid for the name `id` (a DNS
/// subject alternative name, as rcgen and most CAs issue), so one client's certificate cannot carry another's token.
fn certificate_names(conn: &quinn::Connection, id: &str) -> Result<(), String> {
    use rustls::pki_types::{CertificateDer, ServerName};
    let certs = conn
        .peer_identity()
        .and_then(|i| i.downcast::<Vec<CertificateDer<'static>>>().ok())
        .ok_or("no client certificate")?;
    let leaf = certs.first().ok_or("an empty client certificate chain")?;
    let cert = webpki::EndEntityCert::try_from(leaf).map_err(|e| format!("unreadable client certificate: {e:?}"))?;
    let name =
        ServerName::try_from(id).map_err(|_| format!("client id `{id}` is not a name a certificate can carry"))?;
    cert.verify_is_valid_for_subject_name(&name)
        .map_err(|_| format!("the client certificate is not issued to `{id}`"))
}

/// A client-chosen name as it goes into the logs: at most 64 characters, control characters escaped (no forged
/// log lines).
fn printable(name: &str) -> String {
    name.chars().take(64).flat_map(char::escape_debug).collect()
}

/// One client connection: the protocol state machine between the stream and the round loop.
pub(super) async fn connection(shared: Arc<Shared>, incoming: quinn::Incoming) -> Result<(), NetError> {
    let deadline = tokio::time::Instant::now() + shared.hello_timeout;
    let late = |what: &str| NetError::Connection(format!("{what} before the hello deadline"));
    let conn = tokio::time::timeout_at(deadline, incoming)
        .await
        .map_err(|_| late("no TLS handshake"))?
        .map_err(|e| NetError::Connection(e.to_string()))?;
    let conn_id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
    let (mut send, mut recv) = tokio::time::timeout_at(deadline, conn.accept_bi())
        .await
        .map_err(|_| late("no stream opened"))?
        .map_err(|e| NetError::Connection(e.to_string()))?;
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    let mut sm = ServerConn::new(shared.limits, Instant::now(), left);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut tx = Some(tx);
    let mut client: Option<String> = None;
    let mut departure = Departure {
        shared: shared.clone(),
        conn: conn_id,
        client: None,
    };
    let mut emulator_sent = false;
    // At most one update of this connection is received or waits for the round loop.
    let own_queue = Arc::new(Semaphore::new(1));
    // The queue places taken for the large frame under way (its header is in, its body is not).
    let mut places: Vec<OwnedSemaphorePermit> = Vec::new();
    let hello_deadline = tokio::time::sleep_until(deadline);
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
                                warn!(name = %printable(&h.client_name), "unknown or revoked token");
                                let _ = write(&shared, &mut send, &sm.reject("unknown or revoked token")).await;
                                stop = Some(Err(NetError::Refused("unknown or revoked token".into())));
                                break;
                            };
                            if shared.bind_client_certs {
                                if let Err(reason) = certificate_names(&conn, &id) {
                                    warn!(client = %id, %reason, "client certificate refused");
                                    let _ = write(&shared, &mut send, &sm.reject(&reason)).await;
                                    stop = Some(Err(NetError::Refused(reason)));
                                    break;
                                }
                            }
                            info!(client = %id, name = %printable(&h.client_name), "client authenticated");
                            // One live session per client: a newer connection (a reconnect, or a stolen token)
                            // closes the older, and the logs say so.
                            let session = Session { conn: conn_id, connection: conn.clone(), token: h.token.clone() };
                            let older = shared.sessions.lock().ok().and_then(|mut m| m.insert(id.clone(), session));
                            if let Some(Session { connection: older, .. }) = older {
                                warn!(client = %id, "a second connection of this client: closing the older one");
                                older.close(2u32.into(), b"replaced by a newer connection of the same client");
                            }
                            departure.client = Some(id.clone());
                            let welcome = Welcome {
                                client_id: id.clone(),
                                emulator: shared.emulator.offer.clone(),
                                adapter: shared.adapter_json.clone(),
                                max_update_bytes: 0, // filled in by `accept` from the connection's limits
                            };
                            write(&shared, &mut send, &sm.accept(welcome)?).await?;
                            client = Some(id);
                        }
                        ServerInput::FetchEmulator { from_chunk } => {
                            if std::mem::replace(&mut emulator_sent, true) {
                                let reason = "the emulator was already sent on this connection";
                                warn!(client = ?client, reason);
                                let _ = write(&shared, &mut send, &sm.reject(reason)).await;
                                stop = Some(Err(NetError::Connection(reason.into())));
                                break;
                            }
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
                            let event = Event::Ready { client: id, conn: conn_id };
                            let _ = shared.events.send(Queued { event, _permits: Vec::new() });
                        }
                        ServerInput::Update(_) | ServerInput::SecAgg(_) => {
                            if let Some(id) = &client {
                                let event = match input {
                                    ServerInput::Update(u) => {
                                        debug!(client = %id, round = u.round, bytes = n, "update received");
                                        Event::Update { client: id.clone(), conn: conn_id, update: u }
                                    }
                                    ServerInput::SecAgg(m) => {
                                        debug!(client = %id, kind = m.kind(), round = m.round(), "secure-aggregation message");
                                        Event::SecAgg { client: id.clone(), conn: conn_id, message: m }
                                    }
                                    _ => continue,
                                };
                                // A small update (its frame came whole) takes its places now; a masked update
                                // queues as a plain one.
                                let permits = match std::mem::take(&mut places) {
                                    p if !p.is_empty() => p,
                                    _ => match queue_places(&own_queue, &shared).await {
                                        Some(p) => p,
                                        None => { stop = Some(Ok(())); break; }
                                    },
                                };
                                let _ = shared.events.send(Queued { event, _permits: permits });
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
                // A large frame has begun: wait for room in the queue before reading its body (nothing more is
                // read from this client meanwhile); places not held by a large frame under way are given back.
                if sm.incoming_len().is_some_and(|len| len > LARGE_FRAME) {
                    if places.is_empty() {
                        match queue_places(&own_queue, &shared).await {
                            Some(p) => places = p,
                            None => break Ok(()),
                        }
                    }
                } else {
                    places.clear();
                }
            }
            out = rx.recv() => {
                let bytes = match out {
                    Some(Outgoing::Task(t)) => sm.task(&t)?,
                    Some(Outgoing::Ack(a)) => sm.ack(a),
                    Some(Outgoing::SecAgg(m)) => sm.secagg(&m)?,
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
