//! `outbox`: migrate the schema, run a relay node, show status.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use outbox_engine::config::{
    validate_identifier, Config, Flag, Layered, Layers, PoisonPolicy, SourceKind,
};
use outbox_engine::error::ConfigError;
use outbox_engine::store::schema::{self, MigrateOutcome};
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
    /// TOML configuration file; environment variables and flags override it.
    #[arg(long, global = true, env = "OUTBOX_CONFIG")]
    config: Option<PathBuf>,
    /// PostgreSQL URL [env: DATABASE_URL].
    #[arg(long, global = true)]
    database_url: Option<String>,
    /// Schema of the outbox tables [env: OUTBOX_SCHEMA].
    #[arg(long, global = true)]
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
        /// Positions per ring segment of a new outbox, as a power of two
        /// (default 18: 262,144); segments are truncated once published.
        #[arg(long, value_name = "SHIFT")]
        ring_shift: Option<u32>,
        /// Also create what the CDC source needs: the publication and the
        /// replication slot (`cdc.publication`, `cdc.slot`); needs a server
        /// with wal_level = logical.
        #[arg(long)]
        cdc: bool,
    },
    /// Run a relay node until SIGTERM or SIGINT.
    Run(RunArgs),
    /// Validate the configuration `run` would use (flags, environment,
    /// file) without connecting anywhere, and print it with secrets masked
    /// and where each value that is not a default came from.
    CheckConfig(RunArgs),
    /// Manage events parked in the dead letters.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Choose how partitions are relayed: polled or streamed (CDC).
    #[command(subcommand)]
    Source(SourceCommand),
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
enum SourceCommand {
    /// Switch partitions to another source while nodes run (one partition
    /// at a time or all at once; both directions, nothing lost).
    Switch {
        /// The source to switch to.
        #[arg(long, value_enum)]
        to: outbox_engine::config::SourceKind,
        /// A partition to switch (repeatable).
        #[arg(
            long = "partition",
            required_unless_present = "all",
            conflicts_with = "all"
        )]
        partitions: Vec<u32>,
        /// Switch every partition.
        #[arg(long)]
        all: bool,
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

/// Flags of `run` and `check-config`, each setting one configuration key.
/// Every key can also be set in the file and from the environment as
/// `OUTBOX_<SECTION>__<KEY>`; `[env: ...]` names an older variable that
/// still works. Flags beat the environment, which beats the file.
#[derive(Args)]
struct RunArgs {
    /// This node's id, unique among live nodes (default: the host name) [env: OUTBOX_NODE_ID].
    #[arg(long)]
    node_id: Option<String>,
    /// Kafka bootstrap servers, host:port[,host:port] [env: KAFKA_BROKERS].
    #[arg(long)]
    kafka_brokers: Option<String>,
    /// Prefix of default topic names (`<prefix><aggregate_type>`) [env: OUTBOX_TOPIC_PREFIX].
    #[arg(long)]
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
    /// Longest wait of a caught-up partition for its doorbell before it looks anyway.
    #[arg(long)]
    idle_poll_ms: Option<u64>,
    /// What to do with an event the broker refuses for good.
    #[arg(long)]
    poison_policy: Option<PoisonPolicy>,
    /// Tries of such an event before the poison policy applies.
    #[arg(long)]
    max_attempts: Option<u32>,
    /// Lease time to live.
    #[arg(long)]
    lease_ttl_ms: Option<u64>,
    /// Lease renewal and rebalancing interval.
    #[arg(long)]
    heartbeat_interval_ms: Option<u64>,
    /// How long a graceful stop may take.
    #[arg(long)]
    shutdown_timeout_ms: Option<u64>,
    /// Longest a message may take to reach the broker before it is sent
    /// again; a takeover of an expired lease waits this long (plus 2 s)
    /// [env: OUTBOX_DELIVERY_TIMEOUT_MS].
    #[arg(long)]
    delivery_timeout_ms: Option<u64>,
    /// Size of the database connection pool.
    #[arg(long)]
    max_connections: Option<u32>,
    /// Address of /metrics, /healthz and /readyz (`off` to disable) [env: OUTBOX_HTTP_ADDR].
    #[arg(long)]
    http_addr: Option<String>,
    /// Where events come from: the outbox poller or logical replication [env: OUTBOX_SOURCE].
    #[arg(long)]
    source: Option<SourceKind>,
}

impl RunArgs {
    /// The keys these flags set.
    fn flags(&self) -> Vec<Flag> {
        let mut out = Vec::new();
        flag(&mut out, "cluster.node_id", "--node-id", &self.node_id);
        flag(
            &mut out,
            "kafka.brokers",
            "--kafka-brokers",
            &self.kafka_brokers,
        );
        flag(
            &mut out,
            "kafka.topic_prefix",
            "--topic-prefix",
            &self.topic_prefix,
        );
        let partitions = &self.topic_partitions;
        flag(
            &mut out,
            "kafka.topic_partitions",
            "--topic-partitions",
            partitions,
        );
        let timeout = &self.delivery_timeout_ms;
        flag(
            &mut out,
            "kafka.delivery_timeout_ms",
            "--delivery-timeout-ms",
            timeout,
        );
        flag(
            &mut out,
            "relay.batch_size",
            "--batch-size",
            &self.batch_size,
        );
        let inflight = &self.max_inflight_batches;
        flag(
            &mut out,
            "relay.max_inflight_batches",
            "--max-inflight-batches",
            inflight,
        );
        let poll = &self.poll_interval_ms;
        flag(
            &mut out,
            "relay.poll_interval_ms",
            "--poll-interval-ms",
            poll,
        );
        flag(
            &mut out,
            "relay.idle_poll_ms",
            "--idle-poll-ms",
            &self.idle_poll_ms,
        );
        flag(
            &mut out,
            "relay.poison_policy",
            "--poison-policy",
            &self.poison_policy,
        );
        flag(
            &mut out,
            "relay.max_attempts",
            "--max-attempts",
            &self.max_attempts,
        );
        let shutdown = &self.shutdown_timeout_ms;
        flag(
            &mut out,
            "relay.shutdown_timeout_ms",
            "--shutdown-timeout-ms",
            shutdown,
        );
        flag(
            &mut out,
            "cluster.lease_ttl_ms",
            "--lease-ttl-ms",
            &self.lease_ttl_ms,
        );
        let heartbeat = &self.heartbeat_interval_ms;
        flag(
            &mut out,
            "cluster.heartbeat_interval_ms",
            "--heartbeat-interval-ms",
            heartbeat,
        );
        let pool = &self.max_connections;
        flag(
            &mut out,
            "database.max_connections",
            "--max-connections",
            pool,
        );
        flag(&mut out, "http.addr", "--http-addr", &self.http_addr);
        flag(&mut out, "source.kind", "--source", &self.source);
        out
    }
}

fn flag<T: serde::Serialize>(
    out: &mut Vec<Flag>,
    key: &'static str,
    name: &'static str,
    value: &Option<T>,
) {
    if let Some(v) = value {
        out.push(Flag::new(key, name, v));
    }
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
    // Colours only for a person at a terminal (and never with NO_COLOR):
    // logs sent to files or collectors stay plain text.
    use std::io::IsTerminal;
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// The flags of `run` and `check-config` (the other commands take none).
fn run_args(cli: &Cli) -> Option<&RunArgs> {
    match &cli.command {
        Command::Run(args) | Command::CheckConfig(args) => Some(args),
        _ => None,
    }
}

/// The configuration keys the command line sets: the global flags, and
/// those of [`run_args`].
fn cli_flags(cli: &Cli) -> Vec<Flag> {
    let mut flags = Vec::new();
    flag(
        &mut flags,
        "database.url",
        "--database-url",
        &cli.database_url,
    );
    flag(&mut flags, "database.schema", "--schema", &cli.schema);
    if let Some(args) = run_args(cli) {
        flags.extend(args.flags());
    }
    flags
}

/// Defaults, then the file, the environment and flags over it. `run` and
/// `check-config` validate everything; the other commands only what they use.
fn load_config(cli: &Cli) -> Result<Layered, ConfigError> {
    let mut layers = Layers::new();
    if let Some(path) = &cli.config {
        layers = layers.file(path)?;
    }
    let run = run_args(cli);
    let layered = layers
        .env(std::env::vars_os())?
        .flags(cli_flags(cli))?
        .load()?;
    if run.is_some() {
        layered.validate()?;
    } else {
        layered.check(|c| {
            c.database.connect_options()?;
            validate_identifier("database.schema", &c.database.schema)
        })?;
    }
    Ok(layered)
}

async fn dispatch(cli: Cli) -> Result<()> {
    let layered = load_config(&cli)?;
    let config = layered.config();
    let names = Names::new(&config.database.schema)?;
    match cli.command {
        Command::Migrate {
            partitions,
            max_payload_bytes,
            ring_shift,
            cdc,
        } => {
            let pool = pgstore::connect(&config.database, 2).await?;
            let mut conn = pool.acquire().await.context("database")?;
            let options = schema::MigrateOptions {
                partitions,
                max_payload_bytes,
                ring_shift,
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
            if cdc {
                let store = outbox_engine::cdc::slot::SlotStore::new(
                    pool.clone(),
                    &names,
                    &config.cdc.slot,
                    &config.cdc.publication,
                )?;
                let created = store.ensure().await?;
                println!(
                    "CDC: publication {} and replication slot {} {}",
                    store.publication,
                    store.slot,
                    if created { "created" } else { "already there" }
                );
            }
            Ok(())
        }
        Command::Source(SourceCommand::Switch {
            to,
            partitions,
            all,
        }) => {
            use outbox_engine::relay::Mode;
            let pool = pgstore::connect(&config.database, 2).await?;
            pgstore::partitions(&pool, &names).await?;
            let store = outbox_engine::cdc::slot::SlotStore::new(
                pool.clone(),
                &names,
                &config.cdc.slot,
                &config.cdc.publication,
            )?;
            let mode = Mode::from(to);
            let chosen = (!all).then_some(partitions.as_slice());
            let changed = outbox_engine::cdc::slot::switch(&store, mode, chosen).await?;
            if changed.is_empty() {
                println!("nothing to switch: every chosen partition already uses {mode}");
            } else {
                println!(
                    "switched {} partition(s) to {mode}: {:?} (their owners stop; the next owner \
                     waits out their deliveries, then {})",
                    changed.len(),
                    changed,
                    match mode {
                        Mode::Cdc => "catches up from the table and streams",
                        Mode::Poll => "polls from the last CDC mark",
                    }
                );
            }
            Ok(())
        }
        Command::Status { json, watch } => {
            let pool = pgstore::connect(&config.database, 2).await?;
            // A missing or outdated schema is a clear error, not an empty table.
            pgstore::partitions(&pool, &names).await?;
            // Rates come from two samples: the previous refresh, or one
            // taken a second before the first report.
            let mut previous = pgstore::status::read(&pool, &names).await?;
            let mut previous_at = std::time::Instant::now();
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            loop {
                let now = std::time::Instant::now();
                let status = pgstore::status::read(&pool, &names)
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
        Command::Run(_) => run(config.clone()).await,
        Command::CheckConfig(_) => {
            println!("configuration is valid\n{config:#?}");
            let set = layered.set_values();
            if set.is_empty() {
                println!("every key has its default");
            } else {
                println!("set by the file, the environment or flags (secrets masked):");
                for line in set {
                    println!("  {line}");
                }
            }
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

async fn run(config: Config) -> Result<()> {
    let shutdown = CancellationToken::new();
    tokio::spawn(on_signal(shutdown.clone()));
    outbox_engine::engine::run(config, shutdown).await?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;
    use outbox_engine::config::{env_key, keys, ENV_ALIASES, ENV_PREFIX, ENV_SEPARATOR};

    /// The rows of README's configuration table: file key, environment
    /// variables, flags.
    fn readme_rows() -> Vec<(String, Vec<String>, Vec<String>)> {
        let readme = include_str!("../../README.md");
        let section = readme
            .split("### Configuration\n")
            .nth(1)
            .and_then(|s| s.split("\n## ").next())
            .expect("README has a configuration section");
        let names = |cell: &str| -> Vec<String> {
            cell.split('`')
                .skip(1)
                .step_by(2)
                .map(String::from)
                .collect()
        };
        section
            .lines()
            .filter(|l| l.starts_with("| `"))
            .map(|l| {
                let cells: Vec<&str> = l.split('|').collect();
                let key = names(cells[1]).concat();
                (key, names(cells[2]), names(cells[3]))
            })
            .collect()
    }

    /// A value each flag of `run` accepts.
    const SAMPLES: &[(&str, &str)] = &[
        ("--database-url", "postgres://u@h/d"),
        ("--schema", "s"),
        ("--node-id", "n"),
        ("--kafka-brokers", "k:1"),
        ("--topic-prefix", "p."),
        ("--topic-partitions", "3"),
        ("--batch-size", "7"),
        ("--max-inflight-batches", "3"),
        ("--poll-interval-ms", "5"),
        ("--idle-poll-ms", "500"),
        ("--poison-policy", "block"),
        ("--max-attempts", "2"),
        ("--lease-ttl-ms", "6000"),
        ("--heartbeat-interval-ms", "500"),
        ("--shutdown-timeout-ms", "100"),
        ("--delivery-timeout-ms", "2000"),
        ("--max-connections", "4"),
        ("--http-addr", "off"),
        ("--source", "cdc"),
    ];

    fn flags_of(args: &[&str]) -> Vec<Flag> {
        cli_flags(&Cli::try_parse_from(args).expect("flags parse"))
    }

    #[test]
    fn every_flag_of_run_sets_the_key_readme_names() {
        let rows = readme_rows();
        let cmd = Cli::command();
        let run = cmd.find_subcommand("run").expect("run");
        let not_keys = ["help", "config", "log-format"];
        for arg in run.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            let name = format!("--{long}");
            if not_keys.contains(&long) {
                continue;
            }
            let (_, value) = SAMPLES
                .iter()
                .find(|(f, _)| *f == name)
                .unwrap_or_else(|| panic!("{name} has no sample in SAMPLES"));
            let set = flags_of(&["outbox", "run", &name, value]);
            assert_eq!(set.len(), 1, "{name}");
            assert_eq!(set[0].flag(), name);
            let row = rows.iter().find(|r| r.0 == set[0].key());
            let row = row.unwrap_or_else(|| panic!("README has no row for {}", set[0].key()));
            assert_eq!(
                row.2,
                std::slice::from_ref(&name),
                "README's flag of {}",
                row.0
            );
            // And the value lands where the flag says.
            let layered = Layers::new()
                .flags(set)
                .and_then(Layers::load)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(layered.set_values().len(), 1, "{name}");
        }
        for row in &rows {
            for f in &row.2 {
                assert!(
                    SAMPLES.iter().any(|(s, _)| s == f),
                    "README lists {f}, run has none"
                );
            }
        }
    }

    #[test]
    fn readme_lists_every_key_with_its_environment_variables() {
        let rows = readme_rows();
        let mut keys = keys();
        keys.sort();
        let mut listed: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
        listed.sort();
        assert_eq!(
            listed, keys,
            "README's rows against the configuration's keys"
        );
        for (key, env, _) in &rows {
            let canonical = format!(
                "{ENV_PREFIX}{}",
                key.to_ascii_uppercase().replace('.', ENV_SEPARATOR)
            );
            if key == "kafka.properties" {
                assert_eq!(env, &[format!("{canonical}{ENV_SEPARATOR}<NAME>")]);
                continue;
            }
            assert_eq!(env.first(), Some(&canonical), "{key}");
            for name in env {
                let path = env_key(name).unwrap_or_else(|| panic!("{name} is not read"));
                assert_eq!(path.join("."), *key, "{name}");
            }
            for (alias, aliased) in ENV_ALIASES {
                if aliased == key {
                    assert!(
                        env.iter().any(|e| e == alias),
                        "README lacks {alias} for {key}"
                    );
                }
            }
        }
    }
}
