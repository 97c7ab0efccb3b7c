//! The load: writer tasks, each on its own connection, each owning a set of
//! aggregates so that an aggregate's events are written (and numbered by
//! `seq`) in one order. Every transaction writes a business row and
//! `events_per_tx` outbox events; after it commits, the writer tells the
//! verifier which events exist and when they were committed.

use std::str::FromStr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection};
use tokio::sync::mpsc::UnboundedSender;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use outbox_engine::config::redact_url;
use outbox_engine::{Enqueuer, NewEvent};

use crate::cli::{Mode, RunConfig};
use crate::clock::Clock;
use crate::engine_state::EngineDb;
use crate::plan::{Aggregates, Payload, Schedule};
use crate::progress::Counters;

pub mod sql;

/// How long connecting to PostgreSQL may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The row header that marks events of one run; the verifier ignores
/// messages without it (other runs, other producers on the same topics).
pub const RUN_HEADER: &str = "loadgen_run";
/// `event_type` of every event.
pub const EVENT_TYPE: &str = "LoadgenEvent";

/// The events of one committed transaction.
#[derive(Debug, Clone)]
pub struct CommitBatch {
    /// When the transaction was due (open loop) or began (closed loop).
    pub intended_us: u64,
    /// Taken right after `commit` returned.
    pub commit_us: u64,
    pub ids: Vec<Uuid>,
}

/// Opens one connection, failing within [`CONNECT_TIMEOUT`] with a
/// message that names the server but not the password.
pub async fn connect(url: &str) -> Result<PgConnection> {
    let shown = redact_url(url);
    let options = PgConnectOptions::from_str(url)
        .map_err(|e| anyhow!("invalid database URL {shown}: {e}"))?
        .application_name("loadgen");
    match tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect_with(&options)).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => bail!("cannot connect to the database at {shown}: {e}"),
        Err(_) => bail!(
            "cannot connect to the database at {shown}: timed out after {}s",
            CONNECT_TIMEOUT.as_secs()
        ),
    }
}

/// Checks the outbox is migrated (through the engine's library), creates
/// the business table, and returns the server's version string.
pub async fn prepare(db: &EngineDb, schema: &str) -> Result<String> {
    db.partitions().await?;
    sqlx::raw_sql(&sql::create_orders(schema))
        .execute(db.pool())
        .await
        .context("creating loadgen_orders")?;
    sqlx::query_scalar(sql::SERVER_VERSION)
        .fetch_one(db.pool())
        .await
        .context("reading the server version")
}

/// What every writer shares.
pub struct Shared {
    pub config: RunConfig,
    pub aggregates: Aggregates,
    pub run_id: String,
    pub clock: Clock,
    pub counters: Arc<Counters>,
    pub stop: CancellationToken,
}

/// What a writer did.
pub struct WriterStats {
    pub transactions: u64,
    /// Begin to commit, microseconds.
    pub tx_latency: Histogram<u64>,
    /// When the last commit returned.
    pub last_commit_us: Option<u64>,
}

/// How a writer puts its events into the outbox, playing the
/// application: through the engine's [`Enqueuer`] (`--mode api`, what a
/// Rust application does), or a plain multi-row `insert into outbox`
/// (`--mode sql`, what an application in any other language does; the
/// engine's library has no such statement to offer, and measuring it is
/// the point of the mode).
enum Insert {
    Api(Enqueuer),
    Sql {
        /// [`sql::insert_events`] for the run's events per transaction.
        statement: String,
        /// `{"loadgen_run": "<id>"}`.
        headers_json: String,
    },
}

/// An event of a transaction: (index of its owned aggregate, id, payload).
type Row = (usize, Uuid, String);

impl Insert {
    /// Writes `rows` into the outbox inside the caller's transaction, in
    /// order, in one statement.
    async fn enqueue(
        &self,
        tx: &mut PgConnection,
        owned: &[Owned],
        rows: &[Row],
        run_id: &str,
    ) -> Result<(), sqlx::Error> {
        match self {
            Insert::Api(enqueuer) => {
                let events: Vec<NewEvent> = rows
                    .iter()
                    .map(|(a, id, payload)| {
                        let agg = &owned[*a];
                        NewEvent::from_json(
                            agg.aggregate_type.as_str(),
                            agg.id.as_str(),
                            EVENT_TYPE,
                            payload.clone(),
                        )
                        .id(*id)
                        .header(RUN_HEADER, run_id)
                    })
                    .collect();
                enqueuer.enqueue(tx, &events).await
            }
            Insert::Sql {
                statement,
                headers_json,
            } => {
                let mut q = sqlx::query(statement);
                for (a, id, payload) in rows {
                    let agg = &owned[*a];
                    q = q
                        .bind(*id)
                        .bind(agg.aggregate_type.as_str())
                        .bind(agg.id.as_str())
                        .bind(EVENT_TYPE)
                        .bind(payload.as_str())
                        .bind(headers_json.as_str());
                }
                q.execute(tx).await.map(|_| ())
            }
        }
    }
}

struct Owned {
    id: String,
    aggregate_type: String,
    last_seq: u64,
}

pub struct Writer {
    index: usize,
    conn: PgConnection,
    shared: Arc<Shared>,
    commits: UnboundedSender<CommitBatch>,
    schedule: Schedule,
    insert: Insert,
    insert_order: String,
    owned: Vec<Owned>,
    payload: Payload,
    rng: StdRng,
}

impl Writer {
    pub fn new(
        index: usize,
        conn: PgConnection,
        shared: Arc<Shared>,
        commits: UnboundedSender<CommitBatch>,
    ) -> Result<Self> {
        let c = &shared.config;
        let insert = match c.mode {
            Mode::Api => Insert::Api(Enqueuer::new(&c.schema)?),
            Mode::Sql => Insert::Sql {
                statement: sql::insert_events(&c.schema, c.events_per_tx),
                headers_json: serde_json::json!({ RUN_HEADER: shared.run_id }).to_string(),
            },
        };
        let a = &shared.aggregates;
        let owned = a
            .owned_by(index, c.writers)
            .map(|i| Owned {
                id: a.id(i),
                aggregate_type: a.types[a.type_index(i)].clone(),
                last_seq: 0,
            })
            .collect::<Vec<_>>();
        if owned.is_empty() {
            bail!("writer {index} owns no aggregates");
        }
        let mut rng = StdRng::from_entropy();
        Ok(Self {
            index,
            conn,
            schedule: Schedule::new(c.rate, c.events_per_tx, c.writers, index, c.duration()),
            insert,
            insert_order: sql::insert_order(&c.schema),
            owned,
            payload: Payload::new(c.payload_bytes, &mut rng),
            rng,
            commits,
            shared,
        })
    }

    /// Writes until the schedule ends or the run is stopped.
    pub async fn run(mut self) -> Result<WriterStats> {
        let clock = self.shared.clock;
        let mut stats = WriterStats {
            transactions: 0,
            tx_latency: Histogram::new_with_bounds(1, 3_600_000_000, 3)?,
            last_commit_us: None,
        };
        for n in 0u64.. {
            let Some(due) = self.schedule.due(n, clock.origin().elapsed()) else {
                break;
            };
            let due_at = clock.origin() + due;
            if due_at > Instant::now() {
                tokio::select! {
                    _ = self.shared.stop.cancelled() => break,
                    _ = tokio::time::sleep_until(due_at.into()) => {}
                }
            }
            if self.shared.stop.is_cancelled() {
                break;
            }
            // Late transactions keep their due time: latency counts from
            // when the event should have been written, not from when a
            // backed-up writer got to it (coordinated omission).
            let intended_us = clock.offset_us(due);
            let began_us = clock.now_us();
            let ids = self
                .transaction(intended_us)
                .await
                .with_context(|| format!("writer {}: transaction failed", self.index))?;
            let commit_us = clock.now_us();
            stats.transactions += 1;
            stats.last_commit_us = Some(commit_us);
            stats
                .tx_latency
                .saturating_record(commit_us.saturating_sub(began_us));
            self.shared
                .counters
                .committed
                .fetch_add(ids.len() as u64, Ordering::Relaxed);
            let batch = CommitBatch {
                intended_us,
                commit_us,
                ids,
            };
            if self.commits.send(batch).is_err() {
                break; // the verifier is gone; the run is over
            }
        }
        self.conn.close().await.ok();
        Ok(stats)
    }

    /// One transaction: a business row and `events_per_tx` events.
    async fn transaction(&mut self, intended_us: u64) -> Result<Vec<Uuid>, sqlx::Error> {
        let k = self.shared.config.events_per_tx;
        let mut rows: Vec<Row> = Vec::with_capacity(k);
        for _ in 0..k {
            let a = self.rng.gen_range(0..self.owned.len());
            let agg = &mut self.owned[a];
            agg.last_seq += 1;
            rows.push((
                a,
                Uuid::now_v7(),
                self.payload.render(agg.last_seq, intended_us),
            ));
        }
        let order_aggregate = &self.owned[rows[0].0].id;
        let amount: i64 = self.rng.gen_range(1..100_000);
        let mut tx = self.conn.begin().await?;
        sqlx::query(&self.insert_order)
            .bind(Uuid::now_v7())
            .bind(order_aggregate)
            .bind(amount)
            .execute(&mut *tx)
            .await?;
        self.insert
            .enqueue(&mut tx, &self.owned, &rows, &self.shared.run_id)
            .await?;
        tx.commit().await?;
        Ok(rows.into_iter().map(|(_, id, _)| id).collect())
    }
}
