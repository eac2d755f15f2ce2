//! The wire protocol between `offsite-server` and `offsite-edge`, sans-IO in quinn-proto's style: message types,
//! length-prefixed frames and per-connection state machines that take bytes and time as arguments. Nothing here
//! touches a socket, tokio, quinn or burn (a test keeps it so); `offsite-net` is the thin layer that moves these bytes
//! over QUIC.
//!
//! Every message is an API boundary: frames carry [`PROTOCOL_VERSION`] and a peer speaking another version is
//! refused with a reason. No code is ever deserialized: messages are plain data decoded by bincode with a size limit.

mod frame;
mod messages;
mod secagg;
mod session;
mod settings;
mod tensor;

pub use frame::{encode_frame, FrameDecoder, Limits, HEADER_LEN, MAGIC};
pub use messages::{Chunk, EmulatorOffer, Hello, Message, SecAggTask, Task, Update, UpdateAck, Welcome};
pub use secagg::{
    NeighbourKeys, RevealedShare, SealedShares, SecAggKeys, SecAggMasked, SecAggMessage, SecAggNeighbours,
    SecAggReveal, SecAggSetup, SecAggShares, SecAggUnmask,
};
pub use session::{ClientConn, ClientEvent, ServerConn, ServerInput, UNAUTHENTICATED_LIMIT};
pub use settings::{AdamWConfig, Precision, TrainConfig};
pub use tensor::{Encoding, TensorSet, WireData, WireTensor};

/// The protocol version this build speaks. Bumped on any change to a message's layout (2: a task carries the whole
/// [`TrainConfig`] and the FedProx μ beside it; 3: the welcome carries the largest update the server takes; 4: secure
/// aggregation's messages, and a task says whether its update is masked).
pub const PROTOCOL_VERSION: u16 = 4;

/// What can go wrong on the wire. The connection carrying it is closed with this as the reason; the peer's other
/// connections are unaffected.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum ProtocolError {
    /// The bytes do not start with Offsite's frame magic.
    #[error("not an Offsite frame (magic {0:02x?})")]
    BadMagic([u8; 4]),
    /// The peer speaks another protocol version.
    #[error("protocol version {got} is not supported (this build speaks {PROTOCOL_VERSION})")]
    Version {
        /// The version in the frame header.
        got: u16,
    },
    /// A frame's declared length is above the limit for this direction.
    #[error("frame of {len} bytes exceeds the limit of {limit} bytes")]
    Oversized {
        /// Declared payload length.
        len: u64,
        /// The limit.
        limit: u64,
    },
    /// This client's update is larger than the server takes (the welcome said how much): a configuration that does
    /// not fit, so the update is not sent.
    #[error(
        "the update is {len} bytes but the server takes at most {limit} bytes (its max_update_mib): train a smaller \
         adapter, or ask the operator for update_encoding = \"f16\" or \"int8\" or a larger max_update_mib"
    )]
    UpdateTooLarge {
        /// The update's payload length.
        len: u64,
        /// The server's limit.
        limit: u64,
    },
    /// The stream ended inside a frame.
    #[error("truncated frame: the stream ended after {got} of {expected} bytes")]
    Truncated {
        /// Bytes received of the frame (header included).
        got: usize,
        /// Bytes the frame needed.
        expected: usize,
    },
    /// A frame's payload is not a valid message.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// A message arrived that the connection's state does not allow.
    #[error("unexpected {got} while {state}")]
    Unexpected {
        /// The message kind.
        got: &'static str,
        /// What the connection was doing.
        state: &'static str,
    },
    /// The peer did not authenticate in time.
    #[error("no hello within {0:?}")]
    HelloTimeout(std::time::Duration),
    /// A downloaded chunk does not match its SHA-256.
    #[error("chunk {index} of the emulator fails its SHA-256 check")]
    ChunkHash {
        /// The chunk index.
        index: u32,
    },
    /// A tensor on the wire is inconsistent (size, shape, encoding or values).
    #[error("tensor `{name}`: {reason}")]
    Tensor {
        /// The tensor's name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// This side was asked to send something its state forbids (a bug in the caller, never the peer's doing).
    #[error("cannot send {what}: {reason}")]
    Forbidden {
        /// The message kind.
        what: &'static str,
        /// Why not.
        reason: &'static str,
    },
}
