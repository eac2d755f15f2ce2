//! `metrics.svg`: training loss and plug-in perplexity per round, from `metrics.jsonl`.

use std::path::Path;

use anyhow::{Context, Result};
use plotters::prelude::*;

/// Reads `dir/metrics.jsonl` and draws `dir/metrics.svg` (two panels: loss, perplexity).
pub(crate) fn write(dir: &Path) -> Result<()> {
    let path = dir.join("metrics.jsonl");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let (mut loss, mut ppl) = (Vec::new(), Vec::new());
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    for (i, line) in lines.iter().enumerate() {
        let v: serde_json::Value = match serde_json::from_str(line) {
            Ok(v) => v,
            // A last line torn by a crash mid-append is skipped; anything else is an error naming the line.
            Err(e) if i + 1 == lines.len() => {
                tracing::warn!(file = %path.display(), line = i + 1, error = %e, "skipping a torn last line");
                continue;
            }
            Err(e) => return Err(e).with_context(|| format!("{} line {}", path.display(), i + 1)),
        };
        let round = v["round"].as_f64().unwrap_or(0.0);
        if let Some(l) = v["train_loss"].as_f64().filter(|l| l.is_finite()) {
            loss.push((round, l));
        }
        if let Some(p) = v["eval_perplexity"].as_f64() {
            ppl.push((round, p));
        }
    }
    let out = dir.join("metrics.svg");
    let root = SVGBackend::new(&out, (960, 360)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let panels = root.split_evenly((1, 2));
    for (area, (title, series, color)) in panels
        .iter()
        .zip([("train loss (clients)", &loss, BLUE), ("plug-in perplexity", &ppl, RED)])
    {
        let rounds = series.iter().map(|p| p.0).fold(1.0f64, f64::max);
        let (lo, hi) = series
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| (a.min(p.1), b.max(p.1)));
        let (lo, hi) = if lo.is_finite() { (lo, hi) } else { (0.0, 1.0) };
        let pad = ((hi - lo) * 0.1).max(1e-3);
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d(0.0..rounds + 0.5, (lo - pad)..(hi + pad))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        chart
            .configure_mesh()
            .x_desc("round")
            .draw()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        chart
            .draw_series(LineSeries::new(series.iter().copied(), color.stroke_width(2)))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        chart
            .draw_series(series.iter().map(|&p| Circle::new(p, 3, color.filled())))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    tracing::info!(path = %out.display(), "metrics plot written");
    Ok(())
}
