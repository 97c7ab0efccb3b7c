//! What a consumer saw, judged per aggregate (the message key, whose payload
//! carries an increasing `seq`): events lost, copies, first deliveries out
//! of order, and stale deliveries, that is copies that land behind a newer
//! event of the same key.
//!
//! The two order counts answer different questions. First-delivery order is
//! what a consumer that deduplicates by id sees, so re-sends do not count.
//! Stale deliveries are what a compacted topic or a last-writer-wins
//! consumer sees: every copy counts, including the ordinary re-sends of an
//! at-least-once relay (1, 2, 3 delivered, then 2, 3 sent again), so a test
//! asserts none only where nothing may be re-sent behind a newer event.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::time::Duration;

use uuid::Uuid;

use crate::consumer::{consume_until, Received};

/// Checks a delivery against what was committed: returns (lost, duplicates).
pub fn lost_and_duplicates(committed: &[Uuid], received: &[Received]) -> (usize, usize) {
    let mut seen: HashMap<Uuid, usize> = HashMap::new();
    for r in received {
        *seen.entry(r.id()).or_default() += 1;
    }
    let lost = committed.iter().filter(|id| !seen.contains_key(id)).count();
    let dups = seen.values().map(|n| n - 1).sum();
    (lost, dups)
}

/// Per aggregate, how many first deliveries do not come in `seq` order
/// ([`OrderReport::first_delivery_violations`]).
pub fn order_violations(received: &[Received]) -> usize {
    order_report(received).first_delivery_violations
}

/// How many examples of each kind a report keeps for its message.
const EXAMPLES: usize = 6;

/// Order figures of a delivery, in consumption order per Kafka partition.
#[derive(Debug, Default, Clone)]
pub struct OrderReport {
    /// First deliveries of an id whose `seq` is not above the previous first
    /// delivery of the same key (the rule of [`order_violations`]).
    pub first_delivery_violations: usize,
    /// Deliveries, copies included, whose `seq` is below the highest `seq`
    /// already delivered for the same key earlier in the same partition.
    pub stale_deliveries: usize,
    /// A few of each, as `key seq N after M (topic/partition)`.
    pub examples: Vec<String>,
}

fn seq(r: &Received) -> i64 {
    r.payload["seq"].as_i64().expect("payload has seq")
}

/// Judges `received` (as consumed: order within each Kafka partition kept).
pub fn order_report(received: &[Received]) -> OrderReport {
    let mut report = OrderReport::default();
    let mut first_seen: HashSet<Uuid> = HashSet::new();
    let mut last_first: HashMap<&str, i64> = HashMap::new();
    let mut highest: HashMap<(&str, i32, &str), i64> = HashMap::new();
    let (mut first_examples, mut stale_examples) = (0, 0);
    for r in received {
        let s = seq(r);
        if first_seen.insert(r.id()) {
            if let Some(prev) = last_first.insert(r.key.as_str(), s) {
                if s <= prev {
                    report.first_delivery_violations += 1;
                    if first_examples < EXAMPLES {
                        first_examples += 1;
                        report.examples.push(format!(
                            "first delivery: key {} seq {s} after {prev} ({}/{})",
                            r.key, r.topic, r.partition
                        ));
                    }
                }
            }
        }
        let high = highest
            .entry((r.topic.as_str(), r.partition, r.key.as_str()))
            .or_insert(i64::MIN);
        if s < *high {
            report.stale_deliveries += 1;
            if stale_examples < EXAMPLES {
                stale_examples += 1;
                report.examples.push(format!(
                    "stale: key {} seq {s} after {} ({}/{})",
                    r.key, *high, r.topic, r.partition
                ));
            }
        }
        *high = (*high).max(s);
    }
    report
}

/// Everything a test prints and asserts about one delivery.
#[derive(Debug, Clone)]
pub struct Tally {
    /// Events committed.
    pub committed: usize,
    /// Messages received, copies included.
    pub received: usize,
    /// Committed events that never arrived.
    pub lost: usize,
    /// Copies beyond the first delivery of each event.
    pub duplicates: usize,
    /// Order per key.
    pub order: OrderReport,
}

impl Tally {
    /// `received` judged against the ids that were `committed`.
    pub fn of(committed: &[Uuid], received: &[Received]) -> Tally {
        let (lost, duplicates) = lost_and_duplicates(committed, received);
        Tally {
            committed: committed.len(),
            received: received.len(),
            lost,
            duplicates,
            order: order_report(received),
        }
    }

    /// The at-least-once checks, `what` naming the events in the messages:
    /// none lost, at most `max_duplicates` copies, first deliveries in
    /// order per key.
    #[track_caller]
    pub fn assert_delivered(&self, what: &str, max_duplicates: usize) {
        assert_eq!(self.lost, 0, "{what}: events lost; {self}");
        assert!(
            self.duplicates <= max_duplicates,
            "{what}: {} duplicates > {max_duplicates}; {self}",
            self.duplicates
        );
        assert_eq!(
            self.order.first_delivery_violations, 0,
            "{what}: first deliveries out of order; {self}"
        );
    }
}

impl fmt::Display for Tally {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "committed {} received {} lost {} duplicates {} first-delivery order violations {} \
             stale deliveries {}",
            self.committed,
            self.received,
            self.lost,
            self.duplicates,
            self.order.first_delivery_violations,
            self.order.stale_deliveries
        )?;
        if !self.order.examples.is_empty() {
            write!(f, "; e.g. {:?}", self.order.examples)?;
        }
        Ok(())
    }
}

/// Reads `topics` from the beginning at `bootstrap` until every id of
/// `want` arrived (then `grace` longer, to see copies) or `timeout` passed.
pub async fn consume_ids(
    bootstrap: &str,
    topics: &[String],
    want: &[Uuid],
    timeout: Duration,
    grace: Duration,
) -> Vec<Received> {
    let mut missing: HashSet<Uuid> = want.iter().copied().collect();
    let none_wanted = missing.is_empty();
    consume_until(bootstrap, topics, timeout, grace, none_wanted, move |r| {
        missing.remove(&r.id());
        missing.is_empty()
    })
    .await
}

/// [`consume_ids`] of `committed` on `topics`, judged: the figures of one
/// delivery.
pub async fn tally(
    bootstrap: &str,
    topics: &[String],
    committed: &[Uuid],
    timeout: Duration,
    grace: Duration,
) -> Tally {
    let got = consume_ids(bootstrap, topics, committed, timeout, grace).await;
    Tally::of(committed, &got)
}

/// [`tally`] once a test has waited for the backlog to drain: the events
/// get 60 s to arrive if it drained, 10 s if it did not (they will not all
/// come), then `grace` for copies.
pub async fn tally_after_drain(
    bootstrap: &str,
    topics: &[String],
    committed: &[Uuid],
    drained: bool,
    grace: Duration,
) -> Tally {
    let wait = Duration::from_secs(if drained { 60 } else { 10 });
    tally(bootstrap, topics, committed, wait, grace).await
}
