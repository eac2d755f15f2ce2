//! `offsite-server token issue|revoke|list`: per-client tokens (only their hashes are stored).

use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;
use offsite_fed::TokenStore;

#[derive(Subcommand)]
pub(crate) enum TokenCommand {
    /// Issue a token for a client and print it (it is shown only once).
    Issue {
        /// The server's state directory.
        #[arg(long)]
        state_dir: PathBuf,
        /// The client's id.
        #[arg(long)]
        client: String,
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
    },
}

pub(crate) fn run(command: TokenCommand) -> Result<()> {
    match command {
        TokenCommand::Issue { state_dir, client } => {
            let path = TokenStore::path(&state_dir);
            let mut store = TokenStore::load(&path)?;
            let token = store.issue(&client)?;
            store.save(&path)?;
            // The token alone on stdout (for scripts); the whole join command for a person on stderr. The token
            // goes in the environment there, not on the command line, where the process list would show it.
            println!("{token}");
            let fingerprint =
                match offsite_net::Identity::from_pem(&state_dir.join("cert.pem"), &state_dir.join("key.pem")) {
                    Ok(id) => id.fingerprint(),
                    Err(_) => "FINGERPRINT (printed by `offsite-server serve` once it has made its certificate)".into(),
                };
            eprintln!(
                "token for `{client}` (shown once). On the client:\n  OFFSITE_TOKEN={token} offsite-edge join --server \
                 HOST:PORT --fingerprint {fingerprint} --data FILE"
            );
        }
        TokenCommand::Revoke { state_dir, client } => {
            let path = TokenStore::path(&state_dir);
            let mut store = TokenStore::load(&path)?;
            store.revoke(&client)?;
            store.save(&path)?;
        }
        TokenCommand::List { state_dir } => {
            for t in TokenStore::load(&TokenStore::path(&state_dir))?.tokens {
                println!("{}\t{}", t.client_id, if t.revoked { "revoked" } else { "active" });
            }
        }
    }
    Ok(())
}
