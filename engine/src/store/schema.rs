//! The outbox schema, generated for a schema name and a partition count, and
//! applied idempotently by `outbox migrate`.
//!
//! Layout, all in one schema:
//! - `outbox`: the table applications insert into, in ring segments
//!   `outbox_r0 ..` by position, each row with its shard (a hash of
//!   `aggregate_id`, one of N) and the id of the transaction that wrote it;
//! - `outbox_meta`: the partition count and schema version;
//! - `outbox_leases`: one row per partition: owner, epoch (fencing token), expiry;
//! - `outbox_nodes`: live engine nodes and their heartbeats.

use sqlx::{Connection, PgConnection, Row};

use crate::config::validate_identifier;
use crate::error::StoreError;

/// Version of the layout below; bumped with every change to it. Every
/// statement of [`ddl`] is idempotent and brings any earlier version up to
/// date, so `migrate` upgrades by running them all.
///
/// - 1: outbox, partitions, leases, nodes, meta.
/// - 2: dead letters, payload size limit, `outbox_leases.published`.
/// - 3: the headers check is a jsonpath expression instead of a SQL function
///   (the function was planned again for every insert statement and was the
///   largest single cost of inserting an event with headers).
/// - 4: `outbox_leases.delivery_ms` and `quiet_until`: how long a lease's
///   messages may still land after it ends, which a new owner waits out.
/// - 5: no delete per published event. One outbox table in ring segments
///   by position, a stored `shard` and the writing `txid` per row, progress
///   as a snapshot mark per shard in `outbox_leases`, segments truncated
///   once published, the `outbox_pending` view.
/// - 6: change data capture. Per partition its relay mode (`poll`, `cdc`,
///   or not chosen yet) and, for CDC, the last published (commit LSN,
///   ordinal) and whether it streams or must first catch up from the
///   table; `outbox_cdc`, the slot lease.
pub const SCHEMA_VERSION: i32 = 6;

/// Most partitions an outbox may have.
pub const MAX_PARTITIONS: u32 = 1024;

/// Largest payload the schema accepts unless told otherwise (bytes of the
/// stored `jsonb`, as `pg_column_size` counts them).
pub const DEFAULT_MAX_PAYLOAD_BYTES: u32 = 1024 * 1024;

/// Headers are absent or a JSON object whose values are all strings.
const HEADERS_CHECK: &str = "headers is null or (jsonb_typeof(headers) = 'object' \
     and not jsonb_path_exists(headers, '$.* ? (@.type() != \"string\")'))";

/// Segments of the ring the outbox rotates through.
pub const RING_SEGMENTS: u32 = 8;
/// A segment holds `2^RING_SHIFT` consecutive positions (262,144) before
/// the next one takes over: with 8 segments the ring spans about 2.1
/// million positions, and a busy outbox keeps about two segments on disk.
pub const RING_SHIFT: u32 = 18;

/// Name of a ring segment's table, unqualified.
pub fn segment_table(segment: u32) -> String {
    format!("outbox_r{segment}")
}

/// The ring segment a position is inserted into.
pub fn segment_of(position: i64) -> u32 {
    segment_of_with(position, RING_SHIFT)
}

/// [`segment_of`] for a ring of `2^shift` positions per segment.
pub fn segment_of_with(position: i64, shift: u32) -> u32 {
    ((position >> shift) & (RING_SEGMENTS as i64 - 1)) as u32
}

/// The columns of the outbox (without the partitioning clause); `shards`
/// is baked into the generated `shard` column.
fn outbox_columns(s: &str, shards: u32, max_payload_bytes: u32) -> String {
    format!(
        "position bigint not null default nextval('{s}.outbox_position_seq'),
         id uuid not null default gen_random_uuid(),
         aggregate_type text not null
             constraint outbox_aggregate_type_not_empty check (aggregate_type <> ''),
         aggregate_id text not null
             constraint outbox_aggregate_id_not_empty check (aggregate_id <> ''),
         event_type text not null,
         payload jsonb not null
             constraint outbox_payload_size check (pg_column_size(payload) <= {max_payload_bytes}),
         headers jsonb
             constraint outbox_headers_object_of_strings check ({HEADERS_CHECK}),
         topic text,
         created_at timestamptz not null default now(),
         shard int not null generated always as
             (((hashtextextended(aggregate_id, 0) & 9223372036854775807) % {shards})::int) stored,
         txid xid8 not null default pg_current_xact_id()"
    )
}

/// The statements that create the layout, each idempotent; an outbox of a
/// version before 5 (hash partitions, rows deleted once published) is
/// converted in place, its pending rows copied in position order.
///
/// Layout (version 5): `outbox` is one table, list-partitioned into ring
/// segments by position (`outbox_r0 ..`); a statement of consecutive
/// positions touches one segment, so an insert pays what a plain table
/// costs. The unit of ownership and order is the *shard*, a stored hash of
/// `aggregate_id`; each row carries the id of the transaction that wrote it
/// (`txid`), which the relay reads by snapshot difference.
pub fn ddl(schema: &str, partitions: u32, max_payload_bytes: u32, ring_shift: u32) -> Vec<String> {
    let s = schema;
    let columns = outbox_columns(s, partitions, max_payload_bytes);
    let mut stmts = vec![
        format!("create schema if not exists {s}"),
        format!(
            "create table if not exists {s}.outbox_meta (
                key text primary key,
                value text not null
            )"
        ),
        // No cache: positions must follow the order in which writers that
        // are serialized (by a lock on their aggregate) took them.
        format!("create sequence if not exists {s}.outbox_position_seq as bigint"),
        // Before version 5 the outbox was hash-partitioned by aggregate_id
        // and published rows were deleted: keep what is pending aside.
        // Nodes of the old version would go on sending (and owning
        // partitions whose aggregates now map to other shards): refuse.
        format!(
            "do $$ declare live bigint := 0; begin
                if exists (select 1 from pg_partitioned_table
                            where partrelid = to_regclass('{s}.outbox') and partstrat = 'h')
                   and to_regclass('{s}.outbox_nodes') is not null then
                    execute 'select count(*) from {s}.outbox_nodes where expires_at > now()' into live;
                    if live > 0 then
                        raise exception 'engine nodes are running on schema {s}: stop every node before upgrading the outbox to schema version 5 (see outbox status)';
                    end if;
                end if;
                if exists (select 1 from pg_partitioned_table
                            where partrelid = to_regclass('{s}.outbox') and partstrat = 'h') then
                    alter table {s}.outbox rename to outbox_legacy;
                    alter index if exists {s}.outbox_position_idx rename to outbox_legacy_position_idx;
                end if;
             end $$"
        ),
        format!(
            "create table if not exists {s}.outbox ({columns})
             partition by list (((position >> {ring_shift}) & {mask}))",
            mask = RING_SEGMENTS - 1
        ),
    ];
    for seg in 0..RING_SEGMENTS {
        let t = segment_table(seg);
        stmts.push(format!(
            "create table if not exists {s}.{t} partition of {s}.outbox for values in ({seg})"
        ));
    }
    stmts.extend([
        // Serves every read of the relay: a window's transactions by txid
        // range or list, and a chunk of a big window as one index range per
        // transaction (`txid = t and (position, id) between` two keys). It
        // replaces the `(shard, txid)` index of the first version 5 (one
        // index, not two, on the insert path).
        format!(
            "create index if not exists outbox_shard_txid_position_idx
                on {s}.outbox (shard, txid, position, id)"
        ),
        format!("drop index if exists {s}.outbox_shard_txid_idx"),
        format!(
            "create table if not exists {s}.outbox_leases (
                partition int primary key,
                owner text,
                incarnation uuid,
                epoch bigint not null default 0,
                expires_at timestamptz,
                acquired_at timestamptz,
                published bigint not null default 0
            )"
        ),
        format!(
            "alter table {s}.outbox_leases add column if not exists published bigint not null default 0"
        ),
        // Owners from before version 4 sent with a 30 s message timeout.
        format!(
            "alter table {s}.outbox_leases
                add column if not exists delivery_ms bigint not null default 30000,
                add column if not exists quiet_until timestamptz"
        ),
        // The shard's progress: everything visible in `mark_lo` is
        // published, and of what `mark_hi` adds to it, everything up to
        // (`mark_pos`, `mark_id`). '1:1:' sees nothing.
        format!(
            "alter table {s}.outbox_leases
                add column if not exists mark_lo pg_snapshot not null default '1:1:',
                add column if not exists mark_hi pg_snapshot,
                add column if not exists mark_pos bigint,
                add column if not exists mark_id uuid"
        ),
        // The relay mode of the partition (null: not chosen yet; the first
        // node sets it from `source.kind`). Under CDC, the last event
        // published as (commit LSN, ordinal in its transaction), and whether
        // the partition streams (false: it first catches up from the table,
        // after a switch to CDC or a lost slot).
        format!(
            "alter table {s}.outbox_leases
                add column if not exists mode text
                    constraint outbox_leases_mode check (mode in ('poll', 'cdc')),
                add column if not exists cdc_lsn pg_lsn,
                add column if not exists cdc_ord int,
                add column if not exists cdc_streaming boolean not null default false"
        ),
        // The lease on the replication slot: one reader at a time, fenced
        // by its epoch like the partitions' leases.
        format!(
            "create table if not exists {s}.outbox_cdc (
                id int primary key default 1 constraint outbox_cdc_one_row check (id = 1),
                owner text,
                incarnation uuid,
                epoch bigint not null default 0,
                expires_at timestamptz,
                acquired_at timestamptz,
                slot text,
                publication text,
                recoveries bigint not null default 0
            )"
        ),
        format!("insert into {s}.outbox_cdc (id) values (1) on conflict do nothing"),
        format!(
            "insert into {s}.outbox_leases (partition)
             select generate_series(0, {last}) on conflict do nothing",
            last = partitions as i64 - 1
        ),
        // Pending rows of a pre-5 outbox, in their order, then its tables
        // go; every shard starts from a mark that has seen nothing.
        format!(
            "do $$ begin
                if to_regclass('{s}.outbox_legacy') is not null then
                    insert into {s}.outbox (position, id, aggregate_type, aggregate_id, event_type,
                                            payload, headers, topic, created_at)
                    select position, id, aggregate_type, aggregate_id, event_type,
                           payload, headers, topic, created_at
                      from {s}.outbox_legacy order by position;
                    drop table {s}.outbox_legacy cascade;
                    -- Aggregates move to other shards: every new owner waits
                    -- out the longest any old owner's messages may land.
                    update {s}.outbox_leases
                       set mark_lo = '1:1:', mark_hi = null, mark_pos = null, mark_id = null,
                           owner = null, expires_at = null, epoch = epoch + 1,
                           quiet_until = (select max(coalesce(expires_at, now())
                                                     + (delivery_ms + 2000) * interval '1 millisecond')
                                            from {s}.outbox_leases);
                end if;
             end $$"
        ),
        // What is not published yet, for operators, status and tests.
        format!(
            "create or replace view {s}.outbox_pending as
             select o.*
               from {s}.outbox_leases l
              cross join lateral {pending} o",
            pending = crate::store::source::pending_rows(&format!("{s}.outbox"), "l", "o.*")
        ),
        format!(
            "create table if not exists {s}.outbox_dead_letters (
                event_id uuid primary key,
                partition int not null,
                position bigint not null,
                aggregate_type text not null,
                aggregate_id text not null,
                event_type text not null,
                payload jsonb not null,
                headers jsonb,
                topic text,
                created_at timestamptz not null,
                error text not null,
                attempts int not null,
                first_failed_at timestamptz not null,
                parked_at timestamptz not null default now(),
                parked_by text
            )"
        ),
        format!(
            "create table if not exists {s}.outbox_nodes (
                node_id text primary key,
                incarnation uuid not null,
                started_at timestamptz not null default now(),
                heartbeat_at timestamptz not null default now(),
                expires_at timestamptz not null
            )"
        ),
    ]);
    stmts
}

/// What `migrate` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrateOutcome {
    Created,
    AlreadyCurrent,
    /// The schema was there; the payload limit changed.
    PayloadLimitChanged,
}

/// What `migrate` is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MigrateOptions {
    pub partitions: u32,
    /// `None`: keep the current limit (the default for a new schema).
    pub max_payload_bytes: Option<u32>,
    /// Positions per ring segment, as a power of two, for a new outbox
    /// (`None`: [`RING_SHIFT`]); an existing ring keeps its own.
    pub ring_shift: Option<u32>,
}

impl MigrateOptions {
    pub fn partitions(partitions: u32) -> Self {
        Self {
            partitions,
            max_payload_bytes: None,
            ring_shift: None,
        }
    }
}

/// Creates the layout with `partitions` partitions, or checks that the one
/// in place has that many. Runs in one transaction under an advisory lock, so
/// concurrent runs are safe and a refused run changes nothing.
pub async fn migrate(
    conn: &mut PgConnection,
    schema: &str,
    options: MigrateOptions,
) -> Result<MigrateOutcome, StoreError> {
    let partitions = options.partitions;
    validate_identifier("database.schema", schema)?;
    if !(1..=MAX_PARTITIONS).contains(&partitions) {
        return Err(StoreError::Schema(format!(
            "--partitions must be between 1 and {MAX_PARTITIONS}, got {partitions}"
        )));
    }
    let mut tx = conn.begin().await?;
    // "already exists, skipping" notices are expected on every re-run.
    sqlx::query("set local client_min_messages = warning")
        .execute(&mut *tx)
        .await?;
    sqlx::query("select pg_advisory_xact_lock(hashtext('outbox-migrate'))")
        .execute(&mut *tx)
        .await?;
    if let Some(existing) = read_partitions(&mut tx, schema).await? {
        if existing != partitions {
            return Err(StoreError::Schema(format!(
                "the outbox in schema {schema} already has {existing} partitions; \
                 refusing to migrate to {partitions} (repartitioning is not supported; \
                 run with --partitions {existing})"
            )));
        }
        let version = read_meta(&mut tx, schema, "schema_version").await?;
        if version.as_deref() == Some(&SCHEMA_VERSION.to_string()) {
            let current = read_meta(&mut tx, schema, "max_payload_bytes").await?;
            let outcome = match options.max_payload_bytes {
                Some(max) if current.as_deref() != Some(&max.to_string()) => {
                    set_payload_limit(&mut tx, schema, max).await?;
                    MigrateOutcome::PayloadLimitChanged
                }
                _ => MigrateOutcome::AlreadyCurrent,
            };
            tx.commit().await?;
            return Ok(outcome);
        }
    }
    let recorded = |v: Option<String>| v.and_then(|v| v.parse::<u32>().ok());
    let max_payload = match options.max_payload_bytes {
        Some(max) => max,
        None => recorded(read_meta(&mut tx, schema, "max_payload_bytes").await?)
            .unwrap_or(DEFAULT_MAX_PAYLOAD_BYTES),
    };
    let ring_shift = match recorded(read_meta(&mut tx, schema, "ring_shift").await?) {
        Some(shift) => shift,
        None => options.ring_shift.unwrap_or(RING_SHIFT),
    };
    if !(4..=40).contains(&ring_shift) {
        return Err(StoreError::Schema(format!(
            "the ring segment size must be 2^4 to 2^40 positions, got 2^{ring_shift}"
        )));
    }
    for stmt in ddl(schema, partitions, max_payload, ring_shift) {
        sqlx::query(&stmt).execute(&mut *tx).await?;
    }
    sqlx::query(&format!(
        "insert into {schema}.outbox_meta (key, value)
         values ('partitions', $1), ('schema_version', $2), ('max_payload_bytes', $3),
                ('ring_shift', $4)
         on conflict (key) do update set value = excluded.value"
    ))
    .bind(partitions.to_string())
    .bind(SCHEMA_VERSION.to_string())
    .bind(max_payload.to_string())
    .bind(ring_shift.to_string())
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(MigrateOutcome::Created)
}

/// Replaces the payload size check (existing rows are checked against it).
async fn set_payload_limit(
    conn: &mut PgConnection,
    schema: &str,
    max: u32,
) -> Result<(), StoreError> {
    sqlx::raw_sql(&format!(
        "alter table {schema}.outbox drop constraint if exists outbox_payload_size;
         alter table {schema}.outbox add constraint outbox_payload_size
            check (pg_column_size(payload) <= {max});
         update {schema}.outbox_meta set value = '{max}' where key = 'max_payload_bytes'"
    ))
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// The schema version recorded by `migrate`, if any.
pub async fn read_version(
    conn: &mut PgConnection,
    schema: &str,
) -> Result<Option<i32>, StoreError> {
    let Some(v) = read_meta(conn, schema, "schema_version").await? else {
        return Ok(None);
    };
    v.parse().map(Some).map_err(|_| {
        StoreError::Schema(format!("{schema}.outbox_meta holds schema_version = {v:?}"))
    })
}

/// The partition count of the outbox in `schema`, if it was migrated.
pub async fn read_partitions(
    conn: &mut PgConnection,
    schema: &str,
) -> Result<Option<u32>, StoreError> {
    let Some(value) = read_meta(conn, schema, "partitions").await? else {
        return Ok(None);
    };
    value.parse().map(Some).map_err(|_| {
        StoreError::Schema(format!("{schema}.outbox_meta holds partitions = {value:?}"))
    })
}

async fn read_meta(
    conn: &mut PgConnection,
    schema: &str,
    key: &str,
) -> Result<Option<String>, StoreError> {
    let exists: bool = sqlx::query("select to_regclass($1) is not null")
        .bind(format!("{schema}.outbox_meta"))
        .fetch_one(&mut *conn)
        .await?
        .try_get(0)?;
    if !exists {
        return Ok(None);
    }
    let row = sqlx::query(&format!(
        "select value from {schema}.outbox_meta where key = $1"
    ))
    .bind(key)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(row.map(|r| r.try_get(0)).transpose()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ddl_has_the_ring_and_bakes_the_shard_count_in() {
        let stmts = ddl("app", 4, 1000, RING_SHIFT);
        let segments: Vec<_> = stmts
            .iter()
            .filter(|s| s.contains("partition of app.outbox"))
            .collect();
        assert_eq!(segments.len(), RING_SEGMENTS as usize);
        assert!(stmts.iter().any(|s| s.contains("% 4)::int) stored")));
        assert!(stmts.iter().all(|s| !s.contains("public.")));
    }

    #[test]
    fn consecutive_positions_share_a_segment_and_the_ring_wraps() {
        assert_eq!(segment_of(1), 0);
        assert_eq!(segment_of((1 << RING_SHIFT) - 1), 0);
        assert_eq!(segment_of(1 << RING_SHIFT), 1);
        assert_eq!(segment_of((RING_SEGMENTS as i64) << RING_SHIFT), 0);
    }
}
