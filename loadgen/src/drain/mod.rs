//! `loadgen drain`: how fast the engine empties a standing backlog.
//!
//! 1. `outbox migrate`; the outbox must be empty and no engine running.
//! 2. Load N events server-side (`insert … select … generate_series`) in
//!    chunks, over a few connections that each own their aggregates, so
//!    each aggregate's `seq` follows position order; then `analyze`.
//! 3. Start the engine nodes; the clock runs from their start until no
//!    event is pending (polled every 200 ms).
//! 4. Stop the nodes, then consume every topic from the beginning and
//!    count: unique, lost, duplicates, order. Counting happens after the
//!    drain so the consumer does not take CPU from the engine on a small
//!    machine, and by consumption because tansu's offsets are unreliable.

pub mod census;
pub mod sql;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use rand::distributions::Alphanumeric;
use rand::Rng;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::{Message, Offset, TopicPartitionList};
use serde::Deserialize;
use sqlx::Connection;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::cli::DrainConfig;
use crate::clock::Clock;
use crate::engine_state::{check_backlog, EngineDb};
use crate::kafka;
use crate::nodes::{Engine, NodeSpec};
use crate::progress::{self, Counters, Labels};
use crate::report::drain::{failed_checks, DrainResults};
use crate::report::{per_sec, Kind, Machine, Meta, Report, VERSION};
use crate::run::new_run;
use crate::verifier::Location;
use crate::writer::{self, sql as wsql, EVENT_TYPE, RUN_HEADER};
use census::Census;

/// Rows per insert statement (per connection).
const CHUNK_ROWS: u64 = 100_000;
/// Bytes of `{"pad": "", "seq": 1234567}` around the padding.
const PAYLOAD_OVERHEAD: usize = 28;
/// How often the drain checks whether the outbox is empty.
const EMPTY_POLL: Duration = Duration::from_millis(200);
/// Verification gives up after this long without a new event.
const VERIFY_IDLE: Duration = Duration::from_secs(20);

pub const LABELS: Labels = Labels {
    committed: "",
    delivered: Some("relayed"),
    p99: false,
};

/// What the drain needs besides its config.
pub struct Options<'a> {
    pub engine: &'a Engine,
    pub engine_args: &'a [String],
    pub log_dir: &'a Path,
}

pub async fn run(
    database_url: &str,
    config: DrainConfig,
    opts: Options<'_>,
    meta: Meta,
) -> Result<Report<DrainConfig, DrainResults>> {
    let (run_id, started_at_unix_ms) = new_run();
    let schema = config.schema.clone();
    opts.engine
        .migrate(database_url, &schema, config.partitions)
        .await?;
    let db = EngineDb::connect(database_url, &schema).await?;
    let postgres_version: String = sqlx::query_scalar(wsql::SERVER_VERSION)
        .fetch_one(db.pool())
        .await?;
    let before = db.status().await?;
    if !before.nodes.is_empty() {
        bail!(
            "{} engine node(s) are running on {schema}; the drain starts its own",
            before.nodes.len()
        );
    }
    if before.total_pending() > 0 {
        bail!("{schema}.outbox is not empty; the drain needs an empty outbox to load its backlog into");
    }
    let kafka_admin = kafka::admin(&config.kafka_brokers)?;
    for t in config.topics() {
        kafka::create_topic(&kafka_admin, &t, config.topic_partitions).await?;
    }

    eprintln!(
        "loadgen: loading {} events into {schema}.outbox over {} connections",
        config.events, config.load_connections
    );
    let load_start = Instant::now();
    load(database_url, &config, &run_id).await?;
    let load_secs = load_start.elapsed().as_secs_f64();
    let analyze_start = Instant::now();
    sqlx::raw_sql(&sql::analyze(&schema))
        .execute(db.pool())
        .await
        .context("analyze")?;
    let analyze_secs = analyze_start.elapsed().as_secs_f64();
    if let Err(e) = check_backlog(&db.status().await?, config.events) {
        bail!("after loading the backlog: {e}");
    }
    eprintln!(
        "loadgen: loaded in {load_secs:.1} s ({:.0} events/s), analyze {analyze_secs:.1} s; starting {} engine node(s)",
        per_sec(config.events, load_secs),
        config.nodes
    );

    let spec = NodeSpec {
        database_url,
        kafka_brokers: &config.kafka_brokers,
        schema: &schema,
        topic_prefix: &config.topic_prefix,
        topic_partitions: config.topic_partitions,
        partitions: config.partitions,
        nodes: config.nodes,
        args: opts.engine_args,
        log_dir: opts.log_dir,
        name: meta.name.as_deref().unwrap_or("drain"),
    };
    let setup = opts.engine.setup(&spec);
    let counters = Arc::new(Counters::default());
    counters.committed.store(config.events, Ordering::Relaxed);
    counters.writing_done.store(true, Ordering::Relaxed);
    let clock = Clock::start();
    let progress_stop = CancellationToken::new();
    let progress = progress::spawn(Arc::clone(&counters), clock, progress_stop.clone(), LABELS);
    let published_before = db.published().await?;
    let mut cluster = opts.engine.start(&spec)?;
    let timeout = Duration::from_secs_f64(config.timeout_secs);
    // The partitions' published counters are one row each to read; the
    // outbox is asked whether anything is pending only once they add up to
    // the backlog (asking that of a half-drained outbox reads the published
    // rows of its open windows: a third of a backend, polled all the drain
    // long). Counters count a resent event twice, so the outbox has the
    // last word.
    let drained = loop {
        let published = db.published().await?;
        let done = ((published - published_before).max(0) as u64).min(config.events);
        counters.delivered.store(done, Ordering::Relaxed);
        if done >= config.events && !db.any_pending().await? {
            break true;
        }
        if let Err(e) = cluster.check_running() {
            progress_stop.cancel();
            return Err(e);
        }
        if cluster.started().elapsed() >= timeout {
            break false;
        }
        tokio::time::sleep(EMPTY_POLL).await;
    };
    let drain_secs = cluster.started().elapsed().as_secs_f64();
    if drained {
        counters.delivered.store(config.events, Ordering::Relaxed);
    }
    progress_stop.cancel();
    let samples = progress.await.unwrap_or_default();
    eprintln!(
        "loadgen: {} in {drain_secs:.2} s ({:.0} events/s); stopping the engine",
        if drained { "drained" } else { "NOT drained" },
        per_sec(config.events, drain_secs)
    );
    let stopped = cluster.stop().await;
    if let Err(e) = &stopped {
        eprintln!("loadgen: {e:#}");
    }
    db.close().await;

    eprintln!("loadgen: consuming the topics to count what arrived");
    let verify_start = Instant::now();
    let census = {
        let brokers = config.kafka_brokers.clone();
        let topics = config.topics();
        let run_id = run_id.clone();
        let (events, aggregates) = (config.events, config.aggregates);
        tokio::task::spawn_blocking(move || {
            consume(&brokers, &topics, &run_id, events, aggregates, timeout)
        })
        .await
        .map_err(|_| anyhow!("the counting thread panicked"))??
    };
    let verify_secs = verify_start.elapsed().as_secs_f64();
    let topics_deleted = if config.keep_topics {
        false
    } else {
        let failed = kafka::delete_topics(&kafka_admin, &config.topics()).await;
        for f in &failed {
            eprintln!("loadgen: could not delete topic {f}");
        }
        failed.is_empty()
    };

    let results = DrainResults {
        events: config.events,
        load_secs,
        load_eps: per_sec(config.events, load_secs),
        analyze_secs,
        drained,
        drain_secs,
        drain_eps: if drained {
            per_sec(config.events, drain_secs)
        } else {
            0.0
        },
        delivered: census.unique,
        lost: config.events - census.unique,
        duplicates: census.duplicates,
        consumer_rereads: census.rereads,
        order_violations: census.order_violations,
        malformed: census.malformed,
        verify_secs,
        engine_stopped_cleanly: stopped.is_ok(),
        topics_deleted,
    };
    let mut report = Report {
        kind: Kind::Drain,
        name: meta.name.unwrap_or_else(|| "drain".into()),
        loadgen_version: VERSION.into(),
        run_id,
        started_at_unix_ms,
        config,
        engine: Some(setup),
        machine: Machine::probe(postgres_version, meta.broker),
        results,
        timeseries: samples,
        failures: Vec::new(),
        histograms: Vec::new(),
    };
    report.failures = failed_checks(&report.results, report.config.timeout_secs);
    Ok(report)
}

/// Loads the backlog: connection `c` of `w` inserts rows `g ≡ c (mod w)`,
/// so with aggregates a multiple of `w` every aggregate is written by one
/// connection, in `g` order.
async fn load(database_url: &str, config: &DrainConfig, run_id: &str) -> Result<()> {
    let pad: String = rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(config.payload_bytes.saturating_sub(PAYLOAD_OVERHEAD))
        .map(char::from)
        .collect();
    let statement = sql::load_chunk(&config.schema);
    let w = config.load_connections as u64;
    let loaded = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    for c in 0..w {
        let mut conn = writer::connect(database_url).await?;
        let (statement, pad, run_id) = (statement.clone(), pad.clone(), run_id.to_string());
        let types = config.aggregate_types.clone();
        let (events, aggregates) = (config.events, config.aggregates as i64);
        let loaded = Arc::clone(&loaded);
        tasks.spawn(async move {
            let mut from = c;
            while from < events {
                let to = (from + (CHUNK_ROWS - 1) * w).min(events - 1);
                let done = sqlx::query(&statement)
                    .bind(&types)
                    .bind(aggregates)
                    .bind(EVENT_TYPE)
                    .bind(&pad)
                    .bind(&run_id)
                    .bind(from as i64)
                    .bind(to as i64)
                    .bind(w as i64)
                    .execute(&mut conn)
                    .await
                    .context("loading the backlog")?;
                loaded.fetch_add(done.rows_affected(), Ordering::Relaxed);
                from += CHUNK_ROWS * w;
            }
            // Closing flushes the connection's statistics, which the
            // drain's progress reads.
            conn.close().await.ok();
            Ok::<_, anyhow::Error>(())
        });
    }
    let start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    tick.tick().await;
    loop {
        tokio::select! {
            joined = tasks.join_next() => match joined {
                None => break,
                Some(r) => r.map_err(anyhow::Error::from).and_then(|r| r)?,
            },
            _ = tick.tick() => {
                let n = loaded.load(Ordering::Relaxed);
                eprintln!(
                    "loadgen: loaded {n}/{} ({:.0} events/s)",
                    config.events,
                    per_sec(n, start.elapsed().as_secs_f64())
                );
            }
        }
    }
    Ok(())
}

#[derive(Deserialize)]
struct Seq {
    seq: u64,
}

/// Reads every partition of `topics` from the beginning until all
/// `events` arrived, nothing new came for [`VERIFY_IDLE`], or `timeout`.
fn consume(
    brokers: &str,
    topics: &[String],
    run_id: &str,
    events: u64,
    aggregates: usize,
    timeout: Duration,
) -> Result<Census> {
    let consumer: BaseConsumer =
        kafka::consumer_config(brokers, &format!("loadgen-drain-{run_id}"))
            .create()
            .context("creating the Kafka consumer")?;
    let mut tpl = TopicPartitionList::new();
    for t in topics {
        for p in 0..kafka::wait_for_topic(&consumer, t)? {
            tpl.add_partition_offset(t, p, Offset::Beginning)
                .with_context(|| format!("assigning {t}/{p}"))?;
        }
    }
    consumer.assign(&tpl).context("assigning partitions")?;
    let mut census = Census::new(events, aggregates);
    let start = Instant::now();
    let (mut last_new, mut last_report) = (Instant::now(), Instant::now());
    let mut last_error: Option<String> = None;
    while !census.complete() {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                let ours = m.headers().is_some_and(|hs| {
                    hs.iter()
                        .any(|h| h.key == RUN_HEADER && h.value == Some(run_id.as_bytes()))
                });
                if !ours {
                    continue;
                }
                let seq = m
                    .payload()
                    .and_then(|p| serde_json::from_slice::<Seq>(p).ok());
                let aggregate = m
                    .key()
                    .and_then(|k| std::str::from_utf8(k).ok())
                    .and_then(|k| k.parse::<usize>().ok());
                let before = census.unique;
                match (seq, aggregate) {
                    (Some(s), Some(a)) => census.on_message(
                        s.seq,
                        a,
                        Location {
                            partition: m.partition(),
                            offset: m.offset(),
                        },
                    ),
                    _ => census.malformed += 1,
                }
                if census.unique > before {
                    last_new = Instant::now();
                }
            }
            Some(Err(e)) => {
                let msg = e.to_string();
                if last_error.as_ref() != Some(&msg) {
                    eprintln!("loadgen: consumer: {msg}");
                    last_error = Some(msg);
                }
            }
            None => {}
        }
        if last_report.elapsed() >= Duration::from_secs(2) {
            eprintln!("loadgen: counted {}/{events}", census.unique);
            last_report = Instant::now();
        }
        if last_new.elapsed() >= VERIFY_IDLE || start.elapsed() >= timeout {
            break;
        }
    }
    Ok(census)
}
