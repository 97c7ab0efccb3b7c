//! The polling source: reads a shard's events by snapshot difference and
//! keeps its progress as a mark, never deleting a row.
//!
//! Each row carries the id of the transaction that wrote it (`txid`). A
//! reader moves through *windows*: the rows visible in a snapshot `hi` but
//! not in the previous one `lo` (PgQ's batch design). It scans only the
//! transaction ids between the two snapshots' `xmax` plus those `lo` saw in
//! progress, through the `(shard, txid)` index, so a transaction held open
//! for minutes neither stalls the window nor makes it rescan the table; and
//! a transaction that took a low position and committed late lands in the
//! window after its commit (no gap trap). Inside a window, rows go in
//! position order, which for writers serialized per aggregate is their
//! commit order. A window larger than a batch is read through its sorted
//! keys, one chunk per fetch.
//!
//! Progress is the shard's mark in its lease row: everything visible in
//! `mark_lo`, plus, of the window up to `mark_hi`, everything up to
//! (`mark_pos`, `mark_id`). Writing it is one small update per batch, fenced
//! by the claim like every fetch. Published rows are removed in bulk when
//! their ring segment is truncated ([`crate::store::housekeeping`]).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use futures_util::TryStreamExt;
use sqlx::postgres::{PgPool, PgRow};
use sqlx::Row;
use uuid::Uuid;

use crate::error::StoreError;
use crate::event::{JsonBytes, OutboxEvent};
use crate::relay::{Ack, Backlog, Claim, ClaimReader, EventSource, Read};
use crate::store::Names;

/// Backlog counts stop here, so sampling a huge backlog stays cheap.
pub const BACKLOG_COUNT_CAP: i64 = 1_000_000;
/// The backlog a node samples for its gauges, counted up to this many
/// events per partition: the count reads every row it counts.
pub const SAMPLE_COUNT_CAP: i64 = 100_000;

/// The event columns, in the order [`decode_event`] reads them.
const COLUMNS: &str = "o.position, o.id, o.aggregate_type, o.aggregate_id, o.event_type, o.payload, \
                       o.headers, o.topic, (extract(epoch from o.created_at) * 1000)::int8 as created_ms";

/// The smallest `(position, id)`: before every row.
const START: (i64, Uuid) = (i64::MIN, Uuid::nil());

/// Of the rows of transaction `txid` in lease row `l`'s shard, those that
/// the window up to `mark_hi` has published: up to (`mark_pos`, `mark_id`).
fn marked_in_window(o: &str, l: &str) -> String {
    format!(
        "({l}.mark_hi is not null
          and pg_visible_in_snapshot({o}.txid, {l}.mark_hi)
          and ({o}.position, {o}.id) <= ({l}.mark_pos, {l}.mark_id))"
    )
}

/// The predicate "row `o` is not published yet by the mark in lease row
/// `l`". Exact: a row is pending only if its transaction was not visible in
/// `mark_lo`, so it began at or after that snapshot's `xmax` or was in
/// progress then (its `xip`); a transaction held open for minutes leaves
/// the rows committed meanwhile out of the range. To scan with the index,
/// prefer [`pending_rows`] (PostgreSQL does not use the index for the `or`).
pub fn unpublished(o: &str, l: &str) -> String {
    format!(
        "{o}.shard = {l}.partition
         and ({o}.txid >= pg_snapshot_xmax({l}.mark_lo)
              or {o}.txid = any(array(select pg_snapshot_xip({l}.mark_lo))))
         and not (pg_visible_in_snapshot({o}.txid, {l}.mark_lo) or {marked})",
        marked = marked_in_window(o, l)
    )
}

/// The rows of `table` (the outbox or a segment of it) that the mark in
/// lease row `l` has not published, as a parenthesized subquery of
/// `columns` (of `o`) to use in a `from`. Two index ranges of the shard,
/// like [`unpublished`]: the transactions that began after `mark_lo`, and
/// one lookup per transaction it saw in progress (a lateral join, so the
/// planner cannot scan the whole shard for an in-progress list of unknown
/// size). The first range is ordered by the index, so a `limit 1` over it
/// is an index scan, never a scan of the whole table.
pub fn pending_rows(table: &str, l: &str, columns: &str) -> String {
    let marked = marked_in_window("o", l);
    format!(
        "((select {columns} from {table} o
            where o.shard = {l}.partition and o.txid >= pg_snapshot_xmax({l}.mark_lo)
              and not {marked}
            order by o.shard, o.txid)
         union all
         (select {columns} from pg_snapshot_xip({l}.mark_lo) x(t)
           cross join lateral (
              select * from {table} o where o.shard = {l}.partition and o.txid = x.t offset 0
           ) o
          where not {marked}))"
    )
}

struct Sql {
    mark: String,
    fetch: String,
    /// `fetch` that first acknowledges, in the same statement.
    fetch_ack: String,
    keys: String,
    chunk: String,
    /// `chunk` that first acknowledges, in the same statement.
    chunk_ack: String,
    ack: String,
    backlog: String,
}

struct Shared {
    pool: PgPool,
    sql: Sql,
    shards: u32,
    names: Names,
    /// One doorbell per shard, rung by [`PgSource::ring_doorbells`].
    bells: Vec<tokio::sync::watch::Sender<u64>>,
}

/// After the sequence moved, shards are checked for newly committed rows
/// this long (the inserting transactions commit meanwhile).
const DOORBELL_LINGER: Duration = Duration::from_millis(500);
/// Nothing inserted for this long: the doorbell checks every
/// `QUIET_FACTOR` periods.
const QUIET_AFTER: Duration = Duration::from_secs(2);
const QUIET_FACTOR: u32 = 4;

/// The outbox of one schema as an [`EventSource`].
pub struct PgSource {
    shared: Arc<Shared>,
}

impl PgSource {
    pub fn new(pool: PgPool, names: &Names, shards: u32) -> Self {
        let leases = names.table("outbox_leases");
        let outbox = names.table("outbox");
        // The claim's lease row, fenced by epoch and incarnation: a stale
        // claim reads nothing. With `ack_at`, the statement also moves the
        // mark (parameters from `$ack_at`: lo, hi, position, id, count), so
        // an acknowledgement and the next fetch are one round trip, and one
        // statement: it fails or succeeds as a whole.
        let lease_cte = |ack_at: Option<u32>| match ack_at {
            None => format!(
                "lease as (
                    select greatest(extract(epoch from expires_at - now()), 0)::float8 as left_s
                      from {leases}
                     where partition = $1 and epoch = $2 and incarnation = $3
                 )"
            ),
            Some(n) => format!(
                "lease as (
                    update {leases}
                       set mark_lo = ${lo}::text::pg_snapshot, mark_hi = ${hi}::text::pg_snapshot,
                           mark_pos = ${pos}, mark_id = ${id}, published = published + ${count}
                     where partition = $1 and epoch = $2 and incarnation = $3
                    returning greatest(extract(epoch from expires_at - now()), 0)::float8 as left_s
                 )",
                lo = n,
                hi = n + 1,
                pos = n + 2,
                id = n + 3,
                count = n + 4
            ),
        };
        // The rows of shard $1 that may be in the window (lo, hi]: the
        // transactions lo saw in progress, and those that began after it.
        // The in-progress list comes as a bound array (XIP), parsed from
        // `lo` by the reader: its branch is skipped outright when empty and
        // is an index lookup otherwise (a subquery over pg_snapshot_xip
        // made the planner scan the whole shard on every fetch). The txid
        // bounds are expressions of the parameters, not columns of `w`:
        // as join conditions, the generic plan of a segment that was empty
        // when it was planned used `(shard, (position, id) > after)` as its
        // index condition instead, and read the whole shard of that segment
        // once it filled. For the same reason neither branch takes in the
        // `(position, id) > after` of the caller (`offset 0`): the index
        // has those columns, and the generic plan of an empty segment
        // preferred them to the txid list.
        let candidates = |lo: &str, hi: &str, xip: &str| {
            format!(
                "cand as (
                (select o.* from {outbox} o
                  where o.shard = $1
                    and o.txid >= pg_snapshot_xmax({lo}::text::pg_snapshot)
                    and o.txid < pg_snapshot_xmax({hi})
                 offset 0)
                union all
                (select o.* from {outbox} o
                  where cardinality({xip}::text[]) > 0
                    and o.shard = $1 and o.txid = any({xip}::text[]::xid8[])
                 offset 0)
             )"
            )
        };
        let in_window =
            "pg_visible_in_snapshot(o.txid, w.hi) and not pg_visible_in_snapshot(o.txid, w.lo)";
        let fetch = |lease: String| {
            format!(
                "with {lease},
                 w as (select $4::text::pg_snapshot as lo,
                              coalesce($5::text::pg_snapshot, pg_current_snapshot()) as hi),
                 {cand},
                 next as (
                    select {COLUMNS} from cand o, w
                     where exists (select 1 from lease) and {in_window}
                       and (o.position, o.id) > ($6, $7)
                     order by o.position, o.id
                     limit $8
                 )
                 select (select left_s from lease), (select hi::text from w), next.*
                   from (select 1) one left join next on true",
                cand = candidates(
                    "$4",
                    "coalesce($5::text::pg_snapshot, pg_current_snapshot())",
                    "$9"
                )
            )
        };
        // $4 the chunk's txids, $5/$6 its first key, $7/$8 its last.
        // Every row of those transactions between the two keys is a
        // row of the window and of the chunk (a transaction is all in
        // a window or not at all): one index range per transaction
        // reads exactly the chunk, however large the transaction. One
        // lookup per transaction (a lateral join behind `offset 0`): with
        // `txid = any(..)`, the generic plan of a segment empty when it was
        // planned kept only `(shard, (position, id) between ..)` as its
        // index condition, a scan of the shard's whole segment.
        let chunk = |lease: String| {
            format!(
                "with {lease},
                 next as (
                    select {COLUMNS} from unnest($4::int8[]::text[]::xid8[]) t(txid)
                     cross join lateral (
                        select o.* from {outbox} o
                         where o.shard = $1 and o.txid = t.txid
                           and (o.position, o.id) >= ($5, $6) and (o.position, o.id) <= ($7, $8)
                        offset 0
                     ) o
                     where exists (select 1 from lease)
                 )
                 select (select left_s from lease), next.*
                   from (select 1) one left join next on true"
            )
        };
        let sql = Sql {
            mark: format!(
                "select mark_lo::text, mark_hi::text, mark_pos, mark_id from {leases}
                  where partition = $1 and epoch = $2 and incarnation = $3"
            ),
            // $4 lo, $5 hi (null: now), $6/$7 after, $8 limit, $9 lo's xip.
            fetch: fetch(lease_cte(None)),
            fetch_ack: fetch(lease_cte(Some(10))),
            // $2 lo, $3 hi, $4/$5 after, $6 lo's xip.
            keys: format!(
                "with w as (select $2::text::pg_snapshot as lo, $3::text::pg_snapshot as hi),
                 {cand}
                 select o.position, o.id, o.txid::text::int8 from cand o, w
                  where {in_window} and (o.position, o.id) > ($4, $5)
                  order by o.position, o.id",
                cand = candidates("$2", "$3::text::pg_snapshot", "$6")
            ),
            // $4 the chunk's txids, $5/$6 its first key, $7/$8 its last.
            chunk: chunk(lease_cte(None)),
            chunk_ack: chunk(lease_cte(Some(9))),
            ack: format!(
                "update {leases}
                    set mark_lo = $4::text::pg_snapshot, mark_hi = $5::text::pg_snapshot,
                        mark_pos = $6, mark_id = $7, published = published + $8
                  where partition = $1 and epoch = $2 and incarnation = $3
                 returning greatest(extract(epoch from expires_at - now()), 0)::float8"
            ),
            backlog: format!(
                "select l.partition, count(b.*), extract(epoch from now() - min(b.created_at))::float8
                   from {leases} l
                   left join lateral (
                      select p.created_at from {pending} p limit {SAMPLE_COUNT_CAP}
                   ) b on true
                  where l.partition = any($1)
                  group by l.partition",
                pending = pending_rows(&outbox, "l", "o.created_at")
            ),
        };
        let bells = (0..shards)
            .map(|_| tokio::sync::watch::channel(0).0)
            .collect();
        Self {
            shared: Arc::new(Shared {
                pool,
                sql,
                shards,
                names: names.clone(),
                bells,
            }),
        }
    }

    /// Rings the doorbell of every shard that has newly committed rows,
    /// checking every `period` until `stop`. While nothing is inserted this
    /// costs one read of the position sequence per period; after an insert,
    /// for [`DOORBELL_LINGER`], one index probe per shard and segment in use.
    /// A row committed later than that after its insert, or by a
    /// transaction older than rows already seen, is found by the workers'
    /// idle poll instead.
    pub async fn ring_doorbells(
        &self,
        period: Duration,
        stop: tokio_util::sync::CancellationToken,
    ) {
        let shared = &self.shared;
        let seq = shared.names.table("outbox_position_seq");
        let shift = match crate::store::housekeeping::ring_shift(&shared.pool, &shared.names).await
        {
            Ok(s) => s,
            Err(error) => {
                tracing::warn!(%error, "doorbell off: workers poll");
                return;
            }
        };
        let mut last_seq: Option<i64> = None;
        let mut active_until = tokio::time::Instant::now();
        let mut last_change = tokio::time::Instant::now();
        let mut seen: Vec<u64> = vec![0; shared.bells.len()];
        let mut primed = false;
        loop {
            // Quiet for a while: look less often (the first event after a
            // quiet spell waits up to `QUIET_FACTOR` periods longer).
            let quiet = last_change.elapsed() > QUIET_AFTER;
            let wait = if quiet { period * QUIET_FACTOR } else { period };
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            let value: i64 = match sqlx::query_scalar(&format!("select last_value from {seq}"))
                .fetch_one(&shared.pool)
                .await
            {
                Ok(v) => v,
                Err(error) => {
                    tracing::debug!(%error, "doorbell check failed");
                    continue;
                }
            };
            let now = tokio::time::Instant::now();
            if last_seq != Some(value) {
                last_seq = Some(value);
                active_until = now + DOORBELL_LINGER;
                last_change = now;
            }
            if primed && now > active_until {
                continue;
            }
            let current = crate::store::schema::segment_of_with(value, shift);
            let previous = (current + crate::store::schema::RING_SEGMENTS - 1)
                % crate::store::schema::RING_SEGMENTS;
            let leases = shared.names.table("outbox_leases");
            let (a, b) = (
                shared.names.segment(current),
                shared.names.segment(previous),
            );
            let sql = format!(
                "select l.partition,
                        greatest((select max(o.txid) from {a} o where o.shard = l.partition),
                                 (select max(o.txid) from {b} o where o.shard = l.partition))::text
                   from {leases} l"
            );
            let rows: Vec<(i32, Option<String>)> =
                match sqlx::query_as(&sql).fetch_all(&shared.pool).await {
                    Ok(rows) => rows,
                    Err(error) => {
                        tracing::debug!(%error, "doorbell check failed");
                        continue;
                    }
                };
            for (shard, max) in rows {
                let Some(max) = max.and_then(|m| m.parse::<u64>().ok()) else {
                    continue;
                };
                let Some(slot) = seen.get_mut(shard as usize) else {
                    continue;
                };
                if max > *slot {
                    *slot = max;
                    if primed {
                        shared.bells[shard as usize].send_modify(|n| *n += 1);
                    }
                }
            }
            primed = true;
        }
    }
}

/// The transaction ids a snapshot (`xmin:xmax:xip,...`) saw in progress.
fn in_progress(snapshot: &str) -> Vec<&str> {
    snapshot
        .rsplit(':')
        .next()
        .filter(|xip| !xip.is_empty())
        .map(|xip| xip.split(',').collect())
        .unwrap_or_default()
}

/// Decodes the event columns of a row, starting at column `at` (its
/// `position`, decoded by the caller).
fn decode_event(row: &PgRow, at: usize, position: i64) -> Result<OutboxEvent, StoreError> {
    Ok(OutboxEvent {
        position,
        id: row.try_get(at + 1)?,
        aggregate_type: row.try_get(at + 2)?,
        aggregate_id: row.try_get(at + 3)?,
        event_type: row.try_get(at + 4)?,
        payload: row.try_get::<JsonBytes, _>(at + 5)?.0,
        headers: row.try_get::<Option<JsonBytes>, _>(at + 6)?.map(|h| h.0),
        topic: row.try_get(at + 7)?,
        created_at_ms: row.try_get(at + 8)?,
    })
}

/// The events of rows whose event columns start at `at` (one row with empty
/// event columns when nothing was read), in `(position, id)` order.
fn decode_events(rows: &[PgRow], at: usize) -> Result<Vec<OutboxEvent>, StoreError> {
    let mut events = Vec::with_capacity(rows.len());
    for row in rows {
        if let Some(position) = row.try_get::<Option<i64>, _>(at)? {
            events.push(decode_event(row, at, position)?);
        }
    }
    events.sort_unstable_by_key(|e| (e.position, e.id));
    Ok(events)
}

impl EventSource for PgSource {
    type Reader = PgReader;

    fn doorbell(&self, claim: &Claim) -> Option<crate::relay::Doorbell> {
        self.shared
            .bells
            .get(claim.partition as usize)
            .map(|b| b.subscribe())
    }

    fn open(&self, claim: &Claim) -> PgReader {
        PgReader {
            shared: Arc::clone(&self.shared),
            claim: *claim,
            acked: None,
            next_lo: Arc::from("1:1:"),
            window: None,
            outstanding: VecDeque::new(),
            acked_now: false,
            caught_up: false,
        }
    }

    async fn backlog(&self, partitions: &[u32]) -> Result<Vec<Backlog>, StoreError> {
        if partitions.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<i32> = partitions
            .iter()
            .filter(|p| **p < self.shared.shards)
            .map(|p| *p as i32)
            .collect();
        let rows = sqlx::query(&self.shared.sql.backlog)
            .bind(&ids)
            .fetch_all(&self.shared.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(Backlog {
                    partition: r.try_get::<i32, _>(0)? as u32,
                    pending: r.try_get::<i64, _>(1)?.max(0) as u64,
                    oldest_age_secs: r.try_get(2)?,
                })
            })
            .collect()
    }
}

/// The snapshots bounding a window: rows visible in `hi` but not in `lo`.
#[derive(Debug, PartialEq, Eq)]
struct Window {
    lo: Arc<str>,
    hi: Arc<str>,
}

/// The shard's progress as stored in its lease row.
#[derive(Debug, Clone)]
struct Mark {
    lo: Arc<str>,
    within: Option<(Arc<Window>, (i64, Uuid))>,
}

/// The window being read.
#[derive(Debug)]
struct Open {
    window: Arc<Window>,
    /// The last `(position, id)` handed out from it.
    after: (i64, Uuid),
    /// A fetch filled a whole batch: the rest is read by its keys.
    big: bool,
    /// The window's remaining keys (position, id, txid), once read.
    keys: Option<VecDeque<(i64, Uuid, i64)>>,
}

/// One claim's reader of a shard.
pub struct PgReader {
    shared: Arc<Shared>,
    claim: Claim,
    /// The stored mark; loaded by the first fetch.
    acked: Option<Mark>,
    /// Where the next window starts, once the open one is read.
    next_lo: Arc<str>,
    /// (Boxed: readers are kept in an enum beside larger ones.)
    window: Option<Box<Open>>,
    /// Handed out, not acknowledged, oldest first, with their window.
    outstanding: VecDeque<(Arc<Window>, (i64, Uuid))>,
    /// Set when a read applied the acknowledgement it carried.
    acked_now: bool,
    /// The last read was a whole window of fewer rows than asked for.
    caught_up: bool,
}

impl PgReader {
    fn partition(&self) -> i32 {
        self.claim.partition as i32
    }

    /// Starts reading again right after the stored mark.
    fn restart_at_mark(&mut self) {
        let Some(mark) = &self.acked else { return };
        match &mark.within {
            Some((window, after)) => {
                self.next_lo = Arc::clone(&window.hi);
                self.window = Some(Box::new(Open {
                    window: Arc::clone(window),
                    after: *after,
                    big: false,
                    keys: None,
                }));
            }
            None => {
                self.next_lo = Arc::clone(&mark.lo);
                self.window = None;
            }
        }
    }

    /// Loads the stored mark; `false` if the claim is stale.
    async fn load_mark(&mut self) -> Result<bool, StoreError> {
        let row = sqlx::query(&self.shared.sql.mark)
            .bind(self.partition())
            .bind(self.claim.epoch)
            .bind(self.claim.incarnation)
            .fetch_optional(&self.shared.pool)
            .await?;
        let Some(row) = row else { return Ok(false) };
        let lo: String = row.try_get(0)?;
        let hi: Option<String> = row.try_get(1)?;
        let pos: Option<i64> = row.try_get(2)?;
        let id: Option<Uuid> = row.try_get(3)?;
        let lo: Arc<str> = Arc::from(lo);
        let within = match (hi, pos, id) {
            (Some(hi), Some(pos), Some(id)) => Some((
                Arc::new(Window {
                    lo: Arc::clone(&lo),
                    hi: Arc::from(hi),
                }),
                (pos, id),
            )),
            _ => None,
        };
        self.acked = Some(Mark { lo, within });
        self.restart_at_mark();
        Ok(true)
    }

    fn hand_out(&mut self, window: &Arc<Window>, events: &[OutboxEvent]) {
        self.outstanding.extend(
            events
                .iter()
                .map(|e| (Arc::clone(window), (e.position, e.id))),
        );
    }

    /// Applies an acknowledgement its statement just committed.
    fn applied(&mut self, ack: Option<&PendingAck>) {
        let Some(ack) = ack else { return };
        self.outstanding.drain(..ack.count);
        self.acked = Some(ack.mark());
        self.acked_now = true;
    }

    /// A fetch straight from the window (a new one if none is open); with
    /// `ack`, in the statement that acknowledges.
    ///
    /// It asks for one row more than `limit`: a window of exactly `limit`
    /// rows is then known to be read, and the next fetch opens the window
    /// after it instead of reading an empty rest.
    async fn fetch_direct(
        &mut self,
        limit: usize,
        ack: Option<&PendingAck>,
    ) -> Result<Read, StoreError> {
        let (lo, hi, after) = match &self.window {
            Some(open) => (
                Arc::clone(&open.window.lo),
                Some(Arc::clone(&open.window.hi)),
                open.after,
            ),
            None => (Arc::clone(&self.next_lo), None, START),
        };
        let shared = Arc::clone(&self.shared);
        let sql = match ack {
            Some(_) => &shared.sql.fetch_ack,
            None => &shared.sql.fetch,
        };
        let query = sqlx::query(sql)
            .bind(self.partition())
            .bind(self.claim.epoch)
            .bind(self.claim.incarnation)
            .bind(&*lo)
            .bind(hi.as_deref())
            .bind(after.0)
            .bind(after.1)
            .bind(limit as i64 + 1)
            .bind(in_progress(&lo));
        let rows = bind_ack(query, ack).fetch_all(&shared.pool).await?;
        let Some(first) = rows.first() else {
            return Err(StoreError::Schema("fetch returned no row".into()));
        };
        let Some(left) = first.try_get::<Option<f64>, _>(0)? else {
            return Ok(Read::Fenced);
        };
        self.applied(ack);
        let hi: String = first.try_get(1)?;
        let mut events = decode_events(&rows, 2)?;
        let more = events.len() > limit;
        self.caught_up = events.len() < limit;
        events.truncate(limit);
        let window = match self.window.take() {
            Some(open) => open.window,
            None => Arc::new(Window {
                lo,
                hi: Arc::from(hi),
            }),
        };
        self.hand_out(&window, &events);
        if more {
            let last = events.last().map_or(after, |e| (e.position, e.id));
            self.window = Some(Box::new(Open {
                window: Arc::clone(&window),
                after: last,
                big: true,
                keys: None,
            }));
        } else {
            // The window is read: the next fetch opens the one after it.
            self.next_lo = Arc::clone(&window.hi);
        }
        Ok(Read::Events {
            events,
            lease_left: Duration::from_secs_f64(left.max(0.0)),
        })
    }

    /// A chunk of a big window, by its keys (read once, sorted); with
    /// `ack`, in the statement that acknowledges.
    async fn fetch_keys(
        &mut self,
        limit: usize,
        ack: Option<&PendingAck>,
    ) -> Result<Read, StoreError> {
        let shared = Arc::clone(&self.shared);
        let Some(open) = self.window.as_mut() else {
            return Err(StoreError::Schema("no window to read by keys".into()));
        };
        if open.keys.is_none() {
            // Decoded as they arrive (a 5M backlog's window holds 312K keys
            // a shard: as rows, hundreds of MB across the shards at once).
            let mut rows = sqlx::query_as::<_, (i64, Uuid, i64)>(&shared.sql.keys)
                .bind(self.claim.partition as i32)
                .bind(&*open.window.lo)
                .bind(&*open.window.hi)
                .bind(open.after.0)
                .bind(open.after.1)
                .bind(in_progress(&open.window.lo))
                .fetch(&shared.pool);
            let mut keys = VecDeque::new();
            while let Some(key) = rows.try_next().await? {
                keys.push_back(key);
            }
            open.keys = Some(keys);
        }
        // Taken off the window only once their rows were read.
        let keys: Vec<(i64, Uuid, i64)> = open
            .keys
            .as_ref()
            .map(|k| k.iter().take(limit).copied().collect())
            .unwrap_or_default();
        let window = Arc::clone(&open.window);
        let (Some(first), Some(last)) = (keys.first(), keys.last()) else {
            // Nothing after the rows handed out: the window is read.
            self.window = None;
            self.next_lo = Arc::clone(&window.hi);
            return self.fetch_direct(limit, ack).await;
        };
        let mut txids: Vec<i64> = keys.iter().map(|k| k.2).collect();
        txids.sort_unstable();
        txids.dedup();
        let sql = match ack {
            Some(_) => &shared.sql.chunk_ack,
            None => &shared.sql.chunk,
        };
        let query = sqlx::query(sql)
            .bind(self.claim.partition as i32)
            .bind(self.claim.epoch)
            .bind(self.claim.incarnation)
            .bind(&txids)
            .bind(first.0)
            .bind(first.1)
            .bind(last.0)
            .bind(last.1);
        let rows = bind_ack(query, ack).fetch_all(&shared.pool).await?;
        let Some(row) = rows.first() else {
            return Err(StoreError::Schema("fetch returned no row".into()));
        };
        let Some(left) = row.try_get::<Option<f64>, _>(0)? else {
            return Ok(Read::Fenced);
        };
        self.applied(ack);
        self.caught_up = false;
        let events = decode_events(&rows, 1)?;
        if events.len() != keys.len() {
            // Rows of a window do not go away before they are published.
            return Err(StoreError::Schema(format!(
                "shard {}: {} of {} keyed rows were found",
                self.claim.partition,
                events.len(),
                keys.len()
            )));
        }
        self.hand_out(&window, &events);
        let mut drained = true;
        if let Some(open) = self.window.as_mut() {
            if let Some(last) = events.last() {
                open.after = (last.position, last.id);
            }
            if let Some(k) = open.keys.as_mut() {
                k.drain(..keys.len());
                drained = k.is_empty();
            }
        }
        if drained {
            self.window = None;
            self.next_lo = Arc::clone(&window.hi);
        }
        Ok(Read::Events {
            events,
            lease_left: Duration::from_secs_f64(left.max(0.0)),
        })
    }

    /// The next read, with `ack` in the same statement.
    async fn read(&mut self, limit: usize, ack: Option<&PendingAck>) -> Result<Read, StoreError> {
        match &self.window {
            Some(open) if open.big => self.fetch_keys(limit, ack).await,
            _ => self.fetch_direct(limit, ack).await,
        }
    }
}

/// An acknowledgement carried by the next read: the oldest `count`
/// outstanding events, the last of them at `after` in `window`; `whole`
/// when that is the end of a window read to its end.
struct PendingAck {
    window: Arc<Window>,
    after: (i64, Uuid),
    count: usize,
    whole: bool,
}

impl PendingAck {
    /// The mark it stores.
    fn mark(&self) -> Mark {
        if self.whole {
            Mark {
                lo: Arc::clone(&self.window.hi),
                within: None,
            }
        } else {
            Mark {
                lo: Arc::clone(&self.window.lo),
                within: Some((Arc::clone(&self.window), self.after)),
            }
        }
    }
}

/// Binds the parameters of `ack` after a read's own (see `lease_cte`).
fn bind_ack<'q>(
    query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ack: Option<&'q PendingAck>,
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    match ack {
        Some(ack) if ack.whole => query
            .bind(&*ack.window.hi)
            .bind(None::<&str>)
            .bind(None::<i64>)
            .bind(None::<Uuid>)
            .bind(ack.count as i64),
        Some(ack) => query
            .bind(&*ack.window.lo)
            .bind(Some(&*ack.window.hi))
            .bind(Some(ack.after.0))
            .bind(Some(ack.after.1))
            .bind(ack.count as i64),
        None => query,
    }
}

impl ClaimReader for PgReader {
    async fn fetch(&mut self, limit: usize) -> Result<Read, StoreError> {
        if self.acked.is_none() && !self.load_mark().await? {
            return Ok(Read::Fenced);
        }
        self.read(limit, None).await
    }

    async fn acknowledge(
        &mut self,
        count: usize,
        fetch_next: Option<usize>,
    ) -> Result<(Ack, Option<Read>), StoreError> {
        let count = count.min(self.outstanding.len());
        if count == 0 {
            return Ok((Ack::Done, None));
        }
        let (window, after) = self.outstanding[count - 1].clone();
        // The last row of a window that is read to its end: the mark moves
        // past the whole window, so pending rows are looked for after its
        // `hi`, not from its `lo` (after a big window, every check of the
        // pending rows would read all of it again until the next window).
        let reading = self
            .window
            .as_ref()
            .is_some_and(|open| Arc::ptr_eq(&open.window, &window));
        let more = self
            .outstanding
            .get(count)
            .is_some_and(|(next, _)| Arc::ptr_eq(next, &window));
        let pending = PendingAck {
            whole: !reading && !more,
            window,
            after,
            count,
        };
        // One statement acknowledges and reads, but only when the read is
        // the next window of a reader that is caught up: the statement
        // holds the lease row's lock until it ends, and the node's lease
        // renewal queues behind it. Carrying an acknowledgement on the
        // reads of a big window (chunks, or the first read of a backlog)
        // delayed renewals past the lease's deadline under load (drain-5m
        // and scale-out: all workers revoked, their in-flight batches sent
        // twice).
        let carry = self.caught_up && self.window.is_none();
        if let (Some(limit), Some(_), true) = (fetch_next, &self.acked, carry) {
            // If the statement failed, nothing was acknowledged; once it
            // committed, an error reading its rows must not make the caller
            // acknowledge again.
            self.acked_now = false;
            let read = self.read(limit, Some(&pending)).await;
            return match (std::mem::take(&mut self.acked_now), read) {
                (true, Ok(read)) => Ok((Ack::Done, Some(read))),
                (true, Err(error)) => {
                    tracing::debug!(partition = self.claim.partition, %error, "fetch after an acknowledgement failed");
                    Ok((Ack::Done, None))
                }
                (false, Ok(Read::Fenced)) => Ok((Ack::Fenced, None)),
                (false, Err(error)) => Err(error),
                (false, Ok(Read::Events { .. })) => Err(StoreError::Schema(
                    "a read that should have acknowledged did not".into(),
                )),
            };
        }
        let query = sqlx::query(&self.shared.sql.ack)
            .bind(self.partition())
            .bind(self.claim.epoch)
            .bind(self.claim.incarnation);
        let row = bind_ack(query, Some(&pending))
            .fetch_optional(&self.shared.pool)
            .await?;
        if row.is_none() {
            return Ok((Ack::Fenced, None));
        }
        self.applied(Some(&pending));
        self.acked_now = false;
        // The acknowledgement is committed: a failed fetch after it must
        // not make the caller acknowledge again.
        let next = match fetch_next {
            Some(limit) => match self.read(limit, None).await {
                Ok(read) => Some(read),
                Err(error) => {
                    tracing::debug!(partition = self.claim.partition, %error, "fetch after an acknowledgement failed");
                    None
                }
            },
            None => None,
        };
        Ok((Ack::Done, next))
    }

    fn rewind(&mut self) {
        self.outstanding.clear();
        self.restart_at_mark();
    }
}

#[cfg(test)]
mod tests {
    use super::in_progress;

    #[test]
    fn in_progress_reads_the_xip_list_of_a_snapshot() {
        assert!(in_progress("10:10:").is_empty());
        assert_eq!(in_progress("10:20:12"), vec!["12"]);
        assert_eq!(in_progress("10:20:12,15,19"), vec!["12", "15", "19"]);
    }
}
