//! What a run leaves behind. Every kind of run (e2e, db ceiling, broker
//! ceiling, drain) writes the same envelope into `report.json` (kind,
//! config, engine setup, machine, results, `timeseries`) beside a
//! `summary.md`, one `.hgrm` per latency histogram and SVG charts.

pub mod e2e;

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::hgrm;
use crate::nodes::EngineSetup;
use crate::plot::Chart;
use crate::timeseries::Sample;

/// The envelope of every `report.json`.
#[derive(Debug, Serialize)]
pub struct Report<C, R> {
    /// `e2e`, `e2e-unverified`, `db-ceiling`, `broker-ceiling` or `drain`.
    pub kind: &'static str,
    pub name: String,
    pub loadgen_version: &'static str,
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
}

/// Who ran a measurement, where, and what to call it.
#[derive(Debug, Clone, Default)]
pub struct Meta {
    pub name: Option<String>,
    pub engine: Option<EngineSetup>,
    /// Describes the broker (the Kafka protocol does not tell).
    pub broker: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cores: usize,
    pub cpu_model: String,
    pub os: String,
    pub kernel: String,
    pub postgres_version: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broker: Option<String>,
    pub rustc: String,
    pub loadgen_version: &'static str,
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
            loadgen_version: env!("CARGO_PKG_VERSION"),
        }
    }

    /// One line for summaries.
    pub fn line(&self) -> String {
        let mut s = format!(
            "{} cores, {}, {} {}; {}",
            self.cores, self.cpu_model, self.os, self.kernel, self.postgres_version
        );
        if let Some(b) = &self.broker {
            let _ = write!(s, "; broker {b}");
        }
        let _ = write!(s, "; {}; loadgen {}.", self.rustc, self.loadgen_version);
        s
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
#[derive(Debug, Clone, Serialize)]
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

    /// `p50 / p99 / p99.9 / max` for tables.
    pub fn cells(&self) -> String {
        format!(
            "{:.2} / {:.2} / {:.2} / {:.2}",
            self.p50, self.p99, self.p999, self.max
        )
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

/// A two-column Markdown table.
pub fn table(rows: &[(&str, String)]) -> String {
    let mut s = String::from("| metric | value |\n|---|---|\n");
    for (k, v) in rows {
        let _ = writeln!(s, "| {k} | {v} |");
    }
    s
}

/// Everything a finished run writes, and what makes it fail.
#[derive(Debug, Default)]
pub struct Finished {
    pub json: String,
    pub markdown: String,
    /// `.hgrm` and `.svg` files: (file name, contents).
    pub files: Vec<(String, String)>,
    /// Why the run failed its checks (lost events, broken order...).
    pub failures: Vec<String>,
}

impl Finished {
    pub fn new<C: Serialize, R: Serialize>(
        report: &Report<C, R>,
        markdown: String,
    ) -> Result<Self> {
        Ok(Self {
            json: serde_json::to_string_pretty(report)? + "\n",
            markdown,
            ..Self::default()
        })
    }

    /// Adds `<stem>.hgrm`.
    pub fn hgrm(&mut self, stem: &str, h: &Histogram<u64>) {
        self.files
            .push((format!("{stem}.hgrm"), hgrm::percentile_distribution(h)));
    }

    /// Adds `<stem>.svg`.
    pub fn chart(&mut self, stem: &str, chart: &Chart) {
        self.files.push((format!("{stem}.svg"), chart.to_svg()));
    }

    /// Writes `report.json`, `summary.md` and the other files into `dir`,
    /// creating it.
    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let files = [("report.json", &self.json), ("summary.md", &self.markdown)]
            .into_iter()
            .chain(self.files.iter().map(|(n, c)| (n.as_str(), c)));
        for (name, contents) in files {
            let path = dir.join(name);
            std::fs::write(&path, contents)
                .with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(())
    }

    /// The file names written besides report.json and summary.md.
    pub fn file_names(&self) -> Vec<&str> {
        self.files.iter().map(|(n, _)| n.as_str()).collect()
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
    fn finished_runs_write_their_files() {
        let dir = std::env::temp_dir().join(format!("loadgen-report-{}", std::process::id()));
        let report = Report {
            kind: "e2e",
            name: "t".into(),
            loadgen_version: "0",
            run_id: "r".into(),
            started_at_unix_ms: 0,
            config: (),
            engine: None,
            machine: Machine::probe("PostgreSQL 15".into(), Some("tansu".into())),
            results: serde_json::json!({"committed": 1}),
            timeseries: vec![],
        };
        let mut f = Finished::new(&report, "# t\n".into()).expect("json");
        let mut h = Histogram::<u64>::new(3).unwrap();
        h.record(5).unwrap();
        f.hgrm("latency", &h);
        f.chart(
            "lag",
            &Chart::new("lag", "s", "events", crate::plot::XAxis::Linear),
        );
        f.write(&dir).expect("written");
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap())
                .unwrap();
        assert_eq!(json["results"]["committed"], 1);
        assert_eq!(json["machine"]["broker"], "tansu");
        assert!(json["timeseries"].is_array());
        assert!(dir.join("latency.hgrm").exists() && dir.join("lag.svg").exists());
        assert_eq!(f.file_names(), ["latency.hgrm", "lag.svg"]);
        std::fs::remove_dir_all(&dir).ok();
    }
}
