//! Reads what `outbox status` shows: per partition its lease and backlog,
//! and the live nodes.

use sqlx::postgres::PgPool;
use sqlx::Row;

use crate::error::StoreError;
use crate::status::{CdcStatus, NodeStatus, PartitionStatus, Status};
use crate::store::Names;

/// Whether any event is still unpublished (any partition); stops at the
/// first one, so it is cheap however large the backlog.
pub async fn has_pending(pool: &PgPool, names: &Names) -> Result<bool, StoreError> {
    let sql = format!(
        "select exists(select 1 from {})",
        names.table("outbox_pending")
    );
    Ok(sqlx::query_scalar(&sql).fetch_one(pool).await?)
}

/// Events published since the outbox was created, summed over the
/// partitions' counters: one row per partition read, cheap enough to poll
/// while millions drain (`read` also counts the backlog).
pub async fn published(pool: &PgPool, names: &Names) -> Result<i64, StoreError> {
    let sql = format!(
        "select coalesce(sum(published), 0)::int8 from {}",
        names.table("outbox_leases")
    );
    Ok(sqlx::query_scalar(&sql).fetch_one(pool).await?)
}

/// One query for every partition's backlog and lease, one for the nodes.
pub async fn read(pool: &PgPool, names: &Names) -> Result<Status, StoreError> {
    let leases = names.table("outbox_leases");
    let nodes = names.table("outbox_nodes");
    let outbox = names.table("outbox");
    let sql = format!(
        "select l.partition, case when l.expires_at > now() then l.owner end as owner,
                l.epoch,
                (extract(epoch from l.expires_at - now()) * 1000)::int8 as expires_in_ms,
                b.pending,
                (extract(epoch from now() - b.oldest) * 1000)::int8 as oldest_age_ms,
                l.published, l.mode, l.cdc_streaming
           from {leases} l
           cross join lateral (
              select count(*) as pending, min(p.created_at) as oldest
                from (select p.created_at from {pending} p limit {cap}) p
           ) b
          order by l.partition",
        pending = crate::store::source::pending_rows(&outbox, "l", "o.created_at"),
        cap = crate::store::source::BACKLOG_COUNT_CAP
    );
    let rows = sqlx::query(&sql).fetch_all(pool).await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        out.push(PartitionStatus {
            partition: r.try_get::<i32, _>(0)? as u32,
            owner: r.try_get(1)?,
            epoch: r.try_get(2)?,
            lease_expires_in_ms: r.try_get(3)?,
            pending: r.try_get(4)?,
            oldest_age_ms: r.try_get(5)?,
            published: r.try_get(6)?,
            rate_per_sec: None,
            mode: r.try_get(7)?,
            cdc_streaming: r.try_get(8)?,
        });
    }
    let node_rows = sqlx::query(&format!(
        "select n.node_id, (extract(epoch from now() - n.heartbeat_at) * 1000)::int8,
                (select count(*) from {leases} l
                  where l.owner = n.node_id and l.incarnation = n.incarnation and l.expires_at > now())
           from {nodes} n where n.expires_at > now() order by n.node_id"
    ))
    .fetch_all(pool)
    .await?;
    let mut node_list = Vec::with_capacity(node_rows.len());
    for r in node_rows {
        node_list.push(NodeStatus {
            node_id: r.try_get(0)?,
            last_heartbeat_ms: r.try_get(1)?,
            partitions: r.try_get(2)?,
        });
    }
    let cdc = sqlx::query(&format!(
        "select case when c.expires_at > now() then c.owner end, c.slot, s.slot_name is not null,
                coalesce(s.active, false), s.wal_status,
                (pg_current_wal_lsn() - s.confirmed_flush_lsn)::int8,
                (pg_current_wal_lsn() - s.restart_lsn)::int8, c.recoveries
           from {cdc} c left join pg_replication_slots s on s.slot_name = c.slot
          where c.slot is not null",
        cdc = names.table("outbox_cdc")
    ))
    .fetch_optional(pool)
    .await?
    .map(|r| -> Result<CdcStatus, sqlx::Error> {
        Ok(CdcStatus {
            holder: r.try_get(0)?,
            slot: r.try_get(1)?,
            exists: r.try_get(2)?,
            active: r.try_get(3)?,
            wal_status: r.try_get(4)?,
            confirmed_lag_bytes: r.try_get(5)?,
            retained_wal_bytes: r.try_get(6)?,
            recoveries: r.try_get(7)?,
        })
    })
    .transpose()?;
    Ok(Status {
        partitions: out,
        nodes: node_list,
        cdc,
    })
}
