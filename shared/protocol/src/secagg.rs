//! Messages of secure aggregation (SecAgg+, Bell et al. 2020, after Bonawitz et al. 2017): the four stages in which
//! a round's sampled clients agree on pairwise masks, hand out Shamir shares of their mask secrets, send masked
//! updates, and reveal the shares that remove the masks. Plain data, as every message; the cryptography lives in
//! `offsite-fed`'s `secagg` module. Clients are named by their index in the round's participant list (`u32`), which
//! every side reads from [`SecAggSetup`].

use bincode::{Decode, Encode};

/// One stage message of secure aggregation. Server → client: [`SecAggMessage::Setup`], [`SecAggMessage::Neighbours`],
/// [`SecAggMessage::Shares`] (the ciphertexts addressed to the client), [`SecAggMessage::Unmask`]. Client → server:
/// [`SecAggMessage::Keys`], [`SecAggMessage::Shares`] (the ciphertexts it deals), [`SecAggMessage::Masked`],
/// [`SecAggMessage::Reveal`].
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub enum SecAggMessage {
    /// The round's settings and the client's index.
    Setup(SecAggSetup),
    /// The client's public keys.
    Keys(SecAggKeys),
    /// The keys of the client's neighbours.
    Neighbours(SecAggNeighbours),
    /// Sealed shares.
    Shares(SecAggShares),
    /// The masked update.
    Masked(SecAggMasked),
    /// Which neighbours survived and which dropped.
    Unmask(SecAggUnmask),
    /// The revealed shares.
    Reveal(SecAggReveal),
}

impl SecAggMessage {
    /// The kind's name, for errors and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            SecAggMessage::Setup(_) => "secagg-setup",
            SecAggMessage::Keys(_) => "secagg-keys",
            SecAggMessage::Neighbours(_) => "secagg-neighbours",
            SecAggMessage::Shares(_) => "secagg-shares",
            SecAggMessage::Masked(_) => "secagg-masked",
            SecAggMessage::Unmask(_) => "secagg-unmask",
            SecAggMessage::Reveal(_) => "secagg-reveal",
        }
    }

    /// Whether a client sends this kind (else the server does; [`SecAggMessage::Shares`] goes both ways).
    pub fn from_client(&self) -> bool {
        matches!(
            self,
            SecAggMessage::Keys(_) | SecAggMessage::Shares(_) | SecAggMessage::Masked(_) | SecAggMessage::Reveal(_)
        )
    }

    /// Whether the server sends this kind.
    pub fn from_server(&self) -> bool {
        matches!(
            self,
            SecAggMessage::Setup(_)
                | SecAggMessage::Neighbours(_)
                | SecAggMessage::Shares(_)
                | SecAggMessage::Unmask(_)
        )
    }

    /// The round it belongs to.
    pub fn round(&self) -> u64 {
        match self {
            SecAggMessage::Setup(m) => m.round,
            SecAggMessage::Keys(m) => m.round,
            SecAggMessage::Neighbours(m) => m.round,
            SecAggMessage::Shares(m) => m.round,
            SecAggMessage::Masked(m) => m.round,
            SecAggMessage::Unmask(m) => m.round,
            SecAggMessage::Reveal(m) => m.round,
        }
    }
}

/// Server → client: the round's secure-aggregation settings and this client's place in it.
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub struct SecAggSetup {
    /// The round (every key, nonce and seed below is bound to it).
    pub round: u64,
    /// This client's index among the round's participants.
    pub index: u32,
    /// How many clients take part (indices `0..participants`).
    pub participants: u32,
    /// Each client's neighbours in the masking graph (even; `participants − 1` for the complete graph).
    pub neighbours: u32,
    /// Shamir threshold: shares needed to rebuild a secret, out of a client's neighbours and itself.
    pub threshold: u32,
    /// Public seed of the neighbour graph's permutation.
    pub graph_seed: u64,
    /// Every coordinate of a weighted update is clipped to ±`clip` before it is encoded.
    pub clip: f32,
    /// Fixed-point scale: a coordinate `x` is encoded as `round(x · scale)` modulo 2³².
    pub scale: f64,
    /// Elements of the update vector.
    pub length: u64,
}

/// Client → server, stage 0: fresh public keys for this round.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct SecAggKeys {
    /// The round.
    pub round: u64,
    /// X25519 key for encrypting shares to and from neighbours.
    pub cipher_pk: [u8; 32],
    /// X25519 key for agreeing pairwise masks with neighbours.
    pub mask_pk: [u8; 32],
    /// SHA-256 of the round, the client's index and its self-mask seed: the server checks the seed it rebuilds from
    /// shares against it, so a bad share is found instead of spoiling the sum.
    pub self_mask_commit: [u8; 32],
}

/// One neighbour's advertised keys.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct NeighbourKeys {
    /// Its index.
    pub index: u32,
    /// Its keys.
    pub keys: SecAggKeys,
}

/// Server → client, after stage 0: the keys of the client's neighbours that advertised theirs.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct SecAggNeighbours {
    /// The round.
    pub round: u64,
    /// The neighbours, by index.
    pub neighbours: Vec<NeighbourKeys>,
}

/// A ciphertext between two clients, routed by the server.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct SealedShares {
    /// The other client's index (the recipient when sent, the sender when delivered).
    pub peer: u32,
    /// The two shares, sealed with the pair's key (ChaCha20-Poly1305).
    pub ciphertext: Vec<u8>,
}

/// Client → server, stage 1: one sealed pair of shares per neighbour. Server → client: the ones addressed to it.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct SecAggShares {
    /// The round.
    pub round: u64,
    /// The ciphertexts.
    pub sealed: Vec<SealedShares>,
}

/// Client → server, stage 2: the masked, weighted update.
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub struct SecAggMasked {
    /// The round.
    pub round: u64,
    /// The weight the update was multiplied by (in (0, 1]); the server divides the sum by the weights' sum.
    pub weight: f64,
    /// The client's mean training loss over the round (in the clear, as the weight: a scalar for the round's log).
    pub train_loss: f64,
    /// The encoded update plus every mask, modulo 2³²: one little-endian `u32` per element (raw bytes, as
    /// bincode's variable-length integers would spend 5 bytes on most uniformly random words).
    pub masked: Vec<u8>,
}

/// Server → client, before stage 3: which of its neighbours' masked updates arrived.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct SecAggUnmask {
    /// The round.
    pub round: u64,
    /// Neighbours whose masked update arrived: their self-mask shares are asked for.
    pub survived: Vec<u32>,
    /// Neighbours that sent shares but no masked update: their mask-key shares are asked for.
    pub dropped: Vec<u32>,
}

/// One revealed share.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct RevealedShare {
    /// Whose secret it is a share of.
    pub owner: u32,
    /// The share (x coordinate, then one byte per secret byte; GF(256)).
    pub share: Vec<u8>,
}

/// Client → server, stage 3: shares of survivors' self-mask seeds and of dropped clients' mask keys.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct SecAggReveal {
    /// The round.
    pub round: u64,
    /// Shares of survivors' self-mask seeds.
    pub self_masks: Vec<RevealedShare>,
    /// Shares of dropped clients' mask keys.
    pub mask_keys: Vec<RevealedShare>,
}
