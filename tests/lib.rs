//! Helpers shared by the end-to-end tests: fixture paths, safetensors reading, a GGUF writer and comparisons.

use std::path::{Path, PathBuf};

use burn::tensor::{Int, Tensor, TensorData};
use offsite::model::LlamaForCausalLM;

/// `$OFFSITE_FIXTURES/<name>`, by default `../shared/fixtures/<name>` beside the project root.
pub fn fixture(name: &str) -> PathBuf {
    let root = std::env::var_os("OFFSITE_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures"));
    root.join(name)
}

/// The SmolLM2-135M-Instruct GGUF: `$OFFSITE_SMOLLM2`, else where `fetch-smollm2` puts it. Panics with the command
/// to run when it is absent (CI fetches it first; a test that silently skipped would assert nothing).
pub fn smollm2_gguf() -> PathBuf {
    if let Ok(p) = std::env::var("OFFSITE_SMOLLM2") {
        return PathBuf::from(p);
    }
    let cache = std::env::var("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache"));
    let path = cache.join("offsite-models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.exists(),
        "{} is missing: run scripts/fetch-smollm2 (or set OFFSITE_SMOLLM2)",
        path.display()
    );
    path
}

/// A safetensors file read whole.
pub struct Tensors(Vec<u8>);

impl Tensors {
    pub fn read(path: &Path) -> Self {
        Self(std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
    }

    fn view(&self, name: &str) -> safetensors::tensor::TensorView<'_> {
        let st = safetensors::SafeTensors::deserialize(&self.0).unwrap();
        let view = st.tensor(name).unwrap_or_else(|_| panic!("no tensor {name}"));
        safetensors::tensor::TensorView::new(view.dtype(), view.shape().to_vec(), view.data()).unwrap()
    }

    pub fn shape(&self, name: &str) -> Vec<usize> {
        self.view(name).shape().to_vec()
    }

    pub fn f32(&self, name: &str) -> Vec<f32> {
        let v = self.view(name);
        assert_eq!(v.dtype(), safetensors::Dtype::F32, "{name}");
        v.data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    pub fn i64(&self, name: &str) -> Vec<i64> {
        let v = self.view(name);
        assert_eq!(v.dtype(), safetensors::Dtype::I64, "{name}");
        v.data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    pub fn names(&self) -> Vec<String> {
        let st = safetensors::SafeTensors::deserialize(&self.0).unwrap();
        st.names().into_iter().map(String::from).collect()
    }
}

/// Logits of one unpadded sequence, flattened `[len · vocab]`.
pub fn logits(model: &LlamaForCausalLM, ids: &[i64]) -> Vec<f32> {
    let input = Tensor::<2, Int>::from_data(TensorData::new(ids.to_vec(), [1, ids.len()]), &model.device());
    model
        .forward(input, None, None)
        .unwrap()
        .into_data()
        .try_into_vec()
        .unwrap()
}

/// Every case of a fixture's `expected.safetensors` (`input_ids.N` → `logits.N`, N = 0, 1, 2) within 1e-4 of
/// transformers' logits.
pub fn assert_fixture_logits(model: &LlamaForCausalLM, exp: &Tensors) {
    for i in 0..3 {
        let ids = exp.i64(&format!("input_ids.{i}"));
        let want = exp.f32(&format!("logits.{i}"));
        let got = logits(model, &ids);
        let diff = max_abs_diff(&got, &want);
        assert!(diff < 1e-4, "case {i} (len {}): max |diff| {diff}", ids.len());
    }
}

/// Case 2 of a fixture decoded with the KV cache (its first `prefix` ids at once, then one at a time) within 1e-4
/// of transformers' logits for the whole sequence.
pub fn assert_cached_decoding(model: &LlamaForCausalLM, exp: &Tensors, prefix: usize) {
    let ids = exp.i64("input_ids.2");
    let want = exp.f32("logits.2");
    let mut cache = offsite::model::KvCache::new(model.config().num_hidden_layers, 1);
    let mut got = Vec::new();
    let mut step = |chunk: &[i64]| {
        let input = Tensor::<2, Int>::from_data(TensorData::new(chunk.to_vec(), [1, chunk.len()]), &model.device());
        let out: Vec<f32> = model
            .forward(input, None, Some(&mut cache))
            .unwrap()
            .into_data()
            .try_into_vec()
            .unwrap();
        got.extend(out);
    };
    step(&ids[..prefix]);
    for id in &ids[prefix..] {
        step(std::slice::from_ref(id));
    }
    assert_eq!(cache.len(), ids.len());
    let diff = max_abs_diff(&got, &want);
    assert!(diff < 1e-4, "max |diff| {diff}");
}

/// Largest absolute difference; panics on length mismatch.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// A metadata value for [`write_gguf`].
pub enum Meta {
    U32(u32),
    F32(f32),
    Str(String),
    Strs(Vec<String>),
    I32s(Vec<i32>),
}

/// Writes a GGUF v3 file with F32 tensors; `shape` is slowest-first (Hugging Face order) and stored reversed, as
/// llama.cpp does.
pub fn write_gguf(meta: &[(&str, Meta)], tensors: &[(String, Vec<usize>, Vec<f32>)]) -> Vec<u8> {
    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((meta.len() as u64).to_le_bytes());
    for (k, v) in meta {
        string(&mut out, k);
        match v {
            Meta::U32(x) => {
                out.extend(4u32.to_le_bytes());
                out.extend(x.to_le_bytes());
            }
            Meta::F32(x) => {
                out.extend(6u32.to_le_bytes());
                out.extend(x.to_le_bytes());
            }
            Meta::Str(s) => {
                out.extend(8u32.to_le_bytes());
                string(&mut out, s);
            }
            Meta::Strs(items) => {
                out.extend(9u32.to_le_bytes());
                out.extend(8u32.to_le_bytes());
                out.extend((items.len() as u64).to_le_bytes());
                items.iter().for_each(|s| string(&mut out, s));
            }
            Meta::I32s(items) => {
                out.extend(9u32.to_le_bytes());
                out.extend(5u32.to_le_bytes());
                out.extend((items.len() as u64).to_le_bytes());
                items.iter().for_each(|x| out.extend(x.to_le_bytes()));
            }
        }
    }
    let padded = |n: usize| (n * 4).div_ceil(32) * 32;
    let mut offset = 0u64;
    for (name, shape, data) in tensors {
        string(&mut out, name);
        out.extend((shape.len() as u32).to_le_bytes());
        shape.iter().rev().for_each(|d| out.extend((*d as u64).to_le_bytes()));
        out.extend(0u32.to_le_bytes());
        out.extend(offset.to_le_bytes());
        offset += padded(data.len()) as u64;
    }
    out.resize(out.len().div_ceil(32) * 32, 0);
    for (_, _, data) in tensors {
        let start = out.len();
        data.iter().for_each(|v| out.extend(v.to_le_bytes()));
        out.resize(start + padded(data.len()), 0);
    }
    out
}

/// llama.cpp's converter permutation of attn_q / attn_k rows for `heads` heads.
pub fn llama_cpp_permute(data: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
    let d = rows / heads;
    let mut out = vec![0.0; data.len()];
    for h in 0..heads {
        for j in 0..2 {
            for i in 0..d / 2 {
                let src = h * d + j * (d / 2) + i;
                let dst = h * d + i * 2 + j;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&data[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// A 6-layer variant of the tiny fixture model written to `dir` as a Hugging Face checkpoint: layers 0 and 1 are the
/// fixture's, layers 2–5 copy them with their weights scaled by 0.9, 1.1, 0.8 and 1.2, so every layer differs.
/// Deep enough to drop middle layers from.
pub fn tiny_llama_6_layers(dir: &Path) -> PathBuf {
    let src = fixture("tiny-llama");
    let t = Tensors::read(&src.join("model.safetensors"));
    let mut out: Vec<(String, Vec<f32>, Vec<usize>)> = Vec::new();
    for name in t.names() {
        let (data, shape) = (t.f32(&name), t.shape(&name));
        if let Some((i, part)) = offsite::model::split_layer_name(&name) {
            for (copy, factor) in [(0, 1.0f32), (2, 0.9), (4, 0.8)] {
                let f = if i == 1 && copy > 0 {
                    factor + 0.2 + 0.1 * (copy as f32 - 2.0)
                } else {
                    factor
                };
                let scaled: Vec<f32> = data.iter().map(|v| v * f).collect();
                out.push((format!("model.layers.{}.{part}", copy + i), scaled, shape.clone()));
            }
        } else {
            out.push((name, data, shape));
        }
    }
    let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = out
        .into_iter()
        .map(|(n, d, s)| (n, d.iter().flat_map(|x| x.to_le_bytes()).collect(), s))
        .collect();
    let views: Vec<_> = bytes
        .iter()
        .map(|(n, b, s)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b).unwrap(),
            )
        })
        .collect();
    std::fs::create_dir_all(dir).unwrap();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    config["num_hidden_layers"] = 6.into();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    dir.to_path_buf()
}

/// Writes a word-level `tokenizer.json` into a tiny-model directory: words `w0` … `w255` are ids 0–255, split on
/// whitespace, so text files of such words can train and evaluate the tiny model end to end.
pub fn word_tokenizer(dir: &Path) {
    let vocab: serde_json::Map<String, serde_json::Value> = (0..256)
        .map(|i| (format!("w{i}"), serde_json::Value::from(i)))
        .collect();
    let json = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "w0"}
    });
    std::fs::write(dir.join("tokenizer.json"), json.to_string()).unwrap();
}

/// A language-modelling example: the loss on every token of `ids`.
pub fn lm_example(ids: Vec<u32>) -> offsite::data::Example {
    offsite::data::Example {
        labels: ids.iter().map(|&x| x as i64).collect(),
        ids,
        category: None,
    }
}

/// A text of `words` tiny-tokenizer words following a pattern of its own (`seed`).
pub fn word_text(seed: u32, words: u32) -> String {
    (0..words)
        .map(|t| format!("w{}", (seed * 31 + t * 13 + (t / 7) * seed) % 250 + 3))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The 6-layer tiny model written to `dir/model` and its int8 emulator (1 + 1 adapter layers, half the middle
/// dropped) to `dir/tiny.emu`. Returns both paths.
pub fn tiny_emulator(dir: &Path) -> (PathBuf, PathBuf) {
    use offsite::emulator::{self, EmulatorConfig};
    use offsite::quant::{QuantFormat, ScaleDType};
    let model = tiny_llama_6_layers(&dir.join("model"));
    let config = EmulatorConfig {
        bottom_layers: 1,
        top_layers: 1,
        drop_ratio: 0.5,
        quant: QuantFormat::Int8,
        scale_dtype: ScaleDType::F32,
        quantize_embeddings: false,
    };
    let out = dir.join("tiny.emu");
    let checkpoint = offsite::load::Checkpoint::open(&model).unwrap();
    emulator::build(&checkpoint, "tiny-6", &config, &out, &mut |_, _| {}).unwrap();
    (model, out)
}

/// A federation config over the 6-layer tiny model in `dir` (model, client texts a/b/c, eval text): LoRA on q/v,
/// FedAdam, int8 updates, `[sim]` with one client per file.
pub fn tiny_federation(dir: &std::path::Path, rounds: u64, min_clients: usize) -> std::path::PathBuf {
    let model = tiny_llama_6_layers(&dir.join("model"));
    word_tokenizer(&model);
    for (i, name) in ["a", "b", "c", "eval"].iter().enumerate() {
        std::fs::write(dir.join(format!("{name}.txt")), word_text(i as u32 + 1, 400)).unwrap();
    }
    let d = dir.display();
    let config = format!(
        r#"
[server]
listen = "127.0.0.1:0"
state_dir = "{d}/state"
[model]
path = "{d}/model"
[emulator]
bottom_layers = 1
top_layers = 1
drop_ratio = 0.5
[adapter]
method = "lora"
[adapter.lora]
r = 4
lora_alpha = 8.0
target_modules = ["q_proj", "v_proj"]
[strategy]
kind = "fedadam"
server_lr = 0.01
[federation]
rounds = {rounds}
min_clients = {min_clients}
deadline_s = 120
update_encoding = "int8"
[local]
steps = 2
batch_size = 2
lr = 0.01
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
    let path = dir.join("fed.toml");
    std::fs::write(&path, config).unwrap();
    path
}

/// Starts `serve` (an `offsite-server serve …` command) with its stdout piped; returns the process, the address and
/// the certificate fingerprint from the two lines it prints first.
pub fn spawn_serve(serve: &mut std::process::Command) -> (std::process::Child, String, String) {
    use std::io::{BufRead, BufReader};
    let mut srv = serve
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(srv.stdout.take().unwrap()).lines();
    let addr = lines
        .next()
        .unwrap()
        .unwrap()
        .trim_start_matches("listening on ")
        .to_string();
    let fp = lines
        .next()
        .unwrap()
        .unwrap()
        .split_whitespace()
        .last()
        .unwrap()
        .to_string();
    (srv, addr, fp)
}

/// `offsite-edge join` on the CPU for client `name` of a federation in `dir` (data `dir/NAME.txt`, cache
/// `dir/cache-NAME`, the data settings from `config`); `edge` is the binary.
pub fn edge_join(
    edge: &Path,
    dir: &Path,
    config: &Path,
    (addr, fp): (&str, &str),
    token: &str,
    name: &str,
) -> std::process::Command {
    let mut c = std::process::Command::new(edge);
    c.args([
        "join",
        "--device",
        "cpu",
        "--server",
        addr,
        "--fingerprint",
        fp,
        "--name",
        name,
    ])
    .arg("--data")
    .arg(dir.join(format!("{name}.txt")))
    .arg("--cache")
    .arg(dir.join(format!("cache-{name}")))
    .arg("--config")
    .arg(config)
    .env("OFFSITE_TOKEN", token);
    c
}
