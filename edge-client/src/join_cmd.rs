//! `offsite-edge join`: takes part in a federation. Downloads (or reuses) the emulator, trains each round's task on
//! local data and uploads only the adapter update; the data never leaves this machine.

use std::net::ToSocketAddrs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use offsite::data::DataConfig;
use offsite::device::{self, DeviceChoice};
use offsite::federated::{EmulatorTrainer, LocalData};
use offsite_net::{join, JoinSettings, Trust, SERVER_NAME};
use tracing::info;

#[derive(Args)]
pub(crate) struct JoinArgs {
    /// The server, HOST:PORT.
    #[arg(long)]
    server: String,
    /// A file holding this client's token (from `offsite-server token issue --out FILE`). Without it the token is
    /// read from the environment variable OFFSITE_TOKEN; it is never taken as an argument, which the process list
    /// would show to every user of the machine.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Local training data: JSONL instruction records or plain text (repeatable).
    #[arg(long, required = true)]
    data: Vec<PathBuf>,
    /// Pin the server's certificate by its SHA-256 fingerprint (printed by `offsite-server serve`).
    #[arg(long, conflicts_with = "ca")]
    fingerprint: Option<String>,
    /// Verify the server's certificate against this CA file (PEM) instead.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// The name in the server's certificate.
    #[arg(long, default_value = SERVER_NAME)]
    server_name: String,
    /// Emulators are cached here by hash [default: the platform's cache directory + `offsite`, e.g.
    /// ~/.cache/offsite on Linux, ~/Library/Caches/offsite on macOS, %LOCALAPPDATA%\offsite on Windows].
    #[arg(long)]
    cache: Option<PathBuf>,
    /// A TOML file with a [data] table saying how the data is read (defaults otherwise); the same flag as `train
    /// --config` (a job file or the federation config both work).
    #[arg(long = "config", visible_alias = "data-config")]
    data_config: Option<PathBuf>,
    /// auto, cpu, gpu or gpu:N.
    #[arg(long, default_value = "auto")]
    device: DeviceChoice,
    /// Give up after this many failed reconnections in a row.
    #[arg(long, default_value_t = 8)]
    max_reconnects: u32,
    /// Also write each uploaded update to this directory (`round-N.safetensors`), for auditing.
    #[arg(long)]
    save_updates: Option<PathBuf>,
    /// Client certificate (PEM) for servers that require mutual TLS; needs --key.
    #[arg(long, requires = "key")]
    cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
    /// A name for the server's logs.
    #[arg(long, default_value = "edge")]
    name: String,
}

/// The token from `--token-file` (surrounding whitespace trimmed) or OFFSITE_TOKEN.
fn read_token(file: Option<&Path>) -> Result<String> {
    let token = match file {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("reading the token file {}", path.display()))?
            .trim()
            .to_string(),
        None => std::env::var("OFFSITE_TOKEN")
            .map_err(|_| anyhow::anyhow!("no token: give --token-file FILE or set OFFSITE_TOKEN"))?,
    };
    if token.is_empty() {
        bail!("the token is empty");
    }
    Ok(token)
}

/// `--cache`, or `offsite` in the platform's cache directory.
fn cache_dir(given: Option<PathBuf>) -> Result<PathBuf> {
    match given {
        Some(dir) => Ok(dir),
        None => dirs::cache_dir()
            .map(|d| d.join("offsite"))
            .context("this platform has no cache directory: give --cache DIR"),
    }
}

fn data_config(path: &Option<PathBuf>) -> Result<DataConfig> {
    let Some(path) = path else {
        return Ok(DataConfig::default());
    };
    #[derive(serde::Deserialize)]
    struct File {
        #[serde(default)]
        data: DataConfig,
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let f: File = toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(f.data)
}

pub(crate) fn run(args: JoinArgs) -> Result<()> {
    let server = args
        .server
        .to_socket_addrs()
        .with_context(|| format!("resolving {}", args.server))?
        .next()
        .with_context(|| format!("{} resolves to no address", args.server))?;
    let trust = match (args.fingerprint, args.ca) {
        (Some(f), None) => Trust::Pinned(f),
        (None, Some(ca)) => Trust::Ca(ca),
        _ => bail!("give the server's --fingerprint to pin, or a --ca file to verify against"),
    };
    let (device, described) = device::resolve(args.device)?;
    info!(device = %described, %server, "joining");
    let settings = JoinSettings {
        server,
        server_name: args.server_name,
        trust,
        token: read_token(args.token_file.as_deref())?,
        name: args.name,
        cache_dir: cache_dir(args.cache)?,
        max_reconnects: args.max_reconnects,
        save_updates: args.save_updates,
        client_cert: args.cert.zip(args.key),
    };
    let data = LocalData::Files {
        paths: args.data,
        config: Box::new(data_config(&args.data_config)?),
    };
    let trainer = Box::new(EmulatorTrainer::new(device, data).with_fast_f16(device::fast_f16(args.device)));
    let runtime = tokio::runtime::Runtime::new()?;
    let summary = runtime.block_on(join(settings, trainer))?;
    info!(
        rounds = summary.rounds,
        accepted = summary.accepted,
        connections = summary.connections,
        "federation finished"
    );
    Ok(())
}
