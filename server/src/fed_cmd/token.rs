//! `offsite-server token issue|revoke|list`: per-client tokens (only their hashes are stored).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Subcommand;
use offsite_fed::{write_atomic, TokenStore};

#[derive(Subcommand)]
pub(crate) enum TokenCommand {
    /// Issue a token for a client (it is shown only once) and print the client's whole join command.
    Issue {
        /// The server's state directory.
        #[arg(long)]
        state_dir: PathBuf,
        /// The client's id.
        #[arg(long)]
        client: String,
        /// Write the token to this file (owner-only permissions), to hand to the client, instead of printing it on
        /// stdout; the join command then reads it with --token-file.
        #[arg(long)]
        out: Option<PathBuf>,
        /// The address clients reach the server at, HOST:PORT, for the printed join command.
        #[arg(long, default_value = "HOST:PORT")]
        server: String,
    },
    /// Revoke a client's token; the server refuses it from the next hello on.
    Revoke {
        /// The server's state directory.
        #[arg(long)]
        state_dir: PathBuf,
        /// The client's id.
        #[arg(long)]
        client: String,
    },
    /// List clients and whether their token is revoked.
    List {
        /// The server's state directory.
        #[arg(long)]
        state_dir: PathBuf,
        /// Print a JSON array of {"client", "revoked"} instead of text.
        #[arg(long)]
        json: bool,
    },
}

pub(crate) fn run(command: TokenCommand) -> Result<()> {
    match command {
        TokenCommand::Issue {
            state_dir,
            client,
            out,
            server,
        } => {
            let path = TokenStore::path(&state_dir);
            let mut store = TokenStore::load(&path)?;
            let token = store.issue(&client)?;
            // The token file first: a token that reached no one is not stored.
            if let Some(file) = &out {
                write_atomic(file, format!("{token}\n").as_bytes())
                    .with_context(|| format!("writing the token to {}", file.display()))?;
            }
            store.save(&path)?;
            let fingerprint =
                match offsite_net::Identity::from_pem(&state_dir.join("cert.pem"), &state_dir.join("key.pem")) {
                    Ok(id) => id.fingerprint(),
                    Err(_) => "FINGERPRINT (printed by `offsite-server serve` once it has made its certificate)".into(),
                };
            // The token goes in a file or the environment, never on the command line, where the process list would
            // show it.
            let join = format!("offsite-edge join --server {server} --fingerprint {fingerprint} --data FILE");
            match &out {
                Some(file) => {
                    eprintln!("token for `{client}` written to {}. On the client:", file.display());
                    println!("{join} --token-file {}", file.display());
                }
                None => {
                    // The token alone on stdout (for scripts); the join command for a person on stderr.
                    println!("{token}");
                    eprintln!("token for `{client}` (shown once). On the client:\n  OFFSITE_TOKEN={token} {join}");
                }
            }
        }
        TokenCommand::Revoke { state_dir, client } => {
            let path = TokenStore::path(&state_dir);
            let mut store = TokenStore::load(&path)?;
            store.revoke(&client)?;
            store.save(&path)?;
        }
        TokenCommand::List { state_dir, json } => {
            let tokens = TokenStore::load(&TokenStore::path(&state_dir))?.tokens;
            if json {
                let list: Vec<_> = tokens
                    .iter()
                    .map(|t| serde_json::json!({"client": t.client_id, "revoked": t.revoked}))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                for t in &tokens {
                    println!("{}\t{}", t.client_id, if t.revoked { "revoked" } else { "active" });
                }
            }
        }
    }
    Ok(())
}
