//! Command line: one subcommand per measurement. Each one's flags are
//! checked into a typed config before anything connects; the configs are
//! what the reports record, so they never hold the database password.

mod bench;
mod run;

use clap::{Parser, Subcommand, ValueEnum};
use serde::{Deserialize, Serialize};

pub use bench::{BrokerArgs, BrokerConfig, DrainArgs, DrainConfig, SuiteArgs, SuiteConfig};
pub use run::{RunArgs, RunConfig, MAX_PAYLOAD_BYTES};

#[derive(Parser)]
#[command(
    name = "loadgen",
    version,
    about = "Load generator, end-to-end verifier and benchmark suite for the outbox engine"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Write events into the outbox at a rate, consume them from Kafka, and
    /// report throughput, latency, loss, duplicates and ordering.
    Run(RunArgs),
    /// The database ceiling: the same transactions as `run` (same flags),
    /// with no engine and no consumer; reports the commit rate.
    DbCeiling(RunArgs),
    /// The broker ceiling: produce messages like the engine's straight to
    /// the broker, with the engine's producer settings; reports acks/s.
    BrokerCeiling(BrokerArgs),
    /// The drain test: bulk-load a backlog into the outbox with no engine
    /// running, start engine nodes, time until the outbox is empty, then
    /// check every event arrived by consuming.
    Drain(DrainArgs),
    /// The benchmark suite: fresh database per configuration, engine nodes
    /// started and stopped by loadgen, baselines, sweep, drain, targets;
    /// results under bench-results/ and a regenerated bench-results/README.md.
    Suite(SuiteArgs),
    /// Draw a run's files again from its report.json (summary.md, .hgrm
    /// files, SVG charts), or a results directory's README.md from its
    /// suite.json, without measuring again.
    Render(RenderArgs),
}

#[derive(clap::Args, Debug)]
pub struct RenderArgs {
    /// Directories holding a report.json (a run) or a suite.json (the
    /// suite's results directory).
    #[arg(required = true, value_name = "DIR")]
    pub dirs: Vec<std::path::PathBuf>,
}

/// How events get into the outbox.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// `outbox_engine::Enqueuer`, one round trip per transaction.
    Api,
    /// A plain multi-row `insert into outbox (...) values ...`.
    Sql,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Api => "api",
            Mode::Sql => "sql",
        })
    }
}

/// Where and how a single run reports; shared by `run`, `db-ceiling`,
/// `broker-ceiling` and `drain`.
#[derive(clap::Args, Debug, Default)]
pub struct ReportArgs {
    /// Name of the run in its report.
    #[arg(long)]
    pub name: Option<String>,
    /// Write report.json, summary.md, .hgrm files and SVG charts into this
    /// directory.
    #[arg(long, value_name = "DIR")]
    pub out: Option<std::path::PathBuf>,
    /// Print the report as JSON on stdout instead of the summary.
    #[arg(long)]
    pub json: bool,
}
