//! Whole federations driven with fake time and no sockets.

use super::*;
use crate::params::{from_wire, Tensor};
use crate::strategy::StrategyConfig;
use offsite_protocol::WireTensor;

fn t0() -> Instant {
    Instant::now()
}

fn initial() -> Params {
    Params::from([(
        "w".to_string(),
        Tensor {
            shape: vec![2],
            values: vec![1.0, 2.0],
        },
    )])
}

fn config(rounds: u64, min_clients: usize) -> FederationConfig {
    FederationConfig {
        rounds,
        min_clients,
        wait_for_clients_s: 60.0,
        deadline_s: 100.0,
        eval_every: 0,
        seed: 3,
        ..FederationConfig::default()
    }
}

fn coordinator(cfg: FederationConfig, strategy: &str, saved: Option<ServerState>, now: Instant) -> Coordinator {
    let s: StrategyConfig = toml::from_str(strategy).unwrap();
    Coordinator::new(cfg, TrainConfig::default(), s.build().unwrap(), initial(), saved, now).unwrap()
}

fn update(round: u64, n: u64, delta: [f32; 2]) -> Update {
    Update {
        round,
        num_examples: n,
        train_loss: 2.0,
        steps: 1,
        delta: vec![WireTensor::encode("w", &[2], &delta, Encoding::F32)],
    }
}

/// Carries out every timeout due by `now` (a round starts at the first one after enough clients are ready, as the
/// network layer does once the events at hand are handled), then takes the actions.
pub(super) fn drain(c: &mut Coordinator, now: Instant) -> Vec<Action> {
    while let Some(t) = c.poll_timeout() {
        if t > now {
            break;
        }
        c.handle_timeout(now).unwrap();
        if c.poll_timeout() == Some(t) {
            break;
        }
    }
    std::iter::from_fn(|| c.poll_action()).collect()
}

/// The clients sent a task among `actions`, with the connection and the task.
fn tasks(actions: &[Action]) -> Vec<(String, u64, Arc<Task>)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Send {
                client,
                conn: Some(conn),
                message: Outgoing::Task(t),
            } => Some((client.clone(), *conn, t.clone())),
            _ => None,
        })
        .collect()
}

fn acks(actions: &[Action]) -> Vec<(String, UpdateAck)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Send {
                client,
                message: Outgoing::Ack(ack),
                ..
            } => Some((client.clone(), ack.clone())),
            _ => None,
        })
        .collect()
}

fn reports(actions: &[Action]) -> Vec<RoundReport> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::RoundComplete(r) => Some(r.clone()),
            _ => None,
        })
        .collect()
}

fn ready(c: &mut Coordinator, ids: &[(&str, u64)], now: Instant) -> Vec<Action> {
    for (id, conn) in ids {
        c.handle(
            Event::Ready {
                client: id.to_string(),
                conn: *conn,
            },
            now,
        )
        .unwrap();
    }
    drain(c, now)
}

fn send_update(c: &mut Coordinator, client: &str, conn: u64, u: Update, now: Instant) -> Vec<Action> {
    let event = Event::Update {
        client: client.into(),
        conn,
        update: u,
    };
    c.handle(event, now).unwrap();
    drain(c, now)
}

#[test]
fn a_federation_runs_every_round_and_averages_by_examples() {
    let now = t0();
    let mut c = coordinator(config(2, 2), "kind = 'fedavg'", None, now);
    assert!(
        drain(&mut c, now).is_empty(),
        "no round before enough clients are ready"
    );
    let a = ready(&mut c, &[("a", 1)], now);
    assert!(tasks(&a).is_empty());
    let a = ready(&mut c, &[("b", 2)], now);
    assert_eq!(a[0], Action::RoundStarted { round: 1 });
    let t = tasks(&a);
    assert_eq!(
        t.iter().map(|x| (x.0.as_str(), x.1)).collect::<Vec<_>>(),
        [("a", 1), ("b", 2)]
    );
    assert_eq!(from_wire(&t[0].2.global).unwrap(), initial());
    assert_eq!(t[0].2.settings.seed, TrainConfig::default().for_round(3, 1).seed);
    assert!(send_update(&mut c, "a", 1, update(1, 1, [1.0, 0.0]), now)
        .iter()
        .all(|a| !matches!(a, Action::Save)));
    let later = now + Duration::from_secs(5);
    let a = send_update(&mut c, "b", 2, update(1, 3, [-1.0, 4.0]), later);
    assert!(acks(&a).iter().all(|(_, k)| k.accepted));
    let save = a.iter().position(|x| *x == Action::Save).expect("saved");
    let done = a.iter().position(|x| matches!(x, Action::RoundComplete(_))).unwrap();
    assert!(done < save, "the round's row is written before its state is saved");
    assert!(
        a[..save]
            .iter()
            .all(|x| !matches!(x, Action::RoundStarted { round: 2 })),
        "the save comes before the next round: {a:?}"
    );
    // Independently: 1 + (1·1 + 3·(−1))/4 = 0.5; 2 + (0 + 12)/4 = 5.
    assert_eq!(c.state().global["w"].values, [0.5, 5.0]);
    let r = &reports(&a)[0];
    assert_eq!(
        (r.round, r.sampled, r.participants, r.rejected, r.wall_s),
        (1, 2, 2, 0, 5.0)
    );
    assert_eq!(tasks(&a).len(), 2, "round 2 starts at once");
    send_update(&mut c, "a", 1, update(2, 1, [0.0, 0.0]), later);
    let a = send_update(&mut c, "b", 2, update(2, 1, [0.0, 0.0]), later);
    assert_eq!(a.last(), Some(&Action::Finished));
    assert!(c.is_finished());
    assert_eq!(c.state().round, 2);
    assert_eq!(c.state().clients["a"].accepted, 2);
}

#[test]
fn clients_ready_before_the_round_starts_are_all_sampled() {
    let now = t0();
    let mut c = coordinator(config(1, 2), "kind = 'fedavg'", None, now);
    // Three readiness events at hand at once (queued before the server's loop ran): the round waits for its
    // timeout, so all three are sampled, not the first two.
    for (id, conn) in [("a", 1), ("b", 2), ("c", 3)] {
        c.handle(
            Event::Ready {
                client: id.into(),
                conn,
            },
            now,
        )
        .unwrap();
    }
    assert!(std::iter::from_fn(|| c.poll_action()).next().is_none());
    assert_eq!(c.poll_timeout(), Some(now), "due at once");
    assert_eq!(tasks(&drain(&mut c, now)).len(), 3);
}

#[test]
fn a_straggler_misses_the_deadline_and_its_late_update_is_refused() {
    let now = t0();
    let mut c = coordinator(config(2, 2), "kind = 'fedavg'", None, now);
    ready(&mut c, &[("a", 1), ("slow", 2)], now);
    ready(&mut c, &[("b", 3)], now);
    assert_eq!(c.poll_timeout(), Some(now + Duration::from_secs(100)));
    send_update(&mut c, "a", 1, update(1, 1, [1.0, 1.0]), now);
    c.handle_timeout(now + Duration::from_secs(99)).unwrap();
    assert!(drain(&mut c, now).is_empty(), "nothing happens before the deadline");
    // "b" was not sampled in round 1 (it became ready after the round started): refused, not counted as late.
    let a = send_update(&mut c, "b", 3, update(1, 1, [5.0, 5.0]), now);
    assert!(!acks(&a)[0].1.accepted);
    let a = ready(&mut c, &[], now);
    assert!(a.is_empty());
    c.handle_timeout(now + Duration::from_secs(100)).unwrap();
    let a = drain(&mut c, now + Duration::from_secs(100));
    assert!(reports(&a).is_empty(), "one update is fewer than min_clients: repeated");
    let t = tasks(&a);
    assert_eq!(t.len(), 3, "the repeated round goes to every ready client");
    for (client, conn, _) in &t {
        if client != "slow" {
            send_update(&mut c, client, *conn, update(1, 1, [1.0, 1.0]), now);
        }
    }
    let deadline = now + Duration::from_secs(200);
    assert_eq!(
        c.poll_timeout(),
        Some(deadline),
        "the repeated round has a deadline of its own"
    );
    c.handle_timeout(deadline).unwrap();
    let a = drain(&mut c, deadline);
    assert_eq!(reports(&a)[0].participants, 2);
    assert_eq!(c.state().global["w"].values, [2.0, 3.0]);
    // The straggler's round-1 update arrives in round 2: stale, refused with the reason, and it does not use up
    // the straggler's round-2 slot.
    let a = send_update(&mut c, "slow", 2, update(1, 1, [9.0, 9.0]), now);
    let (who, ack) = &acks(&a)[0];
    assert_eq!(who, "slow");
    assert!(
        !ack.accepted && ack.reason.as_deref().unwrap().starts_with("stale update"),
        "{ack:?}"
    );
    let a = send_update(&mut c, "slow", 2, update(2, 1, [0.0, 0.0]), now);
    assert!(acks(&a)[0].1.accepted, "{a:?}");
}

#[test]
fn a_round_with_too_few_good_updates_is_repeated_and_resampled() {
    let now = t0();
    let mut cfg = config(1, 2);
    cfg.fraction = 0.5;
    let mut c = coordinator(cfg, "kind = 'fedavg'", None, now);
    let first = tasks(&ready(&mut c, &[("a", 1), ("b", 2)], now));
    assert_eq!(first.len(), 2, "the round starts as soon as min_clients are ready");
    let late = tasks(&ready(&mut c, &[("c", 3), ("d", 4), ("e", 5), ("f", 6)], now));
    assert!(late.is_empty(), "clients ready after the start wait for the next round");
    // One sends NaN, the other leaves: 0 < min_clients = 2.
    let mut bad = update(1, 1, [0.0, 0.0]);
    bad.delta = vec![WireTensor::encode("w", &[2], &[f32::NAN, 0.0], Encoding::F32)];
    let a = send_update(&mut c, "a", 1, bad, now);
    assert!(acks(&a)[0].1.reason.as_deref().unwrap().contains("not finite"));
    c.handle(
        Event::Disconnected {
            client: "b".into(),
            conn: 2,
        },
        now,
    )
    .unwrap();
    let a = drain(&mut c, now);
    assert!(
        reports(&a).is_empty() && !a.contains(&Action::Save),
        "nothing aggregated"
    );
    assert_eq!(c.state().round, 0);
    assert_eq!(c.state().global, initial());
    assert_eq!(c.state().clients["a"].rejected, 1);
    let again: Vec<String> = tasks(&a).iter().map(|t| t.0.clone()).collect();
    assert!(tasks(&a).iter().all(|t| t.2.round == 1), "the same round again");
    let still_ready: Vec<String> = ["a", "c", "d", "e", "f"].map(String::from).to_vec();
    assert_eq!(again.len(), 3, "half of the 5 clients still ready (b left)");
    assert!(again.iter().all(|id| still_ready.contains(id)));
}

#[test]
fn updates_from_unsampled_clients_or_old_connections_are_refused() {
    let now = t0();
    let mut cfg = config(1, 1);
    cfg.fraction = 0.0;
    let mut c = coordinator(cfg, "kind = 'fedavg'", None, now);
    let t = tasks(&ready(&mut c, &[("a", 1), ("b", 2)], now));
    assert_eq!(t.len(), 1, "fraction 0 samples min_clients");
    let (sampled, conn) = (t[0].0.clone(), t[0].1);
    let other = if sampled == "a" { ("b", 2) } else { ("a", 1) };
    let a = send_update(&mut c, other.0, other.1, update(1, 1, [0.0, 0.0]), now);
    assert_eq!(
        acks(&a)[0].1.reason.as_deref(),
        Some("not sampled this round, or already answered")
    );
    // The sampled client reconnects: the task went to the old connection, so its update on the new one is refused.
    ready(&mut c, &[(sampled.as_str(), 9)], now);
    let a = send_update(&mut c, &sampled, 9, update(1, 1, [0.0, 0.0]), now);
    assert!(!acks(&a)[0].1.accepted);
    let a = send_update(&mut c, &sampled, conn, update(1, 1, [0.5, 0.5]), now);
    assert_eq!(reports(&a)[0].participants, 1);
    assert_eq!(reports(&a)[0].rejected, 2);
}

#[test]
fn too_few_clients_in_time_is_an_error_naming_the_round() {
    let now = t0();
    let mut c = coordinator(config(1, 3), "kind = 'fedavg'", None, now);
    ready(&mut c, &[("a", 1)], now);
    assert_eq!(c.poll_timeout(), Some(now + Duration::from_secs(60)));
    let e = c.handle_timeout(now + Duration::from_secs(61)).unwrap_err();
    assert!(
        matches!(
            e,
            FedError::NotEnoughClients {
                round: 1,
                ready: 1,
                needed: 3,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn evaluation_comes_before_the_report_and_the_save_and_fills_the_report() {
    let now = t0();
    let mut cfg = config(1, 1);
    cfg.eval_every = 1;
    let mut c = coordinator(cfg, "kind = 'fedavg'", None, now);
    ready(&mut c, &[("a", 1)], now);
    let a = send_update(&mut c, "a", 1, update(1, 1, [1.0, 0.0]), now);
    assert!(!a.contains(&Action::Save), "the save waits for the evaluation: {a:?}");
    let Action::Evaluate { round: 1, global } = &a[1] else {
        panic!("{a:?}")
    };
    assert_eq!(global["w"].values, [2.0, 2.0]);
    assert!(reports(&a).is_empty(), "the report waits for the evaluation");
    assert_eq!(c.poll_timeout(), None);
    let a = send_update(&mut c, "a", 1, update(1, 1, [1.0, 0.0]), now);
    assert!(acks(&a)[0].1.reason.as_deref().unwrap().starts_with("late update"));
    let then = now + Duration::from_secs(7);
    c.handle(
        Event::Evaluated {
            round: 1,
            perplexity: Some(12.5),
        },
        then,
    )
    .unwrap();
    let a = drain(&mut c, then);
    let r = &reports(&a)[0];
    assert_eq!((r.eval_perplexity, r.wall_s), (Some(12.5), 7.0));
    assert!(
        matches!(&a[..], [Action::RoundComplete(_), Action::Save, Action::Finished]),
        "{a:?}"
    );
}

/// Runs `rounds` rounds of FedAdam with clients a and b (fixed deltas per round), from `saved` when given.
fn run_fedadam(rounds: std::ops::RangeInclusive<u64>, saved: Option<ServerState>) -> ServerState {
    let now = t0();
    let cfg = config(*rounds.end(), 2);
    let mut c = coordinator(cfg, "kind = 'fedadam'\nserver_lr = 0.1", saved, now);
    ready(&mut c, &[("a", 1), ("b", 2)], now);
    for round in rounds {
        let r = round as f32;
        send_update(&mut c, "a", 1, update(round, 2, [r, -1.0]), now);
        send_update(&mut c, "b", 2, update(round, 1, [0.5, r * r]), now);
        assert_eq!(c.state().round, round);
    }
    assert!(c.is_finished());
    c.state().clone()
}

#[test]
fn a_resumed_federation_ends_where_an_uninterrupted_one_does() {
    let whole = run_fedadam(1..=3, None);
    let first = run_fedadam(1..=1, None);
    assert!(!first.strategy.is_empty(), "FedAdam keeps server moments");
    let resumed = run_fedadam(2..=3, Some(first));
    assert_eq!(resumed, whole);
    // A finished federation resumed has nothing left to do.
    let c = coordinator(config(3, 2), "kind = 'fedadam'\nserver_lr = 0.1", Some(whole), t0());
    assert!(c.is_finished());
}

#[test]
fn fedprox_sends_its_mu_in_the_task() {
    let now = t0();
    let mut c = coordinator(config(1, 1), "kind = 'fedprox'\nmu = 0.25", None, now);
    let t = tasks(&ready(&mut c, &[("a", 1)], now));
    assert_eq!(t[0].2.proximal_mu, 0.25);
}

#[test]
fn a_huge_example_claim_is_clipped_to_what_the_round_trains() {
    let now = t0();
    let mut c = coordinator(config(1, 2), "kind = 'fedavg'", None, now);
    let t = tasks(&ready(&mut c, &[("a", 1), ("b", 2)], now));
    // The default cap: the task's steps × batch_size × grad_accum.
    let cap = (t[0].2.settings.steps * t[0].2.settings.batch_size * t[0].2.settings.grad_accum) as f64;
    send_update(&mut c, "a", 1, update(1, u64::MAX, [1.0, 0.0]), now);
    let a = send_update(&mut c, "b", 2, update(1, 1, [-1.0, 4.0]), now);
    assert_eq!(reports(&a)[0].participants, 2);
    // Independently: weights cap/(cap+1) and 1/(cap+1), not ~1 and ~0.
    let w = [cap / (cap + 1.0), 1.0 / (cap + 1.0)];
    let want = [1.0 + w[0] * 1.0 - w[1], 2.0 + w[1] * 4.0];
    let got = &c.state().global["w"].values;
    assert!(
        (got[0] as f64 - want[0]).abs() < 1e-6 && (got[1] as f64 - want[1]).abs() < 1e-6,
        "{got:?} {want:?}"
    );
}

/// A strategy whose first aggregate is poisoned (inf), FedAvg after that; it counts its calls as its state.
struct PoisonOnce {
    calls: u32,
}

impl Strategy for PoisonOnce {
    fn name(&self) -> String {
        "poison-once".into()
    }
    fn aggregate(&mut self, global: &Params, updates: &[ClientUpdate]) -> Result<Params, FedError> {
        self.calls += 1;
        let mut out = crate::strategy::StrategyConfig::FedAvg { norm_bound: None }
            .build()?
            .aggregate(global, updates)?;
        if self.calls == 1 {
            out.get_mut("w").unwrap().values[1] = f32::INFINITY;
        }
        Ok(out)
    }
    fn state(&self) -> Params {
        Params::from([(
            "calls".to_string(),
            Tensor {
                shape: vec![1],
                values: vec![self.calls as f32],
            },
        )])
    }
    fn restore(&mut self, state: Params) -> Result<(), FedError> {
        self.calls = state.get("calls").map_or(0, |t| t.values[0] as u32);
        Ok(())
    }
}

#[test]
fn a_poisoned_aggregate_is_a_rejected_round_not_a_dead_federation() {
    let now = t0();
    let strategy = Box::new(PoisonOnce { calls: 0 });
    let mut c = Coordinator::new(config(1, 1), TrainConfig::default(), strategy, initial(), None, now).unwrap();
    ready(&mut c, &[("a", 1)], now);
    let a = send_update(&mut c, "a", 1, update(1, 1, [1.0, 1.0]), now);
    assert!(!a.contains(&Action::Save), "nothing saved: {a:?}");
    assert_eq!(c.state().global, initial(), "the global adapter is untouched");
    let again = tasks(&a);
    assert_eq!((again.len(), again[0].2.round), (1, 1), "the round is repeated");
    // The strategy's own state was rolled back, so its next aggregate is its first again... and poisoned again.
    let a = send_update(&mut c, "a", 1, update(1, 1, [1.0, 1.0]), now);
    assert!(!a.contains(&Action::Save));
    assert_eq!(c.state().global, initial());
}

#[test]
fn updates_of_f32_max_are_refused_by_the_default_norm_bound() {
    let now = t0();
    let mut c = coordinator(
        FederationConfig {
            rounds: 1,
            ..FederationConfig::default()
        },
        "kind = 'fedavg'",
        None,
        now,
    );
    ready(&mut c, &[("a", 1)], now);
    let a = send_update(&mut c, "a", 1, update(1, 1, [f32::MAX, f32::MAX]), now);
    assert!(
        acks(&a)[0]
            .1
            .reason
            .as_deref()
            .unwrap()
            .contains("exceeds the limit 1000"),
        "{a:?}"
    );
}

#[test]
fn a_round_that_keeps_failing_ends_the_federation_with_an_error() {
    let now = t0();
    let mut cfg = config(1, 1);
    cfg.max_round_attempts = 3;
    let mut c = coordinator(cfg, "kind = 'fedavg'", None, now);
    ready(&mut c, &[("a", 1)], now);
    let nan = || {
        let mut u = update(1, 1, [0.0, 0.0]);
        u.delta = vec![WireTensor::encode("w", &[2], &[f32::NAN, 0.0], Encoding::F32)];
        u
    };
    send_update(&mut c, "a", 1, nan(), now);
    send_update(&mut c, "a", 1, nan(), now);
    let e = c
        .handle(
            Event::Update {
                client: "a".into(),
                conn: 1,
                update: nan(),
            },
            now,
        )
        .unwrap_err();
    assert!(matches!(e, FedError::RoundFailed { round: 1, attempts: 3 }), "{e}");
}

#[test]
fn the_aggregate_does_not_depend_on_the_order_updates_arrive_in() {
    // Values whose f64 sum depends on its order: (1e30 + 1) − 1e30 = 0, (1e30 − 1e30) + 1 = 1.
    let deltas = [("a", [1e30f32, 0.0]), ("b", [1.0, 0.0]), ("c", [-1e30, 0.0])];
    let run = |order: [usize; 3]| {
        let now = t0();
        let mut cfg = config(1, 3);
        cfg.max_update_norm = Some(f64::INFINITY);
        let mut c = coordinator(cfg, "kind = 'fedavg'", None, now);
        ready(&mut c, &[("a", 1), ("b", 2), ("c", 3)], now);
        for i in order {
            let (id, d) = deltas[i];
            send_update(&mut c, id, i as u64 + 1, update(1, 1, d), now);
        }
        c.state().global["w"].values.clone()
    };
    assert_eq!(run([0, 1, 2]), run([0, 2, 1]));
    assert_eq!(run([0, 1, 2]), run([2, 1, 0]));
}

#[test]
fn the_global_goes_down_in_f16_and_its_rounding_stays_out_of_the_servers_state() {
    let now = t0();
    let third = 1.0f32 / 3.0;
    let start = Params::from([(
        "w".to_string(),
        Tensor {
            shape: vec![2],
            values: vec![0.1, third],
        },
    )]);
    let s: StrategyConfig = toml::from_str("kind = 'fedavg'").unwrap();
    let cfg = config(1, 1);
    assert_eq!(cfg.global_encoding, Encoding::F16, "the default");
    let mut c = Coordinator::new(cfg, TrainConfig::default(), s.build().unwrap(), start, None, now).unwrap();
    let t = tasks(&ready(&mut c, &[("a", 1)], now));
    // IEEE half nearest to 0.1 and to 1/3 (2^-4 · 1.1001100110₂ and 2^-2 · 1.0101010101₂).
    let sent = [0.0999755859375f64, 0.333251953125];
    let got: Vec<f64> = from_wire(&t[0].2.global).unwrap()["w"]
        .values
        .iter()
        .map(|&v| v as f64)
        .collect();
    assert_eq!(got, sent);
    let a = send_update(&mut c, "a", 1, update(1, 1, [0.5, -0.25]), now);
    // The delta is added to the server's exact global, not to the rounded one the client started from.
    assert_eq!(c.state().global["w"].values, [0.1 + 0.5, third - 0.25]);
    let err = ((0.1f32 as f64 - sent[0]).powi(2) + (third as f64 - sent[1]).powi(2)).sqrt();
    let want = err / (0.1f32 as f64).hypot(third as f64);
    let got = reports(&a)[0].global_rounding.expect("reported for f16");
    assert!((got - want).abs() < 1e-9 * want && want > 1e-5, "{got} vs {want}");
}
