//! `offsite-edge train` end to end through the binary, on a two-layer emulator of the real SmolLM2 (its tokenizer
//! reads the data): training writes a resumable adapter, `--resume` continues the run, and bad input fails clearly.

use std::path::Path;
use std::process::Command;

use offsite::adapters::{read_manifest, Method};
use offsite::emulator::{self, Emulator, EmulatorConfig};
use offsite::load::Checkpoint;
use offsite::quant::{QuantFormat, ScaleDType};
use offsite_tests::smollm2_gguf;

fn edge() -> Command {
    Command::new(env!("CARGO_BIN_EXE_offsite-edge"))
}

fn run(cmd: &mut Command) -> std::process::Output {
    cmd.output().unwrap()
}

fn small_emulator(dir: &Path) -> std::path::PathBuf {
    let config = EmulatorConfig {
        bottom_layers: 1,
        top_layers: 1,
        drop_ratio: 1.0,
        quant: QuantFormat::Int8,
        scale_dtype: ScaleDType::F32,
        quantize_embeddings: false,
    };
    let out = dir.join("smol.emu");
    let checkpoint = Checkpoint::open(&smollm2_gguf()).unwrap();
    emulator::build(&checkpoint, "SmolLM2-135M", &config, &out, &mut |_, _| {}).unwrap();
    out
}

#[test]
fn train_then_resume_writes_a_plug_in_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let emu = small_emulator(dir.path());
    let data = dir.path().join("play.txt");
    let text = "Ber. Who's there?\nFran. Nay, answer me: stand, and unfold yourself.\n".repeat(12);
    std::fs::write(&data, text).unwrap();
    let config = dir.path().join("job.toml");
    std::fs::write(
        &config,
        "eval_fraction = 0.0\n[train]\nsteps = 3\nbatch_size = 2\nlr = 1e-3\n[data]\nmax_len = 24\n",
    )
    .unwrap();
    let out = dir.path().join("adapter");
    let train = |steps: &str, resume: bool| {
        let mut cmd = edge();
        cmd.args(["train", "--device", "cpu", "--steps", steps, "--emulator"])
            .arg(&emu)
            .arg("--data")
            .arg(&data)
            .arg("--config")
            .arg(&config)
            .arg("--out")
            .arg(&out);
        if resume {
            cmd.arg("--resume");
        }
        let o = run(&mut cmd);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    train("2", false);
    train("3", true);
    let log = std::fs::read_to_string(out.join("train_log.jsonl")).unwrap();
    let steps: Vec<u64> = log
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(steps, [1, 2, 3], "the resumed run appends step 3 only");
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("trainer_state.json")).unwrap()).unwrap();
    assert_eq!(state["step"], 3);
    let manifest = read_manifest(&out).unwrap().unwrap();
    let e = Emulator::open(&emu).unwrap();
    assert_eq!(manifest.method, Method::Layers);
    assert_eq!(manifest.layers, [0, 29]);
    assert_eq!(manifest.emulator_sha256.as_deref(), Some(e.sha256()));
    assert_eq!(manifest.base_model_sha256, e.manifest().base_model_sha256);

    // The adapter plugs into the full model by name.
    let full = Checkpoint::open(&smollm2_gguf()).unwrap();
    let model = full.load_model(&burn::tensor::Device::flex()).unwrap();
    offsite::adapters::apply(model, &out).unwrap();

    // An unknown key in the job is named; a corrupt emulator is refused.
    std::fs::write(&config, "[train]\nstepz = 3\n").unwrap();
    let o = run(edge()
        .args(["train", "--device", "cpu", "--emulator"])
        .arg(&emu)
        .arg("--data")
        .arg(&data)
        .arg("--config")
        .arg(&config)
        .arg("--out")
        .arg(dir.path().join("x")));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("stepz"), "{err}");
    let mut bytes = std::fs::read(&emu).unwrap();
    let n = bytes.len();
    bytes[n - 10] ^= 0xff;
    std::fs::write(&emu, bytes).unwrap();
    let o = run(edge()
        .args(["train", "--device", "cpu", "--emulator"])
        .arg(&emu)
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(dir.path().join("y")));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("smol.emu"), "{err}");
}

#[test]
fn prompt_tuning_through_the_binaries_exports_to_peft_and_refuses_merging() {
    let dir = tempfile::tempdir().unwrap();
    let emu = small_emulator(dir.path());
    let data = dir.path().join("play.txt");
    std::fs::write(
        &data,
        "Ber. Who's there?\nFran. Nay, answer me: stand, and unfold yourself.\n".repeat(12),
    )
    .unwrap();
    let config = dir.path().join("job.toml");
    std::fs::write(
        &config,
        "eval_fraction = 0.0\n[train]\nsteps = 2\nbatch_size = 2\nlr = 1e-2\n[data]\nmax_len = 24\n\
         [adapter]\nmethod = \"prompt_tuning\"\n[adapter.prompt]\nnum_virtual_tokens = 6\n\
         init_text = \"A scene from a play:\"\n",
    )
    .unwrap();
    let out = dir.path().join("adapter");
    let o = run(edge()
        .args(["train", "--device", "cpu", "--emulator"])
        .arg(&emu)
        .arg("--data")
        .arg(&data)
        .arg("--config")
        .arg(&config)
        .arg("--out")
        .arg(&out));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(read_manifest(&out).unwrap().unwrap().method, Method::PromptTuning);

    // `cargo test --workspace` builds the server binary beside this crate's.
    let server_bin = Path::new(env!("CARGO_BIN_EXE_offsite-edge")).with_file_name("offsite-server");
    assert!(
        server_bin.exists(),
        "{} is missing: run the tests with --workspace",
        server_bin.display()
    );
    let server = || Command::new(&server_bin);
    let peft = dir.path().join("peft");
    let o = run(server()
        .args(["export", "--format", "peft", "--model"])
        .arg(smollm2_gguf())
        .arg("--adapter")
        .arg(&out)
        .arg("--out")
        .arg(&peft));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(peft.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(
        (config["peft_type"].as_str(), config["num_virtual_tokens"].as_u64()),
        (Some("PROMPT_TUNING"), Some(6))
    );
    let o = run(server()
        .args(["export", "--format", "merged", "--model"])
        .arg(smollm2_gguf())
        .arg("--adapter")
        .arg(&out)
        .arg("--out")
        .arg(dir.path().join("merged")));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--format peft"), "{err}");
}
