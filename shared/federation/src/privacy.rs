//! Central differential privacy as a strategy wrapper (DP-FedAvg, McMahan et al. 2018, in Flower's server-side
//! fixed-clipping form): every client delta is clipped to an L2 norm C, the clipped deltas are averaged with equal
//! weights, and Gaussian noise of standard deviation z·C/n is added to the mean before the wrapped strategy applies
//! it. A Rényi-DP accountant for the sampled Gaussian mechanism (Mironov et al. 2019, integer orders) tracks what
//! the rounds spent; (ε, δ) follows from RDP by Balle et al. 2020, Theorem 21 (as Opacus converts).
//!
//! The noise comes from the operating system's random generator, fresh each round: a noise seeded from anything a
//! client can learn (the federation seed travels in every task) could be regenerated and subtracted. As in Flower,
//! the noise is scaled by the number of updates received and the sampling rate is the share of ready clients sent
//! a task; the accountant assumes that share is a Poisson sample of the population, which a fixed-size draw only
//! approximates.

use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};

use super::params::{Params, Tensor};
use super::strategy::{clip, ClientDp, ClientUpdate, RoundContext, RoundPlan, Strategy};
use super::FedError;

/// RDP orders the accountant tracks: the integers 2..=256.
const ORDERS: std::ops::RangeInclusive<u32> = 2..=256;

/// The `[privacy]` table of a federation config: central DP on the server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrivacyConfig {
    /// C: every client delta is clipped to this L2 norm (the sensitivity of the sum).
    pub clip_norm: f64,
    /// z: the noise's standard deviation on the sum, in units of C. Give this or `target_epsilon`.
    #[serde(default)]
    pub noise_multiplier: Option<f64>,
    /// The ε the whole federation may spend: z is solved so that `[federation] rounds` rounds at `[federation]
    /// fraction` spend it; the federation also stops before exceeding it.
    #[serde(default)]
    pub target_epsilon: Option<f64>,
    /// δ of the (ε, δ) guarantee.
    #[serde(default = "delta")]
    pub delta: f64,
    /// Who adds the noise: `"server"` (to the sum, central DP), or `"clients"` (distributed DP, with secure
    /// aggregation only: each of a round's n sampled clients adds noise of standard deviation z·C/√n to its clipped
    /// delta, and the server adds what the clients that dropped out did not, so the sum carries z·C either way).
    #[serde(default)]
    pub noise: NoiseSite,
}

/// Where the DP noise is added.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NoiseSite {
    /// By the server, to the sum.
    #[default]
    Server,
    /// By the clients, each its share (needs secure aggregation).
    Clients,
}

fn delta() -> f64 {
    1e-5
}

impl PrivacyConfig {
    /// The noise multiplier: given, or the smallest (to 0.1%) with which `rounds` rounds at sampling rate
    /// `fraction` spend at most `target_epsilon`.
    pub fn noise_multiplier(&self, rounds: u64, fraction: f64) -> Result<f64, FedError> {
        let bad = |m: String| Err(FedError::Config(format!("[privacy] {m}")));
        if !(self.clip_norm > 0.0 && self.clip_norm.is_finite()) {
            return bad(format!("clip_norm {} must be > 0", self.clip_norm));
        }
        if !(self.delta > 0.0 && self.delta < 1.0) {
            return bad(format!("delta {} must be in (0, 1)", self.delta));
        }
        match (self.noise_multiplier, self.target_epsilon) {
            (Some(z), None) if z > 0.0 && z.is_finite() => Ok(z),
            (Some(z), None) => bad(format!("noise_multiplier {z} must be > 0")),
            (None, Some(eps)) if eps > 0.0 && eps.is_finite() => {
                let spent = |z: f64| Accountant::new().with_rounds(fraction, z, rounds).epsilon(self.delta);
                let (mut lo, mut hi) = (0.01, 1.0);
                while spent(hi) > eps {
                    hi *= 2.0;
                    if hi > 1e6 {
                        return bad(format!("no noise multiplier reaches ε = {eps}"));
                    }
                }
                while hi - lo > 1e-3 * hi {
                    let mid = 0.5 * (lo + hi);
                    if spent(mid) > eps {
                        lo = mid;
                    } else {
                        hi = mid;
                    }
                }
                Ok(hi)
            }
            (None, Some(eps)) => bad(format!("target_epsilon {eps} must be > 0")),
            _ => bad("give exactly one of noise_multiplier and target_epsilon".into()),
        }
    }
}

/// The expected L2 norm of the noise on a round's mean update, in units of C (the largest norm the mean of clipped
/// deltas can have): z·√d/n for `values` = d noised values and `clients` = n updates (E‖N(0, σ²I_d)‖ ≈ σ√d, with
/// σ = z·C/n). Above 1 the noise outweighs any update the clients could send. It depends on the configuration
/// only, never on the data, so it can be logged without spending privacy.
pub fn noise_to_clip(noise_multiplier: f64, values: usize, clients: usize) -> f64 {
    noise_multiplier * (values as f64).sqrt() / clients.max(1) as f64
}

/// The fewest updates per round with which [`noise_to_clip`] is at most `ratio`: ⌈z·√d/ratio⌉.
pub fn clients_for_noise_to_clip(noise_multiplier: f64, values: usize, ratio: f64) -> u64 {
    (noise_multiplier * (values as f64).sqrt() / ratio).ceil() as u64
}

/// RDP of the composed rounds at each of [`ORDERS`].
#[derive(Debug, Clone, PartialEq)]
pub struct Accountant {
    rdp: Vec<f64>,
}

impl Default for Accountant {
    fn default() -> Self {
        Self::new()
    }
}

impl Accountant {
    /// Nothing spent.
    pub fn new() -> Self {
        Accountant {
            rdp: vec![0.0; ORDERS.count()],
        }
    }

    /// Adds `rounds` rounds of the Gaussian mechanism with noise multiplier `sigma`, each on a random `q` share.
    pub fn with_rounds(mut self, q: f64, sigma: f64, rounds: u64) -> Self {
        for (r, alpha) in self.rdp.iter_mut().zip(ORDERS) {
            *r += rounds as f64 * sampled_gaussian_rdp(q, sigma, alpha);
        }
        self
    }

    /// ε of the (ε, δ) guarantee spent so far: the best order's RDP converted by Balle et al. 2020, Thm. 21:
    /// ε = rdp − (ln δ + ln α)/(α − 1) + ln((α − 1)/α).
    pub fn epsilon(&self, delta: f64) -> f64 {
        self.rdp
            .iter()
            .zip(ORDERS)
            .map(|(&r, a)| {
                let a = a as f64;
                r - (delta.ln() + a.ln()) / (a - 1.0) + ((a - 1.0) / a).ln()
            })
            .filter(|e| !e.is_nan())
            .fold(f64::INFINITY, f64::min)
            .max(0.0)
    }
}

/// ln(e^a + e^b) without overflow.
fn log_add(a: f64, b: f64) -> f64 {
    let (hi, lo) = if a > b { (a, b) } else { (b, a) };
    if lo == f64::NEG_INFINITY {
        return hi;
    }
    hi + (lo - hi).exp().ln_1p()
}

/// ln C(n, k).
fn ln_binomial(n: u32, k: u32) -> f64 {
    (1..=k).map(|i| ((n - k + i) as f64).ln() - (i as f64).ln()).sum()
}

/// RDP at integer order α of the Gaussian mechanism (noise σ·sensitivity) applied to a Poisson sample of rate q:
/// ln(Σₖ C(α,k) (1−q)^(α−k) q^k exp((k² − k)/(2σ²))) / (α − 1) (Mironov, Talwar, Zhang 2019, §3.3); α/(2σ²) for
/// q = 1.
fn sampled_gaussian_rdp(q: f64, sigma: f64, alpha: u32) -> f64 {
    if q <= 0.0 {
        return 0.0;
    }
    if q >= 1.0 {
        return alpha as f64 / (2.0 * sigma * sigma);
    }
    let log_a = (0..=alpha).fold(f64::NEG_INFINITY, |acc, k| {
        let kf = k as f64;
        let term = ln_binomial(alpha, k)
            + (alpha - k) as f64 * (1.0 - q).ln()
            + kf * q.ln()
            + (kf * kf - kf) / (2.0 * sigma * sigma);
        log_add(acc, term)
    });
    log_a / (alpha as f64 - 1.0)
}

/// The RDP vector in the strategy state under this name (so a restarted server keeps what was spent).
const STATE_KEY: &str = "privacy.rdp";

/// Central DP around another strategy: clip, equal-weight mean, Gaussian noise, then the wrapped strategy applies
/// the noised mean as its one update.
pub struct DpStrategy {
    inner: Box<dyn Strategy>,
    clip_norm: f64,
    noise_multiplier: f64,
    delta: f64,
    budget: Option<f64>,
    noise: NoiseSite,
    spent: Accountant,
    /// Rounds aggregated.
    rounds: u64,
    /// The sampling rate of the round being configured or run (clients sampled / clients ready); the configured
    /// fraction before the first round.
    q: f64,
}

impl DpStrategy {
    /// Wraps `inner` with `config`'s clipping and noise (`noise_multiplier` already resolved), clients sampled at
    /// `fraction` of the ready ones.
    pub fn new(inner: Box<dyn Strategy>, config: &PrivacyConfig, noise_multiplier: f64, fraction: f64) -> Self {
        DpStrategy {
            inner,
            clip_norm: config.clip_norm,
            noise_multiplier,
            delta: config.delta,
            budget: config.target_epsilon,
            noise: config.noise,
            spent: Accountant::new(),
            rounds: 0,
            q: fraction.clamp(0.0, 1.0),
        }
    }
}

impl Strategy for DpStrategy {
    fn name(&self) -> String {
        format!(
            "dp(C={}, z={:.3})+{}",
            self.clip_norm,
            self.noise_multiplier,
            self.inner.name()
        )
    }
    fn configure_round(&mut self, ctx: &RoundContext<'_>) -> RoundPlan {
        let plan = self.inner.configure_round(ctx);
        self.q = (plan.clients.len() as f64 / ctx.ready.len().max(1) as f64).min(1.0);
        plan
    }
    fn aggregate(&mut self, global: &Params, updates: &[ClientUpdate]) -> Result<Params, FedError> {
        // A secure sum stands for its contributors (each clipped by its client, weighted equally).
        let n: usize = updates.iter().map(|u| u.contributors).sum();
        if n == 0 {
            return Err(FedError::Config("no updates to aggregate".into()));
        }
        let clipped: Vec<ClientUpdate> = updates.iter().map(|u| clip(u, self.clip_norm)).collect();
        // The sum must carry noise of variance (z·C)²; what the clients added already counts.
        let target = (self.noise_multiplier * self.clip_norm).powi(2);
        let present: f64 = updates.iter().map(|u| u.noise_var).sum();
        let std = (target - present).max(0.0).sqrt() / n as f64;
        let normal = Normal::new(0.0, std).map_err(|e| FedError::Config(format!("noise: {e}")))?;
        let mut seed = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed)
            .map_err(|_| FedError::Config("the system random generator failed; no noise, no round".into()))?;
        let mut rng = StdRng::from_seed(seed);
        let noised: Params = global
            .iter()
            .map(|(name, g)| {
                let values = (0..g.values.len())
                    .map(|i| {
                        let sum: f64 = clipped
                            .iter()
                            .map(|u| u.contributors as f64 * u.delta[name].values[i] as f64)
                            .sum();
                        (sum / n as f64 + normal.sample(&mut rng)) as f32
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
            .collect();
        let one = ClientUpdate::single("dp-mean", 1, noised);
        let next = self.inner.aggregate(global, std::slice::from_ref(&one))?;
        self.spent = std::mem::take(&mut self.spent).with_rounds(self.q, self.noise_multiplier, 1);
        self.rounds += 1;
        Ok(next)
    }
    fn state(&self) -> Params {
        let mut state = self.inner.state();
        let mut rdp = self.spent.rdp.iter().map(|&r| r as f32).collect::<Vec<_>>();
        rdp.push(self.rounds as f32);
        state.insert(
            STATE_KEY.into(),
            Tensor {
                shape: vec![rdp.len()],
                values: rdp,
            },
        );
        state
    }
    fn restore(&mut self, mut state: Params) -> Result<(), FedError> {
        match state.remove(STATE_KEY) {
            Some(t) if t.values.len() == ORDERS.count() + 1 => {
                let (rdp, rounds) = t.values.split_at(ORDERS.count());
                self.spent.rdp = rdp.iter().map(|&r| r as f64).collect();
                self.rounds = rounds[0] as u64;
            }
            Some(_) => return Err(FedError::Config("the saved privacy state has the wrong size".into())),
            None => self.spent = Accountant::new(),
        }
        self.inner.restore(state)
    }
    fn privacy_spent(&self) -> Option<(f64, f64)> {
        Some((self.spent.epsilon(self.delta), self.delta))
    }
    fn client_dp(&self) -> Option<ClientDp> {
        Some(ClientDp {
            clip_norm: self.clip_norm,
            noise_multiplier: self.noise_multiplier,
            noise_at_clients: self.noise == NoiseSite::Clients,
        })
    }
    fn exhausted(&self) -> Option<String> {
        let budget = self.budget?;
        let next = self
            .spent
            .clone()
            .with_rounds(self.q, self.noise_multiplier, 1)
            .epsilon(self.delta);
        (next > budget * (1.0 + 1e-9))
            .then(|| format!("one more round would spend ε = {next:.3} > the budget {budget}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ε from Opacus 1.5.2's `compute_rdp` + `get_privacy_spent` (opacus/accountants/analysis/rdp.py, run with
    /// orders 2..=256): (q, σ, steps, δ, ε).
    const OPACUS: [(f64, f64, u64, f64, f64); 6] = [
        (0.01, 1.1, 1000, 1e-5, 1.725290818044953),
        (1.0, 2.0, 5, 1e-5, 5.377728336819822),
        (0.1, 4.0, 100, 1e-5, 1.0817024008569973),
        (0.5, 0.8, 20, 1e-6, 25.71061938527586),
        (1.0, 1.4, 5, 1e-5, 8.189902445158197),
        (0.02, 0.6, 3000, 1e-5, 28.17213754153043),
    ];

    #[test]
    fn the_accountant_matches_opacus() {
        for (q, sigma, steps, delta, want) in OPACUS {
            let got = Accountant::new().with_rounds(q, sigma, steps).epsilon(delta);
            assert!(
                (got - want).abs() < 1e-6 * want,
                "q {q} σ {sigma} steps {steps}: {got} vs Opacus {want}"
            );
        }
        // Composition: two halves spend what the whole does.
        let halves = Accountant::new().with_rounds(0.1, 4.0, 50).with_rounds(0.1, 4.0, 50);
        assert!((halves.epsilon(1e-5) - 1.0817024008569973).abs() < 1e-6);
    }

    #[test]
    fn a_target_epsilon_gives_the_noise_that_spends_it() {
        let c = PrivacyConfig {
            clip_norm: 1.0,
            noise_multiplier: None,
            target_epsilon: Some(8.189902445158197),
            delta: 1e-5,
            noise: Default::default(),
        };
        let z = c.noise_multiplier(5, 1.0).unwrap();
        assert!((z - 1.4).abs() < 0.01, "{z}");
        let both = PrivacyConfig {
            noise_multiplier: Some(1.0),
            ..c.clone()
        };
        assert!(both.noise_multiplier(5, 1.0).is_err(), "one of the two, not both");
    }

    fn update(client: &str, values: Vec<f32>, n: u64) -> ClientUpdate {
        let delta = Params::from([(
            "w".to_string(),
            Tensor {
                shape: vec![values.len()],
                values,
            },
        )]);
        ClientUpdate::single(client, n, delta)
    }

    struct Apply;
    impl Strategy for Apply {
        fn name(&self) -> String {
            "apply".into()
        }
        fn aggregate(&mut self, global: &Params, updates: &[ClientUpdate]) -> Result<Params, FedError> {
            assert_eq!(updates.len(), 1, "the wrapped strategy sees the one private mean");
            Ok(crate::params::add(global, &updates[0].delta))
        }
    }

    fn dp(z: f64, budget: Option<f64>) -> DpStrategy {
        let config = PrivacyConfig {
            clip_norm: 1.0,
            noise_multiplier: Some(z),
            target_epsilon: budget,
            delta: 1e-5,
            noise: Default::default(),
        };
        DpStrategy::new(Box::new(Apply), &config, z, 1.0)
    }

    #[test]
    fn deltas_are_clipped_averaged_with_equal_weights_and_noised_by_z_c_over_n() {
        let global = Params::from([(
            "w".to_string(),
            Tensor {
                shape: vec![2],
                values: vec![0.0, 0.0],
            },
        )]);
        // Norms 5 and 0.5: the first is clipped to 1 ([0.6, 0.8]); example counts do not weigh.
        let updates = [update("a", vec![3.0, 4.0], 1000), update("b", vec![0.5, 0.0], 1)];
        let mut s = dp(1e-9, None);
        let out = s.aggregate(&global, &updates).unwrap();
        let want = [(0.6 + 0.5) / 2.0, (0.8 + 0.0) / 2.0];
        for (g, w) in out["w"].values.iter().zip(want) {
            assert!((*g as f64 - w).abs() < 1e-6, "{g} vs {w}");
        }
        // The noise: over many coordinates its spread is z·C/n.
        let d = 20_000;
        let global = Params::from([(
            "w".to_string(),
            Tensor {
                shape: vec![d],
                values: vec![0.0; d],
            },
        )]);
        let zeros = [
            update("a", vec![0.0; d], 1),
            update("b", vec![0.0; d], 1),
            update("c", vec![0.0; d], 1),
            update("d", vec![0.0; d], 1),
        ];
        let out = dp(2.0, None).aggregate(&global, &zeros).unwrap();
        let v = &out["w"].values;
        let var = v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / d as f64;
        assert!((var.sqrt() - 0.5).abs() < 0.01, "std {} vs z·C/n = 0.5", var.sqrt());
    }

    #[test]
    fn the_noise_to_clip_ratio_is_the_norm_of_the_noise_the_strategy_adds() {
        let (d, n, z) = (40_000, 5, 1.5);
        let global = Params::from([(
            "w".to_string(),
            Tensor {
                shape: vec![d],
                values: vec![0.0; d],
            },
        )]);
        let zeros: Vec<_> = (0..n).map(|i| update(&format!("c{i}"), vec![0.0; d], 1)).collect();
        let out = dp(z, None).aggregate(&global, &zeros).unwrap();
        let norm = out["w"].values.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
        let want = noise_to_clip(z, d, n);
        assert!((want - 60.0).abs() < 1e-9, "z·√d/n = 1.5·200/5 = 60, got {want}");
        assert!(
            (norm / want - 1.0).abs() < 0.02,
            "noise norm {norm} vs predicted {want} (C = 1)"
        );
        let need = clients_for_noise_to_clip(z, d, 1.0);
        assert_eq!(need, 300);
        assert!(noise_to_clip(z, d, need as usize) <= 1.0 && noise_to_clip(z, d, need as usize - 1) > 1.0);
    }

    #[test]
    fn the_spent_budget_survives_a_restart_and_stops_the_federation() {
        let global = Params::from([(
            "w".to_string(),
            Tensor {
                shape: vec![1],
                values: vec![0.0],
            },
        )]);
        let ups = [update("a", vec![0.1], 1)];
        // z = 1.4 at q = 1 spends ε ≈ 8.19 in five rounds (the Opacus row above): a budget of 8.19 allows five.
        let mut s = dp(1.4, Some(8.19));
        let mut rounds = 0;
        while s.exhausted().is_none() {
            s.aggregate(&global, &ups).unwrap();
            rounds += 1;
            assert!(rounds < 10);
        }
        assert_eq!(rounds, 5);
        let (eps, delta) = s.privacy_spent().unwrap();
        assert!((eps - 8.189902445158197).abs() < 1e-3 && delta == 1e-5, "{eps}");
        let mut again = dp(1.4, Some(8.19));
        again.restore(s.state()).unwrap();
        assert!((again.privacy_spent().unwrap().0 - eps).abs() < 1e-4);
        assert!(
            again.exhausted().is_some(),
            "a restarted server knows the budget is spent"
        );
    }
}
