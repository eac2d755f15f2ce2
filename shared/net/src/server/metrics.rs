//! `metrics.jsonl`: one JSON row per completed round, appended before the round's state is saved. A crash can
//! leave a torn last line (cut off before the next row) or rows of a round that was never saved (cut when the
//! server starts again, since that round runs again and writes its row anew).

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use offsite_fed::RoundReport;
use tracing::warn;

use crate::NetError;

fn file_err(path: &Path) -> impl Fn(std::io::Error) -> NetError + '_ {
    move |e| NetError::File {
        path: path.into(),
        reason: e.to_string(),
    }
}

/// Appends one row; a torn last line (a crash mid-write) is cut off first, so it cannot glue onto the new one.
pub(super) fn append(path: &Path, report: &RoundReport) -> Result<(), NetError> {
    let err = file_err(path);
    // Checked from the last byte only; a torn line is cut with a handle of its own (an append-only one cannot
    // truncate on every platform).
    let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    if len > 0 {
        let mut r = std::fs::File::open(path).map_err(&err)?;
        let mut last = [0u8];
        r.seek(SeekFrom::Start(len - 1)).map_err(&err)?;
        r.read_exact(&mut last).map_err(&err)?;
        if last[0] != b'\n' {
            let text = std::fs::read(path).map_err(&err)?;
            let keep = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
            warn!(path = %path.display(), bytes = text.len() - keep, "cutting off a torn last line");
            let w = std::fs::OpenOptions::new().write(true).open(path).map_err(&err)?;
            w.set_len(keep as u64).map_err(&err)?;
        }
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(&err)?;
    let line = serde_json::to_string(report).map_err(|e| NetError::Config(e.to_string()))?;
    writeln!(f, "{line}").map_err(&err)
}

/// Cuts the rows of rounds after `saved` (the round of the saved state), and a torn last line, from the file when
/// there are any; a missing file is left missing. Rows that do not parse are kept as they are (the file is the
/// operator's to read).
pub(super) fn cut_after(path: &Path, saved: u64) -> Result<(), NetError> {
    let err = file_err(path);
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(err(e)),
    };
    let whole = text.rfind('\n').map_or(0, |i| i + 1);
    let round = |line: &str| serde_json::from_str::<serde_json::Value>(line).ok()?["round"].as_u64();
    let kept: Vec<&str> = text[..whole]
        .lines()
        .filter(|l| round(l).is_none_or(|r| r <= saved))
        .collect();
    let cut = text[..whole].lines().count() - kept.len();
    if cut == 0 && whole == text.len() {
        return Ok(());
    }
    warn!(path = %path.display(), rows = cut, torn_bytes = text.len() - whole, saved_round = saved, "cutting rows of rounds that were never saved");
    let mut out = kept.join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    offsite_fed::write_atomic(path, out.as_bytes()).map_err(|e| NetError::File {
        path: path.into(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(round: u64) -> RoundReport {
        RoundReport {
            round,
            sampled: 3,
            participants: 3,
            rejected: 0,
            bytes_in: 10,
            bytes_out: 20,
            train_loss: 1.5,
            eval_perplexity: None,
            wall_s: 0.5,
            global_sha256: "ab".into(),
            epsilon: None,
            delta: None,
            masks_recovered: None,
            global_rounding: None,
        }
    }

    fn rounds(path: &Path) -> Vec<u64> {
        let text = std::fs::read_to_string(path).unwrap();
        text.lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["round"]
                    .as_u64()
                    .unwrap()
            })
            .collect()
    }

    #[test]
    fn a_torn_last_metrics_line_is_cut_off_before_the_next_one_is_appended() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        std::fs::write(&path, "{\"round\":1}\n{\"round\":2,\"samp").unwrap();
        append(&path, &report(2)).unwrap();
        append(&path, &report(3)).unwrap();
        assert_eq!(rounds(&path), [1, 2, 3]);
    }

    #[test]
    fn rows_past_the_saved_round_and_a_torn_line_are_cut() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        cut_after(&path, 3).unwrap();
        assert!(!path.exists(), "no file is made up");
        std::fs::write(&path, "{\"round\":1}\n{\"round\":2}\n{\"round\":3}\n{\"round\":4,\"sa").unwrap();
        cut_after(&path, 2).unwrap();
        assert_eq!(rounds(&path), [1, 2]);
        let before = std::fs::read(&path).unwrap();
        cut_after(&path, 2).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), before, "nothing more to cut");
        cut_after(&path, 0).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "",
            "a fresh state keeps no rows"
        );
    }
}
