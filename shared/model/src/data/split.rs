//! Splitting examples across simulated clients: IID, Dirichlet(α) over a category field, one client per category
//! value ("meta"), or one client per input file. Deterministic with a seed.

use std::collections::BTreeMap;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_distr::{Distribution, Gamma};
use serde::{Deserialize, Serialize};

use super::{DataError, Example};

/// How examples are dealt to clients.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum Split {
    /// Shuffled and dealt round-robin.
    Iid {
        /// Number of clients.
        clients: usize,
    },
    /// For each category, client shares drawn from Dirichlet(α): small α is very non-IID.
    Dirichlet {
        /// Number of clients.
        clients: usize,
        /// Concentration α > 0.
        alpha: f64,
    },
    /// One client per distinct category value (sorted).
    Meta,
    /// One client per input file.
    Files,
}

fn category(e: &Example, i: usize) -> Result<&str, DataError> {
    e.category
        .as_deref()
        .ok_or_else(|| DataError::Split(format!("example {i} has no category (needed to split by category)")))
}

impl Split {
    /// Deals `per_file` (the examples of each input file, in order) to clients; every client gets at least one.
    pub fn apply(&self, per_file: Vec<Vec<Example>>, seed: u64) -> Result<Vec<Vec<Example>>, DataError> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let out = match self {
            Split::Files => per_file,
            Split::Iid { clients } => {
                let mut all: Vec<Example> = per_file.into_iter().flatten().collect();
                all.shuffle(&mut rng);
                let n = (*clients).max(1);
                let mut out = vec![Vec::new(); n];
                for (i, e) in all.into_iter().enumerate() {
                    out[i % n].push(e);
                }
                out
            }
            Split::Meta => {
                let mut groups: BTreeMap<String, Vec<Example>> = BTreeMap::new();
                for (i, e) in per_file.into_iter().flatten().enumerate() {
                    groups.entry(category(&e, i)?.to_string()).or_default().push(e);
                }
                groups.into_values().collect()
            }
            Split::Dirichlet { clients, alpha } => {
                if !(*alpha > 0.0 && alpha.is_finite()) {
                    return Err(DataError::Split(format!("dirichlet alpha {alpha} must be > 0")));
                }
                let gamma = Gamma::new(*alpha, 1.0).map_err(|e| DataError::Split(e.to_string()))?;
                let mut groups: BTreeMap<String, Vec<Example>> = BTreeMap::new();
                for (i, e) in per_file.into_iter().flatten().enumerate() {
                    groups.entry(category(&e, i)?.to_string()).or_default().push(e);
                }
                let n = (*clients).max(1);
                let mut out = vec![Vec::new(); n];
                for (_, mut group) in groups {
                    group.shuffle(&mut rng);
                    let draws: Vec<f64> = (0..n).map(|_| gamma.sample(&mut rng)).collect();
                    let total: f64 = draws.iter().sum::<f64>().max(f64::MIN_POSITIVE);
                    let len = group.len();
                    let mut cum = 0.0;
                    let mut start = 0;
                    for (c, d) in draws.iter().enumerate() {
                        cum += d / total;
                        let end = if c + 1 == n {
                            len
                        } else {
                            ((cum * len as f64).round() as usize).min(len)
                        };
                        out[c].extend(group[start..end.max(start)].iter().cloned());
                        start = end.max(start);
                    }
                }
                out
            }
        };
        if let Some(i) = out.iter().position(Vec::is_empty) {
            return Err(DataError::Split(format!(
                "client {i} of {} received no example (fewer examples than clients, or α too small)",
                out.len()
            )));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(id: u32, cat: Option<&str>) -> Example {
        Example {
            ids: vec![id],
            labels: vec![id as i64],
            category: cat.map(str::to_string),
        }
    }

    fn ids(split: &[Vec<Example>]) -> Vec<Vec<u32>> {
        split.iter().map(|c| c.iter().map(|e| e.ids[0]).collect()).collect()
    }

    #[test]
    fn every_split_keeps_every_example_once_and_is_deterministic() {
        let cats = ["a", "b", "c"];
        let files: Vec<Vec<Example>> = (0..3)
            .map(|f| (0..20).map(|i| ex(f * 100 + i, Some(cats[(i % 3) as usize]))).collect())
            .collect();
        for split in [
            Split::Files,
            Split::Iid { clients: 4 },
            Split::Meta,
            Split::Dirichlet { clients: 3, alpha: 5.0 },
        ] {
            let a = split.apply(files.clone(), 5).unwrap();
            assert_eq!(ids(&a), ids(&split.apply(files.clone(), 5).unwrap()), "{split:?}");
            let mut all: Vec<u32> = ids(&a).concat();
            all.sort();
            let mut want: Vec<u32> = files.iter().flatten().map(|e| e.ids[0]).collect();
            want.sort();
            assert_eq!(all, want, "{split:?}");
        }
        assert_eq!(Split::Files.apply(files.clone(), 0).unwrap().len(), 3);
        let meta = Split::Meta.apply(files.clone(), 0).unwrap();
        assert_eq!(meta.len(), 3);
        assert!(meta[0].iter().all(|e| e.category.as_deref() == Some("a")));
        let iid = Split::Iid { clients: 4 }.apply(files, 0).unwrap();
        assert!(iid.iter().all(|c| c.len() == 15));
    }

    #[test]
    fn small_alpha_is_skewed_and_missing_categories_are_named() {
        let files = vec![(0..300)
            .map(|i| ex(i, Some(["x", "y", "z"][(i % 3) as usize])))
            .collect::<Vec<_>>()];
        let skewed = Split::Dirichlet { clients: 3, alpha: 0.1 }.apply(files.clone(), 1);
        let even = Split::Dirichlet {
            clients: 3,
            alpha: 100.0,
        }
        .apply(files.clone(), 1)
        .unwrap();
        // With α = 100 each client gets close to a third of each category.
        for c in &even {
            assert!((80..=120).contains(&c.len()), "{}", c.len());
        }
        // With α = 0.1 clients are dominated by one category; with α = 100 none is.
        let top_share = |c: &Vec<Example>| {
            let mut counts = BTreeMap::new();
            for e in c {
                *counts.entry(e.category.clone()).or_insert(0usize) += 1;
            }
            *counts.values().max().unwrap() as f64 / c.len() as f64
        };
        assert!(even.iter().all(|c| top_share(c) < 0.5));
        match skewed {
            Ok(s) => assert!(s.iter().any(|c| top_share(c) > 0.8)),
            Err(e) => assert!(e.to_string().contains("received no example")),
        }
        let e = Split::Meta.apply(vec![vec![ex(1, None)]], 0).unwrap_err().to_string();
        assert!(e.contains("example 0 has no category"), "{e}");
        assert!(Split::Iid { clients: 3 }.apply(vec![vec![ex(1, None)]], 0).is_err());
    }
}
