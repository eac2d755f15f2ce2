//! SecAgg+'s sparse masking graph: a Harary graph H(k, n) over a random permutation of the participants (Bell et al.
//! 2020, §3). Participant at position p is a neighbour of the k/2 positions on each side of p around the ring, so
//! each client masks with, and shares its secrets among, k others instead of n − 1. The permutation comes from a
//! public seed, so the server and every client compute the same graph.

use super::crypto::apply_mask;
use super::SecAggError;

/// The graph of one round.
#[derive(Debug, Clone)]
pub(crate) struct Graph {
    /// Participants.
    n: u32,
    /// Neighbours per participant (n − 1 for the complete graph).
    k: u32,
    /// Participant index → position on the ring.
    position: Vec<u32>,
    /// Position → participant index.
    at: Vec<u32>,
}

impl Graph {
    /// The graph of `n` participants with `k` neighbours each. `k ≥ n − 1` gives the complete graph; otherwise `k`
    /// must be even and at least 2.
    pub(crate) fn new(n: u32, k: u32, seed: u64) -> Result<Self, SecAggError> {
        if n < 2 {
            return Err(SecAggError::Setup(format!(
                "{n} participants: secure aggregation needs at least 2"
            )));
        }
        let k = k.min(n - 1);
        if k < n - 1 && (k < 2 || k % 2 == 1) {
            return Err(SecAggError::Setup(format!(
                "{k} neighbours of {n} participants: a sparse graph needs an even number, at least 2"
            )));
        }
        // Fisher–Yates driven by the ChaCha20 keystream of the seed (portable across builds, unlike rand's StdRng).
        let mut key = [0u8; 32];
        key[..8].copy_from_slice(&seed.to_le_bytes());
        key[8..].copy_from_slice(&b"offsite-secagg-graph-permutation"[..24]);
        let mut stream = vec![0u32; 2 * n as usize];
        apply_mask(&key, &mut stream, false);
        let mut at: Vec<u32> = (0..n).collect();
        for i in (1..n as usize).rev() {
            let r = u64::from(stream[2 * i]) << 32 | u64::from(stream[2 * i + 1]);
            at.swap(i, (r % (i as u64 + 1)) as usize);
        }
        let mut position = vec![0; n as usize];
        for (p, &u) in at.iter().enumerate() {
            position[u as usize] = p as u32;
        }
        Ok(Graph { n, k, position, at })
    }

    /// Neighbours per participant.
    pub(crate) fn degree(&self) -> u32 {
        self.k
    }

    /// The neighbours of `u`, ascending.
    pub(crate) fn neighbours(&self, u: u32) -> Vec<u32> {
        if self.k == self.n - 1 {
            return (0..self.n).filter(|&v| v != u).collect();
        }
        let p = self.position[u as usize];
        let mut out: Vec<u32> = (1..=self.k / 2)
            .flat_map(|d| [(p + d) % self.n, (p + self.n - d) % self.n])
            .map(|q| self.at[q as usize])
            .collect();
        out.sort_unstable();
        out
    }

    /// Whether `u` and `v` are neighbours.
    pub(crate) fn adjacent(&self, u: u32, v: u32) -> bool {
        if u == v || u >= self.n || v >= self.n {
            return false;
        }
        let (a, b) = (self.position[u as usize], self.position[v as usize]);
        let d = a.abs_diff(b);
        d.min(self.n - d) <= self.k / 2 || self.k == self.n - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn harary_graph_is_k_regular_symmetric_and_seeded() {
        let g = Graph::new(50, 6, 11).unwrap();
        for u in 0..50 {
            let ns = g.neighbours(u);
            assert_eq!(ns.len(), 6, "client {u}");
            for &v in &ns {
                assert!(g.adjacent(u, v) && g.adjacent(v, u) && g.neighbours(v).contains(&u));
            }
            assert_eq!((0..50).filter(|&v| g.adjacent(u, v)).count(), 6);
        }
        // Another seed, another graph; the same seed, the same one.
        assert_ne!((0..50).map(|u| g.neighbours(u)).collect::<Vec<_>>(), {
            let h = Graph::new(50, 6, 12).unwrap();
            (0..50).map(|u| h.neighbours(u)).collect::<Vec<_>>()
        });
        let again = Graph::new(50, 6, 11).unwrap();
        assert!((0..50).all(|u| again.neighbours(u) == g.neighbours(u)));
    }

    #[test]
    fn small_rounds_use_the_complete_graph_and_bad_degrees_are_refused() {
        let g = Graph::new(5, 30, 0).unwrap();
        assert_eq!(g.degree(), 4);
        assert_eq!(g.neighbours(2), vec![0, 1, 3, 4]);
        assert!(Graph::new(10, 3, 0).is_err());
        assert!(Graph::new(10, 0, 0).is_err());
        assert!(Graph::new(1, 2, 0).is_err());
    }
}
