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
    let diff = max_abs_diff(&Tensors::read(&out).f32("logits"), &exp.f32("logits")[9 * 256..]);
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
        .args(["model", "tokenize", "--text", "Hello, world!<|im_end|>", "--model"])
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

    // The prompt from stdin; a stop string ends the (same greedy) text before itself.
    let mut child = server()
        .args([
            "model",
            "generate",
            "--chat",
            "--device",
            "cpu",
            "--max-new-tokens",
            "24",
            "--stop",
            " Paris",
        ])
        .arg("--model")
        .arg(&model)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"What is the capital of France?")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "The capital of France is\n");

    let info: serde_json::Value =
        serde_json::from_str(&run(server().args(["model", "info", "--json", "--model"]).arg(&model))).unwrap();
    assert_eq!(info["num_hidden_layers"], 30);
    assert_eq!(info["hidden_size"], 576);
    assert!(info["tensor_types"]["Q4_1"]["tensors"].as_u64().unwrap() > 0, "{info}");
    assert_eq!(info["tokenizer"]["chat_template"], true);
}

#[test]
fn exit_statuses_tell_bad_input_from_an_unreachable_server() {
    let dir = tempfile::tempdir().unwrap();
    let missing = server()
        .args(["serve", "--config"])
        .arg(dir.path().join("none.toml"))
        .output()
        .unwrap();
    assert_eq!(
        missing.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&missing.stderr)
    );
    let help = run(server().arg("--help"));
    assert!(help.contains("3 refused by the server"), "{help}");
    // Nothing listens on this port: the client gives up with the status that says retrying may help.
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let edge = std::path::Path::new(env!("CARGO_BIN_EXE_offsite-server")).with_file_name("offsite-edge");
    let text = dir.path().join("a.txt");
    std::fs::write(&text, "some words").unwrap();
    let out = Command::new(edge)
        .args([
            "join",
            "--device",
            "cpu",
            "--server",
            &format!("127.0.0.1:{port}"),
            "--max-reconnects",
            "0",
        ])
        .args(["--fingerprint", &"ab".repeat(32), "--data"])
        .arg(&text)
        .arg("--cache")
        .arg(dir.path().join("cache"))
        .env("OFFSITE_TOKEN", "ofs_x")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4), "{}", String::from_utf8_lossy(&out.stderr));
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

#[test]
fn emulator_build_info_and_eval_on_smollm2() {
    let dir = tempfile::tempdir().unwrap();
    let model = smollm2_gguf();
    // Every layer kept, f32: the emulator is the full model, so its perplexity must equal the zero-shot one.
    let config = dir.path().join("emu.toml");
    std::fs::write(
        &config,
        "[emulator]\nbottom_layers = 1\ntop_layers = 1\ndrop_ratio = 0.0\nquant = \"f32\"\n",
    )
    .unwrap();
    let emu = dir.path().join("smol.emu");
    run(server()
        .args(["emulator", "build", "--model"])
        .arg(&model)
        .arg("--config")
        .arg(&config)
        .arg("--out")
        .arg(&emu));
    let info: serde_json::Value = serde_json::from_str(&run(server()
        .args(["emulator", "info", "--json", "--emulator"])
        .arg(&emu)))
    .unwrap();
    assert_eq!(info["adapter_layers"], serde_json::json!([0, 29]));
    assert_eq!(info["layers"].as_array().unwrap().len(), 30);
    let summary = run(server().args(["emulator", "info", "--emulator"]).arg(&emu));
    assert!(
        summary.contains("layers kept:     30 of 30") && summary.contains("[0, 29]"),
        "{summary}"
    );

    let data = dir.path().join("text.txt");
    std::fs::write(
        &data,
        "Friends, Romans, countrymen, lend me your ears; I come to bury Caesar.\n".repeat(6),
    )
    .unwrap();
    let job = dir.path().join("job.toml");
    std::fs::write(&job, "[data]\nmax_len = 16\n").unwrap();
    let json = dir.path().join("eval.json");
    let table = run(server()
        .args(["eval", "--device", "cpu", "--max-examples", "3", "--model"])
        .arg(&model)
        .arg("--emulator")
        .arg(&emu)
        .arg("--data")
        .arg(&data)
        .arg("--config")
        .arg(&job)
        .arg("--json")
        .arg(&json));
    assert!(table.contains("perplexity"), "{table}");
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let on_stdout = run(server()
        .args([
            "eval",
            "--device",
            "cpu",
            "--max-examples",
            "3",
            "--json",
            "-",
            "--model",
        ])
        .arg(&model)
        .arg("--emulator")
        .arg(&emu)
        .arg("--data")
        .arg(&data)
        .arg("--config")
        .arg(&job));
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&on_stdout).unwrap(),
        r,
        "--json - prints the same JSON"
    );
    let (full, emu_ppl) = (
        r["zero-shot full model"]["perplexity"].as_f64().unwrap(),
        r["emulator"]["perplexity"].as_f64().unwrap(),
    );
    assert_eq!(r["emulator"]["tokens"], 45);
    assert!(full > 1.0 && full.is_finite());
    assert!(
        ((full - emu_ppl) / full).abs() < 1e-5,
        "full {full} vs emulator {emu_ppl}"
    );

    // An unknown key in the emulator table is named.
    std::fs::write(&config, "[emulator]\nbottom_layers = 1\ntop_layers = 1\ndrop = 0.5\n").unwrap();
    let out = server()
        .args(["emulator", "build", "--model"])
        .arg(&model)
        .arg("--config")
        .arg(&config)
        .arg("--out")
        .arg(dir.path().join("x.emu"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("drop"), "{err}");
}

/// A federation config for the 6-layer tiny model (with a word tokenizer) and three text files.
#[test]
fn sim_runs_a_federation_and_reports_perplexities() {
    let dir = tempfile::tempdir().unwrap();
    let config = offsite_tests::tiny_federation(dir.path(), 2, 3);
    let out = run(server().args(["sim", "--device", "cpu", "--config"]).arg(&config));
    let state = dir.path().join("state");
    let metrics = std::fs::read_to_string(state.join("metrics.jsonl")).unwrap();
    let rows: Vec<serde_json::Value> = metrics.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 2, "{out}");
    for r in &rows {
        assert_eq!(r["participants"], 3);
        assert!(r["eval_perplexity"].as_f64().unwrap().is_finite());
    }
    for label in [
        "zero-shot full model",
        "emulator before federation",
        "emulator + global adapter",
        "plug-in",
    ] {
        let line = out
            .lines()
            .find(|l| l.starts_with(label))
            .unwrap_or_else(|| panic!("{label} missing:\n{out}"));
        let ppl: f64 = line.split_whitespace().last().unwrap().parse().unwrap();
        assert!(ppl.is_finite() && ppl > 1.0, "{line}");
    }
    // The final plug-in perplexity is the one the server measured after the last round.
    let plug = out.lines().find(|l| l.starts_with("plug-in")).unwrap();
    let last: f64 = plug.split_whitespace().last().unwrap().parse().unwrap();
    assert!((last - rows[1]["eval_perplexity"].as_f64().unwrap()).abs() < 1e-3 * last);
    assert!(std::fs::read_to_string(state.join("metrics.svg"))
        .unwrap()
        .contains("<svg"));
    assert!(state.join("global-adapter/adapter_config.json").exists());
    // The global adapter exports as a PEFT directory like any other adapter.
    run(server()
        .args(["export", "--format", "peft", "--model"])
        .arg(dir.path().join("model"))
        .arg("--adapter")
        .arg(state.join("global-adapter"))
        .arg("--out")
        .arg(dir.path().join("peft")));
    assert!(dir.path().join("peft/adapter_model.safetensors").exists());
    // As peft requires: explicit module names beside layers_to_transform; the model's name, not a local path.
    let peft: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("peft/adapter_config.json")).unwrap()).unwrap();
    if peft["layers_to_transform"].is_array() {
        assert!(peft["target_modules"].is_array(), "{peft}");
    }
    assert_eq!(peft["base_model_name_or_path"], "model", "{peft}");
    // A second simulation into the same state directory is refused unless asked to start over, and then runs from
    // round 1 (older state generations deleted too, so nothing resumes from the first run).
    let again = server()
        .args(["sim", "--device", "cpu", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(
        !again.status.success() && err.contains("--fresh") && err.contains("metrics.jsonl"),
        "{err}"
    );
    run(server()
        .args(["sim", "--device", "cpu", "--fresh", "--config"])
        .arg(&config));
    let metrics = std::fs::read_to_string(state.join("metrics.jsonl")).unwrap();
    let rounds: Vec<u64> = metrics
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["round"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(rounds, [1, 2]);
}

#[test]
fn sim_distils_the_emulator_once_and_rebuilds_it_when_its_data_changes() {
    let dir = tempfile::tempdir().unwrap();
    let config = offsite_tests::tiny_federation(dir.path(), 1, 3);
    let d = dir.path().display();
    std::fs::write(dir.path().join("public.txt"), offsite_tests::word_text(9, 300)).unwrap();
    let text = std::fs::read_to_string(&config).unwrap().replace(
        &format!("[model]\npath = \"{d}/model\"\n"),
        &format!("[model]\npath = \"{d}/model\"\ndistill_data = [\"{d}/public.txt\"]\n[distill]\nsteps = 2\nbatch_size = 2\nmax_len = 16\n"),
    );
    assert!(text.contains("[distill]"));
    std::fs::write(&config, text).unwrap();
    let sim = |fresh: bool| {
        let mut c = server();
        c.args(["sim", "--device", "cpu", "--config"]).arg(&config);
        if fresh {
            c.arg("--fresh");
        }
        let out = c.output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let first = sim(false);
    assert!(first.contains("distilling the middle layers"), "{first}");
    let emu = offsite::emulator::Emulator::open(&dir.path().join("state/emulator.emu")).unwrap();
    assert!(emu.manifest().distilled);
    let second = sim(true);
    assert!(
        second.contains("reusing the emulator built earlier") && !second.contains("distilling"),
        "{second}"
    );
    // Other public data: another emulator.
    std::fs::write(dir.path().join("public.txt"), offsite_tests::word_text(10, 300)).unwrap();
    assert!(sim(true).contains("distilling the middle layers"));
}

#[test]
fn serve_and_join_through_the_binaries_with_issued_and_revoked_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let config = offsite_tests::tiny_federation(dir.path(), 1, 2);
    let state = dir.path().join("state");
    let issue = |client: &str| {
        run(server()
            .args(["token", "issue", "--client", client, "--state-dir"])
            .arg(&state))
        .trim()
        .to_string()
    };
    let (t1, t3) = (issue("one"), issue("three"));
    // A token written to a file for the client; stdout is then the client's join command.
    let token_file = dir.path().join("two.token");
    let command = run(server()
        .args([
            "token",
            "issue",
            "--client",
            "two",
            "--server",
            "10.0.0.1:4433",
            "--out",
        ])
        .arg(&token_file)
        .arg("--state-dir")
        .arg(&state));
    assert!(
        command.starts_with("offsite-edge join --server 10.0.0.1:4433 --fingerprint ")
            && command
                .trim_end()
                .ends_with(&format!("--token-file {}", token_file.display())),
        "{command}"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&token_file).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "the token file is the owner's only: {mode:o}");
    }
    run(server()
        .args(["token", "revoke", "--client", "three", "--state-dir"])
        .arg(&state));
    let list = run(server().args(["token", "list", "--state-dir"]).arg(&state));
    assert!(
        list.contains("three\trevoked") && list.contains("one\tactive"),
        "{list}"
    );
    assert!(!std::fs::read_to_string(state.join("tokens.json"))
        .unwrap()
        .contains(&t1));
    let listed: serde_json::Value = serde_json::from_str(&run(server()
        .args(["token", "list", "--json", "--state-dir"])
        .arg(&state)))
    .unwrap();
    assert_eq!(
        listed,
        serde_json::json!([
            {"client": "one", "revoked": false},
            {"client": "three", "revoked": true},
            {"client": "two", "revoked": false},
        ])
    );

    let (mut srv, addr, fp) =
        offsite_tests::spawn_serve(server().args(["serve", "--device", "cpu", "--config"]).arg(&config));
    // Once the server has its certificate, `token issue` also prints the whole join command, fingerprint included.
    let out = server()
        .args(["token", "issue", "--client", "four", "--state-dir"])
        .arg(&state)
        .output()
        .unwrap();
    let hint = String::from_utf8_lossy(&out.stderr);
    assert!(hint.contains(&fp) && hint.contains("OFFSITE_TOKEN=ofs_"), "{hint}");
    let edge_bin = std::path::Path::new(env!("CARGO_BIN_EXE_offsite-server")).with_file_name("offsite-edge");
    assert!(
        edge_bin.exists(),
        "build the workspace first: {} is missing",
        edge_bin.display()
    );
    let join =
        |token: &str, name: &str| offsite_tests::edge_join(&edge_bin, dir.path(), &config, (&addr, &fp), token, name);
    // The revoked token is refused with the reason, and the client gives up (no retry on a refusal).
    let refused = join(&t3, "c").output().unwrap();
    assert_eq!(refused.status.code(), Some(3), "a refusal has its own exit status");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("unknown or revoked token"));
    assert!(
        !dir.path().join("cache-c").exists(),
        "a refused client received no emulator"
    );
    let mut a = join(&t1, "a").spawn().unwrap();
    let mut b = join("", "b").arg("--token-file").arg(&token_file).spawn().unwrap();
    assert!(a.wait().unwrap().success() && b.wait().unwrap().success());
    assert!(srv.wait().unwrap().success());
    let metrics = std::fs::read_to_string(state.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 1);
    assert!(metrics.contains("\"participants\":2"));
}

#[test]
fn sim_federates_a_prefix_tuning_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let config = offsite_tests::tiny_federation(dir.path(), 1, 3);
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "method = \"lora\"\n[adapter.lora]\nr = 4\nlora_alpha = 8.0\ntarget_modules = [\"q_proj\", \"v_proj\"]\n",
        "method = \"prefix_tuning\"\n[adapter.prompt]\nnum_virtual_tokens = 4\n",
    );
    assert!(text.contains("prefix_tuning"));
    std::fs::write(&config, text).unwrap();
    let out = run(server().args(["sim", "--device", "cpu", "--config"]).arg(&config));
    let state = dir.path().join("state");
    let metrics = std::fs::read_to_string(state.join("metrics.jsonl")).unwrap();
    let row: serde_json::Value = serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
    assert_eq!(row["participants"], 3, "{out}");
    let manifest = offsite::adapters::read_manifest(&state.join("global-adapter"))
        .unwrap()
        .unwrap();
    assert_eq!(
        (manifest.method, manifest.layers),
        (offsite::adapters::Method::PrefixTuning, vec![0, 5])
    );
    let ppl = |label: &str| -> f64 {
        let line = out
            .lines()
            .find(|l| l.starts_with(label))
            .unwrap_or_else(|| panic!("{label} missing:\n{out}"));
        line.split_whitespace().last().unwrap().parse().unwrap()
    };
    // The prefixes change what the plugged-in full model predicts.
    assert!((ppl("plug-in") - ppl("zero-shot full model")).abs() > 1e-3, "{out}");
}
