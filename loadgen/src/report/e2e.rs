//! Results of the runs that write transactions: end to end (`run`), and
//! write-only (`db-ceiling`, `run --no-verify`), and the checks that make
//! them fail.

use serde::{Deserialize, Serialize};

use super::{Latency, Report};
use crate::cli::RunConfig;
use crate::timeseries::LagSummary;
use crate::verifier::{DuplicateSample, TimestampTypes};

#[derive(Debug, Clone, Serialize, Deserialize)]
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
    /// With `run --inbox`: what the consumer inbox did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inbox: Option<InboxResults>,
}

/// `run --inbox`: the verifier's messages claimed through the inbox.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct InboxResults {
    /// Copies delivered beyond the first of each event (published twice or
    /// read twice): what a consumer without an inbox would apply again.
    pub duplicates_delivered: u64,
    /// Events the inbox let through more than once: must be 0.
    pub applied_twice: u64,
    /// Messages the inbox called new.
    pub applied: u64,
    /// Messages it skipped as already processed.
    pub skipped: u64,
}

/// Where the commit-to-broker latency comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BrokerLatency {
    pub source: LatencySource,
    pub description: String,
    pub latency_ms: Latency,
}

impl BrokerLatency {
    /// The append-time latency when every message of the run carried a
    /// log append time, else the receipt-based bound.
    pub fn choose(types: TimestampTypes, append: Latency, receipt: &Latency) -> Self {
        if types.log_append_time > 0 && types.create_time == 0 && types.none == 0 {
            Self {
                source: LatencySource::LogAppendTime,
                description: "commit → broker append (LogAppendTime, ms resolution)".into(),
                latency_ms: append,
            }
        } else {
            Self {
                source: LatencySource::ConsumerReceipt,
                description: "commit → consumer receipt (upper bound of commit → broker ack)"
                    .into(),
                latency_ms: receipt.clone(),
            }
        }
    }
}

/// Results of a run that only writes: no consumer.
#[derive(Debug, Clone, Serialize, Deserialize)]
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

impl Report<RunConfig, Results> {
    /// The checks the run failed, if any: lost events, broken order, an
    /// inbox that applied an event twice.
    pub fn failed_checks(&self) -> Vec<String> {
        let r = &self.results;
        let mut out = Vec::new();
        if r.lost > 0 {
            out.push(format!(
                "{} of {} committed events were not received within the drain timeout ({} s)",
                r.lost, r.committed, self.config.drain_timeout_secs
            ));
        }
        if let Some(i) = &r.inbox {
            if i.applied_twice > 0 {
                out.push(format!(
                    "the inbox applied {} events twice",
                    i.applied_twice
                ));
            }
            if i.applied != r.delivered {
                out.push(format!(
                    "the inbox applied {} events, {} distinct events were delivered",
                    i.applied, r.delivered
                ));
            }
        }
        if r.order_violations > 0 {
            out.push(format!(
                "{} events arrived out of order for their aggregate",
                r.order_violations
            ));
        }
        out
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
