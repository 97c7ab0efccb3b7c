//! Readiness: whether this node currently reaches the database and the
//! broker, refreshed in the background so probes answer at once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgPool;
use tokio_util::sync::CancellationToken;

use crate::ops::metrics::READY;
use crate::sink::Sink;

#[derive(Debug, Default)]
pub struct Readiness {
    database: AtomicBool,
    broker: AtomicBool,
}

impl Readiness {
    pub fn is_ready(&self) -> bool {
        self.database.load(Ordering::Relaxed) && self.broker.load(Ordering::Relaxed)
    }

    pub fn database(&self) -> bool {
        self.database.load(Ordering::Relaxed)
    }

    pub fn broker(&self) -> bool {
        self.broker.load(Ordering::Relaxed)
    }

    pub fn set(&self, database: bool, broker: bool) {
        self.database.store(database, Ordering::Relaxed);
        self.broker.store(broker, Ordering::Relaxed);
        metrics::gauge!(READY).set(if database && broker { 1.0 } else { 0.0 });
    }
}

/// Checks both every `period` until `stop`, each check bounded by `timeout`.
pub async fn watch<K: Sink>(
    readiness: Arc<Readiness>,
    pool: PgPool,
    sink: Arc<K>,
    period: Duration,
    timeout: Duration,
    stop: CancellationToken,
) {
    loop {
        let db = tokio::time::timeout(timeout, sqlx::query("select 1").execute(&pool));
        let broker = tokio::time::timeout(timeout, sink.check());
        let (db, broker) = tokio::join!(db, broker);
        let (db_ok, broker_ok) = (matches!(db, Ok(Ok(_))), matches!(broker, Ok(Ok(()))));
        if db_ok != readiness.database() || broker_ok != readiness.broker() {
            tracing::info!(database = db_ok, broker = broker_ok, "readiness changed");
        }
        readiness.set(db_ok, broker_ok);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
    }
}
