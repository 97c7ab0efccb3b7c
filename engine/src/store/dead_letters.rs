//! The dead letters: events the broker refused for good, parked by the
//! relay (`poison_policy = park`), listed, replayed or dropped by operators.

use serde::Serialize;
use sqlx::postgres::PgPool;
use sqlx::Row;
use uuid::Uuid;

use crate::error::StoreError;
use crate::event::{JsonBytes, OutboxEvent};
use crate::relay::{Ack, Claim, DeadLetters, Parked};
use crate::store::Names;

/// One parked event, as `outbox dlq list` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    pub event_id: Uuid,
    pub partition: i32,
    pub position: i64,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub event_type: String,
    pub topic: Option<String>,
    pub payload_bytes: i32,
    pub error: String,
    pub attempts: i32,
    /// RFC 3339, UTC.
    pub first_failed_at: String,
    pub parked_at: String,
    pub parked_by: Option<String>,
}

/// Which parked events an operation applies to.
#[derive(Debug, Clone, Copy)]
pub enum Selection {
    One(Uuid),
    All,
}

pub async fn list(pool: &PgPool, names: &Names, limit: i64) -> Result<Vec<DeadLetter>, StoreError> {
    let sql = format!(
        "select event_id, partition, position, aggregate_type, aggregate_id, event_type, topic,
                pg_column_size(payload), error, attempts,
                to_char(first_failed_at at time zone 'utc', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'),
                to_char(parked_at at time zone 'utc', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'),
                parked_by
           from {} order by parked_at, event_id limit $1",
        names.table("outbox_dead_letters")
    );
    let rows = sqlx::query(&sql).bind(limit).fetch_all(pool).await?;
    rows.iter()
        .map(|r| {
            Ok(DeadLetter {
                event_id: r.try_get(0)?,
                partition: r.try_get(1)?,
                position: r.try_get(2)?,
                aggregate_type: r.try_get(3)?,
                aggregate_id: r.try_get(4)?,
                event_type: r.try_get(5)?,
                topic: r.try_get(6)?,
                payload_bytes: r.try_get(7)?,
                error: r.try_get(8)?,
                attempts: r.try_get(9)?,
                first_failed_at: r.try_get(10)?,
                parked_at: r.try_get(11)?,
                parked_by: r.try_get(12)?,
            })
        })
        .collect()
}

/// Moves parked events back into the outbox, where they get new positions
/// (after everything already waiting) and are published again. Returns how
/// many moved.
pub async fn replay(pool: &PgPool, names: &Names, which: Selection) -> Result<u64, StoreError> {
    let filter = match which {
        Selection::One(_) => "where event_id = $1",
        Selection::All => "",
    };
    let sql = format!(
        "with moved as (delete from {dead} {filter} returning *)
         insert into {outbox} (id, aggregate_type, aggregate_id, event_type, payload, headers, topic, created_at)
         select event_id, aggregate_type, aggregate_id, event_type, payload, headers, topic, created_at
           from moved order by position",
        dead = names.table("outbox_dead_letters"),
        outbox = names.table("outbox"),
    );
    let mut q = sqlx::query(&sql);
    if let Selection::One(id) = which {
        q = q.bind(id);
    }
    Ok(q.execute(pool).await?.rows_affected())
}

/// Deletes parked events for good. Returns how many.
pub async fn drop(pool: &PgPool, names: &Names, which: Selection) -> Result<u64, StoreError> {
    let table = names.table("outbox_dead_letters");
    let done = match which {
        Selection::One(id) => {
            sqlx::query(&format!("delete from {table} where event_id = $1"))
                .bind(id)
                .execute(pool)
                .await?
        }
        Selection::All => {
            sqlx::query(&format!("delete from {table}"))
                .execute(pool)
                .await?
        }
    };
    Ok(done.rows_affected())
}

/// The dead letters of one schema as the relay's [`DeadLetters`] port.
pub struct PgDeadLetters {
    pool: PgPool,
    park: String,
}

impl PgDeadLetters {
    pub fn new(pool: PgPool, names: &Names) -> Self {
        let leases = names.table("outbox_leases");
        let dead = names.table("outbox_dead_letters");
        // Fenced like an acknowledgement: a stale owner parks nothing. The
        // lease row is locked `for key share`: a takeover (`for update`)
        // waits for the park to commit, a renewal (an update of no key
        // column) does not.
        let park = format!(
            "with fence as (
                select 1 from {leases}
                 where partition = $1 and epoch = $2 and incarnation = $3
                 for key share
             ), parked as (
                insert into {dead} (event_id, partition, position, aggregate_type, aggregate_id,
                    event_type, payload, headers, topic, created_at, error, attempts,
                    first_failed_at, parked_by)
                select $4, $1, $5, $6, $7, $8, $9, $10, $11, to_timestamp($12 / 1000.0),
                       $13, $14, to_timestamp($15), $16
                 where exists (select 1 from fence)
                on conflict (event_id) do update
                   set error = excluded.error, attempts = excluded.attempts,
                       position = excluded.position, parked_at = now(),
                       parked_by = excluded.parked_by
                returning 1
             )
             select (select count(*) from fence), (select count(*) from parked)"
        );
        Self { pool, park }
    }
}

impl DeadLetters for PgDeadLetters {
    async fn park(
        &self,
        claim: &Claim,
        event: &OutboxEvent,
        parked: &Parked,
    ) -> Result<Ack, StoreError> {
        let first_failed = parked
            .first_failed_at
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        let row = sqlx::query(&self.park)
            .bind(claim.partition as i32)
            .bind(claim.epoch)
            .bind(claim.incarnation)
            .bind(event.id)
            .bind(event.position)
            .bind(&event.aggregate_type)
            .bind(&event.aggregate_id)
            .bind(&event.event_type)
            .bind(JsonBytes(event.payload.clone()))
            .bind(event.headers.clone().map(JsonBytes))
            .bind(&event.topic)
            .bind(event.created_at_ms as f64)
            .bind(&parked.error)
            .bind(parked.attempts as i32)
            .bind(first_failed)
            .bind(&parked.node_id)
            .fetch_one(&self.pool)
            .await?;
        let held: i64 = row.try_get(0)?;
        let stored: i64 = row.try_get(1)?;
        Ok(match (held, stored) {
            (0, _) => Ack::Fenced,
            (_, 0) => {
                return Err(StoreError::Schema(format!(
                    "event {} was not stored in the dead letters",
                    event.id
                )))
            }
            _ => Ack::Done,
        })
    }
}
