//! `offsite-server bench` end to end on the 6-layer tiny model: every arm runs on the same budget, the report holds
//! each arm's own evaluation (checked against `offsite-server eval` of the adapters the runs left behind), and a
//! bench killed after some runs resumes at the first unfinished one and gives the same report; a task scored by
//! ROUGE-L of generations reports what generating one prompt at a time and scoring here gives.

use std::path::{Path, PathBuf};
use std::process::Command;

use offsite_tests::{tiny_llama_6_layers, word_text, word_tokenizer};

fn server() -> Command {
    Command::new(env!("CARGO_BIN_EXE_offsite-server"))
}

fn run(cmd: &mut Command) -> (String, String) {
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{cmd:?} failed: {stderr}");
    (String::from_utf8(out.stdout).unwrap(), stderr)
}

/// Three clients (one file each), two rounds of two local steps at batch 2: 24 examples for every arm.
fn tiny_bench(dir: &Path) -> PathBuf {
    tiny_bench_with(dir, "perplexity", "text")
}

/// [`tiny_bench`] scored by `metric` on data of `format` (`jsonl`: `<name>.jsonl` instruction files).
fn tiny_bench_with(dir: &Path, metric: &str, format: &str) -> PathBuf {
    let model = tiny_llama_6_layers(&dir.join("model"));
    word_tokenizer(&model);
    for (i, name) in ["a", "b", "c", "eval", "public"].iter().enumerate() {
        std::fs::write(dir.join(format!("{name}.txt")), word_text(i as u32 + 1, 400)).unwrap();
        // Instruction records: answer with the two words that follow the input's in the client's pattern.
        let words: Vec<String> = word_text(i as u32 + 1, 120).split(' ').map(String::from).collect();
        let records: String = words
            .chunks(6)
            .filter(|c| c.len() == 6)
            .map(|c| {
                let answer = c[4..].join(" ");
                // The last reference holds every word, so any generated word scores above zero.
                let every: Vec<String> = (0..256).map(|w| format!("w{w}")).collect();
                let refs = serde_json::json!([answer, c[4].clone(), every.join(" ")]);
                format!(
                    "{}\n",
                    serde_json::json!({"instruction": "w9 w8", "input": c[..4].join(" "), "output": answer,
                                       "references": refs})
                )
            })
            .collect();
        std::fs::write(dir.join(format!("{name}.jsonl")), records).unwrap();
    }
    // The instruction template alone is about 40 tiny-vocabulary tokens.
    let (ext, max_len) = if format == "jsonl" { ("jsonl", 64) } else { ("txt", 32) };
    let d = dir.display();
    let config = format!(
        r#"
[bench]
task = "tiny"
metric = "{metric}"
max_new_tokens = 3
lora_lr = 0.01
[bench.central]
batch_size = 4
lr = 0.002
min_lr = 0.0002
[bench.lora]
r = 4
lora_alpha = 8.0
target_modules = ["q_proj", "v_proj"]
[server]
listen = "127.0.0.1:0"
state_dir = "{d}/unused"
[model]
path = "{d}/model"
distill_data = ["{d}/public.txt"]
[emulator]
bottom_layers = 1
top_layers = 1
drop_ratio = 0.5
[distill]
steps = 2
batch_size = 2
max_len = 32
[adapter]
method = "layers"
[federation]
rounds = 2
min_clients = 3
deadline_s = 120
[local]
steps = 2
batch_size = 2
lr = 0.002
min_lr = 0.0002
[data]
format = "{format}"
max_len = {max_len}
[eval]
data = ["{d}/eval.{ext}"]
max_examples = 4
[sim]
data = ["{d}/a.{ext}", "{d}/b.{ext}", "{d}/c.{ext}"]
split = {{ kind = "files" }}
"#
    );
    let path = dir.join("bench.toml");
    std::fs::write(&path, config).unwrap();
    std::fs::write(dir.join("job.toml"), "[data]\nformat = \"text\"\nmax_len = 32\n").unwrap();
    path
}

fn bench(dir: &Path, config: &Path, extra: &[&str]) -> (serde_json::Value, String) {
    let (_, stderr) = run(server()
        .args(["bench", "--device", "cpu"])
        .args(extra)
        .arg("--config")
        .arg(config)
        .arg("--out")
        .arg(dir.join("out"))
        .arg("--cache")
        .arg(dir.join("cache")));
    let report = std::fs::read_to_string(dir.join("out/report.json")).unwrap();
    (serde_json::from_str(&report).unwrap(), stderr)
}

/// `offsite-server eval --json` of an adapter a run left: label → perplexity.
fn eval(dir: &Path, emulator: &str, adapter: &Path) -> serde_json::Value {
    let json = dir.join("eval.json");
    run(server()
        .args(["eval", "--device", "cpu", "--max-examples", "4", "--model"])
        .arg(dir.join("model"))
        .arg("--emulator")
        .arg(emulator)
        .arg("--adapter")
        .arg(adapter)
        .arg("--data")
        .arg(dir.join("eval.txt"))
        .arg("--config")
        .arg(dir.join("job.toml"))
        .arg("--json")
        .arg(&json));
    serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-4 * b.abs()
}

#[test]
fn every_arm_on_one_budget_with_its_own_evaluation_and_a_resumed_bench_gives_the_same_report() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let config = tiny_bench(dir);
    let (report, _) = bench(dir, &config, &[]);
    let arms = report["arms"].as_object().unwrap();
    let names = [
        "zero_shot",
        "emulator_zero_shot",
        "central_full_ft",
        "central_adapter_ceiling",
        "central_lora",
        "central_ot_plugin",
        "local_only",
        "fed_lora",
        "fed_ot_plugin",
        "fed_ot_emulator",
        "fed_ot_lora_plugin",
    ];
    assert_eq!(arms.len(), names.len(), "{arms:?}");
    for name in names {
        let arm = &arms[name];
        let metric = arm["metric"].as_f64().unwrap_or(f64::NAN);
        assert!(metric.is_finite() && metric > 1.0, "{name}: {arm}");
        // 2 rounds × 3 clients × 2 steps × batch 2, computed here, for every arm that trains.
        let expected = if name.contains("zero_shot") { 0 } else { 24 };
        assert_eq!(arm["train_examples"], expected, "{name}");
    }
    for name in ["fed_lora", "fed_ot_plugin", "fed_ot_lora_plugin"] {
        assert_eq!(
            arms[name]["rounds"].as_array().unwrap().len(),
            2,
            "{name}: one evaluation per round"
        );
        assert!(arms[name]["bytes_up_per_client_round"].as_f64().unwrap() > 0.0);
    }
    // Training on the clients' data lowers their held-out perplexity in every central arm (text of one pattern).
    let zero = arms["zero_shot"]["metric"].as_f64().unwrap();
    for name in ["central_full_ft", "central_adapter_ceiling", "central_ot_plugin"] {
        assert!(
            arms[name]["metric"].as_f64().unwrap() < zero,
            "{name} did not learn: {report}"
        );
    }

    // The report's numbers are the arms' own: `eval` of what the runs left gives them again.
    let emulator = report["emulator"].as_str().unwrap().to_string();
    let fed = eval(dir, &emulator, &dir.join("out/runs/fed_ot/adapter"));
    for (label, arm) in [
        ("zero-shot full model", "zero_shot"),
        ("emulator", "emulator_zero_shot"),
        ("emulator + adapter", "fed_ot_emulator"),
        ("plug-in (full model + adapter)", "fed_ot_plugin"),
    ] {
        let (ours, theirs) = (
            arms[arm]["metric"].as_f64().unwrap(),
            fed[label]["perplexity"].as_f64().unwrap(),
        );
        assert!(close(ours, theirs), "{arm}: report {ours}, eval {theirs}");
    }
    let central = eval(dir, &emulator, &dir.join("out/runs/central_ot_plugin/adapter"));
    let (ours, theirs) = (
        arms["central_ot_plugin"]["metric"].as_f64().unwrap(),
        central["plug-in (full model + adapter)"]["perplexity"]
            .as_f64()
            .unwrap(),
    );
    assert!(close(ours, theirs), "central_ot_plugin: report {ours}, eval {theirs}");
    let gap = report["gap_closed"]["vs_adapter_ceiling"].as_f64().unwrap();
    let by_hand = (arms["fed_ot_plugin"]["metric"].as_f64().unwrap() - zero)
        / (arms["central_adapter_ceiling"]["metric"].as_f64().unwrap() - zero);
    assert!((gap - by_hand).abs() < 1e-12, "{gap} vs {by_hand}");
    for file in ["report.md", "rounds.svg", "arms.svg"] {
        let text = std::fs::read_to_string(dir.join("out").join(file)).unwrap();
        assert!(text.contains("fed_ot_plugin"), "{file}");
    }

    // As if killed during the federated run: its result and the report are gone; the rerun redoes only that run.
    std::fs::remove_file(dir.join("out/runs/fed_ot.json")).unwrap();
    std::fs::remove_file(dir.join("out/report.json")).unwrap();
    let (again, stderr) = bench(dir, &config, &[]);
    assert_eq!(stderr.matches("already done").count(), 9, "{stderr}");
    assert!(
        !stderr.contains("distilling"),
        "the emulator comes from the cache: {stderr}"
    );
    for name in names {
        let (a, b) = (&report["arms"][name], &again["arms"][name]);
        assert_eq!(a["metric"], b["metric"], "{name}");
        assert_eq!(a["rounds"], b["rounds"], "{name}");
    }
    assert_eq!(report["gap_closed"], again["gap_closed"]);
}

/// ROUGE-L F1 of whitespace-separated words (the tiny vocabulary has no punctuation or case), best reference.
fn rouge_by_hand(candidate: &str, references: &[String]) -> f64 {
    let c: Vec<&str> = candidate.split_whitespace().collect();
    let mut best = 0.0f64;
    for r in references {
        let r: Vec<&str> = r.split_whitespace().collect();
        // lcs[i][j]: longest common subsequence of c[..i] and r[..j].
        let mut lcs = vec![vec![0usize; r.len() + 1]; c.len() + 1];
        for i in 1..=c.len() {
            for j in 1..=r.len() {
                lcs[i][j] = if c[i - 1] == r[j - 1] {
                    lcs[i - 1][j - 1] + 1
                } else {
                    lcs[i - 1][j].max(lcs[i][j - 1])
                };
            }
        }
        let l = lcs[c.len()][r.len()] as f64;
        if l > 0.0 {
            let (p, q) = (l / c.len() as f64, l / r.len() as f64);
            best = best.max(2.0 * p * q / (p + q));
        }
    }
    best
}

/// Mean ROUGE-L (%) of `model` over the eval records picked as the bench picks them (4 spread over the file),
/// each prompt rendered with the default template and generated alone.
fn rouge_one_by_one(dir: &Path, model: &offsite::model::LlamaForCausalLM) -> f64 {
    use offsite::generate::{generate, GenerationConfig};
    let checkpoint = offsite::load::Checkpoint::open(&dir.join("model")).unwrap();
    let tok = checkpoint.tokenizer().unwrap();
    let template = offsite::data::DataConfig::default().prompt_template;
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(dir.join("eval.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let picked: Vec<&serde_json::Value> = (0..4).map(|i| &lines[i * lines.len() / 4]).collect();
    let config = GenerationConfig {
        max_new_tokens: 3,
        ..Default::default()
    };
    let mut total = 0.0;
    for record in picked {
        let text = template
            .replace("{instruction}", record["instruction"].as_str().unwrap())
            .replace("{input}", record["input"].as_str().unwrap());
        let mut ids: Vec<u32> = tok.bos_id().into_iter().collect();
        ids.extend(tok.encode(&text).unwrap());
        let out: Vec<u32> = generate(model, &ids, tok.eos_ids(), &config)
            .unwrap()
            .into_iter()
            .filter(|t| !tok.eos_ids().contains(t))
            .collect();
        let refs: Vec<String> = record["references"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_str().unwrap().to_string())
            .collect();
        total += rouge_by_hand(&tok.decode(&out, true).unwrap(), &refs);
    }
    100.0 * total / 4.0
}

#[test]
fn a_task_scored_by_generation_reports_rouge_l_as_one_by_one_generation_gives() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let config = tiny_bench_with(dir, "rouge_l", "jsonl");
    let (report, _) = bench(dir, &config, &["--arms", "zero_shot,fed_ot_plugin,fed_ot_emulator"]);
    assert_eq!(report["metric"]["name"], "rouge_l");
    assert_eq!(report["metric"]["higher_is_better"], true);
    let arms = report["arms"].as_object().unwrap();
    assert_eq!(arms.len(), 3, "{arms:?}");
    for (name, arm) in arms {
        let (metric, perplexity) = (arm["metric"].as_f64().unwrap(), arm["perplexity"].as_f64().unwrap());
        assert!((0.0..=100.0).contains(&metric), "{name}: {arm}");
        assert!(perplexity.is_finite() && perplexity > 1.0, "{name}: {arm}");
        assert!(arm["generation_tokens_per_s"].as_f64().unwrap() > 0.0, "{name}");
    }
    let device = burn::tensor::Device::flex();
    let checkpoint = offsite::load::Checkpoint::open(&dir.join("model")).unwrap();
    let full = checkpoint.load_model(&device).unwrap();
    let plugged = offsite::adapters::apply(full.clone(), &dir.join("out/runs/fed_ot/adapter")).unwrap();
    for (arm, model) in [("zero_shot", &full), ("fed_ot_plugin", &plugged)] {
        let (ours, theirs) = (arms[arm]["metric"].as_f64().unwrap(), rouge_one_by_one(dir, model));
        assert!((ours - theirs).abs() < 1e-9, "{arm}: report {ours}, by hand {theirs}");
    }
    // The untrained model's words score (the trained one may well answer with EOS at once, scoring 0).
    assert!(arms["zero_shot"]["metric"].as_f64().unwrap() > 0.0);
    let md = std::fs::read_to_string(dir.join("out/report.md")).unwrap();
    assert!(md.contains("ROUGE-L") && md.contains("tokens/s"), "{md}");
}

/// The differential-privacy arms: the federation spends what the arm names (to the noise solver's 0.1%), every
/// round's metrics row says so, and the noise changes the adapter.
#[test]
fn the_privacy_arms_spend_the_epsilon_they_name() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let config = tiny_bench(dir);
    let (report, _) = bench(
        dir,
        &config,
        &["--arms", "fed_ot_plugin,fed_ot_plugin_dp8,fed_ot_plugin_dp1"],
    );
    let arms = report["arms"].as_object().unwrap();
    for (name, target) in [("fed_ot_plugin_dp8", 8.0), ("fed_ot_plugin_dp1", 1.0)] {
        let eps = arms[name]["epsilon"].as_f64().unwrap();
        assert!(eps <= target * (1.0 + 1e-9) && eps > 0.99 * target, "{name}: ε {eps}");
        let metrics = std::fs::read_to_string(dir.join(format!("out/runs/{name}/state/metrics.jsonl"))).unwrap();
        let rows: Vec<serde_json::Value> = metrics.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(rows.len(), 2);
        let (e1, e2) = (
            rows[0]["epsilon"].as_f64().unwrap(),
            rows[1]["epsilon"].as_f64().unwrap(),
        );
        assert!(
            e1 < e2 && (e2 - eps).abs() < 1e-9,
            "ε grows round by round to the arm's: {e1}, {e2}, {eps}"
        );
        assert_eq!(rows[1]["delta"], 1e-5);
        assert_ne!(
            arms[name]["metric"], arms["fed_ot_plugin"]["metric"],
            "{name}: the noise changes the adapter"
        );
    }
    assert!(arms["fed_ot_plugin"].get("epsilon").is_none_or(|e| e.is_null()));
}
