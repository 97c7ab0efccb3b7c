//! `suite.json`: what one suite run measured, reduced to what its README
//! needs, and the context the README states (when, which engine, which
//! machine, how many writers). The README is drawn from this record alone
//! ([`super::readme`]), so `loadgen render <results dir>` draws it again.

use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::readme;
use super::targets::{RunSummary, Target};
use crate::report::Machine;

/// The record's file name in the results directory.
pub const SUITE_JSON: &str = "suite.json";
/// The file drawn from it.
pub const README_MD: &str = "README.md";

/// The writers of `suite.json` files made before the record kept them:
/// `--writers`' default, which every suite run until then used.
fn default_writers() -> usize {
    8
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    /// `YYYY-MM-DD HH:MM UTC`.
    pub generated_at: String,
    pub quick: bool,
    pub minutes: f64,
    pub engine_version: String,
    /// Commit of the work tree, and whether it had changes.
    pub git: String,
    /// `--writers` of the suite run.
    #[serde(default = "default_writers")]
    pub writers: usize,
    /// Extra `outbox run` flags of every node.
    #[serde(default)]
    pub engine_args: Vec<String>,
    pub machine: Machine,
    pub runs: Vec<RunSummary>,
    pub targets: Vec<Target>,
}

impl Record {
    /// `<dir>/suite.json`.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(SUITE_JSON);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }

    /// Writes `suite.json` and the README drawn from it into `dir`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join(SUITE_JSON);
        std::fs::write(&path, serde_json::to_string_pretty(self)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
        self.write_readme(dir)
    }

    /// Writes the README drawn from the record into `dir`.
    pub fn write_readme(&self, dir: &Path) -> Result<()> {
        let path = dir.join(README_MD);
        std::fs::write(&path, readme::readme(self))
            .with_context(|| format!("writing {}", path.display()))
    }
}
