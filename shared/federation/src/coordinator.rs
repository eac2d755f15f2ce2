//! The round coordinator, sans-IO in quinn-proto's style: it takes events (a client ready, an update received, a
//! connection lost, an evaluation done) and the time as an argument, and returns actions (send a task or an ack,
//! save the state, evaluate, report a round) plus `poll_timeout()`. The network layer only moves bytes and timers,
//! so whole federations — deadlines, stragglers, repeated rounds, resumption — are tested here without sockets.
//!
//! A round: wait until `min_clients` are ready (at most `wait_for_clients_s`), then — at the next timeout, so that
//! every client whose readiness was already queued is counted — let the strategy pick the clients and
//! their settings, send each a task on its current connection, collect and validate updates until every sampled
//! client answered or left or the deadline passed, then aggregate — or repeat the round when fewer than
//! `min_clients` updates were accepted. Invariants: the global adapter and the strategy state change only when a
//! round completes; a completed round is evaluated, reported ([`Action::RoundComplete`]: its `metrics.jsonl` row)
//! and then saved ([`Action::Save`]), before the next round starts. A crash before the save leaves the previous
//! state, and the round runs again with the same settings (so rows past the saved round are stale and cut on
//! restart); a crash after it leaves the round saved with its row.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use offsite_protocol::{Encoding, SecAggMessage, Task, TrainConfig, Update, UpdateAck};
use tracing::{debug, info, warn};

use super::params::{check_like, hash, to_wire, Params};
use super::round::validate;
use super::state::ServerState;
use super::strategy::{ClientUpdate, RoundContext, Strategy};
use super::{FedError, FederationConfig};

/// What happened, as the network layer saw it.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A client authenticated, holds the emulator and takes tasks on connection `conn` (a newer connection of the
    /// same client replaces the older one).
    Ready {
        /// The client's id (from its token).
        client: String,
        /// The connection, unique for the server's lifetime.
        conn: u64,
    },
    /// An update arrived on a connection.
    Update {
        /// The sender.
        client: String,
        /// The connection it came on.
        conn: u64,
        /// The update, decoded but not yet validated.
        update: Update,
    },
    /// A connection ended, whatever ended it.
    Disconnected {
        /// Its client.
        client: String,
        /// The connection.
        conn: u64,
    },
    /// A secure-aggregation stage message arrived on a connection.
    SecAgg {
        /// The sender.
        client: String,
        /// The connection it came on.
        conn: u64,
        /// The message (only the kinds a client sends).
        message: SecAggMessage,
    },
    /// The answer to [`Action::Evaluate`].
    Evaluated {
        /// The round evaluated.
        round: u64,
        /// The plug-in model's perplexity, `None` when the evaluation failed or there is no evaluator.
        perplexity: Option<f64>,
    },
}

/// A message for a client.
#[derive(Debug, Clone, PartialEq)]
pub enum Outgoing {
    /// Train this round (shared: every sampled client gets the same task).
    Task(Arc<Task>),
    /// The verdict on an update.
    Ack(UpdateAck),
    /// A secure-aggregation stage message for this client.
    SecAgg(SecAggMessage),
    /// The federation is over.
    Goodbye(String),
}

/// What the network layer must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Send `message` to `client`: on connection `conn` when given (a task goes only to the connection it was
    /// planned for), else on the client's current connection, if any.
    Send {
        /// The client.
        client: String,
        /// The connection, when it matters.
        conn: Option<u64>,
        /// The message.
        message: Outgoing,
    },
    /// A round began (its tasks follow): the moment to start counting its bytes.
    RoundStarted {
        /// The round.
        round: u64,
    },
    /// Persist [`Coordinator::state`] now: a round has completed and been reported.
    Save,
    /// Evaluate the plug-in model with this global state, then answer with [`Event::Evaluated`].
    Evaluate {
        /// The round just completed.
        round: u64,
        /// Its global adapter.
        global: Params,
    },
    /// A round is complete and evaluated (the byte counts are the network layer's to fill in).
    RoundComplete(RoundReport),
    /// Every round is done: say goodbye to every client.
    Finished,
}

/// One completed round, as logged to `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RoundReport {
    /// The round.
    pub round: u64,
    /// Clients sampled.
    pub sampled: usize,
    /// Updates aggregated.
    pub participants: usize,
    /// Updates refused (late, stale, wrong shape, non-finite, over the norm limit).
    pub rejected: usize,
    /// Bytes received during the round.
    pub bytes_in: u64,
    /// Bytes sent during the round.
    pub bytes_out: u64,
    /// Example-weighted mean of the clients' training loss.
    pub train_loss: f64,
    /// Perplexity of the plug-in model, when evaluated this round.
    pub eval_perplexity: Option<f64>,
    /// Seconds the round took (evaluation included).
    pub wall_s: f64,
    /// SHA-256 of the new global adapter.
    pub global_sha256: String,
    /// Central DP: ε spent by the rounds so far (absent without `[privacy]`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epsilon: Option<f64>,
    /// Central DP: the δ of that guarantee.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delta: Option<f64>,
    /// Secure aggregation: clients that dropped out after sharing their secrets and whose masks were removed from
    /// the sum (absent in plain rounds).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub masks_recovered: Option<usize>,
    /// `‖sent − global‖ / ‖global‖` of the global adapter as the round's tasks carried it (`global_encoding`; absent
    /// when sent exact, in f32).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub global_rounding: Option<f64>,
}

/// A round under way.
#[derive(Debug)]
struct Round {
    number: u64,
    started: Instant,
    deadline: Instant,
    sampled: usize,
    /// The largest FedAvg weight a client may claim this round.
    max_examples: u64,
    /// Who owes an update, by client and the connection the task went to.
    pending: BTreeMap<String, u64>,
    accepted: Vec<ClientUpdate>,
    rejected: usize,
    /// (training loss, FedAvg weight) of the accepted updates.
    losses: Vec<(f64, f64)>,
    /// The secure-aggregation stages, when the round runs them.
    secure: Option<Box<secagg::Secure>>,
    /// Secure aggregation: masks of dropped clients removed from the sum.
    masks_recovered: Option<usize>,
    /// The relative error of the global adapter as sent (None: sent in f32).
    global_rounding: Option<f64>,
}

#[derive(Debug)]
enum Phase {
    /// Waiting for enough ready clients since then.
    Waiting { since: Instant },
    /// Tasks are out.
    Running(Round),
    /// The round is aggregated and saved; the evaluation is out.
    Evaluating { report: RoundReport, started: Instant },
    /// Every round is done.
    Done,
}

/// The server's round logic. Feed it with [`Coordinator::handle`] and [`Coordinator::handle_timeout`] (at
/// [`Coordinator::poll_timeout`]); drain [`Coordinator::poll_action`] after each call.
pub struct Coordinator {
    config: FederationConfig,
    local: TrainConfig,
    strategy: Box<dyn Strategy>,
    state: ServerState,
    /// Clients ready for tasks, by id, with their current connection.
    ready: BTreeMap<String, u64>,
    phase: Phase,
    /// Earlier tries of the current round.
    attempt: u32,
    actions: VecDeque<Action>,
}

impl Coordinator {
    /// A coordinator at `now`, resuming from `saved` (a persisted [`ServerState`]) when given, else starting at
    /// round 1 from `initial`. A saved state must have the initial adapter's names and shapes.
    pub fn new(
        config: FederationConfig,
        local: TrainConfig,
        mut strategy: Box<dyn Strategy>,
        initial: Params,
        saved: Option<ServerState>,
        now: Instant,
    ) -> Result<Self, FedError> {
        if !(config.wait_for_clients_s >= 0.0 && config.deadline_s >= 0.0) {
            return Err(FedError::Config(format!(
                "wait_for_clients_s ({}) and deadline_s ({}) must be ≥ 0",
                config.wait_for_clients_s, config.deadline_s
            )));
        }
        match &config.secure_aggregation {
            Some(sa) => secagg::check(sa, config.min_clients, strategy.as_ref())?,
            None if strategy.client_dp().is_some_and(|d| d.noise_at_clients) => {
                return Err(FedError::Config(
                    "[privacy] noise = \"clients\" needs [federation.secure_aggregation]: without it the server \
                     would see each client's noised update instead of their sum"
                        .into(),
                ))
            }
            None => {}
        }
        let state = match saved {
            Some(s) => {
                check_like(&initial, &s.global)?;
                strategy.restore(s.strategy.clone())?;
                info!(
                    completed = s.round,
                    next_round = s.round + 1,
                    of = config.rounds,
                    global = %hash(&s.global),
                    "resuming from the saved state at round {}", s.round + 1
                );
                s
            }
            None => {
                info!(rounds = config.rounds, global = %hash(&initial), "starting a new federation at round 1");
                ServerState {
                    round: 0,
                    global: initial,
                    strategy: Params::new(),
                    clients: Default::default(),
                }
            }
        };
        let mut c = Coordinator {
            config,
            local,
            strategy,
            state,
            ready: BTreeMap::new(),
            phase: Phase::Waiting { since: now },
            attempt: 0,
            actions: VecDeque::new(),
        };
        c.next_round(now)?;
        Ok(c)
    }

    /// The state as of the last completed round (what [`Action::Save`] asks to persist).
    pub fn state(&self) -> &ServerState {
        &self.state
    }

    /// Whether every round is done.
    pub fn is_finished(&self) -> bool {
        matches!(self.phase, Phase::Done)
    }

    /// The next action to carry out, if any.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When [`Coordinator::handle_timeout`] must be called next: at once when enough clients are ready to start a
    /// round (after the events already at hand, so they all count), else when the wait for clients or the round's
    /// deadline runs out.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match &self.phase {
            Phase::Waiting { since } if self.ready.len() >= self.needed() => Some(*since),
            Phase::Waiting { since } => Some(*since + secs(self.config.wait_for_clients_s)),
            Phase::Running(r) => Some(r.deadline),
            Phase::Evaluating { .. } | Phase::Done => None,
        }
    }

    /// Handles an event. An error ends the federation (the strategy failed to aggregate, or it chose no client).
    pub fn handle(&mut self, event: Event, now: Instant) -> Result<(), FedError> {
        match event {
            Event::Ready { client, conn } => {
                info!(%client, conn, "client ready");
                self.ready.insert(client, conn);
            }
            Event::Disconnected { client, conn } => {
                if self.ready.get(&client) == Some(&conn) {
                    self.ready.remove(&client);
                }
                if matches!(&self.phase, Phase::Running(r) if r.secure.is_some()) {
                    return self.secure_departure(&client, conn, now);
                }
                if let Phase::Running(r) = &mut self.phase {
                    if r.pending.get(&client) == Some(&conn) {
                        warn!(round = r.number, %client, "client disconnected mid-round");
                        r.pending.remove(&client);
                        if r.pending.is_empty() {
                            self.close_round(now)?;
                        }
                    }
                }
            }
            Event::Update { client, conn, update } => self.on_update(client, conn, update, now)?,
            Event::SecAgg { client, conn, message } => self.on_secagg(client, conn, message, now)?,
            Event::Evaluated { round, perplexity } => {
                if let Phase::Evaluating { report, .. } = &mut self.phase {
                    if report.round == round {
                        report.eval_perplexity = perplexity;
                        self.finish_round(now)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Handles the passing of time: starts a round once enough clients are ready, gives up waiting for them, or
    /// closes a round at its deadline.
    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), FedError> {
        match &self.phase {
            Phase::Waiting { .. } if self.ready.len() >= self.needed() => self.start_round(now)?,
            Phase::Waiting { since } if now >= *since + secs(self.config.wait_for_clients_s) => {
                return Err(FedError::NotEnoughClients {
                    round: self.state.round + 1,
                    ready: self.ready.len(),
                    needed: self.needed(),
                    waited_s: self.config.wait_for_clients_s,
                });
            }
            Phase::Running(r) if now >= r.deadline => {
                warn!(round = r.number, late = ?r.pending.keys().collect::<Vec<_>>(), "deadline passed");
                if r.secure.is_some() {
                    self.close_stage(now)?;
                } else {
                    self.close_round(now)?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn needed(&self) -> usize {
        self.config.min_clients.max(1)
    }

    fn send(&mut self, client: &str, conn: Option<u64>, message: Outgoing) {
        self.actions.push_back(Action::Send {
            client: client.into(),
            conn,
            message,
        });
    }

    fn reject(&mut self, client: &str, round: u64, reason: String) {
        warn!(client, round, %reason, "update rejected");
        let ack = UpdateAck {
            round,
            accepted: false,
            reason: Some(reason),
        };
        self.send(client, None, Outgoing::Ack(ack));
    }

    /// After a completed round (or at the start): the next round, or the end.
    fn next_round(&mut self, now: Instant) -> Result<(), FedError> {
        self.attempt = 0;
        if self.state.round >= self.config.rounds {
            self.phase = Phase::Done;
            self.actions.push_back(Action::Finished);
            return Ok(());
        }
        self.wait(now);
        Ok(())
    }

    /// Waits for clients from `now` (the round starts at the next timeout when enough are ready).
    fn wait(&mut self, now: Instant) {
        self.phase = Phase::Waiting { since: now };
        if self.ready.len() < self.needed() {
            info!(
                round = self.state.round + 1,
                ready = self.ready.len(),
                needed = self.needed(),
                "waiting for clients"
            );
        }
    }

    /// Starts the next round with the ready clients (at least `min_clients`).
    fn start_round(&mut self, now: Instant) -> Result<(), FedError> {
        let round = self.state.round + 1;
        let ready: Vec<String> = self.ready.keys().cloned().collect();
        let plan = self.strategy.configure_round(&RoundContext {
            round,
            attempt: self.attempt,
            ready: &ready,
            fraction: self.config.fraction,
            min_clients: self.config.min_clients,
            seed: self.config.seed,
            local: &self.local,
        });
        // A privacy budget is judged at the rate this round samples at, before any task goes out.
        if let Some(reason) = self.strategy.exhausted() {
            warn!(after = self.state.round, %reason, "privacy budget reached: the federation ends here");
            self.phase = Phase::Done;
            self.actions.push_back(Action::Finished);
            return Ok(());
        }
        let trained = (plan.settings.steps as u64)
            .saturating_mul(plan.settings.batch_size as u64)
            .saturating_mul(plan.settings.grad_accum as u64);
        let max_examples = self.config.max_examples_per_update.unwrap_or(trained).max(1);
        let encoding = self.config.global_encoding;
        let global = to_wire(&self.state.global, encoding);
        let global_rounding = match encoding {
            Encoding::F32 => None,
            _ => Some(crate::params::relative_error(&self.state.global, &global)?),
        };
        let task = Task {
            round,
            global,
            settings: plan.settings,
            proximal_mu: plan.proximal_mu,
            update_encoding: self.config.update_encoding,
            deadline_ms: (self.config.deadline_s * 1000.0) as u64,
            secagg: None,
        };
        self.actions.push_back(Action::RoundStarted { round });
        let mut pending = BTreeMap::new();
        for client in &plan.clients {
            match self.ready.get(client) {
                Some(&conn) => {
                    pending.insert(client.clone(), conn);
                }
                None => warn!(round, %client, "the strategy chose a client that is not ready; skipped"),
            }
        }
        if pending.is_empty() {
            return Err(FedError::Config(format!(
                "strategy {} chose no ready client for round {round}",
                self.strategy.name()
            )));
        }
        // Under secure aggregation the task waits for the key and share stages; else it goes out now.
        let mut deadline = now + secs(self.config.deadline_s);
        let secure = match self.config.secure_aggregation.clone() {
            Some(sa) => {
                deadline = now + secs(sa.stage_timeout_s);
                Some(Box::new(self.open_secure(&sa, task, &pending, max_examples)?))
            }
            None => {
                let task = Arc::new(task);
                for (client, &conn) in &pending {
                    self.send(client, Some(conn), Outgoing::Task(task.clone()));
                }
                None
            }
        };
        info!(
            round,
            sampled = pending.len(),
            ready = ready.len(),
            attempt = self.attempt,
            global_rounding = ?global_rounding,
            "round started"
        );
        self.phase = Phase::Running(Round {
            number: round,
            started: now,
            deadline,
            sampled: pending.len(),
            max_examples,
            pending,
            accepted: Vec::new(),
            rejected: 0,
            losses: Vec::new(),
            secure,
            masks_recovered: None,
            global_rounding,
        });
        Ok(())
    }

    fn on_update(&mut self, client: String, conn: u64, update: Update, now: Instant) -> Result<(), FedError> {
        let Phase::Running(r) = &mut self.phase else {
            // Between rounds (waiting, evaluating) every update answers an old round.
            let reason = format!("late update for round {}", update.round);
            self.reject(&client, update.round, reason);
            return Ok(());
        };
        let round = r.number;
        if r.secure.is_some() {
            r.rejected += 1;
            let reason = "this round is securely aggregated: a masked update is expected".to_string();
            self.reject(&client, update.round, reason);
            return Ok(());
        }
        // A stale update never takes the slot its sender may hold in this round.
        if update.round != round || r.pending.get(&client) != Some(&conn) {
            r.rejected += 1;
            let reason = if update.round == round {
                "not sampled this round, or already answered".to_string()
            } else {
                format!(
                    "stale update: it answers round {}, the current round is {round}",
                    update.round
                )
            };
            self.reject(&client, update.round, reason);
            return Ok(());
        }
        r.pending.remove(&client);
        let record = self.state.clients.entry(client.clone()).or_default();
        // Decoding reads untrusted bytes: a bug there rejects this update instead of ending the server.
        let global = &self.state.global;
        let max_norm = self.config.max_update_norm;
        let checked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            validate(&client, &update, round, global, max_norm)
        }))
        .unwrap_or_else(|_| Err("the update could not be decoded (internal error)".into()));
        match checked {
            Ok(mut u) => {
                if u.num_examples > r.max_examples {
                    // Above what the round trains on is the usual case (a client holds more data than one round
                    // sees); above a configured cap is worth a warning.
                    if self.config.max_examples_per_update.is_some() {
                        warn!(round, %client, claimed = u.num_examples, weight = r.max_examples, "example count clipped");
                    } else {
                        debug!(round, %client, claimed = u.num_examples, weight = r.max_examples, "example count clipped to what the round trains on");
                    }
                    u.num_examples = r.max_examples;
                }
                record.accepted += 1;
                record.last_round = round;
                r.losses.push((update.train_loss, u.num_examples as f64));
                r.accepted.push(u);
                let ack = UpdateAck {
                    round,
                    accepted: true,
                    reason: None,
                };
                self.send(&client, None, Outgoing::Ack(ack));
            }
            Err(reason) => {
                record.rejected += 1;
                r.rejected += 1;
                self.reject(&client, round, reason);
            }
        }
        if matches!(&self.phase, Phase::Running(r) if r.pending.is_empty()) {
            self.close_round(now)?;
        }
        Ok(())
    }

    /// Every sampled client answered or left, or the deadline passed: aggregate, or repeat the round.
    fn close_round(&mut self, now: Instant) -> Result<(), FedError> {
        let Phase::Running(r) = std::mem::replace(&mut self.phase, Phase::Waiting { since: now }) else {
            return Ok(());
        };
        // A secure sum stands for its contributors.
        let accepted: usize = r.accepted.iter().map(|u| u.contributors).sum();
        if accepted < self.needed() {
            warn!(
                round = r.number,
                accepted,
                min = self.config.min_clients,
                "too few updates; repeating the round"
            );
            return self.repeat(r.number, now);
        }
        // A poisoned aggregate (inf, NaN) is a rejected round: the global state and the strategy's own state stay
        // as they were.
        let before = self.strategy.state();
        // In client order, not arrival order: the same updates give the same bits however the network raced.
        let mut accepted = r.accepted;
        accepted.sort_by(|a, b| a.client.cmp(&b.client));
        let global = self.strategy.aggregate(&self.state.global, &accepted)?;
        if let Some((name, _)) = global.iter().find(|(_, t)| t.values.iter().any(|v| !v.is_finite())) {
            warn!(round = r.number, tensor = %name, "the aggregate is not finite; round rejected and repeated");
            self.strategy.restore(before)?;
            return self.repeat(r.number, now);
        }
        self.state.global = global;
        self.state.strategy = self.strategy.state();
        self.state.round = r.number;
        let examples: f64 = r.losses.iter().map(|l| l.1).sum();
        let report = RoundReport {
            round: r.number,
            sampled: r.sampled,
            participants: accepted.iter().map(|u| u.contributors).sum(),
            rejected: r.rejected,
            bytes_in: 0,
            bytes_out: 0,
            train_loss: r.losses.iter().map(|(l, n)| l * n).sum::<f64>() / examples.max(f64::MIN_POSITIVE),
            eval_perplexity: None,
            wall_s: 0.0,
            global_sha256: hash(&self.state.global),
            epsilon: self.strategy.privacy_spent().map(|p| p.0),
            delta: self.strategy.privacy_spent().map(|p| p.1),
            masks_recovered: r.masks_recovered,
            global_rounding: r.global_rounding,
        };
        self.phase = Phase::Evaluating {
            report,
            started: r.started,
        };
        let every = self.config.eval_every;
        if every > 0 && r.number % every == 0 {
            self.actions.push_back(Action::Evaluate {
                round: r.number,
                global: self.state.global.clone(),
            });
            Ok(())
        } else {
            self.finish_round(now)
        }
    }

    /// Tries round `round` again, unless it has been tried `max_round_attempts` times.
    fn repeat(&mut self, round: u64, now: Instant) -> Result<(), FedError> {
        self.attempt += 1;
        if self.attempt >= self.config.max_round_attempts.max(1) {
            return Err(FedError::RoundFailed {
                round,
                attempts: self.attempt,
            });
        }
        self.wait(now);
        Ok(())
    }

    fn finish_round(&mut self, now: Instant) -> Result<(), FedError> {
        let Phase::Evaluating { mut report, started } =
            std::mem::replace(&mut self.phase, Phase::Waiting { since: now })
        else {
            return Ok(());
        };
        report.wall_s = now.saturating_duration_since(started).as_secs_f64();
        info!(
            round = report.round,
            participants = report.participants,
            rejected = report.rejected,
            train_loss = format!("{:.4}", report.train_loss),
            eval_ppl = ?report.eval_perplexity,
            epsilon = ?report.epsilon,
            "round complete"
        );
        self.actions.push_back(Action::RoundComplete(report));
        self.actions.push_back(Action::Save);
        self.next_round(now)
    }
}

/// Seconds as a duration (config values are checked finite and ≥ 0 where they are read; huge ones saturate).
fn secs(s: f64) -> Duration {
    Duration::try_from_secs_f64(s).unwrap_or(Duration::MAX / 4)
}

mod secagg;
#[cfg(test)]
mod tests;
