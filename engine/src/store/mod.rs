//! PostgreSQL: the outbox tables (as the relay's event source), the leases,
//! and the schema. Every statement is built once, here, from a validated
//! schema name and the partition number.

use std::time::Duration;

use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{ConnectOptions, Connection};

use crate::config::{validate_identifier, DatabaseConfig};
use crate::error::StoreError;

pub mod dead_letters;
pub mod housekeeping;
pub mod leases;
pub mod memory;
pub mod schema;
pub mod source;
pub mod status;

/// Opens a pool, failing fast with an error that names the server (never
/// the password) when it cannot be reached.
pub async fn connect(config: &DatabaseConfig, max_connections: u32) -> Result<PgPool, StoreError> {
    connect_as(config, max_connections, "outbox", &[]).await
}

/// Server settings of the relay's data path. Acknowledgements (progress
/// marks of published rows) commit without waiting for the WAL flush: if the
/// database crashes, the last of them may be undone and those events are
/// published again. At-least-once holds; nothing can be lost, because
/// nothing but marks of already published rows is committed this way.
///
/// The relay's statements run with generic plans: they are prepared once
/// and their parameters never change which rows an index reaches, but the
/// planner kept choosing a fresh custom plan for the fetch on every
/// execution, and planning its 16 index scans over the ring cost 0.4-2 ms
/// against 0.1-0.3 ms of execution (bench/plan-cache.sh).
///
pub const RELAY_SESSION: &[(&str, &str)] = &[
    ("synchronous_commit", "off"),
    ("plan_cache_mode", "force_generic_plan"),
];

/// Server settings of housekeeping (segment checks and truncation):
/// truncations commit synchronously, so nothing beyond [`EVERY_SESSION`].
pub const HOUSEKEEPING_SESSION: &[(&str, &str)] = &[];

/// Server settings of every connection the engine and its CLI open.
///
/// No JIT: the planner's cost of a statement over the whole ring grows with
/// the outbox (and with a table never analyzed, as autovacuum may not have
/// reached it yet), and past `jit_above_cost` every execution compiled its
/// expressions again, for statements that read little: a backlog count of
/// a 400K-row outbox spent 1.6 s of its 1.66 s compiling 87 functions, and
/// `outbox status` of a fresh 4,000-row outbox took 6 s, 1.2 s per count
/// of it compiling (9 ms without).
pub const EVERY_SESSION: &[(&str, &str)] = &[("jit", "off")];

/// [`connect`], with the `application_name` that `pg_stat_activity` shows
/// (a node connects as `outbox/<node id>`).
pub async fn connect_as(
    config: &DatabaseConfig,
    max_connections: u32,
    application_name: &str,
    settings: &[(&str, &str)],
) -> Result<PgPool, StoreError> {
    // Slow statements are expected under load (vacuum, a big status count);
    // they are logged at debug, not as warnings with the whole statement.
    let mut options = config
        .connect_options()?
        .application_name(application_name)
        .log_slow_statements(log::LevelFilter::Debug, Duration::from_secs(1));
    options = options.options(EVERY_SESSION.iter().chain(settings).copied());
    let pool = PgPoolOptions::new()
        .max_connections(max_connections)
        .min_connections(0)
        .acquire_timeout(config.connect_timeout())
        // Test a connection only when it sat idle long enough to have died
        // with a restarted server; the relay's own retries cover the rest.
        .test_before_acquire(false)
        .idle_timeout(Some(Duration::from_secs(60)))
        .connect_lazy_with(options);
    // One real connection now, so a wrong URL fails here, not in a worker.
    let mut conn = tokio::time::timeout(config.connect_timeout(), pool.acquire())
        .await
        .map_err(|_| {
            StoreError::Schema(format!(
                "cannot connect to the database at {}: timed out after {:?}",
                config.url,
                config.connect_timeout()
            ))
        })?
        .map_err(|e| {
            StoreError::Schema(format!(
                "cannot connect to the database at {}: {e}",
                config.url
            ))
        })?;
    conn.ping().await?;
    Ok(pool)
}

/// The outbox's names in one schema.
#[derive(Debug, Clone)]
pub struct Names {
    pub schema: String,
}

impl Names {
    pub fn new(schema: &str) -> Result<Self, StoreError> {
        validate_identifier("database.schema", schema)?;
        Ok(Self {
            schema: schema.to_string(),
        })
    }

    /// A ring segment's table, qualified.
    pub fn segment(&self, segment: u32) -> String {
        format!("{}.{}", self.schema, schema::segment_table(segment))
    }

    pub fn table(&self, name: &str) -> String {
        format!("{}.{name}", self.schema)
    }
}

/// The partition count recorded by `migrate`, or a clear error if the
/// schema was never migrated or is older than this engine.
pub async fn partitions(pool: &PgPool, names: &Names) -> Result<u32, StoreError> {
    let mut conn = pool.acquire().await?;
    let partitions = schema::read_partitions(&mut conn, &names.schema)
        .await?
        .ok_or_else(|| {
            StoreError::Schema(format!(
                "no outbox in schema {}: run `outbox migrate --partitions N` first",
                names.schema
            ))
        })?;
    let version = schema::read_version(&mut conn, &names.schema)
        .await?
        .unwrap_or(0);
    if version != schema::SCHEMA_VERSION {
        return Err(StoreError::Schema(format!(
            "the outbox in schema {} is at schema version {version}; this engine needs version {}: \
             run `outbox migrate --partitions {partitions}`",
            names.schema,
            schema::SCHEMA_VERSION
        )));
    }
    Ok(partitions)
}
