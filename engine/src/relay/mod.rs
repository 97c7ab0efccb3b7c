//! The relay: one worker per owned partition moves events from a
//! [`ClaimReader`] to a [`Sink`](crate::sink::Sink), in order, acknowledging
//! to the reader only what the sink acknowledged, and only as a prefix: once
//! an event fails, nothing after it is acknowledged or sent until it is
//! resolved (see [`worker`]).
//!
//! The ports a worker sees are about the domain, not about PostgreSQL:
//! - [`EventSource`] opens a [`ClaimReader`] per claim. The reader hands out
//!   the partition's events in order, takes acknowledgements of the oldest
//!   ones it handed out (fenced by the claim), and rewinds to the oldest
//!   unacknowledged event after a failure. Progress marks, deletes, vacuum,
//!   and which SQL fences are the reader's business.
//! - [`DeadLetters`] takes the events the broker refuses for good.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use uuid::Uuid;

use crate::error::StoreError;
use crate::event::OutboxEvent;

pub mod backoff;
#[cfg(test)]
mod tests;
pub mod window;
pub mod worker;

/// The right to relay one partition, as granted by its lease. `epoch` is the
/// fencing token: every acknowledgement carries it, and the store refuses it
/// once another owner took the partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim {
    pub partition: u32,
    pub epoch: i64,
    /// The owning process (a node id restarted gets a new incarnation).
    pub incarnation: Uuid,
    /// Which source relays the partition under this claim. A switch of
    /// mode bumps the epoch, so a claim never changes mode.
    pub mode: Mode,
}

/// How a partition's events reach the relay: polled from the outbox table,
/// or streamed from the replication slot (change data capture).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Mode {
    #[default]
    Poll,
    Cdc,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Poll => "poll",
            Mode::Cdc => "cdc",
        }
    }

    /// The mode stored in the database (`None`, not chosen yet, polls).
    pub fn from_db(value: Option<&str>) -> Result<Mode, StoreError> {
        match value {
            None | Some("poll") => Ok(Mode::Poll),
            Some("cdc") => Ok(Mode::Cdc),
            Some(other) => Err(StoreError::Schema(format!(
                "outbox_leases.mode holds {other:?}; expected poll or cdc"
            ))),
        }
    }
}

impl From<crate::config::SourceKind> for Mode {
    fn from(kind: crate::config::SourceKind) -> Mode {
        match kind {
            crate::config::SourceKind::Poll => Mode::Poll,
            crate::config::SourceKind::Cdc => Mode::Cdc,
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What an acknowledgement did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ack {
    /// The events are published for good (the reader will not hand them out again).
    Done,
    /// The claim is stale: another owner has the partition. Nothing changed.
    Fenced,
}

/// What a fetch read.
#[derive(Debug, Clone, PartialEq)]
pub enum Read {
    /// The next events in order (possibly none), and how long the lease
    /// still holds by the database's clock when they were read.
    Events {
        events: Vec<OutboxEvent>,
        lease_left: Duration,
    },
    /// The claim is stale: another owner has the partition.
    Fenced,
}

/// A poison event on its way to the dead letters.
#[derive(Debug, Clone, PartialEq)]
pub struct Parked {
    pub error: String,
    pub attempts: u32,
    pub first_failed_at: std::time::SystemTime,
    pub node_id: String,
}

/// How far behind a partition is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backlog {
    pub partition: u32,
    /// Events waiting (a source may cap the count).
    pub pending: u64,
    /// Age of the oldest waiting event, in seconds.
    pub oldest_age_secs: Option<f64>,
}

/// Where events come from: the polling Postgres source today, a logical
/// decoding source later.
pub trait EventSource: Send + Sync + 'static {
    type Reader: ClaimReader;

    /// A reader of the partition of `claim`, starting at its oldest
    /// unacknowledged event.
    fn open(&self, claim: &Claim) -> Self::Reader;

    /// A signal that changes when the partition of `claim` may have new
    /// events: a caught-up worker waits on it instead of polling. `None`:
    /// poll.
    fn doorbell(&self, claim: &Claim) -> Option<Doorbell>;

    /// The backlog of each of `partitions`.
    fn backlog(
        &self,
        partitions: &[u32],
    ) -> impl Future<Output = Result<Vec<Backlog>, StoreError>> + Send;
}

/// Rings (changes) when a partition may have new events.
pub type Doorbell = tokio::sync::watch::Receiver<u64>;

/// One claim's view of its partition.
///
/// The reader keeps the events it handed out and that were not acknowledged
/// yet ("outstanding"), oldest first. Every fetch continues after the last
/// outstanding event; `acknowledge(n)` publishes the oldest `n` outstanding;
/// `rewind` forgets the outstanding ones, so the next fetch starts again at
/// the oldest unacknowledged event.
pub trait ClaimReader: Send + 'static {
    /// Up to `limit` events after the outstanding ones, in order.
    fn fetch(&mut self, limit: usize) -> impl Future<Output = Result<Read, StoreError>> + Send;

    /// Acknowledges the oldest `count` outstanding events, if the claim still
    /// holds; with `fetch_next`, then fetches up to that many more (a reader
    /// may do both in one round trip). On an error nothing was acknowledged.
    fn acknowledge(
        &mut self,
        count: usize,
        fetch_next: Option<usize>,
    ) -> impl Future<Output = Result<(Ack, Option<Read>), StoreError>> + Send;

    /// Forgets every outstanding event: they are handed out again.
    fn rewind(&mut self);

    /// Stores any progress the reader kept in memory (a reader may store
    /// its mark less often than it acknowledges); called when the worker
    /// drained.
    fn flush(&mut self) -> impl Future<Output = Result<(), StoreError>> + Send {
        async { Ok(()) }
    }
}

/// Where events the broker refuses for good are kept for an operator.
pub trait DeadLetters: Send + Sync + 'static {
    /// Keeps `event` (of `claim`'s partition) as a dead letter, if `claim`
    /// still holds. Parking the same event twice updates the first record.
    fn park(
        &self,
        claim: &Claim,
        event: &OutboxEvent,
        parked: &Parked,
    ) -> impl Future<Output = Result<Ack, StoreError>> + Send;
}

/// Until when a node may send under a lease, as the node learned it from the
/// database's clock (the start of a request that saw the lease's expiry,
/// plus the time it had left). Shared by the supervisor, which renews the
/// lease, and the worker, which checks it before every fetch and the sink,
/// which checks it before every message.
#[derive(Debug, Clone)]
pub struct LeaseDeadline {
    inner: Arc<DeadlineInner>,
}

#[derive(Debug)]
struct DeadlineInner {
    base: Instant,
    nanos: AtomicU64,
}

impl LeaseDeadline {
    pub fn new(until: Instant) -> Self {
        let base = Instant::now().min(until);
        let inner = DeadlineInner {
            base,
            nanos: AtomicU64::new(nanos_since(base, until)),
        };
        Self {
            inner: Arc::new(inner),
        }
    }

    /// The deadline now.
    pub fn get(&self) -> Instant {
        self.inner.base + Duration::from_nanos(self.inner.nanos.load(Ordering::Acquire))
    }

    /// Moves the deadline to `until` if that is later.
    pub fn extend(&self, until: Instant) {
        let n = nanos_since(self.inner.base, until);
        self.inner.nanos.fetch_max(n, Ordering::AcqRel);
    }

    /// Ends the lease now: nothing more may be sent under it.
    pub fn expire(&self) {
        let n = nanos_since(self.inner.base, Instant::now());
        self.inner.nanos.store(n, Ordering::Release);
    }

    pub fn is_past(&self) -> bool {
        Instant::now() >= self.get()
    }
}

fn nanos_since(base: Instant, t: Instant) -> u64 {
    t.saturating_duration_since(base).as_nanos() as u64
}

#[cfg(test)]
mod deadline_tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_lease_deadline_only_moves_forward_until_expired() {
        let now = Instant::now();
        let d = LeaseDeadline::new(now + Duration::from_secs(2));
        assert!(!d.is_past());
        d.extend(now + Duration::from_secs(1));
        assert_eq!(d.get(), now + Duration::from_secs(2));
        d.extend(now + Duration::from_secs(3));
        assert_eq!(d.get(), now + Duration::from_secs(3));
        tokio::time::advance(Duration::from_secs(3)).await;
        assert!(d.is_past());
        let e = LeaseDeadline::new(Instant::now() + Duration::from_secs(5));
        e.expire();
        assert!(e.is_past());
    }
}
