//! Flags of the baselines and the suite: `broker-ceiling`, `drain`,
//! `suite`, each checked into a config the report records.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use outbox_engine::config::{redact_url, validate_identifier};
use outbox_engine::sink::routing;

use super::MAX_PAYLOAD_BYTES;

/// Checks a list of aggregate types against a topic prefix; trimmed and
/// deduplicated.
fn check_types(prefix: &str, types: &[String]) -> Result<Vec<String>> {
    let mut out: Vec<String> = Vec::new();
    for t in types {
        let t = t.trim();
        if t.is_empty() {
            bail!("--aggregate-types: empty type in the list");
        }
        routing::check_topic(&format!("{prefix}{t}"))
            .map_err(|e| anyhow::anyhow!("--aggregate-types / --topic-prefix: {e}"))?;
        if !out.iter().any(|x| x == t) {
            out.push(t.to_string());
        }
    }
    if out.is_empty() {
        bail!("--aggregate-types must name at least one type");
    }
    Ok(out)
}

/// A topic prefix no earlier run used: `<base>.<12 hex>.`.
pub fn fresh_prefix(base: &str) -> String {
    let id = Uuid::new_v4().simple().to_string();
    format!("{base}.{}.", &id[..12])
}

fn check_payload(bytes: usize) -> Result<()> {
    if bytes > MAX_PAYLOAD_BYTES {
        bail!("--payload-bytes must be at most {MAX_PAYLOAD_BYTES}");
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct BrokerArgs {
    /// Kafka bootstrap servers, host:port[,host:port].
    #[arg(long, env = "KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    pub kafka_brokers: String,
    /// How long to produce, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    pub duration: f64,
    /// Stop after this many messages (whichever comes first).
    #[arg(long, value_name = "N")]
    pub messages: Option<u64>,
    /// Approximate size of each JSON payload, as in `run`.
    #[arg(long, value_name = "B", default_value_t = 256)]
    pub payload_bytes: usize,
    /// Distinct keys (aggregate ids).
    #[arg(long, value_name = "A", default_value_t = 1000)]
    pub aggregates: usize,
    /// Aggregate types; one topic each.
    #[arg(long, value_delimiter = ',', default_value = "order,invoice")]
    pub aggregate_types: Vec<String>,
    /// Topic prefix; default a fresh `loadgen.broker.<id>.`.
    #[arg(long)]
    pub topic_prefix: Option<String>,
    /// Partitions of the topics it creates (the engine's default is 8).
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub topic_partitions: i32,
    /// Keep the topics afterwards (they are deleted by default, so that an
    /// in-memory broker frees them).
    #[arg(long)]
    pub keep_topics: bool,
    #[command(flatten)]
    pub report: super::ReportArgs,
}

/// A checked `broker-ceiling` configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BrokerConfig {
    pub kafka_brokers: String,
    pub duration_secs: f64,
    pub messages: Option<u64>,
    pub payload_bytes: usize,
    pub aggregates: usize,
    pub aggregate_types: Vec<String>,
    pub topic_prefix: String,
    pub topic_partitions: i32,
    pub keep_topics: bool,
}

impl BrokerConfig {
    pub fn topics(&self) -> Vec<String> {
        self.aggregate_types
            .iter()
            .map(|t| format!("{}{t}", self.topic_prefix))
            .collect()
    }
}

impl BrokerArgs {
    pub fn validate(&self) -> Result<BrokerConfig> {
        if !(self.duration.is_finite() && self.duration > 0.0 && self.duration <= 86_400.0) {
            bail!("--duration must be between 0 and 86400 seconds");
        }
        if self.messages == Some(0) {
            bail!("--messages must be at least 1");
        }
        check_payload(self.payload_bytes)?;
        if self.aggregates == 0 {
            bail!("--aggregates must be at least 1");
        }
        if self.topic_partitions < 1 {
            bail!("--topic-partitions must be at least 1");
        }
        if self.kafka_brokers.trim().is_empty() {
            bail!("--kafka-brokers (KAFKA_BROKERS) is empty");
        }
        let topic_prefix = self
            .topic_prefix
            .clone()
            .unwrap_or_else(|| fresh_prefix("loadgen.broker"));
        Ok(BrokerConfig {
            kafka_brokers: self.kafka_brokers.clone(),
            duration_secs: self.duration,
            messages: self.messages,
            payload_bytes: self.payload_bytes,
            aggregates: self.aggregates,
            aggregate_types: check_types(&topic_prefix, &self.aggregate_types)?,
            topic_prefix,
            topic_partitions: self.topic_partitions,
            keep_topics: self.keep_topics,
        })
    }
}

#[derive(Args, Debug)]
pub struct DrainArgs {
    /// PostgreSQL URL; `outbox migrate --partitions N` is run on it, and
    /// its outbox must be empty.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
    /// Kafka bootstrap servers, host:port[,host:port].
    #[arg(long, env = "KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    pub kafka_brokers: String,
    /// Schema of the outbox.
    #[arg(long, env = "OUTBOX_SCHEMA", default_value = "public")]
    pub schema: String,
    /// Size of the backlog.
    #[arg(long, value_name = "N", default_value_t = 5_000_000)]
    pub events: u64,
    /// Outbox partitions (`outbox migrate --partitions`).
    #[arg(long, value_name = "P", default_value_t = 16)]
    pub partitions: u32,
    /// Engine nodes to start.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub nodes: usize,
    /// Approximate size of each JSON payload.
    #[arg(long, value_name = "B", default_value_t = 100)]
    pub payload_bytes: usize,
    /// Distinct aggregate ids (a multiple of --load-connections).
    #[arg(long, value_name = "A", default_value_t = 1000)]
    pub aggregates: usize,
    /// Aggregate types; one topic each.
    #[arg(long, value_delimiter = ',', default_value = "order,invoice")]
    pub aggregate_types: Vec<String>,
    /// Topic prefix; default a fresh `loadgen.drain.<id>.`.
    #[arg(long)]
    pub topic_prefix: Option<String>,
    /// Partitions of the topics it creates.
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub topic_partitions: i32,
    /// Connections that load the backlog in parallel; each owns its own
    /// aggregates, so per-aggregate order is position order.
    #[arg(long, value_name = "N", default_value_t = 2)]
    pub load_connections: usize,
    /// The engine binary.
    #[arg(long, value_name = "PATH", default_value = "target/release/outbox")]
    pub outbox_bin: PathBuf,
    /// An extra `outbox run` flag (repeatable), e.g. `--engine-arg=--batch-size=2000`.
    #[arg(long = "engine-arg", value_name = "ARG", allow_hyphen_values = true)]
    pub engine_args: Vec<String>,
    /// Give up on the drain after this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = 600.0)]
    pub timeout: f64,
    /// Where the engine nodes' logs go.
    #[arg(long, value_name = "DIR", default_value = "target/bench-logs")]
    pub log_dir: PathBuf,
    /// Keep the topics afterwards.
    #[arg(long)]
    pub keep_topics: bool,
    #[command(flatten)]
    pub report: super::ReportArgs,
}

/// A checked `drain` configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DrainConfig {
    /// Password masked.
    pub database: String,
    pub kafka_brokers: String,
    pub schema: String,
    pub events: u64,
    pub partitions: u32,
    pub nodes: usize,
    pub payload_bytes: usize,
    pub aggregates: usize,
    pub aggregate_types: Vec<String>,
    pub topic_prefix: String,
    pub topic_partitions: i32,
    pub load_connections: usize,
    pub timeout_secs: f64,
    pub keep_topics: bool,
}

impl DrainConfig {
    pub fn topics(&self) -> Vec<String> {
        self.aggregate_types
            .iter()
            .map(|t| format!("{}{t}", self.topic_prefix))
            .collect()
    }
}

/// Most events a drain may load: the verifier keeps a slot per event.
pub const MAX_DRAIN_EVENTS: u64 = 100_000_000;

impl DrainArgs {
    pub fn validate(&self) -> Result<DrainConfig> {
        if !(1..=MAX_DRAIN_EVENTS).contains(&self.events) {
            bail!("--events must be between 1 and {MAX_DRAIN_EVENTS}");
        }
        if !(1..=1024).contains(&self.partitions) {
            bail!("--partitions must be between 1 and 1024");
        }
        if !(1..=64).contains(&self.nodes) {
            bail!("--nodes must be between 1 and 64");
        }
        check_payload(self.payload_bytes)?;
        if !(1..=16).contains(&self.load_connections) {
            bail!("--load-connections must be between 1 and 16");
        }
        if self.aggregates == 0 || !self.aggregates.is_multiple_of(self.load_connections) {
            bail!(
                "--aggregates ({}) must be a positive multiple of --load-connections ({})",
                self.aggregates,
                self.load_connections
            );
        }
        if self.topic_partitions < 1 {
            bail!("--topic-partitions must be at least 1");
        }
        if !(self.timeout.is_finite() && self.timeout > 0.0) {
            bail!("--timeout must be a positive number of seconds");
        }
        validate_identifier("--schema", &self.schema)?;
        if self.database_url.trim().is_empty() {
            bail!("--database-url (DATABASE_URL) is empty");
        }
        let topic_prefix = self
            .topic_prefix
            .clone()
            .unwrap_or_else(|| fresh_prefix("loadgen.drain"));
        Ok(DrainConfig {
            database: redact_url(&self.database_url),
            kafka_brokers: self.kafka_brokers.clone(),
            schema: self.schema.clone(),
            events: self.events,
            partitions: self.partitions,
            nodes: self.nodes,
            payload_bytes: self.payload_bytes,
            aggregates: self.aggregates,
            aggregate_types: check_types(&topic_prefix, &self.aggregate_types)?,
            topic_prefix,
            topic_partitions: self.topic_partitions,
            load_connections: self.load_connections,
            timeout_secs: self.timeout,
            keep_topics: self.keep_topics,
        })
    }
}

#[derive(Args, Debug)]
pub struct SuiteArgs {
    /// A PostgreSQL URL whose user may create databases; the suite drops
    /// and creates --bench-database on that server for each configuration.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
    /// Kafka bootstrap servers, host:port[,host:port].
    #[arg(long, env = "KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    pub kafka_brokers: String,
    /// A few minutes instead of about twenty: fewer configurations,
    /// shorter runs, a 500k drain.
    #[arg(long)]
    pub quick: bool,
    /// The engine binary.
    #[arg(long, value_name = "PATH", default_value = "target/release/outbox")]
    pub outbox_bin: PathBuf,
    /// Where results go; README.md there is regenerated.
    #[arg(long, value_name = "DIR", default_value = "bench-results")]
    pub results_dir: PathBuf,
    /// The database dropped and created for each configuration.
    #[arg(long, value_name = "NAME", default_value = "outbox_bench")]
    pub bench_database: String,
    /// Writer connections of every run.
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub writers: usize,
    /// Override the seconds each measurement writes.
    #[arg(long, value_name = "SECS")]
    pub duration: Option<f64>,
    /// Override the size of the drain backlog.
    #[arg(long, value_name = "N")]
    pub drain_events: Option<u64>,
    /// Only the runs whose name contains one of these (repeatable).
    #[arg(long, value_name = "TEXT")]
    pub only: Vec<String>,
    /// An extra `outbox run` flag for every node (repeatable).
    #[arg(long = "engine-arg", value_name = "ARG", allow_hyphen_values = true)]
    pub engine_args: Vec<String>,
    /// What the broker is, for the README (the Kafka protocol does not say).
    #[arg(
        long,
        env = "BENCH_BROKER_LABEL",
        default_value = "tansu 0.6.0, memory storage"
    )]
    pub broker_label: String,
    /// Where engine logs go.
    #[arg(long, value_name = "DIR", default_value = "target/bench-logs")]
    pub log_dir: PathBuf,
    /// Keep each run's topics (deleted by default to free broker memory).
    #[arg(long)]
    pub keep_topics: bool,
}

/// A checked `suite` configuration (no password).
#[derive(Debug, Clone, Serialize)]
pub struct SuiteConfig {
    pub quick: bool,
    pub server: String,
    pub bench_database: String,
    pub kafka_brokers: String,
    pub outbox_bin: PathBuf,
    pub results_dir: PathBuf,
    pub writers: usize,
    pub duration_secs: Option<f64>,
    pub drain_events: Option<u64>,
    pub only: Vec<String>,
    pub engine_args: Vec<String>,
    pub broker_label: String,
    pub log_dir: PathBuf,
    pub keep_topics: bool,
}

impl SuiteArgs {
    pub fn validate(&self) -> Result<SuiteConfig> {
        validate_identifier("--bench-database", &self.bench_database)?;
        if !(1..=256).contains(&self.writers) {
            bail!("--writers must be between 1 and 256");
        }
        if let Some(d) = self.duration {
            if !(d.is_finite() && d > 0.0 && d <= 3_600.0) {
                bail!("--duration must be between 0 and 3600 seconds");
            }
        }
        if let Some(n) = self.drain_events {
            if !(1..=MAX_DRAIN_EVENTS).contains(&n) {
                bail!("--drain-events must be between 1 and {MAX_DRAIN_EVENTS}");
            }
        }
        if self.database_url.trim().is_empty() {
            bail!("--database-url (DATABASE_URL) is empty");
        }
        if self.kafka_brokers.trim().is_empty() {
            bail!("--kafka-brokers (KAFKA_BROKERS) is empty");
        }
        Ok(SuiteConfig {
            quick: self.quick,
            server: redact_url(&self.database_url),
            bench_database: self.bench_database.clone(),
            kafka_brokers: self.kafka_brokers.clone(),
            outbox_bin: self.outbox_bin.clone(),
            results_dir: self.results_dir.clone(),
            writers: self.writers,
            duration_secs: self.duration,
            drain_events: self.drain_events,
            only: self.only.clone(),
            engine_args: self.engine_args.clone(),
            broker_label: self.broker_label.clone(),
            log_dir: self.log_dir.clone(),
            keep_topics: self.keep_topics,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Cli, Command};
    use clap::Parser;

    fn command(args: &[&str]) -> Command {
        let mut argv = vec!["loadgen"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv).expect("parses").command
    }

    #[test]
    fn broker_ceiling_gets_a_fresh_prefix() {
        let Command::BrokerCeiling(a) = command(&["broker-ceiling", "--payload-bytes", "100"])
        else {
            panic!("broker-ceiling");
        };
        let c = a.validate().expect("valid");
        assert!(
            c.topic_prefix.starts_with("loadgen.broker."),
            "{}",
            c.topic_prefix
        );
        assert_eq!(c.topics().len(), 2);
        let again = a.validate().expect("valid");
        assert_ne!(c.topic_prefix, again.topic_prefix);
    }

    #[test]
    fn drain_flags_are_checked() {
        let parse = |extra: &[&str]| {
            let mut args = vec!["drain", "--database-url", "postgres://u:pw@h/db"];
            args.extend_from_slice(extra);
            match command(&args) {
                Command::Drain(a) => a.validate(),
                _ => unreachable!(),
            }
        };
        let c = parse(&["--engine-arg=--batch-size=2000"]).expect("valid");
        assert_eq!((c.events, c.partitions, c.nodes), (5_000_000, 16, 1));
        assert!(!c.database.contains("pw"));
        let err = |extra: &[&str]| parse(extra).unwrap_err().to_string();
        assert!(err(&["--aggregates", "999"]).contains("--aggregates"));
        assert!(err(&["--events", "0"]).contains("--events"));
        assert!(err(&["--schema", "x-y"]).contains("--schema"));
    }

    #[test]
    fn suite_flags_are_checked() {
        let parse = |extra: &[&str]| {
            let mut args = vec!["suite", "--database-url", "postgres://u:pw@h/db"];
            args.extend_from_slice(extra);
            match command(&args) {
                Command::Suite(a) => a.validate(),
                _ => unreachable!(),
            }
        };
        let c = parse(&["--quick", "--engine-arg", "--batch-size=500"]).expect("valid");
        assert!(c.quick);
        assert_eq!(c.engine_args, ["--batch-size=500"]);
        assert!(!c.server.contains("pw"));
        assert!(parse(&["--bench-database", "drop table"]).is_err());
        assert!(parse(&["--duration", "0"]).is_err());
    }
}
