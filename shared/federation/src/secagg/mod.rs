//! Secure aggregation: SecAgg+ (Bell et al., CCS 2020), the sparse-graph form of Bonawitz et al. (CCS 2017), so the
//! server learns only the weighted sum of the round's updates, never one client's.
//!
//! One round, with n participants each masking with k neighbours of a public random graph ([`graph`]):
//! 0. every client advertises two fresh X25519 keys and a commitment to a random self-mask seed b;
//! 1. each deals Shamir shares (threshold t) of its mask key and of b among its neighbours and itself, sealing each
//!    neighbour's pair with a key agreed with it; the server routes the ciphertexts;
//! 2. each sends `encode(w·x) + PRG(b) ± PRG(s_uv)` for every neighbour v whose shares it got (+ towards higher
//!    indices), modulo 2³² (the fixed-point encoding in [`encode`] cannot wrap the sum);
//! 3. the survivors reveal their shares of each survivor's b and of each dropped neighbour's mask key; the server
//!    removes the self masks and the pairwise masks of the dropped, and what is left is the sum.
//!
//! Every message stage is sans-IO ([`SecAggClient`], [`SecAggServer`]); up to a threshold of dropouts at any stage is
//! recovered. Threat model: an honest-but-curious server and clients (as Flower's SecAgg+); a server that lies to
//! clients about who dropped could ask for both secrets of one client, which the malicious-model protocol's
//! signed consistency round would stop; that round is not implemented. Robust aggregation rules, which need single
//! updates, cannot run on the sum.

mod client;
mod crypto;
mod encode;
mod graph;
mod server;
#[cfg(test)]
mod tests;
mod update;

pub use client::SecAggClient;
pub use server::SecAggServer;
pub(crate) use server::Stage;
pub use update::prepare_update;
pub(crate) use update::{length, unflatten};

/// HKDF purpose of pairwise mask seeds.
const MASK: &[u8] = b"mask";
/// HKDF purpose of the keys sealing shares.
const SEAL: &[u8] = b"seal";

/// The settings of one round, as the server opens it.
#[derive(Debug, Clone, PartialEq)]
pub struct SecAggParams {
    /// The round (binds every key and seed).
    pub round: u64,
    /// Clients taking part; indices `0..participants`.
    pub participants: u32,
    /// Neighbours of each client in the masking graph (see [`default_neighbours`]); capped at `participants − 1`.
    pub neighbours: u32,
    /// Shares needed to rebuild a secret (see [`default_threshold`]).
    pub threshold: u32,
    /// Public seed of the graph.
    pub graph_seed: u64,
    /// Per-coordinate bound of a weighted update (larger coordinates are clipped).
    pub clip: f32,
    /// Elements of the update vector.
    pub length: u64,
}

/// The result of a round: the weighted mean of the surviving clients' updates.
#[derive(Debug, Clone, PartialEq)]
pub struct SecAggSum {
    /// Σ wᵢ·xᵢ / Σ wᵢ over the contributors.
    pub mean: Vec<f32>,
    /// Σ wᵢ.
    pub weight: f64,
    /// Bound on each coordinate's error from the fixed-point encoding (before the f32 rounding of `mean`).
    pub error_bound: f64,
    /// The clients whose updates are in the sum.
    pub contributors: Vec<u32>,
    /// Clients that shared their secrets but dropped before their update arrived, whose masks were removed.
    pub recovered: usize,
}

/// What can go wrong in a secure-aggregation round.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum SecAggError {
    /// The round's settings are unusable (a bad graph, threshold, scale or update).
    #[error("secure aggregation settings: {0}")]
    Setup(String),
    /// Too few clients are left at a stage to go on (the round cannot be aggregated).
    #[error("secure aggregation: {have} clients at the {stage} stage, {need} needed")]
    TooFew {
        /// The stage.
        stage: &'static str,
        /// Clients left.
        have: usize,
        /// The threshold.
        need: usize,
    },
    /// A client's message is malformed or out of place; the client counts as dropped.
    #[error("secure aggregation: client {index}: {reason}")]
    Client {
        /// The client's index in the round.
        index: u32,
        /// What is wrong.
        reason: String,
    },
    /// The shares of a client's secret do not rebuild the secret it committed to: some client revealed a bad share.
    #[error("secure aggregation: the shares of client {owner}'s secret do not rebuild it")]
    BadShares {
        /// Whose secret.
        owner: u32,
    },
    /// The server's message to this client is malformed or out of place.
    #[error("secure aggregation: {0}")]
    Protocol(String),
    /// The system random generator failed.
    #[error("secure aggregation: the system random generator failed")]
    Random,
}

/// SecAgg+'s neighbour count for n clients: about 3·log₂ n, even (30 at 1000 clients, 20 at 100); the complete
/// graph for small rounds.
pub fn default_neighbours(participants: u32) -> u32 {
    let k = (3.0 * f64::from(participants.max(2)).log2()).ceil() as u32;
    (k + k % 2).min(participants.saturating_sub(1))
}

/// The default threshold for k neighbours: a majority of the k + 1 holders of each secret, so the server with fewer
/// than half of a client's neighbours learns nothing of it, and up to k + 1 − t holders may drop out.
pub fn default_threshold(neighbours: u32) -> u32 {
    (neighbours.div_ceil(2) + 1).clamp(2, 255)
}

/// A threshold is usable with `degree` neighbours: at least 2 (one share must never be enough) and at most the
/// `degree + 1` holders (and GF(256)'s 255).
fn check_threshold(threshold: u32, degree: u32) -> Result<(), SecAggError> {
    if degree > 254 {
        return Err(SecAggError::Setup(format!(
            "{degree} neighbours: Shamir over GF(256) deals at most 255 shares"
        )));
    }
    if threshold < 2 || threshold > degree + 1 {
        return Err(SecAggError::Setup(format!(
            "threshold {threshold} with {degree} neighbours: it must be in 2..={}",
            degree + 1
        )));
    }
    Ok(())
}

/// The holders of a client's shares, in dealing order: its neighbours and itself, ascending.
fn holders(me: u32, neighbours: impl IntoIterator<Item = u32>) -> Vec<u32> {
    let mut out: Vec<u32> = neighbours.into_iter().chain([me]).collect();
    out.sort_unstable();
    out.dedup();
    out
}
