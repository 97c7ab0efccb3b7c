//! An example consumer: reads the engine's events from Kafka and keeps a
//! small read model in PostgreSQL, one row per aggregate with the number
//! of events applied and the last `seq` seen, through the inbox. Each
//! batch is one transaction (inbox claim + read model upsert); Kafka
//! offsets are committed only after it. Kill it at any moment: the read
//! model never counts an event twice.
//!
//! ```sh
//! eval "$(deploy/services.sh up)"
//! INBOX_TOPIC=outbox.event.order cargo run -p outbox-inbox --features kafka --example read_model
//! psql "$DATABASE_URL" -c 'select * from read_model order by aggregate_id limit 5'
//! ```
//!
//! Settings (environment): `DATABASE_URL`, `KAFKA_BROKERS` (default
//! 127.0.0.1:9092), `INBOX_TOPIC` (required), `INBOX_PARTITIONS` (count,
//! default 4: partitions 0..n are assigned), `INBOX_GROUP` (default
//! `read-model`), `INBOX_SCHEMA` (default `public`), `INBOX_BATCH` (most
//! messages per transaction, default 500), `INBOX_APPLY_DELAY_MS` (sleep
//! inside each transaction, to widen the window a crash hits; default 0),
//! `INBOX_BYPASS=1` (apply every message without the inbox: what the
//! inbox prevents, for tests).

#[path = "shared/read_model.rs"]
mod read_model;

use std::error::Error;
use std::process::ExitCode;
use std::time::Duration;

use outbox_inbox::kafka::{self, BatchOptions, Event};
use outbox_inbox::{Handler, Inbox, InboxConfig};
use rdkafka::consumer::{CommitMode, StreamConsumer};
use rdkafka::ClientConfig;
use read_model::ReadModel;
use sqlx::postgres::PgPoolOptions;

fn env(name: &str, default: Option<&str>) -> Result<String, String> {
    match (std::env::var(name), default) {
        (Ok(v), _) => Ok(v),
        (Err(_), Some(d)) => Ok(d.to_string()),
        (Err(_), None) => Err(format!("{name} is not set")),
    }
}

fn number<T: std::str::FromStr>(name: &str, default: &str) -> Result<T, String> {
    let v = env(name, Some(default))?;
    v.parse()
        .map_err(|_| format!("{name}: {v:?} is not a number"))
}

async fn run() -> Result<(), Box<dyn Error>> {
    // Registered first, so a SIGINT during start-up still stops cleanly.
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let database_url = env("DATABASE_URL", None)?;
    let brokers = env("KAFKA_BROKERS", Some("127.0.0.1:9092"))?;
    let topic = env("INBOX_TOPIC", None)?;
    let group = env("INBOX_GROUP", Some("read-model"))?;
    let schema = env("INBOX_SCHEMA", Some("public"))?;
    let partitions: i32 = number("INBOX_PARTITIONS", "4")?;
    let batch: usize = number("INBOX_BATCH", "500")?;
    let delay_ms: u64 = number("INBOX_APPLY_DELAY_MS", "0")?;
    let bypass = env("INBOX_BYPASS", Some("0"))? == "1";

    let pool = PgPoolOptions::new()
        .max_connections(2)
        .connect(&database_url)
        .await?;
    let config = InboxConfig::schema(&schema);
    outbox_inbox::migrate(&mut *pool.acquire().await?, &config).await?;
    read_model::create(&pool).await?;
    let inbox = Inbox::new(&schema, &group)?;

    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", &group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        .set("fetch.wait.max.ms", "50")
        .create()?;
    let all: Vec<i32> = (0..partitions).collect();
    let mut reader = kafka::Reader::assign(consumer, &topic, &all, Duration::from_secs(10))?;

    // Retention: hourly; a run that fails is retried the next hour.
    let upkeep = {
        let (pool, config) = (pool.clone(), config.clone());
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(3600));
            loop {
                every.tick().await;
                if let Ok(mut conn) = pool.acquire().await {
                    if let Err(e) = outbox_inbox::maintain(&mut conn, &config).await {
                        tracing::warn!(error = %e, "inbox retention");
                    }
                }
            }
        })
    };

    let mut model = ReadModel::new(Duration::from_millis(delay_ms));
    let opts = BatchOptions {
        max_messages: batch,
        ..BatchOptions::default()
    };
    let shutdown = async move {
        let _ = interrupt.recv().await;
    };
    if bypass {
        bypass_loop(&mut reader, &pool, &mut model, opts, shutdown).await?;
    } else {
        let done = kafka::run(&mut reader, &pool, &inbox, &mut model, opts, shutdown).await?;
        eprintln!(
            "read_model: applied {} duplicates {} stale {} rewinds {}",
            done.applied, done.duplicates, done.stale, reader.rewinds
        );
    }
    upkeep.abort();
    Ok(())
}

/// The same consumer without the inbox: every delivered message is
/// applied, duplicates included.
async fn bypass_loop(
    reader: &mut kafka::Reader,
    pool: &sqlx::PgPool,
    model: &mut ReadModel,
    opts: BatchOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), Box<dyn Error>> {
    tokio::pin!(shutdown);
    loop {
        let batch = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            b = reader.next_batch(opts) => b?,
        };
        let mut tx = pool.begin().await?;
        let all: Vec<&Event> = batch.events.iter().collect();
        model.handle(&mut tx, &all).await?;
        tx.commit().await?;
        reader.commit(&batch.offsets, CommitMode::Async)?;
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("read_model: {e}");
            ExitCode::FAILURE
        }
    }
}
