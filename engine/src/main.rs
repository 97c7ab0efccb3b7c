//! `outbox`: migrate the schema, run a relay node, show status.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{anyhow, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use outbox_engine::cluster::node::Node;
use outbox_engine::cluster::Member;
use outbox_engine::config::{Config, DatabaseUrl};
use outbox_engine::ops::{self, readiness::Readiness};
use outbox_engine::sink::kafka::KafkaSink;
use outbox_engine::sink::Sink;
use outbox_engine::store::leases::PgLeaseStore;
use outbox_engine::store::schema::{self, MigrateOutcome};
use outbox_engine::store::source::PgSource;
use outbox_engine::store::{self as pgstore, Names};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "outbox",
    version,
    about = "Transactional outbox relay: PostgreSQL to Kafka"
)]
struct Cli {
    /// TOML configuration file; flags and environment override it.
    #[arg(long, global = true, env = "OUTBOX_CONFIG")]
    config: Option<PathBuf>,
    /// PostgreSQL URL.
    #[arg(long, global = true, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// Schema of the outbox tables.
    #[arg(long, global = true, env = "OUTBOX_SCHEMA")]
    schema: Option<String>,
    /// Log format.
    #[arg(long, global = true, env = "OUTBOX_LOG_FORMAT", default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Create the outbox schema (idempotent).
    Migrate {
        /// Number of hash partitions of the outbox.
        #[arg(long, env = "OUTBOX_PARTITIONS")]
        partitions: u32,
        /// Largest payload (bytes of stored jsonb) the outbox accepts;
        /// default 1 MiB for a new schema, unchanged for an existing one.
        #[arg(long)]
        max_payload_bytes: Option<u32>,
    },
    /// Run a relay node until SIGTERM or SIGINT.
    Run(RunArgs),
    /// Validate the configuration `run` would use (flags, environment,
    /// file) without connecting anywhere, and print it with secrets masked.
    CheckConfig(RunArgs),
    /// Manage events parked in the dead letters.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Show partitions, owners and backlog.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Refresh every this many seconds until interrupted.
        #[arg(long, value_name = "SECS")]
        watch: Option<f64>,
    },
}

#[derive(Subcommand)]
enum DlqCommand {
    /// List parked events, oldest first.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Show at most this many.
        #[arg(long, default_value_t = 100)]
        limit: i64,
    },
    /// Put parked events back into the outbox to be published again.
    Replay {
        /// The event id to replay.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<Uuid>,
        /// Replay every parked event.
        #[arg(long)]
        all: bool,
    },
    /// Delete a parked event for good.
    Drop {
        /// The event id to drop.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<Uuid>,
        /// Drop every parked event.
        #[arg(long)]
        all: bool,
    },
}

#[derive(Args)]
struct RunArgs {
    /// This node's id, unique among live nodes (default: the host name).
    #[arg(long, env = "OUTBOX_NODE_ID")]
    node_id: Option<String>,
    /// Kafka bootstrap servers, host:port[,host:port].
    #[arg(long, env = "KAFKA_BROKERS")]
    kafka_brokers: Option<String>,
    /// Prefix of default topic names (`<prefix><aggregate_type>`).
    #[arg(long, env = "OUTBOX_TOPIC_PREFIX")]
    topic_prefix: Option<String>,
    /// Partitions of topics the engine creates.
    #[arg(long)]
    topic_partitions: Option<i32>,
    /// Events per fetch and send.
    #[arg(long)]
    batch_size: Option<usize>,
    /// Batches per partition in flight at once.
    #[arg(long)]
    max_inflight_batches: Option<usize>,
    /// Idle wait between fetches of a partition with nothing to publish.
    #[arg(long)]
    poll_interval_ms: Option<u64>,
    /// Lease time to live.
    #[arg(long)]
    lease_ttl_ms: Option<u64>,
    /// Lease renewal and rebalancing interval.
    #[arg(long)]
    heartbeat_interval_ms: Option<u64>,
    /// How long a graceful stop may take.
    #[arg(long)]
    shutdown_timeout_ms: Option<u64>,
    /// Address of /metrics, /healthz and /readyz (`off` to disable).
    #[arg(long, env = "OUTBOX_HTTP_ADDR")]
    http_addr: Option<String>,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                    ExitCode::SUCCESS
                }
                _ => ExitCode::from(2),
            };
        }
    };
    init_logging(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// File, then environment and flags over it.
fn load_config(cli: &Cli) -> Result<Config> {
    let mut config = match &cli.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    if let Some(url) = &cli.database_url {
        config.database.url = DatabaseUrl::new(url.clone());
    }
    if let Some(schema) = &cli.schema {
        config.database.schema = schema.clone();
    }
    if let Command::Run(args) | Command::CheckConfig(args) = &cli.command {
        let set = |slot: &mut _, v: &Option<_>| {
            if let Some(v) = v {
                *slot = Clone::clone(v);
            }
        };
        set(&mut config.cluster.node_id, &args.node_id);
        set(&mut config.kafka.brokers, &args.kafka_brokers);
        set(&mut config.kafka.topic_prefix, &args.topic_prefix);
        set(&mut config.http.addr, &args.http_addr);
        if let Some(v) = args.topic_partitions {
            config.kafka.topic_partitions = v;
        }
        macro_rules! overlay {
            ($($field:ident => $section:ident),*) => {
                $( if let Some(v) = args.$field { config.$section.$field = v; } )*
            };
        }
        overlay!(batch_size => relay, max_inflight_batches => relay, poll_interval_ms => relay,
                 shutdown_timeout_ms => relay, lease_ttl_ms => cluster, heartbeat_interval_ms => cluster);
        config.validate()?;
    } else {
        config.database.connect_options()?;
        outbox_engine::config::validate_identifier("database.schema", &config.database.schema)?;
    }
    Ok(config)
}

async fn dispatch(cli: Cli) -> Result<()> {
    let config = load_config(&cli)?;
    let names = Names::new(&config.database.schema)?;
    match cli.command {
        Command::Migrate {
            partitions,
            max_payload_bytes,
        } => {
            let pool = pgstore::connect(&config.database, 2).await?;
            let mut conn = pool.acquire().await.context("database")?;
            let options = schema::MigrateOptions {
                partitions,
                max_payload_bytes,
            };
            match schema::migrate(&mut conn, &names.schema, options).await? {
                MigrateOutcome::Created => {
                    println!(
                        "outbox ready in schema {} with {partitions} partitions",
                        names.schema
                    )
                }
                MigrateOutcome::PayloadLimitChanged => println!(
                    "outbox in schema {}: payload limit set to {} bytes",
                    names.schema,
                    max_payload_bytes.unwrap_or_default()
                ),
                MigrateOutcome::AlreadyCurrent => println!(
                    "outbox in schema {} already has {partitions} partitions; nothing to do",
                    names.schema
                ),
            }
            Ok(())
        }
        Command::Status { json, watch } => {
            let pool = pgstore::connect(&config.database, 2).await?;
            let partitions = pgstore::partitions(&pool, &names).await?;
            // Rates come from two samples: the previous refresh, or one
            // taken a second before the first report.
            let mut previous = pgstore::status::read(&pool, &names, partitions).await?;
            let mut previous_at = std::time::Instant::now();
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            loop {
                let now = std::time::Instant::now();
                let status = pgstore::status::read(&pool, &names, partitions)
                    .await?
                    .with_rates(&previous, (now - previous_at).as_secs_f64());
                previous = status.clone();
                previous_at = now;
                if json {
                    println!("{}", serde_json::to_string_pretty(&status)?);
                } else {
                    if watch.is_some() {
                        print!("\x1b[2J\x1b[H");
                    }
                    print!("{}", status.render());
                }
                let Some(secs) = watch else { return Ok(()) };
                let period = std::time::Duration::try_from_secs_f64(secs.max(0.1))
                    .map_err(|e| anyhow!("--watch: {e}"))?;
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => return Ok(()),
                    _ = tokio::time::sleep(period) => {}
                }
            }
        }
        Command::Dlq(cmd) => {
            let pool = pgstore::connect(&config.database, 2).await?;
            pgstore::partitions(&pool, &names).await?;
            dlq(cmd, &pool, &names).await
        }
        Command::Run(_) => run(config, names).await,
        Command::CheckConfig(_) => {
            println!("configuration is valid\n{config:#?}");
            Ok(())
        }
    }
}

async fn dlq(cmd: DlqCommand, pool: &sqlx::PgPool, names: &Names) -> Result<()> {
    use outbox_engine::store::dead_letters::{self, Selection};
    let selection = |id: Option<Uuid>, all: bool| match (id, all) {
        (Some(id), false) => Ok(Selection::One(id)),
        (None, true) => Ok(Selection::All),
        _ => Err(anyhow!("give an event id or --all")),
    };
    match cmd {
        DlqCommand::List { json, limit } => {
            let letters = dead_letters::list(pool, names, limit).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&letters)?);
            } else if letters.is_empty() {
                println!("no parked events");
            } else {
                println!(
                    "{:<36}  {:>9}  {:>8}  {:<24}  {:<20}  error",
                    "event_id", "partition", "attempts", "parked_at", "aggregate"
                );
                for l in letters {
                    println!(
                        "{:<36}  {:>9}  {:>8}  {:<24}  {:<20}  {}",
                        l.event_id,
                        l.partition,
                        l.attempts,
                        l.parked_at,
                        format!("{}/{}", l.aggregate_type, l.aggregate_id),
                        l.error
                    );
                }
            }
        }
        DlqCommand::Replay { id, all } => {
            let which = selection(id, all)?;
            let n = dead_letters::replay(pool, names, which).await?;
            if n == 0 {
                if let Selection::One(id) = which {
                    return Err(anyhow!("no parked event with id {id}"));
                }
            }
            println!("replayed {n} event(s) into the outbox");
        }
        DlqCommand::Drop { id, all } => {
            let which = selection(id, all)?;
            let n = dead_letters::drop(pool, names, which).await?;
            if n == 0 {
                if let Selection::One(id) = which {
                    return Err(anyhow!("no parked event with id {id}"));
                }
            }
            println!("dropped {n} parked event(s)");
        }
    }
    Ok(())
}

async fn run(config: Config, names: Names) -> Result<()> {
    let app_name = format!("outbox/{}", config.cluster.node_id);
    // Leases and readiness on a small pool of their own, so a busy relay
    // cannot starve the heartbeat that keeps the leases.
    let pool = pgstore::connect_as(&config.database, 3, &app_name, &[]).await?;
    let relay_pool = pgstore::connect_as(
        &config.database,
        config.database.max_connections,
        &app_name,
        pgstore::RELAY_SESSION,
    )
    .await?;
    let partitions = pgstore::partitions(&pool, &names).await?;
    let sink = KafkaSink::new(&config.kafka)?;
    sink.check().await.map_err(|e| {
        anyhow!(
            "cannot reach Kafka brokers at {}: {e}",
            config.kafka.brokers
        )
    })?;
    let sink = Arc::new(sink);
    let shutdown = CancellationToken::new();
    let readiness = Arc::new(Readiness::default());
    readiness.set(true, true);
    if let Some(addr) = config.http.socket_addr()? {
        let metrics = ops::metrics::install().map_err(|e| anyhow!("metrics: {e}"))?;
        let (listener, bound) = ops::http::bind(addr)
            .await
            .with_context(|| format!("cannot listen on http.addr {addr}"))?;
        tracing::info!(addr = %bound, "operations endpoint: /metrics /healthz /readyz");
        let state = ops::http::OpsState {
            metrics,
            readiness: Arc::clone(&readiness),
        };
        tokio::spawn(ops::http::serve(listener, state, shutdown.clone()));
    }
    tokio::spawn(ops::readiness::watch(
        Arc::clone(&readiness),
        pool.clone(),
        Arc::clone(&sink),
        std::time::Duration::from_secs(2),
        std::time::Duration::from_secs(6),
        shutdown.clone(),
    ));
    let member = Member {
        node_id: config.cluster.node_id.clone(),
        incarnation: Uuid::now_v7(),
    };
    tracing::info!(node = %member.node_id, partitions, brokers = %config.kafka.brokers, "starting relay node");
    let node = Node {
        member,
        source: Arc::new(PgSource::new(relay_pool.clone(), &names, partitions)),
        sink: Arc::clone(&sink),
        leases: Arc::new(PgLeaseStore::new(pool.clone(), &names)),
        relay: config.relay.clone(),
        cluster: config.cluster.clone(),
    };
    let stop_node = CancellationToken::new();
    tokio::spawn(on_signal(stop_node.clone()));
    let result = node.run(stop_node).await;
    shutdown.cancel();
    result?;
    let flush = sink.clone();
    tokio::task::spawn_blocking(move || flush.flush(std::time::Duration::from_secs(5)))
        .await?
        .map_err(|e| anyhow!("flushing the producer: {e}"))?;
    relay_pool.close().await;
    pool.close().await;
    tracing::info!("stopped");
    Ok(())
}

async fn on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        _ => {
            tracing::error!("cannot install signal handlers");
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: stopping"),
        _ = int.recv() => tracing::info!("SIGINT: stopping"),
    }
    shutdown.cancel();
}
