//! The messages. Each variant is plain data; the frame header carries the protocol version.

use bincode::{Decode, Encode};

use super::secagg::SecAggMessage;
use super::settings::TrainConfig;
use super::tensor::{Encoding, TensorSet};

/// Everything that travels on a connection.
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub enum Message {
    /// Client → server, first message: who it is and its token.
    Hello(Hello),
    /// Server → client: authenticated; here is the emulator on offer.
    Welcome(Welcome),
    /// Server → client: refused (bad token, wrong version, protocol error); the connection closes after it.
    Reject {
        /// Why.
        reason: String,
    },
    /// Client → server: send the emulator from this chunk on (resumes an interrupted download).
    FetchEmulator {
        /// SHA-256 of the emulator file (hex), as offered.
        sha256: String,
        /// First chunk wanted.
        from_chunk: u32,
    },
    /// Server → client: one chunk of the emulator file.
    Chunk(Chunk),
    /// Client → server: it holds the emulator and takes tasks.
    Ready,
    /// Server → client: train this round.
    Task(Task),
    /// Client → server: the result of a task.
    Update(Update),
    /// Server → client: whether the update was used.
    UpdateAck(UpdateAck),
    /// A stage of secure aggregation (which way each kind goes is fixed: see [`SecAggMessage`]).
    SecAgg(SecAggMessage),
    /// Either side: closing, with a reason.
    Goodbye {
        /// Why.
        reason: String,
    },
}

impl Message {
    /// The variant's name, for errors and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello(_) => "hello",
            Message::Welcome(_) => "welcome",
            Message::Reject { .. } => "reject",
            Message::FetchEmulator { .. } => "fetch-emulator",
            Message::Chunk(_) => "chunk",
            Message::Ready => "ready",
            Message::Task(_) => "task",
            Message::Update(_) => "update",
            Message::UpdateAck(_) => "update-ack",
            Message::SecAgg(m) => m.kind(),
            Message::Goodbye { .. } => "goodbye",
        }
    }
}

/// Client → server, first message.
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub struct Hello {
    /// A name for logs (the token decides who the client is).
    pub client_name: String,
    /// The client's secret token.
    pub token: String,
}

/// The emulator a server hands out.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct EmulatorOffer {
    /// SHA-256 of the whole file (hex); clients cache by it.
    pub sha256: String,
    /// File size in bytes.
    pub size: u64,
    /// Bytes per chunk (the last may be shorter).
    pub chunk_size: u32,
}

impl EmulatorOffer {
    /// Number of chunks.
    pub fn chunks(&self) -> u32 {
        if self.chunk_size == 0 {
            return 0;
        }
        self.size.div_ceil(self.chunk_size as u64) as u32
    }

    /// Length of chunk `index`.
    pub fn chunk_len(&self, index: u32) -> usize {
        let start = index as u64 * self.chunk_size as u64;
        (self.size.saturating_sub(start)).min(self.chunk_size as u64) as usize
    }
}

/// Server → client after a good hello.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct Welcome {
    /// The client's id in the server's registry.
    pub client_id: String,
    /// The emulator to train on.
    pub emulator: EmulatorOffer,
    /// What clients train: the server's `[adapter]` table as JSON (data, checked field by field; never code).
    pub adapter: String,
    /// The largest update payload the server takes, in bytes (its `max_update_mib`), so a client whose update is
    /// larger says so instead of sending it to be cut off. Set by [`crate::ServerConn::accept`] from its limits.
    pub max_update_bytes: u32,
}

/// One piece of the emulator file.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct Chunk {
    /// Its index.
    pub index: u32,
    /// SHA-256 of `data`.
    pub sha256: [u8; 32],
    /// The bytes.
    pub data: Vec<u8>,
}

/// Server → client: train one round.
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub struct Task {
    /// The round number (from 1).
    pub round: u64,
    /// The global adapter state to start from.
    pub global: TensorSet,
    /// How to train (the seed already mixed with the round).
    pub settings: TrainConfig,
    /// FedProx proximal weight μ (0 = plain local training).
    pub proximal_mu: f64,
    /// How to encode the update.
    pub update_encoding: Encoding,
    /// Milliseconds the server waits for the update.
    pub deadline_ms: u64,
    /// Secure aggregation: when given, the client answers with a masked update ([`SecAggMessage::Masked`]) of
    /// the round whose stages it has just gone through, not with an [`Update`].
    pub secagg: Option<SecAggTask>,
}

/// How a client prepares its update for a secure sum (the server cannot check a masked update, so the client applies
/// the limits the server would have applied).
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub struct SecAggTask {
    /// The FedAvg weight cap: an update weighs `min(num_examples, max_examples) / max_examples`; 0: every update
    /// weighs 1 (central differential privacy averages with equal weights).
    pub max_examples: u64,
    /// The delta is scaled down to this L2 norm when longer (the DP clip, or the server's `max_update_norm`); 0: none.
    pub max_norm: f64,
    /// Standard deviation of the Gaussian noise the client adds to each coordinate of its clipped delta (distributed
    /// differential privacy: the noises of the round's clients sum to the central noise); 0: none.
    pub noise_std: f64,
}

/// Client → server: the result of a task.
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub struct Update {
    /// The round it answers.
    pub round: u64,
    /// Training examples the client holds (FedAvg weight).
    pub num_examples: u64,
    /// Mean training loss over the round's steps.
    pub train_loss: f64,
    /// Steps actually applied (skipped non-finite steps excluded).
    pub steps: u32,
    /// Local minus global, per adapter parameter.
    pub delta: TensorSet,
}

/// Server → client: the verdict on an update.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct UpdateAck {
    /// The round.
    pub round: u64,
    /// Whether it was aggregated.
    pub accepted: bool,
    /// Why not, when not.
    pub reason: Option<String>,
}
