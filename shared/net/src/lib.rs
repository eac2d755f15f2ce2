//! The thin network layer: QUIC (quinn + rustls) endpoints that move bytes for the sans-IO state machines. The
//! server (`Server`) drives `offsite_protocol::ServerConn` per connection and one `offsite_fed::Coordinator` for
//! the rounds; the edge client (`join`) drives `offsite_protocol::ClientConn`, keeps the emulator cache and hands
//! each task to an `offsite_fed::LocalTrainer`. No protocol or round decision is made here, and nothing here
//! touches burn.

mod client;
mod server;
mod tls;

use std::path::PathBuf;

pub use client::{join, JoinSettings, JoinSummary};
pub use server::{ConnectionLimits, EmulatorSource, Evaluator, ServeSettings, Server};
pub use tls::{fingerprint, quic_client, Identity, Trust, ALPN, SERVER_NAME};

use offsite_fed::FedError;
use offsite_protocol::ProtocolError;

/// Size of the read buffer of a stream.
const READ_BUF: usize = 64 * 1024;

/// Errors of the network layer.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A TLS or endpoint setting is invalid.
    #[error("network config: {0}")]
    Config(String),
    /// The connection failed or closed (reconnecting may help).
    #[error("connection: {0}")]
    Connection(String),
    /// The server refused this client (bad or revoked token, wrong version); reconnecting will not help.
    #[error("refused by the server: {0}")]
    Refused(String),
    /// The peer broke the protocol.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// The federation core failed (state, tokens, strategy, local training).
    #[error(transparent)]
    Fed(#[from] FedError),
    /// A file could not be read or written.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
}
