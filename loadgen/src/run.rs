//! The runs that write transactions. `e2e` (`loadgen run`): prepare
//! database and topics, start the verifier, write for the duration, drain,
//! report. `write_only`: the same writers without a consumer, either with
//! no engine at all (`loadgen db-ceiling`) or with an engine relaying
//! (`loadgen run --no-verify`, the application-overhead measurement).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use hdrhistogram::Histogram;
use sqlx::PgConnection;
use tokio::sync::mpsc::UnboundedSender;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::cli::RunConfig;
use crate::clock::Clock;
use crate::engine_state::EngineDb;
use crate::plan::Aggregates;
use crate::progress::{self, Counters};
use crate::report::e2e::{BrokerLatency, InboxResults, Results, WriteResults};
use crate::report::histogram as h;
use crate::report::{per_sec, Kind, Latency, Machine, Meta, Report, VERSION};
use crate::timeseries::lag_summary;
use crate::verifier::{tally, InboxCheck, Outcome, Verifier};
use crate::writer::{self, CommitBatch, Shared, Writer, WriterStats};

/// A new run id (time-ordered) and the wall-clock start.
pub fn new_run() -> (String, u64) {
    let started = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    (Uuid::now_v7().simple().to_string(), started)
}

/// Writer connections, opened before the clock starts.
async fn open_writers(url: &str, n: usize) -> Result<Vec<PgConnection>> {
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        conns.push(writer::connect(url).await?);
    }
    Ok(conns)
}

/// Starts one writer task per connection.
fn start_writers(
    conns: Vec<PgConnection>,
    config: &RunConfig,
    run_id: &str,
    clock: Clock,
    counters: &Arc<Counters>,
    stop: &CancellationToken,
    commits: UnboundedSender<CommitBatch>,
) -> Result<JoinSet<Result<WriterStats>>> {
    let shared = Arc::new(Shared {
        aggregates: Aggregates {
            count: config.aggregates,
            types: config.aggregate_types.clone(),
        },
        config: config.clone(),
        run_id: run_id.to_string(),
        clock,
        counters: Arc::clone(counters),
        stop: stop.clone(),
    });
    let mut writers = JoinSet::new();
    for (i, conn) in conns.into_iter().enumerate() {
        let w = Writer::new(i, conn, Arc::clone(&shared), commits.clone())?;
        writers.spawn(w.run());
    }
    Ok(writers)
}

/// What the writers did together.
struct Written {
    tx_latency: Histogram<u64>,
    transactions: u64,
    last_commit_us: Option<u64>,
    failure: Option<anyhow::Error>,
}

/// Waits for every writer; the first failure stops the others.
async fn join_writers(
    mut writers: JoinSet<Result<WriterStats>>,
    stop: &CancellationToken,
) -> Result<Written> {
    let mut w = Written {
        tx_latency: tally::latency_histogram()?,
        transactions: 0,
        last_commit_us: None,
        failure: None,
    };
    while let Some(joined) = writers.join_next().await {
        match joined.map_err(anyhow::Error::from).and_then(|r| r) {
            Ok(stats) => {
                w.tx_latency.add(&stats.tx_latency)?;
                w.transactions += stats.transactions;
                w.last_commit_us = w.last_commit_us.max(stats.last_commit_us);
            }
            Err(e) => {
                stop.cancel();
                w.failure.get_or_insert(e);
            }
        }
    }
    Ok(w)
}

/// Runs the load described by `config` and verifies it end to end.
pub async fn e2e(
    database_url: &str,
    config: RunConfig,
    meta: Meta,
) -> Result<Report<RunConfig, Results>> {
    let (run_id, started_at_unix_ms) = new_run();
    let db = EngineDb::connect(database_url, &config.schema).await?;
    let postgres_version = writer::prepare(&db, &config.schema).await?;
    let conns = open_writers(database_url, config.writers).await?;
    let mut verifier = Verifier::connect(&config, &run_id).await?;
    if config.inbox {
        let group = format!("loadgen-{run_id}");
        verifier.inbox = Some(InboxCheck::connect(database_url, &config.schema, &group).await?);
        eprintln!("loadgen: consuming through the inbox (group {group})");
    }
    for t in &verifier.topics {
        eprintln!(
            "loadgen: {} ({} partitions, {})",
            t.topic,
            t.partitions,
            if t.created {
                "created, reading from the beginning"
            } else {
                "existing, reading from the end"
            }
        );
    }

    let clock = Clock::start();
    let counters = Arc::new(Counters::default());
    let stop = CancellationToken::new();
    let abort = Arc::new(AtomicBool::new(false));
    let (commits_tx, commits_rx) = tokio::sync::mpsc::unbounded_channel();
    let verifier = verifier.spawn(
        commits_rx,
        clock,
        Arc::clone(&counters),
        config.drain_timeout(),
        Arc::clone(&abort),
    )?;
    // Apart from `stop`: progress goes on while draining after a Ctrl-C.
    let progress_stop = CancellationToken::new();
    let progress = progress::spawn(
        Arc::clone(&counters),
        clock,
        progress_stop.clone(),
        progress::E2E,
    );
    let interrupt = tokio::spawn(on_interrupt(stop.clone(), Arc::clone(&abort)));

    let writers = start_writers(conns, &config, &run_id, clock, &counters, &stop, commits_tx)?;
    let written = join_writers(writers, &stop).await?;
    counters.writing_done.store(true, Ordering::Relaxed);
    if written.failure.is_some() {
        abort.store(true, Ordering::Relaxed);
    }
    let outcome = tokio::task::spawn_blocking(move || verifier.join())
        .await?
        .map_err(|_| anyhow!("the verifier thread panicked"))?;
    progress_stop.cancel();
    let samples = progress.await.unwrap_or_default();
    interrupt.abort();
    if let Some(e) = written.failure {
        return Err(e);
    }
    let outcome = outcome.context("verifier")?;
    eprintln!(
        "loadgen: {}",
        if outcome.complete {
            "every committed event arrived"
        } else {
            "drain stopped before every committed event arrived"
        }
    );
    db.close().await;

    let mut results = results(&outcome, clock, &written.tx_latency);
    results.lag = lag_summary(&samples, results.commit_rate_eps);
    let mut report = Report {
        kind: Kind::E2e,
        name: meta.name.unwrap_or_else(|| "e2e".into()),
        loadgen_version: VERSION.into(),
        run_id,
        started_at_unix_ms,
        config,
        engine: meta.engine,
        machine: Machine::probe(postgres_version, meta.broker),
        results,
        timeseries: samples,
        failures: Vec::new(),
        histograms: Vec::new(),
    };
    report.failures = report.failed_checks();
    let t = &outcome.tally;
    report.record(h::COMMIT_TO_RECEIVE, &t.latency)?;
    if !t.latency_to_append.is_empty() {
        report.record(h::COMMIT_TO_APPEND, &t.latency_to_append)?;
    }
    report.record(h::INTENDED_TO_RECEIVE, &t.latency_from_intended)?;
    report.record(h::TRANSACTION, &written.tx_latency)?;
    Ok(report)
}

fn results(outcome: &Outcome, clock: Clock, tx_latency: &Histogram<u64>) -> Results {
    let t = &outcome.tally;
    let secs = |from: Option<u64>, to: Option<u64>| match (from, to) {
        (Some(a), Some(b)) => b.saturating_sub(a) as f64 / 1e6,
        _ => 0.0,
    };
    let write_secs = secs(Some(clock.origin_us()), t.last_commit_us);
    let delivery_secs = secs(t.first_commit_us, t.last_delivery_us);
    let latency_ms = Latency::from_us(&t.latency);
    Results {
        committed: t.committed,
        transactions: t.transactions,
        delivered: t.delivered(),
        lost: t.missing(),
        duplicates: t.duplicates,
        consumer_rereads: t.rereads,
        duplicate_samples: t.duplicate_samples.clone(),
        order_violations: t.order_violations,
        unexpected: t.unexpected(),
        malformed: t.malformed,
        drain_complete: outcome.complete,
        write_secs,
        delivery_secs,
        drain_secs: secs(t.last_commit_us, Some(outcome.finished_us)),
        throughput_eps: per_sec(t.delivered(), delivery_secs),
        commit_rate_eps: per_sec(t.committed, write_secs),
        broker_latency: BrokerLatency::choose(
            t.timestamp_types,
            Latency::from_us(&t.latency_to_append),
            &latency_ms,
        ),
        latency_ms,
        latency_from_intended_ms: Latency::from_us(&t.latency_from_intended),
        tx_latency_ms: Latency::from_us(tx_latency),
        timestamp_types: t.timestamp_types,
        lag: None,
        inbox: outcome.inbox.map(|c| InboxResults {
            duplicates_delivered: t.duplicates + t.rereads,
            applied_twice: c.applied_twice,
            applied: c.applied,
            skipped: c.skipped,
        }),
    }
}

/// Which write-only measurement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOnly {
    /// No engine may run: the database's own commit rate.
    DbCeiling,
    /// An engine relays meanwhile; afterwards wait (up to the drain
    /// timeout) for the outbox to empty, to show it kept up.
    WithEngine,
}

/// The writers alone, no consumer.
pub async fn write_only(
    database_url: &str,
    config: RunConfig,
    meta: Meta,
    which: WriteOnly,
) -> Result<Report<RunConfig, WriteResults>> {
    let (run_id, started_at_unix_ms) = new_run();
    let db = EngineDb::connect(database_url, &config.schema).await?;
    let postgres_version = writer::prepare(&db, &config.schema).await?;
    if which == WriteOnly::DbCeiling {
        let live = db
            .live_nodes()
            .await
            .context("looking for live engine nodes")?;
        if live > 0 {
            bail!(
                "{live} engine node(s) heartbeat on {}.outbox_nodes; the db ceiling is measured with no engine running",
                config.schema
            );
        }
    }
    let conns = open_writers(database_url, config.writers).await?;

    let clock = Clock::start();
    let counters = Arc::new(Counters::default());
    let stop = CancellationToken::new();
    let (commits_tx, mut commits_rx) = tokio::sync::mpsc::unbounded_channel::<CommitBatch>();
    // The writers report commits as in an e2e run, so both do the same
    // work; nobody needs them here.
    let sink = tokio::spawn(async move { while commits_rx.recv().await.is_some() {} });
    let progress_stop = CancellationToken::new();
    let progress = progress::spawn(
        Arc::clone(&counters),
        clock,
        progress_stop.clone(),
        progress::WRITE_ONLY,
    );
    let abort = Arc::new(AtomicBool::new(false));
    let interrupt = tokio::spawn(on_interrupt(stop.clone(), Arc::clone(&abort)));
    let writers = start_writers(conns, &config, &run_id, clock, &counters, &stop, commits_tx)?;
    let written = join_writers(writers, &stop).await?;
    counters.writing_done.store(true, Ordering::Relaxed);
    let _ = sink.await;
    if let Some(e) = written.failure {
        progress_stop.cancel();
        return Err(e);
    }
    let outbox_empty_after_secs = match which {
        WriteOnly::DbCeiling => None,
        WriteOnly::WithEngine => wait_for_empty_outbox(&db, config.drain_timeout(), &abort).await?,
    };
    progress_stop.cancel();
    let samples = progress.await.unwrap_or_default();
    interrupt.abort();
    db.close().await;

    let committed = counters.committed.load(Ordering::Relaxed);
    let write_secs = written
        .last_commit_us
        .map_or(0.0, |t| t.saturating_sub(clock.origin_us()) as f64 / 1e6);
    let kind = match which {
        WriteOnly::DbCeiling => Kind::DbCeiling,
        WriteOnly::WithEngine => Kind::E2eUnverified,
    };
    let mut report = Report {
        kind,
        name: meta.name.unwrap_or_else(|| kind.to_string()),
        loadgen_version: VERSION.into(),
        run_id,
        started_at_unix_ms,
        config,
        engine: meta.engine,
        machine: Machine::probe(postgres_version, meta.broker),
        results: WriteResults {
            committed,
            transactions: written.transactions,
            write_secs,
            commit_rate_eps: per_sec(committed, write_secs),
            tx_latency_ms: Latency::from_us(&written.tx_latency),
            outbox_empty_after_secs,
        },
        timeseries: samples,
        failures: Vec::new(),
        histograms: Vec::new(),
    };
    if which == WriteOnly::WithEngine && outbox_empty_after_secs.is_none() {
        report.failures.push(format!(
            "the outbox was not empty {} s after the last commit: the engine did not keep up",
            report.config.drain_timeout_secs
        ));
    }
    report.record(h::TRANSACTION, &written.tx_latency)?;
    Ok(report)
}

/// Polls every 200 ms until the outbox is empty; the seconds it took, or
/// `None` after `timeout` (or an interrupt).
async fn wait_for_empty_outbox(
    db: &EngineDb,
    timeout: Duration,
    abort: &AtomicBool,
) -> Result<Option<f64>> {
    let start = Instant::now();
    loop {
        if !db.any_pending().await? {
            return Ok(Some(start.elapsed().as_secs_f64()));
        }
        if start.elapsed() >= timeout || abort.load(Ordering::Relaxed) {
            return Ok(None);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// First Ctrl-C: stop writing and drain. Second: stop draining too.
async fn on_interrupt(stop: CancellationToken, abort: Arc<AtomicBool>) {
    if tokio::signal::ctrl_c().await.is_err() {
        return;
    }
    eprintln!("loadgen: interrupted: stopping the writers and draining (Ctrl-C again to stop now)");
    stop.cancel();
    if tokio::signal::ctrl_c().await.is_ok() {
        abort.store(true, Ordering::Relaxed);
    }
}
