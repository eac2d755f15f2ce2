//! Whole rounds between one server and n clients, without sockets, with dropouts at every stage; the result is
//! checked against the weighted mean computed directly from the plain updates.

use std::collections::BTreeMap;

use offsite_protocol::{SecAggShares, SecAggUnmask};

use super::*;

/// The stage at which a client stops answering.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Drop {
    /// Never advertises keys.
    Keys,
    /// Advertises keys, never sends shares.
    Shares,
    /// Shares, never sends its masked update.
    Masked,
    /// Sends its update, never reveals shares.
    Reveal,
}

fn update(i: u32, len: usize) -> Vec<f32> {
    (0..len)
        .map(|j| ((i as f32 + 1.0) * 0.37 + j as f32 * 0.011).sin() * 0.05)
        .collect()
}

fn weight(i: u32) -> f64 {
    0.25 + 0.75 * f64::from(i % 4) / 3.0
}

fn params(n: u32, k: u32, t: u32, len: u64) -> SecAggParams {
    SecAggParams {
        round: 3,
        participants: n,
        neighbours: k,
        threshold: t,
        graph_seed: 99,
        clip: 1.0,
        length: len,
    }
}

/// Runs a round in which each client of `drops` stops at its stage.
fn round(p: SecAggParams, drops: &BTreeMap<u32, Drop>) -> Result<SecAggSum, SecAggError> {
    let len = p.length as usize;
    let alive = |i: u32, stage: Drop| drops.get(&i).is_none_or(|&d| d > stage);
    let mut server = SecAggServer::new(p.clone())?;
    let mut clients = BTreeMap::new();
    for i in 0..p.participants {
        let (c, keys) = SecAggClient::new(server.setup(i))?;
        clients.insert(i, c);
        if alive(i, Drop::Keys) {
            server.keys(i, keys)?;
        }
    }
    for (i, msg) in server.close_keys()? {
        let shares = clients.get_mut(&i).unwrap().share(&msg)?;
        if alive(i, Drop::Shares) {
            server.shares(i, shares)?;
        }
    }
    for (i, msg) in server.close_shares()? {
        let c = clients.get_mut(&i).unwrap();
        c.receive(&msg)?;
        if alive(i, Drop::Masked) {
            server.masked(i, c.mask(&update(i, len), weight(i))?.0)?;
        }
    }
    for (i, msg) in server.close_masked()? {
        // A client left with fewer surviving neighbours than the threshold refuses to reveal (its neighbourhood's
        // sum would be too small to hide an update): it counts as not answering, as a real one would.
        match clients.get_mut(&i).unwrap().reveal(&msg) {
            Ok(shares) if alive(i, Drop::Reveal) => server.reveal(i, shares)?,
            Ok(_) | Err(SecAggError::TooFew { stage: "unmasking", .. }) => {}
            Err(e) => return Err(e),
        }
    }
    server.finish()
}

/// Checks a round's mean against the one computed from the plain updates of the clients that sent theirs.
fn assert_plain_mean(sum: &SecAggSum, p: &SecAggParams, drops: &BTreeMap<u32, Drop>) {
    let contributors: Vec<u32> = (0..p.participants)
        .filter(|i| drops.get(i).is_none_or(|&d| d > Drop::Masked))
        .collect();
    assert_eq!(sum.contributors, contributors);
    let w: f64 = contributors.iter().map(|&i| weight(i)).sum();
    assert!((sum.weight - w).abs() < 1e-12);
    let mut worst = 0f64;
    for j in 0..p.length as usize {
        let want: f64 = contributors
            .iter()
            .map(|&i| weight(i) * f64::from(update(i, p.length as usize)[j]))
            .sum::<f64>()
            / w;
        worst = worst.max((f64::from(sum.mean[j]) - want).abs());
    }
    // The encoding's bound, plus f32's rounding of the mean.
    assert!(
        worst <= sum.error_bound + 1e-8,
        "error {worst} above the bound {}",
        sum.error_bound
    );
    assert!(sum.error_bound < 1e-6, "bound {}", sum.error_bound);
}

#[test]
fn a_complete_round_gives_the_weighted_mean() {
    let p = params(5, 30, 3, 257);
    let none = BTreeMap::new();
    let sum = round(p.clone(), &none).unwrap();
    assert_plain_mean(&sum, &p, &none);
    assert_eq!(sum.recovered, 0);
}

#[test]
fn dropouts_at_every_stage_are_recovered() {
    // 40 clients on a 10-regular graph, threshold 5 of the 11 holders of each secret; 9 drop out.
    let p = params(40, 10, 5, 1000);
    let drops = BTreeMap::from([
        (3, Drop::Keys),
        (17, Drop::Keys),
        (8, Drop::Shares),
        (30, Drop::Shares),
        (1, Drop::Masked),
        (22, Drop::Masked),
        (35, Drop::Masked),
        (12, Drop::Reveal),
        (26, Drop::Reveal),
    ]);
    let sum = round(p.clone(), &drops).unwrap();
    assert_plain_mean(&sum, &p, &drops);
    // The clients that shared but sent no update: their pairwise masks were rebuilt and removed.
    assert_eq!(sum.recovered, 3);
}

#[test]
fn too_many_dropouts_fail_the_round_with_the_stage() {
    let p = params(8, 30, 5, 16);
    let drops: BTreeMap<u32, Drop> = (0..4).map(|i| (i, Drop::Masked)).collect();
    assert_eq!(
        round(p.clone(), &drops),
        Err(SecAggError::TooFew {
            stage: "masked updates",
            have: 4,
            need: 5
        })
    );
    // Enough updates, but too few reveal: the survivors' self masks cannot be rebuilt.
    let drops: BTreeMap<u32, Drop> = (0..4).map(|i| (i, Drop::Reveal)).collect();
    assert_eq!(
        round(p, &drops),
        Err(SecAggError::TooFew {
            stage: "self-mask shares",
            have: 4,
            need: 5
        })
    );
}

#[test]
fn a_masked_update_reveals_nothing_by_itself() {
    let p = params(3, 2, 2, 64);
    let mut server = SecAggServer::new(p.clone()).unwrap();
    let mut clients: Vec<SecAggClient> = (0..3)
        .map(|i| {
            let (c, keys) = SecAggClient::new(server.setup(i)).unwrap();
            server.keys(i, keys).unwrap();
            c
        })
        .collect();
    for (i, msg) in server.close_keys().unwrap() {
        let s = clients[i as usize].share(&msg).unwrap();
        server.shares(i, s).unwrap();
    }
    for (i, msg) in server.close_shares().unwrap() {
        clients[i as usize].receive(&msg).unwrap();
    }
    let x = update(0, 64);
    let (masked, _) = clients[0].mask(&x, 1.0).unwrap();
    let (plain, _) = encode::encode(&x, 1.0, p.clip, encode::scale_for(3, p.clip));
    // Uniform masks: almost no coordinate is left as it was.
    let words = masked
        .masked
        .chunks_exact(4)
        .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]));
    let same = words.zip(&plain).filter(|(a, b)| a == *b).count();
    assert!(same <= 1, "{same} coordinates unmasked");
}

/// A round driven to the reveal stage: the server, the clients, and the unmasking requests.
fn to_reveal(p: &SecAggParams) -> (SecAggServer, Vec<SecAggClient>, Vec<(u32, SecAggUnmask)>) {
    let mut server = SecAggServer::new(p.clone()).unwrap();
    let mut clients = Vec::new();
    for i in 0..p.participants {
        let (c, keys) = SecAggClient::new(server.setup(i)).unwrap();
        server.keys(i, keys).unwrap();
        clients.push(c);
    }
    for (i, msg) in server.close_keys().unwrap() {
        let s = clients[i as usize].share(&msg).unwrap();
        server.shares(i, s).unwrap();
    }
    for (i, msg) in server.close_shares().unwrap() {
        let c = &mut clients[i as usize];
        c.receive(&msg).unwrap();
        if i != 0 {
            server
                .masked(i, c.mask(&update(i, p.length as usize), 1.0).unwrap().0)
                .unwrap();
        }
    }
    let asks = server.close_masked().unwrap();
    (server, clients, asks)
}

#[test]
fn a_client_never_reveals_both_secrets_of_one_neighbour() {
    let p = params(5, 30, 3, 8);
    let (_, mut clients, asks) = to_reveal(&p);
    let (i, mut ask) = asks[0].clone();
    // A lying server names client 0 (dropped) as survived too: both of its secrets would unmask its update.
    assert_eq!(ask.dropped, vec![0]);
    ask.survived.push(0);
    let err = clients[i as usize].reveal(&ask).unwrap_err();
    assert!(err.to_string().contains("both survived and dropped"), "{err}");
}

#[test]
fn a_bad_share_is_found_not_summed() {
    let p = params(5, 30, 3, 8);
    let (mut server, mut clients, asks) = to_reveal(&p);
    for (n, (i, ask)) in asks.into_iter().enumerate() {
        let mut r = clients[i as usize].reveal(&ask).unwrap();
        if n == 0 {
            r.self_masks[0].share[5] ^= 0x40;
        }
        server.reveal(i, r).unwrap();
    }
    assert!(matches!(server.finish(), Err(SecAggError::BadShares { .. })));
}

#[test]
fn malformed_messages_are_refused_with_the_client() {
    let p = params(4, 30, 2, 8);
    let mut server = SecAggServer::new(p.clone()).unwrap();
    let mut clients = Vec::new();
    for i in 0..4 {
        let (c, keys) = SecAggClient::new(server.setup(i)).unwrap();
        if i == 3 {
            let mut stale = keys.clone();
            stale.round = 2;
            assert!(matches!(
                server.keys(3, stale),
                Err(SecAggError::Client { index: 3, .. })
            ));
        }
        server.keys(i, keys.clone()).unwrap();
        assert!(server.keys(i, keys).is_err(), "keys twice");
        clients.push(c);
    }
    assert!(server.keys(9, clients_keys_for_round(3)).is_err(), "not a participant");
    let relayed = server.close_keys().unwrap();
    // Shares for a client that is not its neighbour list, then cut short: refused; the right ones pass.
    let mut shares: Vec<SecAggShares> = relayed
        .iter()
        .map(|(i, m)| clients[*i as usize].share(m).unwrap())
        .collect();
    let mut short = shares[0].clone();
    short.sealed.pop();
    assert!(server.shares(0, short).is_err());
    let mut cut = shares[0].clone();
    cut.sealed[0].ciphertext.truncate(10);
    assert!(server.shares(0, cut).is_err());
    for (i, s) in shares.drain(..).enumerate() {
        server.shares(i as u32, s).unwrap();
    }
    let delivered = server.close_shares().unwrap();
    // A delivered ciphertext that was tampered with does not open.
    let mut tampered = delivered[1].1.clone();
    tampered.sealed[0].ciphertext[3] ^= 1;
    assert!(clients[1].receive(&tampered).is_err());
    clients[0].receive(&delivered[0].1).unwrap();
    let (mut m, _) = clients[0].mask(&update(0, 8), 1.0).unwrap();
    assert!(clients[0].mask(&update(0, 8), 1.0).is_err(), "masking twice");
    m.masked.push(0);
    assert!(server.masked(0, m.clone()).is_err(), "a byte too many");
    m.masked.truncate(28);
    assert!(server.masked(0, m.clone()).is_err(), "one element short");
    m.masked.resize(32, 0);
    m.weight = f64::NAN;
    assert!(server.masked(0, m).is_err(), "NaN weight");
    // A client refuses an update of another length, or with a NaN.
    clients[2].receive(&delivered[2].1).unwrap();
    assert!(clients[2].mask(&update(2, 7), 1.0).is_err());
    assert!(clients[2].mask(&[f32::NAN; 8], 1.0).is_err());
}

fn clients_keys_for_round(round: u64) -> offsite_protocol::SecAggKeys {
    offsite_protocol::SecAggKeys {
        round,
        cipher_pk: [1; 32],
        mask_pk: [2; 32],
        self_mask_commit: [0; 32],
    }
}

#[test]
fn hostile_settings_are_refused_by_the_client() {
    let server = SecAggServer::new(params(6, 30, 3, 8)).unwrap();
    let good = server.setup(0);
    for bad in [
        offsite_protocol::SecAggSetup {
            index: 6,
            ..good.clone()
        },
        offsite_protocol::SecAggSetup {
            threshold: 1,
            ..good.clone()
        },
        offsite_protocol::SecAggSetup {
            threshold: 7,
            ..good.clone()
        },
        offsite_protocol::SecAggSetup {
            scale: good.scale * 2.0,
            ..good.clone()
        },
        offsite_protocol::SecAggSetup {
            clip: f32::INFINITY,
            ..good.clone()
        },
        offsite_protocol::SecAggSetup {
            participants: 1,
            ..good.clone()
        },
    ] {
        assert!(SecAggClient::new(bad.clone()).is_err(), "{bad:?}");
    }
    assert!(SecAggClient::new(good).is_ok());
}

#[test]
fn defaults_follow_secagg_plus() {
    assert_eq!(default_neighbours(1000), 30);
    assert_eq!(default_neighbours(100), 20);
    assert_eq!(default_neighbours(6), 5);
    assert_eq!(default_threshold(30), 16);
    assert_eq!(default_threshold(5), 4);
}
