//! `offsite-server bench` end to end on the 6-layer tiny model: every arm runs on the same budget, the report holds
//! each arm's own evaluation (checked against `offsite-server eval` of the adapters the runs left behind), and a
//! bench killed after some runs resumes at the first unfinished one and gives the same report.

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
    let model = tiny_llama_6_layers(&dir.join("model"));
    word_tokenizer(&model);
    for (i, name) in ["a", "b", "c", "eval", "public"].iter().enumerate() {
        std::fs::write(dir.join(format!("{name}.txt")), word_text(i as u32 + 1, 400)).unwrap();
    }
    let d = dir.display();
    let config = format!(
        r#"
[bench]
task = "tiny"
metric = "perplexity"
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
format = "text"
max_len = 32
[eval]
data = ["{d}/eval.txt"]
max_examples = 4
[sim]
data = ["{d}/a.txt", "{d}/b.txt", "{d}/c.txt"]
split = {{ kind = "files" }}
"#
    );
    let path = dir.join("bench.toml");
    std::fs::write(&path, config).unwrap();
    std::fs::write(dir.join("job.toml"), "[data]\nformat = \"text\"\nmax_len = 32\n").unwrap();
    path
}

fn bench(dir: &Path, config: &Path) -> (serde_json::Value, String) {
    let (_, stderr) = run(server()
        .args(["bench", "--device", "cpu", "--config"])
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
    let (report, _) = bench(dir, &config);
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
    let (again, stderr) = bench(dir, &config);
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
