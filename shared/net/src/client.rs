//! The edge client's join loop: connect (pinned fingerprint or CA), authenticate, download or reuse the cached
//! emulator (resuming an interrupted download), then train each task on local data and upload the delta; reconnect
//! with backoff after a dropped connection.

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use indicatif::ProgressStyle;
use offsite_fed::params::{from_wire, to_wire};
use offsite_fed::{write_safetensors, LocalOutcome, LocalTask, LocalTrainer, Params};
use offsite_protocol::{ClientConn, ClientEvent, EmulatorOffer, Hello, Limits, ProtocolError, Task, Update};
use sha2::{Digest, Sha256};
use tracing::{info, warn};
use tracing_indicatif::span_ext::IndicatifSpanExt;

use super::tls::{quic_client, Identity, Trust};
use super::{NetError, READ_BUF};

/// How to join a federation.
#[derive(Debug, Clone)]
pub struct JoinSettings {
    /// The server's address.
    pub server: SocketAddr,
    /// The name the server's certificate carries.
    pub server_name: String,
    /// How the server is trusted.
    pub trust: Trust,
    /// This client's token.
    pub token: String,
    /// A name for the server's logs.
    pub name: String,
    /// Emulators are cached here by SHA-256.
    pub cache_dir: PathBuf,
    /// Reconnection attempts after a dropped connection before giving up.
    pub max_reconnects: u32,
    /// Also write each uploaded delta (as the server will decode it) to `DIR/round-N.safetensors`.
    pub save_updates: Option<PathBuf>,
    /// A client certificate and key (PEM) for servers that require mutual TLS.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

/// What a client did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JoinSummary {
    /// Rounds trained and uploaded.
    pub rounds: u64,
    /// Updates the server accepted.
    pub accepted: u64,
    /// Connections made (1 + reconnections).
    pub connections: u32,
}

/// Joins the federation and works until the server says the federation is finished, training each task with
/// `trainer` on the local data (which never leaves this machine).
pub async fn join(settings: JoinSettings, trainer: Box<dyn LocalTrainer>) -> Result<JoinSummary, NetError> {
    let bind: SocketAddr = if settings.server.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let mut endpoint = quinn::Endpoint::client(bind).map_err(|e| NetError::Connection(e.to_string()))?;
    let identity = match &settings.client_cert {
        Some((cert, key)) => Some(Identity::from_pem(cert, key)?),
        None => None,
    };
    endpoint.set_default_client_config(quic_client(&settings.trust, identity)?);
    // Moved into a blocking thread for each task and back (lost only if that thread panics).
    let mut worker = Some(trainer);
    let mut summary = JoinSummary::default();
    let mut failures = 0u32;
    loop {
        summary.connections += 1;
        let rounds_before = summary.rounds;
        let result = session(&endpoint, &settings, &mut worker, &mut summary).await;
        match result {
            Ok(()) => {
                endpoint.wait_idle().await;
                return Ok(summary);
            }
            Err(e @ (NetError::Connection(_) | NetError::Protocol(_))) => {
                if summary.rounds > rounds_before {
                    failures = 0;
                }
                failures += 1;
                if failures > settings.max_reconnects {
                    return Err(e);
                }
                let wait = Duration::from_millis((250u64 << failures.min(7)).min(30_000));
                warn!(error = %e, retry_in = ?wait, attempt = failures, "connection lost; reconnecting");
                tokio::time::sleep(wait).await;
            }
            Err(e) => return Err(e),
        }
    }
}

fn conn_err(e: impl std::fmt::Display) -> NetError {
    NetError::Connection(e.to_string())
}

struct Download {
    offer: EmulatorOffer,
    part: PathBuf,
    file: std::fs::File,
    /// Bytes in `part` so far.
    received: u64,
    /// The progress bar (drawn by the binaries' tracing-indicatif layer while the span lives).
    bar: tracing::Span,
}

/// One connection, until goodbye (Ok), refusal or failure.
async fn session(
    endpoint: &quinn::Endpoint,
    s: &JoinSettings,
    worker: &mut Option<Box<dyn LocalTrainer>>,
    summary: &mut JoinSummary,
) -> Result<(), NetError> {
    let conn = endpoint
        .connect(s.server, &s.server_name)
        .map_err(conn_err)?
        .await
        .map_err(conn_err)?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(conn_err)?;
    let (mut sm, hello) = ClientConn::new(
        Limits::default(),
        Hello {
            client_name: s.name.clone(),
            token: s.token.clone(),
        },
    );
    send.write_all(&hello).await.map_err(conn_err)?;
    let mut buf = vec![0u8; READ_BUF];
    let mut emulator: Option<(PathBuf, String)> = None;
    let mut download: Option<Download> = None;
    // This round's secure-aggregation state, from its setup to its reveal.
    let mut secure = None;
    loop {
        let n = match recv.read(&mut buf).await.map_err(conn_err)? {
            Some(n) => n,
            None => {
                sm.finish()?;
                return Err(NetError::Connection("the server closed the stream".into()));
            }
        };
        for event in sm.receive(&buf[..n])? {
            match event {
                ClientEvent::Welcome(w) => {
                    std::fs::create_dir_all(&s.cache_dir).map_err(|e| file_err(&s.cache_dir, e))?;
                    let path = s.cache_dir.join(format!("{}.emu", w.emulator.sha256));
                    info!(client = %w.client_id, emulator = %w.emulator.sha256, "authenticated");
                    emulator = Some((path.clone(), w.adapter.clone()));
                    if cached(&path, &w.emulator.sha256).await? {
                        info!(path = %path.display(), "emulator cached (hash checked)");
                        send.write_all(&sm.ready()?).await.map_err(conn_err)?;
                    } else {
                        let d = start_download(&s.cache_dir, w.emulator)?;
                        let from = (d.received / d.offer.chunk_size.max(1) as u64) as u32;
                        if from >= d.offer.chunks() {
                            finish_download(d, &path)?;
                            send.write_all(&sm.ready()?).await.map_err(conn_err)?;
                        } else {
                            send.write_all(&sm.fetch(from)?).await.map_err(conn_err)?;
                            download = Some(d);
                        }
                    }
                }
                ClientEvent::Chunk(c) => {
                    let Some(d) = download.as_mut() else {
                        return Err(NetError::Connection(
                            "a chunk arrived with no download under way".into(),
                        ));
                    };
                    d.file.write_all(&c.data).map_err(|e| file_err(&d.part, e))?;
                    d.received += c.data.len() as u64;
                    d.bar.pb_inc(c.data.len() as u64);
                    if c.index + 1 == d.offer.chunks() {
                        if let (Some(d), Some((path, _))) = (download.take(), emulator.as_ref()) {
                            finish_download(d, path)?;
                            send.write_all(&sm.ready()?).await.map_err(conn_err)?;
                        }
                    }
                }
                ClientEvent::Task(task) => {
                    // The state machine passes tasks only after a welcome.
                    let Some((path, adapter)) = emulator.clone() else {
                        return Err(NetError::Connection("a task arrived before the welcome".into()));
                    };
                    if task.secagg.is_some() && secure.is_none() {
                        warn!(
                            round = task.round,
                            "a securely aggregated task without its key exchange; skipped"
                        );
                        continue;
                    }
                    let (task, outcome) = run_task(worker, path, adapter, task).await?;
                    let frame = match &task.secagg {
                        None => sm.update(&plain_update(s, &task, outcome)?),
                        Some(st) => match secagg::masked(&mut secure, &outcome, st) {
                            Some(m) => {
                                save_update(s, task.round, &outcome.delta, outcome.num_examples)?;
                                sm.secagg(&m)
                            }
                            None => continue,
                        },
                    };
                    // Too large for the server: no reconnect would change that.
                    let frame = frame.map_err(|e| match e {
                        e @ ProtocolError::UpdateTooLarge { .. } => NetError::Config(e.to_string()),
                        e => e.into(),
                    })?;
                    // In two writes, so a crash point can stop the process with half the frame sent.
                    let (head, tail) = frame.split_at(frame.len() / 2);
                    send.write_all(head).await.map_err(conn_err)?;
                    offsite_fed::crash_point("mid-upload");
                    send.write_all(tail).await.map_err(conn_err)?;
                    summary.rounds += 1;
                }
                ClientEvent::SecAgg(m) => {
                    if let Some(reply) = secagg::answer(&mut secure, m) {
                        send.write_all(&sm.secagg(&reply)?).await.map_err(conn_err)?;
                    }
                }
                ClientEvent::Ack(a) => {
                    if a.accepted {
                        summary.accepted += 1;
                        info!(round = a.round, "update accepted");
                    } else {
                        warn!(round = a.round, reason = ?a.reason, "update rejected");
                    }
                }
                ClientEvent::Goodbye(reason) => {
                    info!(%reason, "server said goodbye");
                    let _ = send.write_all(&sm.goodbye("bye")).await;
                    let _ = send.finish();
                    let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
                    conn.close(0u32.into(), b"bye");
                    return Ok(());
                }
                ClientEvent::Rejected(reason) => return Err(NetError::Refused(reason)),
            }
        }
    }
}

fn file_err(path: &Path, e: impl std::fmt::Display) -> NetError {
    NetError::File {
        path: path.into(),
        reason: e.to_string(),
    }
}

/// Opens (or resumes) `<sha>.part`, cut back to whole chunks.
fn start_download(dir: &Path, offer: EmulatorOffer) -> Result<Download, NetError> {
    let part = dir.join(format!("{}.part", offer.sha256));
    let have = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0).min(offer.size);
    let keep = have / offer.chunk_size.max(1) as u64 * offer.chunk_size as u64;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&part)
        .map_err(|e| file_err(&part, e))?;
    file.set_len(keep).map_err(|e| file_err(&part, e))?;
    if keep > 0 {
        info!(bytes = keep, of = offer.size, "resuming the emulator download");
    }
    let bar = tracing::info_span!("download", indicatif.pb_show = tracing::field::Empty);
    bar.pb_set_style(
        &ProgressStyle::with_template("emulator {bar:30} {bytes}/{total_bytes} {bytes_per_sec} [{eta}]")
            .expect("static template"),
    );
    bar.pb_set_length(offer.size);
    bar.pb_set_position(keep);
    bar.pb_start();
    Ok(Download {
        offer,
        part,
        file,
        received: keep,
        bar,
    })
}

/// SHA-256 of a file's content.
fn sha256_file(path: &Path) -> Result<String, NetError> {
    let mut f = std::fs::File::open(path).map_err(|e| file_err(path, e))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(|e| file_err(path, e))?;
    Ok(hex::encode(h.finalize()))
}

/// Whether the cached emulator at `path` is the one offered: its content hashed, not trusted by its name (a file
/// damaged or replaced in the cache is removed and downloaded again).
async fn cached(path: &Path, sha256: &str) -> Result<bool, NetError> {
    if !path.exists() {
        return Ok(false);
    }
    let p = path.to_path_buf();
    let got = tokio::task::spawn_blocking(move || sha256_file(&p))
        .await
        .map_err(|e| NetError::Connection(e.to_string()))??;
    if got == sha256 {
        return Ok(true);
    }
    warn!(path = %path.display(), got = %got, "the cached emulator does not match its name; downloading it again");
    std::fs::remove_file(path).map_err(|e| file_err(path, e))?;
    Ok(false)
}

/// Checks the whole file's SHA-256 and moves it into the cache.
fn finish_download(d: Download, path: &Path) -> Result<(), NetError> {
    drop(d.bar);
    drop(d.file);
    let got = sha256_file(&d.part)?;
    if got != d.offer.sha256 {
        let _ = std::fs::remove_file(&d.part);
        return Err(NetError::Connection(format!(
            "the downloaded emulator hashes to {got}, the server offered {}; discarded",
            d.offer.sha256
        )));
    }
    std::fs::rename(&d.part, path).map_err(|e| file_err(path, e))?;
    info!(path = %path.display(), bytes = d.offer.size, "emulator downloaded");
    Ok(())
}

/// Trains the task in a blocking thread on the local trainer.
async fn run_task(
    worker: &mut Option<Box<dyn LocalTrainer>>,
    emulator: PathBuf,
    adapter: String,
    task: Task,
) -> Result<(Task, LocalOutcome), NetError> {
    let global = from_wire(&task.global)?;
    let mut trainer = worker
        .take()
        .ok_or_else(|| NetError::Config("the local trainer was lost (its thread panicked)".into()))?;
    let (trainer, outcome) = tokio::task::spawn_blocking(move || {
        let local = LocalTask {
            round: task.round,
            emulator: &emulator,
            adapter: &adapter,
            global: &global,
            settings: &task.settings,
            proximal_mu: task.proximal_mu,
        };
        let outcome = trainer.train(&local);
        (trainer, outcome.map(|o| (task, o)))
    })
    .await
    .map_err(|e| NetError::Config(format!("local training stopped: {e}")))?;
    *worker = Some(trainer);
    Ok(outcome?)
}

/// The update of a plain round: the delta encoded as the task asks (and kept as sent under `--save-updates`).
fn plain_update(s: &JoinSettings, task: &Task, outcome: LocalOutcome) -> Result<Update, NetError> {
    let round = task.round;
    let delta = to_wire(&outcome.delta, task.update_encoding);
    save_update(s, round, &from_wire(&delta)?, outcome.num_examples)?;
    Ok(Update {
        round,
        num_examples: outcome.num_examples,
        train_loss: outcome.train_loss,
        steps: outcome.steps,
        delta,
    })
}

/// Under `--save-updates`: the round's delta as this client contributed it (as sent, or as masked for a secure sum).
fn save_update(s: &JoinSettings, round: u64, delta: &Params, num_examples: u64) -> Result<(), NetError> {
    let Some(dir) = &s.save_updates else { return Ok(()) };
    let meta = HashMap::from([
        ("round".to_string(), round.to_string()),
        ("num_examples".to_string(), num_examples.to_string()),
    ]);
    write_safetensors(&dir.join(format!("round-{round}.safetensors")), &[("", delta)], meta)?;
    Ok(())
}

mod secagg;
