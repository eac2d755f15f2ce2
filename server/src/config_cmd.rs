//! `offsite-server config show`: a config file as the binaries read it, every default filled in and every relative
//! path resolved.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Subcommand, ValueEnum};
use offsite::emulator::{DistillConfig, EmulatorConfig};
use offsite::train::TrainJob;
use serde::Serialize;

use crate::bench_cmd::config::{BenchFile, BenchSection};
use crate::fed_cmd::config::FedFile;

#[derive(Subcommand)]
pub(crate) enum ConfigCommand {
    /// Print the effective config (TOML): what the file says, with the defaults of everything it leaves out.
    Show {
        /// The config file.
        #[arg(long)]
        config: PathBuf,
        /// What kind of config it is; by default told from its tables ([bench]: bench, [server]: federation,
        /// [train] or [adapter]: a training job, [emulator]: an emulator).
        #[arg(long, value_enum, default_value_t = Kind::Auto)]
        kind: Kind,
    },
}

/// The config kinds the binaries read.
#[derive(Clone, Copy, PartialEq, Eq, Debug, ValueEnum)]
pub(crate) enum Kind {
    /// Told from the file's tables.
    Auto,
    /// `offsite-server serve|sim --config`.
    Federation,
    /// `offsite-server bench --config`.
    Bench,
    /// `offsite-edge train --config`.
    Train,
    /// `offsite-server emulator build --config`.
    Emulator,
}

/// A bench config: the federation tables and `[bench]`.
#[derive(Serialize)]
struct BenchShown<'a> {
    #[serde(flatten)]
    fed: &'a FedFile,
    bench: &'a BenchSection,
}

/// An emulator config: `[emulator]` and, when given, `[distill]`.
#[derive(Serialize)]
struct EmulatorShown {
    emulator: EmulatorConfig,
    distill: Option<DistillConfig>,
}

/// The kind of `text`, from its top-level tables.
fn kind_of(path: &Path, text: &str) -> Result<Kind> {
    let table: toml::Table = toml::from_str(text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(if table.contains_key("bench") {
        Kind::Bench
    } else if table.contains_key("server") {
        Kind::Federation
    } else if table.contains_key("emulator") {
        Kind::Emulator
    } else if table.contains_key("train") || table.contains_key("adapter") {
        Kind::Train
    } else {
        bail!(
            "{}: cannot tell what config this is (no [bench], [server], [emulator], [train] or [adapter] table); \
             give --kind",
            path.display()
        )
    })
}

/// The effective config as TOML.
pub(crate) fn show(path: &Path, kind: Kind) -> Result<String> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let kind = match kind {
        Kind::Auto => kind_of(path, &text)?,
        k => k,
    };
    let named = |e: &dyn std::fmt::Display| anyhow::anyhow!("{}: {e}", path.display());
    let shown = match kind {
        Kind::Bench => {
            let mut file = BenchFile::load(path)?;
            // As `bench` reads it without --data-dir.
            file.fed.resolve_paths(path.parent().unwrap_or(Path::new("")));
            toml::to_string_pretty(&BenchShown {
                fed: &file.fed,
                bench: &file.bench,
            })
        }
        Kind::Federation => toml::to_string_pretty(&FedFile::load(path)?),
        Kind::Train => toml::to_string_pretty(&TrainJob::from_file(path)?),
        Kind::Emulator => toml::to_string_pretty(&EmulatorShown {
            emulator: EmulatorConfig::from_toml(&text).map_err(|e| named(&e))?,
            distill: DistillConfig::from_toml(&text).map_err(|e| named(&e))?,
        }),
        Kind::Auto => unreachable!("resolved above"),
    };
    shown.context("writing the effective config as TOML")
}

pub(crate) fn run(command: ConfigCommand) -> Result<()> {
    match command {
        ConfigCommand::Show { config, kind } => print!("{}", show(&config, kind)?),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every shipped config, shown and read back, is the config it was (defaults included), and the shown text
    /// names settings the file leaves to their defaults.
    #[test]
    fn shown_configs_read_back_as_the_same_config() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
        let dir = tempfile::tempdir().unwrap();
        let back = dir.path().join("shown.toml");
        let fed = root.join("federation-shakespeare.toml");
        let shown = show(&fed, Kind::Auto).unwrap();
        assert!(
            shown.contains("hello_timeout_s"),
            "a default the file leaves out:\n{shown}"
        );
        std::fs::write(&back, &shown).unwrap();
        let (a, b) = (FedFile::load(&fed).unwrap(), FedFile::load(&back).unwrap());
        assert_eq!(format!("{a:?}"), format!("{b:?}"));
        for bench in ["shakespeare", "natural-instructions", "gsm-symbolic"] {
            let path = root.join(format!("bench/{bench}.toml"));
            std::fs::write(&back, show(&path, Kind::Auto).unwrap()).unwrap();
            let (mut a, b) = (BenchFile::load(&path).unwrap(), BenchFile::load(&back).unwrap());
            a.fed.resolve_paths(path.parent().unwrap());
            assert_eq!(format!("{a:?}"), format!("{b:?}"), "{bench}");
        }
        for train in ["train-shakespeare", "train-lora", "train-prompt", "train-alpaca"] {
            let path = root.join(format!("{train}.toml"));
            std::fs::write(&back, show(&path, Kind::Auto).unwrap()).unwrap();
            assert_eq!(
                TrainJob::from_file(&path).unwrap(),
                TrainJob::from_file(&back).unwrap(),
                "{train}"
            );
        }
        let emu = root.join("emulator-smollm2.toml");
        let shown = show(&emu, Kind::Auto).unwrap();
        assert_eq!(
            EmulatorConfig::from_toml(&shown).unwrap(),
            EmulatorConfig::from_toml(&std::fs::read_to_string(&emu).unwrap()).unwrap()
        );
        std::fs::write(&back, "[data]\nformat = \"text\"\n").unwrap();
        assert!(show(&back, Kind::Auto).unwrap_err().to_string().contains("--kind"));
    }
}
