//! Reads what `outbox status` shows: per partition its lease and backlog,
//! and the live nodes.

use sqlx::postgres::PgPool;
use sqlx::Row;

use crate::error::StoreError;
use crate::status::{NodeStatus, PartitionStatus, Status};
use crate::store::Names;

/// One query for every partition's backlog and lease, one for the nodes.
pub async fn read(pool: &PgPool, names: &Names, partitions: u32) -> Result<Status, StoreError> {
    let leases = names.table("outbox_leases");
    let nodes = names.table("outbox_nodes");
    let backlog: Vec<String> = (0..partitions)
        .map(|p| {
            let t = names.partition(p);
            format!(
                "select {p} as partition, (select count(*) from {t}) as pending,
                        (select created_at from {t} order by position limit 1) as oldest"
            )
        })
        .collect();
    let sql = format!(
        "with backlog as ({})
         select l.partition, case when l.expires_at > now() then l.owner end as owner,
                l.epoch,
                (extract(epoch from l.expires_at - now()) * 1000)::int8 as expires_in_ms,
                b.pending,
                (extract(epoch from now() - b.oldest) * 1000)::int8 as oldest_age_ms,
                l.published
           from {leases} l join backlog b on b.partition = l.partition
          order by l.partition",
        backlog.join(" union all ")
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
    Ok(Status {
        partitions: out,
        nodes: node_list,
    })
}
