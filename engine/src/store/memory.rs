//! In-memory doubles of the source and the dead letters, for unit tests of
//! the relay (polling and CDC alike): events per partition in order, a
//! current epoch per partition that fences stale claims, and a log of what
//! was acknowledged and parked.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use uuid::Uuid;

use crate::error::StoreError;
use crate::event::OutboxEvent;
use crate::relay::{Ack, Backlog, Claim, ClaimReader, DeadLetters, EventSource, Parked, Read};

#[derive(Debug, Default)]
struct State {
    /// Unacknowledged events per partition, in order.
    pending: BTreeMap<u32, Vec<OutboxEvent>>,
    /// Acknowledged event ids per partition, in the order acknowledged.
    acknowledged: BTreeMap<u32, Vec<Uuid>>,
    /// The epoch that holds each partition; other claims are fenced.
    epochs: HashMap<u32, i64>,
    /// Parked events, in the order parked.
    parked: Vec<(OutboxEvent, Parked)>,
    /// What a fetch says of the lease.
    lease_left: Duration,
    /// Fail this many store calls from now on.
    failures: u32,
    /// When each injected failure happened.
    failed_at: Vec<tokio::time::Instant>,
}

/// Rings every partition's doorbell on `push`.
type Bells = Arc<tokio::sync::watch::Sender<u64>>;

/// A source and dead letters in memory. Clones share one state.
#[derive(Debug, Clone)]
pub struct MemorySource {
    state: Arc<Mutex<State>>,
    bell: Bells,
}

impl Default for MemorySource {
    fn default() -> Self {
        Self::new()
    }
}

impl MemorySource {
    pub fn new() -> Self {
        let state = State {
            lease_left: Duration::from_secs(5),
            ..State::default()
        };
        Self {
            state: Arc::new(Mutex::new(state)),
            bell: Arc::new(tokio::sync::watch::channel(0).0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends events to a partition.
    pub fn push(&self, partition: u32, events: impl IntoIterator<Item = OutboxEvent>) {
        self.lock()
            .pending
            .entry(partition)
            .or_default()
            .extend(events);
        self.bell.send_modify(|n| *n += 1);
    }

    /// Lets `epoch` (and only it) act on `partition`.
    pub fn set_epoch(&self, partition: u32, epoch: i64) {
        self.lock().epochs.insert(partition, epoch);
    }

    /// What every fetch says of the lease from now on.
    pub fn set_lease_left(&self, left: Duration) {
        self.lock().lease_left = left;
    }

    /// The next `n` store calls fail.
    pub fn fail_next(&self, n: u32) {
        self.lock().failures = n;
    }

    /// When each injected failure happened, in order.
    pub fn failed_at(&self) -> Vec<tokio::time::Instant> {
        self.lock().failed_at.clone()
    }

    pub fn pending(&self, partition: u32) -> Vec<OutboxEvent> {
        self.lock()
            .pending
            .get(&partition)
            .cloned()
            .unwrap_or_default()
    }

    pub fn acknowledged(&self, partition: u32) -> Vec<Uuid> {
        self.lock()
            .acknowledged
            .get(&partition)
            .cloned()
            .unwrap_or_default()
    }

    pub fn parked(&self) -> Vec<(OutboxEvent, Parked)> {
        self.lock().parked.clone()
    }
}

impl State {
    fn holds(&self, claim: &Claim) -> bool {
        self.epochs
            .get(&claim.partition)
            .is_none_or(|e| *e == claim.epoch)
    }

    fn fail(&mut self) -> Result<(), StoreError> {
        if self.failures > 0 {
            self.failures -= 1;
            self.failed_at.push(tokio::time::Instant::now());
            return Err(StoreError::Schema("memory store: injected failure".into()));
        }
        Ok(())
    }
}

impl EventSource for MemorySource {
    type Reader = MemoryReader;

    fn doorbell(&self, _claim: &Claim) -> Option<crate::relay::Doorbell> {
        Some(self.bell.subscribe())
    }

    fn open(&self, claim: &Claim) -> MemoryReader {
        MemoryReader {
            source: self.clone(),
            claim: *claim,
            outstanding: 0,
        }
    }

    async fn backlog(&self, partitions: &[u32]) -> Result<Vec<Backlog>, StoreError> {
        let state = self.lock();
        Ok(partitions
            .iter()
            .map(|p| Backlog {
                partition: *p,
                pending: state.pending.get(p).map_or(0, |v| v.len() as u64),
                oldest_age_secs: None,
            })
            .collect())
    }
}

/// A claim's reader of a [`MemorySource`] partition.
#[derive(Debug)]
pub struct MemoryReader {
    source: MemorySource,
    claim: Claim,
    /// How many of the partition's first pending events are handed out.
    outstanding: usize,
}

impl MemoryReader {
    fn read(&mut self, state: &State, limit: usize) -> Read {
        if !state.holds(&self.claim) {
            return Read::Fenced;
        }
        let pending = state
            .pending
            .get(&self.claim.partition)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let from = self.outstanding.min(pending.len());
        let to = (from + limit).min(pending.len());
        self.outstanding = to;
        Read::Events {
            events: pending[from..to].to_vec(),
            lease_left: state.lease_left,
        }
    }
}

impl ClaimReader for MemoryReader {
    async fn fetch(&mut self, limit: usize) -> Result<Read, StoreError> {
        let source = self.source.clone();
        let mut state = source.lock();
        state.fail()?;
        Ok(self.read(&state, limit))
    }

    async fn acknowledge(
        &mut self,
        count: usize,
        fetch_next: Option<usize>,
    ) -> Result<(Ack, Option<Read>), StoreError> {
        let source = self.source.clone();
        let mut state = source.lock();
        state.fail()?;
        if !state.holds(&self.claim) {
            return Ok((Ack::Fenced, None));
        }
        let count = count.min(self.outstanding);
        let partition = self.claim.partition;
        let gone: Vec<Uuid> = state
            .pending
            .entry(partition)
            .or_default()
            .drain(..count)
            .map(|e| e.id)
            .collect();
        state
            .acknowledged
            .entry(partition)
            .or_default()
            .extend(gone);
        self.outstanding -= count;
        let next = fetch_next.map(|limit| self.read(&state, limit));
        Ok((Ack::Done, next))
    }

    fn rewind(&mut self) {
        self.outstanding = 0;
    }
}

impl DeadLetters for MemorySource {
    async fn park(
        &self,
        claim: &Claim,
        event: &OutboxEvent,
        parked: &Parked,
    ) -> Result<Ack, StoreError> {
        let mut state = self.lock();
        state.fail()?;
        if !state.holds(claim) {
            return Ok(Ack::Fenced);
        }
        state.parked.push((event.clone(), parked.clone()));
        Ok(Ack::Done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::test_event;

    fn claim(epoch: i64) -> Claim {
        Claim {
            partition: 0,
            epoch,
            incarnation: Uuid::nil(),
            mode: crate::relay::Mode::Poll,
        }
    }

    fn ids(read: &Read) -> Vec<i64> {
        match read {
            Read::Events { events, .. } => events.iter().map(|e| e.position).collect(),
            Read::Fenced => panic!("fenced"),
        }
    }

    #[tokio::test]
    async fn hands_out_in_order_acknowledges_prefixes_and_rewinds() {
        let source = MemorySource::new();
        source.push(0, (1..=5).map(|p| test_event(p, "a")));
        let mut r = source.open(&claim(1));
        assert_eq!(ids(&r.fetch(2).await.unwrap()), vec![1, 2]);
        assert_eq!(ids(&r.fetch(2).await.unwrap()), vec![3, 4]);
        let (ack, next) = r.acknowledge(1, Some(10)).await.unwrap();
        assert_eq!(ack, Ack::Done);
        assert_eq!(ids(&next.unwrap()), vec![5]);
        r.rewind();
        assert_eq!(ids(&r.fetch(10).await.unwrap()), vec![2, 3, 4, 5]);
        assert_eq!(source.acknowledged(0).len(), 1);
    }

    #[tokio::test]
    async fn a_stale_claim_is_fenced() {
        let source = MemorySource::new();
        source.push(0, [test_event(1, "a")]);
        let mut r = source.open(&claim(1));
        r.fetch(1).await.unwrap();
        source.set_epoch(0, 2);
        assert_eq!(r.acknowledge(1, None).await.unwrap().0, Ack::Fenced);
        assert_eq!(r.fetch(1).await.unwrap(), Read::Fenced);
        assert_eq!(source.pending(0).len(), 1);
    }
}
