//! The `offsite-server model ...` command forms, end to end through the binary.

use std::process::Command;

use offsite_tests::{fixture, max_abs_diff, smollm2_gguf, Tensors};

fn server() -> Command {
    Command::new(env!("CARGO_BIN_EXE_offsite-server"))
}

/// Token ids as `--ids` takes them: `1,2,3`.
fn ids_arg(ids: &[i64]) -> String {
    ids.iter().map(i64::to_string).collect::<Vec<_>>().join(",")
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{:?} failed: {}",
        cmd,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn logits_command_writes_reference_logits() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("logits.safetensors");
    let exp = Tensors::read(&fixture("tiny-llama/expected.safetensors"));
    let ids = ids_arg(&exp.i64("input_ids.1"));
    run(server()
        .args(["model", "logits", "--device", "cpu", "--model"])
        .arg(fixture("tiny-llama"))
        .args(["--ids", &ids, "--out"])
        .arg(&out));
    let got = Tensors::read(&out);
    assert_eq!(got.shape("logits"), vec![5, 256]);
    assert!(max_abs_diff(&got.f32("logits"), &exp.f32("logits.1")) < 1e-4);
}

#[test]
fn logits_with_a_peft_adapter_match_peft() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("logits.safetensors");
    let exp = Tensors::read(&fixture("tiny-llama-lora/expected.safetensors"));
    let ids = ids_arg(&exp.i64("input_ids")[..9]);
    run(server()
        .args(["model", "logits", "--device", "cpu", "--model"])
        .arg(fixture("tiny-llama"))
        .arg("--adapter")
        .arg(fixture("tiny-llama-lora"))
        .args(["--ids", &ids, "--out"])
        .arg(&out));
    let got = Tensors::read(&out).f32("logits");
    assert!(max_abs_diff(&got, &exp.f32("logits")[..9 * 256]) < 1e-4);
}

/// `export --format merged` writes a Hugging Face checkpoint whose plain logits are peft's adapted logits;
/// `--format peft` writes peft's tensors back.
#[test]
fn export_merged_and_peft() {
    let dir = tempfile::tempdir().unwrap();
    let exp = Tensors::read(&fixture("tiny-llama-lora/expected.safetensors"));
    for format in ["merged", "peft"] {
        run(server()
            .args(["export", "--format", format, "--model"])
            .arg(fixture("tiny-llama"))
            .arg("--adapter")
            .arg(fixture("tiny-llama-lora"))
            .arg("--out")
            .arg(dir.path().join(format)));
    }
    let merged = dir.path().join("merged");
    // The tiny fixture ships no tokenizer, so none is written.
    assert!(merged.join("config.json").exists() && merged.join("model.safetensors").exists());
    assert!(!merged.join("tokenizer.json").exists());
    let out = dir.path().join("logits.safetensors");
    let ids = ids_arg(&exp.i64("input_ids")[9..]);
    run(server()
        .args(["model", "logits", "--device", "cpu", "--model"])
        .arg(&merged)
        .args(["--ids", &ids, "--out"])
        .arg(&out));
    let diff = max_abs_diff(
        &Tensors::read(&out).f32("logits"),
        &exp.f32("logits")[9 * 256..],
    );
    assert!(diff < 1e-4, "merged logits differ by {diff}");
    let theirs = Tensors::read(&fixture("tiny-llama-lora/adapter_model.safetensors"));
    let ours = Tensors::read(&dir.path().join("peft/adapter_model.safetensors"));
    for name in theirs.names() {
        assert_eq!(ours.f32(&name), theirs.f32(&name), "{name}");
    }
}

#[test]
fn info_tokenize_and_generate_on_smollm2() {
    let model = smollm2_gguf();
    let info = run(server().args(["model", "info", "--model"]).arg(&model));
    assert!(info.contains("layers:              30"), "{info}");
    assert!(info.contains("Q4_1"), "{info}");
    let ids = run(server()
        .args([
            "model",
            "tokenize",
            "--text",
            "Hello, world!<|im_end|>",
            "--model",
        ])
        .arg(&model));
    assert_eq!(ids.trim(), "[19556,28,905,17,2]");
    let text = run(server()
        .args([
            "model",
            "generate",
            "--chat",
            "--device",
            "cpu",
            "--max-new-tokens",
            "24",
        ])
        .args(["--prompt", "What is the capital of France?", "--model"])
        .arg(&model));
    assert_eq!(text.trim_end(), "The capital of France is Paris.<|im_end|>");
}

#[test]
fn bad_inputs_fail_with_a_clear_message() {
    let out = server()
        .args(["model", "info", "--model", "/nonexistent/model.gguf"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/model.gguf"));
    let out = server()
        .args([
            "model",
            "logits",
            "--device",
            "cpu",
            "--ids",
            "1,999",
            "--out",
            "/tmp/x.safetensors",
            "--model",
        ])
        .arg(fixture("tiny-llama"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("999"));
}
