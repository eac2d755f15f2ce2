//! The federation server: accepts QUIC connections, authenticates clients by token, streams the emulator, runs
//! rounds (sample, send tasks, collect and validate updates until the deadline, aggregate), persists its state
//! after every round and logs metrics.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::tls::Identity;
use super::READ_BUF;
use crate::fed::params::{hash, to_wire, Params};
use crate::fed::{
    sample_clients, validate, FedError, FederationConfig, LocalConfig, ServerState, StrategyConfig,
    TokenStore,
};
use crate::protocol::{
    EmulatorOffer, Limits, ServerConn, ServerInput, Task, Update, UpdateAck, Welcome,
};

/// The emulator file the server hands out.
#[derive(Debug, Clone)]
pub struct EmulatorSource {
    /// The file.
    pub path: PathBuf,
    /// Its offer (size and SHA-256 of the whole file).
    pub offer: EmulatorOffer,
}

impl EmulatorSource {
    /// Hashes `path` and offers it in chunks of `chunk_size` bytes.
    pub fn open(path: PathBuf, chunk_size: u32) -> Result<Self, FedError> {
        use sha2::{Digest, Sha256};
        let err = |e: std::io::Error| FedError::File {
            path: path.clone(),
            reason: e.to_string(),
        };
        let mut f = std::fs::File::open(&path).map_err(err)?;
        let mut h = Sha256::new();
        let size = std::io::copy(&mut f, &mut h).map_err(err)?;
        Ok(EmulatorSource {
            offer: EmulatorOffer {
                sha256: hex::encode(h.finalize()),
                size,
                chunk_size: chunk_size.max(1),
            },
            path,
        })
    }

    fn read_chunk(&self, index: u32) -> std::io::Result<Vec<u8>> {
        let mut f = std::fs::File::open(&self.path)?;
        f.seek(SeekFrom::Start(index as u64 * self.offer.chunk_size as u64))?;
        let mut buf = vec![0; self.offer.chunk_len(index)];
        f.read_exact(&mut buf)?;
        Ok(buf)
    }
}

/// Everything `serve` needs besides the initial adapter.
#[derive(Debug, Clone)]
pub struct ServeSettings {
    /// Address to listen on (`127.0.0.1:0` picks a free port).
    pub listen: SocketAddr,
    /// Where state, tokens, certificate and metrics live.
    pub state_dir: PathBuf,
    /// The emulator on offer.
    pub emulator: EmulatorSource,
    /// The `[adapter]` table as JSON, sent to clients.
    pub adapter_json: String,
    /// Rounds, sampling, deadlines.
    pub federation: FederationConfig,
    /// Clients' local training.
    pub local: LocalConfig,
    /// Aggregation.
    pub strategy: StrategyConfig,
    /// Seconds a new connection has to say hello.
    pub hello_timeout_s: f64,
    /// Require client certificates issued by this CA (PEM), in addition to tokens.
    pub client_ca: Option<PathBuf>,
}

/// One completed round, as logged to `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RoundReport {
    /// The round.
    pub round: u64,
    /// Clients sampled.
    pub sampled: usize,
    /// Updates aggregated.
    pub participants: usize,
    /// Updates refused (late, stale, wrong shape, non-finite, over the norm limit).
    pub rejected: usize,
    /// Bytes received during the round.
    pub bytes_in: u64,
    /// Bytes sent during the round.
    pub bytes_out: u64,
    /// Example-weighted mean of the clients' training loss.
    pub train_loss: f64,
    /// Perplexity of the plug-in model, when evaluated this round.
    pub eval_perplexity: Option<f64>,
    /// Seconds the round took.
    pub wall_s: f64,
    /// SHA-256 of the new global adapter.
    pub global_sha256: String,
}

/// Evaluates the plug-in model (full model + global adapter): round, global state → perplexity.
pub type Evaluator = Box<dyn FnMut(u64, &Params) -> Result<f64, String> + Send>;

enum Outgoing {
    Task(Arc<Task>),
    Ack(UpdateAck),
    Goodbye(String),
}

struct ClientHandle {
    conn: u64,
    tx: mpsc::UnboundedSender<Outgoing>,
}

struct Shared {
    tokens: PathBuf,
    emulator: EmulatorSource,
    adapter_json: String,
    limits: Limits,
    hello_timeout: Duration,
    ready: Mutex<HashMap<String, ClientHandle>>,
    updates: mpsc::UnboundedSender<(String, u64, Update)>,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    next_conn: AtomicU64,
}

/// A bound server, not yet running rounds.
pub struct Server {
    endpoint: quinn::Endpoint,
    fingerprint: String,
    settings: ServeSettings,
    shared: Arc<Shared>,
    updates: mpsc::UnboundedReceiver<(String, u64, Update)>,
}

impl Server {
    /// Binds the QUIC endpoint (TLS 1.3 with `identity`) and starts accepting clients.
    pub fn bind(settings: ServeSettings, identity: Identity) -> Result<Self, FedError> {
        let fingerprint = identity.fingerprint();
        let endpoint = quinn::Endpoint::server(identity.quic_server(settings.client_ca.as_deref())?, settings.listen)
            .map_err(|e| FedError::Connection(format!("binding {}: {e}", settings.listen)))?;
        let (tx, rx) = mpsc::unbounded_channel();
        let max_update = settings.federation.max_update_mib.saturating_mul(1 << 20);
        let shared = Arc::new(Shared {
            tokens: TokenStore::path(&settings.state_dir),
            emulator: settings.emulator.clone(),
            adapter_json: settings.adapter_json.clone(),
            limits: Limits::server(max_update),
            hello_timeout: Duration::from_secs_f64(settings.hello_timeout_s),
            ready: Mutex::new(HashMap::new()),
            updates: tx,
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            next_conn: AtomicU64::new(0),
        });
        let ep = endpoint.clone();
        let sh = shared.clone();
        tokio::spawn(async move {
            while let Some(incoming) = ep.accept().await {
                let sh = sh.clone();
                tokio::spawn(async move {
                    let peer = incoming.remote_address();
                    if let Err(e) = connection(sh, incoming).await {
                        debug!(%peer, error = %e, "connection ended");
                    }
                });
            }
        });
        Ok(Server {
            endpoint,
            fingerprint,
            settings,
            shared,
            updates: rx,
        })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> Result<SocketAddr, FedError> {
        self.endpoint
            .local_addr()
            .map_err(|e| FedError::Connection(e.to_string()))
    }

    /// SHA-256 of the server's certificate, for clients to pin.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The ids of the clients connected and ready for tasks.
    pub fn ready_clients(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.ready_conns().into_keys().collect();
        ids.sort();
        ids
    }

    fn ready_conns(&self) -> HashMap<String, u64> {
        self.shared
            .ready
            .lock()
            .map(|m| m.iter().map(|(k, h)| (k.clone(), h.conn)).collect())
            .unwrap_or_default()
    }

    /// Sends to the client's current connection; returns that connection's id when it was sent.
    fn send(&self, client: &str, msg: Outgoing) -> Option<u64> {
        let map = self.shared.ready.lock().ok()?;
        let h = map.get(client)?;
        h.tx.send(msg).ok().map(|_| h.conn)
    }

    fn reject(&self, client: &str, round: u64, reason: String) {
        warn!(client, round, %reason, "update rejected");
        self.send(
            client,
            Outgoing::Ack(UpdateAck {
                round,
                accepted: false,
                reason: Some(reason),
            }),
        );
    }

    /// Runs the remaining rounds from the saved state (or from `initial` on a fresh state directory), calling
    /// `on_round` after each; says goodbye to every client at the end and returns the final state.
    pub async fn run(
        mut self,
        initial: Params,
        mut evaluator: Option<Evaluator>,
        on_round: &mut (dyn FnMut(&RoundReport) + Send),
    ) -> Result<ServerState, FedError> {
        let fed = self.settings.federation.clone();
        let mut strategy = self.settings.strategy.build()?;
        let mut state = match ServerState::load(&self.settings.state_dir)? {
            Some(s) => {
                crate::fed::params::check_like(&initial, &s.global)?;
                strategy.restore(s.strategy.clone())?;
                info!(round = s.round, global = %hash(&s.global), "resuming from the saved state");
                s
            }
            None => ServerState {
                round: 0,
                global: initial,
                strategy: Params::new(),
                clients: Default::default(),
            },
        };
        let metrics_path = self.settings.state_dir.join("metrics.jsonl");
        let mu = self.settings.strategy.proximal_mu();
        while state.round < fed.rounds {
            let round = state.round + 1;
            let started = Instant::now();
            let ready = self.wait_for_clients(fed.min_clients, fed.wait_for_clients_s, round).await?;
            let sampled = sample_clients(&ready, fed.fraction, fed.min_clients, fed.seed, round);
            let (in0, out0) = (
                self.shared.bytes_in.load(Ordering::Relaxed),
                self.shared.bytes_out.load(Ordering::Relaxed),
            );
            let task = Arc::new(Task {
                round,
                global: to_wire(&state.global, crate::protocol::Encoding::F32),
                settings: self.settings.local.settings(mu, fed.seed, round),
                update_encoding: fed.update_encoding,
                deadline_ms: (fed.deadline_s * 1000.0) as u64,
            });
            // Who owes an update, by client and the connection the task went to.
            let mut pending: HashMap<String, u64> = HashMap::new();
            for id in &sampled {
                if let Some(conn) = self.send(id, Outgoing::Task(task.clone())) {
                    pending.insert(id.clone(), conn);
                }
            }
            info!(round, sampled = sampled.len(), ready = ready.len(), "round started");
            let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(fed.deadline_s);
            let (mut accepted, mut rejected, mut losses) = (Vec::new(), 0usize, Vec::new());
            while !pending.is_empty() {
                tokio::select! {
                    msg = self.updates.recv() => {
                        let Some((client, conn, update)) = msg else { break };
                        if pending.get(&client) != Some(&conn) {
                            rejected += 1;
                            let reason = if update.round == round {
                                "not sampled this round, or already answered".to_string()
                            } else {
                                format!("stale update: it answers round {}, the current round is {round}", update.round)
                            };
                            self.reject(&client, update.round, reason);
                            continue;
                        }
                        pending.remove(&client);
                        let record = state.clients.entry(client.clone()).or_default();
                        match validate(&client, &update, round, &state.global, fed.max_update_norm) {
                            Ok(u) => {
                                record.accepted += 1;
                                record.last_round = round;
                                losses.push((update.train_loss, update.num_examples));
                                accepted.push(u);
                                self.send(&client, Outgoing::Ack(UpdateAck { round, accepted: true, reason: None }));
                            }
                            Err(reason) => {
                                record.rejected += 1;
                                rejected += 1;
                                self.reject(&client, round, reason);
                            }
                        }
                    }
                    _ = tokio::time::sleep_until(deadline) => {
                        warn!(round, late = ?pending.keys().collect::<Vec<_>>(), "deadline passed");
                        break;
                    }
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {
                        // A client that dropped mid-round will not answer; the round goes on without it.
                        let alive = self.ready_conns();
                        pending.retain(|c, conn| {
                            let keep = alive.get(c) == Some(conn);
                            if !keep { warn!(round, client = %c, "client disconnected mid-round"); }
                            keep
                        });
                    }
                }
            }
            if accepted.len() < fed.min_clients.max(1) {
                warn!(round, accepted = accepted.len(), min = fed.min_clients, "too few updates; repeating the round");
                continue;
            }
            state.global = strategy.aggregate(&state.global, &accepted)?;
            state.strategy = strategy.state();
            state.round = round;
            state.save(&self.settings.state_dir)?;
            let eval_perplexity = match evaluator.as_mut() {
                Some(eval) if fed.eval_every > 0 && round % fed.eval_every == 0 => {
                    let global = state.global.clone();
                    match tokio::task::block_in_place(|| eval(round, &global)) {
                        Ok(p) => Some(p),
                        Err(e) => {
                            warn!(round, error = %e, "evaluation failed");
                            None
                        }
                    }
                }
                _ => None,
            };
            let examples: u64 = losses.iter().map(|l| l.1).sum();
            let report = RoundReport {
                round,
                sampled: sampled.len(),
                participants: accepted.len(),
                rejected,
                bytes_in: self.shared.bytes_in.load(Ordering::Relaxed) - in0,
                bytes_out: self.shared.bytes_out.load(Ordering::Relaxed) - out0,
                train_loss: losses.iter().map(|(l, n)| l * *n as f64).sum::<f64>() / examples.max(1) as f64,
                eval_perplexity,
                wall_s: started.elapsed().as_secs_f64(),
                global_sha256: hash(&state.global),
            };
            append_line(&metrics_path, &report)?;
            info!(
                round,
                participants = report.participants,
                rejected,
                bytes_in = report.bytes_in,
                bytes_out = report.bytes_out,
                train_loss = format!("{:.4}", report.train_loss),
                eval_ppl = ?report.eval_perplexity,
                "round complete"
            );
            on_round(&report);
        }
        for id in &self.ready_clients() {
            self.send(id, Outgoing::Goodbye("federation finished".into()));
        }
        // Give the goodbyes a moment to leave before the endpoint closes.
        let until = tokio::time::Instant::now() + Duration::from_secs(2);
        while !self.ready_conns().is_empty() && tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.endpoint.close(0u32.into(), b"federation finished");
        Ok(state)
    }

    async fn wait_for_clients(&mut self, min: usize, wait_s: f64, round: u64) -> Result<Vec<String>, FedError> {
        let until = Instant::now() + Duration::from_secs_f64(wait_s);
        let mut logged = false;
        loop {
            // Updates that arrive between rounds answer an old round.
            while let Ok((client, _, update)) = self.updates.try_recv() {
                self.reject(&client, update.round, format!("late update for round {}", update.round));
            }
            let ready = self.ready_clients();
            if ready.len() >= min.max(1) {
                return Ok(ready);
            }
            if Instant::now() >= until {
                return Err(FedError::Config(format!(
                    "round {round}: only {} of the {min} clients needed were ready after {wait_s} s",
                    ready.len()
                )));
            }
            if !logged {
                info!(round, ready = ready.len(), needed = min, "waiting for clients");
                logged = true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Server {
    /// A server that stops (finished, failed or dropped mid-round) closes its endpoint, so its accept loop and
    /// connections end with it.
    fn drop(&mut self) {
        self.endpoint.close(0u32.into(), b"server stopped");
    }
}

fn append_line(path: &std::path::Path, report: &RoundReport) -> Result<(), FedError> {
    use std::io::Write;
    let err = |e: std::io::Error| FedError::File {
        path: path.into(),
        reason: e.to_string(),
    };
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(err)?;
    let line = serde_json::to_string(report).map_err(|e| FedError::Config(e.to_string()))?;
    writeln!(f, "{line}").map_err(err)
}

async fn write(shared: &Shared, send: &mut quinn::SendStream, bytes: &[u8]) -> Result<(), FedError> {
    send.write_all(bytes)
        .await
        .map_err(|e| FedError::Connection(e.to_string()))?;
    shared.bytes_out.fetch_add(bytes.len() as u64, Ordering::Relaxed);
    Ok(())
}

/// One client connection: the protocol state machine between the stream and the round loop.
async fn connection(shared: Arc<Shared>, incoming: quinn::Incoming) -> Result<(), FedError> {
    let conn = incoming.await.map_err(|e| FedError::Connection(e.to_string()))?;
    let conn_id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
    let (mut send, mut recv) = tokio::time::timeout(shared.hello_timeout, conn.accept_bi())
        .await
        .map_err(|_| FedError::Connection("no stream opened before the hello deadline".into()))?
        .map_err(|e| FedError::Connection(e.to_string()))?;
    let mut sm = ServerConn::new(shared.limits, Instant::now(), shared.hello_timeout);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut tx = Some(tx);
    let mut client: Option<String> = None;
    let hello_deadline = tokio::time::sleep(shared.hello_timeout);
    tokio::pin!(hello_deadline);
    let mut buf = vec![0u8; READ_BUF];
    let result: Result<(), FedError> = loop {
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
                    Err(e) => break Err(FedError::Connection(e.to_string())),
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
                                stop = Some(Err(FedError::Refused("unknown or revoked token".into())));
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
                                    .map_err(|e| FedError::Connection(e.to_string()))?
                                    .map_err(|e| FedError::File { path: shared.emulator.path.clone(), reason: e.to_string() })?;
                                write(&shared, &mut send, &sm.chunk(i, data)?).await?;
                            }
                        }
                        ServerInput::Ready => {
                            let (Some(id), Some(tx)) = (client.clone(), tx.take()) else { continue };
                            if let Ok(mut m) = shared.ready.lock() {
                                m.insert(id.clone(), ClientHandle { conn: conn_id, tx });
                            }
                            info!(client = %id, "client ready");
                        }
                        ServerInput::Update(u) => {
                            if let Some(id) = &client {
                                debug!(client = %id, round = u.round, bytes = n, "update received");
                                let _ = shared.updates.send((id.clone(), conn_id, u));
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
                let e = sm.timeout(Instant::now()).unwrap_or(crate::protocol::ProtocolError::HelloTimeout(shared.hello_timeout));
                let _ = write(&shared, &mut send, &sm.reject(&e.to_string())).await;
                break Err(e.into());
            }
        }
    };
    if let Some(id) = &client {
        if let Ok(mut m) = shared.ready.lock() {
            if m.get(id).is_some_and(|h| h.conn == conn_id) {
                m.remove(id);
            }
        }
    }
    // Let what was written (a rejection with its reason, say) reach the peer before closing.
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
    conn.close(0u32.into(), b"bye");
    result
}
