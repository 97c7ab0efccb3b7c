//! `loadgen drain`: how fast the engine empties a standing backlog.
//!
//! 1. `outbox migrate`; the outbox must be empty and no engine running.
//! 2. Load N events server-side (`insert … select … generate_series`) in
//!    chunks, over a few connections that each own their aggregates, so
//!    each aggregate's `seq` follows position order; then `analyze`.
//! 3. Start the engine nodes; the clock runs from their start until
//!    `select exists(select 1 from outbox)` (polled every 200 ms) is false.
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
use serde::{Deserialize, Serialize};
use sqlx::Connection;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::cli::DrainConfig;
use crate::clock::Clock;
use crate::kafka;
use crate::nodes::{Engine, NodeSpec};
use crate::plot::charts;
use crate::progress::{self, Counters, Labels};
use crate::report::{per_sec, table, Finished, Machine, Meta, Report};
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

#[derive(Debug, Serialize)]
pub struct DrainResults {
    pub events: u64,
    /// Loading the backlog (no engine running).
    pub load_secs: f64,
    pub load_eps: f64,
    pub analyze_secs: f64,
    /// The outbox was empty before the timeout.
    pub drained: bool,
    /// From starting the engine nodes to an empty outbox.
    pub drain_secs: f64,
    /// `events / drain_secs`.
    pub drain_eps: f64,
    /// Unique events consumed afterwards.
    pub delivered: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub consumer_rereads: u64,
    pub order_violations: u64,
    pub malformed: u64,
    /// Consuming the topics afterwards.
    pub verify_secs: f64,
    /// The nodes stopped cleanly on SIGTERM.
    pub engine_stopped_cleanly: bool,
    pub topics_deleted: bool,
}

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
) -> Result<(Report<DrainConfig, DrainResults>, Finished)> {
    let (run_id, started_at_unix_ms) = new_run();
    let schema = config.schema.clone();
    opts.engine
        .migrate(database_url, &schema, config.partitions)
        .await?;
    let mut admin = writer::connect(database_url).await?;
    let postgres_version: String = sqlx::query_scalar(wsql::SERVER_VERSION)
        .fetch_one(&mut admin)
        .await?;
    let live: i64 = sqlx::query_scalar(&wsql::live_nodes(&schema))
        .fetch_one(&mut admin)
        .await?;
    if live > 0 {
        bail!("{live} engine node(s) are running on {schema}; the drain starts its own");
    }
    let pending: bool = sqlx::query_scalar(&wsql::outbox_not_empty(&schema))
        .fetch_one(&mut admin)
        .await?;
    if pending {
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
        .execute(&mut admin)
        .await
        .context("analyze")?;
    let analyze_secs = analyze_start.elapsed().as_secs_f64();
    let loaded: i64 = sqlx::query_scalar(&sql::count(&schema))
        .fetch_one(&mut admin)
        .await?;
    if loaded != config.events as i64 {
        bail!("loaded {loaded} rows, expected {}", config.events);
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
    let mut cluster = opts.engine.start(&spec)?;
    let timeout = Duration::from_secs_f64(config.timeout_secs);
    let mut polls = 0u64;
    let drained = loop {
        let pending: bool = sqlx::query_scalar(&wsql::outbox_not_empty(&schema))
            .fetch_one(&mut admin)
            .await?;
        if !pending {
            break true;
        }
        if let Err(e) = cluster.check_running() {
            progress_stop.cancel();
            return Err(e);
        }
        if cluster.started().elapsed() >= timeout {
            break false;
        }
        polls += 1;
        if polls % 5 == 0 {
            let live: i64 = sqlx::query_scalar(sql::LIVE_ROWS)
                .bind(&schema)
                .fetch_one(&mut admin)
                .await?;
            let left = (live.max(0) as u64).min(config.events);
            counters
                .delivered
                .store(config.events - left, Ordering::Relaxed);
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
    admin.close().await.ok();

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
    let report = Report {
        kind: "drain",
        name: meta.name.unwrap_or_else(|| "drain".into()),
        loadgen_version: env!("CARGO_PKG_VERSION"),
        run_id,
        started_at_unix_ms,
        config,
        engine: Some(setup),
        machine: Machine::probe(postgres_version, meta.broker),
        results,
        timeseries: samples,
    };
    let mut finished = Finished::new(&report, markdown(&report))?;
    finished.failures = failures(&report.results, report.config.timeout_secs);
    let title = |what: &str| format!("{what}: {}", report.name);
    finished.chart(
        "throughput",
        &charts::throughput(
            &title("drain rate"),
            &report.timeseries,
            None,
            Some("relayed/s (estimate)"),
        ),
    );
    finished.chart(
        "lag",
        &charts::lag(
            &title("backlog left in the outbox"),
            &report.timeseries,
            "events left (estimate)",
        ),
    );
    Ok((report, finished))
}

fn failures(r: &DrainResults, timeout_secs: f64) -> Vec<String> {
    let mut out = Vec::new();
    if !r.drained {
        out.push(format!("the outbox was not empty after {timeout_secs} s"));
    }
    if r.lost > 0 {
        out.push(format!(
            "{} of {} events were not received",
            r.lost, r.events
        ));
    }
    if r.order_violations > 0 {
        out.push(format!(
            "{} events arrived out of order for their aggregate",
            r.order_violations
        ));
    }
    out
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

fn markdown(report: &Report<DrainConfig, DrainResults>) -> String {
    let c = &report.config;
    let r = &report.results;
    let mut s = format!("# loadgen drain `{}` ({})\n\n", report.name, report.run_id);
    s.push_str(&format!(
        "A backlog of {} events (~{} B payloads, {} aggregates) loaded with no engine running, \
         then {} engine node(s) on {} outbox partitions started from a standing start.\n\n",
        c.events, c.payload_bytes, c.aggregates, c.nodes, c.partitions
    ));
    let rows = [
        ("events", r.events.to_string()),
        (
            "drain: engine start → outbox empty (s)",
            format!("{:.2}", r.drain_secs),
        ),
        ("drain rate (events/s)", format!("{:.0}", r.drain_eps)),
        ("drained before the timeout", r.drained.to_string()),
        (
            "delivered (unique, counted by consuming)",
            r.delivered.to_string(),
        ),
        ("lost", r.lost.to_string()),
        ("duplicates", r.duplicates.to_string()),
        ("consumer re-reads", r.consumer_rereads.to_string()),
        ("order violations", r.order_violations.to_string()),
        ("malformed", r.malformed.to_string()),
        (
            "load (s, events/s)",
            format!("{:.1}, {:.0}", r.load_secs, r.load_eps),
        ),
        ("analyze (s)", format!("{:.1}", r.analyze_secs)),
        ("counting by consuming (s)", format!("{:.1}", r.verify_secs)),
        (
            "engine stopped cleanly",
            r.engine_stopped_cleanly.to_string(),
        ),
    ];
    s.push_str(&table(&rows));
    s.push_str(
        "\nThe charts' rates come from `pg_stat_user_tables.n_live_tup`, an estimate that lags \
         up to a second; the drain time is exact (polled every 200 ms).\n\n\
         ![drain rate](throughput.svg)\n![backlog](lag.svg)\n",
    );
    s.push_str(&format!("\nMachine: {}\n", report.machine.line()));
    s
}
