//! The bench's report: `report.json`, `report.md` (the table) and two plots, `rounds.svg` (the plug-in's perplexity
//! after each round of the federated arms) and `arms.svg` (every arm's final metric).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::prelude::*;
use serde_json::json;

use super::arms::ArmResult;
use super::config::{Arm, Metric};

/// What the report is made of.
pub(crate) struct Report<'a> {
    /// The task's name.
    pub task: &'a str,
    /// Its metric.
    pub metric: Metric,
    /// Examples every training arm sees, and tokens per example (at most).
    pub budget: (usize, usize),
    /// Seconds the emulator build took in this invocation (None: it came from the cache).
    pub emulator_build_s: Option<f64>,
    /// The offsite-tuning emulator the arms used.
    pub emulator: Option<&'a Path>,
    /// The arms that ran, in report order.
    pub arms: BTreeMap<Arm, ArmResult>,
}

impl Report<'_> {
    fn metric_of(&self, arm: Arm) -> Option<f64> {
        self.arms.get(&arm).map(|r| r.metric)
    }

    /// `(fed_ot_plugin − zero_shot) / (reference − zero_shot)` on the metric; None where the reference does not
    /// improve on zero-shot (there is no gap to close, and the ratio would mislead).
    fn gap_closed(&self, reference: Arm) -> Option<f64> {
        let (fed, zero, r) = (
            self.metric_of(Arm::FedOtPlugin)?,
            self.metric_of(Arm::ZeroShot)?,
            self.metric_of(reference)?,
        );
        let improves = if self.metric.higher_is_better() {
            r > zero
        } else {
            r < zero
        };
        improves.then(|| (fed - zero) / (r - zero))
    }

    fn json(&self) -> serde_json::Value {
        let arms: serde_json::Map<String, serde_json::Value> = self
            .arms
            .iter()
            .map(|(a, r)| (a.name().to_string(), serde_json::to_value(r).unwrap_or_default()))
            .collect();
        let ratio = |a: Arm, b: Arm| Some(self.arms.get(&a)?.perplexity / self.arms.get(&b)?.perplexity);
        json!({
            "task": self.task,
            "metric": {"name": self.metric.name(), "higher_is_better": self.metric.higher_is_better()},
            "budget": {"examples": self.budget.0, "max_tokens_per_example": self.budget.1},
            "emulator_build_s": self.emulator_build_s,
            "emulator": self.emulator.map(|p| p.display().to_string()),
            "arms": arms,
            "gap_closed": {
                "vs_full_ft": self.gap_closed(Arm::CentralFullFt),
                "vs_adapter_ceiling": self.gap_closed(Arm::CentralAdapterCeiling),
                "vs_fed_lora": self.gap_closed(Arm::FedLora),
            },
            "protection": ratio(Arm::FedOtEmulator, Arm::FedOtPlugin),
            "fed_vs_central_ot_plugin": ratio(Arm::FedOtPlugin, Arm::CentralOtPlugin),
        })
    }

    fn markdown(&self) -> String {
        let mut md = String::new();
        let dir = if self.metric.higher_is_better() {
            "higher"
        } else {
            "lower"
        };
        let _ = writeln!(md, "# Bench `{}`\n", self.task);
        let what = match self.metric {
            Metric::Perplexity => "perplexity of the held-out data".to_string(),
            Metric::RougeL => "ROUGE-L F1 (%) of greedy generations for the held-out prompts against the best of \
                               their reference answers (rouge_score's tokens, no stemming)"
                .to_string(),
            Metric::ExactMatch => "exact match (%) of the final number of greedy generations for the held-out \
                                   problems (after \"the answer is\", otherwise the last number)"
                .to_string(),
        };
        let _ = writeln!(
            md,
            "Metric: {what} ({dir} is better). Every training arm sees {} examples of at most {} tokens.\n",
            self.budget.0, self.budget.1
        );
        // A metric by generation has the perplexity beside it.
        let by_generation = self.metric != Metric::Perplexity;
        let _ = writeln!(
            md,
            "| arm | {}{} | emulator + adapter perplexity | wall s | client peak RSS MiB | bytes up / client / round \
             | bytes down / client / round | trainable params | examples |",
            self.metric.name(),
            if by_generation { " | perplexity" } else { "" }
        );
        let _ = writeln!(
            md,
            "|---|---|---|---|---|---|---|---|---|{}",
            if by_generation { "---|" } else { "" }
        );
        let opt = |v: Option<f64>, digits: usize| v.map_or("–".to_string(), |v| format!("{v:.digits$}"));
        for (arm, r) in &self.arms {
            let perplexity = if by_generation {
                format!(" | {:.3}", r.perplexity)
            } else {
                String::new()
            };
            let _ = writeln!(
                md,
                "| {} | {:.3}{} | {} | {:.0} | {} | {} | {} | {} | {} |",
                match r.epsilon {
                    Some(e) => format!("{} (ε {e:.2}, δ 1e-5)", arm.name()),
                    None => arm.name().to_string(),
                },
                r.metric,
                perplexity,
                opt(r.emulator_perplexity, 3),
                r.wall_s,
                r.client_peak_rss_mib.map_or("–".into(), |m| m.to_string()),
                opt(r.bytes_up_per_client_round, 0),
                opt(r.bytes_down_per_client_round, 0),
                r.trainable_params.map_or("–".into(), |p| p.to_string()),
                r.train_examples
            );
        }
        // "–": the arm did not run, or does not improve on zero_shot.
        let pct = |v: Option<f64>| v.map_or("–".to_string(), |v| format!("{:.1}%", 100.0 * v));
        let _ = writeln!(md);
        let _ = writeln!(
            md,
            "- gap closed by `fed_ot_plugin`, `(fed_ot_plugin − zero_shot) / (reference − zero_shot)`: {} of the way \
             to `central_adapter_ceiling`, {} of the way to `central_full_ft`, {} of `fed_lora`'s gain (clients \
             holding the full model); – where the reference did not run or does not beat zero_shot",
            pct(self.gap_closed(Arm::CentralAdapterCeiling)),
            pct(self.gap_closed(Arm::CentralFullFt)),
            pct(self.gap_closed(Arm::FedLora))
        );
        let j = self.json();
        if let Some(p) = j["protection"].as_f64() {
            let _ = writeln!(
                md,
                "- protection: the client's emulator with the global adapter has {p:.2}× the plug-in's perplexity"
            );
        }
        if let Some(p) = j["fed_vs_central_ot_plugin"].as_f64() {
            let _ = writeln!(md, "- `fed_ot_plugin` / `central_ot_plugin` perplexity: {p:.3}");
        }
        let rates: Vec<f64> = self.arms.values().filter_map(|r| r.generation_tokens_per_s).collect();
        if !rates.is_empty() {
            let _ = writeln!(
                md,
                "- generation (batched greedy with the KV cache, prompts bucketed by length): {:.1} tokens/s, mean \
                 over the arms",
                rates.iter().sum::<f64>() / rates.len() as f64
            );
        }
        let _ = writeln!(
            md,
            "- emulator build: {}",
            self.emulator_build_s.map_or("from the cache".into(), |s| format!(
                "{s:.0} s (once; cached by its inputs' hash)"
            ))
        );
        let _ = writeln!(
            md,
            "- client peak RSS is measured after training, before evaluation loads the full model; federated arms \
             run the server and every client in one process (their `process_peak_rss_mib` in report.json), so the \
             footprint of one offsite-tuning client is `local_only`'s."
        );
        md
    }

    /// Writes `report.json`, `report.md`, `rounds.svg` and `arms.svg` into `dir`.
    pub(crate) fn write(&self, dir: &Path) -> Result<()> {
        let json = serde_json::to_string_pretty(&self.json())?;
        offsite_fed::write_atomic(&dir.join("report.json"), json.as_bytes())?;
        offsite_fed::write_atomic(&dir.join("report.md"), self.markdown().as_bytes())?;
        self.rounds_svg(&dir.join("rounds.svg"))?;
        self.arms_svg(&dir.join("arms.svg"))?;
        Ok(())
    }

    fn rounds_svg(&self, path: &Path) -> Result<()> {
        let series: Vec<(Arm, &Vec<(u64, f64)>)> = self
            .arms
            .iter()
            .filter(|(a, r)| a.federated() && !r.rounds.is_empty())
            .map(|(a, r)| (*a, &r.rounds))
            .collect();
        let refs: Vec<(Arm, f64)> = [Arm::ZeroShot, Arm::CentralAdapterCeiling, Arm::CentralFullFt]
            .into_iter()
            .filter_map(|a| Some((a, self.arms.get(&a)?.perplexity)))
            .collect();
        let values = series
            .iter()
            .flat_map(|(_, s)| s.iter().map(|p| p.1))
            .chain(refs.iter().map(|r| r.1));
        let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
        let (lo, hi) = if lo.is_finite() { (lo, hi) } else { (0.0, 1.0) };
        let pad = ((hi - lo) * 0.1).max(1e-3);
        let last = series
            .iter()
            .flat_map(|(_, s)| s.iter().map(|p| p.0))
            .max()
            .unwrap_or(1) as f64;
        let root = SVGBackend::new(path, (800, 420)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!("{}: perplexity after each round", self.task),
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(30)
            .y_label_area_size(60)
            .build_cartesian_2d(0.5..last + 0.5, (lo - pad)..(hi + pad))
            .map_err(|e| anyhow!("{e}"))?;
        chart
            .configure_mesh()
            .x_desc("round")
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
        for (i, (arm, s)) in series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(
                    s.iter().map(|p| (p.0 as f64, p.1)),
                    color.stroke_width(2),
                ))
                .map_err(|e| anyhow!("{e}"))?
                .label(arm.name())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2)));
        }
        for (i, (arm, v)) in refs.iter().enumerate() {
            let color = Palette99::pick(i + series.len()).to_rgba();
            chart
                .draw_series(DashedLineSeries::new(
                    [(0.5, *v), (last + 0.5, *v)],
                    6,
                    4,
                    color.stroke_width(1),
                ))
                .map_err(|e| anyhow!("{e}"))?
                .label(arm.name())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(1)));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
        root.present().map_err(|e| anyhow!("{e}"))?;
        Ok(())
    }

    fn arms_svg(&self, path: &Path) -> Result<()> {
        let arms: Vec<(Arm, f64)> = self.arms.iter().map(|(a, r)| (*a, r.metric)).collect();
        let hi = arms.iter().map(|a| a.1).filter(|v| v.is_finite()).fold(1e-3, f64::max);
        let root = SVGBackend::new(path, (800, 60 + 32 * arms.len().max(1) as u32)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
        let names: Vec<&str> = arms.iter().map(|a| a.0.name()).collect();
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!(
                    "{}: {} per arm ({} is better)",
                    self.task,
                    self.metric.name(),
                    if self.metric.higher_is_better() {
                        "higher"
                    } else {
                        "lower"
                    }
                ),
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(30)
            .y_label_area_size(170)
            .build_cartesian_2d(0.0..hi * 1.1, (0..arms.len()).into_segmented())
            .map_err(|e| anyhow!("{e}"))?;
        chart
            .configure_mesh()
            .disable_y_mesh()
            .y_labels(arms.len().max(1))
            .y_label_formatter(&|v| match v {
                SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => names.get(*i).copied().unwrap_or("").into(),
                SegmentValue::Last => String::new(),
            })
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
        chart
            .draw_series(arms.iter().enumerate().map(|(i, a)| {
                Rectangle::new(
                    [(0.0, SegmentValue::Exact(i)), (a.1, SegmentValue::Exact(i + 1))],
                    BLUE.mix(0.6).filled(),
                )
            }))
            .map_err(|e| anyhow!("{e}"))?;
        root.present().map_err(|e| anyhow!("{e}"))?;
        Ok(())
    }
}
