//! `offsite-server serve` and `offsite-edge join` as separate processes: a server killed with SIGKILL in the middle
//! of a round and started again, or a client killed mid-round and started again, or either stopped dead at a crash
//! point (the server between a round's metrics row and its save, after rotating the saved generations, before the
//! new state's rename; a client with half its update sent), and the federation finishes with every round's metrics
//! row and global adapter bit for bit those of an uninterrupted run (no accepted update lost, none counted twice).

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

/// Sets `FAILPOINTS` (the crash points to arm, see `offsite_fed::crash_point`) or clears it.
fn arm<'a>(c: &'a mut Command, points: Option<&str>) -> &'a mut Command {
    match points {
        Some(p) => c.env("FAILPOINTS", p),
        None => c.env_remove("FAILPOINTS"),
    }
}

/// Starts `serve` with crash points `points`; returns the process and the certificate fingerprint it prints.
fn serve(config: &Path, points: Option<&str>) -> (Child, String) {
    let mut c = server();
    arm(&mut c, points)
        .args(["serve", "--device", "cpu", "--config"])
        .arg(config);
    let (srv, _, fp) = offsite_tests::spawn_serve(&mut c);
    (srv, fp)
}

/// Starts client `name` with crash points `points`; its log goes to `dir/join-NAME.log` (appended: a restarted
/// client adds to it).
fn join(dir: &Path, config: &Path, (addr, fp): (&str, &str), token: &str, name: &str, points: Option<&str>) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("join-{name}.log")))
        .unwrap();
    let mut c = offsite_tests::edge_join(&edge(), dir, config, (addr, fp), token, name);
    arm(&mut c, points)
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

/// A 5-round federation of two clients (both needed in every round) in `dir`, on a fixed free port (a restarted
/// server must listen where the clients reconnect): the config, the address and the clients' tokens.
fn setup(dir: &Path) -> (PathBuf, String, [String; 2]) {
    let config = offsite_tests::tiny_federation(dir, ROUNDS, 2);
    let addr = format!("127.0.0.1:{}", free_port());
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("listen = \"127.0.0.1:0\"", &format!("listen = \"{addr}\""));
    std::fs::write(&config, text).unwrap();
    let state = dir.join("state");
    let tokens = [token(&state, "a"), token(&state, "b")];
    (config, addr, tokens)
}

const NAMES: [&str; 2] = ["a", "b"];

/// Waits for a client that is done; panics with the end of its log when it failed.
fn finished(dir: &Path, c: &mut Child, name: &str) {
    if !c.wait().unwrap().success() {
        let log = std::fs::read_to_string(dir.join(format!("join-{name}.log"))).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        panic!(
            "client {name} failed; the end of its log:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
}

/// Runs the federation of [`setup`], killing and restarting processes as `kills` say, in order. Every kill comes
/// after round 1 or 2, so at least three rounds remain and the federation cannot have finished before a killed
/// process is back. Returns the metrics rows.
fn federation(dir: &Path, kills: &[Kill]) -> Vec<serde_json::Value> {
    let (config, addr, tokens) = setup(dir);
    let state = dir.join("state");
    let (mut srv, fp) = serve(&config, None);
    let mut clients: Vec<Child> = NAMES
        .iter()
        .zip(&tokens)
        .map(|(n, t)| join(dir, &config, (&addr, &fp), t, n, None))
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
                let (again, fp2) = serve(&config, None);
                assert_eq!(fp2, fp, "the restarted server keeps its certificate");
                srv = again;
            }
            Kill::Client { index, .. } => {
                // Killed while training or uploading round k + 1; its successor (same token, same data) takes the
                // session over, and the round is repeated with the same settings.
                clients[index].kill().unwrap();
                clients[index].wait().unwrap();
                clients[index] = join(dir, &config, (&addr, &fp), &tokens[index], NAMES[index], None);
            }
        }
    }
    for (c, name) in clients.iter_mut().zip(NAMES) {
        finished(dir, c, name);
    }
    assert!(srv.wait().unwrap().success());
    rounds_done(&state)
}

/// Whether the process stopped at an armed crash point (which aborts it).
#[cfg(unix)]
fn crashed(status: std::process::ExitStatus) -> bool {
    use std::os::unix::process::ExitStatusExt;
    status.signal() == Some(6) // SIGABRT
}

/// Runs the federation of [`setup`] with crash points: the server is started with `server[0]` armed, and each time
/// it dies at its point it is started again with the next (none after the last); client `i` likewise with
/// `clients[i]`. Every armed point must be reached, and the federation must finish. Returns the metrics rows.
#[cfg(unix)]
fn crashing_federation(dir: &Path, server: &[&str], clients: [&[&str]; 2]) -> Vec<serde_json::Value> {
    let (config, addr, tokens) = setup(dir);
    let mut server_points = server.iter().copied();
    let (mut srv, fp) = serve(&config, server_points.next());
    let mut client_points = clients.map(|p| p.iter().copied());
    let start = |i: usize, points: Option<&str>| join(dir, &config, (&addr, &fp), &tokens[i], NAMES[i], points);
    let mut procs: Vec<Option<Child>> = (0..2).map(|i| Some(start(i, client_points[i].next()))).collect();
    let (mut server_crashes, mut client_crashes) = (0, [0; 2]);
    let until = Instant::now() + Duration::from_secs(300);
    loop {
        assert!(Instant::now() < until, "the federation did not finish");
        if let Some(status) = srv.try_wait().unwrap() {
            if status.success() {
                break;
            }
            assert!(
                crashed(status) && server_crashes < server.len(),
                "the server failed: {status}"
            );
            server_crashes += 1;
            let (again, fp2) = serve(&config, server_points.next());
            assert_eq!(fp2, fp, "the restarted server keeps its certificate");
            srv = again;
        }
        for i in 0..2 {
            let Some(c) = procs[i].as_mut() else { continue };
            match c.try_wait().unwrap() {
                Some(status) if crashed(status) && client_crashes[i] < clients[i].len() => {
                    client_crashes[i] += 1;
                    procs[i] = Some(start(i, client_points[i].next()));
                }
                Some(_) => {
                    finished(dir, procs[i].as_mut().unwrap(), NAMES[i]);
                    procs[i] = None;
                }
                None => {}
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for (i, c) in procs.iter_mut().enumerate() {
        if let Some(c) = c {
            finished(dir, c, NAMES[i]);
        }
    }
    assert_eq!(server_crashes, server.len(), "every server crash point was reached");
    assert_eq!(
        client_crashes,
        clients.map(<[&str]>::len),
        "every client crash point was reached"
    );
    rounds_done(&dir.join("state"))
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
    // The server killed in round 2 and again in round 3: every round has its one row, and its adapter is the
    // uninterrupted run's.
    let killed = tempfile::tempdir().unwrap();
    let b = federation(killed.path(), &[Kill::Server { after: 1 }, Kill::Server { after: 2 }]);
    assert_eq!(rounds(&b), [1, 2, 3, 4, 5]);
    same_adapters(&a, &b);
    // A client killed in round 2 and one killed in round 3, each started again.
    let clients = tempfile::tempdir().unwrap();
    let c = federation(
        clients.path(),
        &[Kill::Client { after: 1, index: 0 }, Kill::Client { after: 2, index: 1 }],
    );
    assert_eq!(rounds(&c), [1, 2, 3, 4, 5]);
    same_adapters(&a, &c);
    // Crash points. The server: in round 2 between its metrics row and its save (the row is cut at restart and
    // written again by the repeated round); in round 3 (counting from the restart: the repeated round 2 passes)
    // after the older state generations were rotated, before the new state is written (the newest file is then
    // missing, and the one before it is used); in round 4 with the new state complete in its temporary file but not
    // renamed. Client a with half its first update sent, client b with half its third (rounds repeat when a client is lost,
    // so which round that is depends on the others).
    #[cfg(unix)]
    {
        let crashes = tempfile::tempdir().unwrap();
        let d = crashing_federation(
            crashes.path(),
            &[
                "before-save=1*off->return",
                "save-rotated=1*off->return",
                "before-rename:server_state.safetensors=1*off->return",
            ],
            [&["mid-upload=return(300)"], &["mid-upload=2*off->return(300)"]],
        );
        assert_eq!(rounds(&d), [1, 2, 3, 4, 5]);
        same_adapters(&a, &d);
    }
}
