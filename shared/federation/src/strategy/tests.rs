use super::*;

fn params(values: &[f32]) -> Params {
    let mut p = Params::new();
    p.insert(
        "a".into(),
        Tensor {
            shape: vec![values.len()],
            values: values.to_vec(),
        },
    );
    p
}

fn update(client: &str, n: u64, delta: &[f32]) -> ClientUpdate {
    ClientUpdate::single(client, n, params(delta))
}

fn run(config: &str, global: &[f32], updates: &[ClientUpdate]) -> Vec<f32> {
    let c: StrategyConfig = toml::from_str(config).unwrap();
    c.build().unwrap().aggregate(&params(global), updates).unwrap()["a"]
        .values
        .clone()
}

fn close(a: &[f32], b: &[f32]) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() < 1e-6, "{a:?} vs {b:?}");
    }
}

#[test]
fn fedavg_weights_by_examples() {
    let ups = [update("x", 1, &[1.0, 0.0]), update("y", 3, &[-1.0, 4.0])];
    // (1·1 + 3·(−1))/4 = −0.5; (0 + 12)/4 = 3.
    close(&run("kind = 'fedavg'", &[10.0, 20.0], &ups), &[9.5, 23.0]);
    close(&run("kind = 'fedprox'\nmu = 0.1", &[10.0, 20.0], &ups), &[9.5, 23.0]);
}

#[test]
fn norm_bounding_clips_each_delta_first() {
    // ‖(3, 4)‖ = 5 → scaled to norm 1: (0.6, 0.8); the other is within the bound.
    let ups = [update("x", 1, &[3.0, 4.0]), update("y", 1, &[0.2, 0.0])];
    close(
        &run("kind = 'fedavg'\nnorm_bound = 1.0", &[0.0, 0.0], &ups),
        &[0.4, 0.4],
    );
}

#[test]
fn server_adam_yogi_adagrad_follow_their_update_rules() {
    let ups = [update("x", 1, &[0.2]), update("y", 1, &[0.4])];
    // Δ = 0.3; m = 0.1·0.3 = 0.03.
    // Adam: v = 0.01·0.09 = 0.0009 → w = 1 + 0.1·0.03/(0.03 + 0.001).
    close(
        &run("kind = 'fedadam'\nserver_lr = 0.1", &[1.0], &ups),
        &[1.0 + 0.1 * 0.03 / 0.031],
    );
    // Yogi from v = 0: v = 0 − 0.01·0.09·sign(0 − 0.09) = 0.0009, as Adam on the first round.
    close(
        &run("kind = 'fedyogi'\nserver_lr = 0.1", &[1.0], &ups),
        &[1.0 + 0.1 * 0.03 / 0.031],
    );
    // Adagrad: v = 0.09 → w = 1 + 0.1·0.03/(0.3 + 0.001).
    close(
        &run("kind = 'fedadagrad'\nserver_lr = 0.1", &[1.0], &ups),
        &[1.0 + 0.1 * 0.03 / 0.301],
    );
}

#[test]
fn server_optimizer_state_survives_a_restart() {
    let c: StrategyConfig = toml::from_str("kind = 'fedadam'\nserver_lr = 0.05").unwrap();
    let ups = [update("x", 2, &[0.5, -0.1]), update("y", 1, &[0.1, 0.3])];
    let mut a = c.build().unwrap();
    let g1 = a.aggregate(&params(&[0.0, 0.0]), &ups).unwrap();
    let g2 = a.aggregate(&g1, &ups).unwrap();
    let mut b = c.build().unwrap();
    b.aggregate(&params(&[0.0, 0.0]), &ups).unwrap();
    let mut restarted = c.build().unwrap();
    restarted.restore(b.state()).unwrap();
    assert_eq!(restarted.aggregate(&g1, &ups).unwrap(), g2);
}

#[test]
fn robust_rules_ignore_an_outlier() {
    let ups = [
        update("a", 1, &[1.0]),
        update("b", 1, &[2.0]),
        update("c", 1, &[3.0]),
        update("d", 1, &[4.0]),
        update("evil", 1, &[1000.0]),
    ];
    close(&run("kind = 'median'", &[0.0], &ups), &[3.0]);
    // trim 0.2 of 5 → one dropped at each end: mean(2, 3, 4).
    close(&run("kind = 'trimmedmean'\ntrim = 0.2", &[0.0], &ups), &[3.0]);
    // Krum f = 1: scores over the 2 nearest: a: 1+4, b: 1+1, c: 1+1, d: 1+4, evil: huge → b (first of the ties).
    close(&run("kind = 'krum'\nbyzantine = 1", &[0.0], &ups), &[2.0]);
    let even = [update("a", 1, &[1.0]), update("b", 1, &[2.0])];
    close(&run("kind = 'median'", &[0.0], &even), &[1.5]);
}

#[test]
fn bad_configs_are_named() {
    let e = toml::from_str::<StrategyConfig>("kind = 'fedavg'\nmu = 1.0")
        .unwrap_err()
        .to_string();
    assert!(e.contains("mu"), "{e}");
    let e = toml::from_str::<StrategyConfig>("kind = 'fedsgd'")
        .unwrap_err()
        .to_string();
    assert!(e.contains("fedsgd"), "{e}");
    let c: StrategyConfig = toml::from_str("kind = 'trimmedmean'\ntrim = 0.5").unwrap();
    assert!(c.build().is_err());
    let c: StrategyConfig = toml::from_str("kind = 'krum'\nbyzantine = 1").unwrap();
    let e = c.build().unwrap().aggregate(&params(&[0.0]), &[update("a", 1, &[1.0])]);
    assert!(e.unwrap_err().to_string().contains("at least 5"));
}

#[test]
fn the_default_plan_samples_and_a_repeated_round_draws_again() {
    let ready: Vec<String> = (0..10).map(|i| format!("c{i}")).collect();
    let local = TrainConfig::default();
    let ctx = |attempt| RoundContext {
        round: 4,
        attempt,
        ready: &ready,
        fraction: 0.3,
        min_clients: 2,
        seed: 9,
        local: &local,
    };
    let first = RoundPlan::sampled(&ctx(0));
    assert_eq!(
        first.clients,
        crate::sample_clients(&ready, 0.3, 2, 9, 4),
        "a first try samples as always"
    );
    assert_eq!(first.settings, local.for_round(9, 4));
    assert_eq!(first.proximal_mu, 0.0);
    let draws: std::collections::BTreeSet<_> = (0..4).map(|a| RoundPlan::sampled(&ctx(a)).clients).collect();
    assert!(draws.len() > 1, "every retry drew the same clients: {draws:?}");
    // FedProx and norm bounding keep the inner plan and add μ.
    let c: StrategyConfig = toml::from_str("kind = 'fedprox'\nmu = 0.5\nnorm_bound = 2.0").unwrap();
    let plan = c.build().unwrap().configure_round(&ctx(0));
    assert_eq!((plan.clients, plan.proximal_mu), (first.clients, 0.5));
}
