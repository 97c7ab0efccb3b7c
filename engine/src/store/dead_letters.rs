//! The dead letters: events the broker refused for good, parked by the
//! relay (`poison_policy = park`), listed, replayed or dropped by operators.

use serde::Serialize;
use sqlx::postgres::PgPool;
use sqlx::Row;
use uuid::Uuid;

use crate::error::StoreError;
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
