//! The server's state after each completed round: global adapter, strategy state, round and client registry, in
//! one safetensors file (tensors `global/…` and `strategy/…`, the rest as JSON metadata) written atomically, so a
//! restarted server resumes from the last completed round with identical state.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::files::{parse_safetensors, write_safetensors};
use super::params::{hash, Params};
use super::FedError;

/// The state file's name in the state directory.
pub const STATE_FILE: &str = "server_state.safetensors";
/// Older generations looked at when loading.
const MAX_GENERATIONS: usize = 16;

/// Generation `g` of the state file (0: the newest, `STATE_FILE`).
fn generation(dir: &Path, g: usize) -> PathBuf {
    match g {
        0 => dir.join(STATE_FILE),
        g => dir.join(format!("server_state.{g}.safetensors")),
    }
}
const META_KEY: &str = "offsite_server_state";

/// What the server knows of a client.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientRecord {
    /// Rounds whose aggregate used its update.
    pub accepted: u64,
    /// Updates refused.
    pub rejected: u64,
    /// The last round it took part in.
    pub last_round: u64,
}

/// Everything a restart needs.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerState {
    /// The last completed round (0 before the first).
    pub round: u64,
    /// The global adapter.
    pub global: Params,
    /// The strategy's own state (server optimizer moments).
    pub strategy: Params,
    /// Clients by id.
    pub clients: BTreeMap<String, ClientRecord>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Meta {
    format_version: u32,
    round: u64,
    global_sha256: String,
    clients: BTreeMap<String, ClientRecord>,
}

impl ServerState {
    /// Writes the state to `dir/STATE_FILE` atomically, keeping the `keep - 1` generations before it as
    /// `server_state.1.safetensors`, `server_state.2.…` (newest first).
    pub fn save(&self, dir: &Path, keep: usize) -> Result<(), FedError> {
        for g in (1..keep.max(1)).rev() {
            let older = generation(dir, g - 1);
            if older.exists() {
                std::fs::rename(&older, generation(dir, g)).map_err(|e| FedError::File {
                    path: older.clone(),
                    reason: e.to_string(),
                })?;
            }
        }
        crate::crash_point("save-rotated");
        let meta = Meta {
            format_version: 1,
            round: self.round,
            global_sha256: hash(&self.global),
            clients: self.clients.clone(),
        };
        let json = serde_json::to_string(&meta).map_err(|e| FedError::Config(e.to_string()))?;
        let metadata = HashMap::from([(META_KEY.to_string(), json)]);
        let sets = [("global/", &self.global), ("strategy/", &self.strategy)];
        write_safetensors(&dir.join(STATE_FILE), &sets, metadata)
    }

    /// Reads the newest good state from `dir`, `None` when no round has completed there yet. A damaged or
    /// missing newest generation is skipped, with a warning, for the next one that reads and hashes correctly;
    /// when none does, the newest one's error.
    pub fn load(dir: &Path) -> Result<Option<Self>, FedError> {
        let mut first_error = None;
        for g in 0..MAX_GENERATIONS {
            let path = generation(dir, g);
            if !path.exists() {
                continue;
            }
            match Self::load_file(&path) {
                Ok(state) => {
                    if let Some(e) = &first_error {
                        tracing::warn!(error = %e, file = %path.display(), round = state.round, "the newest server state is damaged; resuming from an older generation");
                    }
                    return Ok(Some(state));
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(None), Err)
    }

    fn load_file(path: &Path) -> Result<Self, FedError> {
        let data = std::fs::read(path).map_err(|e| FedError::File {
            path: path.into(),
            reason: e.to_string(),
        })?;
        Self::from_bytes(&data).map_err(|reason| FedError::File {
            path: path.into(),
            reason,
        })
    }

    /// A state from the bytes of its file; the error says what is wrong with them.
    pub fn from_bytes(data: &[u8]) -> Result<Self, String> {
        let err = |reason: String| reason;
        let (tensors, metadata) = parse_safetensors(data)?;
        let json = metadata
            .get(META_KEY)
            .ok_or_else(|| err("not an Offsite server state (no metadata)".into()))?;
        let meta: Meta = serde_json::from_str(json).map_err(|e| err(e.to_string()))?;
        if meta.format_version != 1 {
            return Err(err(format!(
                "format_version {} (this build reads 1)",
                meta.format_version
            )));
        }
        let (mut global, mut strategy) = (Params::new(), Params::new());
        for (name, t) in tensors {
            if let Some(n) = name.strip_prefix("global/") {
                global.insert(n.into(), t);
            } else if let Some(n) = name.strip_prefix("strategy/") {
                strategy.insert(n.into(), t);
            } else {
                return Err(err(format!("unexpected tensor `{name}`")));
            }
        }
        if hash(&global) != meta.global_sha256 {
            return Err(err("the global adapter does not match its recorded SHA-256".into()));
        }
        Ok(ServerState {
            round: meta.round,
            global,
            strategy,
            clients: meta.clients,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::Tensor;

    #[test]
    fn state_round_trips_and_a_damaged_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(ServerState::load(dir.path()).unwrap(), None);
        let t = |v: &[f32]| Tensor {
            shape: vec![v.len()],
            values: v.to_vec(),
        };
        let state = ServerState {
            round: 3,
            global: Params::from([("a.w".to_string(), t(&[1.0, -2.5]))]),
            strategy: Params::from([("m.a.w".to_string(), t(&[0.1, 0.2]))]),
            clients: BTreeMap::from([(
                "alice".to_string(),
                ClientRecord {
                    accepted: 2,
                    rejected: 1,
                    last_round: 3,
                },
            )]),
        };
        state.save(dir.path(), 1).unwrap();
        assert_eq!(ServerState::load(dir.path()).unwrap(), Some(state));
        let path = dir.path().join(STATE_FILE);
        let mut bytes = std::fs::read(&path).unwrap();
        // The first data byte belongs to `global/a.w` (tensors are laid out by name).
        let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        bytes[8 + header] ^= 0x40;
        std::fs::write(&path, &bytes).unwrap();
        let e = ServerState::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("SHA-256"), "{e}");
    }

    #[test]
    fn a_damaged_newest_state_falls_back_to_the_generation_before() {
        let dir = tempfile::tempdir().unwrap();
        let state = |round: u64| ServerState {
            round,
            global: Params::from([(
                "w".to_string(),
                Tensor {
                    shape: vec![1],
                    values: vec![round as f32],
                },
            )]),
            strategy: Params::new(),
            clients: BTreeMap::new(),
        };
        for round in 1..=4 {
            state(round).save(dir.path(), 3).unwrap();
        }
        assert!(dir.path().join("server_state.2.safetensors").exists());
        assert!(
            !dir.path().join("server_state.3.safetensors").exists(),
            "only 3 generations are kept"
        );
        assert_eq!(ServerState::load(dir.path()).unwrap().unwrap().round, 4);
        std::fs::write(dir.path().join(STATE_FILE), b"torn").unwrap();
        assert_eq!(ServerState::load(dir.path()).unwrap().unwrap(), state(3));
        // A crash between the rotation and the write leaves no newest file: the one before is used.
        std::fs::remove_file(dir.path().join(STATE_FILE)).unwrap();
        assert_eq!(ServerState::load(dir.path()).unwrap().unwrap().round, 3);
    }
}
