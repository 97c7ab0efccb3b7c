//! The result of a run: `report.json` (config, machine, results) and a
//! short `summary.md`, plus the checks that make a run fail.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::cli::RunConfig;
use crate::verifier::DuplicateSample;

#[derive(Debug, Serialize)]
pub struct Report {
    pub loadgen_version: &'static str,
    pub run_id: String,
    pub started_at_unix_ms: u64,
    pub config: RunConfig,
    pub machine: Machine,
    pub results: Results,
}

#[derive(Debug, Serialize)]
pub struct Machine {
    pub cores: usize,
    pub cpu_model: String,
    pub os: String,
    pub postgres_version: String,
    pub loadgen_version: &'static str,
}

impl Machine {
    /// This machine, as far as /proc tells; "unknown" where it does not.
    pub fn probe(postgres_version: String) -> Self {
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into());
        Self {
            cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu_model,
            os: format!("{} {release}", std::env::consts::OS),
            postgres_version,
            loadgen_version: env!("CARGO_PKG_VERSION"),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Results {
    /// Events in committed transactions.
    pub committed: u64,
    pub transactions: u64,
    /// Unique events received.
    pub delivered: u64,
    /// Committed, never received by the end of the drain.
    pub lost: u64,
    /// Events received again from another partition or offset: published
    /// more than once.
    pub duplicates: u64,
    /// Events received again from the same partition and offset: read
    /// twice by the consumer, not published twice. Not counted above.
    pub consumer_rereads: u64,
    /// The first few duplicates, with the partition and offset of both
    /// copies: a different offset means the message was published twice.
    pub duplicate_samples: Vec<DuplicateSample>,
    /// First deliveries whose `seq` did not increase for their aggregate.
    pub order_violations: u64,
    /// Received, but never reported committed by a writer.
    pub unexpected: u64,
    /// Messages of this run without a readable id, key or seq.
    pub malformed: u64,
    /// Every committed event arrived before the drain timeout.
    pub drain_complete: bool,
    /// From the start of the load to the last commit.
    pub write_secs: f64,
    /// From the first commit to the last first delivery.
    pub delivery_secs: f64,
    /// From the last commit until the verifier stopped waiting.
    pub drain_secs: f64,
    /// Unique deliveries per second over `delivery_secs`.
    pub throughput_eps: f64,
    /// Committed events per second over `write_secs`.
    pub commit_rate_eps: f64,
    /// Commit returned to message received.
    pub latency_ms: Latency,
    /// Due time (open loop) or transaction start (closed loop) to message
    /// received; includes time a writer spent behind schedule.
    pub latency_from_intended_ms: Latency,
    /// Begin to commit of each transaction.
    pub tx_latency_ms: Latency,
}

/// Quantiles of a microsecond histogram, in milliseconds.
#[derive(Debug, Serialize)]
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

impl Report {
    /// Why the run failed, if it did: lost events or broken order.
    pub fn failures(&self) -> Vec<String> {
        let r = &self.results;
        let mut out = Vec::new();
        if r.lost > 0 {
            out.push(format!(
                "{} of {} committed events were not received within the drain timeout ({} s)",
                r.lost, r.committed, self.config.drain_timeout_secs
            ));
        }
        if r.order_violations > 0 {
            out.push(format!(
                "{} events arrived out of order for their aggregate",
                r.order_violations
            ));
        }
        out
    }

    pub fn to_json(&self) -> Result<String> {
        Ok(serde_json::to_string_pretty(self)?)
    }

    pub fn markdown(&self) -> String {
        let c = &self.config;
        let r = &self.results;
        let m = &self.machine;
        let rate = if c.rate > 0.0 {
            format!("{} events/s open loop", c.rate)
        } else {
            "as fast as possible".into()
        };
        let mut s = String::new();
        let _ = writeln!(s, "# loadgen run {}\n", self.run_id);
        let _ = writeln!(
            s,
            "`{}` mode, {rate}, {} s, {} writers, {} events/tx, ~{} B payloads, \
             {} aggregates over {}.\n",
            c.mode,
            c.duration_secs,
            c.writers,
            c.events_per_tx,
            c.payload_bytes,
            c.aggregates,
            c.aggregate_types.join(", "),
        );
        let lat =
            |l: &Latency| format!("{:.2} / {:.2} / {:.2} / {:.2}", l.p50, l.p99, l.p999, l.max);
        let rows: [(&str, String); 15] = [
            ("committed events", r.committed.to_string()),
            ("transactions", r.transactions.to_string()),
            ("delivered (unique)", r.delivered.to_string()),
            ("lost", r.lost.to_string()),
            ("duplicates", r.duplicates.to_string()),
            ("consumer re-reads", r.consumer_rereads.to_string()),
            ("order violations", r.order_violations.to_string()),
            ("unexpected", r.unexpected.to_string()),
            ("drain complete", r.drain_complete.to_string()),
            (
                "commit rate (events/s)",
                format!("{:.0}", r.commit_rate_eps),
            ),
            ("throughput (events/s)", format!("{:.0}", r.throughput_eps)),
            (
                "latency commit→receive ms (p50 / p99 / p99.9 / max)",
                lat(&r.latency_ms),
            ),
            (
                "latency intended→receive ms (p50 / p99 / p99.9 / max)",
                lat(&r.latency_from_intended_ms),
            ),
            (
                "transaction ms (p50 / p99 / p99.9 / max)",
                lat(&r.tx_latency_ms),
            ),
            (
                "write / delivery / drain s",
                format!(
                    "{:.2} / {:.2} / {:.2}",
                    r.write_secs, r.delivery_secs, r.drain_secs
                ),
            ),
        ];
        s.push_str("| metric | value |\n|---|---|\n");
        for (k, v) in rows {
            let _ = writeln!(s, "| {k} | {v} |");
        }
        if let Some(d) = r.duplicate_samples.first() {
            let _ = writeln!(
                s,
                "\nFirst duplicate: event {} (aggregate {}) at partition {} offset {}, again at partition {} offset {}.",
                d.id, d.key, d.first.partition, d.first.offset, d.again.partition, d.again.offset
            );
        }
        let _ = writeln!(
            s,
            "\nMachine: {} cores, {}, {}; {}; loadgen {}.",
            m.cores, m.cpu_model, m.os, m.postgres_version, m.loadgen_version
        );
        s
    }

    /// Writes `report.json` and `summary.md` into `dir`, creating it.
    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let json = dir.join("report.json");
        std::fs::write(&json, self.to_json()? + "\n")
            .with_context(|| format!("writing {}", json.display()))?;
        let md = dir.join("summary.md");
        std::fs::write(&md, self.markdown())
            .with_context(|| format!("writing {}", md.display()))?;
        Ok(())
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
}
