//! Writers that keep committing events into an outbox while a test breaks
//! things: `per_tx` events per transaction, one per aggregate, each
//! aggregate's payload `seq` increasing, so that a consumer can check order
//! per aggregate ([`crate::ordering`]).

use std::time::Duration;

use sqlx::postgres::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::db::TestDb;

/// Writes `per_tx` events per transaction, one per aggregate `a0..`, each
/// aggregate's `seq` increasing, until `stop` is cancelled. Returns the ids.
pub fn spawn_writer(db: &TestDb, per_tx: usize, stop: CancellationToken) -> JoinHandle<Vec<Uuid>> {
    // A short pause leaves the CPU to the nodes under test.
    spawn_paced_writer(db, per_tx, Duration::from_millis(2), stop)
}

/// Like [`spawn_writer`], pausing `pause` between transactions (lighter
/// load for tests that also run brokers and several nodes on two cores).
pub fn spawn_paced_writer(
    db: &TestDb,
    per_tx: usize,
    pause: Duration,
    stop: CancellationToken,
) -> JoinHandle<Vec<Uuid>> {
    let load = Load {
        pause,
        ..Load::new(per_tx)
    };
    let pool = db.pool.clone();
    tokio::spawn(async move { write_load(pool, load, stop).await.committed })
}

/// What a writer does: `per_tx` events per transaction, one per aggregate
/// `<key>0..<key>{per_tx-1}`, each aggregate's `seq` increasing, `pause`
/// between transactions.
#[derive(Debug, Clone)]
pub struct Load {
    /// The prefix of the aggregate ids.
    pub key: String,
    /// Events (aggregates) per transaction.
    pub per_tx: usize,
    /// The pause between transactions.
    pub pause: Duration,
    /// Whether a failed transaction is counted and retried (for tests
    /// that take the database away) rather than a panic.
    pub retry: bool,
}

impl Load {
    /// Aggregates `a0..`, no pause, a failed transaction panics.
    pub fn new(per_tx: usize) -> Load {
        Load {
            key: "a".into(),
            per_tx,
            pause: Duration::ZERO,
            retry: false,
        }
    }

    /// Aggregates `<key>0..`, `pause` between transactions, failed
    /// transactions retried: the load of the fault tests.
    pub fn retrying(key: &str, per_tx: usize, pause: Duration) -> Load {
        Load {
            key: key.into(),
            per_tx,
            pause,
            retry: true,
        }
    }
}

/// What a writer committed: ids in commit order, and transactions that
/// failed (not counted; their fate is unknown to the writer).
#[derive(Debug, Default)]
pub struct Written {
    /// Ids of the committed events, in commit order.
    pub committed: Vec<Uuid>,
    /// Transactions that failed.
    pub failed_tx: u64,
}

/// Writes `load` into the outbox of `pool` until `stop` is cancelled.
pub fn spawn_load(pool: PgPool, load: Load, stop: CancellationToken) -> JoinHandle<Written> {
    tokio::spawn(write_load(pool, load, stop))
}

async fn write_load(pool: PgPool, load: Load, stop: CancellationToken) -> Written {
    let outbox = outbox_engine::Enqueuer::new("public").expect("enqueuer");
    let mut written = Written::default();
    let mut seq = 0i64;
    while !stop.is_cancelled() {
        let events: Vec<_> = (0..load.per_tx)
            .map(|a| {
                outbox_engine::NewEvent::new(
                    "order",
                    format!("{}{a}", load.key),
                    "Tick",
                    &serde_json::json!({"seq": seq}),
                )
                .expect("event")
            })
            .collect();
        seq += 1;
        if load.retry {
            let tx = async {
                let mut tx = pool.begin().await?;
                outbox.enqueue(&mut tx, &events).await?;
                tx.commit().await?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
            };
            if let Ok(Ok(())) = tokio::time::timeout(Duration::from_secs(10), tx).await {
                written.committed.extend(events.iter().map(|e| e.id));
            } else {
                written.failed_tx += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        } else {
            let mut tx = pool.begin().await.expect("begin");
            outbox.enqueue(&mut tx, &events).await.expect("enqueue");
            tx.commit().await.expect("commit");
            written.committed.extend(events.iter().map(|e| e.id));
        }
        if !load.pause.is_zero() {
            tokio::time::sleep(load.pause).await;
        }
    }
    written
}
