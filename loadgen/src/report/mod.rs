//! What a measurement leaves behind: the data of `report.json`, the
//! boundary between measuring and rendering. Every kind of run (e2e,
//! write-only, broker ceiling, drain) writes the same envelope: kind,
//! config, engine setup, machine, results, `timeseries`, the checks it
//! failed and its latency histograms. Everything else a run writes
//! (`summary.md`, `.hgrm`, SVG charts) is drawn from it by
//! [`crate::render`], and it reads back into the same types
//! ([`AnyReport::from_json`]), so those files can be drawn again without
//! measuring again.

pub mod broker;
pub mod drain;
pub mod e2e;
pub mod histogram;

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::cli::{BrokerConfig, DrainConfig, RunConfig};
use crate::timeseries::Sample;
use broker::BrokerResults;
use drain::DrainResults;
use e2e::{Results, WriteResults};
use histogram::Recorded;

/// loadgen's version, as reports record it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The report's file name in a run's directory.
pub const REPORT_JSON: &str = "report.json";

/// Which measurement a report holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// `loadgen run`: end to end, verified.
    E2e,
    /// `loadgen run --no-verify`: the writers with an engine relaying.
    E2eUnverified,
    DbCeiling,
    BrokerCeiling,
    Drain,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::E2e => "e2e",
            Kind::E2eUnverified => "e2e-unverified",
            Kind::DbCeiling => "db-ceiling",
            Kind::BrokerCeiling => "broker-ceiling",
            Kind::Drain => "drain",
        }
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The envelope of every `report.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report<C, R> {
    pub kind: Kind,
    pub name: String,
    pub loadgen_version: String,
    pub run_id: String,
    pub started_at_unix_ms: u64,
    pub config: C,
    /// The engine nodes loadgen ran itself (drain, suite); `None` when the
    /// engine, if any, was started by someone else.
    pub engine: Option<EngineSetup>,
    pub machine: Machine,
    pub results: R,
    /// One sample a second; see [`crate::timeseries`] for what the fields
    /// mean for each kind.
    pub timeseries: Vec<Sample>,
    /// Why the run failed its checks (lost events, broken order, an
    /// engine node that did not stop cleanly...); empty when it passed.
    /// Reports written before this was recorded read as empty.
    #[serde(default)]
    pub failures: Vec<String>,
    /// The latency histograms, whole, in the order their files and
    /// curves are drawn. Empty in reports written before they were kept.
    #[serde(default)]
    pub histograms: Vec<Recorded>,
}

impl<C, R> Report<C, R> {
    /// Records `h` as histogram `name`.
    pub fn record(&mut self, name: &str, h: &Histogram<u64>) -> Result<()> {
        self.histograms.push(Recorded::new(name, h)?);
        Ok(())
    }
}

/// A report of any kind, as read from a `report.json`.
#[derive(Debug, Clone)]
pub enum AnyReport {
    E2e(Box<Report<RunConfig, Results>>),
    /// `db-ceiling` and `e2e-unverified`.
    WriteOnly(Box<Report<RunConfig, WriteResults>>),
    Broker(Box<Report<BrokerConfig, BrokerResults>>),
    Drain(Box<Report<DrainConfig, DrainResults>>),
}

/// `$f` applied to the report inside, whatever its kind.
macro_rules! each {
    ($any:expr, $r:ident => $f:expr) => {
        match $any {
            AnyReport::E2e($r) => $f,
            AnyReport::WriteOnly($r) => $f,
            AnyReport::Broker($r) => $f,
            AnyReport::Drain($r) => $f,
        }
    };
}

impl AnyReport {
    /// Parses a `report.json`, its `kind` telling which results it holds.
    pub fn from_json(text: &str) -> Result<Self> {
        #[derive(Deserialize)]
        struct Head {
            kind: Kind,
        }
        let head: Head = serde_json::from_str(text).context("reading the report's kind")?;
        Ok(match head.kind {
            Kind::E2e => Self::E2e(Box::new(serde_json::from_str(text)?)),
            Kind::E2eUnverified | Kind::DbCeiling => {
                Self::WriteOnly(Box::new(serde_json::from_str(text)?))
            }
            Kind::BrokerCeiling => Self::Broker(Box::new(serde_json::from_str(text)?)),
            Kind::Drain => Self::Drain(Box::new(serde_json::from_str(text)?)),
        })
    }

    /// `<dir>/report.json`.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(REPORT_JSON);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        Self::from_json(&text).with_context(|| format!("parsing {}", path.display()))
    }

    /// The text of `report.json`.
    pub fn to_json(&self) -> Result<String> {
        Ok(each!(self, r => serde_json::to_string_pretty(r))? + "\n")
    }

    pub fn kind(&self) -> Kind {
        each!(self, r => r.kind)
    }

    pub fn name(&self) -> &str {
        each!(self, r => &r.name)
    }

    pub fn failures(&self) -> &[String] {
        each!(self, r => &r.failures)
    }

    pub fn failures_mut(&mut self) -> &mut Vec<String> {
        each!(self, r => &mut r.failures)
    }

    pub fn histograms(&self) -> &[Recorded] {
        each!(self, r => &r.histograms)
    }

    pub fn timeseries(&self) -> &[Sample] {
        each!(self, r => &r.timeseries)
    }
}

impl From<Report<RunConfig, Results>> for AnyReport {
    fn from(r: Report<RunConfig, Results>) -> Self {
        Self::E2e(Box::new(r))
    }
}

impl From<Report<RunConfig, WriteResults>> for AnyReport {
    fn from(r: Report<RunConfig, WriteResults>) -> Self {
        Self::WriteOnly(Box::new(r))
    }
}

impl From<Report<BrokerConfig, BrokerResults>> for AnyReport {
    fn from(r: Report<BrokerConfig, BrokerResults>) -> Self {
        Self::Broker(Box::new(r))
    }
}

impl From<Report<DrainConfig, DrainResults>> for AnyReport {
    fn from(r: Report<DrainConfig, DrainResults>) -> Self {
        Self::Drain(Box::new(r))
    }
}

/// Who ran a measurement, where, and what to call it.
#[derive(Debug, Clone, Default)]
pub struct Meta {
    pub name: Option<String>,
    pub engine: Option<EngineSetup>,
    /// Describes the broker (the Kafka protocol does not tell).
    pub broker: Option<String>,
}

/// What the report records about the engine loadgen ran.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EngineSetup {
    pub binary: String,
    pub version: String,
    pub nodes: usize,
    pub partitions: u32,
    pub topic_prefix: String,
    pub topic_partitions: i32,
    /// Extra `outbox run` flags.
    pub args: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    pub cores: usize,
    pub cpu_model: String,
    pub os: String,
    pub kernel: String,
    pub postgres_version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broker: Option<String>,
    pub rustc: String,
    pub loadgen_version: String,
}

impl Machine {
    /// This machine, as far as /proc and `rustc --version` tell; "unknown"
    /// where they do not.
    pub fn probe(postgres_version: String, broker: Option<String>) -> Self {
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into());
        Self {
            cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu_model,
            os: std::env::consts::OS.to_string(),
            kernel,
            postgres_version,
            broker,
            rustc: command_line("rustc", &["--version"]).unwrap_or_else(|| "unknown".into()),
            loadgen_version: VERSION.into(),
        }
    }
}

/// The first line a command prints, if it runs.
pub fn command_line(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status.success().then_some(())?;
    String::from_utf8(out.stdout)
        .ok()?
        .lines()
        .next()
        .map(|l| l.trim().to_string())
}

/// Quantiles of a microsecond histogram, in milliseconds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Latency {
    pub count: u64,
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

impl Latency {
    pub fn from_us(h: &Histogram<u64>) -> Self {
        let ms = |us: u64| us as f64 / 1000.0;
        Self {
            count: h.len(),
            p50: ms(h.value_at_quantile(0.50)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
            mean: h.mean().round() / 1000.0,
        }
    }
}

/// `n` per `secs`, or 0 for an empty interval.
pub fn per_sec(n: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        n as f64 / secs
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_is_reported_in_milliseconds() {
        let mut h = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).unwrap();
        for us in [1_000, 2_000, 3_000, 100_000] {
            h.record(us).unwrap();
        }
        let l = Latency::from_us(&h);
        assert_eq!(l.count, 4);
        assert!((l.p50 - 2.0).abs() < 0.01, "{l:?}");
        assert!((l.max - 100.0).abs() < 0.1, "{l:?}");
    }

    #[test]
    fn rates_of_empty_intervals_are_zero() {
        assert_eq!(per_sec(10, 0.0), 0.0);
        assert_eq!(per_sec(10, 2.0), 5.0);
    }

    #[test]
    fn kinds_are_written_as_before() {
        for k in [
            Kind::E2e,
            Kind::E2eUnverified,
            Kind::DbCeiling,
            Kind::BrokerCeiling,
            Kind::Drain,
        ] {
            assert_eq!(serde_json::to_value(k).unwrap(), k.as_str());
        }
    }
}
