//! Strategies behind one open, pure trait (no IO, no async), with Flower's split: `configure_round` picks a round's
//! clients and their local settings, `aggregate` turns the accepted updates into the next global state. Every
//! strategy works on client deltas (local − global); server optimizers keep their state by parameter name so it can
//! be saved and restored. FedProx and norm bounding wrap another strategy.

use offsite_protocol::TrainConfig;
use serde::{Deserialize, Serialize};

use super::params::{l2_norm, Params, Tensor};
use super::round::sample_clients;
use super::FedError;

/// One accepted client update.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientUpdate {
    /// Who sent it.
    pub client: String,
    /// Its examples (the FedAvg weight).
    pub num_examples: u64,
    /// Local minus global, with the global state's names and shapes.
    pub delta: Params,
    /// Clients whose deltas this is the weighted mean of: 1, or the contributors of a secure sum.
    pub contributors: usize,
    /// Variance, per coordinate, of Gaussian noise already in the sum of the contributors' deltas (the clients'
    /// own noise under distributed differential privacy); 0 otherwise.
    pub noise_var: f64,
}

impl ClientUpdate {
    /// One client's update.
    pub fn single(client: &str, num_examples: u64, delta: Params) -> Self {
        ClientUpdate {
            client: client.into(),
            num_examples,
            delta,
            contributors: 1,
            noise_var: 0.0,
        }
    }
}

/// What each client does itself when the server sees only a secure sum of the updates: central DP's clipping and,
/// with the noise at the clients, its share of the noise.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClientDp {
    /// C: the L2 norm every delta is clipped to.
    pub clip_norm: f64,
    /// z: the noise on the sum has standard deviation z·C.
    pub noise_multiplier: f64,
    /// Whether the clients add the noise (each its share; the server tops up what dropped clients did not add).
    pub noise_at_clients: bool,
}

/// What a strategy knows when it configures a round.
#[derive(Debug, Clone, Copy)]
pub struct RoundContext<'a> {
    /// The round being configured (from 1; a repeated round keeps its number).
    pub round: u64,
    /// Times this round has been tried before (0 the first time).
    pub attempt: u32,
    /// The clients ready for a task, sorted.
    pub ready: &'a [String],
    /// `[federation] fraction`: the share of the ready clients to sample.
    pub fraction: f64,
    /// `[federation] min_clients`.
    pub min_clients: usize,
    /// `[federation] seed`.
    pub seed: u64,
    /// `[local]`: the clients' training settings.
    pub local: &'a TrainConfig,
}

/// A configured round: who trains, and how.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundPlan {
    /// The clients sent a task (a subset of the ready ones).
    pub clients: Vec<String>,
    /// Their local training settings (the seed already mixed with the round).
    pub settings: TrainConfig,
    /// FedProx proximal weight μ (0 = plain local training).
    pub proximal_mu: f64,
}

impl RoundPlan {
    /// The default plan: `max(min_clients, ⌈fraction·ready⌉)` ready clients sampled from the seed, the round and the
    /// attempt (a repeated round draws again), training as `[local]` says, no proximal term.
    pub fn sampled(ctx: &RoundContext<'_>) -> Self {
        let draw = ctx.round.wrapping_add((ctx.attempt as u64) << 32);
        RoundPlan {
            clients: sample_clients(ctx.ready, ctx.fraction, ctx.min_clients, ctx.seed, draw),
            settings: ctx.local.for_round(ctx.seed, ctx.round),
            proximal_mu: 0.0,
        }
    }
}

/// Decides each round: which clients train and how (`configure_round`), and how their updates become the next
/// global state (`aggregate`). Implement it to plug a strategy into the server (`Coordinator::new` takes a
/// `Box<dyn Strategy>`).
pub trait Strategy: Send {
    /// A short name for logs.
    fn name(&self) -> String;
    /// The clients and settings of a round; by default [`RoundPlan::sampled`].
    fn configure_round(&mut self, ctx: &RoundContext<'_>) -> RoundPlan {
        RoundPlan::sampled(ctx)
    }
    /// The next global state from `global` and at least one update (names and shapes already checked).
    fn aggregate(&mut self, global: &Params, updates: &[ClientUpdate]) -> Result<Params, FedError>;
    /// Server-side optimizer state to persist (empty for stateless strategies).
    fn state(&self) -> Params {
        Params::new()
    }
    /// Restores what [`Strategy::state`] returned.
    fn restore(&mut self, state: Params) -> Result<(), FedError> {
        if state.is_empty() {
            Ok(())
        } else {
            Err(FedError::Config(format!("{} keeps no server state", self.name())))
        }
    }
    /// The privacy spent by the rounds aggregated so far, (ε, δ), for strategies that account for it.
    fn privacy_spent(&self) -> Option<(f64, f64)> {
        None
    }
    /// Why no further round may run (it would exceed a privacy budget), if so.
    fn exhausted(&self) -> Option<String> {
        None
    }
    /// Whether aggregating needs each client's own update (the robust rules): such a strategy cannot run on a secure
    /// sum.
    fn needs_single_updates(&self) -> bool {
        false
    }
    /// Central DP's clipping and noise, for the clients to apply under secure aggregation (`None`: no DP).
    fn client_dp(&self) -> Option<ClientDp> {
        None
    }
}

/// `u` with its delta scaled down to L2 norm `bound` when it is longer.
pub(crate) fn clip(u: &ClientUpdate, bound: f64) -> ClientUpdate {
    let norm = l2_norm(&u.delta);
    let mut u = u.clone();
    if norm > bound {
        let s = (bound / norm) as f32;
        for t in u.delta.values_mut() {
            t.values.iter_mut().for_each(|v| *v *= s);
        }
    }
    u
}

/// The `[strategy]` table of a server config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum StrategyConfig {
    /// Mean of the deltas weighted by examples (McMahan et al. 2017).
    FedAvg {
        /// Clip every delta to this L2 norm before aggregating (norm bounding).
        #[serde(default)]
        norm_bound: Option<f64>,
    },
    /// FedAvg on the server; clients add the proximal term μ/2·‖w − w_global‖² (Li et al. 2020).
    FedProx {
        /// The proximal weight μ sent to clients.
        mu: f64,
        /// Clip every delta to this L2 norm before aggregating.
        #[serde(default)]
        norm_bound: Option<f64>,
    },
    /// Server Adam on the mean delta (Reddi et al. 2021, "Adaptive Federated Optimization").
    FedAdam(FedOptConfig),
    /// Server Yogi on the mean delta.
    FedYogi(FedOptConfig),
    /// Server Adagrad on the mean delta.
    FedAdagrad(FedOptConfig),
    /// Coordinate-wise median of the deltas.
    Median {
        /// Clip every delta to this L2 norm first.
        #[serde(default)]
        norm_bound: Option<f64>,
    },
    /// Coordinate-wise mean after dropping the `trim` fraction of largest and of smallest values.
    TrimmedMean {
        /// Fraction trimmed at each end, in [0, 0.5).
        trim: f64,
        /// Clip every delta to this L2 norm first.
        #[serde(default)]
        norm_bound: Option<f64>,
    },
    /// The delta closest to its n − f − 2 nearest neighbours (Blanchard et al. 2017).
    Krum {
        /// Byzantine clients tolerated.
        byzantine: usize,
        /// Clip every delta to this L2 norm first.
        #[serde(default)]
        norm_bound: Option<f64>,
    },
}

/// Settings of the adaptive server optimizers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FedOptConfig {
    /// Server learning rate η.
    pub server_lr: f64,
    /// First-moment decay β₁ (0.9).
    #[serde(default = "beta1")]
    pub beta1: f64,
    /// Second-moment decay β₂ (0.99).
    #[serde(default = "beta2")]
    pub beta2: f64,
    /// Adaptivity τ (1e-3).
    #[serde(default = "tau")]
    pub tau: f64,
    /// Clip every delta to this L2 norm first.
    #[serde(default)]
    pub norm_bound: Option<f64>,
}

fn beta1() -> f64 {
    0.9
}
fn beta2() -> f64 {
    0.99
}
fn tau() -> f64 {
    1e-3
}

impl StrategyConfig {
    /// Builds the strategy, wrapped in norm bounding when asked.
    pub fn build(&self) -> Result<Box<dyn Strategy>, FedError> {
        let (inner, bound): (Box<dyn Strategy>, Option<f64>) = match self {
            StrategyConfig::FedAvg { norm_bound } => (Box::new(FedAvg), *norm_bound),
            StrategyConfig::FedProx { mu, norm_bound } => (Box::new(FedProx::new(*mu, Box::new(FedAvg))?), *norm_bound),
            StrategyConfig::FedAdam(c) => (Box::new(FedOpt::new(Adaptive::Adam, c)?), c.norm_bound),
            StrategyConfig::FedYogi(c) => (Box::new(FedOpt::new(Adaptive::Yogi, c)?), c.norm_bound),
            StrategyConfig::FedAdagrad(c) => (Box::new(FedOpt::new(Adaptive::Adagrad, c)?), c.norm_bound),
            StrategyConfig::Median { norm_bound } => (Box::new(Median), *norm_bound),
            StrategyConfig::TrimmedMean { trim, norm_bound } => {
                if !(0.0..0.5).contains(trim) {
                    return Err(FedError::Config(format!("trimmedmean trim {trim} must be in [0, 0.5)")));
                }
                (Box::new(TrimmedMean { trim: *trim }), *norm_bound)
            }
            StrategyConfig::Krum { byzantine, norm_bound } => (Box::new(Krum { byzantine: *byzantine }), *norm_bound),
        };
        Ok(match bound {
            Some(b) if !(b > 0.0 && b.is_finite()) => {
                return Err(FedError::Config(format!("norm_bound {b} must be > 0")))
            }
            Some(b) => Box::new(NormBound { bound: b, inner }),
            None => inner,
        })
    }
}

/// Applies `f` to each coordinate's column of client values (in update order), giving the aggregated delta.
fn per_coordinate(global: &Params, updates: &[ClientUpdate], f: &mut dyn FnMut(&mut [f32]) -> f32) -> Params {
    let mut column = vec![0f32; updates.len()];
    global
        .iter()
        .map(|(name, g)| {
            let values = (0..g.values.len())
                .map(|i| {
                    for (c, u) in column.iter_mut().zip(updates) {
                        *c = u.delta[name].values[i];
                    }
                    f(&mut column)
                })
                .collect();
            (
                name.clone(),
                Tensor {
                    shape: g.shape.clone(),
                    values,
                },
            )
        })
        .collect()
}

fn apply_delta(global: &Params, delta: &Params) -> Params {
    super::params::add(global, delta)
}

/// Example-weighted mean of the deltas (f64 accumulation).
pub(crate) fn weighted_mean(global: &Params, updates: &[ClientUpdate]) -> Result<Params, FedError> {
    // Summed in f64: a sum of u64 claims could overflow.
    let total: f64 = updates.iter().map(|u| u.num_examples as f64).sum();
    if total == 0.0 {
        return Err(FedError::Config("the updates hold no examples".into()));
    }
    let weights: Vec<f64> = updates.iter().map(|u| u.num_examples as f64 / total).collect();
    Ok(global
        .iter()
        .map(|(name, g)| {
            let values = (0..g.values.len())
                .map(|i| {
                    updates
                        .iter()
                        .zip(&weights)
                        .map(|(u, w)| u.delta[name].values[i] as f64 * w)
                        .sum::<f64>() as f32
                })
                .collect();
            (
                name.clone(),
                Tensor {
                    shape: g.shape.clone(),
                    values,
                },
            )
        })
        .collect())
}

/// FedProx (Li et al. 2020): the inner strategy's rounds, with clients adding μ/2·‖w − w_global‖² to their loss.
pub struct FedProx {
    mu: f64,
    inner: Box<dyn Strategy>,
}

impl FedProx {
    /// Wraps `inner`; μ must be finite and ≥ 0.
    pub fn new(mu: f64, inner: Box<dyn Strategy>) -> Result<Self, FedError> {
        if !(mu >= 0.0 && mu.is_finite()) {
            return Err(FedError::Config(format!("fedprox mu {mu} must be ≥ 0")));
        }
        Ok(FedProx { mu, inner })
    }
}

impl Strategy for FedProx {
    fn name(&self) -> String {
        format!("fedprox({})+{}", self.mu, self.inner.name())
    }
    fn configure_round(&mut self, ctx: &RoundContext<'_>) -> RoundPlan {
        RoundPlan {
            proximal_mu: self.mu,
            ..self.inner.configure_round(ctx)
        }
    }
    fn aggregate(&mut self, global: &Params, updates: &[ClientUpdate]) -> Result<Params, FedError> {
        self.inner.aggregate(global, updates)
    }
    fn state(&self) -> Params {
        self.inner.state()
    }
    fn restore(&mut self, state: Params) -> Result<(), FedError> {
        self.inner.restore(state)
    }
    fn needs_single_updates(&self) -> bool {
        self.inner.needs_single_updates()
    }
    fn client_dp(&self) -> Option<ClientDp> {
        self.inner.client_dp()
    }
}

/// FedAvg: global + Σ nᵢΔᵢ / Σ nᵢ.
struct FedAvg;

impl Strategy for FedAvg {
    fn name(&self) -> String {
        "fedavg".into()
    }
    fn aggregate(&mut self, global: &Params, updates: &[ClientUpdate]) -> Result<Params, FedError> {
        Ok(apply_delta(global, &weighted_mean(global, updates)?))
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Adaptive {
    Adam,
    Yogi,
    Adagrad,
}

/// FedAdam / FedYogi / FedAdagrad: Δ = weighted mean delta; m ← β₁m + (1−β₁)Δ; v by the rule; w ← w + η·m/(√v + τ).
/// Moments start at zero (as Flower), without bias correction (as Reddi et al.).
struct FedOpt {
    rule: Adaptive,
    lr: f64,
    beta1: f64,
    beta2: f64,
    tau: f64,
    m: Params,
    v: Params,
}

impl FedOpt {
    fn new(rule: Adaptive, c: &FedOptConfig) -> Result<Self, FedError> {
        let ok = c.server_lr > 0.0 && (0.0..1.0).contains(&c.beta1) && (0.0..1.0).contains(&c.beta2) && c.tau > 0.0;
        if !ok {
            return Err(FedError::Config(format!(
                "server optimizer needs server_lr > 0, β in [0, 1), tau > 0 (got {}, {}, {}, {})",
                c.server_lr, c.beta1, c.beta2, c.tau
            )));
        }
        Ok(FedOpt {
            rule,
            lr: c.server_lr,
            beta1: c.beta1,
            beta2: c.beta2,
            tau: c.tau,
            m: Params::new(),
            v: Params::new(),
        })
    }
}

impl Strategy for FedOpt {
    fn name(&self) -> String {
        format!("fed{:?}", self.rule).to_lowercase()
    }

    fn aggregate(&mut self, global: &Params, updates: &[ClientUpdate]) -> Result<Params, FedError> {
        let delta = weighted_mean(global, updates)?;
        let mut out = Params::new();
        for (name, g) in global {
            let d = &delta[name].values;
            let zeros = || Tensor {
                shape: g.shape.clone(),
                values: vec![0.0; d.len()],
            };
            let m = self.m.entry(name.clone()).or_insert_with(zeros);
            let v = self.v.entry(name.clone()).or_insert_with(zeros);
            if m.values.len() != d.len() || v.values.len() != d.len() {
                return Err(FedError::Shape(format!(
                    "server optimizer state of `{name}` has the wrong size"
                )));
            }
            let mut values = Vec::with_capacity(d.len());
            let moments = m.values.iter_mut().zip(v.values.iter_mut());
            for ((&di, &gi), (mv, vv)) in d.iter().zip(&g.values).zip(moments) {
                let di = di as f64;
                let mi = self.beta1 * *mv as f64 + (1.0 - self.beta1) * di;
                let vprev = *vv as f64;
                let vi = match self.rule {
                    Adaptive::Adam => self.beta2 * vprev + (1.0 - self.beta2) * di * di,
                    Adaptive::Yogi => vprev - (1.0 - self.beta2) * di * di * (vprev - di * di).signum(),
                    Adaptive::Adagrad => vprev + di * di,
                };
                *mv = mi as f32;
                *vv = vi as f32;
                values.push((gi as f64 + self.lr * mi / (vi.sqrt() + self.tau)) as f32);
            }
            out.insert(
                name.clone(),
                Tensor {
                    shape: g.shape.clone(),
                    values,
                },
            );
        }
        Ok(out)
    }

    fn state(&self) -> Params {
        let mut s = Params::new();
        for (prefix, map) in [("m.", &self.m), ("v.", &self.v)] {
            for (k, t) in map {
                s.insert(format!("{prefix}{k}"), t.clone());
            }
        }
        s
    }

    fn restore(&mut self, state: Params) -> Result<(), FedError> {
        self.m.clear();
        self.v.clear();
        for (k, t) in state {
            if let Some(name) = k.strip_prefix("m.") {
                self.m.insert(name.into(), t);
            } else if let Some(name) = k.strip_prefix("v.") {
                self.v.insert(name.into(), t);
            } else {
                return Err(FedError::Config(format!("unknown server optimizer state `{k}`")));
            }
        }
        Ok(())
    }
}

/// Coordinate-wise median (mean of the two middle values for an even count).
struct Median;

impl Strategy for Median {
    fn name(&self) -> String {
        "median".into()
    }
    fn needs_single_updates(&self) -> bool {
        true
    }
    fn aggregate(&mut self, global: &Params, updates: &[ClientUpdate]) -> Result<Params, FedError> {
        let delta = per_coordinate(global, updates, &mut |c| {
            c.sort_by(f32::total_cmp);
            let n = c.len();
            if n % 2 == 1 {
                c[n / 2]
            } else {
                (c[n / 2 - 1] + c[n / 2]) / 2.0
            }
        });
        Ok(apply_delta(global, &delta))
    }
}

/// Coordinate-wise trimmed mean: drops ⌊trim·n⌋ values at each end.
struct TrimmedMean {
    trim: f64,
}

impl Strategy for TrimmedMean {
    fn name(&self) -> String {
        format!("trimmedmean({})", self.trim)
    }
    fn needs_single_updates(&self) -> bool {
        true
    }
    fn aggregate(&mut self, global: &Params, updates: &[ClientUpdate]) -> Result<Params, FedError> {
        let k = (self.trim * updates.len() as f64).floor() as usize;
        let delta = per_coordinate(global, updates, &mut |c| {
            c.sort_by(f32::total_cmp);
            let kept = &c[k..c.len() - k];
            (kept.iter().map(|&x| x as f64).sum::<f64>() / kept.len() as f64) as f32
        });
        Ok(apply_delta(global, &delta))
    }
}

/// Krum: the delta with the smallest sum of squared distances to its n − f − 2 nearest neighbours.
struct Krum {
    byzantine: usize,
}

impl Strategy for Krum {
    fn name(&self) -> String {
        format!("krum(f={})", self.byzantine)
    }
    fn needs_single_updates(&self) -> bool {
        true
    }
    fn aggregate(&mut self, global: &Params, updates: &[ClientUpdate]) -> Result<Params, FedError> {
        let n = updates.len();
        if n < 2 * self.byzantine + 3 {
            return Err(FedError::Config(format!(
                "krum with f = {} needs at least {} updates, got {n}",
                self.byzantine,
                2 * self.byzantine + 3
            )));
        }
        let dist = |a: &Params, b: &Params| -> f64 {
            a.iter()
                .flat_map(|(k, t)| t.values.iter().zip(&b[k].values))
                .map(|(&x, &y)| ((x - y) as f64).powi(2))
                .sum()
        };
        let neighbours = n - self.byzantine - 2;
        let mut best = (f64::INFINITY, 0);
        for i in 0..n {
            let mut d: Vec<f64> = (0..n)
                .filter(|&j| j != i)
                .map(|j| dist(&updates[i].delta, &updates[j].delta))
                .collect();
            d.sort_by(f64::total_cmp);
            let score: f64 = d[..neighbours].iter().sum();
            if score < best.0 {
                best = (score, i);
            }
        }
        tracing::debug!(chosen = %updates[best.1].client, score = best.0, "krum");
        Ok(apply_delta(global, &updates[best.1].delta))
    }
}

/// Norm bounding: scales each delta down to at most `bound` in L2 norm, then runs the inner strategy.
struct NormBound {
    bound: f64,
    inner: Box<dyn Strategy>,
}

impl Strategy for NormBound {
    fn name(&self) -> String {
        format!("{}+normbound({})", self.inner.name(), self.bound)
    }
    fn configure_round(&mut self, ctx: &RoundContext<'_>) -> RoundPlan {
        self.inner.configure_round(ctx)
    }
    fn aggregate(&mut self, global: &Params, updates: &[ClientUpdate]) -> Result<Params, FedError> {
        let clipped: Vec<ClientUpdate> = updates.iter().map(|u| clip(u, self.bound)).collect();
        self.inner.aggregate(global, &clipped)
    }
    fn state(&self) -> Params {
        self.inner.state()
    }
    fn restore(&mut self, state: Params) -> Result<(), FedError> {
        self.inner.restore(state)
    }
    fn needs_single_updates(&self) -> bool {
        self.inner.needs_single_updates()
    }
    fn client_dp(&self) -> Option<ClientDp> {
        self.inner.client_dp()
    }
}

#[cfg(test)]
mod tests;
