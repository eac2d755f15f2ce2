//! What `offsite-server` and `offsite-edge` share: the log set-up and exit codes a supervisor can act on.

use std::process::ExitCode;

use offsite::train::TrainError;
use offsite_net::NetError;
use offsite_protocol::ProtocolError;
use tracing_indicatif::filter::{hide_indicatif_span_fields, IndicatifFilter};
use tracing_indicatif::IndicatifLayer;
use tracing_subscriber::fmt::format::DefaultFields;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

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

/// How much the binaries log, and in which format: flags every subcommand takes.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct LogArgs {
    /// More log lines: -v debug, -vv trace (`RUST_LOG`, when set, decides instead).
    #[arg(short, long, global = true, action = clap::ArgAction::Count, conflicts_with = "quiet")]
    pub verbose: u8,
    /// Fewer log lines: -q warnings and errors only, without progress bars; -qq errors only.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub quiet: u8,
    /// Log format on stderr: `text` (with progress bars on a terminal) or `json` (one object per line, for log
    /// collectors; no progress bars).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// A log format on stderr.
#[derive(clap::ValueEnum, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines, progress bars drawn below them.
    #[default]
    Text,
    /// One JSON object per event.
    Json,
}

impl LogArgs {
    /// The filter these flags ask for: `RUST_LOG` when set, otherwise a level from `-v`/`-q` (CubeCL's runtime one
    /// level quieter, at most `warn`).
    pub fn filter(&self) -> EnvFilter {
        if let Ok(f) = EnvFilter::try_from_default_env() {
            return f;
        }
        let level = match (self.verbose, self.quiet) {
            (0, 0) => "info",
            (1, _) => "debug",
            (v, _) if v > 1 => "trace",
            (_, 1) => "warn",
            _ => "error",
        };
        let cubecl = if matches!(level, "error") { "error" } else { "warn" };
        EnvFilter::new(format!("{level},cubecl_runtime={cubecl}"))
    }
}

/// Logs to stderr as `args` say. In text format, progress bars (`offsite::progress`) are drawn by the same layer,
/// so log lines print above them instead of through them.
pub fn init_logging(args: &LogArgs) {
    let filter = args.filter();
    match args.log_format {
        LogFormat::Json => tracing_subscriber::registry()
            .with(filter)
            .with(tracing_subscriber::fmt::layer().json().with_writer(std::io::stderr))
            .init(),
        LogFormat::Text => {
            let bars: IndicatifLayer<_, _> =
                IndicatifLayer::new().with_span_field_formatter(hide_indicatif_span_fields(DefaultFields::new()));
            tracing_subscriber::registry()
                .with(filter)
                .with(tracing_subscriber::fmt::layer().with_writer(bars.get_stderr_writer()))
                .with(bars.with_filter(IndicatifFilter::new(false)))
                .init()
        }
    }
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
    offsite_fed::arm_crash_points();
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
    fn verbosity_flags_choose_the_level() {
        // RUST_LOG decides when set; these checks are about the flags alone.
        if std::env::var_os("RUST_LOG").is_some() {
            return;
        }
        let level = |verbose, quiet| {
            LogArgs {
                verbose,
                quiet,
                log_format: LogFormat::Text,
            }
            .filter()
            .max_level_hint()
            .map(|l| l.to_string())
        };
        assert_eq!(level(0, 0).as_deref(), Some("info"));
        assert_eq!(level(1, 0).as_deref(), Some("debug"));
        assert_eq!(level(2, 0).as_deref(), Some("trace"));
        assert_eq!(level(0, 1).as_deref(), Some("warn"));
        assert_eq!(level(0, 2).as_deref(), Some("error"));
    }

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
