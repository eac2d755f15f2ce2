//! The server's side of one secure-aggregation round, sans-IO: it takes each client's message as it arrives and,
//! when the caller closes a stage (all answered, or the stage's deadline passed), returns what each remaining client
//! is sent next. Masked updates are summed as they arrive, so memory is one update however many clients take part.
//! A client whose message is malformed is refused with [`SecAggError::Client`] and counts as dropped.

use std::collections::{BTreeMap, BTreeSet};

use offsite_protocol::{
    NeighbourKeys, SecAggKeys, SecAggMasked, SecAggNeighbours, SecAggReveal, SecAggSetup, SecAggShares, SecAggUnmask,
};
use x25519_dalek::StaticSecret;

use super::crypto::{self, SHARE_LEN};
use super::graph::Graph;
use super::{encode, holders, SecAggError, SecAggParams, SecAggSum, MASK};

/// Bytes of one sealed pair of shares: two indices, two shares, the tag.
const SEALED_LEN: usize = 8 + 2 * SHARE_LEN + 16;

/// The stage a secure round is at (the server's, and the coordinator's that drives it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stage {
    /// Advertised keys are awaited (stage 0).
    Keys,
    /// Sealed shares are awaited (stage 1).
    Shares,
    /// Masked updates are awaited (stage 2).
    Masked,
    /// The shares that remove the masks are awaited (stage 3).
    Reveal,
}

/// The server in one round.
pub struct SecAggServer {
    params: SecAggParams,
    graph: Graph,
    scale: f64,
    stage: Stage,
    /// Advertised keys (U1).
    keys: BTreeMap<u32, SecAggKeys>,
    /// Each client kept after the key stage → the neighbours whose keys it was sent.
    relayed: BTreeMap<u32, BTreeSet<u32>>,
    /// Sealed shares by sender (U2).
    sealed: BTreeMap<u32, SecAggShares>,
    /// Each client of U2 → the senders whose shares it was delivered (the neighbours it masks with).
    delivered: BTreeMap<u32, BTreeSet<u32>>,
    /// Masked updates' weights by sender (U3); their sum is `sum`.
    weights: BTreeMap<u32, f64>,
    sum: Vec<u32>,
    /// Each client of U3 → (survived, dropped) it was asked about.
    asked: BTreeMap<u32, (BTreeSet<u32>, BTreeSet<u32>)>,
    /// Revealed shares by owner: self-mask shares and mask-key shares; who revealed (U4).
    self_shares: BTreeMap<u32, Vec<Vec<u8>>>,
    key_shares: BTreeMap<u32, Vec<Vec<u8>>>,
    revealed: BTreeSet<u32>,
}

impl SecAggServer {
    /// Opens a round.
    pub fn new(params: SecAggParams) -> Result<Self, SecAggError> {
        let graph = Graph::new(params.participants, params.neighbours, params.graph_seed)?;
        super::check_threshold(params.threshold, graph.degree())?;
        if !(params.clip > 0.0 && params.clip.is_finite()) {
            return Err(SecAggError::Setup(format!("clip {} must be > 0", params.clip)));
        }
        let len = usize::try_from(params.length).map_err(|_| SecAggError::Setup("update too long".into()))?;
        let scale = encode::scale_for(params.participants, params.clip);
        Ok(SecAggServer {
            params,
            graph,
            scale,
            stage: Stage::Keys,
            keys: BTreeMap::new(),
            relayed: BTreeMap::new(),
            sealed: BTreeMap::new(),
            delivered: BTreeMap::new(),
            weights: BTreeMap::new(),
            sum: vec![0; len],
            asked: BTreeMap::new(),
            self_shares: BTreeMap::new(),
            key_shares: BTreeMap::new(),
            revealed: BTreeSet::new(),
        })
    }

    /// What client `index` is told at the start of the round.
    pub fn setup(&self, index: u32) -> SecAggSetup {
        let p = &self.params;
        SecAggSetup {
            round: p.round,
            index,
            participants: p.participants,
            neighbours: self.graph.degree(),
            threshold: p.threshold,
            graph_seed: p.graph_seed,
            clip: p.clip,
            scale: self.scale,
            length: p.length,
        }
    }

    fn check(&self, from: u32, round: u64, stage: Stage, what: &str) -> Result<(), SecAggError> {
        let bad = |reason: String| Err(SecAggError::Client { index: from, reason });
        if self.stage != stage {
            return bad(format!("{what} while the round is at {:?}", self.stage));
        }
        if round != self.params.round {
            return bad(format!("{what} for round {round} in round {}", self.params.round));
        }
        Ok(())
    }

    /// Stage 0: a client's keys.
    pub fn keys(&mut self, from: u32, msg: SecAggKeys) -> Result<(), SecAggError> {
        self.check(from, msg.round, Stage::Keys, "keys")?;
        if from >= self.params.participants || self.keys.contains_key(&from) {
            return Err(SecAggError::Client {
                index: from,
                reason: "not a participant, or keys sent twice".into(),
            });
        }
        if msg.cipher_pk == msg.mask_pk {
            return Err(SecAggError::Client {
                index: from,
                reason: "the same key for ciphers and masks".into(),
            });
        }
        self.keys.insert(from, msg);
        Ok(())
    }

    /// Closes stage 0: keeps the clients with at least `threshold − 1` neighbours that advertised (repeatedly, as
    /// dropping one can leave another short) and returns each its neighbours' keys.
    pub fn close_keys(&mut self) -> Result<Vec<(u32, SecAggNeighbours)>, SecAggError> {
        self.advance(Stage::Keys, Stage::Shares)?;
        let mut kept: BTreeSet<u32> = self.keys.keys().copied().collect();
        loop {
            let short: Vec<u32> = kept
                .iter()
                .copied()
                .filter(|&u| {
                    holders(u, self.graph.neighbours(u).into_iter().filter(|v| kept.contains(v))).len()
                        < self.params.threshold as usize
                })
                .collect();
            if short.is_empty() {
                break;
            }
            kept.retain(|u| !short.contains(u));
        }
        self.need("key exchange", kept.len())?;
        let mut out = Vec::with_capacity(kept.len());
        for &u in &kept {
            let ns: BTreeSet<u32> = self
                .graph
                .neighbours(u)
                .into_iter()
                .filter(|v| kept.contains(v))
                .collect();
            let neighbours = ns
                .iter()
                .map(|&v| NeighbourKeys {
                    index: v,
                    keys: self.keys[&v].clone(),
                })
                .collect();
            out.push((
                u,
                SecAggNeighbours {
                    round: self.params.round,
                    neighbours,
                },
            ));
            self.relayed.insert(u, ns);
        }
        Ok(out)
    }

    /// Stage 1: a client's sealed shares, one for each neighbour it was sent keys of.
    pub fn shares(&mut self, from: u32, msg: SecAggShares) -> Result<(), SecAggError> {
        self.check(from, msg.round, Stage::Shares, "shares")?;
        let bad = |reason: String| Err(SecAggError::Client { index: from, reason });
        let Some(relayed) = self.relayed.get(&from) else {
            return bad("shares from a client not in the round".into());
        };
        if self.sealed.contains_key(&from) {
            return bad("shares sent twice".into());
        }
        let peers: BTreeSet<u32> = msg.sealed.iter().map(|s| s.peer).collect();
        if peers.len() != msg.sealed.len() || &peers != relayed {
            return bad(format!("shares for {peers:?}, but its neighbours are {relayed:?}"));
        }
        if let Some(s) = msg.sealed.iter().find(|s| s.ciphertext.len() != SEALED_LEN) {
            return bad(format!(
                "{} bytes of shares for {} (a pair is {SEALED_LEN})",
                s.ciphertext.len(),
                s.peer
            ));
        }
        self.sealed.insert(from, msg);
        Ok(())
    }

    /// Closes stage 1: delivers to each client that shared the shares sealed to it by the others that shared.
    pub fn close_shares(&mut self) -> Result<Vec<(u32, SecAggShares)>, SecAggError> {
        self.advance(Stage::Shares, Stage::Masked)?;
        self.need("share exchange", self.sealed.len())?;
        let mut inbox: BTreeMap<u32, SecAggShares> = self
            .sealed
            .keys()
            .map(|&u| {
                (
                    u,
                    SecAggShares {
                        round: self.params.round,
                        sealed: Vec::new(),
                    },
                )
            })
            .collect();
        for (&from, msg) in &self.sealed {
            for s in &msg.sealed {
                if let Some(to) = inbox.get_mut(&s.peer) {
                    to.sealed.push(offsite_protocol::SealedShares {
                        peer: from,
                        ciphertext: s.ciphertext.clone(),
                    });
                }
            }
        }
        for (&u, msg) in &inbox {
            self.delivered.insert(u, msg.sealed.iter().map(|s| s.peer).collect());
        }
        self.sealed.clear();
        Ok(inbox.into_iter().collect())
    }

    /// Stage 2: a client's masked update, added to the sum at once.
    pub fn masked(&mut self, from: u32, msg: SecAggMasked) -> Result<(), SecAggError> {
        self.check(from, msg.round, Stage::Masked, "a masked update")?;
        let bad = |reason: String| Err(SecAggError::Client { index: from, reason });
        if !self.delivered.contains_key(&from) || self.weights.contains_key(&from) {
            return bad("a masked update from a client that did not share, or a second one".into());
        }
        if msg.masked.len() != 4 * self.sum.len() {
            let want = 4 * self.sum.len();
            return bad(format!(
                "{} bytes, the round's {} elements take {want}",
                msg.masked.len(),
                self.sum.len()
            ));
        }
        if !(msg.weight > 0.0 && msg.weight <= 1.0) {
            return bad(format!("weight {} is not in (0, 1]", msg.weight));
        }
        for (s, m) in self.sum.iter_mut().zip(msg.masked.chunks_exact(4)) {
            *s = s.wrapping_add(u32::from_le_bytes([m[0], m[1], m[2], m[3]]));
        }
        self.weights.insert(from, msg.weight);
        Ok(())
    }

    /// Closes stage 2: asks each client whose update arrived for its shares of the survivors' self masks and of
    /// the dropped neighbours' mask keys.
    pub fn close_masked(&mut self) -> Result<Vec<(u32, SecAggUnmask)>, SecAggError> {
        self.advance(Stage::Masked, Stage::Reveal)?;
        self.need("masked updates", self.weights.len())?;
        let mut out = Vec::with_capacity(self.weights.len());
        for &w in self.weights.keys() {
            let from = &self.delivered[&w];
            let mut survived: BTreeSet<u32> = from.iter().copied().filter(|v| self.weights.contains_key(v)).collect();
            survived.insert(w);
            let dropped: BTreeSet<u32> = from.iter().copied().filter(|v| !self.weights.contains_key(v)).collect();
            let msg = SecAggUnmask {
                round: self.params.round,
                survived: survived.iter().copied().collect(),
                dropped: dropped.iter().copied().collect(),
            };
            self.asked.insert(w, (survived, dropped));
            out.push((w, msg));
        }
        Ok(out)
    }

    /// Stage 3: a client's revealed shares; each must be the share dealt to this client (its x coordinate).
    pub fn reveal(&mut self, from: u32, msg: SecAggReveal) -> Result<(), SecAggError> {
        self.check(from, msg.round, Stage::Reveal, "revealed shares")?;
        let bad = |reason: String| Err(SecAggError::Client { index: from, reason });
        let Some((survived, dropped)) = self.asked.get(&from) else {
            return bad("shares from a client that was not asked".into());
        };
        if self.revealed.contains(&from) {
            return bad("shares revealed twice".into());
        }
        let owners = |list: &[offsite_protocol::RevealedShare]| list.iter().map(|s| s.owner).collect::<Vec<_>>();
        let (s_owners, k_owners) = (owners(&msg.self_masks), owners(&msg.mask_keys));
        if s_owners != survived.iter().copied().collect::<Vec<_>>()
            || k_owners != dropped.iter().copied().collect::<Vec<_>>()
        {
            return bad("its shares are not the ones asked for, in order".into());
        }
        for s in msg.self_masks.iter().chain(&msg.mask_keys) {
            // The holders of an owner's shares are the neighbours it was sent keys of, and itself, in order.
            let order = holders(s.owner, self.relayed[&s.owner].iter().copied());
            let x = order.iter().position(|&h| h == from).map(|i| i + 1);
            if s.share.len() != SHARE_LEN || x != Some(usize::from(s.share[0])) {
                return bad(format!("its share of client {} is not the one dealt to it", s.owner));
            }
        }
        for s in msg.self_masks {
            self.self_shares.entry(s.owner).or_default().push(s.share);
        }
        for s in msg.mask_keys {
            self.key_shares.entry(s.owner).or_default().push(s.share);
        }
        self.revealed.insert(from);
        Ok(())
    }

    /// Closes stage 3: rebuilds each survivor's self mask and each dropped client's mask key (each checked against
    /// what its owner advertised), removes every mask that does not cancel, and decodes the weighted mean.
    pub fn finish(mut self) -> Result<SecAggSum, SecAggError> {
        if self.stage != Stage::Reveal {
            return Err(SecAggError::Protocol(format!("finishing a round at {:?}", self.stage)));
        }
        let (t, round) = (self.params.threshold, self.params.round);
        let rebuild = |shares: Option<&Vec<Vec<u8>>>, owner: u32, what: &'static str| {
            let shares = shares.map(Vec::as_slice).unwrap_or_default();
            if shares.len() < t as usize {
                return Err(SecAggError::TooFew {
                    stage: what,
                    have: shares.len(),
                    need: t as usize,
                });
            }
            crypto::recover(t, shares).ok_or(SecAggError::BadShares { owner })
        };
        for &u in self.weights.keys() {
            let seed = rebuild(self.self_shares.get(&u), u, "self-mask shares")?;
            if crypto::commit(round, u, &seed) != self.keys[&u].self_mask_commit {
                return Err(SecAggError::BadShares { owner: u });
            }
            crypto::apply_mask(&seed, &mut self.sum, true);
        }
        let dropped: BTreeSet<u32> = self
            .delivered
            .keys()
            .copied()
            .filter(|v| !self.weights.contains_key(v))
            .collect();
        for &v in &dropped {
            let key = rebuild(self.key_shares.get(&v), v, "mask-key shares")?;
            if crypto::public_of(&key) != self.keys[&v].mask_pk {
                return Err(SecAggError::BadShares { owner: v });
            }
            let secret = StaticSecret::from(key);
            for (&u, from) in &self.delivered {
                if self.weights.contains_key(&u) && from.contains(&v) {
                    let shared = crypto::agree(&secret, &self.keys[&u].mask_pk).ok_or_else(|| SecAggError::Client {
                        index: u,
                        reason: "a mask key of small order".into(),
                    })?;
                    // u added this mask with the sign for v; take it away with the other.
                    crypto::apply_mask(&crypto::derive(&shared, MASK, round, u, v), &mut self.sum, v > u);
                }
            }
        }
        let weight: f64 = self.weights.values().sum();
        let contributors: Vec<u32> = self.weights.keys().copied().collect();
        let mean = encode::decode(&self.sum, self.scale)
            .into_iter()
            .map(|s| (s / weight) as f32)
            .collect();
        Ok(SecAggSum {
            mean,
            weight,
            error_bound: encode::sum_error_bound(contributors.len(), self.scale) / weight,
            contributors,
            recovered: dropped.len(),
        })
    }

    fn advance(&mut self, from: Stage, to: Stage) -> Result<(), SecAggError> {
        if self.stage != from {
            return Err(SecAggError::Protocol(format!(
                "closing {from:?} while the round is at {:?}",
                self.stage
            )));
        }
        self.stage = to;
        Ok(())
    }

    fn need(&self, stage: &'static str, have: usize) -> Result<(), SecAggError> {
        let need = self.params.threshold as usize;
        if have < need {
            return Err(SecAggError::TooFew { stage, have, need });
        }
        Ok(())
    }
}
