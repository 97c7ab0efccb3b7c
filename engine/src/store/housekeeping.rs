//! Bloat-free removal of published rows: the outbox is a ring of segments
//! by position, and a segment is emptied with `TRUNCATE` once every row in
//! it is published. No row is ever deleted one by one, so nothing is left
//! for vacuum.
//!
//! A segment is truncated only when (1) the sequence has moved past it (new
//! inserts go to another segment), (2) `ACCESS EXCLUSIVE` is granted within
//! a short `lock_timeout`, which waits out inserters still writing into it,
//! and (3) with the lock held, no row of it is unpublished by its shard's
//! mark. The check and the truncate run in one transaction. An advisory lock
//! lets one node at a time do it.

use std::time::Duration;

use sqlx::postgres::PgPool;
use sqlx::Connection;
use tokio_util::sync::CancellationToken;

use crate::error::StoreError;
use crate::ops::metrics as m;
use crate::store::schema::{self, RING_SEGMENTS};
use crate::store::source::pending_rows;
use crate::store::Names;

/// How long a truncation waits for inserters still writing into a segment.
const LOCK_TIMEOUT: &str = "200ms";

/// Truncates every published segment of the ring. Returns how many.
pub async fn truncate_published(pool: &PgPool, names: &Names) -> Result<u32, StoreError> {
    let shift = ring_shift(pool, names).await?;
    let seq = names.table("outbox_position_seq");
    let leases = names.table("outbox_leases");
    let mut truncated = 0;
    for seg in 0..RING_SEGMENTS {
        let table = names.segment(seg);
        let current: i64 = sqlx::query_scalar(&format!("select last_value from {seq}"))
            .fetch_one(pool)
            .await?;
        if schema::segment_of_with(current, shift) == seg {
            continue;
        }
        let any: bool = sqlx::query_scalar(&format!("select exists (select 1 from {table})"))
            .fetch_one(pool)
            .await?;
        if !any {
            continue;
        }
        // First without the lock: a segment that still holds unpublished
        // rows is left alone, and readers never queue behind a lock request
        // that would only find that out. A "published" answer is checked
        // again under the lock (it can only turn stale towards "pending").
        let check = format!(
            "select l.partition from {leases} l
              cross join lateral (select 1 from {p} p limit 1) x
              limit 1",
            p = pending_rows(&table, "l", "1")
        );
        if holds_unpublished(&check, seg, pool).await? {
            continue;
        }
        let mut conn = pool.acquire().await?;
        let mut tx = conn.begin().await?;
        let ours: bool = sqlx::query_scalar("select pg_try_advisory_xact_lock(hashtext($1), $2)")
            .bind(format!("outbox-ring:{}", names.schema))
            .bind(seg as i32)
            .fetch_one(&mut *tx)
            .await?;
        if !ours {
            continue;
        }
        sqlx::query(&format!("set local lock_timeout = '{LOCK_TIMEOUT}'"))
            .execute(&mut *tx)
            .await?;
        let locked = sqlx::query(&format!("lock table {table} in access exclusive mode"))
            .execute(&mut *tx)
            .await;
        if let Err(error) = locked {
            tracing::debug!(segment = seg, %error, "segment busy; truncation deferred");
            continue;
        }
        if holds_unpublished(&check, seg, &mut *tx).await? {
            continue;
        }
        sqlx::query(&format!("truncate {table}"))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        metrics::counter!(m::SEGMENTS_TRUNCATED).increment(1);
        tracing::debug!(segment = seg, "published segment truncated");
        truncated += 1;
    }
    Ok(truncated)
}

/// The ring's segment size (as a shift) recorded by `migrate`.
pub async fn ring_shift(pool: &PgPool, names: &Names) -> Result<u32, StoreError> {
    let meta = names.table("outbox_meta");
    let v: Option<String> = sqlx::query_scalar(&format!(
        "select value from {meta} where key = 'ring_shift'"
    ))
    .fetch_optional(pool)
    .await?;
    match v {
        None => Ok(schema::RING_SHIFT),
        Some(v) => v
            .parse()
            .map_err(|_| StoreError::Schema(format!("{meta} holds ring_shift = {v:?}"))),
    }
}

/// Truncates published segments every `period` until `stop`.
pub async fn run(pool: PgPool, names: Names, period: Duration, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
        if let Err(error) = truncate_published(&pool, &names).await {
            tracing::warn!(%error, "truncating published segments failed; retrying");
        }
    }
}

/// Whether `check` finds a shard with unpublished rows in segment `seg`
/// (then its truncation is deferred, and said so at debug level).
async fn holds_unpublished<'e, E>(check: &str, seg: u32, executor: E) -> Result<bool, StoreError>
where
    E: sqlx::Executor<'e, Database = sqlx::Postgres>,
{
    let waiting: Option<i32> = sqlx::query_scalar(check).fetch_optional(executor).await?;
    if let Some(shard) = waiting {
        tracing::debug!(
            segment = seg,
            shard,
            "segment holds unpublished rows; truncation deferred"
        );
    }
    Ok(waiting.is_some())
}
