//! Whole securely aggregated rounds, with real SecAgg+ clients and dropouts at every stage, against the plain weighted
//! mean computed here from the clients' own deltas.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use offsite_protocol::{SecAggMessage, SecAggTask, TrainConfig};

use crate::coordinator::tests::drain;
use crate::coordinator::{Action, Coordinator, Event, Outgoing, RoundReport};
use crate::params::Tensor;
use crate::secagg::{prepare_update, SecAggClient};
use crate::strategy::StrategyConfig;
use crate::{DpStrategy, FederationConfig, Params, PrivacyConfig, SecureAggregationConfig, Strategy};

const LEN: usize = 3;

fn initial() -> Params {
    Params::from([
        (
            "a".to_string(),
            Tensor {
                shape: vec![2],
                values: vec![1.0, -1.0],
            },
        ),
        (
            "b".to_string(),
            Tensor {
                shape: vec![1],
                values: vec![0.5],
            },
        ),
    ])
}

fn config(min_clients: usize) -> FederationConfig {
    FederationConfig {
        rounds: 1,
        min_clients,
        wait_for_clients_s: 60.0,
        deadline_s: 100.0,
        eval_every: 0,
        seed: 3,
        secure_aggregation: Some(SecureAggregationConfig::default()),
        ..FederationConfig::default()
    }
}

fn fedavg() -> Box<dyn Strategy> {
    toml::from_str::<StrategyConfig>("kind = 'fedavg'")
        .unwrap()
        .build()
        .unwrap()
}

/// When a simulated client stops answering (its connection ends instead).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Leave {
    Never,
    AtSetup,
    AtNeighbours,
    AtTask,
    AtUnmask,
}

struct Fake {
    conn: u64,
    delta: [f32; LEN],
    examples: u64,
    drop: Leave,
    secagg: Option<SecAggClient>,
    gone: bool,
}

struct Fleet {
    clients: BTreeMap<String, Fake>,
    /// The secure task as the clients saw it.
    task: Option<SecAggTask>,
    reports: Vec<RoundReport>,
    accepted_acks: usize,
    rounds_started: usize,
}

fn delta_params(d: &[f32; LEN]) -> Params {
    Params::from([
        (
            "a".to_string(),
            Tensor {
                shape: vec![2],
                values: d[..2].to_vec(),
            },
        ),
        (
            "b".to_string(),
            Tensor {
                shape: vec![1],
                values: d[2..].to_vec(),
            },
        ),
    ])
}

impl Fleet {
    fn new(spec: &[([f32; LEN], u64, Leave)]) -> Self {
        let clients = spec
            .iter()
            .enumerate()
            .map(|(i, &(delta, examples, drop))| {
                let fake = Fake {
                    conn: 10 + i as u64,
                    delta,
                    examples,
                    drop,
                    secagg: None,
                    gone: false,
                };
                (format!("c{i}"), fake)
            })
            .collect();
        Fleet {
            clients,
            task: None,
            reports: Vec::new(),
            accepted_acks: 0,
            rounds_started: 0,
        }
    }

    /// Runs the coordinator until it has nothing left to do at `now`, answering every message as the clients would.
    fn run(&mut self, c: &mut Coordinator, now: Instant) {
        loop {
            let actions = drain(c, now);
            if actions.is_empty() {
                return;
            }
            for a in actions {
                for e in self.answer(a) {
                    c.handle(e, now).unwrap();
                }
            }
        }
    }

    fn answer(&mut self, action: Action) -> Vec<Event> {
        let (id, message) = match action {
            Action::Send { client, message, .. } => (client, message),
            Action::RoundComplete(r) => {
                self.reports.push(r);
                return Vec::new();
            }
            Action::RoundStarted { .. } => {
                self.rounds_started += 1;
                return Vec::new();
            }
            _ => return Vec::new(),
        };
        let Some(f) = self.clients.get_mut(&id) else {
            return Vec::new();
        };
        if f.gone {
            return Vec::new();
        }
        let leave = |f: &mut Fake| {
            f.gone = true;
            vec![Event::Disconnected {
                client: id.clone(),
                conn: f.conn,
            }]
        };
        let reply = match message {
            Outgoing::SecAgg(SecAggMessage::Setup(s)) => {
                if f.drop == Leave::AtSetup {
                    return leave(f);
                }
                let (client, keys) = SecAggClient::new(s).unwrap();
                f.secagg = Some(client);
                SecAggMessage::Keys(keys)
            }
            Outgoing::SecAgg(SecAggMessage::Neighbours(m)) => {
                if f.drop == Leave::AtNeighbours {
                    return leave(f);
                }
                SecAggMessage::Shares(f.secagg.as_mut().unwrap().share(&m).unwrap())
            }
            Outgoing::SecAgg(SecAggMessage::Shares(m)) => {
                f.secagg.as_mut().unwrap().receive(&m).unwrap();
                return Vec::new();
            }
            Outgoing::Task(t) => {
                if f.drop == Leave::AtTask {
                    return leave(f);
                }
                let st = t.secagg.clone().expect("a secure round's task says so");
                self.task = Some(st.clone());
                let (flat, weight) = prepare_update(&delta_params(&f.delta), f.examples, &st).unwrap();
                let (mut m, clipped) = f.secagg.as_mut().unwrap().mask(&flat, weight).unwrap();
                assert_eq!(clipped, 0);
                m.train_loss = 1.0 + f.conn as f64;
                SecAggMessage::Masked(m)
            }
            Outgoing::SecAgg(SecAggMessage::Unmask(m)) => {
                if f.drop == Leave::AtUnmask {
                    return leave(f);
                }
                SecAggMessage::Reveal(f.secagg.as_mut().unwrap().reveal(&m).unwrap())
            }
            Outgoing::Ack(a) => {
                assert!(a.accepted, "{a:?}");
                self.accepted_acks += 1;
                return Vec::new();
            }
            other => panic!("unexpected message to {id}: {other:?}"),
        };
        vec![Event::SecAgg {
            client: id.clone(),
            conn: f.conn,
            message: reply,
        }]
    }

    /// The weighted mean of the deltas of `who`, computed here: w = min(n, cap)/cap, or 1 when cap is 0.
    fn expected(&self, who: &[&str], cap: u64) -> [f64; LEN] {
        let mut sum = [0.0; LEN];
        let mut weights = 0.0;
        for id in who {
            let f = &self.clients[*id];
            let w = if cap == 0 {
                1.0
            } else {
                f.examples.min(cap) as f64 / cap as f64
            };
            weights += w;
            for (s, d) in sum.iter_mut().zip(f.delta) {
                *s += w * f64::from(d);
            }
        }
        sum.map(|s| s / weights)
    }
}

fn start(fleet: &mut Fleet, strategy: Box<dyn Strategy>, min_clients: usize) -> (Coordinator, Instant) {
    let now = Instant::now();
    let mut c = Coordinator::new(
        config(min_clients),
        TrainConfig::default(),
        strategy,
        initial(),
        None,
        now,
    )
    .unwrap();
    for (id, f) in &fleet.clients {
        c.handle(
            Event::Ready {
                client: id.clone(),
                conn: f.conn,
            },
            now,
        )
        .unwrap();
    }
    fleet.run(&mut c, now);
    (c, now)
}

fn global(c: &Coordinator) -> [f64; LEN] {
    let g = &c.state().global;
    [g["a"].values[0], g["a"].values[1], g["b"].values[0]].map(f64::from)
}

fn assert_close(got: [f64; LEN], want: [f64; LEN], tol: f64) {
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() <= tol, "got {got:?}, want {want:?}");
    }
}

fn spec(drops: &[Leave]) -> Vec<([f32; LEN], u64, Leave)> {
    drops
        .iter()
        .enumerate()
        .map(|(i, &d)| {
            let x = i as f32;
            ([0.01 * x, -0.02 + 0.003 * x, 0.5 - 0.1 * x], 1 + i as u64 * 3, d)
        })
        .collect()
}

#[test]
fn a_secure_round_equals_the_plain_weighted_mean() {
    let mut fleet = Fleet::new(&spec(&[Leave::Never; 5]));
    let (c, _) = start(&mut fleet, fedavg(), 3);
    let cap = fleet.task.as_ref().unwrap().max_examples;
    let local = TrainConfig::default();
    assert_eq!(
        cap,
        local.steps as u64 * local.batch_size as u64 * local.grad_accum as u64
    );
    let want = fleet.expected(&["c0", "c1", "c2", "c3", "c4"], cap);
    let init = [1.0, -1.0, 0.5];
    // The encoding's error bound: 5 clients × half a step of clip·5/2³¹, then the f32 rounding of the result.
    assert_close(global(&c), [0, 1, 2].map(|i| init[i] + want[i]), 1e-6);
    let r = &fleet.reports[0];
    assert_eq!(
        (r.sampled, r.participants, r.rejected, r.masks_recovered),
        (5, 5, 0, Some(0))
    );
    // The loss is the weighted mean of what the clients reported (1 + conn).
    let w: Vec<f64> = (0..5u64).map(|i| (1 + 3 * i).min(cap) as f64 / cap as f64).collect();
    let loss = (0..5).map(|i| w[i] * (11.0 + i as f64)).sum::<f64>() / w.iter().sum::<f64>();
    assert!((r.train_loss - loss).abs() < 1e-9, "{} vs {loss}", r.train_loss);
    assert_eq!(fleet.accepted_acks, 5);
    assert!(c.is_finished());
}

#[test]
fn dropouts_at_every_stage_are_recovered_and_left_out_of_the_sum() {
    // Seven clients (complete graph) at threshold 3: one leaves before its keys, one before its shares, one after
    // sharing but before its masked update (its masks are removed), one after masking but before revealing (its
    // update is in the sum: the three that reveal rebuild its self mask).
    let drops = [
        Leave::AtSetup,
        Leave::AtNeighbours,
        Leave::AtTask,
        Leave::AtUnmask,
        Leave::Never,
        Leave::Never,
        Leave::Never,
    ];
    let mut fleet = Fleet::new(&spec(&drops));
    let mut cfg = config(3);
    cfg.secure_aggregation.as_mut().unwrap().threshold = 3;
    let now = Instant::now();
    let mut c = Coordinator::new(cfg, TrainConfig::default(), fedavg(), initial(), None, now).unwrap();
    for (id, f) in &fleet.clients {
        c.handle(
            Event::Ready {
                client: id.clone(),
                conn: f.conn,
            },
            now,
        )
        .unwrap();
    }
    fleet.run(&mut c, now);
    assert_eq!(fleet.rounds_started, 1, "recovered, not repeated");
    let cap = fleet.task.as_ref().unwrap().max_examples;
    let want = fleet.expected(&["c3", "c4", "c5", "c6"], cap);
    let init = [1.0, -1.0, 0.5];
    assert_close(global(&c), [0, 1, 2].map(|i| init[i] + want[i]), 1e-6);
    let r = &fleet.reports[0];
    assert_eq!((r.sampled, r.participants, r.masks_recovered), (7, 4, Some(1)));
    assert_eq!(
        fleet.accepted_acks, 3,
        "the client that left before revealing gets no ack"
    );
}

#[test]
fn below_the_threshold_the_round_is_repeated_with_the_clients_still_there() {
    // The same dropouts at the default threshold (4 of the 7): three reveals cannot rebuild the self mask of the
    // client that left after masking, so the round runs again with the three left, and completes.
    let drops = [
        Leave::AtSetup,
        Leave::AtNeighbours,
        Leave::AtTask,
        Leave::AtUnmask,
        Leave::Never,
        Leave::Never,
        Leave::Never,
    ];
    let mut fleet = Fleet::new(&spec(&drops));
    let (c, _) = start(&mut fleet, fedavg(), 3);
    assert_eq!(fleet.rounds_started, 2);
    let cap = fleet.task.as_ref().unwrap().max_examples;
    let want = fleet.expected(&["c4", "c5", "c6"], cap);
    let init = [1.0, -1.0, 0.5];
    assert_close(global(&c), [0, 1, 2].map(|i| init[i] + want[i]), 1e-6);
    assert_eq!(fleet.reports[0].participants, 3);
}

#[test]
fn too_many_dropouts_repeat_the_round_and_the_survivors_run_it_again() {
    // Of five clients three leave at the task: two masked updates are fewer than min_clients 3 (and than the
    // threshold), so the round is tried again with the two still connected, which are too few to start it.
    let drops = [Leave::AtTask, Leave::AtTask, Leave::AtTask, Leave::Never, Leave::Never];
    let mut fleet = Fleet::new(&spec(&drops));
    let (c, now) = start(&mut fleet, fedavg(), 3);
    assert!(fleet.reports.is_empty());
    assert_eq!(c.state().global, initial(), "nothing aggregated");
    assert_eq!(c.state().round, 0);
    assert_eq!(fleet.rounds_started, 1, "waiting for a third client");
    // A third client comes back: the round runs again, securely, and completes.
    let mut c = c;
    fleet.clients.get_mut("c0").unwrap().drop = Leave::Never;
    fleet.clients.get_mut("c0").unwrap().gone = false;
    fleet.clients.get_mut("c0").unwrap().conn = 99;
    c.handle(
        Event::Ready {
            client: "c0".into(),
            conn: 99,
        },
        now,
    )
    .unwrap();
    fleet.run(&mut c, now);
    assert_eq!(fleet.rounds_started, 2);
    let cap = fleet.task.as_ref().unwrap().max_examples;
    let want = fleet.expected(&["c0", "c3", "c4"], cap);
    let init = [1.0, -1.0, 0.5];
    assert_close(global(&c), [0, 1, 2].map(|i| init[i] + want[i]), 1e-6);
}

#[test]
fn a_stage_closes_at_its_deadline_with_whoever_answered() {
    // One client never answers the setup (and stays connected): the key stage closes at stage_timeout_s.
    let mut fleet = Fleet::new(&spec(&[Leave::Never; 4]));
    fleet.clients.get_mut("c2").unwrap().gone = true;
    let (mut c, now) = start(&mut fleet, fedavg(), 3);
    assert!(fleet.reports.is_empty(), "waiting for c2's keys");
    let timeout = SecureAggregationConfig::default().stage_timeout_s;
    assert_eq!(c.poll_timeout(), Some(now + Duration::from_secs_f64(timeout)));
    fleet.run(&mut c, now + Duration::from_secs_f64(timeout));
    let cap = fleet.task.as_ref().unwrap().max_examples;
    let want = fleet.expected(&["c0", "c1", "c3"], cap);
    let init = [1.0, -1.0, 0.5];
    assert_close(global(&c), [0, 1, 2].map(|i| init[i] + want[i]), 1e-6);
}

#[test]
fn central_dp_under_secure_aggregation_clips_at_the_clients_and_weighs_them_equally() {
    // Clients' deltas far beyond C = 0.1: each is clipped to norm 0.1 by its client; the mean of the clipped deltas
    // (equal weights) plus noise of deviation z·C/n is applied. z is tiny, so the result is the clipped mean.
    let privacy = |noise: &str| -> PrivacyConfig {
        toml::from_str(&format!("clip_norm = 0.1\nnoise_multiplier = 1e-6\nnoise = '{noise}'")).unwrap()
    };
    for noise in ["server", "clients"] {
        let dp: Box<dyn Strategy> = Box::new(DpStrategy::new(fedavg(), &privacy(noise), 1e-6, 1.0));
        let mut fleet = Fleet::new(&spec(&[Leave::Never; 4]));
        let (c, _) = start(&mut fleet, dp, 3);
        let st = fleet.task.clone().unwrap();
        assert_eq!(st.max_examples, 0, "equal weights");
        assert_eq!(st.max_norm, 0.1);
        let per_client = if noise == "clients" { 1e-6 * 0.1 / 2.0 } else { 0.0 };
        assert!((st.noise_std - per_client).abs() < 1e-15, "{noise}: {}", st.noise_std);
        let mut want = [0.0; LEN];
        for f in fleet.clients.values() {
            let norm = f.delta.iter().map(|&d| f64::from(d).powi(2)).sum::<f64>().sqrt();
            let s = (0.1 / norm).min(1.0);
            for (w, d) in want.iter_mut().zip(f.delta) {
                *w += s * f64::from(d) / 4.0;
            }
        }
        let init = [1.0, -1.0, 0.5];
        assert_close(global(&c), [0, 1, 2].map(|i| init[i] + want[i]), 1e-5);
        assert!(fleet.reports[0].epsilon.is_some());
    }
}

#[test]
fn settings_that_cannot_work_are_refused_with_their_reason() {
    let now = Instant::now();
    let new = |cfg: FederationConfig, strategy: &str| {
        let s = toml::from_str::<StrategyConfig>(strategy).unwrap().build().unwrap();
        Coordinator::new(cfg, TrainConfig::default(), s, initial(), None, now)
            .err()
            .map(|e| e.to_string())
    };
    let few = new(config(2), "kind = 'fedavg'").unwrap();
    assert!(few.contains("min_clients ≥ 3"), "{few}");
    let robust = new(config(3), "kind = 'median'").unwrap();
    assert!(robust.contains("median") && robust.contains("sum"), "{robust}");
    // Noise at the clients without secure aggregation would show the server each client's noised update.
    let privacy: PrivacyConfig = toml::from_str("clip_norm = 1.0\nnoise_multiplier = 1.0\nnoise = 'clients'").unwrap();
    let dp = Box::new(DpStrategy::new(fedavg(), &privacy, 1.0, 1.0));
    let plain = FederationConfig {
        secure_aggregation: None,
        ..config(3)
    };
    let err = Coordinator::new(plain, TrainConfig::default(), dp, initial(), None, now)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("secure_aggregation"), "{err}");
}

#[test]
fn a_plain_update_in_a_secure_round_is_refused_and_the_wire_task_says_secure() {
    let mut fleet = Fleet::new(&spec(&[Leave::Never; 3]));
    // Stop the fleet before it answers anything: take the setups by hand.
    let now = Instant::now();
    let mut c = Coordinator::new(config(3), TrainConfig::default(), fedavg(), initial(), None, now).unwrap();
    for (id, f) in &fleet.clients {
        c.handle(
            Event::Ready {
                client: id.clone(),
                conn: f.conn,
            },
            now,
        )
        .unwrap();
    }
    c.handle_timeout(now).unwrap();
    let actions: Vec<Action> = std::iter::from_fn(|| c.poll_action()).collect();
    assert!(
        actions.iter().all(|a| !matches!(
            a,
            Action::Send {
                message: Outgoing::Task(_),
                ..
            }
        )),
        "no task before the keys and shares"
    );
    let update = offsite_protocol::Update {
        round: 1,
        num_examples: 1,
        train_loss: 1.0,
        steps: 1,
        delta: crate::params::to_wire(&delta_params(&[0.0; LEN]), offsite_protocol::Encoding::F32),
    };
    c.handle(
        Event::Update {
            client: "c0".into(),
            conn: 10,
            update,
        },
        now,
    )
    .unwrap();
    let refused = std::iter::from_fn(|| c.poll_action()).any(|a| {
        matches!(a, Action::Send { message: Outgoing::Ack(ack), .. } if !ack.accepted
            && ack.reason.as_deref().is_some_and(|r| r.contains("securely aggregated")))
    });
    assert!(refused);
    for a in actions {
        for e in fleet.answer(a) {
            c.handle(e, now).unwrap();
        }
    }
    fleet.run(&mut c, now);
    let r = &fleet.reports[0];
    assert_eq!(
        (r.participants, r.rejected),
        (3, 1),
        "the plain update counts as rejected"
    );
}
