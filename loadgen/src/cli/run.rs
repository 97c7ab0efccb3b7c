//! The `run` (and `db-ceiling`) flags, checked into a typed [`RunConfig`]
//! before anything connects. The config is also what the report records,
//! so it never holds the database password.

use std::time::Duration;

use anyhow::{bail, Result};
use clap::Args;
use serde::{Deserialize, Serialize};

use outbox_engine::config::{redact_url, validate_identifier};
use outbox_engine::sink::routing;

use super::Mode;

/// Most events in one transaction; the `sql` mode binds six parameters per
/// event and PostgreSQL allows 65,535 per statement.
pub const MAX_EVENTS_PER_TX: usize = 10_000;
/// Largest padded payload.
pub const MAX_PAYLOAD_BYTES: usize = 1 << 20;

#[derive(Args, Debug)]
pub struct RunArgs {
    /// PostgreSQL URL of a migrated outbox database.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
    /// Kafka bootstrap servers, host:port[,host:port].
    #[arg(long, env = "KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    pub kafka_brokers: String,
    /// Schema of the outbox tables (the business table goes there too).
    #[arg(long, env = "OUTBOX_SCHEMA", default_value = "public")]
    pub schema: String,
    /// Target events per second, open loop; 0 writes as fast as possible.
    #[arg(long, value_name = "EVENTS_PER_SEC", default_value_t = 1000.0)]
    pub rate: f64,
    /// How long to write, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    pub duration: f64,
    /// Concurrent writer tasks, each with its own connection.
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub writers: usize,
    /// Outbox events per transaction (each also writes one business row).
    #[arg(long, value_name = "K", default_value_t = 1)]
    pub events_per_tx: usize,
    /// Approximate size of each JSON payload, padding included.
    #[arg(long, value_name = "B", default_value_t = 256)]
    pub payload_bytes: usize,
    /// Distinct aggregate ids; each belongs to one writer, so its events are
    /// written in order.
    #[arg(long, value_name = "A", default_value_t = 1000)]
    pub aggregates: usize,
    /// Aggregate types, comma separated; aggregates are spread over them.
    #[arg(
        long,
        value_name = "TYPES",
        value_delimiter = ',',
        default_value = "order,invoice"
    )]
    pub aggregate_types: Vec<String>,
    /// Prefix of the topics the engine publishes to (`<prefix><type>`).
    #[arg(long, env = "OUTBOX_TOPIC_PREFIX", default_value = "outbox.event.")]
    pub topic_prefix: String,
    /// Partitions of topics loadgen creates when they do not exist yet.
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub topic_partitions: i32,
    /// How events are inserted.
    #[arg(long, value_enum, default_value_t = Mode::Api)]
    pub mode: Mode,
    /// How long to wait after writing for every event to arrive.
    #[arg(long, value_name = "SECS", default_value_t = 30.0)]
    pub drain_timeout: f64,
    /// `run` only: no consumer. The engine must be running; after the
    /// load, wait (up to the drain timeout) for the outbox to empty. For
    /// the application's commit rate while the engine relays.
    #[arg(long)]
    pub no_verify: bool,
    /// `run` only: the verifier also consumes through the consumer inbox
    /// (tables in `--schema`, a consumer group of the run's own) and the
    /// report counts `inbox.duplicates_delivered` and `inbox.applied_twice`.
    #[arg(long, conflicts_with = "no_verify")]
    pub inbox: bool,
    #[command(flatten)]
    pub report: super::ReportArgs,
}

/// A checked `run` configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunConfig {
    /// Password masked; connect with [`RunArgs::database_url`].
    pub database: String,
    pub kafka_brokers: String,
    pub schema: String,
    /// Events per second; 0 is closed loop (as fast as possible).
    pub rate: f64,
    pub duration_secs: f64,
    pub writers: usize,
    pub events_per_tx: usize,
    pub payload_bytes: usize,
    pub aggregates: usize,
    pub aggregate_types: Vec<String>,
    pub topic_prefix: String,
    pub topic_partitions: i32,
    pub mode: Mode,
    pub drain_timeout_secs: f64,
    /// Consume through the consumer inbox too (false in reports written
    /// before the flag existed).
    #[serde(default)]
    pub inbox: bool,
}

impl RunConfig {
    pub fn duration(&self) -> Duration {
        Duration::from_secs_f64(self.duration_secs)
    }

    pub fn drain_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.drain_timeout_secs)
    }

    /// The topic of each aggregate type, in `aggregate_types` order.
    pub fn topics(&self) -> Vec<String> {
        self.aggregate_types
            .iter()
            .map(|t| format!("{}{t}", self.topic_prefix))
            .collect()
    }
}

impl RunArgs {
    /// Checks every flag; the error names the flag.
    pub fn validate(&self) -> Result<RunConfig> {
        if !(self.rate.is_finite() && self.rate >= 0.0) {
            bail!("--rate must be a number >= 0 (0 = as fast as possible)");
        }
        if !(self.duration.is_finite() && self.duration > 0.0 && self.duration <= 86_400.0) {
            bail!("--duration must be between 0 and 86400 seconds");
        }
        if !(self.drain_timeout.is_finite() && (0.0..=86_400.0).contains(&self.drain_timeout)) {
            bail!("--drain-timeout must be between 0 and 86400 seconds");
        }
        if !(1..=1024).contains(&self.writers) {
            bail!("--writers must be between 1 and 1024");
        }
        if !(1..=MAX_EVENTS_PER_TX).contains(&self.events_per_tx) {
            bail!("--events-per-tx must be between 1 and {MAX_EVENTS_PER_TX}");
        }
        if self.payload_bytes > MAX_PAYLOAD_BYTES {
            bail!("--payload-bytes must be at most {MAX_PAYLOAD_BYTES}");
        }
        if self.aggregates < self.writers {
            bail!(
                "--aggregates ({}) must be at least --writers ({}): each writer owns its own aggregates",
                self.aggregates,
                self.writers
            );
        }
        if self.topic_partitions < 1 {
            bail!("--topic-partitions must be at least 1");
        }
        validate_identifier("--schema", &self.schema)?;
        let mut types: Vec<String> = Vec::new();
        for t in &self.aggregate_types {
            let t = t.trim();
            if t.is_empty() {
                bail!("--aggregate-types: empty type in the list");
            }
            routing::check_topic(&format!("{}{t}", self.topic_prefix))
                .map_err(|e| anyhow::anyhow!("--aggregate-types / --topic-prefix: {e}"))?;
            if !types.iter().any(|x| x == t) {
                types.push(t.to_string());
            }
        }
        if types.is_empty() {
            bail!("--aggregate-types must name at least one type");
        }
        if self.kafka_brokers.trim().is_empty() {
            bail!("--kafka-brokers (KAFKA_BROKERS) is empty");
        }
        if self.database_url.trim().is_empty() {
            bail!("--database-url (DATABASE_URL) is empty");
        }
        Ok(RunConfig {
            database: redact_url(&self.database_url),
            kafka_brokers: self.kafka_brokers.clone(),
            schema: self.schema.clone(),
            rate: self.rate,
            duration_secs: self.duration,
            writers: self.writers,
            events_per_tx: self.events_per_tx,
            payload_bytes: self.payload_bytes,
            aggregates: self.aggregates,
            aggregate_types: types,
            topic_prefix: self.topic_prefix.clone(),
            topic_partitions: self.topic_partitions,
            mode: self.mode,
            drain_timeout_secs: self.drain_timeout,
            inbox: self.inbox,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Cli, Command};
    use super::*;
    use clap::Parser;

    fn parse(extra: &[&str]) -> RunArgs {
        let mut argv = vec!["loadgen", "run", "--database-url", "postgres://u:pw@h/db"];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv).expect("parses").command {
            Command::Run(a) => a,
            _ => unreachable!("parsed as run"),
        }
    }

    #[test]
    fn defaults_are_valid_and_the_password_is_masked() {
        let c = parse(&[]).validate().expect("valid");
        assert_eq!(c.aggregate_types, ["order", "invoice"]);
        assert_eq!(c.topics(), ["outbox.event.order", "outbox.event.invoice"]);
        assert!(!c.database.contains("pw"), "{}", c.database);
        assert_eq!(c.mode, Mode::Api);
        assert!(!c.inbox);
        assert!(parse(&["--inbox"]).validate().expect("valid").inbox);
    }

    #[test]
    fn bad_flags_are_named() {
        let err = |args: &[&str]| parse(args).validate().unwrap_err().to_string();
        assert!(err(&["--writers", "8", "--aggregates", "4"]).contains("--aggregates"));
        assert!(err(&["--rate=-1"]).contains("--rate"));
        assert!(err(&["--duration", "0"]).contains("--duration"));
        assert!(err(&["--events-per-tx", "0"]).contains("--events-per-tx"));
        assert!(err(&["--aggregate-types", "a b"]).contains("--aggregate-types"));
        assert!(err(&["--aggregate-types", "a,,b"]).contains("empty"));
        assert!(err(&["--schema", "Bad-Schema"]).contains("--schema"));
    }

    #[test]
    fn types_are_trimmed_and_deduplicated() {
        let c = parse(&["--aggregate-types", "order, invoice,order"])
            .validate()
            .expect("valid");
        assert_eq!(c.aggregate_types, ["order", "invoice"]);
    }
}
