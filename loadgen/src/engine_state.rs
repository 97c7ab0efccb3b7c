//! What loadgen reads of the engine's state: whether the schema is
//! migrated, which nodes are live, who holds the leases, what is pending
//! and how much was published. It goes through the engine's library
//! (`outbox_engine::store`), not the engine's tables, so loadgen reads them
//! as `outbox status` does. The drain and `run --no-verify` poll the cheap
//! [`status::has_pending`] and [`status::published`] several times a second
//! while millions of events are pending, where [`status::read`]'s backlog
//! count (up to a million rows per partition) would compete with the engine
//! under test.
//!
//! The load itself (the application's writes into the outbox, and its own
//! business table) is in [`crate::writer`] and [`crate::drain`].

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use sqlx::PgPool;

use outbox_engine::config::{DatabaseConfig, DatabaseUrl};
use outbox_engine::status::Status;
use outbox_engine::store::source::BACKLOG_COUNT_CAP;
use outbox_engine::store::{self, status, Names};

use crate::nodes::Cluster;
use crate::writer::CONNECT_TIMEOUT;

/// Connections loadgen keeps to the engine's database besides its writers.
const POOL_SIZE: u32 = 2;
/// How often readiness is checked.
const READY_POLL: Duration = Duration::from_millis(200);

/// The engine's database as loadgen reads it.
pub struct EngineDb {
    pool: PgPool,
    names: Names,
}

impl EngineDb {
    /// A small pool on `url` for the outbox in `schema`; fails fast, naming
    /// the server but not the password, when it cannot be reached.
    pub async fn connect(url: &str, schema: &str) -> Result<Self> {
        let config = DatabaseConfig {
            url: DatabaseUrl::new(url),
            schema: schema.to_string(),
            max_connections: POOL_SIZE,
            connect_timeout_ms: CONNECT_TIMEOUT.as_millis() as u64,
        };
        let pool = store::connect_as(&config, POOL_SIZE, "loadgen", &[]).await?;
        Ok(Self {
            pool,
            names: Names::new(schema)?,
        })
    }

    /// For loadgen's own statements (the business table, the server's
    /// version), which are not the engine's.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The outbox's partition count; an error naming `outbox migrate` if
    /// the schema was never migrated or is at another schema version than
    /// the engine loadgen was built with.
    pub async fn partitions(&self) -> Result<u32> {
        Ok(store::partitions(&self.pool, &self.names).await?)
    }

    /// What `outbox status` shows: partitions, leases, backlog, live nodes.
    /// Counts the backlog, so it is read once or on an empty outbox, not
    /// polled under load.
    pub async fn status(&self) -> Result<Status> {
        Ok(status::read(&self.pool, &self.names).await?)
    }

    /// Engine nodes with a live heartbeat.
    pub async fn live_nodes(&self) -> Result<usize> {
        Ok(self.status().await?.nodes.len())
    }

    /// Whether any event is still unpublished; stops at the first one.
    pub async fn any_pending(&self) -> Result<bool> {
        status::has_pending(&self.pool, &self.names)
            .await
            .context("checking whether the outbox is empty")
    }

    /// Events published since the outbox was created, summed over the
    /// partitions' lease rows: cheap enough to read every second while a
    /// backlog of millions drains.
    pub async fn published(&self) -> Result<i64> {
        status::published(&self.pool, &self.names)
            .await
            .context("reading the published counts")
    }

    pub async fn close(self) {
        self.pool.close().await;
    }
}

/// Partitions held under an unexpired lease, and the distinct nodes
/// holding them.
pub fn leased(status: &Status) -> (usize, usize) {
    let mut owners: Vec<&str> = status
        .partitions
        .iter()
        .filter_map(|p| p.owner.as_deref())
        .collect();
    let held = owners.len();
    owners.sort_unstable();
    owners.dedup();
    (held, owners.len())
}

/// Whether `status` shows exactly `expected` events pending. The engine
/// counts at most [`BACKLOG_COUNT_CAP`] per partition; a partition at the
/// cap holds at least that many, so then the count can only be too high.
pub fn check_backlog(status: &Status, expected: u64) -> Result<(), String> {
    let counted: u64 = status
        .partitions
        .iter()
        .map(|p| p.pending.max(0) as u64)
        .sum();
    let capped = status
        .partitions
        .iter()
        .any(|p| p.pending >= BACKLOG_COUNT_CAP);
    if counted == expected || (capped && counted < expected) {
        Ok(())
    } else {
        Err(format!(
            "{counted}{} events are pending, expected {expected}",
            if capped { " or more" } else { "" }
        ))
    }
}

/// Waits until every partition has a live lease and every node holds some
/// (as many owners as nodes, up to the partitions); how long that took
/// since the nodes started. Fails if a node exits meanwhile.
pub async fn wait_ready(
    db: &EngineDb,
    cluster: &mut Cluster,
    partitions: u32,
    timeout: Duration,
) -> Result<Duration> {
    let want_owners = cluster.nodes().min(partitions as usize);
    let deadline = Instant::now() + timeout;
    loop {
        cluster.check_running()?;
        let (held, owners) = leased(&db.status().await.context("reading the leases")?);
        if held == partitions as usize && owners == want_owners {
            return Ok(cluster.started().elapsed());
        }
        if Instant::now() >= deadline {
            bail!(
                "engine not ready after {}s: {held}/{partitions} partitions leased by {owners}/{want_owners} nodes",
                timeout.as_secs()
            );
        }
        tokio::time::sleep(READY_POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use outbox_engine::status::PartitionStatus;

    use super::*;

    fn status(parts: &[(Option<&str>, i64)]) -> Status {
        Status {
            partitions: parts
                .iter()
                .enumerate()
                .map(|(i, (owner, pending))| PartitionStatus {
                    partition: i as u32,
                    owner: owner.map(String::from),
                    epoch: 1,
                    lease_expires_in_ms: Some(1_000),
                    pending: *pending,
                    oldest_age_ms: None,
                    published: 0,
                    rate_per_sec: None,
                    mode: Some("poll".into()),
                    cdc_streaming: false,
                })
                .collect(),
            nodes: vec![],
            cdc: None,
        }
    }

    #[test]
    fn leases_are_counted_by_partition_and_by_owner() {
        let s = status(&[(Some("a"), 0), (Some("b"), 0), (None, 0), (Some("a"), 0)]);
        assert_eq!(leased(&s), (3, 2));
        assert_eq!(leased(&status(&[])), (0, 0));
    }

    #[test]
    fn the_backlog_check_allows_for_the_engines_count_cap() {
        let s = status(&[(None, 300), (None, 700)]);
        assert!(check_backlog(&s, 1_000).is_ok());
        let err = check_backlog(&s, 1_001).unwrap_err();
        assert!(
            err.contains("1000 events are pending, expected 1001"),
            "{err}"
        );
        let capped = status(&[(None, BACKLOG_COUNT_CAP), (None, 5)]);
        let at_least = BACKLOG_COUNT_CAP as u64 + 5;
        assert!(check_backlog(&capped, at_least).is_ok());
        assert!(check_backlog(&capped, at_least * 3).is_ok());
        assert!(check_backlog(&capped, at_least - 1)
            .unwrap_err()
            .contains("or more"));
    }
}
