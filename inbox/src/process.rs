//! Running a consumer's handler through the inbox: begin, claim, apply
//! what is new, commit. The handler writes through the same connection,
//! so its effects and the inbox record are one transaction.

use std::future::Future;

use sqlx::{PgConnection, PgPool};
use tracing::debug;

use crate::claim::{Claim, Inbox, InboxEvent, Verdict};
use crate::error::ProcessError;

/// What a consumer does with the new messages of a batch, inside the
/// inbox's transaction. It sees each event once per consumer group: a
/// batch whose transaction rolls back (an error, a crash) is offered
/// again, with nothing of it recorded.
pub trait Handler<M> {
    type Error: std::error::Error + Send + Sync + 'static;

    /// Applies `events` (the batch's new ones, in order) through `conn`,
    /// which is inside the transaction: do not commit it.
    fn handle(
        &mut self,
        conn: &mut PgConnection,
        events: &[&M],
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;
}

/// What one batch came to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Processed {
    pub applied: usize,
    pub duplicates: usize,
    pub stale: usize,
}

impl Processed {
    fn of(claim: &Claim) -> Processed {
        Processed {
            applied: claim.count(Verdict::Apply),
            duplicates: claim.count(Verdict::Duplicate),
            stale: claim.count(Verdict::Stale),
        }
    }

    pub fn add(&mut self, other: Processed) {
        self.applied += other.applied;
        self.duplicates += other.duplicates;
        self.stale += other.stale;
    }
}

impl Inbox {
    /// Processes a batch in one transaction on a connection of `pool`:
    /// claim (one round trip), the handler for the new messages, commit.
    /// When this returns `Ok`, the batch is durable and its Kafka offsets
    /// may be committed; on `Err` nothing of it was recorded.
    pub async fn process<M, H>(
        &self,
        pool: &PgPool,
        batch: &[M],
        handler: &mut H,
    ) -> Result<Processed, ProcessError<H::Error>>
    where
        M: InboxEvent + Sync,
        H: Handler<M>,
    {
        let mut tx = pool.begin().await?;
        let claim = self.claim(&mut tx, batch).await?;
        let apply = claim.to_apply(batch);
        if !apply.is_empty() {
            handler
                .handle(&mut tx, &apply)
                .await
                .map_err(ProcessError::Handler)?;
        }
        tx.commit().await?;
        let done = Processed::of(&claim);
        debug!(
            group = self.group(),
            applied = done.applied,
            duplicates = done.duplicates,
            stale = done.stale,
            "inbox batch"
        );
        Ok(done)
    }
}
