//! The federation server: accepts QUIC connections (one task each, driving `ServerConn`, in `server/conn.rs`) and
//! runs the rounds by driving an `offsite_fed::Coordinator`: it feeds it events and timeouts, carries out its
//! actions (send, save, evaluate, log metrics) and counts bytes. Every round decision is the coordinator's.

mod conn;
mod metrics;

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use offsite_fed::{
    Action, Coordinator, Event, FederationConfig, Outgoing, Params, RoundReport, ServerState, Strategy, TokenStore,
};
use offsite_protocol::{EmulatorOffer, Limits, TrainConfig};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
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
    /// Caps on open connections.
    pub connections: ConnectionLimits,
}

/// How many connections the server holds open at once: over `max` in all, or `per_address` from one IP address,
/// new ones are refused; over half of `max`, a new connection first proves its address (a QUIC retry).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Open connections in all.
    pub max: usize,
    /// Open connections from one IP address.
    pub per_address: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max: 4096,
            per_address: 64,
        }
    }
}

/// Open connections, in all and by address.
#[derive(Default)]
struct Open {
    total: usize,
    by_address: HashMap<IpAddr, usize>,
}

/// One admitted connection's place in the count, given back when the connection task ends.
struct Slot {
    shared: Arc<Shared>,
    address: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Ok(mut open) = self.shared.open.lock() {
            open.total = open.total.saturating_sub(1);
            if let Some(n) = open.by_address.get_mut(&self.address) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    open.by_address.remove(&self.address);
                }
            }
        }
    }
}

/// What the accept loop does with a new connection.
enum Admission {
    Admit(Slot),
    /// Over half the cap, from an address not yet validated: ask it to prove its address first.
    Retry,
    /// Over a cap: refused (the reason is logged).
    Refuse(&'static str),
}

impl Shared {
    fn admit(self: &Arc<Self>, address: IpAddr, validated: bool) -> Admission {
        let Ok(mut open) = self.open.lock() else {
            return Admission::Refuse("the connection count is unavailable");
        };
        let from = open.by_address.get(&address).copied().unwrap_or(0);
        if open.total >= self.connection_limits.max {
            return Admission::Refuse("too many connections");
        }
        if from >= self.connection_limits.per_address {
            return Admission::Refuse("too many connections from this address");
        }
        if !validated && open.total >= self.connection_limits.max / 2 {
            return Admission::Retry;
        }
        open.total += 1;
        *open.by_address.entry(address).or_default() += 1;
        Admission::Admit(Slot {
            shared: self.clone(),
            address,
        })
    }
}

/// An event for the round loop; an update holds its queue permits (taken when its frame's header arrived) until the
/// round loop has handled it, which bounds the updates in memory, being received or waiting (one per connection,
/// [`UPDATE_QUEUE`] in all).
struct Queued {
    event: Event,
    _permits: Vec<OwnedSemaphorePermit>,
}

/// Updates being received or waiting for the round loop, at most, over every connection.
const UPDATE_QUEUE: usize = 16;

/// Evaluates the plug-in model (full model + global adapter): round, global state → perplexity.
pub type Evaluator = Box<dyn FnMut(u64, &Params) -> Result<f64, String> + Send>;

/// An authenticated connection: its id, the connection (to close it) and the token it authenticated with (in
/// memory only: what a revocation is checked against).
struct Session {
    conn: u64,
    connection: quinn::Connection,
    token: String,
}

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
    /// Mutual TLS: a client's certificate must name the client id its token stands for.
    bind_client_certs: bool,
    /// Ready clients by id, kept by the connection tasks (so messages find them, and `ready_clients` works before
    /// `run`); the coordinator hears the same through events.
    ready: Mutex<HashMap<String, ClientHandle>>,
    /// Authenticated connections by client id: one live session per client (a newer one closes the older), and
    /// what a revocation closes.
    sessions: Mutex<HashMap<String, Session>>,
    /// Open connections, against `connection_limits`.
    open: Mutex<Open>,
    connection_limits: ConnectionLimits,
    /// Bounds the decoded updates waiting for the round loop.
    update_queue: Arc<Semaphore>,
    events: mpsc::UnboundedSender<Queued>,
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
    events: mpsc::UnboundedReceiver<Queued>,
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
            bind_client_certs: settings.client_ca.is_some(),
            ready: Mutex::new(HashMap::new()),
            sessions: Mutex::new(HashMap::new()),
            open: Mutex::new(Open::default()),
            connection_limits: settings.connections,
            update_queue: Arc::new(Semaphore::new(UPDATE_QUEUE)),
            events: tx,
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            next_conn: AtomicU64::new(0),
        });
        let ep = endpoint.clone();
        let sh = shared.clone();
        tokio::spawn(async move {
            while let Some(incoming) = ep.accept().await {
                let peer = incoming.remote_address();
                let slot = match sh.admit(peer.ip(), incoming.remote_address_validated()) {
                    Admission::Admit(slot) => slot,
                    Admission::Retry => {
                        if let Err(e) = incoming.retry() {
                            e.into_incoming().ignore();
                        }
                        continue;
                    }
                    Admission::Refuse(reason) => {
                        warn!(%peer, reason, "connection refused");
                        incoming.refuse();
                        continue;
                    }
                };
                let sh = sh.clone();
                tokio::spawn(async move {
                    if let Err(e) = conn::connection(sh, incoming).await {
                        debug!(%peer, error = %e, "connection ended");
                    }
                    drop(slot);
                });
            }
        });
        tokio::spawn(watch_revocations(Arc::downgrade(&shared)));
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
        let metrics = dir.join("metrics.jsonl");
        // Rows past the saved round belong to a round whose save a crash prevented: it runs again and writes them
        // anew.
        metrics::cut_after(&metrics, saved.as_ref().map_or(0, |s| s.round))?;
        let strategy = self
            .strategy
            .take()
            .ok_or_else(|| NetError::Config("the server already ran".into()))?;
        let (federation, local) = (self.federation.clone(), self.local.clone());
        let mut coordinator = Coordinator::new(federation, local, strategy, initial, saved, Instant::now())?;
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
                    Action::Save => {
                        offsite_fed::crash_point("before-save");
                        coordinator.state().save(&dir, self.federation.keep_states)?
                    }
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
                        metrics::append(&metrics, &report)?;
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
                queued = self.events.recv() => {
                    // The sender lives in `shared`, which this server holds: the channel cannot close.
                    let Some(queued) = queued else { break };
                    coordinator.handle(queued.event, Instant::now())?;
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

/// Closes every live session whose token no longer authenticates its client (revoked, or replaced by a new token)
/// within a second: the token file is read again every second while the server lives.
async fn watch_revocations(shared: std::sync::Weak<Shared>) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let Some(shared) = shared.upgrade() else { return };
        let Ok(store) = TokenStore::load(&shared.tokens) else {
            continue;
        };
        let Ok(sessions) = shared.sessions.lock() else { return };
        for (client, s) in sessions.iter() {
            if store.authenticate(&s.token) != Some(client.as_str()) {
                warn!(%client, "token revoked: closing the client's connection");
                s.connection.close(3u32.into(), b"token revoked");
            }
        }
    }
}
