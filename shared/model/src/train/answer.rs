//! Exact match of a final number, as FederatedScope-LLM scores GSM8K: the number after the last "the answer is"
//! (any case), otherwise the last number in the text; commas and a trailing period stripped.

/// The numbers in `text` in order: an optional minus sign right before a digit, then digits, commas and periods,
/// ending at a digit (so "1,234." is `1234`).
fn numbers(text: &str) -> Vec<f64> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        if !chars[i].is_ascii_digit() {
            i += 1;
            continue;
        }
        let negative = i > 0 && chars[i - 1] == '-';
        let start = i;
        while i < chars.len() && (chars[i].is_ascii_digit() || chars[i] == ',' || chars[i] == '.') {
            i += 1;
        }
        let mut token: String = chars[start..i].iter().filter(|&&c| c != ',').collect();
        while token.ends_with('.') {
            token.pop();
        }
        if let Ok(v) = token.parse::<f64>() {
            out.push(if negative { -v } else { v });
        }
    }
    out
}

/// The final number a completion gives, if any.
pub fn final_number(completion: &str) -> Option<f64> {
    let lower = completion.to_lowercase();
    const CUE: &str = "the answer is";
    match lower.rfind(CUE) {
        Some(at) => numbers(&lower[at + CUE.len()..]).first().copied(),
        None => numbers(&lower).last().copied(),
    }
}

/// 1 when the completion's final number equals the number of any reference, else 0.
pub fn exact_match(completion: &str, references: &[String]) -> f64 {
    let Some(got) = final_number(completion) else {
        return 0.0;
    };
    let hit = references
        .iter()
        .filter_map(|r| r.trim().replace(',', "").trim_end_matches('.').parse::<f64>().ok())
        .any(|want| want == got);
    if hit {
        1.0
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_the_number_after_the_cue_else_the_last() {
        assert_eq!(final_number("5 + 3 = 8\nThe answer is 8."), Some(8.0));
        assert_eq!(final_number("The answer is 1,234. Then 7"), Some(1234.0));
        assert_eq!(
            final_number("the answer is 3, no, THE ANSWER IS -7.5 apples"),
            Some(-7.5)
        );
        assert_eq!(final_number("The answer is $12 and 15"), Some(12.0));
        assert_eq!(final_number("first 3 then 4.5."), Some(4.5));
        assert_eq!(final_number("no number here"), None);
        assert_eq!(final_number("The answer is unknown"), None);
    }

    #[test]
    fn matches_numerically() {
        let refs = ["28080".to_string()];
        assert_eq!(exact_match("so £28,080 in all. The answer is 28,080.", &refs), 1.0);
        assert_eq!(exact_match("The answer is 28080.0", &refs), 1.0);
        assert_eq!(exact_match("The answer is 2808", &refs), 0.0);
        assert_eq!(exact_match("", &refs), 0.0);
    }
}
