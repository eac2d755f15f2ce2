//! The primitives, all from well-kept crates: X25519 (x25519-dalek), HKDF-SHA256 and ChaCha20-Poly1305 (ring), the
//! mask keystream as ChaCha20 through ring's AEAD, Shamir sharing over GF(256) (blahaj). Nothing here is home-made
//! cryptography; this file only fixes how keys, nonces and labels are bound to a round and a pair of clients.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305};
use ring::hkdf;
use ring::rand::{SecureRandom, SystemRandom};
use sha2::{Digest, Sha256};
use x25519_dalek::{PublicKey, StaticSecret};

use super::SecAggError;

/// Bytes of one Shamir share of a 32-byte secret: the x coordinate, then 32 bytes.
pub(crate) const SHARE_LEN: usize = 33;

/// Elements of the mask keystream produced per nonce (4 MiB of keystream per AEAD call).
const KEYSTREAM_CHUNK: usize = 1 << 20;

/// 32 bytes from the operating system's generator.
pub(crate) fn random32() -> Result<[u8; 32], SecAggError> {
    let mut out = [0u8; 32];
    SystemRandom::new().fill(&mut out).map_err(|_| SecAggError::Random)?;
    Ok(out)
}

/// A fresh X25519 key pair: the secret and the public key's bytes.
pub(crate) fn key_pair() -> Result<(StaticSecret, [u8; 32]), SecAggError> {
    let secret = StaticSecret::from(random32()?);
    let public = PublicKey::from(&secret).to_bytes();
    Ok((secret, public))
}

/// The public key of a secret given as bytes (to check a secret rebuilt from shares against the advertised key).
pub(crate) fn public_of(secret: &[u8; 32]) -> [u8; 32] {
    PublicKey::from(&StaticSecret::from(*secret)).to_bytes()
}

/// X25519 agreement; a peer key of small order (the shared secret all zero) is refused, since it would make the
/// "shared" key known to anyone.
pub(crate) fn agree(secret: &StaticSecret, peer: &[u8; 32]) -> Option<[u8; 32]> {
    let shared = secret.diffie_hellman(&PublicKey::from(*peer));
    shared.was_contributory().then(|| shared.to_bytes())
}

/// HKDF-SHA256 of an agreed secret into a 32-byte key, bound to a purpose, the round and the (unordered) pair.
pub(crate) fn derive(shared: &[u8; 32], purpose: &[u8], round: u64, a: u32, b: u32) -> [u8; 32] {
    let (lo, hi) = (a.min(b), a.max(b));
    let mut info = Vec::with_capacity(purpose.len() + 16);
    info.extend_from_slice(purpose);
    info.extend_from_slice(&round.to_le_bytes());
    info.extend_from_slice(&lo.to_le_bytes());
    info.extend_from_slice(&hi.to_le_bytes());
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, b"offsite-secagg-v1").extract(shared);
    let info = [info.as_slice()];
    let okm = prk
        .expand(&info, hkdf::HKDF_SHA256)
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    let mut out = [0u8; 32];
    okm.fill(&mut out).expect("the output length was given to expand");
    out
}

/// The commitment to a self-mask seed that a client advertises with its keys.
pub(crate) fn commit(round: u64, index: u32, seed: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"offsite-secagg-self-mask");
    h.update(round.to_le_bytes());
    h.update(index.to_le_bytes());
    h.update(seed);
    h.finalize().into()
}

fn aead_key(key: &[u8; 32]) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, key).expect("a 32-byte ChaCha20-Poly1305 key"))
}

/// The nonce of a sealed message from `from` to `to`: both directions of a pair share its key, never a nonce.
fn pair_nonce(from: u32, to: u32) -> Nonce {
    let mut n = [0u8; 12];
    n[..4].copy_from_slice(&from.to_le_bytes());
    n[4..8].copy_from_slice(&to.to_le_bytes());
    Nonce::assume_unique_for_key(n)
}

/// Seals `plain` from `from` to `to` under the pair's key (the key is fresh each round).
pub(crate) fn seal(key: &[u8; 32], from: u32, to: u32, mut plain: Vec<u8>) -> Vec<u8> {
    aead_key(key)
        .seal_in_place_append_tag(pair_nonce(from, to), Aad::empty(), &mut plain)
        .expect("a share message is far below ChaCha20-Poly1305's length limit");
    plain
}

/// Opens what `from` sealed to `to`; `None` when it was not sealed with this key for this direction.
pub(crate) fn open(key: &[u8; 32], from: u32, to: u32, mut sealed: Vec<u8>) -> Option<Vec<u8>> {
    let len = aead_key(key)
        .open_in_place(pair_nonce(from, to), Aad::empty(), &mut sealed)
        .ok()?
        .len();
    sealed.truncate(len);
    Some(sealed)
}

/// Adds (`negate` false) or subtracts the keystream of `seed`, read as little-endian `u32`s, to `out` modulo 2³².
/// The stream is ChaCha20's (through the AEAD with the tag dropped), one nonce per chunk of a million elements, so
/// every build of every side expands a seed to the same mask.
pub(crate) fn apply_mask(seed: &[u8; 32], out: &mut [u32], negate: bool) {
    let key = aead_key(seed);
    let mut buf = vec![0u8; 4 * KEYSTREAM_CHUNK.min(out.len())];
    for (chunk, part) in out.chunks_mut(KEYSTREAM_CHUNK).enumerate() {
        let bytes = &mut buf[..4 * part.len()];
        bytes.fill(0);
        let mut nonce = [0u8; 12];
        nonce[..8].copy_from_slice(&(chunk as u64).to_le_bytes());
        // The keystream is what was sealed over zeros; the tag is not needed.
        let _tag = key
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::empty(), bytes)
            .expect("4 MiB is below ChaCha20-Poly1305's length limit");
        for (o, w) in part.iter_mut().zip(bytes.chunks_exact(4)) {
            let m = u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
            *o = if negate { o.wrapping_sub(m) } else { o.wrapping_add(m) };
        }
    }
}

/// Shamir shares of a 32-byte secret with threshold `t`, one per holder, the i-th with x coordinate i + 1.
pub(crate) fn split(secret: &[u8; 32], t: u32, holders: usize) -> Vec<Vec<u8>> {
    let t = u8::try_from(t).expect("the threshold was checked to be at most 255");
    blahaj::Sharks(t)
        .dealer(secret)
        .take(holders)
        .map(|s| Vec::from(&s))
        .collect()
}

/// Rebuilds a secret from at least `t` shares; `None` when they do not give a 32-byte secret.
pub(crate) fn recover(t: u32, shares: &[Vec<u8>]) -> Option<[u8; 32]> {
    let t = u8::try_from(t).ok()?;
    let shares: Vec<blahaj::Share> = shares
        .iter()
        .map(|s| blahaj::Share::try_from(s.as_slice()))
        .collect::<Result<_, _>>()
        .ok()?;
    blahaj::Sharks(t).recover(&shares).ok()?.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agreement_is_symmetric_and_small_order_keys_are_refused() {
        let (a, a_pk) = key_pair().unwrap();
        let (b, b_pk) = key_pair().unwrap();
        assert_eq!(agree(&a, &b_pk), agree(&b, &a_pk));
        assert!(agree(&a, &b_pk).is_some());
        // The identity point: every secret agrees on zero with it.
        assert_eq!(agree(&a, &[0u8; 32]), None);
        assert_eq!(public_of(&a.to_bytes()), a_pk);
    }

    #[test]
    fn sealed_shares_open_only_for_their_direction() {
        let key = [7u8; 32];
        let sealed = seal(&key, 1, 2, b"shares".to_vec());
        assert_eq!(open(&key, 1, 2, sealed.clone()).as_deref(), Some(&b"shares"[..]));
        assert_eq!(open(&key, 2, 1, sealed.clone()), None);
        assert_eq!(open(&[8u8; 32], 1, 2, sealed.clone()), None);
        let mut flipped = sealed;
        flipped[0] ^= 1;
        assert_eq!(open(&key, 1, 2, flipped), None);
    }

    #[test]
    fn a_mask_and_its_negation_cancel_across_chunks() {
        let n = KEYSTREAM_CHUNK + 17;
        let x: Vec<u32> = (0..n as u32).collect();
        let mut y = x.clone();
        apply_mask(&[3u8; 32], &mut y, false);
        assert_ne!(y[..16], x[..16]);
        // The second chunk uses its own nonce, not the first chunk's keystream again.
        let (first, second) = (
            y[0].wrapping_sub(x[0]),
            y[KEYSTREAM_CHUNK].wrapping_sub(x[KEYSTREAM_CHUNK]),
        );
        assert_ne!(first, second);
        apply_mask(&[3u8; 32], &mut y, true);
        assert_eq!(y, x);
    }

    #[test]
    fn shamir_needs_the_threshold() {
        let secret = [42u8; 32];
        let shares = split(&secret, 3, 5);
        assert_eq!(shares.len(), 5);
        assert!(shares
            .iter()
            .enumerate()
            .all(|(i, s)| s.len() == SHARE_LEN && s[0] as usize == i + 1));
        assert_eq!(recover(3, &shares[2..]), Some(secret));
        assert_eq!(
            recover(3, &[shares[0].clone(), shares[4].clone(), shares[2].clone()]),
            Some(secret)
        );
        assert_eq!(recover(3, &shares[..2]), None);
    }

    #[test]
    fn keys_depend_on_purpose_round_and_pair_but_not_its_order() {
        let s = [9u8; 32];
        assert_eq!(derive(&s, b"mask", 1, 2, 3), derive(&s, b"mask", 1, 3, 2));
        assert_ne!(derive(&s, b"mask", 1, 2, 3), derive(&s, b"mask", 2, 2, 3));
        assert_ne!(derive(&s, b"mask", 1, 2, 3), derive(&s, b"seal", 1, 2, 3));
        assert_ne!(derive(&s, b"mask", 1, 2, 3), derive(&s, b"mask", 1, 2, 4));
    }
}
