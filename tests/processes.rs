//! `offsite-server serve` and `offsite-edge join` as separate processes: a server killed with SIGKILL in the middle
//! of every round and started again, or a client killed mid-round and started again, and the federation finishes
//! with every round's global adapter bit for bit the one an uninterrupted run has (no accepted update lost, none
//! counted twice).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn server() -> Command {
    Command::new(env!("CARGO_BIN_EXE_offsite-server"))
}

fn edge() -> PathBuf {
    let bin = Path::new(env!("CARGO_BIN_EXE_offsite-server")).with_file_name("offsite-edge");
    assert!(bin.exists(), "build the workspace first: {} is missing", bin.display());
    bin
}

fn token(state: &Path, client: &str) -> String {
    let out = server()
        .args(["token", "issue", "--client", client, "--state-dir"])
        .arg(state)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Starts `serve`; returns the process and the certificate fingerprint it prints.
fn serve(config: &Path) -> (Child, String) {
    let (srv, _, fp) = offsite_tests::spawn_serve(server().args(["serve", "--device", "cpu", "--config"]).arg(config));
    (srv, fp)
}

/// Starts client `name`; its log goes to `dir/join-NAME.log` (appended: a restarted client adds to it).
fn join(dir: &Path, config: &Path, addr: &str, fp: &str, token: &str, name: &str) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("join-{name}.log")))
        .unwrap();
    offsite_tests::edge_join(&edge(), dir, config, (addr, fp), token, name)
        .args(["--max-reconnects", "12"])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

/// A free UDP port on loopback (the restarted server must listen where the clients reconnect).
fn free_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn rounds_done(state: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(state.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// A process to kill with SIGKILL (and start again) once round `after` is in `metrics.jsonl`, so the next round's
/// tasks are out.
#[derive(Clone, Copy)]
enum Kill {
    Server {
        after: usize,
    },
    /// Client `index` (0: "a", 1: "b").
    Client {
        after: usize,
        index: usize,
    },
}

/// Runs a 5-round federation of two client processes (both needed in every round), killing and restarting
/// processes as `kills` say, in order. Every kill comes after round 1 or 2, so at least three rounds remain and the
/// federation cannot have finished before a killed process is back. Returns the metrics rows.
fn federation(dir: &Path, kills: &[Kill]) -> Vec<serde_json::Value> {
    let config = offsite_tests::tiny_federation(dir, ROUNDS, 2);
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("listen = \"127.0.0.1:0\"", &format!("listen = \"{addr}\""))
        // No evaluation between a round's save and its metrics row: a kill in that window would leave a saved round
        // without its row (see the issue notes), which is not what this test is about.
        .replace("[federation]\n", "[federation]\neval_every = 0\n");
    std::fs::write(&config, text).unwrap();
    let state = dir.join("state");
    let tokens = [token(&state, "a"), token(&state, "b")];
    let (mut srv, fp) = serve(&config);
    let names = ["a", "b"];
    let mut clients: Vec<Child> = names
        .iter()
        .zip(&tokens)
        .map(|(n, t)| join(dir, &config, &addr, &fp, t, n))
        .collect();
    for &kill in kills {
        let k = match kill {
            Kill::Server { after } | Kill::Client { after, .. } => after,
        };
        let until = Instant::now() + Duration::from_secs(120);
        while rounds_done(&state).len() < k {
            assert!(Instant::now() < until, "round {k} did not complete");
            std::thread::sleep(Duration::from_millis(20));
        }
        match kill {
            Kill::Server { .. } => {
                srv.kill().unwrap();
                srv.wait().unwrap();
                let (again, fp2) = serve(&config);
                assert_eq!(fp2, fp, "the restarted server keeps its certificate");
                srv = again;
            }
            Kill::Client { index, .. } => {
                // Killed while training or uploading round k + 1; its successor (same token, same data) takes the
                // session over, and the round is repeated with the same settings.
                clients[index].kill().unwrap();
                clients[index].wait().unwrap();
                clients[index] = join(dir, &config, &addr, &fp, &tokens[index], names[index]);
            }
        }
    }
    for (c, name) in clients.iter_mut().zip(names) {
        if !c.wait().unwrap().success() {
            let log = std::fs::read_to_string(dir.join(format!("join-{name}.log"))).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            panic!(
                "client {name} failed; the end of its log:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    }
    assert!(srv.wait().unwrap().success());
    rounds_done(&state)
}

const ROUNDS: u64 = 5;

fn rounds(m: &[serde_json::Value]) -> Vec<u64> {
    m.iter().map(|r| r["round"].as_u64().unwrap()).collect()
}

/// Every round of `b` has the global adapter of the same round of the uninterrupted `a`, and both clients in it.
fn same_adapters(a: &[serde_json::Value], b: &[serde_json::Value]) {
    for y in b {
        let x = &a[y["round"].as_u64().unwrap() as usize - 1];
        assert_eq!(y["participants"], 2);
        assert_eq!(x["global_sha256"], y["global_sha256"], "round {}", x["round"]);
    }
}

#[test]
fn killed_servers_and_clients_resume_to_the_adapters_of_an_uninterrupted_run() {
    let whole = tempfile::tempdir().unwrap();
    let a = federation(whole.path(), &[]);
    assert_eq!(rounds(&a), [1, 2, 3, 4, 5]);
    // The server killed in round 2 and again in round 3. A kill between a round's save and its metrics row leaves
    // the saved round without a row (a known gap, in the issue notes); the restarted server then goes on from the
    // next round. Either way no round runs twice, and every round's adapter is the uninterrupted run's.
    let killed = tempfile::tempdir().unwrap();
    let b = federation(killed.path(), &[Kill::Server { after: 1 }, Kill::Server { after: 2 }]);
    let rb = rounds(&b);
    assert!(
        rb.windows(2).all(|w| w[0] < w[1]) && rb.last() == Some(&ROUNDS),
        "{rb:?}"
    );
    same_adapters(&a, &b);
    // A client killed in round 2 and one killed in round 3, each started again.
    let clients = tempfile::tempdir().unwrap();
    let c = federation(
        clients.path(),
        &[Kill::Client { after: 1, index: 0 }, Kill::Client { after: 2, index: 1 }],
    );
    assert_eq!(rounds(&c), [1, 2, 3, 4, 5]);
    same_adapters(&a, &c);
}
