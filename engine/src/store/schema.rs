//! The outbox schema, generated for a schema name and a partition count, and
//! applied idempotently by `outbox migrate`.
//!
//! Layout, all in one schema:
//! - `outbox`: the table applications insert into, hash-partitioned by
//!   `aggregate_id` into `outbox_p0 .. outbox_p{N-1}`;
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
pub const SCHEMA_VERSION: i32 = 3;

/// Most partitions an outbox may have.
pub const MAX_PARTITIONS: u32 = 1024;

/// Largest payload the schema accepts unless told otherwise (bytes of the
/// stored `jsonb`, as `pg_column_size` counts them).
pub const DEFAULT_MAX_PAYLOAD_BYTES: u32 = 1024 * 1024;

/// Headers are absent or a JSON object whose values are all strings.
const HEADERS_CHECK: &str = "headers is null or (jsonb_typeof(headers) = 'object' \
     and not jsonb_path_exists(headers, '$.* ? (@.type() != \"string\")'))";

/// Name of a partition's table, unqualified.
pub fn partition_table(partition: u32) -> String {
    format!("outbox_p{partition}")
}

/// The statements that create the layout, each idempotent.
pub fn ddl(schema: &str, partitions: u32, max_payload_bytes: u32) -> Vec<String> {
    let s = schema;
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
        format!(
            "create table if not exists {s}.outbox (
                position bigint not null default nextval('{s}.outbox_position_seq'),
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
                created_at timestamptz not null default now()
            ) partition by hash (aggregate_id)"
        ),
    ];
    for p in 0..partitions {
        let t = partition_table(p);
        // The relay deletes what it published and vacuums the partition
        // itself; autovacuum settings are a backstop that does not wait for
        // a fraction of the table to be dead.
        stmts.push(format!(
            "create table if not exists {s}.{t} partition of {s}.outbox
                for values with (modulus {partitions}, remainder {p})
                with (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 10000,
                      autovacuum_vacuum_insert_scale_factor = 0, autovacuum_vacuum_cost_delay = 0)"
        ));
    }
    stmts.extend([
        // Before version 3 the headers check called a SQL function.
        format!(
            "do $$ begin
                if not exists (select 1 from pg_constraint
                                where conname = 'outbox_headers_object_of_strings'
                                  and conrelid = '{s}.outbox'::regclass
                                  and pg_get_constraintdef(oid) like '%jsonb_path_exists%') then
                    alter table {s}.outbox drop constraint if exists outbox_headers_object_of_strings;
                    alter table {s}.outbox add constraint outbox_headers_object_of_strings
                        check ({HEADERS_CHECK});
                end if;
             end $$"
        ),
        format!("drop function if exists {s}.outbox_headers_valid(jsonb)"),
        // Version 1 outboxes were created without the payload limit.
        format!(
            "do $$ begin
                if not exists (select 1 from pg_constraint
                                where conname = 'outbox_payload_size' and conrelid = '{s}.outbox'::regclass) then
                    alter table {s}.outbox add constraint outbox_payload_size
                        check (pg_column_size(payload) <= {max_payload_bytes});
                end if;
             end $$"
        ),
        format!("create index if not exists outbox_position_idx on {s}.outbox (position)"),
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
        format!(
            "insert into {s}.outbox_leases (partition)
             select generate_series(0, {last}) on conflict do nothing",
            last = partitions as i64 - 1
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
}

impl MigrateOptions {
    pub fn partitions(partitions: u32) -> Self {
        Self {
            partitions,
            max_payload_bytes: None,
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
    let max_payload = options
        .max_payload_bytes
        .unwrap_or(DEFAULT_MAX_PAYLOAD_BYTES);
    for stmt in ddl(schema, partitions, max_payload) {
        sqlx::query(&stmt).execute(&mut *tx).await?;
    }
    sqlx::query(&format!(
        "insert into {schema}.outbox_meta (key, value)
         values ('partitions', $1), ('schema_version', $2), ('max_payload_bytes', $3)
         on conflict (key) do update set value = excluded.value"
    ))
    .bind(partitions.to_string())
    .bind(SCHEMA_VERSION.to_string())
    .bind(max_payload.to_string())
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
    fn ddl_has_one_table_per_partition() {
        let stmts = ddl("app", 4, 1000);
        let parts: Vec<_> = stmts
            .iter()
            .filter(|s| s.contains("partition of app.outbox"))
            .collect();
        assert_eq!(parts.len(), 4);
        assert!(parts[3].contains("modulus 4, remainder 3"));
        assert!(stmts.iter().all(|s| !s.contains("public.")));
    }
}
