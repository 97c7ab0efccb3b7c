//! `loadgen run`: prepare database and topics, start the verifier, write
//! for the duration, drain, and assemble the report.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Context, Result};
use sqlx::Connection;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::cli::{RunArgs, RunConfig};
use crate::clock::Clock;
use crate::plan::Aggregates;
use crate::progress::{self, Counters};
use crate::report::{per_sec, Latency, Machine, Report, Results};
use crate::verifier::{tally, Outcome, Verifier};
use crate::writer::{self, Shared, Writer};

/// Runs the load described by `args`, already checked into `config`.
pub async fn run(args: RunArgs, config: RunConfig) -> Result<Report> {
    let run_id = Uuid::now_v7().simple().to_string();
    let started_at_unix_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);

    let mut admin = writer::connect(&args.database_url).await?;
    let postgres_version = writer::prepare(&mut admin, &config.schema).await?;
    let mut conns = Vec::with_capacity(config.writers);
    for _ in 0..config.writers {
        conns.push(writer::connect(&args.database_url).await?);
    }
    let verifier = Verifier::connect(&config, &run_id).await?;
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
    let progress = progress::spawn(Arc::clone(&counters), clock, progress_stop.clone());
    tokio::spawn(on_interrupt(stop.clone(), Arc::clone(&abort)));

    let shared = Arc::new(Shared {
        aggregates: Aggregates {
            count: config.aggregates,
            types: config.aggregate_types.clone(),
        },
        config: config.clone(),
        run_id: run_id.clone(),
        clock,
        counters: Arc::clone(&counters),
        stop: stop.clone(),
    });
    let mut writers = JoinSet::new();
    for (i, conn) in conns.into_iter().enumerate() {
        let w = Writer::new(i, conn, Arc::clone(&shared), commits_tx.clone())?;
        writers.spawn(w.run());
    }
    drop(commits_tx);
    drop(shared);

    let mut tx_latency = tally::latency_histogram()?;
    let mut failure = None;
    while let Some(joined) = writers.join_next().await {
        match joined.map_err(anyhow::Error::from).and_then(|r| r) {
            Ok(stats) => tx_latency.add(&stats.tx_latency)?,
            Err(e) => {
                // One failing writer ends the run; the others stop too.
                stop.cancel();
                failure.get_or_insert(e);
            }
        }
    }
    counters.writing_done.store(true, Ordering::Relaxed);
    if failure.is_some() {
        abort.store(true, Ordering::Relaxed);
    }
    let outcome = tokio::task::spawn_blocking(move || verifier.join())
        .await?
        .map_err(|_| anyhow!("the verifier thread panicked"))?;
    progress_stop.cancel();
    let _ = progress.await;
    if let Some(e) = failure {
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

    let results = results(&outcome, clock, &tx_latency);
    admin.close().await.ok();
    Ok(Report {
        loadgen_version: env!("CARGO_PKG_VERSION"),
        run_id,
        started_at_unix_ms,
        config,
        machine: Machine::probe(postgres_version),
        results,
    })
}

fn results(outcome: &Outcome, clock: Clock, tx_latency: &hdrhistogram::Histogram<u64>) -> Results {
    let t = &outcome.tally;
    let secs = |from: Option<u64>, to: Option<u64>| match (from, to) {
        (Some(a), Some(b)) => b.saturating_sub(a) as f64 / 1e6,
        _ => 0.0,
    };
    let write_secs = secs(Some(clock.origin_us()), t.last_commit_us);
    let delivery_secs = secs(t.first_commit_us, t.last_delivery_us);
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
        latency_ms: Latency::from_us(&t.latency),
        latency_from_intended_ms: Latency::from_us(&t.latency_from_intended),
        tx_latency_ms: Latency::from_us(tx_latency),
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
