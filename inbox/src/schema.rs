//! The inbox's tables and their upkeep: `migrate` creates them
//! idempotently, `maintain` applies retention by creating tomorrow's
//! segments and dropping expired ones whole. Every statement that names
//! a table is built here from a validated schema name.
//!
//! Layout (see the README's "Consuming events exactly once"):
//! - `inbox`, range-partitioned by `event_at` (the event's own time, the
//!   Kafka message timestamp) into one segment per UTC day. The key is
//!   `(consumer_group, event_id, event_at)`; a redelivered message carries
//!   the same timestamp, so its copy falls into the same segment and
//!   collides on that segment's unique index, even while the first copy's
//!   transaction is still open.
//! - `inbox_window`, one row: the oldest and newest day that have a
//!   segment. Event times outside are clamped into it, so an event never
//!   lacks a segment.
//! - `inbox_aggregates`: per (group, aggregate) the newest position
//!   applied, for the optional stale-event check. One row per aggregate,
//!   updated in place (HOT: no indexed column changes).

use sqlx::PgConnection;
use tracing::info;

use crate::claim::claim_functions_sql;
use crate::error::InboxError;
use crate::segments::{self, Day};

/// Days of processed ids kept by default. Kafka's default `retention.ms`
/// is 7 days, so a consumer rewound to the earliest offset of a default
/// topic sees nothing older; the engine itself redelivers within seconds
/// (in-flight batches after a crash, a 2 s lease TTL, a 30 s message
/// timeout).
pub const DEFAULT_RETENTION_DAYS: u32 = 7;
/// Segments created ahead of today, so that midnight never waits for
/// `maintain`.
pub const DEFAULT_AHEAD_DAYS: u32 = 2;

/// Where the inbox lives and how long it remembers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxConfig {
    /// Schema of the inbox tables (created if missing).
    pub schema: String,
    /// Whole days an id is kept after its event's day ended.
    pub retention_days: u32,
    /// Daily segments created in advance.
    pub ahead_days: u32,
}

impl Default for InboxConfig {
    fn default() -> Self {
        InboxConfig {
            schema: "public".into(),
            retention_days: DEFAULT_RETENTION_DAYS,
            ahead_days: DEFAULT_AHEAD_DAYS,
        }
    }
}

impl InboxConfig {
    pub fn schema(schema: &str) -> InboxConfig {
        InboxConfig {
            schema: schema.into(),
            ..InboxConfig::default()
        }
    }

    /// Fails on the first field that cannot work, naming it.
    pub fn validate(&self) -> Result<(), InboxError> {
        check_identifier("schema", &self.schema)?;
        if !(1..=3_650).contains(&self.retention_days) {
            return Err(InboxError::Config {
                field: "retention_days",
                reason: format!("{} is not between 1 and 3650", self.retention_days),
            });
        }
        if !(1..=60).contains(&self.ahead_days) {
            return Err(InboxError::Config {
                field: "ahead_days",
                reason: format!("{} is not between 1 and 60", self.ahead_days),
            });
        }
        Ok(())
    }
}

/// A plain lowercase identifier, safe to paste into SQL.
pub(crate) fn check_identifier(field: &'static str, ident: &str) -> Result<(), InboxError> {
    let ok = !ident.is_empty()
        && ident.len() <= 48
        && ident
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && ident
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(InboxError::Config {
            field,
            reason: format!(
                "{ident:?} is not a plain identifier (lowercase letters, digits, _; at most 48)"
            ),
        })
    }
}

/// The tables, without segments, one statement each. Idempotent.
fn ddl(s: &str) -> [String; 4] {
    [
        format!("create schema if not exists {s}"),
        format!(
            "create table if not exists {s}.inbox (
    consumer_group text not null check (consumer_group <> ''),
    event_id uuid not null,
    event_at timestamptz not null,
    processed_at timestamptz not null default now(),
    primary key (consumer_group, event_id, event_at)
) partition by range (event_at)"
        ),
        format!(
            "create table if not exists {s}.inbox_window (
    only_row boolean primary key default true check (only_row),
    oldest timestamptz not null,
    newest timestamptz not null
)"
        ),
        format!(
            "create table if not exists {s}.inbox_aggregates (
    consumer_group text not null,
    aggregate_type text not null,
    aggregate_id text not null,
    position bigint not null,
    event_id uuid not null,
    applied_at timestamptz not null default now(),
    primary key (consumer_group, aggregate_type, aggregate_id)
) with (fillfactor = 70)"
        ),
    ]
}

/// Serializes `migrate` and `maintain` of one schema across processes.
fn lock(s: &str) -> String {
    format!("select pg_advisory_xact_lock(hashtext('outbox_inbox.{s}'))")
}

/// Creates the inbox tables and today's window of segments; safe to run
/// at every start of every consumer.
pub async fn migrate(conn: &mut PgConnection, config: &InboxConfig) -> Result<(), InboxError> {
    config.validate()?;
    let s = &config.schema;
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    sqlx::query(&lock(s)).execute(&mut *tx).await?;
    for statement in ddl(s).iter().chain(&claim_functions_sql(s)) {
        sqlx::query(statement).execute(&mut *tx).await?;
    }
    let today = today(&mut tx).await?;
    apply_plan(&mut tx, config, today).await?;
    tx.commit().await?;
    Ok(())
}

/// What one `maintain` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Maintained {
    pub created: Vec<Day>,
    pub dropped: Vec<Day>,
}

/// Retention: creates the segments ahead and drops (whole) those older
/// than `retention_days`. Run it daily or more often (the example
/// consumer runs it hourly); missing a run only keeps ids longer.
/// Dropping a segment takes an exclusive lock on the inbox for a moment:
/// it waits for claims in flight, and claims wait for it.
pub async fn maintain(
    conn: &mut PgConnection,
    config: &InboxConfig,
) -> Result<Maintained, InboxError> {
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    let today = today(&mut tx).await?;
    let done = maintain_in(&mut tx, config, today).await?;
    tx.commit().await?;
    Ok(done)
}

/// [`maintain`] as if today were `today` (tests, and backfills).
pub async fn maintain_as_of(
    conn: &mut PgConnection,
    config: &InboxConfig,
    today: Day,
) -> Result<Maintained, InboxError> {
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    let done = maintain_in(&mut tx, config, today).await?;
    tx.commit().await?;
    Ok(done)
}

async fn maintain_in(
    conn: &mut PgConnection,
    config: &InboxConfig,
    today: Day,
) -> Result<Maintained, InboxError> {
    config.validate()?;
    sqlx::query(&lock(&config.schema))
        .execute(&mut *conn)
        .await?;
    apply_plan(conn, config, today).await
}

async fn today(conn: &mut PgConnection) -> Result<Day, InboxError> {
    let ms: i64 = sqlx::query_scalar("select (extract(epoch from now()) * 1000)::int8")
        .fetch_one(&mut *conn)
        .await?;
    Ok(Day::of_epoch_ms(ms))
}

/// The segment days that exist now.
pub async fn segment_days(conn: &mut PgConnection, schema: &str) -> Result<Vec<Day>, InboxError> {
    check_identifier("schema", schema)?;
    let names: Vec<String> = sqlx::query_scalar(
        "select c.relname::text from pg_inherits i
           join pg_class c on c.oid = i.inhrelid
           join pg_class p on p.oid = i.inhparent
           join pg_namespace n on n.oid = p.relnamespace
          where n.nspname = $1 and p.relname = 'inbox'",
    )
    .bind(schema)
    .fetch_all(&mut *conn)
    .await?;
    let mut days: Vec<Day> = names
        .iter()
        .filter_map(|n| Day::from_segment_name(n))
        .collect();
    days.sort();
    Ok(days)
}

/// Window first, then segments: inside one transaction, so claims see
/// either the old window with its segments or the new one.
async fn apply_plan(
    conn: &mut PgConnection,
    config: &InboxConfig,
    today: Day,
) -> Result<Maintained, InboxError> {
    let s = &config.schema;
    let existing = segment_days(conn, s).await?;
    let plan = segments::plan(today, &existing, config.retention_days, config.ahead_days);
    for day in &plan.create {
        let next = Day(day.0 + 1);
        sqlx::query(&format!(
            "create table if not exists {s}.{name} partition of {s}.inbox
                 for values from ('{from}') to ('{to}')",
            name = day.segment_name(),
            from = day.start_literal(),
            to = next.start_literal(),
        ))
        .execute(&mut *conn)
        .await?;
    }
    sqlx::query(&format!(
        "insert into {s}.inbox_window (oldest, newest)
         values (to_timestamp($1), to_timestamp($2))
         on conflict (only_row) do update set oldest = excluded.oldest, newest = excluded.newest"
    ))
    .bind(plan.oldest.start_epoch_secs() as f64)
    .bind(Day(plan.newest.0 + 1).start_epoch_secs() as f64)
    .execute(&mut *conn)
    .await?;
    for day in &plan.drop {
        sqlx::query(&format!("drop table if exists {s}.{}", day.segment_name()))
            .execute(&mut *conn)
            .await?;
    }
    if !plan.create.is_empty() || !plan.drop.is_empty() {
        info!(
            schema = %s,
            created = plan.create.len(),
            dropped = plan.drop.len(),
            oldest = %plan.oldest,
            newest = %plan.newest,
            "inbox segments"
        );
    }
    Ok(Maintained {
        created: plan.create,
        dropped: plan.drop,
    })
}
