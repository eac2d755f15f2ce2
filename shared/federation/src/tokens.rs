//! Client tokens. The server stores only SHA-256 hashes (`tokens.json` in its state directory); a token is shown
//! once when issued. Revoking removes nothing: the entry is marked and refused from then on. The file is re-read on
//! every hello, so issuing and revoking work while the server runs.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::FedError;

/// One issued token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenEntry {
    /// The client's id (unique).
    pub client_id: String,
    /// SHA-256 of the token (hex).
    pub sha256: String,
    /// Refused from now on.
    pub revoked: bool,
}

/// The token file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenStore {
    /// Format version (1).
    pub format_version: u32,
    /// Issued tokens.
    pub tokens: Vec<TokenEntry>,
}

fn hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

impl TokenStore {
    /// The store's file in a state directory.
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join("tokens.json")
    }

    /// Reads the store (empty when the file does not exist).
    pub fn load(path: &Path) -> Result<Self, FedError> {
        if !path.exists() {
            return Ok(TokenStore {
                format_version: 1,
                tokens: Vec::new(),
            });
        }
        let err = |reason: String| FedError::File {
            path: path.into(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        Self::from_json(&text).map_err(err)
    }

    /// The store from its JSON text; the error says what is wrong with it.
    pub fn from_json(text: &str) -> Result<Self, String> {
        let store: TokenStore = serde_json::from_str(text).map_err(|e| e.to_string())?;
        if store.format_version != 1 {
            return Err(format!("format_version {} (this build reads 1)", store.format_version));
        }
        Ok(store)
    }

    /// Writes the store atomically.
    pub fn save(&self, path: &Path) -> Result<(), FedError> {
        let json = serde_json::to_vec_pretty(self).map_err(|e| FedError::Config(e.to_string()))?;
        super::files::write_atomic(path, &json)
    }

    /// Issues a new random token for `client_id` (replacing a revoked one); returns the token.
    pub fn issue(&mut self, client_id: &str) -> Result<String, FedError> {
        if client_id.is_empty()
            || !client_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(FedError::Config(format!(
                "client id `{client_id}`: use letters, digits, `-`, `_` or `.`"
            )));
        }
        if self.tokens.iter().any(|t| t.client_id == client_id && !t.revoked) {
            return Err(FedError::Config(format!(
                "`{client_id}` already has a token; revoke it first"
            )));
        }
        let mut bytes = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
            .map_err(|_| FedError::Config("the system random generator failed".into()))?;
        let token = format!("ofs_{}", hex::encode(bytes));
        self.tokens.retain(|t| t.client_id != client_id);
        self.tokens.push(TokenEntry {
            client_id: client_id.into(),
            sha256: hash(&token),
            revoked: false,
        });
        Ok(token)
    }

    /// Revokes `client_id`'s token.
    pub fn revoke(&mut self, client_id: &str) -> Result<(), FedError> {
        let entry = self
            .tokens
            .iter_mut()
            .find(|t| t.client_id == client_id)
            .ok_or_else(|| FedError::Config(format!("no token issued to `{client_id}`")))?;
        entry.revoked = true;
        Ok(())
    }

    /// The client a token belongs to, unless unknown or revoked.
    pub fn authenticate(&self, token: &str) -> Option<&str> {
        let h = hash(token);
        self.tokens
            .iter()
            .find(|t| !t.revoked && t.sha256 == h)
            .map(|t| t.client_id.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_tokens_authenticate_until_revoked_and_only_hashes_are_stored() {
        let dir = tempfile::tempdir().unwrap();
        let path = TokenStore::path(dir.path());
        let mut store = TokenStore::load(&path).unwrap();
        let a = store.issue("alice").unwrap();
        let b = store.issue("bob").unwrap();
        assert_ne!(a, b);
        assert!(store.issue("alice").is_err());
        assert!(store.issue("no spaces").is_err());
        store.save(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains(&a) && text.contains(&hash(&a)));
        let mut store = TokenStore::load(&path).unwrap();
        assert_eq!(store.authenticate(&a), Some("alice"));
        assert_eq!(store.authenticate("ofs_guess"), None);
        store.revoke("alice").unwrap();
        assert_eq!(store.authenticate(&a), None);
        assert_eq!(store.authenticate(&b), Some("bob"));
        let again = store.issue("alice").unwrap();
        assert_eq!(store.authenticate(&again), Some("alice"));
    }
}
