//! `loadgen suite`: the standard benchmark in one command. For each
//! planned measurement ([`plan`]): a fresh database, `outbox migrate`,
//! engine nodes started and stopped by loadgen where the measurement needs
//! them, the measurement, its files under `<results>/<date>-<name>/`, its
//! topics deleted. Then the targets ([`targets`]), the suite's record
//! `<results>/suite.json` ([`record`]) and the `<results>/README.md` drawn
//! from it ([`readme`]).

pub mod db;
pub mod plan;
pub mod readme;
pub mod record;
pub mod targets;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use sqlx::Connection;

use outbox_engine::config::redact_url;

use crate::broker;
use crate::cli::{BrokerConfig, DrainConfig, Mode, RunArgs, RunConfig, SuiteConfig};
use crate::drain;
use crate::engine_state::{self, EngineDb};
use crate::kafka;
use crate::nodes::{Engine, NodeSpec};
use crate::render;
use crate::report::{command_line, AnyReport, Machine, Meta, Report};
use crate::run::{self, WriteOnly};
use crate::writer::{self, sql as wsql};
use plan::{Durations, Planned, Shape, Step, Workload};
pub use record::{Record, README_MD, SUITE_JSON};
use targets::{Measured, RunSummary};

/// Schema of the outbox in the bench database.
const SCHEMA: &str = "public";
/// Aggregate types, as in `loadgen run`'s default: two topics.
const TYPES: [&str; 2] = ["order", "invoice"];
const AGGREGATES: usize = 1000;
/// Partitions of each topic (the engine's default).
const TOPIC_PARTITIONS: i32 = 8;
/// How long a run may take to deliver what it wrote, after writing.
const DRAIN_TIMEOUT_SECS: f64 = 90.0;
/// How long the engine nodes may take to lease every partition.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the drain may take.
const DRAIN_RUN_TIMEOUT_SECS: f64 = 900.0;

/// How the suite went, for the exit code.
pub struct Outcome {
    /// Runs that could not be measured.
    pub errors: usize,
    /// Runs that failed a check (lost events, order...).
    pub failed: usize,
}

/// Shared by every step.
struct Ctx<'a> {
    server_url: &'a str,
    bench_url: String,
    config: &'a SuiteConfig,
    engine: Engine,
    /// Makes topic names unique to this suite run.
    suite_id: String,
    /// `<date>-` or `<date>-quick-`: the directory prefix of each run.
    dir_prefix: String,
}

impl Ctx<'_> {
    fn prefix(&self, name: &str) -> String {
        format!("bench.{}.{name}.", self.suite_id)
    }

    fn topics(&self, name: &str) -> Vec<String> {
        TYPES
            .iter()
            .map(|t| format!("{}{t}", self.prefix(name)))
            .collect()
    }

    fn meta(&self, name: &str) -> Meta {
        Meta {
            name: Some(name.to_string()),
            engine: None,
            broker: Some(self.config.broker_label.clone()),
        }
    }

    /// A fresh database with a migrated outbox of `partitions`.
    async fn fresh(&self, partitions: u32) -> Result<()> {
        db::recreate(self.server_url, &self.config.bench_database).await?;
        self.engine
            .migrate(&self.bench_url, SCHEMA, partitions)
            .await
    }

    fn run_config(
        &self,
        workload: Workload,
        rate: f64,
        duration: f64,
        name: &str,
    ) -> Result<RunConfig> {
        let writers = if rate > 0.0 {
            self.config.writers.max(plan::LATENCY_WRITERS)
        } else {
            self.config.writers
        };
        RunArgs {
            database_url: self.bench_url.clone(),
            kafka_brokers: self.config.kafka_brokers.clone(),
            schema: SCHEMA.into(),
            rate,
            duration,
            writers,
            events_per_tx: workload.events_per_tx,
            payload_bytes: workload.payload_bytes,
            aggregates: AGGREGATES,
            aggregate_types: TYPES.iter().map(|t| t.to_string()).collect(),
            topic_prefix: self.prefix(name),
            topic_partitions: TOPIC_PARTITIONS,
            mode: Mode::Api,
            drain_timeout: DRAIN_TIMEOUT_SECS,
            no_verify: false,
            inbox: false,
            report: crate::cli::ReportArgs {
                name: Some(name.into()),
                ..Default::default()
            },
        }
        .validate()
    }

    async fn delete_topics(&self, name: &str) {
        if self.config.keep_topics {
            return;
        }
        match kafka::admin(&self.config.kafka_brokers) {
            Ok(admin) => {
                for f in kafka::delete_topics(&admin, &self.topics(name)).await {
                    eprintln!("suite: could not delete topic {f}");
                }
            }
            Err(e) => eprintln!("suite: {e:#}"),
        }
    }
}

/// Runs the suite; the README and suite.json are rewritten only when the
/// whole plan ran (no `--only`).
pub async fn run(database_url: &str, config: SuiteConfig) -> Result<Outcome> {
    let started = Instant::now();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (date, time) = readme::utc(now);
    let engine = Engine::locate(&config.outbox_bin).await?;
    let mut server = writer::connect(database_url).await?;
    let postgres_version: String = sqlx::query_scalar(wsql::SERVER_VERSION)
        .fetch_one(&mut server)
        .await?;
    server.close().await.ok();
    let suite_id = uuid::Uuid::new_v4().simple().to_string()[..6].to_string();
    let ctx = Ctx {
        server_url: database_url,
        bench_url: db::with_database(database_url, &config.bench_database),
        config: &config,
        engine,
        suite_id,
        dir_prefix: format!("{date}-{}", if config.quick { "quick-" } else { "" }),
    };
    let durations = {
        let mut d = if config.quick {
            Durations::quick()
        } else {
            Durations::standard()
        };
        if let Some(secs) = config.duration_secs {
            d.ceiling = secs;
            d.e2e = secs;
        }
        if let Some(n) = config.drain_events {
            d.drain_events = n;
        }
        d
    };
    let steps: Vec<Planned> = plan::plan(config.quick, durations)
        .into_iter()
        .filter(|p| {
            config.only.is_empty() || config.only.iter().any(|o| p.name.contains(o.as_str()))
        })
        .collect();
    eprintln!(
        "suite: {} runs ({}), engine {}, results in {}",
        steps.len(),
        if config.quick { "quick" } else { "standard" },
        ctx.engine.version,
        config.results_dir.display()
    );
    let interrupted = Arc::new(AtomicBool::new(false));
    let watcher = {
        let interrupted = Arc::clone(&interrupted);
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("suite: interrupted; stopping after the current run");
                interrupted.store(true, Ordering::Relaxed);
            }
        })
    };
    let mut runs = Vec::with_capacity(steps.len());
    for (i, p) in steps.iter().enumerate() {
        if interrupted.load(Ordering::Relaxed) {
            break;
        }
        let length = match p.step {
            Step::Drain { events, .. } => format!("{events} events"),
            _ => format!("{} s", p.duration_secs),
        };
        eprintln!("\nsuite: [{}/{}] {} ({length})", i + 1, steps.len(), p.name);
        let summary = step(&ctx, p).await;
        eprintln!("suite: {}", one_line(&summary));
        runs.push(summary);
    }
    watcher.abort();

    let targets = targets::targets(&runs);
    let outcome = Outcome {
        errors: runs.iter().filter(|r| r.error.is_some()).count(),
        failed: runs.iter().filter(|r| !r.failures.is_empty()).count(),
    };
    let partial = !config.only.is_empty() || interrupted.load(Ordering::Relaxed);
    let record = Record {
        generated_at: format!("{date} {time} UTC"),
        quick: config.quick,
        minutes: started.elapsed().as_secs_f64() / 60.0,
        engine_version: ctx.engine.version.clone(),
        git: git_state(),
        writers: config.writers,
        engine_args: config.engine_args.clone(),
        machine: Machine::probe(postgres_version, Some(config.broker_label.clone())),
        runs,
        targets,
    };
    if partial {
        eprintln!("\nsuite: a partial run (--only or interrupted): README.md left as it was\n");
        print!("{}", readme::readme(&record));
    } else {
        record.write(&config.results_dir)?;
        eprintln!(
            "\nsuite: wrote {}/suite.json and README.md in {:.1} min",
            config.results_dir.display(),
            record.minutes
        );
    }
    for t in &record.targets {
        eprintln!(
            "suite: target {:?}: {} — {}",
            t.status, t.target, t.measured
        );
    }
    Ok(outcome)
}

/// `abc1234` or `abc1234 (with uncommitted changes)`.
fn git_state() -> String {
    let Some(commit) = command_line("git", &["rev-parse", "--short", "HEAD"]) else {
        return "an unknown commit".into();
    };
    let dirty = std::process::Command::new("git")
        .args(["status", "--porcelain", "--untracked-files=no"])
        .output()
        .map(|o| !o.stdout.is_empty())
        .unwrap_or(false);
    if dirty {
        format!("commit `{commit}` with uncommitted changes")
    } else {
        format!("commit `{commit}`")
    }
}

fn one_line(r: &RunSummary) -> String {
    if let Some(e) = &r.error {
        return format!("{}: ERROR {e}", r.name);
    }
    let what = match &r.measured {
        Some(Measured::DbCeiling {
            commit_rate_eps, ..
        }) => format!("{commit_rate_eps:.0} commits/s"),
        Some(Measured::BrokerCeiling { acked_per_sec, .. }) => format!("{acked_per_sec:.0} acks/s"),
        Some(Measured::E2e {
            throughput_eps,
            broker_latency,
            lost,
            ..
        }) => format!(
            "{throughput_eps:.0} events/s, broker p99 {:.1} ms, {lost} lost",
            broker_latency.latency_ms.p99
        ),
        Some(Measured::Overhead {
            commit_rate_eps, ..
        }) => format!("{commit_rate_eps:.0} commits/s with the engine"),
        Some(Measured::Drain {
            drain_eps, lost, ..
        }) => format!("{drain_eps:.0} events/s, {lost} lost"),
        None => "nothing measured".into(),
    };
    let failed = if r.failures.is_empty() {
        String::new()
    } else {
        format!(" FAILED: {}", r.failures.join("; "))
    };
    format!("{}: {what}{failed}", r.name)
}

/// One measurement, its files written; errors become the summary's.
async fn step(ctx: &Ctx<'_>, p: &Planned) -> RunSummary {
    let dir = format!("{}{}", ctx.dir_prefix, p.name);
    let out: PathBuf = ctx.config.results_dir.join(&dir);
    let mut summary = RunSummary {
        name: p.name.clone(),
        step: p.step,
        dir,
        measured: None,
        error: None,
        failures: Vec::new(),
    };
    match measure(ctx, p).await {
        Ok((measured, report)) => {
            if let Err(e) = render::write_run(&out, &report) {
                summary.error = Some(format!("{e:#}"));
            }
            summary.measured = Some(measured);
            summary.failures = report.failures().to_vec();
        }
        Err(e) => summary.error = Some(format!("{e:#}")),
    }
    ctx.delete_topics(&p.name).await;
    summary
}

async fn measure(ctx: &Ctx<'_>, p: &Planned) -> Result<(Measured, AnyReport)> {
    let name = p.name.as_str();
    match p.step {
        Step::BrokerCeiling { payload_bytes } => {
            let config = BrokerConfig {
                kafka_brokers: ctx.config.kafka_brokers.clone(),
                duration_secs: p.duration_secs,
                messages: None,
                payload_bytes,
                aggregates: AGGREGATES,
                aggregate_types: TYPES.iter().map(|t| t.to_string()).collect(),
                topic_prefix: ctx.prefix(name),
                topic_partitions: TOPIC_PARTITIONS,
                keep_topics: true, // the suite deletes them
            };
            let report = broker::run(config, ctx.meta(name)).await?;
            let r = &report.results;
            Ok((
                Measured::BrokerCeiling {
                    acked_per_sec: r.acked_per_sec,
                    ack_latency_ms: r.ack_latency_ms.clone(),
                    failed: r.failed,
                },
                report.into(),
            ))
        }
        Step::DbCeiling {
            workload,
            partitions,
        } => {
            ctx.fresh(partitions).await?;
            let config = ctx.run_config(workload, 0.0, p.duration_secs, name)?;
            let report =
                run::write_only(&ctx.bench_url, config, ctx.meta(name), WriteOnly::DbCeiling)
                    .await?;
            Ok((
                Measured::DbCeiling {
                    commit_rate_eps: report.results.commit_rate_eps,
                    tx_latency_ms: report.results.tx_latency_ms.clone(),
                },
                report.into(),
            ))
        }
        Step::E2e { workload, shape } => e2e(ctx, p, workload, shape, 0.0).await,
        Step::Latency {
            workload,
            shape,
            rate,
        } => e2e(ctx, p, workload, shape, rate).await,
        Step::Overhead { workload, shape } => {
            ctx.fresh(shape.partitions).await?;
            let config = ctx.run_config(workload, 0.0, p.duration_secs, name)?;
            let report = with_engine(ctx, shape, name, |meta| {
                run::write_only(&ctx.bench_url, config, meta, WriteOnly::WithEngine)
            })
            .await?;
            let r = &report.results;
            Ok((
                Measured::Overhead {
                    commit_rate_eps: r.commit_rate_eps,
                    outbox_empty_after_secs: r.outbox_empty_after_secs,
                },
                report.into(),
            ))
        }
        Step::Drain {
            events,
            payload_bytes,
            shape,
        } => {
            db::recreate(ctx.server_url, &ctx.config.bench_database).await?;
            let config = DrainConfig {
                database: redact_url(&ctx.bench_url),
                kafka_brokers: ctx.config.kafka_brokers.clone(),
                schema: SCHEMA.into(),
                events,
                partitions: shape.partitions,
                nodes: shape.nodes,
                payload_bytes,
                aggregates: AGGREGATES,
                aggregate_types: TYPES.iter().map(|t| t.to_string()).collect(),
                topic_prefix: ctx.prefix(name),
                topic_partitions: TOPIC_PARTITIONS,
                load_connections: 2,
                timeout_secs: DRAIN_RUN_TIMEOUT_SECS,
                keep_topics: true, // the suite deletes them
            };
            let opts = drain::Options {
                engine: &ctx.engine,
                engine_args: &ctx.config.engine_args,
                log_dir: &ctx.config.log_dir,
            };
            let report = drain::run(&ctx.bench_url, config, opts, ctx.meta(name)).await?;
            let r = &report.results;
            Ok((
                Measured::Drain {
                    drain_eps: r.drain_eps,
                    drain_secs: r.drain_secs,
                    drained: r.drained,
                    lost: r.lost,
                    duplicates: r.duplicates,
                    order_violations: r.order_violations,
                },
                report.into(),
            ))
        }
    }
}

async fn e2e(
    ctx: &Ctx<'_>,
    p: &Planned,
    workload: Workload,
    shape: Shape,
    rate: f64,
) -> Result<(Measured, AnyReport)> {
    ctx.fresh(shape.partitions).await?;
    let config = ctx.run_config(workload, rate, p.duration_secs, &p.name)?;
    let report = with_engine(ctx, shape, &p.name, |meta| {
        run::e2e(&ctx.bench_url, config, meta)
    })
    .await?;
    let r = &report.results;
    Ok((
        Measured::E2e {
            throughput_eps: r.throughput_eps,
            commit_rate_eps: r.commit_rate_eps,
            latency_ms: r.latency_ms.clone(),
            broker_latency: r.broker_latency.clone(),
            lost: r.lost,
            duplicates: r.duplicates,
            order_violations: r.order_violations,
            lag: r.lag.clone(),
        },
        report.into(),
    ))
}

/// Starts the nodes, waits until they hold every partition, runs `f`,
/// and stops them whatever happened; a node that did not stop cleanly
/// is a failure of the run.
async fn with_engine<C, R, F, Fut>(
    ctx: &Ctx<'_>,
    shape: Shape,
    name: &str,
    f: F,
) -> Result<Report<C, R>>
where
    F: FnOnce(Meta) -> Fut,
    Fut: std::future::Future<Output = Result<Report<C, R>>>,
{
    let prefix = ctx.prefix(name);
    let spec = NodeSpec {
        database_url: &ctx.bench_url,
        kafka_brokers: &ctx.config.kafka_brokers,
        schema: SCHEMA,
        topic_prefix: &prefix,
        topic_partitions: TOPIC_PARTITIONS,
        partitions: shape.partitions,
        nodes: shape.nodes,
        args: &ctx.config.engine_args,
        log_dir: &ctx.config.log_dir,
        name,
    };
    let mut meta = ctx.meta(name);
    meta.engine = Some(ctx.engine.setup(&spec));
    let mut cluster = ctx.engine.start(&spec)?;
    let ready = async {
        let db = EngineDb::connect(&ctx.bench_url, SCHEMA).await?;
        let took =
            engine_state::wait_ready(&db, &mut cluster, shape.partitions, READY_TIMEOUT).await;
        db.close().await;
        took
    }
    .await;
    let result = match ready {
        Ok(took) => {
            eprintln!(
                "suite: {} node(s) hold all {} partitions after {:.1} s",
                shape.nodes,
                shape.partitions,
                took.as_secs_f64()
            );
            f(meta).await
        }
        Err(e) => Err(e),
    };
    let stopped = cluster.stop().await;
    let mut report = result?;
    if let Err(e) = stopped {
        report.failures.push(format!("{e:#}"));
    }
    Ok(report)
}
