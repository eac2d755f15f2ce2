//! Secure aggregation inside a round (SecAgg+, see [`crate::secagg`]). The round's sampled clients go through four
//! stages, each with its own deadline: keys (stage 0) and shares (stage 1) within `stage_timeout_s` each, then the
//! task goes out and the masked updates (stage 2) are awaited until the round's `deadline_s`, then the shares that
//! remove the masks (stage 3) within `stage_timeout_s`. A stage closes when every client still in it answered or
//! left, or at its deadline, with whoever answered; a client whose message is bad counts as dropped. The sum then
//! enters the strategy as one update standing for its contributors, and the round goes on as a plain one (finite
//! check, evaluation, report, save). Too few clients at any stage repeats the round.
//!
//! Invariants: the server never holds a client's unmasked update; a client's masked update is counted only in the
//! sum; each stage message is taken only from the connection the round's setup went to.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Instant;

use offsite_protocol::{SecAggMessage, SecAggTask, Task, UpdateAck};
use tracing::{info, warn};

use super::{secs, Coordinator, Outgoing, Phase};
use crate::secagg::{default_neighbours, default_threshold, length, unflatten, SecAggParams, SecAggServer, Stage};
use crate::strategy::ClientUpdate;
use crate::{FedError, Params, SecureAggregationConfig};

/// The secure-aggregation part of a round under way.
pub(super) struct Secure {
    server: Option<SecAggServer>,
    /// Participant index → (client, connection).
    members: Vec<(String, u64)>,
    stage: Stage,
    /// Indices whose message of this stage is still awaited.
    waiting: BTreeSet<u32>,
    /// The task, sent once the shares are out.
    task: Arc<Task>,
    /// (training loss, weight) of each masked update taken.
    losses: BTreeMap<u32, (f64, f64)>,
}

impl std::fmt::Debug for Secure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secure")
            .field("members", &self.members.len())
            .field("stage", &self.stage)
            .field("waiting", &self.waiting.len())
            .finish()
    }
}

/// Checks at start-up: the settings, and that the strategy can run on a sum.
pub(super) fn check(
    config: &SecureAggregationConfig,
    min_clients: usize,
    strategy: &dyn crate::Strategy,
) -> Result<(), FedError> {
    let bad = |m: String| Err(FedError::Config(format!("[federation.secure_aggregation] {m}")));
    if min_clients < 3 {
        return bad(format!(
            "needs min_clients ≥ 3 (it is {min_clients}): with fewer, the sum tells each client the others' updates"
        ));
    }
    if strategy.needs_single_updates() {
        return bad(format!(
            "cannot run with {}: a robust rule needs each client's update and the server sees only their sum \
             (use fedavg, fedprox or a server optimizer)",
            strategy.name()
        ));
    }
    if !(config.clip > 0.0 && config.clip.is_finite()) {
        return bad(format!("clip {} must be > 0", config.clip));
    }
    if config.stage_timeout_s.is_nan() || config.stage_timeout_s < 0.0 {
        return bad(format!("stage_timeout_s {} must be ≥ 0", config.stage_timeout_s));
    }
    Ok(())
}

impl Coordinator {
    /// Opens the secure part of round `round` for `clients` (client, connection): each gets its setup; the task
    /// waits in the round until the shares are out.
    pub(super) fn open_secure(
        &mut self,
        config: &SecureAggregationConfig,
        mut task: Task,
        clients: &BTreeMap<String, u64>,
        max_examples: u64,
    ) -> Result<Secure, FedError> {
        let n = clients.len() as u32;
        let neighbours = match config.neighbours {
            0 => default_neighbours(n),
            k => k.min(n.saturating_sub(1)),
        };
        let threshold = match config.threshold {
            0 => default_threshold(neighbours),
            t => t,
        };
        let dp = self.strategy.client_dp();
        let noise_std = match dp {
            Some(d) if d.noise_at_clients => d.noise_multiplier * d.clip_norm / f64::from(n).sqrt(),
            _ => 0.0,
        };
        task.secagg = Some(SecAggTask {
            // Central DP averages with equal weights.
            max_examples: if dp.is_some() { 0 } else { max_examples },
            max_norm: dp
                .map(|d| d.clip_norm)
                .or(self.config.max_update_norm.filter(|m| m.is_finite()))
                .unwrap_or(0.0),
            noise_std,
        });
        let params = SecAggParams {
            round: task.round,
            participants: n,
            neighbours,
            threshold,
            // Public: it only fixes who masks with whom.
            graph_seed: self.config.seed ^ task.round.rotate_left(32) ^ u64::from(self.attempt),
            clip: config.clip,
            length: length(&self.state.global),
        };
        let server = SecAggServer::new(params).map_err(|e| FedError::Config(e.to_string()))?;
        let members: Vec<(String, u64)> = clients.iter().map(|(c, &conn)| (c.clone(), conn)).collect();
        for (i, (client, conn)) in members.iter().enumerate() {
            let setup = SecAggMessage::Setup(server.setup(i as u32));
            self.send(client, Some(*conn), Outgoing::SecAgg(setup));
        }
        info!(
            round = task.round,
            clients = n,
            neighbours,
            threshold,
            "secure aggregation: keys asked for"
        );
        Ok(Secure {
            server: Some(server),
            waiting: (0..n).collect(),
            members,
            stage: Stage::Keys,
            task: Arc::new(task),
            losses: BTreeMap::new(),
        })
    }

    /// A stage message from a client of the round.
    pub(super) fn on_secagg(
        &mut self,
        client: String,
        conn: u64,
        msg: SecAggMessage,
        now: Instant,
    ) -> Result<(), FedError> {
        let Phase::Running(r) = &mut self.phase else {
            warn!(%client, kind = msg.kind(), "secure-aggregation message between rounds; ignored");
            return Ok(());
        };
        let round = r.number;
        let Some(s) = r.secure.as_mut() else {
            warn!(round, %client, kind = msg.kind(), "secure-aggregation message in a plain round; ignored");
            return Ok(());
        };
        let Some(i) = s.members.iter().position(|m| m.0 == client && m.1 == conn) else {
            warn!(round, %client, kind = msg.kind(), "secure-aggregation message from outside the round; ignored");
            return Ok(());
        };
        let i = i as u32;
        if !s.waiting.remove(&i) {
            warn!(round, %client, kind = msg.kind(), "secure-aggregation message not awaited; ignored");
            return Ok(());
        }
        let server = s.server.as_mut().expect("a running secure round holds its server");
        let taken = match (s.stage, msg) {
            (Stage::Keys, SecAggMessage::Keys(m)) => server.keys(i, m),
            (Stage::Shares, SecAggMessage::Shares(m)) => server.shares(i, m),
            (Stage::Masked, SecAggMessage::Masked(m)) => {
                r.pending.remove(&client);
                let (loss, weight) = (m.train_loss, m.weight);
                let taken = server.masked(i, m);
                if taken.is_ok() {
                    s.losses.insert(i, (loss, weight));
                }
                taken
            }
            (Stage::Reveal, SecAggMessage::Reveal(m)) => server.reveal(i, m),
            (stage, m) => Err(crate::SecAggError::Client {
                index: i,
                reason: format!("{} at the {stage:?} stage", m.kind()),
            }),
        };
        if let Err(e) = taken {
            warn!(round, %client, error = %e, "secure aggregation: client dropped");
            r.rejected += 1;
        }
        if s.waiting.is_empty() {
            self.close_stage(now)?;
        }
        Ok(())
    }

    /// A client of a secure round left: it is awaited no more.
    pub(super) fn secure_departure(&mut self, client: &str, conn: u64, now: Instant) -> Result<(), FedError> {
        let Phase::Running(r) = &mut self.phase else {
            return Ok(());
        };
        let Some(s) = r.secure.as_mut() else { return Ok(()) };
        let Some(i) = s.members.iter().position(|m| m.0 == client && m.1 == conn) else {
            return Ok(());
        };
        r.pending.remove(client);
        if s.waiting.remove(&(i as u32)) {
            warn!(round = r.number, client, stage = ?s.stage, "client disconnected mid-round");
            if s.waiting.is_empty() {
                self.close_stage(now)?;
            }
        }
        Ok(())
    }

    /// Closes the current stage (everyone answered, or its deadline passed) and opens the next, or sums.
    pub(super) fn close_stage(&mut self, now: Instant) -> Result<(), FedError> {
        let Phase::Running(r) = &mut self.phase else {
            return Ok(());
        };
        let (round, stage_s, deadline_s) = (
            r.number,
            self.config
                .secure_aggregation
                .as_ref()
                .map_or(0.0, |c| c.stage_timeout_s),
            self.config.deadline_s,
        );
        let s = r.secure.as_mut().expect("close_stage runs in secure rounds");
        let server = s.server.as_mut().expect("a running secure round holds its server");
        let mut out: Vec<(u32, SecAggMessage)> = Vec::new();
        let next = match s.stage {
            Stage::Keys => server.close_keys().map(|v| {
                out = v.into_iter().map(|(i, m)| (i, SecAggMessage::Neighbours(m))).collect();
                r.deadline = now + secs(stage_s);
                Stage::Shares
            }),
            Stage::Shares => server.close_shares().map(|v| {
                out = v.into_iter().map(|(i, m)| (i, SecAggMessage::Shares(m))).collect();
                r.deadline = now + secs(deadline_s);
                Stage::Masked
            }),
            Stage::Masked => server.close_masked().map(|v| {
                out = v.into_iter().map(|(i, m)| (i, SecAggMessage::Unmask(m))).collect();
                r.deadline = now + secs(stage_s);
                Stage::Reveal
            }),
            Stage::Reveal => return self.secure_sum(now),
        };
        let next = match next {
            Ok(next) => next,
            Err(e) => {
                warn!(round, error = %e, "secure aggregation failed; repeating the round");
                self.phase = Phase::Waiting { since: now };
                return self.repeat(round, now);
            }
        };
        s.stage = next;
        s.waiting = out.iter().map(|(i, _)| *i).collect();
        let task = (next == Stage::Masked).then(|| s.task.clone());
        if task.is_some() {
            r.pending = out.iter().map(|(i, _)| s.members[*i as usize].clone()).collect();
        }
        let sends: Vec<(String, u64, SecAggMessage)> = out
            .into_iter()
            .map(|(i, m)| {
                let (c, conn) = &s.members[i as usize];
                (c.clone(), *conn, m)
            })
            .collect();
        for (client, conn, m) in sends {
            self.send(&client, Some(conn), Outgoing::SecAgg(m));
            if let Some(t) = &task {
                self.send(&client, Some(conn), Outgoing::Task(t.clone()));
            }
        }
        if let Phase::Running(r) = &self.phase {
            if r.secure.as_ref().is_some_and(|s| s.waiting.is_empty()) {
                // Nobody left to wait for at the new stage.
                return self.close_stage(now);
            }
        }
        Ok(())
    }

    /// Stage 3 closed: the sum becomes the round's one update, and the round closes as a plain one.
    fn secure_sum(&mut self, now: Instant) -> Result<(), FedError> {
        let Phase::Running(r) = &mut self.phase else {
            return Ok(());
        };
        let round = r.number;
        let s = r.secure.as_mut().expect("secure_sum runs in secure rounds");
        let server = s.server.take().expect("a running secure round holds its server");
        let sum = match server.finish() {
            Ok(sum) => sum,
            Err(e) => {
                warn!(round, error = %e, "secure aggregation failed; repeating the round");
                self.phase = Phase::Waiting { since: now };
                return self.repeat(round, now);
            }
        };
        info!(
            round,
            contributors = sum.contributors.len(),
            masks_recovered = sum.recovered,
            error_bound = sum.error_bound,
            "secure aggregation: sum unmasked"
        );
        let delta: Params = unflatten(&self.state.global, &sum.mean).map_err(|e| FedError::Config(e.to_string()))?;
        let cap = s.task.secagg.as_ref().map_or(1, |t| t.max_examples.max(1));
        let noise_var = s.task.secagg.as_ref().map_or(0.0, |t| t.noise_std * t.noise_std);
        let mut acks = Vec::new();
        for &i in &sum.contributors {
            let (client, _) = &s.members[i as usize];
            if let Some(&(loss, weight)) = s.losses.get(&i) {
                r.losses.push((loss, weight));
            }
            self.state.clients.entry(client.clone()).or_default().accepted += 1;
            acks.push(client.clone());
        }
        r.accepted.push(ClientUpdate {
            client: "secure-sum".into(),
            num_examples: ((sum.weight * cap as f64).round() as u64).max(1),
            delta,
            contributors: sum.contributors.len(),
            noise_var: noise_var * sum.contributors.len() as f64,
        });
        r.masks_recovered = Some(sum.recovered);
        for client in acks {
            let ack = UpdateAck {
                round,
                accepted: true,
                reason: None,
            };
            self.send(&client, None, Outgoing::Ack(ack));
        }
        self.close_round(now)
    }
}

#[cfg(test)]
mod tests;
