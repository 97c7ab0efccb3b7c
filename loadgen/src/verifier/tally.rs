//! The verifier's bookkeeping, without Kafka: matches committed events with
//! received messages, and counts what the report needs (unique deliveries,
//! duplicates, per-aggregate order violations, latencies, losses).
//!
//! A message can arrive before the writer reported its commit (the relay
//! may see a commit before the client does), so either side may come first.

use std::collections::hash_map::Entry;

use ahash::AHashMap;
use anyhow::Result;
use hdrhistogram::Histogram;
use uuid::Uuid;

use crate::writer::CommitBatch;

/// Highest latency the histograms hold (an hour), microseconds.
const MAX_LATENCY_US: u64 = 3_600_000_000;

pub fn latency_histogram() -> Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1, MAX_LATENCY_US, 3)?)
}

/// Duplicates kept as examples for the report.
pub const DUPLICATE_SAMPLES: usize = 20;

/// Where a message was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Location {
    pub partition: i32,
    pub offset: i64,
}

/// A duplicate: the event, its aggregate and both copies.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DuplicateSample {
    pub id: Uuid,
    pub key: String,
    pub first: Location,
    pub again: Location,
}

/// The timestamp types of a run's messages, as the consumer saw them.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct TimestampTypes {
    pub log_append_time: u64,
    pub create_time: u64,
    pub none: u64,
}

#[derive(Debug, Clone, Copy)]
struct Sent {
    intended_us: u64,
    commit_us: u64,
}

pub struct Tally {
    /// Committed, not received yet.
    pending: AHashMap<Uuid, Sent>,
    /// Received, commit not reported yet: receive and append times.
    early: AHashMap<Uuid, (u64, Option<u64>)>,
    /// Every id received at least once, and where it was first read
    /// (telling a re-publish from a re-read).
    delivered: AHashMap<Uuid, Location>,
    /// Last `seq` first-delivered per message key (aggregate id).
    last_seq: AHashMap<String, u64>,
    pub committed: u64,
    pub transactions: u64,
    /// Events published more than once (another partition or offset).
    pub duplicates: u64,
    /// The same partition and offset delivered again.
    pub rereads: u64,
    pub duplicate_samples: Vec<DuplicateSample>,
    pub order_violations: u64,
    /// Messages of this run that could not be read (no id, no seq).
    pub malformed: u64,
    pub first_commit_us: Option<u64>,
    pub last_commit_us: Option<u64>,
    pub last_delivery_us: Option<u64>,
    /// Commit to receive, microseconds.
    pub latency: Histogram<u64>,
    /// Intended (due) time to receive, microseconds: what a caller of an
    /// open-loop system waits, corrected for coordinated omission.
    pub latency_from_intended: Histogram<u64>,
    /// Commit to the broker's append time, microseconds (millisecond
    /// resolution), for messages that carry one.
    pub latency_to_append: Histogram<u64>,
    pub timestamp_types: TimestampTypes,
}

impl Tally {
    pub fn new() -> Result<Self> {
        Ok(Self {
            pending: AHashMap::new(),
            early: AHashMap::new(),
            delivered: AHashMap::new(),
            last_seq: AHashMap::new(),
            committed: 0,
            transactions: 0,
            duplicates: 0,
            rereads: 0,
            duplicate_samples: Vec::new(),
            order_violations: 0,
            malformed: 0,
            first_commit_us: None,
            last_commit_us: None,
            last_delivery_us: None,
            latency: latency_histogram()?,
            latency_from_intended: latency_histogram()?,
            latency_to_append: latency_histogram()?,
            timestamp_types: TimestampTypes::default(),
        })
    }

    pub fn on_commit(&mut self, batch: &CommitBatch) {
        let sent = Sent {
            intended_us: batch.intended_us,
            commit_us: batch.commit_us,
        };
        self.transactions += 1;
        self.committed += batch.ids.len() as u64;
        self.first_commit_us = Some(
            self.first_commit_us
                .map_or(batch.commit_us, |t| t.min(batch.commit_us)),
        );
        self.last_commit_us = Some(
            self.last_commit_us
                .map_or(batch.commit_us, |t| t.max(batch.commit_us)),
        );
        for id in &batch.ids {
            match self.early.remove(id) {
                Some((received_us, append_us)) => self.record(sent, received_us, append_us),
                None => {
                    self.pending.insert(*id, sent);
                }
            }
        }
    }

    /// A message of this run: its id, key, `seq`, where it was read, when
    /// it was received and (if the broker stamped it) appended. Returns
    /// whether it was a first delivery.
    pub fn on_message(
        &mut self,
        id: Uuid,
        key: &str,
        seq: u64,
        at: Location,
        received_us: u64,
        append_us: Option<u64>,
    ) -> bool {
        match self.delivered.entry(id) {
            Entry::Occupied(first) if *first.get() == at => {
                // The same message read twice: the consumer's doing (seen
                // with tansu), not a second publish.
                self.rereads += 1;
                return false;
            }
            Entry::Occupied(first) => {
                self.duplicates += 1;
                if self.duplicate_samples.len() < DUPLICATE_SAMPLES {
                    self.duplicate_samples.push(DuplicateSample {
                        id,
                        key: key.to_owned(),
                        first: *first.get(),
                        again: at,
                    });
                }
                return false;
            }
            Entry::Vacant(v) => {
                v.insert(at);
            }
        }
        self.last_delivery_us = Some(
            self.last_delivery_us
                .map_or(received_us, |t| t.max(received_us)),
        );
        match self.last_seq.get_mut(key) {
            Some(last) => {
                if seq <= *last {
                    self.order_violations += 1;
                }
                *last = seq;
            }
            None => {
                self.last_seq.insert(key.to_owned(), seq);
            }
        }
        match self.pending.remove(&id) {
            Some(sent) => self.record(sent, received_us, append_us),
            None => {
                self.early.insert(id, (received_us, append_us));
            }
        }
        true
    }

    fn record(&mut self, sent: Sent, received_us: u64, append_us: Option<u64>) {
        self.latency
            .saturating_record(received_us.saturating_sub(sent.commit_us));
        if let Some(append_us) = append_us {
            // The relay can append before the writer sees its commit
            // return; that counts as 0.
            self.latency_to_append
                .saturating_record(append_us.saturating_sub(sent.commit_us));
        }
        self.latency_from_intended
            .saturating_record(received_us.saturating_sub(sent.intended_us));
    }

    /// Unique events received.
    pub fn delivered(&self) -> u64 {
        self.delivered.len() as u64
    }

    /// Committed and not (yet) received.
    pub fn missing(&self) -> u64 {
        self.pending.len() as u64
    }

    /// Received with this run's header but never reported committed (a
    /// commit whose acknowledgement the writer did not get).
    pub fn unexpected(&self) -> u64 {
        self.early.len() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AT: Location = Location {
        partition: 0,
        offset: 0,
    };

    fn batch(commit_us: u64, ids: &[Uuid]) -> CommitBatch {
        CommitBatch {
            intended_us: commit_us - 100,
            commit_us,
            ids: ids.to_vec(),
        }
    }

    #[test]
    fn matches_commits_and_messages_in_either_order() {
        let mut t = Tally::new().unwrap();
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        t.on_commit(&batch(1_000, &[a]));
        assert!(t.on_message(a, "1", 1, AT, 3_000, None));
        // b arrives before its commit is reported.
        assert!(t.on_message(b, "2", 1, AT, 4_000, None));
        assert_eq!(t.missing(), 0);
        assert_eq!(t.unexpected(), 1);
        t.on_commit(&batch(3_500, &[b]));
        assert_eq!((t.missing(), t.unexpected()), (0, 0));
        assert_eq!(t.delivered(), 2);
        assert_eq!(t.latency.len(), 2);
        assert_eq!(t.latency.max(), t.latency.highest_equivalent(2_000));
        assert_eq!(t.latency.min(), t.latency.lowest_equivalent(500));
        assert_eq!(
            t.latency_from_intended.max(),
            t.latency.highest_equivalent(2_100)
        );
        assert_eq!(
            (t.first_commit_us, t.last_commit_us),
            (Some(1_000), Some(3_500))
        );
        assert_eq!(t.last_delivery_us, Some(4_000));
    }

    #[test]
    fn counts_duplicates_and_losses() {
        let mut t = Tally::new().unwrap();
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        t.on_commit(&batch(1_000, &[a, b]));
        assert!(t.on_message(a, "1", 1, AT, 2_000, None));
        let again = Location {
            partition: 0,
            offset: 7,
        };
        assert!(!t.on_message(a, "1", 1, again, 2_500, None));
        assert!(!t.on_message(a, "1", 1, AT, 2_600, None));
        assert_eq!((t.duplicates, t.rereads), (1, 1));
        assert_eq!(t.duplicate_samples[0].first, AT);
        assert_eq!(t.duplicate_samples[0].again, again);
        assert_eq!(t.delivered(), 1);
        assert_eq!(t.missing(), 1);
        assert_eq!(t.committed, 2);
        assert_eq!(t.transactions, 1);
    }

    #[test]
    fn order_is_checked_per_key_on_first_deliveries() {
        let mut t = Tally::new().unwrap();
        let ids: Vec<Uuid> = (0..5).map(|_| Uuid::now_v7()).collect();
        t.on_message(ids[0], "1", 1, AT, 1, None);
        t.on_message(ids[1], "2", 1, AT, 1, None);
        t.on_message(ids[2], "1", 2, AT, 1, None);
        // A re-send of seq 1 is a duplicate, not a violation.
        t.on_message(ids[0], "1", 1, AT, 1, None);
        assert_eq!(t.order_violations, 0);
        t.on_message(ids[3], "2", 3, AT, 1, None);
        t.on_message(ids[4], "2", 2, AT, 1, None);
        assert_eq!(t.order_violations, 1);
    }

    #[test]
    fn append_times_give_the_latency_to_the_broker() {
        let mut t = Tally::new().unwrap();
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        t.on_commit(&batch(10_000, &[a]));
        assert!(t.on_message(a, "1", 1, AT, 30_000, Some(14_000)));
        // Appended before the writer saw its commit return: 0, not negative.
        assert!(t.on_message(b, "2", 1, AT, 30_000, Some(9_000)));
        t.on_commit(&batch(10_000, &[b]));
        assert_eq!(t.latency_to_append.len(), 2);
        assert_eq!(
            t.latency_to_append.max(),
            t.latency_to_append.highest_equivalent(4_000)
        );
        assert_eq!(t.latency_to_append.min(), 0);
    }
}
