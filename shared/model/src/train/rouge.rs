//! ROUGE-L (longest common subsequence F-measure) of generated text against reference answers, tokenized as Google's
//! `rouge_score` does without stemming: lower-cased, every run of characters other than `a-z0-9` a separator.

/// `rouge_score`'s default tokens: the lower-cased text split at every character outside `a-z0-9`.
fn tokens(text: &str) -> Vec<String> {
    text.to_lowercase()
        .split(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit()))
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .collect()
}

/// Length of the longest common subsequence of two token lists (one row of the dynamic programme at a time).
fn lcs(a: &[String], b: &[String]) -> usize {
    let mut row = vec![0usize; b.len() + 1];
    for x in a {
        let mut diagonal = 0;
        for (j, y) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = if x == y { diagonal + 1 } else { above.max(row[j]) };
            diagonal = above;
        }
    }
    row[b.len()]
}

/// ROUGE-L F1 of `candidate` against the best of `references` (as Natural Instructions scores several acceptable
/// answers); 0 when either side has no token, or when there is no reference.
pub fn rouge_l(candidate: &str, references: &[String]) -> f64 {
    let c = tokens(candidate);
    references
        .iter()
        .map(|r| {
            let r = tokens(r);
            let common = lcs(&c, &r);
            if common == 0 {
                return 0.0;
            }
            let (p, q) = (common as f64 / c.len() as f64, common as f64 / r.len() as f64);
            2.0 * p * q / (p + q)
        })
        .fold(0.0, f64::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values printed by `rouge_score` 0.1.2 (`RougeScorer(['rougeL'], use_stemmer=False).score(ref, cand)`).
    #[test]
    fn matches_rouge_score() {
        let cases = [
            ("The cat sat on the mat.", "the cat is on the mat", 0.8333333333333334),
            ("hundreds of years.", "hundreds of years.", 1.0),
            ("It lasted for 2 hours, maybe more!", "2 hours.", 0.4444444444444445),
            ("", "earthquakes.", 0.0),
            ("Yes", "No", 0.0),
            (
                "The shaking of the ground causes damage",
                "The shaking of the ground causes damage to buildings.",
                0.8750000000000001,
            ),
            ("don't stop-me now 42x", "Don T stop me NOW 42X", 1.0),
            ("café naïve", "cafe naive", 0.0),
        ];
        for (cand, reference, want) in cases {
            let got = rouge_l(cand, &[reference.to_string()]);
            assert!((got - want).abs() < 1e-12, "{cand:?} vs {reference:?}: {got} != {want}");
        }
    }

    #[test]
    fn takes_the_best_reference() {
        let refs = ["an hour.".to_string(), "2 hours.".to_string()];
        assert_eq!(rouge_l("2 hours", &refs), 1.0);
        assert_eq!(rouge_l("2 hours", &[]), 0.0);
    }
}
