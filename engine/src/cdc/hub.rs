//! The in-process fan-out of the replication slot's stream to the workers
//! of the partitions in CDC mode, and the bookkeeping that decides how far
//! the slot may be confirmed.
//!
//! The stream hands over whole transactions in commit order. Each event
//! goes to its partition's queue if this node relays the partition by CDC
//! (and the partition's mark does not already cover it); the transaction
//! counts the events it queued. A worker takes events from the head of its
//! queue, and acknowledges them once the broker did; when every event of a
//! transaction is acknowledged (or was never queued), and so is every
//! transaction before it, the slot may be confirmed up to its end. Nothing
//! is confirmed past an event that is not on the broker.
//!
//! A stream restart (a lost connection, a new slot holder) starts a new
//! *generation*: every queue is rebuilt from what the slot streams again
//! from its confirmed position, and readers of the old generation start
//! over from the head of their new queue.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use tokio::sync::{watch, Notify};

use crate::cdc::snapshot::Snapshot;
use crate::event::OutboxEvent;
use crate::relay::Claim;

/// An event as the stream decoded it.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    pub shard: u32,
    /// The writing transaction's id (the row's `txid`).
    pub txid: u64,
    pub event: OutboxEvent,
}

/// One committed transaction's events, in the order it wrote them.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedTx {
    pub commit_lsn: u64,
    /// Where the slot may be confirmed once the transaction is published.
    pub end_lsn: u64,
    /// Commit time, microseconds since 2000-01-01 (PostgreSQL's epoch).
    pub commit_us: i64,
    pub events: Vec<Decoded>,
}

/// What a partition already published: everything its snapshot sees; of
/// what the window's snapshot adds, everything up to its `(position, id)`
/// (a polling mark inside a window); and every event up to (commit LSN,
/// ordinal in its transaction).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Covered {
    pub snapshot: Option<Snapshot>,
    pub window: Option<(Snapshot, (i64, uuid::Uuid))>,
    pub upto: Option<(u64, u32)>,
}

impl Covered {
    pub fn covers(&self, txid: u64, at: (u64, u32), event: &OutboxEvent) -> bool {
        self.snapshot.as_ref().is_some_and(|s| s.sees(txid))
            || self
                .window
                .as_ref()
                .is_some_and(|(hi, upto)| hi.sees(txid) && (event.position, event.id) <= *upto)
            || self.upto.is_some_and(|u| at <= u)
    }
}

/// A queued event: where it is in the stream, and its transaction.
#[derive(Debug, Clone)]
struct Queued {
    event: OutboxEvent,
    txid: u64,
    at: (u64, u32),
    tx: u64,
}

/// A queued event handed to a reader.
#[derive(Debug, Clone, PartialEq)]
pub struct Taken {
    pub event: OutboxEvent,
    pub txid: u64,
    /// (commit LSN, ordinal in its transaction).
    pub at: (u64, u32),
}

#[derive(Debug)]
struct Part {
    queue: VecDeque<Queued>,
    /// The queue holds only events after the partition's mark. While
    /// false, the partition catches up from the table first and the queue
    /// holds everything streamed since it was attached.
    streaming: bool,
    covered: Covered,
    claim: Option<Claim>,
}

#[derive(Debug)]
struct Tx {
    seq: u64,
    end_lsn: u64,
    commit_us: i64,
    pending: usize,
}

#[derive(Debug, Default)]
struct State {
    generation: u64,
    running: bool,
    parts: HashMap<u32, Part>,
    /// Transactions with queued events not yet acknowledged, and the ones
    /// after them, in commit order.
    txs: VecDeque<Tx>,
    next_seq: u64,
    queued: usize,
    confirmable: u64,
}

/// A reader's view of the hub changed under it: the stream restarted (or
/// stopped), or its partition's queue was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stale;

/// Attaching a reader to its partition's queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attached {
    pub generation: u64,
    /// The queue streams on from the partition's mark; false: catch up
    /// from the table first ([`Hub::start_streaming`]).
    pub streaming: bool,
}

/// The fan-out; shared by the stream task and the partitions' readers.
pub struct Hub {
    state: Mutex<State>,
    space: Notify,
    capacity: usize,
    bells: Vec<watch::Sender<u64>>,
    received: AtomicU64,
}

impl Hub {
    /// A hub for `partitions` partitions that buffers up to `capacity`
    /// events before the stream waits.
    pub fn new(partitions: u32, capacity: usize) -> Hub {
        Hub {
            state: Mutex::new(State::default()),
            space: Notify::new(),
            capacity: capacity.max(1),
            bells: (0..partitions).map(|_| watch::channel(0).0).collect(),
            received: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is consistent after every method (no panics inside);
        // a poisoned lock is taken over.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn ring(&self, partition: u32) {
        if let Some(b) = self.bells.get(partition as usize) {
            b.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// Rings when the partition's queue may have new events.
    pub fn doorbell(&self, partition: u32) -> Option<watch::Receiver<u64>> {
        self.bells.get(partition as usize).map(|b| b.subscribe())
    }

    /// A new stream starts at the slot's `confirmed` position: queues are
    /// rebuilt, the partitions in `streaming` stream on from their marks.
    pub fn restart(&self, confirmed: u64, streaming: Vec<(u32, Covered)>) -> u64 {
        let generation = {
            let mut s = self.lock();
            let claims: HashMap<u32, Claim> = s
                .parts
                .iter()
                .filter_map(|(p, part)| part.claim.map(|c| (*p, c)))
                .collect();
            s.generation += 1;
            s.running = true;
            s.txs.clear();
            s.queued = 0;
            s.confirmable = confirmed;
            s.parts = streaming
                .into_iter()
                .map(|(p, covered)| {
                    let part = Part {
                        queue: VecDeque::new(),
                        streaming: true,
                        covered,
                        claim: claims.get(&p).copied(),
                    };
                    (p, part)
                })
                .collect();
            s.generation
        };
        self.space.notify_waiters();
        for p in 0..self.bells.len() as u32 {
            self.ring(p);
        }
        generation
    }

    /// The stream ended: every reader is stale until the next restart.
    pub fn stop(&self) {
        {
            let mut s = self.lock();
            s.generation += 1;
            s.running = false;
            s.parts.clear();
            s.txs.clear();
            s.queued = 0;
        }
        self.space.notify_waiters();
        for p in 0..self.bells.len() as u32 {
            self.ring(p);
        }
    }

    pub fn is_running(&self) -> bool {
        self.lock().running
    }

    /// Queues a committed transaction's events; returns how many it queued.
    pub fn commit(&self, tx: DecodedTx) -> usize {
        let mut touched: Vec<u32> = Vec::new();
        let queued = {
            let mut s = self.lock();
            let seq = s.next_seq;
            s.next_seq += 1;
            let mut n = 0usize;
            for (ord, d) in tx.events.into_iter().enumerate() {
                let at = (tx.commit_lsn, ord as u32);
                let Some(part) = s.parts.get_mut(&d.shard) else {
                    continue; // polled, or not relayed here: the table has it
                };
                if part.streaming && part.covered.covers(d.txid, at, &d.event) {
                    continue;
                }
                part.queue.push_back(Queued {
                    event: d.event,
                    txid: d.txid,
                    at,
                    tx: seq,
                });
                if !touched.contains(&d.shard) {
                    touched.push(d.shard);
                }
                n += 1;
            }
            s.queued += n;
            s.txs.push_back(Tx {
                seq,
                end_lsn: tx.end_lsn,
                commit_us: tx.commit_us,
                pending: n,
            });
            advance(&mut s);
            n
        };
        for p in touched {
            self.ring(p);
        }
        queued
    }

    /// The stream is at `lsn` between transactions (a keepalive, a
    /// heartbeat message): with nothing in flight, the slot may be
    /// confirmed that far.
    pub fn idle_at(&self, lsn: u64) {
        let mut s = self.lock();
        if s.txs.is_empty() {
            s.confirmable = s.confirmable.max(lsn);
        }
    }

    /// How far the slot may be confirmed.
    pub fn confirmable(&self) -> u64 {
        self.lock().confirmable
    }

    /// The stream received the WAL up to `lsn`.
    pub fn set_received(&self, lsn: u64) {
        self.received.fetch_max(lsn, Ordering::Relaxed);
    }

    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Commit time (µs since 2000-01-01) of the oldest transaction the
    /// slot waits for, if any.
    pub fn oldest_unconfirmed_us(&self) -> Option<i64> {
        self.lock().txs.front().map(|t| t.commit_us)
    }

    /// Events queued and not acknowledged.
    pub fn queued(&self) -> usize {
        self.lock().queued
    }

    /// Waits until the queues have room (the stream reads no further).
    pub async fn wait_for_room(&self) {
        loop {
            let notified = self.space.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let s = self.lock();
                if s.queued < self.capacity || !s.running {
                    return;
                }
            }
            notified.await;
        }
    }

    /// Attaches `claim`'s reader to its partition's queue (made if there
    /// is none). `streaming`: the partition's stored state says it streams;
    /// if the queue does not (it was made after the stream passed some of
    /// the partition's events), the reader must catch up first.
    pub fn attach(&self, claim: &Claim, streaming: bool) -> Attached {
        let mut s = self.lock();
        let generation = s.generation;
        let part = s.parts.entry(claim.partition).or_insert_with(|| Part {
            queue: VecDeque::new(),
            streaming: false,
            covered: Covered::default(),
            claim: None,
        });
        part.claim = Some(*claim);
        if !streaming {
            part.streaming = false;
        }
        Attached {
            generation,
            streaming: part.streaming,
        }
    }

    /// The partition caught up from the table: everything `covered` covers
    /// is published. Drops the queued events it covers; from now on the
    /// queue streams. False if the reader is stale.
    pub fn start_streaming(&self, partition: u32, generation: u64, covered: Covered) -> bool {
        let mut s = self.lock();
        if s.generation != generation || !s.running {
            return false;
        }
        let Some(part) = s.parts.get_mut(&partition) else {
            return false;
        };
        let mut dropped: Vec<u64> = Vec::new();
        part.queue.retain(|q| {
            let keep = !covered.covers(q.txid, q.at, &q.event);
            if !keep {
                dropped.push(q.tx);
            }
            keep
        });
        part.streaming = true;
        part.covered = covered;
        release(&mut s, &dropped);
        true
    }

    /// Up to `limit` events after the first `offset` of the partition's
    /// queue. With `offset` 0, first drops head events `published` covers
    /// (sent again by a stream restart, already on the broker).
    pub fn take(
        &self,
        partition: u32,
        generation: u64,
        offset: usize,
        limit: usize,
        published: Option<(u64, u32)>,
    ) -> Result<Vec<Taken>, Stale> {
        let mut s = self.lock();
        if s.generation != generation || !s.running {
            return Err(Stale);
        }
        let part = s.parts.get_mut(&partition).ok_or(Stale)?;
        let mut dropped: Vec<u64> = Vec::new();
        if offset == 0 {
            if let Some(upto) = published {
                while part.queue.front().is_some_and(|q| q.at <= upto) {
                    if let Some(q) = part.queue.pop_front() {
                        dropped.push(q.tx);
                    }
                }
            }
        }
        let taken = part
            .queue
            .iter()
            .skip(offset)
            .take(limit)
            .map(|q| Taken {
                event: q.event.clone(),
                txid: q.txid,
                at: q.at,
            })
            .collect();
        release(&mut s, &dropped);
        drop(s);
        if !dropped.is_empty() {
            self.space.notify_waiters();
        }
        Ok(taken)
    }

    /// The oldest `count` events of the partition's queue are on the
    /// broker and marked. Stale readers change nothing here (their mark
    /// still holds).
    pub fn acknowledge(&self, partition: u32, generation: u64, count: usize) {
        let mut s = self.lock();
        if s.generation != generation {
            return;
        }
        let Some(part) = s.parts.get_mut(&partition) else {
            return;
        };
        let n = count.min(part.queue.len());
        let done: Vec<u64> = part.queue.drain(..n).map(|q| q.tx).collect();
        release(&mut s, &done);
        drop(s);
        self.space.notify_waiters();
    }

    /// Forgets the queues of partitions not in CDC mode any more (switched
    /// to polling): the table has their events, and the slot is no longer
    /// held back by them.
    pub fn retain_partitions(&self, cdc: &[u32]) {
        let mut s = self.lock();
        let gone: Vec<u32> = s
            .parts
            .keys()
            .copied()
            .filter(|p| !cdc.contains(p))
            .collect();
        let mut dropped: Vec<u64> = Vec::new();
        for p in gone {
            if let Some(part) = s.parts.remove(&p) {
                dropped.extend(part.queue.iter().map(|q| q.tx));
            }
        }
        let any = !dropped.is_empty();
        release(&mut s, &dropped);
        drop(s);
        if any {
            self.space.notify_waiters();
        }
    }

    /// The claims of streaming partitions with a reader: their marks may
    /// move with the slot's confirmed position.
    pub fn streaming_claims(&self) -> Vec<Claim> {
        self.lock()
            .parts
            .values()
            .filter(|p| p.streaming)
            .filter_map(|p| p.claim)
            .collect()
    }
}

/// Counts the events of transactions `txs` (sequence numbers) as done.
fn release(s: &mut State, txs: &[u64]) {
    if txs.is_empty() {
        return;
    }
    s.queued = s.queued.saturating_sub(txs.len());
    for seq in txs {
        let Some(front) = s.txs.front().map(|t| t.seq) else {
            break;
        };
        if let Some(t) = seq
            .checked_sub(front)
            .and_then(|i| s.txs.get_mut(i as usize))
        {
            t.pending = t.pending.saturating_sub(1);
        }
    }
    advance(s);
}

/// Confirms every leading transaction with nothing pending.
fn advance(s: &mut State) {
    while let Some(t) = s.txs.front() {
        if t.pending > 0 {
            break;
        }
        s.confirmable = s.confirmable.max(t.end_lsn);
        s.txs.pop_front();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::test_event;
    use crate::relay::Mode;
    use uuid::Uuid;

    fn claim(partition: u32) -> Claim {
        Claim {
            partition,
            epoch: 1,
            incarnation: Uuid::nil(),
            mode: Mode::Cdc,
        }
    }

    fn tx(commit: u64, events: &[(u32, i64)]) -> DecodedTx {
        DecodedTx {
            commit_lsn: commit,
            end_lsn: commit + 1,
            commit_us: 0,
            events: events
                .iter()
                .map(|(shard, pos)| Decoded {
                    shard: *shard,
                    txid: commit,
                    event: test_event(*pos, "a"),
                })
                .collect(),
        }
    }

    fn positions(taken: &[Taken]) -> Vec<i64> {
        taken.iter().map(|t| t.event.position).collect()
    }

    #[test]
    fn the_slot_is_confirmed_only_past_transactions_fully_acknowledged() {
        let hub = Hub::new(2, 100);
        let g = hub.restart(10, vec![(0, Covered::default()), (1, Covered::default())]);
        hub.commit(tx(100, &[(0, 1), (1, 2)]));
        hub.commit(tx(200, &[(0, 3)]));
        assert_eq!(hub.confirmable(), 10);
        let p0 = hub.take(0, g, 0, 10, None).expect("take");
        assert_eq!(positions(&p0), vec![1, 3]);
        // Partition 0 acknowledges both; transaction 100 still waits for 1.
        hub.acknowledge(0, g, 2);
        assert_eq!(hub.confirmable(), 10);
        hub.acknowledge(1, g, 1);
        assert_eq!(hub.confirmable(), 201);
        assert_eq!(hub.queued(), 0);
    }

    #[test]
    fn events_of_partitions_not_relayed_here_or_already_published_are_not_queued() {
        let hub = Hub::new(3, 100);
        let covered = Covered {
            snapshot: Some(Snapshot::parse("150:150:").expect("snapshot")),
            window: None,
            upto: Some((300, 0)),
        };
        let g = hub.restart(0, vec![(0, covered)]);
        // txid 100 is seen by the snapshot; (300, 0) is the mark; 300/1 is new.
        hub.commit(tx(100, &[(0, 1), (2, 2)]));
        hub.commit(DecodedTx {
            commit_lsn: 300,
            end_lsn: 301,
            commit_us: 0,
            events: vec![
                Decoded {
                    shard: 0,
                    txid: 160,
                    event: test_event(3, "a"),
                },
                Decoded {
                    shard: 0,
                    txid: 160,
                    event: test_event(4, "a"),
                },
            ],
        });
        assert_eq!(
            positions(&hub.take(0, g, 0, 10, None).expect("take")),
            vec![4]
        );
        hub.acknowledge(0, g, 1);
        assert_eq!(hub.confirmable(), 301);
    }

    #[test]
    fn a_catching_up_partition_keeps_everything_until_it_streams_then_drops_what_the_table_gave() {
        let hub = Hub::new(1, 100);
        let g = hub.restart(0, Vec::new());
        // Not attached yet: the table has these.
        hub.commit(tx(5, &[(0, 1)]));
        assert_eq!(hub.confirmable(), 6);
        let a = hub.attach(&claim(0), true);
        assert!(!a.streaming, "a queue made now missed events: catch up");
        hub.commit(tx(7, &[(0, 2)]));
        hub.commit(tx(9, &[(0, 3)]));
        assert_eq!(hub.confirmable(), 6);
        // The catch-up published everything snapshot 8:8: sees (txid 7).
        let covered = Covered {
            snapshot: Some(Snapshot::parse("8:8:").expect("snapshot")),
            ..Covered::default()
        };
        assert!(hub.start_streaming(0, g, covered));
        assert_eq!(hub.confirmable(), 8);
        assert_eq!(
            positions(&hub.take(0, g, 0, 10, None).expect("take")),
            vec![3]
        );
        hub.acknowledge(0, g, 1);
        assert_eq!(hub.confirmable(), 10);
        // Attached again while streaming, it streams on.
        assert!(hub.attach(&claim(0), true).streaming);
        assert!(!hub.attach(&claim(0), false).streaming);
    }

    #[test]
    fn a_restart_makes_readers_stale_and_drops_what_they_already_published() {
        let hub = Hub::new(1, 100);
        let g = hub.restart(0, vec![(0, Covered::default())]);
        hub.commit(tx(10, &[(0, 1), (0, 2)]));
        assert_eq!(hub.take(0, g, 0, 1, None).expect("take").len(), 1);
        let g2 = hub.restart(0, vec![(0, Covered::default())]);
        assert_eq!(hub.take(0, g, 0, 1, None), Err(Stale));
        hub.acknowledge(0, g, 1); // a stale acknowledgement changes nothing
        hub.commit(tx(10, &[(0, 1), (0, 2)]));
        // The reader's mark says (10, 0) is on the broker.
        let again = hub.take(0, g2, 0, 10, Some((10, 0))).expect("take");
        assert_eq!(positions(&again), vec![2]);
        assert_eq!(hub.queued(), 1);
        hub.stop();
        assert_eq!(hub.take(0, g2, 0, 1, None), Err(Stale));
    }

    #[test]
    fn keepalives_confirm_only_with_nothing_in_flight_and_switched_partitions_release_the_slot() {
        let hub = Hub::new(2, 100);
        let g = hub.restart(0, vec![(0, Covered::default()), (1, Covered::default())]);
        hub.idle_at(50);
        assert_eq!(hub.confirmable(), 50);
        hub.commit(tx(60, &[(1, 1)]));
        hub.idle_at(70);
        assert_eq!(hub.confirmable(), 50);
        // Partition 1 switched to polling: its queue goes, the slot moves.
        hub.retain_partitions(&[0]);
        assert_eq!(hub.confirmable(), 61);
        assert_eq!(hub.take(1, g, 0, 1, None), Err(Stale));
        hub.idle_at(70);
        assert_eq!(hub.confirmable(), 70);
    }

    #[test]
    fn a_polling_mark_inside_a_window_covers_events_up_to_its_position() {
        let hub = Hub::new(1, 100);
        let g = hub.restart(0, Vec::new());
        hub.attach(&claim(0), false);
        // txids 7 and 9 (positions 1..4); the table published everything
        // 6:6: sees, and of window 10:10: up to position 2.
        hub.commit(tx(7, &[(0, 1), (0, 2)]));
        hub.commit(tx(9, &[(0, 3), (0, 4)]));
        let covered = Covered {
            snapshot: Some(Snapshot::parse("6:6:").expect("snapshot")),
            window: Some((
                Snapshot::parse("10:10:").expect("snapshot"),
                (2, Uuid::from_u128(2)),
            )),
            upto: None,
        };
        assert!(hub.start_streaming(0, g, covered));
        let taken = hub.take(0, g, 0, 10, None).expect("take");
        assert_eq!(positions(&taken), vec![3, 4]);
    }

    #[tokio::test(start_paused = true)]
    async fn the_stream_waits_for_room_until_events_are_acknowledged() {
        let hub = std::sync::Arc::new(Hub::new(1, 2));
        let g = hub.restart(0, vec![(0, Covered::default())]);
        hub.commit(tx(1, &[(0, 1), (0, 2)]));
        let waiting = {
            let hub = std::sync::Arc::clone(&hub);
            tokio::spawn(async move { hub.wait_for_room().await })
        };
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        assert!(!waiting.is_finished());
        hub.acknowledge(0, g, 1);
        tokio::time::timeout(std::time::Duration::from_secs(1), waiting)
            .await
            .expect("room after an acknowledgement")
            .expect("task");
    }
}
