//! Results of the runs that write transactions: end to end (`run`), and
//! write-only (`db-ceiling`, `run --no-verify`); their summaries and the
//! checks that make them fail.

use std::fmt::Write as _;

use serde::Serialize;

use super::{table, Latency, Report};
use crate::cli::RunConfig;
use crate::timeseries::LagSummary;
use crate::verifier::{DuplicateSample, TimestampTypes};

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
    /// Commit to broker acknowledgement, or the closest bound available;
    /// `source` says which.
    pub broker_latency: BrokerLatency,
    /// Due time (open loop) or transaction start (closed loop) to message
    /// received; includes time a writer spent behind schedule.
    pub latency_from_intended_ms: Latency,
    /// Begin to commit of each transaction.
    pub tx_latency_ms: Latency,
    /// The timestamp types of this run's messages: `log_append_time` on
    /// all of them means the broker stamped each message when it appended
    /// it.
    pub timestamp_types: TimestampTypes,
    pub lag: Option<LagSummary>,
}

/// Where the commit-to-broker latency comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LatencySource {
    /// The broker's append time (topics with
    /// `message.timestamp.type=LogAppendTime`), minus the commit time:
    /// the append precedes the acknowledgement by one local response.
    LogAppendTime,
    /// Commit to receipt by loadgen's consumer: an upper bound of commit
    /// to acknowledgement, used when the broker does not stamp append
    /// times.
    ConsumerReceipt,
}

#[derive(Debug, Clone, Serialize)]
pub struct BrokerLatency {
    pub source: LatencySource,
    pub description: &'static str,
    pub latency_ms: Latency,
}

impl BrokerLatency {
    /// The append-time latency when every message of the run carried a
    /// log append time, else the receipt-based bound.
    pub fn choose(types: TimestampTypes, append: Latency, receipt: &Latency) -> Self {
        if types.log_append_time > 0 && types.create_time == 0 && types.none == 0 {
            Self {
                source: LatencySource::LogAppendTime,
                description: "commit → broker append (LogAppendTime, ms resolution)",
                latency_ms: append,
            }
        } else {
            Self {
                source: LatencySource::ConsumerReceipt,
                description: "commit → consumer receipt (upper bound of commit → broker ack)",
                latency_ms: receipt.clone(),
            }
        }
    }
}

/// Results of a run that only writes: no consumer.
#[derive(Debug, Serialize)]
pub struct WriteResults {
    pub committed: u64,
    pub transactions: u64,
    /// From the start of the load to the last commit.
    pub write_secs: f64,
    /// Committed events per second over `write_secs`.
    pub commit_rate_eps: f64,
    pub tx_latency_ms: Latency,
    /// With an engine running (`run --no-verify`): seconds from the last
    /// commit until the outbox was empty; `None` if it did not empty
    /// within the drain timeout or nothing was waited for.
    pub outbox_empty_after_secs: Option<f64>,
}

fn describe(c: &RunConfig) -> String {
    let rate = if c.rate > 0.0 {
        format!("{} events/s open loop", c.rate)
    } else {
        "as fast as possible".into()
    };
    format!(
        "`{}` mode, {rate}, {} s, {} writers, {} events/tx, ~{} B payloads, \
         {} aggregates over {}.",
        c.mode,
        c.duration_secs,
        c.writers,
        c.events_per_tx,
        c.payload_bytes,
        c.aggregates,
        c.aggregate_types.join(", "),
    )
}

fn engine_line<C, R>(r: &Report<C, R>) -> String {
    match &r.engine {
        Some(e) => format!(
            "\nEngine: {} node(s), {} outbox partitions, {} ({}).\n",
            e.nodes, e.partitions, e.version, e.binary
        ),
        None => String::new(),
    }
}

impl Report<RunConfig, Results> {
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

    pub fn markdown(&self) -> String {
        let r = &self.results;
        let mut s = format!(
            "# loadgen {} `{}` ({})\n\n",
            self.kind, self.name, self.run_id
        );
        let _ = writeln!(s, "{}", describe(&self.config));
        s.push_str(&engine_line(self));
        s.push('\n');
        let lag = match &r.lag {
            Some(l) => format!(
                "max {}, {} at end of load, growth {:.0}/s: {}",
                l.max,
                l.at_end_of_load,
                l.growth_eps,
                if l.bounded { "bounded" } else { "NOT bounded" }
            ),
            None => "–".into(),
        };
        let t = r.timestamp_types;
        let rows = [
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
            ("lag (events)", lag),
            (
                "latency commit→receive ms (p50 / p99 / p99.9 / max)",
                r.latency_ms.cells(),
            ),
            (
                "latency to broker ms (p50 / p99 / p99.9 / max)",
                format!(
                    "{}: {}",
                    r.broker_latency.description,
                    r.broker_latency.latency_ms.cells()
                ),
            ),
            (
                "latency intended→receive ms (p50 / p99 / p99.9 / max)",
                r.latency_from_intended_ms.cells(),
            ),
            (
                "transaction ms (p50 / p99 / p99.9 / max)",
                r.tx_latency_ms.cells(),
            ),
            (
                "message timestamps (log append / create / none)",
                format!("{} / {} / {}", t.log_append_time, t.create_time, t.none),
            ),
            (
                "write / delivery / drain s",
                format!(
                    "{:.2} / {:.2} / {:.2}",
                    r.write_secs, r.delivery_secs, r.drain_secs
                ),
            ),
        ];
        s.push_str(&table(&rows));
        if let Some(d) = r.duplicate_samples.first() {
            let _ = writeln!(
                s,
                "\nFirst duplicate: event {} (aggregate {}) at partition {} offset {}, again at partition {} offset {}.",
                d.id, d.key, d.first.partition, d.first.offset, d.again.partition, d.again.offset
            );
        }
        s.push_str(CHARTS);
        let _ = writeln!(s, "\nMachine: {}", self.machine.line());
        s
    }
}

const CHARTS: &str = "\n![throughput](throughput.svg)\n![lag](lag.svg)\n![latency](latency.svg)\n";

impl Report<RunConfig, WriteResults> {
    pub fn markdown(&self) -> String {
        let r = &self.results;
        let mut s = format!(
            "# loadgen {} `{}` ({})\n\n",
            self.kind, self.name, self.run_id
        );
        let _ = writeln!(s, "{}", describe(&self.config));
        s.push_str(&engine_line(self));
        s.push('\n');
        let rows = [
            ("committed events", r.committed.to_string()),
            ("transactions", r.transactions.to_string()),
            (
                "commit rate (events/s)",
                format!("{:.0}", r.commit_rate_eps),
            ),
            (
                "transaction ms (p50 / p99 / p99.9 / max)",
                r.tx_latency_ms.cells(),
            ),
            ("write s", format!("{:.2}", r.write_secs)),
            (
                "outbox empty after the last commit (s)",
                r.outbox_empty_after_secs
                    .map_or("–".into(), |x| format!("{x:.2}")),
            ),
        ];
        s.push_str(&table(&rows));
        s.push_str("\n![throughput](throughput.svg)\n![latency](latency.svg)\n");
        let _ = writeln!(s, "\nMachine: {}", self.machine.line());
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hdrhistogram::Histogram;

    fn latency(ms: u64) -> Latency {
        let mut h = Histogram::<u64>::new(3).unwrap();
        h.record(ms * 1000).unwrap();
        Latency::from_us(&h)
    }

    #[test]
    fn append_time_is_used_only_when_every_message_has_it() {
        let all = TimestampTypes {
            log_append_time: 10,
            ..Default::default()
        };
        let b = BrokerLatency::choose(all, latency(2), &latency(5));
        assert_eq!(b.source, LatencySource::LogAppendTime);
        assert!((b.latency_ms.max - 2.0).abs() < 0.01);
        let mixed = TimestampTypes {
            log_append_time: 10,
            create_time: 1,
            none: 0,
        };
        let b = BrokerLatency::choose(mixed, latency(2), &latency(5));
        assert_eq!(b.source, LatencySource::ConsumerReceipt);
        assert!((b.latency_ms.max - 5.0).abs() < 0.01);
        let nothing = TimestampTypes::default();
        assert_eq!(
            BrokerLatency::choose(nothing, latency(2), &latency(5)).source,
            LatencySource::ConsumerReceipt
        );
        assert_eq!(
            serde_json::to_value(LatencySource::LogAppendTime).unwrap(),
            "log_append_time"
        );
    }
}
