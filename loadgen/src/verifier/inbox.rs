//! `run --inbox`: the verifier also consumes through the consumer inbox
//! (`outbox-inbox`), as a service would. Each poll's messages of the run
//! are claimed in one transaction for the run's own consumer group; the
//! report counts the copies delivered beyond the first and the events the
//! inbox let through more than once (which must be none).

use ahash::AHashSet;
use anyhow::{Context, Result};
use outbox_inbox::{Inbox, InboxConfig, InboxEvent, Verdict};
use sqlx::postgres::{PgPool, PgPoolOptions};
use tokio::runtime::Handle;
use uuid::Uuid;

/// A message as the inbox sees it.
struct Claimed {
    id: Uuid,
    at_ms: Option<i64>,
}

impl InboxEvent for Claimed {
    fn event_id(&self) -> Uuid {
        self.id
    }
    fn event_time_ms(&self) -> Option<i64> {
        self.at_ms
    }
}

/// What the inbox did over the run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InboxCounts {
    /// Claimed as new (the consumer would have applied them).
    pub applied: u64,
    /// Claimed as already processed, skipped.
    pub skipped: u64,
    /// Ids the inbox called new a second time.
    pub applied_twice: u64,
}

/// The inbox side of the verifier: batches claims per poll.
pub struct InboxCheck {
    runtime: Handle,
    pool: PgPool,
    inbox: Inbox,
    pending: Vec<Claimed>,
    applied: AHashSet<Uuid>,
    pub counts: InboxCounts,
}

impl InboxCheck {
    /// Migrates the inbox in `schema` and uses consumer group `group`.
    pub async fn connect(database_url: &str, schema: &str, group: &str) -> Result<Self> {
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .connect(database_url)
            .await
            .context("connecting the inbox to PostgreSQL")?;
        let mut conn = pool.acquire().await?;
        outbox_inbox::migrate(&mut conn, &InboxConfig::schema(schema))
            .await
            .context("migrating the inbox")?;
        drop(conn);
        Ok(Self {
            runtime: Handle::current(),
            pool,
            inbox: Inbox::new(schema, group)?,
            pending: Vec::new(),
            applied: AHashSet::new(),
            counts: InboxCounts::default(),
        })
    }

    pub fn push(&mut self, id: Uuid, at_ms: Option<i64>) {
        self.pending.push(Claimed { id, at_ms });
    }

    /// Claims what was pushed, in one transaction; called from the
    /// verifier's own thread (not a runtime worker).
    pub fn flush(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let batch = std::mem::take(&mut self.pending);
        let (pool, inbox) = (&self.pool, &self.inbox);
        let claim = self.runtime.block_on(async {
            let mut tx = pool.begin().await?;
            let claim = inbox.claim(&mut tx, &batch).await?;
            tx.commit().await?;
            Ok::<_, anyhow::Error>(claim)
        })?;
        for (m, v) in batch.iter().zip(&claim.verdicts) {
            match v {
                Verdict::Apply => {
                    self.counts.applied += 1;
                    if !self.applied.insert(m.id) {
                        self.counts.applied_twice += 1;
                    }
                }
                Verdict::Duplicate | Verdict::Stale => self.counts.skipped += 1,
            }
        }
        Ok(())
    }
}
