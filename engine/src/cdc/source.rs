//! The event source of a node that relays partitions in both modes: each
//! claim says whether its partition is polled or streamed, and gets the
//! matching reader.
//!
//! A CDC partition's reader first looks at the partition's stored state.
//! If it streams (its mark is continuous with the slot), the reader takes
//! events from the partition's queue in the [`Hub`]. If not (just switched
//! from polling, or the slot was lost), it first catches up from the table
//! with the polling reader, the queue collecting what the slot streams
//! meanwhile; once nothing the table holds is left unpublished in a fresh
//! snapshot S, it stores S as the mark in the same statement that checks,
//! drops the queued events S sees (the table gave them), and streams on.
//! Commit order holds across the hand-over: what S sees committed before
//! everything it does not.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgPool;
use sqlx::Row;

use crate::cdc::hub::{Hub, Taken};
use crate::cdc::slot::{lsn_text, PollMark};
use crate::error::StoreError;
use crate::relay::{Ack, Backlog, Claim, ClaimReader, Doorbell, EventSource, Mode, Read};
use crate::store::source::{unpublished, PgReader, PgSource};
use crate::store::Names;

struct Sql {
    state: String,
    covers: String,
    stream_from_mark: String,
    horizon: String,
    ack: String,
}

/// What a CDC reader needs besides the polling reader.
#[derive(Clone)]
pub struct CdcSide {
    hub: Arc<Hub>,
    pool: PgPool,
    sql: Arc<Sql>,
}

impl CdcSide {
    pub fn new(hub: Arc<Hub>, pool: PgPool, names: &Names) -> Self {
        let leases = names.table("outbox_leases");
        let outbox = names.table("outbox");
        let claim = "partition = $1 and epoch = $2 and incarnation = $3";
        let sql = Sql {
            state: format!(
                "select cdc_streaming, cdc_lsn::text, cdc_ord from {leases} where {claim}"
            ),
            // Whether the mark covers every row the horizon (a snapshot
            // taken after the queue was attached) sees.
            covers: format!(
                "select exists (select 1 from {leases} where {claim}),
                        not exists (select 1 from {leases} l, {outbox} o
                                     where l.partition = $1 and {pending}
                                       and pg_visible_in_snapshot(o.txid, $4::text::pg_snapshot))",
                pending = unpublished("o", "l")
            ),
            // The partition streams from its mark on.
            stream_from_mark: format!(
                "update {leases} set cdc_streaming = true, cdc_lsn = null, cdc_ord = null
                  where {claim}
                 returning mark_lo::text, mark_hi::text, mark_pos, mark_id"
            ),
            horizon: "select pg_current_snapshot()::text".to_string(),
            ack: format!(
                "update {leases} set cdc_lsn = $4::text::pg_lsn, cdc_ord = $5,
                        published = published + $6
                  where {claim} and cdc_streaming
                 returning greatest(extract(epoch from expires_at - now()), 0)::float8"
            ),
        };
        Self {
            hub,
            pool,
            sql: Arc::new(sql),
        }
    }
}

/// Polling and, where configured, CDC.
pub struct ModalSource {
    poll: Arc<PgSource>,
    cdc: Option<CdcSide>,
}

impl ModalSource {
    pub fn new(poll: Arc<PgSource>, cdc: Option<CdcSide>) -> Self {
        Self { poll, cdc }
    }
}

/// The reader of one claim, in its mode.
pub enum ModalReader {
    Poll(PgReader),
    Cdc(Box<CdcReader>),
    /// A CDC partition on a node without a CDC source.
    NoCdc(u32),
}

impl EventSource for ModalSource {
    type Reader = ModalReader;

    fn open(&self, claim: &Claim) -> ModalReader {
        match (claim.mode, &self.cdc) {
            (Mode::Poll, _) => ModalReader::Poll(self.poll.open(claim)),
            (Mode::Cdc, Some(side)) => ModalReader::Cdc(Box::new(CdcReader {
                side: side.clone(),
                claim: *claim,
                table: self.poll.open(claim),
                phase: Phase::Unknown,
                generation: 0,
                table_outstanding: 0,
                outstanding: VecDeque::new(),
                published: None,
                horizon: None,
                horizon_covered: false,
                checked_at: None,
                unmarked: 0,
                marked_at: None,
            })),
            (Mode::Cdc, None) => ModalReader::NoCdc(claim.partition),
        }
    }

    fn doorbell(&self, claim: &Claim) -> Option<Doorbell> {
        match (claim.mode, &self.cdc) {
            (Mode::Cdc, Some(side)) => side.hub.doorbell(claim.partition),
            _ => self.poll.doorbell(claim),
        }
    }

    async fn backlog(&self, partitions: &[u32]) -> Result<Vec<Backlog>, StoreError> {
        self.poll.backlog(partitions).await
    }
}

impl ClaimReader for ModalReader {
    async fn fetch(&mut self, limit: usize) -> Result<Read, StoreError> {
        match self {
            ModalReader::Poll(r) => r.fetch(limit).await,
            ModalReader::Cdc(r) => r.fetch(limit).await,
            ModalReader::NoCdc(p) => Err(no_cdc(*p)),
        }
    }

    async fn acknowledge(
        &mut self,
        count: usize,
        fetch_next: Option<usize>,
    ) -> Result<(Ack, Option<Read>), StoreError> {
        match self {
            ModalReader::Poll(r) => r.acknowledge(count, fetch_next).await,
            ModalReader::Cdc(r) => r.acknowledge(count, fetch_next).await,
            ModalReader::NoCdc(p) => Err(no_cdc(*p)),
        }
    }

    fn rewind(&mut self) {
        match self {
            ModalReader::Poll(r) => r.rewind(),
            ModalReader::Cdc(r) => r.rewind(),
            ModalReader::NoCdc(_) => {}
        }
    }

    async fn flush(&mut self) -> Result<(), StoreError> {
        match self {
            ModalReader::Cdc(r) => r.flush().await,
            _ => Ok(()),
        }
    }
}

fn no_cdc(partition: u32) -> StoreError {
    StoreError::Schema(format!(
        "partition {partition} is in CDC mode but this node runs without a CDC source \
         (its server lacks wal_level = logical, or it was started before the switch)"
    ))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The stored state was not read yet (or the hub restarted).
    Unknown,
    /// Catching up from the table.
    Table,
    /// Streaming from the queue.
    Stream,
}

/// One CDC claim's reader.
pub struct CdcReader {
    side: CdcSide,
    claim: Claim,
    table: PgReader,
    phase: Phase,
    generation: u64,
    /// Events the table reader handed out and that are not acknowledged.
    table_outstanding: usize,
    /// Queue events handed out, not acknowledged: (commit LSN, ordinal).
    outstanding: VecDeque<(u64, u32)>,
    /// The last event this claim published from the queue.
    published: Option<(u64, u32)>,
    /// Catching up: a snapshot taken after the queue was attached (every
    /// event it does not see is queued), whether the mark covers it yet,
    /// and when that was last checked.
    horizon: Option<String>,
    horizon_covered: bool,
    checked_at: Option<tokio::time::Instant>,
    /// Acknowledged queue events not yet in the stored mark, and when the
    /// mark was last stored.
    unmarked: usize,
    marked_at: Option<tokio::time::Instant>,
}

/// How often a streaming partition stores its mark, at most, and after how
/// many acknowledged events at the latest.
const MARK_EVERY: Duration = Duration::from_millis(100);
const MARK_EVENTS: usize = 20_000;

/// How often a catching-up reader checks whether its mark covers the
/// horizon (the check reads the partition's unpublished rows).
const COVER_CHECK: Duration = Duration::from_millis(250);

const NOTHING: Read = Read::Events {
    events: Vec::new(),
    lease_left: Duration::ZERO,
};

impl CdcReader {
    fn hub(&self) -> &Hub {
        &self.side.hub
    }

    /// Reads the stored state and attaches to the partition's queue;
    /// `false` if the claim is stale.
    async fn attach(&mut self) -> Result<bool, StoreError> {
        let row = sqlx::query(&self.side.sql.state)
            .bind(self.claim.partition as i32)
            .bind(self.claim.epoch)
            .bind(self.claim.incarnation)
            .fetch_optional(&self.side.pool)
            .await?;
        let Some(row) = row else { return Ok(false) };
        let streaming: bool = row.try_get(0)?;
        let lsn: Option<String> = row.try_get(1)?;
        let ord: Option<i32> = row.try_get(2)?;
        if let (Some(l), Some(o)) = (lsn, ord) {
            let at = (crate::cdc::slot::parse_lsn(&l)?, o.max(0) as u32);
            self.published = self.published.max(Some(at));
        }
        let attached = self.hub().attach(&self.claim, streaming);
        self.generation = attached.generation;
        self.phase = if attached.streaming {
            Phase::Stream
        } else {
            // Taken after the attachment: what it does not see is queued.
            let horizon: String = sqlx::query_scalar(&self.side.sql.horizon)
                .fetch_one(&self.side.pool)
                .await?;
            self.horizon = Some(horizon);
            self.horizon_covered = false;
            self.checked_at = None;
            Phase::Table
        };
        tracing::info!(
            partition = self.claim.partition,
            epoch = self.claim.epoch,
            streaming = attached.streaming,
            "CDC partition attached to the slot's stream"
        );
        Ok(true)
    }

    async fn fetch(&mut self, limit: usize) -> Result<Read, StoreError> {
        let read = self.fetch_once(limit).await?;
        if self.phase == Phase::Unknown {
            // The stream restarted and nothing is in flight: attach to the
            // new queue now rather than at the next poll.
            return self.fetch_once(limit).await;
        }
        Ok(read)
    }

    async fn fetch_once(&mut self, limit: usize) -> Result<Read, StoreError> {
        if !self.hub().is_running() {
            return Ok(NOTHING);
        }
        if self.phase == Phase::Unknown && !self.attach().await? {
            return Ok(Read::Fenced);
        }
        if self.phase == Phase::Table {
            if !self.horizon_covered {
                let read = self.table.fetch(limit).await?;
                let handed = match &read {
                    Read::Events { events, .. } => events.len(),
                    Read::Fenced => return Ok(read),
                };
                self.table_outstanding += handed;
                let due = self.checked_at.is_none_or(|t| t.elapsed() >= COVER_CHECK);
                if handed < limit || due {
                    self.checked_at = Some(tokio::time::Instant::now());
                    match self.covers_horizon().await? {
                        Some(covered) => self.horizon_covered = covered,
                        None => return Ok(Read::Fenced),
                    }
                }
                if !self.horizon_covered || handed > 0 {
                    return Ok(read);
                }
            }
            // The mark covers the horizon: no more from the table; once
            // what it handed out is acknowledged, stream from the mark.
            if self.table_outstanding > 0 {
                return Ok(NOTHING);
            }
            match self.finish_catching_up().await? {
                Some(true) => {}
                Some(false) => return Ok(NOTHING),
                None => return Ok(Read::Fenced),
            }
        }
        self.take(limit)
    }

    /// Whether the mark covers every row the horizon sees; `None` if the
    /// claim is stale.
    async fn covers_horizon(&self) -> Result<Option<bool>, StoreError> {
        let Some(horizon) = &self.horizon else {
            return Ok(Some(false));
        };
        let row = sqlx::query(&self.side.sql.covers)
            .bind(self.claim.partition as i32)
            .bind(self.claim.epoch)
            .bind(self.claim.incarnation)
            .bind(horizon)
            .fetch_one(&self.side.pool)
            .await?;
        let held: bool = row.try_get(0)?;
        Ok(held.then_some(row.try_get(1)?))
    }

    /// Stores that the partition streams from its mark on, and drops the
    /// queued events the mark covers. `Some(true)`: it streams; `Some(false)`:
    /// the stream restarted meanwhile (attach again); `None`: stale claim.
    async fn finish_catching_up(&mut self) -> Result<Option<bool>, StoreError> {
        let row = sqlx::query(&self.side.sql.stream_from_mark)
            .bind(self.claim.partition as i32)
            .bind(self.claim.epoch)
            .bind(self.claim.incarnation)
            .fetch_optional(&self.side.pool)
            .await?;
        let Some(row) = row else { return Ok(None) };
        let mark = PollMark {
            lo: row.try_get(0)?,
            hi: row.try_get(1)?,
            pos: row.try_get(2)?,
            id: row.try_get(3)?,
        };
        let covered = mark.covered()?;
        if self
            .hub()
            .start_streaming(self.claim.partition, self.generation, covered)
        {
            tracing::info!(
                partition = self.claim.partition,
                mark = %mark.lo,
                "CDC partition caught up from the table; streaming"
            );
            self.phase = Phase::Stream;
            Ok(Some(true))
        } else {
            // The stream restarted meanwhile: attach again (the queue
            // decides whether to catch up once more).
            self.phase = Phase::Unknown;
            Ok(Some(false))
        }
    }

    fn take(&mut self, limit: usize) -> Result<Read, StoreError> {
        let offset = self.outstanding.len();
        let published = self.published;
        match self.hub().take(
            self.claim.partition,
            self.generation,
            offset,
            limit,
            published,
        ) {
            Ok(taken) => {
                self.outstanding.extend(taken.iter().map(|t| t.at));
                Ok(Read::Events {
                    events: taken.into_iter().map(|Taken { event, .. }| event).collect(),
                    lease_left: Duration::ZERO,
                })
            }
            Err(_) => {
                // The stream restarted: once what is in flight has
                // reported, attach to the new queue.
                if self.outstanding.is_empty() {
                    self.phase = Phase::Unknown;
                }
                Ok(NOTHING)
            }
        }
    }

    async fn acknowledge(
        &mut self,
        count: usize,
        fetch_next: Option<usize>,
    ) -> Result<(Ack, Option<Read>), StoreError> {
        if self.phase == Phase::Table || self.table_outstanding > 0 {
            let n = count.min(self.table_outstanding);
            let (ack, next) = self.table.acknowledge(n, fetch_next).await?;
            if ack == Ack::Done {
                self.table_outstanding -= n;
                if let Some(Read::Events { events, .. }) = &next {
                    self.table_outstanding += events.len();
                }
            }
            return Ok((ack, next));
        }
        let count = count.min(self.outstanding.len());
        if count == 0 {
            return Ok((Ack::Done, None));
        }
        let last = self.outstanding[count - 1];
        self.unmarked += count;
        // The mark only saves re-sends after a stream restart (the slot's
        // confirmed position covers the rest), so it is stored at most every
        // MARK_EVERY: one fenced update per partition and interval instead
        // of one per batch (that update was the largest database cost of
        // CDC: 34 µs per event at 5,000 events/s, bench-results/cdc).
        let due = self.marked_at.is_none_or(|t| t.elapsed() >= MARK_EVERY)
            || self.unmarked >= MARK_EVENTS;
        if due && !self.store_mark(last).await? {
            return Ok((Ack::Fenced, None));
        }
        self.outstanding.drain(..count);
        self.published = self.published.max(Some(last));
        self.hub()
            .acknowledge(self.claim.partition, self.generation, count);
        let next = match fetch_next {
            Some(limit) if self.phase == Phase::Stream => self.take(limit).ok(),
            _ => None,
        };
        Ok((Ack::Done, next))
    }

    fn rewind(&mut self) {
        self.table.rewind();
        self.table_outstanding = 0;
        self.outstanding.clear();
    }

    /// Stores `last` as the mark, with the count of acknowledged events
    /// not stored yet; false if the claim is stale.
    async fn store_mark(&mut self, last: (u64, u32)) -> Result<bool, StoreError> {
        let row = sqlx::query(&self.side.sql.ack)
            .bind(self.claim.partition as i32)
            .bind(self.claim.epoch)
            .bind(self.claim.incarnation)
            .bind(lsn_text(last.0))
            .bind(last.1 as i32)
            .bind(self.unmarked as i64)
            .fetch_optional(&self.side.pool)
            .await?;
        if row.is_some() {
            self.marked_at = Some(tokio::time::Instant::now());
            self.unmarked = 0;
        }
        Ok(row.is_some())
    }

    /// Stores the mark of acknowledged events not stored yet.
    async fn flush(&mut self) -> Result<(), StoreError> {
        if let Some(last) = self.published.filter(|_| self.unmarked > 0) {
            self.store_mark(last).await?;
        }
        Ok(())
    }
}
