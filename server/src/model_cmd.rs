//! `offsite-server model ...`: info, tokenize, logits, generate.

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use burn::tensor::{Int, Tensor, TensorData};
use clap::{Args, Subcommand};
use offsite::device::{self, DeviceChoice};
use offsite::generate::{generate_streaming, GenerationConfig};
use offsite::load::{peak_rss_bytes, Checkpoint, TensorInfo};
use offsite::model::LlamaForCausalLM;
use offsite::tokenizer::{ChatMessage, TextStream};
use tracing::info;

#[derive(Subcommand)]
pub(crate) enum ModelCommand {
    /// Architecture, sizes and tensor types.
    Info {
        #[command(flatten)]
        model: ModelArgs,
        /// Also list every tensor.
        #[arg(long)]
        tensors: bool,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print the token ids of a text as a JSON array (special tokens in the text are recognised; no BOS).
    Tokenize {
        #[command(flatten)]
        model: ModelArgs,
        /// The text to tokenize.
        #[arg(long)]
        text: String,
    },
    /// Write the logits of one sequence (positions from 0, no BOS) to a safetensors file as tensor `logits`.
    Logits {
        #[command(flatten)]
        model: ModelArgs,
        /// Comma-separated token ids.
        #[arg(long, value_delimiter = ',', required = true)]
        ids: Vec<u32>,
        /// Output `.safetensors` file.
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        device: DeviceArgs,
    },
    /// Generate a continuation and print only the generated text, token by token as it comes.
    Generate {
        #[command(flatten)]
        model: ModelArgs,
        /// The prompt; `-` or absent: read it from stdin.
        #[arg(long)]
        prompt: Option<String>,
        /// Wrap the prompt in the model's chat template (with its default system message).
        #[arg(long)]
        chat: bool,
        /// A system message for the chat template (implies --chat).
        #[arg(long)]
        system: Option<String>,
        /// Stop before this text (repeatable); the generation ends at the first stop string it produces.
        #[arg(long)]
        stop: Vec<String>,
        /// Most tokens to generate.
        #[arg(long, default_value_t = 128)]
        max_new_tokens: usize,
        /// Sampling temperature; greedy decoding when absent.
        #[arg(long)]
        temperature: Option<f64>,
        /// Sample among the k most likely tokens only.
        #[arg(long)]
        top_k: Option<usize>,
        /// Nucleus sampling threshold.
        #[arg(long)]
        top_p: Option<f64>,
        /// Sampler seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[command(flatten)]
        device: DeviceArgs,
    },
}

#[derive(Args)]
pub(crate) struct ModelArgs {
    /// Hugging Face model directory or `.gguf` file.
    #[arg(long)]
    model: PathBuf,
}

#[derive(Args)]
pub(crate) struct DeviceArgs {
    /// auto, cpu, gpu or gpu:N.
    #[arg(long, default_value = "auto")]
    device: DeviceChoice,
    /// An adapter applied to the model: a PEFT LoRA directory (`adapter_config.json` +
    /// `adapter_model.safetensors`) or an Offsite adapter directory (from `offsite-edge train`).
    #[arg(long)]
    adapter: Option<PathBuf>,
}

fn open(path: &Path) -> Result<Checkpoint> {
    Checkpoint::open(path).with_context(|| format!("opening model {}", path.display()))
}

fn load(checkpoint: &Checkpoint, args: &DeviceArgs) -> Result<LlamaForCausalLM> {
    let (device, described) = device::resolve(args.device)?;
    info!(device = %described, "loading weights");
    let start = Instant::now();
    let mut model = checkpoint.load_model(&device)?;
    info!(
        seconds = format!("{:.2}", start.elapsed().as_secs_f64()),
        peak_rss_mib = peak_rss_bytes().map(|b| b / (1 << 20)),
        "model loaded"
    );
    if let Some(dir) = &args.adapter {
        model = crate::plug::plug_in(checkpoint, model, dir)?;
    }
    Ok(model)
}

pub(crate) fn run(command: ModelCommand) -> Result<()> {
    match command {
        ModelCommand::Info { model, tensors, json } => {
            let checkpoint = open(&model.model)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&info_json(&checkpoint, tensors)?)?);
                Ok(())
            } else {
                info_cmd(&checkpoint, tensors)
            }
        }
        ModelCommand::Tokenize { model, text } => {
            let ids = open(&model.model)?.tokenizer()?.encode(&text)?;
            println!("{}", serde_json::to_string(&ids)?);
            Ok(())
        }
        ModelCommand::Logits {
            model,
            ids,
            out,
            device,
        } => {
            let checkpoint = open(&model.model)?;
            let model = load(&checkpoint, &device)?;
            model.check_ids(&ids)?;
            let len = ids.len();
            let ids: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
            let input = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, len]), &model.device());
            let logits = model.forward(input, None, None)?;
            let vocab = logits.dims()[2];
            let values: Vec<f32> = logits
                .into_data()
                .try_into_vec()
                .map_err(|e| anyhow::anyhow!("{e:?}"))?;
            write_logits(&out, values, len, vocab)
        }
        ModelCommand::Generate {
            model,
            prompt,
            chat,
            system,
            stop,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            seed,
            device,
        } => {
            let checkpoint = open(&model.model)?;
            let tokenizer = checkpoint.tokenizer()?;
            let prompt = read_prompt(prompt)?;
            let text = match system {
                Some(s) => tokenizer.apply_chat_template(&[ChatMessage::system(s), ChatMessage::user(prompt)], true)?,
                None if chat => tokenizer.apply_chat_template(&[ChatMessage::user(prompt)], true)?,
                None => prompt,
            };
            let ids = tokenizer.encode(&text)?;
            let model = load(&checkpoint, &device)?;
            let config = GenerationConfig {
                max_new_tokens,
                temperature,
                top_k,
                top_p,
                seed,
            };
            let start = Instant::now();
            let mut stream = TextStream::new(stop);
            let (mut so_far, mut failed) = (Vec::new(), None);
            let mut stdout = std::io::stdout().lock();
            let mut on_token = |id| {
                so_far.push(id);
                let step = match tokenizer.decode(&so_far, false) {
                    Ok(text) => stream.push(&text),
                    Err(e) => {
                        failed = Some(anyhow::Error::from(e));
                        return false;
                    }
                };
                if let Err(e) = stdout.write_all(step.text.as_bytes()).and_then(|()| stdout.flush()) {
                    failed = Some(anyhow::Error::from(e).context("writing to stdout"));
                    return false;
                }
                !step.stopped
            };
            let out = generate_streaming(&model, &ids, tokenizer.eos_ids(), &config, &mut on_token)?;
            if let Some(e) = failed {
                return Err(e);
            }
            let rest = stream.finish(&tokenizer.decode(&out, false)?);
            writeln!(stdout, "{rest}").context("writing to stdout")?;
            let secs = start.elapsed().as_secs_f64();
            info!(
                prompt_tokens = ids.len(),
                new_tokens = out.len(),
                tokens_per_s = format!("{:.1}", out.len() as f64 / secs),
                "generated"
            );
            Ok(())
        }
    }
}

fn write_logits(path: &Path, values: Vec<f32>, len: usize, vocab: usize) -> Result<()> {
    offsite::load::write_f32_safetensors(path, vec![("logits".into(), values, vec![len, vocab])])
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
    info!(path = %path.display(), shape = ?[len, vocab], "logits written");
    Ok(())
}

/// The prompt given, or stdin's whole text for `-` or none (refused when stdin is a terminal: nothing was piped).
fn read_prompt(prompt: Option<String>) -> Result<String> {
    match prompt {
        Some(p) if p != "-" => Ok(p),
        given => {
            let stdin = std::io::stdin();
            if given.is_none() && stdin.is_terminal() {
                bail!("no prompt: give --prompt TEXT, or pipe the prompt on stdin (--prompt - reads a terminal too)");
            }
            let mut text = String::new();
            stdin
                .lock()
                .read_to_string(&mut text)
                .context("reading the prompt from stdin")?;
            if text.is_empty() {
                bail!("the prompt read from stdin is empty");
            }
            Ok(text)
        }
    }
}

/// Tensor count and bytes per storage type; refuses a checkpoint without tensors.
fn by_type(tensors: &[TensorInfo]) -> Result<std::collections::BTreeMap<&str, (usize, usize)>> {
    if tensors.is_empty() {
        bail!("the checkpoint holds no tensors");
    }
    let mut types: std::collections::BTreeMap<&str, (usize, usize)> = Default::default();
    for t in tensors {
        let e = types.entry(t.dtype.as_str()).or_default();
        e.0 += 1;
        e.1 += t.bytes;
    }
    Ok(types)
}

/// What `model info --json` prints.
fn info_json(checkpoint: &Checkpoint, list: bool) -> Result<serde_json::Value> {
    let c = checkpoint.config();
    let tensors = checkpoint.tensors();
    let types = by_type(&tensors)?;
    let tokenizer = checkpoint.tokenizer().ok();
    let mut v = serde_json::json!({
        "format": checkpoint.format().to_string(),
        "model_type": c.model_type,
        "parameters": c.num_parameters(),
        "num_hidden_layers": c.num_hidden_layers,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "vocab_size": c.vocab_size,
        "max_position_embeddings": c.max_position_embeddings,
        "rope_theta": c.rope_theta,
        "rope_scaling": c.rope_scaling.as_ref().map(|s| format!("{s:?}")),
        "rms_norm_eps": c.rms_norm_eps,
        "tie_word_embeddings": c.tie_word_embeddings,
        "attention_bias": c.attention_bias,
        "bos_token_id": c.bos_token_id,
        "eos_token_ids": c.eos_token_ids,
        "tensor_types": types.iter().map(|(ty, (n, bytes))| (ty.to_string(), serde_json::json!({"tensors": n, "bytes": bytes}))).collect::<serde_json::Map<_, _>>(),
        "tokenizer": tokenizer.as_ref().map(|t| serde_json::json!({
            "vocab_size": t.vocab_size(),
            "chat_template": t.chat_template().is_some(),
        })),
    });
    if list {
        v["tensors"] = tensors
            .iter()
            .map(|t| serde_json::json!({"name": t.name, "dtype": t.dtype, "shape": t.shape, "bytes": t.bytes}))
            .collect();
    }
    Ok(v)
}

fn info_cmd(checkpoint: &Checkpoint, list: bool) -> Result<()> {
    let c = checkpoint.config();
    let tensors = checkpoint.tensors();
    let types = by_type(&tensors)?;
    let params = c.num_parameters();
    println!("format:              {}", checkpoint.format());
    println!("architecture:        {} (LlamaForCausalLM)", c.model_type);
    println!(
        "parameters:          {params} ({:.1} M; f32 size {:.1} MiB)",
        params as f64 / 1e6,
        params as f64 * 4.0 / (1 << 20) as f64
    );
    println!("layers:              {}", c.num_hidden_layers);
    println!("hidden size:         {}", c.hidden_size);
    println!("intermediate size:   {}", c.intermediate_size);
    println!(
        "attention heads:     {} (kv heads {}, head dim {})",
        c.num_attention_heads, c.num_key_value_heads, c.head_dim
    );
    println!("vocabulary:          {}", c.vocab_size);
    println!("context length:      {}", c.max_position_embeddings);
    println!(
        "rope theta:          {}{}",
        c.rope_theta,
        c.rope_scaling
            .as_ref()
            .map(|s| format!(" (scaling {s:?})"))
            .unwrap_or_default()
    );
    println!("rms norm eps:        {}", c.rms_norm_eps);
    println!("tied embeddings:     {}", c.tie_word_embeddings);
    println!("q/k/v bias:          {}", c.attention_bias);
    println!("bos / eos ids:       {:?} / {:?}", c.bos_token_id, c.eos_token_ids);
    println!("tensors:             {}", tensors.len());
    for (ty, (n, bytes)) in types {
        println!(
            "  {ty:<8} {n:>5} tensors  {:>10.2} MiB",
            bytes as f64 / (1 << 20) as f64
        );
    }
    match checkpoint.tokenizer() {
        Ok(t) => println!(
            "tokenizer:           {} ids, chat template: {}",
            t.vocab_size(),
            if t.chat_template().is_some() {
                "yes"
            } else {
                "no (ChatML)"
            }
        ),
        Err(e) => println!("tokenizer:           unavailable ({e})"),
    }
    if list {
        for t in &tensors {
            println!("{:<56} {:<6} {:?}", t.name, t.dtype, t.shape);
        }
    }
    Ok(())
}
