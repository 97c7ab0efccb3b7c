//! The example read model, shared by the example consumer and the
//! benchmark: per aggregate, the number of events applied and the last
//! `seq`, written in one statement per batch.

use std::collections::BTreeMap;
use std::time::Duration;

use outbox_inbox::Handler;
use sqlx::PgConnection;

/// What the read model reads of an event.
pub trait Applicable {
    /// The aggregate id (the message key).
    fn aggregate(&self) -> &str;
    /// The payload's `seq`, if it has one.
    fn seq(&self) -> Option<i64>;
}

#[cfg(feature = "kafka")]
impl Applicable for outbox_inbox::kafka::Event {
    fn aggregate(&self) -> &str {
        self.key.as_deref().unwrap_or("")
    }

    fn seq(&self) -> Option<i64> {
        serde_json::from_slice::<serde_json::Value>(&self.payload)
            .ok()
            .and_then(|v| v.get("seq").and_then(serde_json::Value::as_i64))
    }
}

/// The read model: per aggregate, events applied, the last `seq`, and how
/// often a `seq` arrived that was not above the last (a re-application or
/// a reordering; 0 when every event was applied once, in order).
const CREATE: &str = "create table if not exists read_model (
    aggregate_id text primary key,
    events bigint not null,
    last_seq bigint,
    out_of_order bigint not null default 0
)";

/// Creates the read model once, however many consumers start together:
/// `create table if not exists` alone races (two sessions both see no
/// table and one fails on the catalog's unique index), so the statement
/// runs under a transaction-scoped advisory lock.
pub async fn create(pool: &sqlx::PgPool) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("select pg_advisory_xact_lock(hashtext('outbox_inbox.example.read_model'))")
        .execute(&mut *tx)
        .await?;
    sqlx::query(CREATE).execute(&mut *tx).await?;
    tx.commit().await
}

/// One statement per batch: the batch folded per aggregate in Rust, a
/// first seq not above the stored last one counted as out of order.
const APPLY: &str = "insert into read_model as r (aggregate_id, events, last_seq, out_of_order)
select b.a, b.n, b.hi, b.bad + (m.last_seq is not null and b.lo <= m.last_seq)::int
  from unnest($1::text[], $2::int8[], $3::int8[], $4::int8[], $5::int8[]) as b(a, n, lo, hi, bad)
  left join read_model m on m.aggregate_id = b.a
on conflict (aggregate_id) do update
   set events = r.events + excluded.events,
       last_seq = greatest(r.last_seq, excluded.last_seq),
       out_of_order = r.out_of_order + excluded.out_of_order";

/// Per aggregate of a batch: count, first and last seq, seqs not above
/// their predecessor.
#[derive(Default)]
struct Fold {
    events: i64,
    first: Option<i64>,
    last: Option<i64>,
    out_of_order: i64,
}

pub struct ReadModel {
    apply_delay: Duration,
}

impl ReadModel {
    pub fn new(apply_delay: Duration) -> ReadModel {
        ReadModel { apply_delay }
    }
}

impl<E: Applicable + Sync> Handler<E> for ReadModel {
    type Error = sqlx::Error;

    async fn handle(&mut self, conn: &mut PgConnection, events: &[&E]) -> Result<(), Self::Error> {
        let mut folds: BTreeMap<&str, Fold> = BTreeMap::new();
        for e in events {
            let (key, seq) = (e.aggregate(), e.seq());
            let f = folds.entry(key).or_default();
            f.events += 1;
            if let Some(seq) = seq {
                if f.last.is_some_and(|last| seq <= last) {
                    f.out_of_order += 1;
                }
                f.first.get_or_insert(seq);
                f.last = Some(f.last.map_or(seq, |l| l.max(seq)));
            }
        }
        let keys: Vec<&str> = folds.keys().copied().collect();
        let counts: Vec<i64> = folds.values().map(|f| f.events).collect();
        let firsts: Vec<Option<i64>> = folds.values().map(|f| f.first).collect();
        let lasts: Vec<Option<i64>> = folds.values().map(|f| f.last).collect();
        let bad: Vec<i64> = folds.values().map(|f| f.out_of_order).collect();
        sqlx::query(APPLY)
            .bind(&keys)
            .bind(&counts)
            .bind(&firsts)
            .bind(&lasts)
            .bind(&bad)
            .execute(&mut *conn)
            .await?;
        if !self.apply_delay.is_zero() {
            tokio::time::sleep(self.apply_delay).await;
        }
        Ok(())
    }
}
