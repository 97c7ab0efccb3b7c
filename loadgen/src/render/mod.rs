//! Everything a run writes besides its data, drawn from the data alone:
//! `summary.md`, one `.hgrm` per latency histogram and the SVG charts from
//! a `report.json` ([`render`]), and the suite's `README.md` from its
//! `suite.json` ([`crate::suite::readme`]). Pure functions of what
//! measuring wrote, so `loadgen render DIR` draws them again, byte for
//! byte, without measuring again.

pub mod charts;
pub mod summary;

use std::path::Path;

use anyhow::{Context, Result};

use crate::hgrm;
use crate::report::{AnyReport, Kind, REPORT_JSON};
use crate::suite::{self, SUITE_JSON};

/// A file to write: its name in the run's directory, and its contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct File {
    pub name: String,
    pub contents: String,
}

/// The files drawn from one report, `summary.md` first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub files: Vec<File>,
}

impl Rendered {
    pub fn summary(&self) -> &str {
        &self.files[0].contents
    }

    pub fn names(&self) -> Vec<&str> {
        self.files.iter().map(|f| f.name.as_str()).collect()
    }

    /// Writes every file into `dir`, creating it.
    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        for f in &self.files {
            let path = dir.join(&f.name);
            std::fs::write(&path, &f.contents)
                .with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(())
    }
}

/// `summary.md`, the `.hgrm` files and the charts of `report`.
pub fn render(report: &AnyReport) -> Result<Rendered> {
    let mut files = vec![File {
        name: "summary.md".into(),
        contents: summary::summary(report),
    }];
    let histograms = report
        .histograms()
        .iter()
        .map(|r| Ok((r.name.clone(), r.histogram()?)))
        .collect::<Result<Vec<_>>>()?;
    for (name, h) in &histograms {
        files.push(File {
            name: format!("{name}.hgrm"),
            contents: hgrm::percentile_distribution(h),
        });
    }
    for (stem, chart) in charts::of(report, &histograms) {
        files.push(File {
            name: format!("{stem}.svg"),
            contents: chart.to_svg(),
        });
    }
    Ok(Rendered { files })
}

/// A finished run's directory: `report.json` and what is drawn from it.
pub fn write_run(dir: &Path, report: &AnyReport) -> Result<Rendered> {
    let rendered = render(report)?;
    rendered.write(dir)?;
    let path = dir.join(REPORT_JSON);
    std::fs::write(&path, report.to_json()?)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(rendered)
}

/// Draws again what `dir` holds the data of: the files of a run from its
/// `report.json`, or the suite's `README.md` from its `suite.json`. The
/// data files are only read. Returns the names of the files written and
/// notes on what could not be drawn.
pub fn render_dir(dir: &Path) -> Result<(Vec<String>, Vec<String>)> {
    if dir.join(REPORT_JSON).exists() {
        let report = AnyReport::read(dir)?;
        let rendered = render(&report)?;
        rendered.write(dir)?;
        let mut notes = Vec::new();
        if report.histograms().is_empty() && report.kind() != Kind::Drain {
            notes.push(format!(
                "{REPORT_JSON} holds no histograms (written before loadgen kept them): \
                 its .hgrm files and latency.svg are left as they are"
            ));
        }
        let names = rendered.names().into_iter().map(String::from).collect();
        Ok((names, notes))
    } else if dir.join(SUITE_JSON).exists() {
        let record = suite::Record::read(dir)?;
        record.write_readme(dir)?;
        Ok((vec![suite::README_MD.into()], Vec::new()))
    } else {
        anyhow::bail!(
            "{} has neither {REPORT_JSON} nor {SUITE_JSON}",
            dir.display()
        )
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use hdrhistogram::Histogram;
    use serde_json::{json, Value};

    use super::*;
    use crate::report::histogram as h;
    use crate::timeseries::{Reading, Sample};

    /// A report of `kind` with `config` and `results` as a run writes
    /// them, ten seconds of samples and `histograms` filled with values.
    fn report(kind: &str, config: Value, results: Value, histograms: &[&str]) -> AnyReport {
        let mut prev = Reading::default();
        let samples: Vec<Sample> = (1..=10u64)
            .map(|i| {
                let committed = 997 * i.min(8);
                let now = Reading {
                    at: Duration::from_millis(1003 * i),
                    committed,
                    delivered: Some(committed.saturating_sub(911 / i)),
                    p99_us: Some(4_321 * i),
                    writing: i <= 8,
                };
                let s = Sample::between(&prev, &now);
                prev = now;
                s
            })
            .collect();
        let text = json!({
            "kind": kind, "name": "round-trip", "loadgen_version": "0.1.0",
            "run_id": "0190", "started_at_unix_ms": 1_795_795_196_202u64,
            "config": config,
            "engine": {"binary": "target/release/outbox", "version": "outbox 0.1.0", "nodes": 2,
                       "partitions": 16, "topic_prefix": "t.", "topic_partitions": 8, "args": []},
            "machine": {"cores": 2, "cpu_model": "AMD EPYC", "os": "linux", "kernel": "6.1",
                        "postgres_version": "PostgreSQL 15", "broker": "tansu", "rustc": "rustc 1.95",
                        "loadgen_version": "0.1.0"},
            "results": results,
            "timeseries": samples,
        })
        .to_string();
        let mut any = AnyReport::from_json(&text).expect("parses");
        let mut hist = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).unwrap();
        for (i, name) in histograms.iter().enumerate() {
            for us in 1..=5_000u64 {
                hist.record(us * us % 700_000 + 50 * i as u64 + 1).unwrap();
            }
            match &mut any {
                AnyReport::E2e(r) => r.record(name, &hist),
                AnyReport::WriteOnly(r) => r.record(name, &hist),
                AnyReport::Broker(r) => r.record(name, &hist),
                AnyReport::Drain(r) => r.record(name, &hist),
            }
            .unwrap();
        }
        any.failures_mut().push("a check failed".into());
        any
    }

    fn latency() -> Value {
        json!({"count": 10, "p50": 1.5, "p99": 9.25, "p999": 12.0, "max": 13.125, "mean": 2.0})
    }

    fn run_config() -> Value {
        json!({"database": "postgres://u@h/db", "kafka_brokers": "k:9092", "schema": "public",
               "rate": 1000.0, "duration_secs": 8.0, "writers": 4, "events_per_tx": 5,
               "payload_bytes": 256, "aggregates": 1000, "aggregate_types": ["order", "invoice"],
               "topic_prefix": "t.", "topic_partitions": 8, "mode": "api", "drain_timeout_secs": 30.0,
               "inbox": true})
    }

    fn every_kind() -> Vec<AnyReport> {
        let e2e = json!({
            "committed": 7976, "transactions": 1596, "delivered": 7976, "lost": 0, "duplicates": 1,
            "consumer_rereads": 0,
            "duplicate_samples": [{"id": "0190a5b2-0000-7000-8000-000000000001", "key": "7",
                                   "first": {"partition": 1, "offset": 5},
                                   "again": {"partition": 1, "offset": 9}}],
            "order_violations": 0, "unexpected": 0, "malformed": 0, "drain_complete": true,
            "write_secs": 8.02, "delivery_secs": 8.1, "drain_secs": 0.3,
            "throughput_eps": 984.6913580246913, "commit_rate_eps": 994.5137157107232,
            "latency_ms": latency(),
            "broker_latency": {"source": "consumer_receipt", "description": "commit → consumer receipt",
                               "latency_ms": latency()},
            "latency_from_intended_ms": latency(), "tx_latency_ms": latency(),
            "timestamp_types": {"log_append_time": 0, "create_time": 7976, "none": 0},
            "lag": {"max": 911, "at_end_of_load": 113, "growth_eps": -12.5, "bounded": true},
            "inbox": {"duplicates_delivered": 1, "applied_twice": 0, "applied": 7976, "skipped": 1},
        });
        let write_only = json!({"committed": 7976, "transactions": 1596, "write_secs": 8.02,
                                "commit_rate_eps": 994.5, "tx_latency_ms": latency(),
                                "outbox_empty_after_secs": 0.25});
        let broker_config = json!({"kafka_brokers": "k:9092", "duration_secs": 10.0, "messages": null,
                                   "payload_bytes": 100, "aggregates": 1000,
                                   "aggregate_types": ["order"], "topic_prefix": "b.",
                                   "topic_partitions": 8, "keep_topics": false});
        let broker = json!({"sent": 10, "acked": 9, "failed": 1, "first_error": "too large",
                            "secs": 1.5, "acked_per_sec": 6.0, "ack_latency_ms": latency(),
                            "producer_properties": {"linger.ms": "5"}, "topics_deleted": true});
        let drain_config = json!({"database": "postgres://u@h/db", "kafka_brokers": "k:9092",
                                  "schema": "public", "events": 8000, "partitions": 16, "nodes": 1,
                                  "payload_bytes": 100, "aggregates": 1000,
                                  "aggregate_types": ["order", "invoice"], "topic_prefix": "d.",
                                  "topic_partitions": 8, "load_connections": 2,
                                  "timeout_secs": 600.0, "keep_topics": false});
        let drain = json!({"events": 8000, "load_secs": 1.25, "load_eps": 6400.0,
                           "analyze_secs": 0.5, "drained": true, "drain_secs": 2.5,
                           "drain_eps": 3200.0, "delivered": 8000, "lost": 0, "duplicates": 0,
                           "consumer_rereads": 0, "order_violations": 0, "malformed": 0,
                           "verify_secs": 1.0, "engine_stopped_cleanly": true,
                           "topics_deleted": true});
        vec![
            report(
                "e2e",
                run_config(),
                e2e,
                &[h::COMMIT_TO_RECEIVE, h::INTENDED_TO_RECEIVE, h::TRANSACTION],
            ),
            report(
                "db-ceiling",
                run_config(),
                write_only.clone(),
                &[h::TRANSACTION],
            ),
            report(
                "e2e-unverified",
                run_config(),
                write_only,
                &[h::TRANSACTION],
            ),
            report("broker-ceiling", broker_config, broker, &[h::SEND_TO_ACK]),
            report("drain", drain_config, drain, &[]),
        ]
    }

    #[test]
    fn rendering_again_from_the_written_report_gives_the_same_files() {
        for report in every_kind() {
            let first = render(&report).expect("rendered");
            let json = report.to_json().expect("json");
            let read = AnyReport::from_json(&json).expect("parses");
            // The report is a fixed point: written, read and written again
            // it is the same text, and it draws the same files.
            assert_eq!(read.to_json().unwrap(), json, "{}", report.kind());
            assert_eq!(render(&read).expect("rendered"), first, "{}", report.kind());
            assert_eq!(read.failures(), ["a check failed"]);
        }
    }

    #[test]
    fn each_kind_draws_its_files() {
        let names: Vec<Vec<String>> = every_kind()
            .iter()
            .map(|r| {
                let rendered = render(r).unwrap();
                assert!(rendered
                    .summary()
                    .starts_with(&format!("# loadgen {}", r.kind())));
                rendered.names().into_iter().map(String::from).collect()
            })
            .collect();
        assert_eq!(
            names[0],
            [
                "summary.md",
                "latency_commit_to_receive.hgrm",
                "latency_intended_to_receive.hgrm",
                "latency_transaction.hgrm",
                "throughput.svg",
                "lag.svg",
                "latency.svg"
            ]
        );
        assert_eq!(
            names[1],
            [
                "summary.md",
                "latency_transaction.hgrm",
                "throughput.svg",
                "latency.svg"
            ]
        );
        assert_eq!(
            names[3],
            [
                "summary.md",
                "latency_send_to_ack.hgrm",
                "throughput.svg",
                "lag.svg",
                "latency.svg"
            ]
        );
        assert_eq!(names[4], ["summary.md", "throughput.svg", "lag.svg"]);
        let e2e = &every_kind()[0];
        let latency = &render(e2e).unwrap().files[6].contents;
        for curve in ["commit → receive", "intended → receive", "transaction"] {
            assert!(latency.contains(&format!(">{curve}</text>")), "{curve}");
        }
    }

    #[test]
    fn a_directory_is_rendered_again_from_its_report() {
        let dir = std::env::temp_dir().join(format!("loadgen-render-{}", std::process::id()));
        let report = &every_kind()[0];
        let written = write_run(&dir, report).expect("written");
        let before: Vec<String> = written
            .names()
            .iter()
            .map(|n| std::fs::read_to_string(dir.join(n)).unwrap())
            .collect();
        for n in written.names() {
            std::fs::write(dir.join(n), "stale").unwrap();
        }
        let (names, notes) = render_dir(&dir).expect("rendered");
        assert_eq!(names, written.names());
        assert!(notes.is_empty(), "{notes:?}");
        for (n, text) in written.names().iter().zip(&before) {
            assert_eq!(&std::fs::read_to_string(dir.join(n)).unwrap(), text, "{n}");
        }
        std::fs::remove_dir_all(&dir).ok();
        assert!(render_dir(&dir).is_err());
    }
}
