//! A whole federation on this machine: the server and one edge client per data share, over the real protocol on
//! loopback QUIC. What `sim` runs, and every federated arm of `bench`.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use burn::tensor::Device;
use offsite::data::Example;
use offsite::federated::{EmulatorTrainer, LocalData};
use offsite_fed::{Params, RoundReport, ServerState, TokenStore};
use offsite_net::{join, JoinSettings, Server, Trust, SERVER_NAME};
use tracing::info;

use super::config::{FedFile, SimSection};

/// One simulated federation: the config (its `[server] state_dir` holds tokens, state and metrics; its listen
/// address is replaced by 127.0.0.1 on a free port), the emulator served, and each client's examples.
pub(crate) struct Loopback<'a> {
    /// The federation config.
    pub file: &'a FedFile,
    /// The emulator file clients download.
    pub emulator: PathBuf,
    /// The examples of client `i` (they stay in this process, as a client's data stays on its machine).
    pub clients: Vec<Vec<Example>>,
    /// Where clients train.
    pub device: Device,
    /// Whether the device computes f16 fast.
    pub fast_f16: bool,
}

impl Loopback<'_> {
    /// The updates a round takes: `[federation] fraction` of the clients, at least `min_clients`.
    pub(crate) fn per_round(&self) -> usize {
        let f = &self.file.federation;
        offsite_fed::sampled_count(self.clients.len(), f.fraction, f.min_clients)
    }

    /// Runs every round from `initial`, with `evaluator` after the rounds `[federation] eval_every` names; calls
    /// `on_round` after each round. Returns the final server state.
    pub(crate) fn run(
        self,
        initial: Params,
        evaluator: Option<offsite_net::Evaluator>,
        on_round: &mut (dyn FnMut(&RoundReport) + Send),
    ) -> Result<ServerState> {
        let mut file = self.file.clone();
        if self.clients.len() < file.federation.min_clients {
            bail!(
                "{} clients cannot meet min_clients = {}",
                self.clients.len(),
                file.federation.min_clients
            );
        }
        let values = offsite_fed::params::count(&initial);
        if let Some(noise) = file.dp_noise(values, self.per_round())? {
            noise.warn_if_dominant();
        }
        file.server.listen = ([127, 0, 0, 1], 0).into();
        let dir = file.server.state_dir.clone();
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let tokens_path = TokenStore::path(&dir);
        let mut store = TokenStore::load(&tokens_path)?;
        let tokens = (0..self.clients.len())
            .map(|i| store.issue(&format!("client-{i}")))
            .collect::<Result<Vec<_>, _>>()?;
        store.save(&tokens_path)?;
        info!(clients = self.clients.len(), examples = ?self.clients.iter().map(Vec::len).collect::<Vec<_>>(), "data split");
        let (settings, identity) = super::serve_settings(&file, self.emulator)?;
        let runtime = tokio::runtime::Runtime::new()?;
        runtime.block_on(async {
            let server = Server::bind(settings, identity)?;
            let addr = server.local_addr()?;
            let trust = Trust::Pinned(server.fingerprint().to_string());
            info!(%addr, clients = self.clients.len(), "server up; starting clients");
            let mut handles = Vec::new();
            for (i, (data, token)) in self.clients.into_iter().zip(tokens).enumerate() {
                let s = JoinSettings {
                    server: addr,
                    server_name: SERVER_NAME.into(),
                    trust: trust.clone(),
                    token,
                    name: format!("sim-{i}"),
                    cache_dir: dir.join(format!("client-{i}")),
                    max_reconnects: 5,
                    save_updates: None,
                    client_cert: None,
                };
                let trainer =
                    EmulatorTrainer::new(self.device.clone(), LocalData::Examples(data)).with_fast_f16(self.fast_f16);
                handles.push(tokio::spawn(join(s, Box::new(trainer))));
            }
            let state = server.run(initial, evaluator, on_round).await?;
            for (i, h) in handles.into_iter().enumerate() {
                let summary = h.await.context("client task")??;
                info!(
                    client = i,
                    rounds = summary.rounds,
                    accepted = summary.accepted,
                    "client finished"
                );
            }
            anyhow::Ok(state)
        })
    }
}

/// The clients' examples: `[sim] data` read with `[data]`, dealt by `[sim] split` (seeded by `[federation] seed`),
/// each client's share spread to at most `[sim] max_examples_per_client`.
pub(crate) fn client_examples(
    file: &FedFile,
    sim: &SimSection,
    tokenizer: &offsite::tokenizer::Tokenizer,
) -> Result<Vec<Vec<Example>>> {
    let per_file = sim
        .data
        .iter()
        .map(|p| {
            file.data
                .load(p, tokenizer)
                .with_context(|| format!("reading {}", p.display()))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(sim
        .split
        .apply(per_file, file.federation.seed)?
        .into_iter()
        .map(|c| crate::eval_cmd::spread(c, sim.max_examples_per_client))
        .collect())
}
