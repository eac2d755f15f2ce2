//! The thin network layer: QUIC (quinn + rustls) endpoints that move the sans-IO protocol's bytes
//! (`crate::protocol`), the server's round loop and the edge client's join loop. All protocol decisions live in the
//! state machines; this layer reads, writes, waits and calls them.

mod client;
mod server;
mod tls;

pub use client::{join, JoinSettings, JoinSummary, LocalData};
pub use server::{EmulatorSource, Evaluator, RoundReport, ServeSettings, Server};
pub use tls::{fingerprint, quic_client, Identity, Trust, ALPN, SERVER_NAME};

/// Size of the read buffer of a stream.
const READ_BUF: usize = 64 * 1024;
