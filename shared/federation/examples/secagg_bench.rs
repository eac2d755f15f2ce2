//! Cost of secure aggregation (SecAgg+) per client and on the server, for 10, 100 and 1000 clients, and its error
//! against the plain weighted mean. Every message is bincode-encoded as on the wire to count bytes; each side's work
//! is timed on its own (one thread, sequentially: the clients' times are per client, the server's for the round).
//!   cargo run --release -p offsite-fed --example secagg_bench -- [ELEMENTS (100000)] [DROP_PERCENT (5)] [N...]
//! A share of the clients (DROP_PERCENT) drops after sharing its secrets and before sending its update, the costly
//! case: the server rebuilds their mask keys and removes their pairwise masks.

use std::time::{Duration, Instant};

use offsite_fed::{default_neighbours, default_threshold, SecAggClient, SecAggParams, SecAggServer};

/// Runs `f`, adding its time to `acc`.
fn timed<T>(acc: &mut Duration, f: impl FnOnce() -> T) -> T {
    let start = Instant::now();
    let out = f();
    *acc += start.elapsed();
    out
}

fn bytes<T: bincode::Encode>(msg: &T) -> usize {
    bincode::encode_to_vec(msg, bincode::config::standard())
        .expect("messages encode")
        .len()
}

struct Row {
    n: u32,
    k: u32,
    t: u32,
    up: f64,
    down: f64,
    client: Duration,
    server: Duration,
    recovered: usize,
    max_err: f64,
    bound: f64,
}

fn run(n: u32, len: usize, drop_percent: u32) -> Row {
    let k = default_neighbours(n);
    let t = default_threshold(k.min(n - 1));
    let params = SecAggParams {
        round: 1,
        participants: n,
        neighbours: k,
        threshold: t,
        graph_seed: 5,
        clip: 1.0,
        length: len as u64,
    };
    // ⌈n · drop%⌉ clients, spread evenly over the indices.
    let drops = (n * drop_percent).div_ceil(100);
    let dropped = |i: u32| drops > 0 && (0..drops).any(|j| j * n / drops == i);
    let update = |i: u32| -> Vec<f32> {
        (0..len)
            .map(|j| ((i * 7 + j as u32) as f32 * 0.001).sin() * 0.01)
            .collect()
    };
    let weight = |i: u32| 0.5 + f64::from(i % 2) * 0.5;
    // Bytes by client: a dropped client sends no update, so the mean is over the clients whose update arrived.
    let (mut up, mut down) = (vec![0usize; n as usize], vec![0usize; n as usize]);
    let (mut client_time, mut server_time) = (Duration::ZERO, Duration::ZERO);

    let mut server = timed(&mut server_time, || SecAggServer::new(params.clone()).unwrap());
    let mut clients = Vec::new();
    for i in 0..n {
        let setup = server.setup(i);
        down[i as usize] += bytes(&setup);
        let (c, keys) = timed(&mut client_time, || SecAggClient::new(setup).unwrap());
        up[i as usize] += bytes(&keys);
        timed(&mut server_time, || server.keys(i, keys).unwrap());
        clients.push(c);
    }
    for (i, msg) in timed(&mut server_time, || server.close_keys().unwrap()) {
        down[i as usize] += bytes(&msg);
        let shares = timed(&mut client_time, || clients[i as usize].share(&msg).unwrap());
        up[i as usize] += bytes(&shares);
        timed(&mut server_time, || server.shares(i, shares).unwrap());
    }
    for (i, msg) in timed(&mut server_time, || server.close_shares().unwrap()) {
        down[i as usize] += bytes(&msg);
        timed(&mut client_time, || clients[i as usize].receive(&msg).unwrap());
        if dropped(i) {
            continue;
        }
        let x = update(i);
        let (masked, _) = timed(&mut client_time, || clients[i as usize].mask(&x, weight(i)).unwrap());
        up[i as usize] += bytes(&masked);
        timed(&mut server_time, || server.masked(i, masked).unwrap());
    }
    for (i, msg) in timed(&mut server_time, || server.close_masked().unwrap()) {
        down[i as usize] += bytes(&msg);
        let reveal = timed(&mut client_time, || clients[i as usize].reveal(&msg).unwrap());
        up[i as usize] += bytes(&reveal);
        timed(&mut server_time, || server.reveal(i, reveal).unwrap());
    }
    let sum = timed(&mut server_time, || server.finish().unwrap());

    // The plain weighted mean, directly.
    let survivors: Vec<u32> = (0..n).filter(|&i| !dropped(i)).collect();
    let w: f64 = survivors.iter().map(|&i| weight(i)).sum();
    let mut plain = vec![0f64; len];
    for &i in &survivors {
        for (p, x) in plain.iter_mut().zip(update(i)) {
            *p += weight(i) * f64::from(x) / w;
        }
    }
    let max_err = sum
        .mean
        .iter()
        .zip(&plain)
        .map(|(a, b)| (f64::from(*a) - b).abs())
        .fold(0.0, f64::max);
    assert_eq!(sum.contributors, survivors, "the sum holds exactly the survivors");
    Row {
        n,
        k: k.min(n - 1),
        t,
        up: survivors.iter().map(|&i| up[i as usize]).sum::<usize>() as f64 / survivors.len() as f64,
        down: survivors.iter().map(|&i| down[i as usize]).sum::<usize>() as f64 / survivors.len() as f64,
        client: client_time / n,
        server: server_time,
        recovered: sum.recovered,
        max_err,
        bound: sum.error_bound,
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let len: usize = args
        .first()
        .map_or(100_000, |a| a.parse().expect("ELEMENTS is a number"));
    let drop: u32 = args.get(1).map_or(5, |a| a.parse().expect("DROP_PERCENT is a number"));
    let ns: Vec<u32> = if args.len() > 2 {
        args[2..].iter().map(|a| a.parse().expect("N")).collect()
    } else {
        vec![10, 100, 1000]
    };
    let plain_up = 4.0 * len as f64;
    println!(
        "SecAgg+ on {len} f32 elements, ⌈{drop}%⌉ of clients dropping after sharing (plain update: {:.0} KiB)",
        plain_up / 1024.0
    );
    println!();
    println!("| clients | neighbours | threshold | up per surviving client | down per surviving client | up vs plain | client time (mean) | server time | masks recovered | max error | bound |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for n in ns {
        let r = run(n, len, drop);
        println!(
            "| {} | {} | {} | {:.1} KiB | {:.1} KiB | {:.3}× | {:.1} ms | {:.1} ms | {} | {:.2e} | {:.2e} |",
            r.n,
            r.k,
            r.t,
            r.up / 1024.0,
            r.down / 1024.0,
            r.up / plain_up,
            r.client.as_secs_f64() * 1e3,
            r.server.as_secs_f64() * 1e3,
            r.recovered,
            r.max_err,
            r.bound
        );
    }
}
