//! A client's side of one secure-aggregation round, sans-IO: each method takes the server's message and returns the
//! answer. The stages must come in order; a message out of order, for another round, naming a client that is not a
//! neighbour, or asking for both secrets of one neighbour is refused.

use std::collections::{BTreeMap, BTreeSet};

use offsite_protocol::{
    RevealedShare, SealedShares, SecAggKeys, SecAggMasked, SecAggNeighbours, SecAggReveal, SecAggSetup, SecAggShares,
    SecAggUnmask,
};
use x25519_dalek::StaticSecret;

use super::crypto::{self, SHARE_LEN};
use super::graph::Graph;
use super::{encode, holders, SecAggError, MASK, SEAL};

/// Where the client is in the round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Keys advertised; waiting for the neighbours' keys.
    Advertised,
    /// Shares sent; waiting for the neighbours' shares.
    Shared,
    /// Shares received; ready to mask the update.
    Received,
    /// Masked update sent; waiting for the unmasking request.
    Masked,
    /// Shares revealed: the round is over for this client.
    Done,
}

/// One client in one round.
pub struct SecAggClient {
    setup: SecAggSetup,
    graph: Graph,
    stage: Stage,
    cipher: StaticSecret,
    mask: StaticSecret,
    self_mask: [u8; 32],
    /// Neighbours that advertised keys, as the server relayed them.
    neighbours: BTreeMap<u32, SecAggKeys>,
    /// Shares this client holds: of each neighbour that sent them, and of itself.
    held: BTreeMap<u32, Held>,
}

/// The two shares a client holds of one client's secrets.
struct Held {
    /// Of its mask key.
    mask_key: Vec<u8>,
    /// Of its self-mask seed.
    self_mask: Vec<u8>,
}

impl SecAggClient {
    /// Starts a round: checks the settings and makes fresh keys and a self-mask seed; returns the keys to advertise.
    pub fn new(setup: SecAggSetup) -> Result<(Self, SecAggKeys), SecAggError> {
        let graph = Graph::new(setup.participants, setup.neighbours, setup.graph_seed)?;
        if setup.index >= setup.participants {
            return Err(SecAggError::Setup(format!(
                "index {} of {} participants",
                setup.index, setup.participants
            )));
        }
        super::check_threshold(setup.threshold, graph.degree())?;
        if !(setup.clip > 0.0 && setup.clip.is_finite()) {
            return Err(SecAggError::Setup(format!("clip {} must be > 0", setup.clip)));
        }
        let most = encode::scale_for(setup.participants, setup.clip);
        if !(setup.scale > 0.0 && setup.scale <= most) {
            return Err(SecAggError::Setup(format!(
                "scale {} would let a sum of {} updates wrap (at most {most})",
                setup.scale, setup.participants
            )));
        }
        let (cipher, cipher_pk) = crypto::key_pair()?;
        let (mask, mask_pk) = crypto::key_pair()?;
        let self_mask = crypto::random32()?;
        let keys = SecAggKeys {
            round: setup.round,
            cipher_pk,
            mask_pk,
            self_mask_commit: crypto::commit(setup.round, setup.index, &self_mask),
        };
        let client = SecAggClient {
            setup,
            graph,
            stage: Stage::Advertised,
            cipher,
            mask,
            self_mask,
            neighbours: BTreeMap::new(),
            held: BTreeMap::new(),
        };
        Ok((client, keys))
    }

    fn expect(&self, stage: Stage, round: u64, what: &'static str) -> Result<(), SecAggError> {
        if self.stage != stage {
            return Err(SecAggError::Protocol(format!("{what} while {:?}", self.stage)));
        }
        if round != self.setup.round {
            return Err(SecAggError::Protocol(format!(
                "{what} for round {round} in round {}",
                self.setup.round
            )));
        }
        Ok(())
    }

    fn pair_key(&self, peer: u32) -> Result<[u8; 32], SecAggError> {
        let keys = &self.neighbours[&peer];
        let shared = crypto::agree(&self.cipher, &keys.cipher_pk)
            .ok_or_else(|| SecAggError::Protocol(format!("client {peer}'s cipher key is of small order")))?;
        Ok(crypto::derive(&shared, SEAL, self.setup.round, self.setup.index, peer))
    }

    /// Stage 1: given the neighbours' keys, deals Shamir shares of the mask key and the self-mask seed among the
    /// neighbours and itself and seals each neighbour's pair of shares to it.
    pub fn share(&mut self, msg: &SecAggNeighbours) -> Result<SecAggShares, SecAggError> {
        self.expect(Stage::Advertised, msg.round, "neighbour keys")?;
        let me = self.setup.index;
        for n in &msg.neighbours {
            if !self.graph.adjacent(me, n.index) {
                return Err(SecAggError::Protocol(format!(
                    "client {} is not a neighbour of {me}",
                    n.index
                )));
            }
            if n.keys.round != self.setup.round {
                return Err(SecAggError::Protocol(format!(
                    "client {}'s keys are for round {}",
                    n.index, n.keys.round
                )));
            }
            if self.neighbours.insert(n.index, n.keys.clone()).is_some() {
                return Err(SecAggError::Protocol(format!("client {} is listed twice", n.index)));
            }
        }
        let holders = holders(me, self.neighbours.keys().copied());
        if holders.len() < self.setup.threshold as usize {
            return Err(SecAggError::TooFew {
                stage: "key exchange",
                have: holders.len(),
                need: self.setup.threshold as usize,
            });
        }
        let mask_shares = crypto::split(&self.mask.to_bytes(), self.setup.threshold, holders.len());
        let self_shares = crypto::split(&self.self_mask, self.setup.threshold, holders.len());
        let mut sealed = Vec::with_capacity(holders.len() - 1);
        for ((&peer, m), s) in holders.iter().zip(mask_shares).zip(self_shares) {
            if peer == me {
                self.held.insert(
                    me,
                    Held {
                        mask_key: m,
                        self_mask: s,
                    },
                );
                continue;
            }
            let mut plain = Vec::with_capacity(8 + 2 * SHARE_LEN);
            plain.extend_from_slice(&me.to_le_bytes());
            plain.extend_from_slice(&peer.to_le_bytes());
            plain.extend_from_slice(&m);
            plain.extend_from_slice(&s);
            let ciphertext = crypto::seal(&self.pair_key(peer)?, me, peer, plain);
            sealed.push(SealedShares { peer, ciphertext });
        }
        self.stage = Stage::Shared;
        Ok(SecAggShares {
            round: self.setup.round,
            sealed,
        })
    }

    /// Stage 1's end: the shares the neighbours sealed to this client. Their senders are the neighbours this
    /// client's update is masked with.
    pub fn receive(&mut self, msg: &SecAggShares) -> Result<(), SecAggError> {
        self.expect(Stage::Shared, msg.round, "delivered shares")?;
        let me = self.setup.index;
        for s in &msg.sealed {
            let from = s.peer;
            if !self.neighbours.contains_key(&from) {
                return Err(SecAggError::Protocol(format!(
                    "shares from {from}, which advertised no keys to {me}"
                )));
            }
            if self.held.contains_key(&from) {
                return Err(SecAggError::Protocol(format!("shares from {from} delivered twice")));
            }
            let plain = crypto::open(&self.pair_key(from)?, from, me, s.ciphertext.clone())
                .filter(|p| p.len() == 8 + 2 * SHARE_LEN && p[..4] == from.to_le_bytes() && p[4..8] == me.to_le_bytes())
                .ok_or_else(|| SecAggError::Protocol(format!("the shares from {from} do not open")))?;
            let (m, s) = plain[8..].split_at(SHARE_LEN);
            self.held.insert(
                from,
                Held {
                    mask_key: m.to_vec(),
                    self_mask: s.to_vec(),
                },
            );
        }
        self.stage = Stage::Received;
        Ok(())
    }

    /// Stage 2: `weight · update`, clipped and encoded, plus the self mask and one pairwise mask per neighbour
    /// whose shares arrived (added towards higher indices, subtracted towards lower, so each pair cancels).
    /// Returns the message and how many coordinates were clipped.
    pub fn mask(&mut self, update: &[f32], weight: f64) -> Result<(SecAggMasked, usize), SecAggError> {
        self.expect(Stage::Received, self.setup.round, "masking")?;
        if update.len() as u64 != self.setup.length {
            return Err(SecAggError::Setup(format!(
                "the update has {} elements, the round {}",
                update.len(),
                self.setup.length
            )));
        }
        if let Some(i) = update.iter().position(|x| !x.is_finite()) {
            return Err(SecAggError::Setup(format!("the update's element {i} is {}", update[i])));
        }
        if !(weight > 0.0 && weight <= 1.0) {
            return Err(SecAggError::Setup(format!("weight {weight} must be in (0, 1]")));
        }
        let (mut masked, clipped) = encode::encode(update, weight, self.setup.clip, self.setup.scale);
        crypto::apply_mask(&self.self_mask, &mut masked, false);
        let me = self.setup.index;
        for &peer in self.held.keys().filter(|&&p| p != me) {
            let shared = crypto::agree(&self.mask, &self.neighbours[&peer].mask_pk)
                .ok_or_else(|| SecAggError::Protocol(format!("client {peer}'s mask key is of small order")))?;
            let seed = crypto::derive(&shared, MASK, self.setup.round, me, peer);
            crypto::apply_mask(&seed, &mut masked, peer < me);
        }
        self.stage = Stage::Masked;
        let masked = masked.iter().flat_map(|m| m.to_le_bytes()).collect();
        Ok((
            SecAggMasked {
                round: self.setup.round,
                weight,
                // The caller's to fill in: the mask does not depend on it.
                train_loss: 0.0,
                masked,
            },
            clipped,
        ))
    }

    /// Stage 3: the self-mask shares of the survivors and the mask-key shares of the dropped. A neighbour named in
    /// both lists, one this client holds no shares of, or this client among the dropped is refused: revealing both
    /// secrets of one client would unmask its update.
    pub fn reveal(&mut self, msg: &SecAggUnmask) -> Result<SecAggReveal, SecAggError> {
        self.expect(Stage::Masked, msg.round, "unmasking request")?;
        let me = self.setup.index;
        let survived: BTreeSet<u32> = msg.survived.iter().copied().collect();
        let dropped: BTreeSet<u32> = msg.dropped.iter().copied().collect();
        if survived.len() != msg.survived.len() || dropped.len() != msg.dropped.len() {
            return Err(SecAggError::Protocol(
                "a client is listed twice in the unmasking request".into(),
            ));
        }
        if let Some(v) = survived.intersection(&dropped).next() {
            return Err(SecAggError::Protocol(format!(
                "client {v} is named both survived and dropped"
            )));
        }
        if dropped.contains(&me) {
            return Err(SecAggError::Protocol(format!("client {me} is told it dropped out")));
        }
        if let Some(v) = survived.iter().chain(&dropped).find(|v| !self.held.contains_key(v)) {
            return Err(SecAggError::Protocol(format!(
                "client {me} holds no shares of client {v}"
            )));
        }
        if survived.len() < self.setup.threshold as usize {
            return Err(SecAggError::TooFew {
                stage: "unmasking",
                have: survived.len(),
                need: self.setup.threshold as usize,
            });
        }
        let out = SecAggReveal {
            round: self.setup.round,
            self_masks: survived
                .iter()
                .map(|&owner| RevealedShare {
                    owner,
                    share: self.held[&owner].self_mask.clone(),
                })
                .collect(),
            mask_keys: dropped
                .iter()
                .map(|&owner| RevealedShare {
                    owner,
                    share: self.held[&owner].mask_key.clone(),
                })
                .collect(),
        };
        self.stage = Stage::Done;
        Ok(out)
    }
}
