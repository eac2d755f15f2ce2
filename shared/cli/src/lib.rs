//! What `offsite-server` and `offsite-edge` share: the log set-up and exit codes a supervisor can act on.

use std::process::ExitCode;

use offsite::train::TrainError;
use offsite_net::NetError;
use offsite_protocol::ProtocolError;
use tracing_subscriber::EnvFilter;

/// Exit status of an internal error: the device failed, training diverged, a worker thread stopped.
pub const INTERNAL: u8 = 1;
/// Exit status of refused input: a file, flag or config that cannot be used (and any error not classified).
pub const BAD_INPUT: u8 = 2;
/// Exit status of a refusal by the server (unknown or revoked token, other protocol version): do not retry.
pub const REFUSED: u8 = 3;
/// Exit status of a server that could not be reached or a connection that failed: retrying may help.
pub const UNREACHABLE: u8 = 4;

/// The exit codes as `--help` shows them.
pub const EXIT_CODES_HELP: &str = "Exit status: 0 done; 1 internal error (the device failed, training diverged); \
    2 bad input (a file, flag or config that cannot be used); 3 refused by the server (token, version): do not \
    retry; 4 server unreachable or connection lost: retrying may help.";

/// Logs to stderr, `RUST_LOG` or `info` (CubeCL's runtime at `warn`).
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,cubecl_runtime=warn")),
        )
        .init();
}

/// The exit status for an error, from the first cause in its chain that says what kind it is.
pub fn exit_code(error: &anyhow::Error) -> u8 {
    for cause in error.chain() {
        if let Some(e) = cause.downcast_ref::<NetError>() {
            match e {
                NetError::Refused(_) => return REFUSED,
                NetError::Connection(_) | NetError::Protocol(_) => return UNREACHABLE,
                NetError::Config(_) | NetError::File { .. } => return BAD_INPUT,
                NetError::Fed(_) => {}
            }
        }
        if cause.is::<ProtocolError>() {
            return UNREACHABLE;
        }
        if let Some(e) = cause.downcast_ref::<TrainError>() {
            match e {
                TrainError::NonFinite { .. } | TrainError::Device(_) => return INTERNAL,
                _ => return BAD_INPUT,
            }
        }
        if let Some(offsite::federated::LocalError::Train(TrainError::NonFinite { .. } | TrainError::Device(_))) =
            cause.downcast_ref()
        {
            return INTERNAL;
        }
    }
    BAD_INPUT
}

/// Runs a binary's `main` body: on an error, prints it with its causes (as anyhow's own `main` does) and exits with
/// [`exit_code`].
pub fn run(main: impl FnOnce() -> anyhow::Result<()>) -> ExitCode {
    match main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e:?}");
            ExitCode::from(exit_code(&e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_their_codes_through_context() {
        use anyhow::Context;
        let refused: anyhow::Result<()> = Err(NetError::Refused("unknown or revoked token".into()).into());
        assert_eq!(exit_code(&refused.context("joining").unwrap_err()), REFUSED);
        let lost = anyhow::Error::from(NetError::Connection("timed out".into()));
        assert_eq!(exit_code(&lost), UNREACHABLE);
        let diverged = anyhow::Error::from(TrainError::NonFinite { steps: 5, last_step: 9 });
        assert_eq!(exit_code(&diverged), INTERNAL);
        let local = NetError::Fed(offsite_fed::FedError::Local(Box::new(TrainError::Device(
            "lost".into(),
        ))));
        assert_eq!(
            exit_code(&anyhow::Error::from(local)),
            INTERNAL,
            "the cause inside a wrapped error counts"
        );
        assert_eq!(exit_code(&anyhow::anyhow!("--rounds must be positive")), BAD_INPUT);
        let missing = std::fs::read("/no/such/file")
            .context("reading the config")
            .unwrap_err();
        assert_eq!(exit_code(&missing), BAD_INPUT);
    }
}
