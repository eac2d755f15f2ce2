//! What the federation tests over real QUIC share: the tiny emulator fixture, server and client settings, a raw
//! protocol client, and an independent FedAvg.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use offsite::adapters::{AdapterSpec, Method};
use offsite::data::Example;
use offsite::emulator::Emulator;
use offsite::federated::{adapter_state, EmulatorTrainer, LocalData};
use offsite::train::TrainConfig;
use offsite_fed::{read_safetensors, FederationConfig, Params, StrategyConfig, TokenStore};
use offsite_net::{
    join, quic_client, EmulatorSource, JoinSettings, JoinSummary, NetError, ServeSettings, Server, Trust, SERVER_NAME,
};
use offsite_protocol::{ClientConn, ClientEvent, Hello, Limits};
use offsite_tests::tiny_emulator;

pub struct Fixture {
    _tmp: tempfile::TempDir,
    pub dir: PathBuf,
    pub emulator: PathBuf,
    pub initial: Params,
}

pub fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let (_, emulator) = tiny_emulator(&dir);
    let emu = Emulator::open(&emulator).unwrap();
    let device = burn::tensor::Device::flex();
    let (m, _) = spec()
        .prepare(
            emu.load_model(&device.autodiff()).unwrap(),
            &emu.manifest().adapter_layers,
            None,
        )
        .unwrap();
    let initial = adapter_state(&m).unwrap();
    Fixture {
        _tmp: tmp,
        dir,
        emulator,
        initial,
    }
}

pub fn spec() -> AdapterSpec {
    AdapterSpec {
        method: Method::Layers,
        lora: None,
        prompt: None,
    }
}

/// Client `c`'s examples: short sequences from a client-specific pattern (so clients pull different ways).
pub fn examples(c: u32, n: u32) -> Vec<Example> {
    (0..n)
        .map(|i| {
            let ids: Vec<u32> = (0..10).map(|t| (c * 31 + i * 7 + t * 13) % 250 + 3).collect();
            let labels = ids.iter().map(|&x| x as i64).collect();
            Example {
                ids,
                labels,
                category: None,
            }
        })
        .collect()
}

pub fn settings(f: &Fixture, state: &Path, rounds: u64, min_clients: usize) -> ServeSettings {
    ServeSettings {
        listen: "127.0.0.1:0".parse().unwrap(),
        state_dir: state.to_path_buf(),
        emulator: EmulatorSource::open(f.emulator.clone(), 64 * 1024).unwrap(),
        adapter_json: serde_json::to_string(&spec()).unwrap(),
        federation: FederationConfig {
            rounds,
            min_clients,
            wait_for_clients_s: 60.0,
            deadline_s: 60.0,
            eval_every: 0,
            seed: 3,
            ..Default::default()
        },
        local: TrainConfig {
            steps: 2,
            batch_size: 2,
            lr: 1e-2,
            min_lr: 1e-5,
            ..Default::default()
        },
        strategy: StrategyConfig::FedAvg { norm_bound: None }.build().unwrap(),
        hello_timeout_s: 5.0,
        client_ca: None,
        connections: offsite_net::ConnectionLimits::default(),
    }
}

pub fn issue(state: &Path, ids: &[&str]) -> Vec<String> {
    let path = TokenStore::path(state);
    let mut store = TokenStore::load(&path).unwrap();
    let tokens = ids.iter().map(|id| store.issue(id).unwrap()).collect();
    store.save(&path).unwrap();
    tokens
}

pub fn client(server: &Server, dir: &Path, name: &str, token: &str) -> JoinSettings {
    JoinSettings {
        server: server.local_addr().unwrap(),
        server_name: SERVER_NAME.into(),
        trust: Trust::Pinned(server.fingerprint().to_string()),
        token: token.into(),
        name: name.into(),
        cache_dir: dir.join(format!("{name}-cache")),
        max_reconnects: 3,
        save_updates: Some(dir.join(format!("{name}-updates"))),
        client_cert: None,
    }
}

/// A client training on `data` on the CPU.
pub fn trainer(data: Vec<Example>) -> Box<EmulatorTrainer> {
    Box::new(EmulatorTrainer::new(
        burn::tensor::Device::flex(),
        LocalData::Examples(data),
    ))
}

/// Joins with `settings`, training on `data`.
pub async fn join_with(settings: JoinSettings, data: Vec<Example>) -> Result<JoinSummary, NetError> {
    join(settings, trainer(data)).await
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap()
}

/// global + Σ nᵢΔᵢ / Σ nᵢ, computed here from the deltas the clients saved (as the server decoded them).
pub fn fedavg(global: &Params, updates: &[(u64, Params)]) -> Params {
    let total: u64 = updates.iter().map(|u| u.0).sum();
    let mut out = global.clone();
    for (name, t) in out.iter_mut() {
        for (i, v) in t.values.iter_mut().enumerate() {
            let mean: f64 = updates
                .iter()
                .map(|(n, d)| d[name].values[i] as f64 * *n as f64)
                .sum::<f64>()
                / total as f64;
            *v = (*v as f64 + mean) as f32;
        }
    }
    out
}

pub fn saved_update(dir: &Path, name: &str, round: u64) -> (u64, Params) {
    let (p, meta) = read_safetensors(&dir.join(format!("{name}-updates/round-{round}.safetensors"))).unwrap();
    (meta["num_examples"].parse().unwrap(), p)
}

pub fn max_diff(a: &Params, b: &Params) -> f32 {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    a.iter()
        .flat_map(|(k, t)| t.values.iter().zip(&b[k].values).map(|(x, y)| (x - y).abs()))
        .fold(0.0, f32::max)
}

pub fn metrics(state: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(state.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A raw protocol client: connects, sends `bytes`, returns everything the server sent until it closed.
pub async fn raw(server_addr: std::net::SocketAddr, fingerprint: &str, bytes: Vec<u8>, finish: bool) -> Vec<u8> {
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(quic_client(&Trust::Pinned(fingerprint.into()), None).unwrap());
    let conn = ep.connect(server_addr, SERVER_NAME).unwrap().await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&bytes).await.unwrap();
    if finish {
        send.finish().unwrap();
    }
    let got = tokio::time::timeout(Duration::from_secs(10), recv.read_to_end(1 << 20)).await;
    got.expect("the server answers and closes").unwrap_or_default()
}

pub fn events(bytes: &[u8]) -> Vec<ClientEvent> {
    let (mut c, _) = ClientConn::new(
        Limits::default(),
        Hello {
            client_name: String::new(),
            token: String::new(),
        },
    );
    c.receive(bytes).unwrap()
}
