//! `offsite-server serve` and `offsite-edge join` as separate processes: a server killed with SIGKILL in the middle
//! of a round and started again finishes the federation, and its final global adapter is bit for bit the one an
//! uninterrupted run ends with (no accepted update lost, none counted twice).

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

fn join(dir: &Path, config: &Path, addr: &str, fp: &str, token: &str, name: &str) -> Child {
    offsite_tests::edge_join(&edge(), dir, config, (addr, fp), token, name)
        .args(["--max-reconnects", "12"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
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

/// Runs a 3-round federation of two client processes; with `kill_after = Some(k)` the server is killed (SIGKILL)
/// once round k is in `metrics.jsonl` — round k + 1's tasks are out — and started again. Returns the metrics rows.
fn federation(dir: &Path, kill_after: Option<usize>) -> Vec<serde_json::Value> {
    let config = offsite_tests::tiny_federation(dir, 3, 2);
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
    let mut clients: Vec<Child> = ["a", "b"]
        .iter()
        .zip(&tokens)
        .map(|(n, t)| join(dir, &config, &addr, &fp, t, n))
        .collect();
    if let Some(k) = kill_after {
        let until = Instant::now() + Duration::from_secs(120);
        while rounds_done(&state).len() < k {
            assert!(Instant::now() < until, "round {k} did not complete");
            std::thread::sleep(Duration::from_millis(20));
        }
        srv.kill().unwrap();
        srv.wait().unwrap();
        let (again, fp2) = serve(&config);
        assert_eq!(fp2, fp, "the restarted server keeps its certificate");
        srv = again;
    }
    for c in &mut clients {
        assert!(c.wait().unwrap().success(), "a client failed");
    }
    assert!(srv.wait().unwrap().success());
    rounds_done(&state)
}

#[test]
fn a_server_killed_mid_round_resumes_to_the_adapter_of_an_uninterrupted_run() {
    let whole = tempfile::tempdir().unwrap();
    let killed = tempfile::tempdir().unwrap();
    let a = federation(whole.path(), None);
    let b = federation(killed.path(), Some(1));
    let rounds = |m: &[serde_json::Value]| m.iter().map(|r| r["round"].as_u64().unwrap()).collect::<Vec<_>>();
    assert_eq!(rounds(&a), [1, 2, 3]);
    // A kill between round 2's save and its metrics row leaves the saved round without a row (a known gap, in the
    // issue notes); the restarted server then goes on from round 3. Either way no round runs twice, and every
    // round's global adapter is the uninterrupted run's, bit for bit.
    let rb = rounds(&b);
    assert!(rb == [1, 2, 3] || rb == [1, 3], "{rb:?}");
    for y in &b {
        let x = &a[y["round"].as_u64().unwrap() as usize - 1];
        assert_eq!(y["participants"], 2);
        assert_eq!(x["global_sha256"], y["global_sha256"], "round {}", x["round"]);
    }
}
