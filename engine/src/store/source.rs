//! The polling source: reads a partition's events in position order and
//! deletes them once the sink acknowledged them.
//!
//! There is no cursor. Every fetch starts at the lowest position still in the
//! table and skips only what is in flight, so a transaction that took a low
//! position and committed late is picked up by the next fetch (the "gap
//! trap" of cursor-based relays cannot happen). Deleting what was published
//! keeps each partition's table small; the relay vacuums it after enough
//! deletes, so steady state does not bloat.

use std::future::Future;

use sqlx::postgres::PgPool;
use sqlx::Row;

use crate::error::StoreError;
use crate::event::{JsonBytes, OutboxEvent};
use crate::relay::{Ack, Backlog, Claim, EventSource, Parked};
use crate::store::Names;

/// Backlog counts stop here, so sampling a huge backlog stays cheap.
pub const BACKLOG_COUNT_CAP: i64 = 1_000_000;

struct PartitionSql {
    ack_and_fetch: String,
    park: String,
    backlog: String,
    fetch: String,
    ack: String,
    vacuum: String,
}

/// The outbox partitions of one schema as an [`EventSource`].
pub struct PgSource {
    pool: PgPool,
    sql: Vec<PartitionSql>,
}

impl PgSource {
    pub fn new(pool: PgPool, names: &Names, partitions: u32) -> Self {
        let leases = names.table("outbox_leases");
        let dead = names.table("outbox_dead_letters");
        let columns = "position, id, aggregate_type, aggregate_id, event_type, payload, headers, \
                       topic, (extract(epoch from created_at) * 1000)::int8 as created_ms";
        let sql = (0..partitions)
            .map(|p| {
                let t = names.partition(p);
                // The fence updates the lease row (counting what the
                // partition published, for `outbox status`): a takeover
                // (which also updates it) waits for this delete, and a
                // delete that runs after a takeover sees the new epoch and
                // removes nothing. Either way a stale owner cannot act.
                let acknowledge = format!(
                    "with fence as (
                        update {leases} set published = published + cardinality($4)
                        where partition = $1 and epoch = $2 and incarnation = $3
                        returning 1
                     ), gone as (
                        delete from {t}
                        where position = any($4) and exists (select 1 from fence)
                        returning 1
                     )"
                );
                PartitionSql {
                    // `ack`, then the next batch in the same statement. The
                    // select's snapshot still sees the rows being deleted,
                    // so it leaves them out by position.
                    ack_and_fetch: format!(
                        "{acknowledge}, next as (
                            select {columns} from {t}
                            where exists (select 1 from fence)
                              and position <> all($4) and position <> all($5)
                            order by position
                            limit $6
                         )
                         select h.n, r.n, next.*
                           from (select count(*) as n from fence) h
                          cross join (select count(*) as n from gone) r
                           left join next on true"
                    ),
                    // Fenced like `ack`; the row moves in one statement, so
                    // it is either in the outbox or in the dead letters.
                    park: format!(
                        "with fence as (
                            select 1 from {leases}
                            where partition = $1 and epoch = $2 and incarnation = $3
                            for share
                         ), moved as (
                            delete from {t}
                            where position = $4 and exists (select 1 from fence)
                            returning *
                         ), parked as (
                            insert into {dead} (event_id, partition, position, aggregate_type,
                                aggregate_id, event_type, payload, headers, topic, created_at,
                                error, attempts, first_failed_at, parked_by)
                            select id, $1, position, aggregate_type, aggregate_id, event_type,
                                   payload, headers, topic, created_at, $5, $6, to_timestamp($7), $8
                              from moved
                            on conflict (event_id) do update
                               set error = excluded.error, attempts = excluded.attempts,
                                   position = excluded.position, parked_at = now(),
                                   parked_by = excluded.parked_by
                            returning 1
                         )
                         select (select count(*) from fence), (select count(*) from parked)"
                    ),
                    backlog: format!(
                        "select {p}, (select count(*) from (select 1 from {t} limit {BACKLOG_COUNT_CAP}) x),
                                (select extract(epoch from now() - created_at)::float8
                                   from {t} order by position limit 1)"
                    ),
                    fetch: format!(
                        "select {columns}
                         from {t}
                         where position <> all($1)
                         order by position
                         limit $2"
                    ),
                    ack: format!(
                        "{acknowledge}
                         select (select count(*) from fence), (select count(*) from gone)"
                    ),
                    vacuum: format!("vacuum (skip_locked) {t}"),
                }
            })
            .collect();
        Self { pool, sql }
    }

    fn sql(&self, partition: u32) -> Result<&PartitionSql, StoreError> {
        self.sql.get(partition as usize).ok_or_else(|| {
            StoreError::Schema(format!(
                "partition {partition} does not exist (the outbox has {})",
                self.sql.len()
            ))
        })
    }
}

/// Decodes the event columns of a row, starting at column `at`.
fn decode_event(row: &sqlx::postgres::PgRow, at: usize) -> Result<OutboxEvent, StoreError> {
    Ok(OutboxEvent {
        position: row.try_get(at)?,
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

impl EventSource for PgSource {
    fn fetch(
        &self,
        claim: &Claim,
        limit: usize,
        in_flight: &[i64],
    ) -> impl Future<Output = Result<Vec<OutboxEvent>, StoreError>> + Send {
        let sql = self.sql(claim.partition).map(|s| s.fetch.as_str());
        async move {
            let rows = sqlx::query(sql?)
                .bind(in_flight)
                .bind(limit as i64)
                .fetch_all(&self.pool)
                .await?;
            rows.iter().map(|row| decode_event(row, 0)).collect()
        }
    }

    fn acknowledge(
        &self,
        claim: &Claim,
        positions: &[i64],
    ) -> impl Future<Output = Result<Ack, StoreError>> + Send {
        let sql = self.sql(claim.partition).map(|s| s.ack.as_str());
        async move {
            let row = sqlx::query(sql?)
                .bind(claim.partition as i32)
                .bind(claim.epoch)
                .bind(claim.incarnation)
                .bind(positions)
                .fetch_one(&self.pool)
                .await?;
            let held: i64 = row.try_get(0)?;
            let removed: i64 = row.try_get(1)?;
            Ok(if held == 0 {
                Ack::Fenced
            } else {
                Ack::Done {
                    removed: removed as u64,
                }
            })
        }
    }

    async fn acknowledge_and_fetch(
        &self,
        claim: &Claim,
        positions: &[i64],
        limit: usize,
        in_flight: &[i64],
    ) -> Result<(Ack, Vec<OutboxEvent>), StoreError> {
        let sql = &self.sql(claim.partition)?.ack_and_fetch;
        let rows = sqlx::query(sql)
            .bind(claim.partition as i32)
            .bind(claim.epoch)
            .bind(claim.incarnation)
            .bind(positions)
            .bind(in_flight)
            .bind(limit as i64)
            .fetch_all(&self.pool)
            .await?;
        let Some(first) = rows.first() else {
            return Err(StoreError::Schema(
                "acknowledge_and_fetch returned no row".into(),
            ));
        };
        let held: i64 = first.try_get(0)?;
        let removed: i64 = first.try_get(1)?;
        if held == 0 {
            return Ok((Ack::Fenced, Vec::new()));
        }
        let mut events = Vec::with_capacity(rows.len());
        for row in &rows {
            // One row with empty event columns when nothing is waiting.
            if row.try_get::<Option<i64>, _>(2)?.is_some() {
                events.push(decode_event(row, 2)?);
            }
        }
        // A join keeps no promised order: restore position order.
        events.sort_unstable_by_key(|e| e.position);
        let ack = Ack::Done {
            removed: removed as u64,
        };
        Ok((ack, events))
    }

    async fn park(&self, claim: &Claim, parked: &Parked) -> Result<Ack, StoreError> {
        let sql = &self.sql(claim.partition)?.park;
        let first_failed = parked
            .first_failed_at
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        let row = sqlx::query(sql)
            .bind(claim.partition as i32)
            .bind(claim.epoch)
            .bind(claim.incarnation)
            .bind(parked.position)
            .bind(&parked.error)
            .bind(parked.attempts as i32)
            .bind(first_failed)
            .bind(&parked.node_id)
            .fetch_one(&self.pool)
            .await?;
        let held: i64 = row.try_get(0)?;
        let moved: i64 = row.try_get(1)?;
        Ok(if held == 0 {
            Ack::Fenced
        } else {
            Ack::Done {
                removed: moved as u64,
            }
        })
    }

    async fn backlog(&self, partitions: &[u32]) -> Result<Vec<Backlog>, StoreError> {
        if partitions.is_empty() {
            return Ok(Vec::new());
        }
        let parts: Result<Vec<&str>, StoreError> = partitions
            .iter()
            .map(|p| self.sql(*p).map(|s| s.backlog.as_str()))
            .collect();
        let sql = parts?.join(" union all ");
        let rows = sqlx::query(&sql).fetch_all(&self.pool).await?;
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

    fn maintain(&self, partition: u32) -> impl Future<Output = Result<(), StoreError>> + Send {
        let sql = self.sql(partition).map(|s| s.vacuum.as_str());
        async move {
            sqlx::raw_sql(sql?).execute(&self.pool).await?;
            Ok(())
        }
    }
}
