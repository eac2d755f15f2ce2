//! The federation server: accepts QUIC connections (one task each, driving `ServerConn`, in `server/conn.rs`) and
//! runs the rounds by driving an `offsite_fed::Coordinator`: it feeds it events and timeouts, carries out its
//! actions (send, save, evaluate, log metrics) and counts bytes. Every round decision is the coordinator's.

mod conn;

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use offsite_fed::{
    Action, Coordinator, Event, FederationConfig, Outgoing, Params, RoundReport, ServerState, Strategy, TokenStore,
};
use offsite_protocol::{EmulatorOffer, Limits, TrainConfig};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::tls::Identity;
use super::NetError;

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
    pub fn open(path: PathBuf, chunk_size: u32) -> Result<Self, NetError> {
        use sha2::{Digest, Sha256};
        let err = |e: std::io::Error| NetError::File {
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
    /// Clients' local training (`[local]`).
    pub local: TrainConfig,
    /// Which clients train each round, how, and how their updates are aggregated.
    pub strategy: Box<dyn Strategy>,
    /// Seconds a new connection has to say hello.
    pub hello_timeout_s: f64,
    /// Require client certificates issued by this CA (PEM), in addition to tokens.
    pub client_ca: Option<PathBuf>,
}

/// Evaluates the plug-in model (full model + global adapter): round, global state → perplexity.
pub type Evaluator = Box<dyn FnMut(u64, &Params) -> Result<f64, String> + Send>;

/// A ready client's current connection.
struct ClientHandle {
    conn: u64,
    tx: mpsc::UnboundedSender<Outgoing>,
}

/// What the accept loop, the connection tasks and the round loop share.
struct Shared {
    tokens: PathBuf,
    emulator: EmulatorSource,
    adapter_json: String,
    limits: Limits,
    hello_timeout: Duration,
    /// Ready clients by id, kept by the connection tasks (so messages find them, and `ready_clients` works before
    /// `run`); the coordinator hears the same through events.
    ready: Mutex<HashMap<String, ClientHandle>>,
    events: mpsc::UnboundedSender<Event>,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    next_conn: AtomicU64,
}

/// A bound server, not yet running rounds.
pub struct Server {
    endpoint: quinn::Endpoint,
    fingerprint: String,
    state_dir: PathBuf,
    federation: FederationConfig,
    local: TrainConfig,
    /// Handed to the coordinator by `run`.
    strategy: Option<Box<dyn Strategy>>,
    shared: Arc<Shared>,
    events: mpsc::UnboundedReceiver<Event>,
}

impl Server {
    /// Binds the QUIC endpoint (TLS 1.3 with `identity`) and starts accepting clients.
    pub fn bind(settings: ServeSettings, identity: Identity) -> Result<Self, NetError> {
        let hello_timeout = Duration::try_from_secs_f64(settings.hello_timeout_s)
            .map_err(|_| NetError::Config(format!("hello_timeout_s {} must be ≥ 0", settings.hello_timeout_s)))?;
        let fingerprint = identity.fingerprint();
        let endpoint = quinn::Endpoint::server(identity.quic_server(settings.client_ca.as_deref())?, settings.listen)
            .map_err(|e| NetError::Connection(format!("binding {}: {e}", settings.listen)))?;
        let (tx, rx) = mpsc::unbounded_channel();
        let max_update = settings.federation.max_update_mib.saturating_mul(1 << 20);
        let shared = Arc::new(Shared {
            tokens: TokenStore::path(&settings.state_dir),
            emulator: settings.emulator.clone(),
            adapter_json: settings.adapter_json.clone(),
            limits: Limits::server(max_update),
            hello_timeout,
            ready: Mutex::new(HashMap::new()),
            events: tx,
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
                    if let Err(e) = conn::connection(sh, incoming).await {
                        debug!(%peer, error = %e, "connection ended");
                    }
                });
            }
        });
        Ok(Server {
            endpoint,
            fingerprint,
            state_dir: settings.state_dir,
            federation: settings.federation,
            local: settings.local,
            strategy: Some(settings.strategy),
            shared,
            events: rx,
        })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> Result<SocketAddr, NetError> {
        self.endpoint
            .local_addr()
            .map_err(|e| NetError::Connection(e.to_string()))
    }

    /// SHA-256 of the server's certificate, for clients to pin.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The ids of the clients connected and ready for tasks.
    pub fn ready_clients(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .shared
            .ready
            .lock()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        ids.sort();
        ids
    }

    /// Sends to `client` (on connection `conn` when given, else its current one); false when it is not there.
    fn send(&self, client: &str, conn: Option<u64>, msg: Outgoing) -> bool {
        let Ok(map) = self.shared.ready.lock() else {
            return false;
        };
        match map.get(client) {
            Some(h) if conn.is_none_or(|c| c == h.conn) => h.tx.send(msg).is_ok(),
            _ => false,
        }
    }

    /// Runs the remaining rounds from the saved state (or from `initial` on a fresh state directory), calling
    /// `on_round` after each; says goodbye to every client at the end and returns the final state.
    pub async fn run(
        mut self,
        initial: Params,
        mut evaluator: Option<Evaluator>,
        on_round: &mut (dyn FnMut(&RoundReport) + Send),
    ) -> Result<ServerState, NetError> {
        let dir = self.state_dir.clone();
        let saved = ServerState::load(&dir)?;
        let strategy = self
            .strategy
            .take()
            .ok_or_else(|| NetError::Config("the server already ran".into()))?;
        let (federation, local) = (self.federation.clone(), self.local.clone());
        let mut coordinator = Coordinator::new(federation, local, strategy, initial, saved, Instant::now())?;
        let metrics = dir.join("metrics.jsonl");
        let mut round_start = (0, 0);
        loop {
            while let Some(action) = coordinator.poll_action() {
                match action {
                    Action::Send { client, conn, message } => {
                        if !self.send(&client, conn, message) {
                            debug!(%client, "not connected; message dropped");
                        }
                    }
                    Action::RoundStarted { .. } => {
                        round_start = self.bytes();
                    }
                    Action::Save => coordinator.state().save(&dir, self.federation.keep_states)?,
                    Action::Evaluate { round, global } => {
                        let perplexity = evaluator.as_mut().and_then(|eval| {
                            tokio::task::block_in_place(|| eval(round, &global))
                                .inspect_err(|e| warn!(round, error = %e, "evaluation failed"))
                                .ok()
                        });
                        coordinator.handle(Event::Evaluated { round, perplexity }, Instant::now())?;
                    }
                    Action::RoundComplete(mut report) => {
                        let (bytes_in, bytes_out) = self.bytes();
                        report.bytes_in = bytes_in - round_start.0;
                        report.bytes_out = bytes_out - round_start.1;
                        append_line(&metrics, &report)?;
                        on_round(&report);
                    }
                    Action::Finished => {}
                }
            }
            if coordinator.is_finished() {
                break;
            }
            let timeout = coordinator.poll_timeout();
            let sleep = async {
                match timeout {
                    Some(t) => tokio::time::sleep_until(t.into()).await,
                    None => std::future::pending().await,
                }
            };
            // Events first: a round starts at its timeout only after every readiness already queued is counted.
            tokio::select! {
                biased;
                event = self.events.recv() => {
                    // The sender lives in `shared`, which this server holds: the channel cannot close.
                    let Some(event) = event else { break };
                    coordinator.handle(event, Instant::now())?;
                }
                _ = sleep => coordinator.handle_timeout(Instant::now())?,
            }
        }
        let state = coordinator.state().clone();
        for id in &self.ready_clients() {
            self.send(id, None, Outgoing::Goodbye("federation finished".into()));
        }
        // Give the goodbyes a moment to leave before the endpoint closes.
        let until = tokio::time::Instant::now() + Duration::from_secs(2);
        while !self.ready_clients().is_empty() && tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.endpoint.close(0u32.into(), b"federation finished");
        Ok(state)
    }

    /// Bytes received and sent so far, over every connection.
    fn bytes(&self) -> (u64, u64) {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        (load(&self.shared.bytes_in), load(&self.shared.bytes_out))
    }
}

impl Drop for Server {
    /// A server that stops (finished, failed or dropped mid-round) closes its endpoint, so its accept loop and
    /// connections end with it.
    fn drop(&mut self) {
        self.endpoint.close(0u32.into(), b"server stopped");
    }
}

fn append_line(path: &Path, report: &RoundReport) -> Result<(), NetError> {
    use std::io::Write;
    let err = |e: std::io::Error| NetError::File {
        path: path.into(),
        reason: e.to_string(),
    };
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(err)?;
    let line = serde_json::to_string(report).map_err(|e| NetError::Config(e.to_string()))?;
    writeln!(f, "{line}").map_err(err)
}
