//! Typed configuration with defaults, layered from an optional TOML file,
//! `OUTBOX_`-prefixed environment variables and flags (figment merges them;
//! [`Layers`]), then validated before anything connects. An error names the
//! key, its value and where that came from. Secrets never appear in `Debug`
//! output nor in errors.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use serde::{Deserialize, Serialize};
use sqlx::postgres::PgConnectOptions;

use crate::error::ConfigError;

/// The whole engine configuration; every section has defaults.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub database: DatabaseConfig,
    pub kafka: KafkaConfig,
    pub relay: RelayConfig,
    pub cluster: ClusterConfig,
    pub http: HttpConfig,
    pub source: SourceConfig,
    pub cdc: CdcConfig,
}

impl Config {
    /// Reads a TOML file alone (no environment, no flags), not yet validated.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        Layers::new().file(path)?.load().map(Layered::into_config)
    }

    /// Reads TOML text alone, not yet validated.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        Layers::new()
            .toml("config file", text)?
            .load()
            .map(Layered::into_config)
    }

    /// Checks every field that can be checked without connecting anywhere.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.database.validate()?;
        self.kafka.validate()?;
        self.relay.validate()?;
        self.cluster.validate()?;
        self.http.validate()?;
        self.source.validate()?;
        self.cdc.validate()?;
        Ok(())
    }

    /// The URL logical replication connects to: `cdc.database_url`, or the
    /// main `database.url` when that is not set.
    pub fn cdc_database_url(&self) -> &DatabaseUrl {
        self.cdc.database_url.as_ref().unwrap_or(&self.database.url)
    }
}

/// Where the relay learns of new events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// Fetch pending rows from the outbox partitions.
    #[default]
    Poll,
    /// Follow the outbox through PostgreSQL logical replication.
    Cdc,
}

/// Which event source the relay runs (`source.kind`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SourceConfig {
    pub kind: SourceKind,
}

impl SourceConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        // Every kind the enum can hold is runnable; `[cdc]` checks its own keys.
        Ok(())
    }
}

/// The logical-replication source (`source.kind = "cdc"`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CdcConfig {
    /// Replication connection URL; `None` uses `database.url`. Masked like it.
    pub database_url: Option<DatabaseUrl>,
    /// Replication slot the engine creates and consumes.
    pub slot: String,
    /// Publication covering the outbox tables.
    pub publication: String,
    /// How often the source proves it is alive when no change arrives.
    pub heartbeat_ms: u64,
    /// How often the consumed position is reported to the server.
    pub status_interval_ms: u64,
    /// Most decoded events held before the source stops reading.
    pub buffer_events: usize,
}

impl Default for CdcConfig {
    fn default() -> Self {
        Self {
            database_url: None,
            slot: "outbox_slot".into(),
            publication: "outbox_pub".into(),
            heartbeat_ms: 1_000,
            status_interval_ms: 200,
            buffer_events: 100_000,
        }
    }
}

impl CdcConfig {
    pub fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.heartbeat_ms)
    }

    pub fn status_interval(&self) -> Duration {
        Duration::from_millis(self.status_interval_ms)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if let Some(url) = &self.database_url {
            postgres_options("cdc.database_url", url)?;
        }
        validate_identifier("cdc.slot", &self.slot)?;
        validate_identifier("cdc.publication", &self.publication)?;
        if self.heartbeat_ms < 100 {
            return Err(ConfigError::new(
                "cdc.heartbeat_ms",
                format!("must be at least 100, got {}", self.heartbeat_ms),
            ));
        }
        if self.status_interval_ms < 10 {
            return Err(ConfigError::new(
                "cdc.status_interval_ms",
                format!("must be at least 10, got {}", self.status_interval_ms),
            ));
        }
        if self.buffer_events < 1_000 {
            return Err(ConfigError::new(
                "cdc.buffer_events",
                format!("must be at least 1000, got {}", self.buffer_events),
            ));
        }
        Ok(())
    }
}

/// The operations endpoint (`/metrics`, `/healthz`, `/readyz`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// `host:port` to listen on, or `off`. Port 0 picks a free port.
    pub addr: String,
}

/// Where the operations endpoint listens unless told otherwise: localhost only.
pub const DEFAULT_HTTP_ADDR: &str = "127.0.0.1:9090";

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            addr: DEFAULT_HTTP_ADDR.into(),
        }
    }
}

impl HttpConfig {
    /// The address to listen on; `None` when disabled.
    pub fn socket_addr(&self) -> Result<Option<std::net::SocketAddr>, ConfigError> {
        if self.addr.eq_ignore_ascii_case("off") {
            return Ok(None);
        }
        self.addr.parse().map(Some).map_err(|_| {
            ConfigError::new(
                "http.addr",
                format!("{:?} is not ip:port (or off)", self.addr),
            )
        })
    }

    fn validate(&self) -> Result<(), ConfigError> {
        self.socket_addr().map(|_| ())
    }
}

/// A database URL whose password is masked wherever it is shown.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct DatabaseUrl(String);

impl DatabaseUrl {
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }

    /// The URL with its secret, for connecting only.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<'de> Deserialize<'de> for DatabaseUrl {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(DatabaseUrl)
    }
}

impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact_url(&self.0))
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", redact_url(&self.0))
    }
}

/// Masks the password of `scheme://user:password@host/...` and any
/// `password=` query parameter.
pub fn redact_url(url: &str) -> String {
    let mut out = url.to_string();
    if let Some(scheme_end) = out.find("://") {
        let rest_start = scheme_end + 3;
        let authority_end = out[rest_start..]
            .find(['/', '?'])
            .map(|i| rest_start + i)
            .unwrap_or(out.len());
        if let Some(at) = out[rest_start..authority_end].rfind('@') {
            let userinfo = &out[rest_start..rest_start + at];
            if let Some(colon) = userinfo.find(':') {
                let start = rest_start + colon + 1;
                out.replace_range(start..rest_start + at, "****");
            }
        }
    }
    if let Some(q) = out.find('?') {
        let (head, query) = out.split_at(q + 1);
        let query: Vec<String> = query
            .split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=****"),
                _ => kv.to_string(),
            })
            .collect();
        out = format!("{head}{}", query.join("&"));
    }
    out
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// `postgres://user:password@host:port/db?sslmode=...`; also `DATABASE_URL`.
    pub url: DatabaseUrl,
    /// Schema holding the outbox tables.
    pub schema: String,
    pub max_connections: u32,
    pub connect_timeout_ms: u64,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: DatabaseUrl::default(),
            schema: "public".into(),
            max_connections: 16,
            connect_timeout_ms: 5_000,
        }
    }
}

impl DatabaseConfig {
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    /// Parsed connection options; the error names the field, never the password.
    pub fn connect_options(&self) -> Result<PgConnectOptions, ConfigError> {
        if self.url.is_empty() {
            return Err(ConfigError::new(
                "database.url",
                "not set (use --database-url, DATABASE_URL or [database] url)",
            ));
        }
        postgres_options("database.url", &self.url)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        self.connect_options()?;
        validate_identifier("database.schema", &self.schema)?;
        if self.max_connections < 2 {
            return Err(ConfigError::new(
                "database.max_connections",
                "must be at least 2",
            ));
        }
        if self.connect_timeout_ms == 0 {
            return Err(ConfigError::new(
                "database.connect_timeout_ms",
                "must be positive",
            ));
        }
        Ok(())
    }
}

/// Parses a `postgres://` URL; the error names `field`, never the password.
fn postgres_options(field: &str, url: &DatabaseUrl) -> Result<PgConnectOptions, ConfigError> {
    let text = url.expose();
    if !(text.starts_with("postgres://") || text.starts_with("postgresql://")) {
        return Err(ConfigError::new(
            field,
            format!("{url} is not a postgres:// URL"),
        ));
    }
    PgConnectOptions::from_str(text).map_err(|e| ConfigError::new(field, format!("{url}: {e}")))
}

/// A SQL identifier we are willing to paste into statements: lowercase
/// letters, digits and underscores, starting with a letter or underscore.
pub fn validate_identifier(field: &str, ident: &str) -> Result<(), ConfigError> {
    let ok = !ident.is_empty()
        && ident.len() <= 48
        && ident
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && ident
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(ConfigError::new(
            field,
            format!(
                "{ident:?} is not a plain identifier (lowercase letters, digits, _; at most 48)"
            ),
        ))
    }
}

/// Whether `name` is a legal Kafka topic name (or prefix of one).
pub fn is_valid_topic_chars(name: &str) -> bool {
    name.chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Bootstrap servers, `host:port[,host:port]`; also `KAFKA_BROKERS`.
    pub brokers: String,
    /// Topic of an event without override: `<topic_prefix><aggregate_type>`.
    pub topic_prefix: String,
    /// Create missing topics through the admin API.
    pub create_topics: bool,
    /// Partitions of topics the engine creates.
    pub topic_partitions: i32,
    /// Replication factor of topics the engine creates.
    pub topic_replication: i32,
    /// The longest a message may take to reach the broker (librdkafka's
    /// `message.timeout.ms`): a message not delivered by then fails and is
    /// sent again from the outbox. A node taking over a lease that expired
    /// waits this long (plus a margin) past the expiry before it sends, so
    /// nothing the old owner sent can land after the new owner's messages.
    pub delivery_timeout_ms: u64,
    /// Passed to librdkafka as is (`security.protocol`, `sasl.*`, `linger.ms`...).
    pub properties: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: String::new(),
            topic_prefix: "outbox.event.".into(),
            create_topics: true,
            topic_partitions: 8,
            topic_replication: 1,
            delivery_timeout_ms: DEFAULT_DELIVERY_TIMEOUT_MS,
            properties: BTreeMap::new(),
        }
    }
}

/// Default of `kafka.delivery_timeout_ms`.
pub const DEFAULT_DELIVERY_TIMEOUT_MS: u64 = 10_000;

/// librdkafka properties the engine derives from its own keys.
const RESERVED_PROPERTIES: &[(&str, &str)] = &[
    ("message.timeout.ms", "kafka.delivery_timeout_ms"),
    ("delivery.timeout.ms", "kafka.delivery_timeout_ms"),
    ("request.timeout.ms", "kafka.delivery_timeout_ms"),
    ("bootstrap.servers", "kafka.brokers"),
    ("enable.idempotence", "(always on)"),
];

/// Whether a librdkafka property holds a secret.
pub fn is_secret_property(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    k.contains("password") || k.contains("secret") || k.ends_with(".key") || k.contains("token")
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let props: BTreeMap<&str, &str> = self
            .properties
            .iter()
            .map(|(k, v)| {
                let v = if is_secret_property(k) {
                    "****"
                } else {
                    v.as_str()
                };
                (k.as_str(), v)
            })
            .collect();
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("topic_prefix", &self.topic_prefix)
            .field("create_topics", &self.create_topics)
            .field("topic_partitions", &self.topic_partitions)
            .field("topic_replication", &self.topic_replication)
            .field("delivery_timeout_ms", &self.delivery_timeout_ms)
            .field("properties", &props)
            .finish()
    }
}

impl KafkaConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.brokers.trim().is_empty() {
            return Err(ConfigError::new(
                "kafka.brokers",
                "not set (use --kafka-brokers, KAFKA_BROKERS or [kafka] brokers)",
            ));
        }
        for broker in self.brokers.split(',') {
            let broker = broker.trim();
            let port = broker.rsplit_once(':').map(|(_, p)| p);
            if broker.is_empty() || port.and_then(|p| p.parse::<u16>().ok()).is_none() {
                return Err(ConfigError::new(
                    "kafka.brokers",
                    format!("{broker:?} is not host:port"),
                ));
            }
        }
        if self.topic_prefix.len() > 200 || !is_valid_topic_chars(&self.topic_prefix) {
            return Err(ConfigError::new(
                "kafka.topic_prefix",
                format!(
                    "{:?} may hold only letters, digits, '.', '_' and '-'",
                    self.topic_prefix
                ),
            ));
        }
        if self.topic_partitions < 1 {
            return Err(ConfigError::new(
                "kafka.topic_partitions",
                "must be at least 1",
            ));
        }
        if !(1_000..=600_000).contains(&self.delivery_timeout_ms) {
            return Err(ConfigError::new(
                "kafka.delivery_timeout_ms",
                format!(
                    "must be between 1000 and 600000, got {}",
                    self.delivery_timeout_ms
                ),
            ));
        }
        for (property, key) in RESERVED_PROPERTIES {
            if self.properties.contains_key(*property) {
                return Err(ConfigError::new(
                    format!("kafka.properties.\"{property}\""),
                    format!("is set by the engine; use {key} instead"),
                ));
            }
        }
        if self.topic_replication < 1 && self.topic_replication != -1 {
            return Err(ConfigError::new(
                "kafka.topic_replication",
                "must be at least 1 (or -1 for the broker's default)",
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelayConfig {
    /// Most events fetched and sent as one batch.
    pub batch_size: usize,
    /// Batches of one partition that may be in flight to the broker at once.
    pub max_inflight_batches: usize,
    /// How long an idle partition waits before fetching again.
    pub poll_interval_ms: u64,
    /// How long a caught-up partition waits for its doorbell (the source
    /// saw new rows for it) before it looks anyway.
    pub idle_poll_ms: u64,
    /// Ignored since schema version 5 (nothing is deleted, so nothing is
    /// vacuumed); accepted so that older configuration files still load.
    pub vacuum_threshold_rows: u64,
    /// Ignored since schema version 5, like `vacuum_threshold_rows`.
    pub vacuum_interval_ms: u64,
    /// How long a graceful stop may take to drain in-flight batches.
    pub shutdown_timeout_ms: u64,
    /// Backoff after a failure, growing with jitter from min to max.
    pub retry_backoff_min_ms: u64,
    pub retry_backoff_max_ms: u64,
    /// What to do with an event the broker refuses for good.
    pub poison_policy: PoisonPolicy,
    /// Tries of such an event before the policy applies.
    pub max_attempts: u32,
}

/// What happens to an event the broker refuses for good (too large, invalid
/// topic, not authorized) once its attempts are used up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum PoisonPolicy {
    /// Move it to `outbox_dead_letters`; the partition goes on.
    Park,
    /// Keep retrying it: strict order, the partition stops until an operator acts.
    Block,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            batch_size: 2000,
            max_inflight_batches: 2,
            // 10 ms cost the application: at 1 event per transaction its
            // commit rate with the engine relaying was 0.46 of the rate
            // without, against 0.61 at 50 ms, and p99 latency at 5,000
            // events/s was 199 ms against 88 ms (bench-results/v2/
            // poll-interval-ab): a fetch per shard for every event or two.
            poll_interval_ms: 50,
            idle_poll_ms: 2_000,
            vacuum_threshold_rows: 50_000,
            vacuum_interval_ms: 10_000,
            shutdown_timeout_ms: 30_000,
            retry_backoff_min_ms: 100,
            retry_backoff_max_ms: 5_000,
            poison_policy: PoisonPolicy::Park,
            max_attempts: 5,
        }
    }
}

impl RelayConfig {
    pub fn poll_interval(&self) -> Duration {
        Duration::from_millis(self.poll_interval_ms)
    }

    pub fn idle_poll(&self) -> Duration {
        Duration::from_millis(self.idle_poll_ms.max(self.poll_interval_ms))
    }
    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_millis(self.shutdown_timeout_ms)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=100_000).contains(&self.batch_size) {
            return Err(ConfigError::new(
                "relay.batch_size",
                "must be between 1 and 100000",
            ));
        }
        if !(1..=64).contains(&self.max_inflight_batches) {
            return Err(ConfigError::new(
                "relay.max_inflight_batches",
                "must be between 1 and 64",
            ));
        }
        if self.max_attempts == 0 {
            return Err(ConfigError::new("relay.max_attempts", "must be at least 1"));
        }
        if self.retry_backoff_min_ms == 0 || self.retry_backoff_max_ms < self.retry_backoff_min_ms {
            return Err(ConfigError::new(
                "relay.retry_backoff_max_ms",
                "backoff must satisfy 0 < retry_backoff_min_ms <= retry_backoff_max_ms",
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// This node's name; unique among live nodes.
    pub node_id: String,
    /// A lease not renewed for this long may be taken by another node.
    pub lease_ttl_ms: u64,
    /// How often leases are renewed and the assignment is revisited.
    pub heartbeat_interval_ms: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            node_id: default_node_id(),
            lease_ttl_ms: 5_000,
            heartbeat_interval_ms: 1_000,
        }
    }
}

fn default_node_id() -> String {
    let host = gethostname::gethostname();
    let host = host.to_string_lossy();
    let host = host.trim();
    if host.is_empty() {
        "node".into()
    } else {
        host.into()
    }
}

impl ClusterConfig {
    pub fn lease_ttl(&self) -> Duration {
        Duration::from_millis(self.lease_ttl_ms)
    }
    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.heartbeat_interval_ms)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let id = &self.node_id;
        if id.is_empty()
            || id.len() > 64
            || !id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        {
            return Err(ConfigError::new(
                "cluster.node_id",
                format!("{id:?} must be 1-64 letters, digits, '.', '_' or '-'"),
            ));
        }
        if self.lease_ttl_ms < 500 {
            return Err(ConfigError::new(
                "cluster.lease_ttl_ms",
                "must be at least 500",
            ));
        }
        if self.heartbeat_interval_ms == 0 || self.heartbeat_interval_ms * 2 > self.lease_ttl_ms {
            return Err(ConfigError::new(
                "cluster.heartbeat_interval_ms",
                "must be positive and at most half of cluster.lease_ttl_ms",
            ));
        }
        Ok(())
    }
}

/// A value given on the command line: the key it sets and the flag that set it.
pub struct Flag {
    key: &'static str,
    flag: &'static str,
    value: Result<Value, String>,
}

impl Flag {
    /// The key it sets.
    pub fn key(&self) -> &'static str {
        self.key
    }

    /// The flag as typed.
    pub fn flag(&self) -> &'static str {
        self.flag
    }

    /// `key` is the file key (`relay.batch_size`), `flag` what the user typed (`--batch-size`).
    pub fn new<T: Serialize>(key: &'static str, flag: &'static str, value: T) -> Self {
        Self {
            key,
            flag,
            value: Value::serialize(value).map_err(|e| e.to_string()),
        }
    }
}

/// Every key is also read from `OUTBOX_<SECTION>__<KEY>` (`OUTBOX_RELAY__BATCH_SIZE`).
pub const ENV_PREFIX: &str = "OUTBOX_";
/// Separates the levels of a key in an environment variable's name.
pub const ENV_SEPARATOR: &str = "__";

/// Environment variables that set one key under a conventional or older
/// name. Where both are set, the `OUTBOX_<SECTION>__<KEY>` form wins.
pub const ENV_ALIASES: &[(&str, &str)] = &[
    ("DATABASE_URL", "database.url"),
    ("OUTBOX_SCHEMA", "database.schema"),
    ("KAFKA_BROKERS", "kafka.brokers"),
    ("OUTBOX_TOPIC_PREFIX", "kafka.topic_prefix"),
    ("OUTBOX_DELIVERY_TIMEOUT_MS", "kafka.delivery_timeout_ms"),
    ("OUTBOX_NODE_ID", "cluster.node_id"),
    ("OUTBOX_HTTP_ADDR", "http.addr"),
    ("OUTBOX_SOURCE", "source.kind"),
];

/// The key an environment variable sets, as path segments; `None` for a
/// variable that is not configuration (`OUTBOX_CONFIG`, `PATH`).
///
/// librdkafka property names have dots where a variable name cannot, so
/// below `kafka.properties` each `_` stands for a dot:
/// `OUTBOX_KAFKA__PROPERTIES__SASL_PASSWORD` sets `"sasl.password"`.
pub fn env_key(name: &str) -> Option<Vec<String>> {
    if let Some((_, key)) = ENV_ALIASES.iter().find(|(alias, _)| *alias == name) {
        return Some(key.split('.').map(String::from).collect());
    }
    let rest = name.strip_prefix(ENV_PREFIX)?;
    if !rest.contains(ENV_SEPARATOR) {
        return None;
    }
    let mut path: Vec<String> = rest
        .split(ENV_SEPARATOR)
        .map(|s| s.to_ascii_lowercase())
        .collect();
    if path.len() > 2 && path[0] == "kafka" && path[1] == "properties" {
        let property = path.split_off(2).join(".").replace('_', ".");
        path.push(property);
    }
    Some(path)
}

/// Every key of the configuration (`relay.batch_size`, `kafka.properties`),
/// section by section, as serde knows them: an unknown key's error lists
/// the known ones.
pub fn keys() -> Vec<String> {
    fn known(path: &[String]) -> &'static [&'static str] {
        let mut probe = path.to_vec();
        probe.push("\u{1}".into());
        let layer = Layer::one("probe".into(), &probe, Value::from(0u8));
        match Figment::from(layer).extract::<Config>() {
            Err(e) => match e.kind {
                figment::error::Kind::UnknownField(_, known) => known,
                _ => &[],
            },
            Ok(_) => &[],
        }
    }
    known(&[])
        .iter()
        .flat_map(|section| {
            known(&[section.to_string()])
                .iter()
                .map(move |key| format!("{section}.{key}"))
        })
        .collect()
}

/// The key as it is written in messages: `relay.batch_size`,
/// `kafka.properties."sasl.password"`.
fn show_key(path: &[String]) -> String {
    let parts: Vec<String> = path
        .iter()
        .map(|p| {
            if p.contains('.') {
                format!("{p:?}")
            } else {
                p.clone()
            }
        })
        .collect();
    parts.join(".")
}

/// The inverse of [`show_key`], for the field a [`ConfigError`] names.
fn parse_key(key: &str) -> Vec<String> {
    let mut path = Vec::new();
    let mut part = String::new();
    let mut quoted = false;
    for c in key.chars() {
        match c {
            '"' => quoted = !quoted,
            '.' if !quoted => path.push(std::mem::take(&mut part)),
            c => part.push(c),
        }
    }
    path.push(part);
    path
}

/// A string at `path` as messages show it: secret properties masked,
/// URLs without their password.
fn mask(path: &[String], s: &str) -> String {
    if path.iter().any(|p| is_secret_property(p)) {
        "****".into()
    } else {
        redact_url(s)
    }
}

/// A value as messages show it: secrets masked, tables and arrays not
/// spelled out (a mistyped section may hold secrets).
fn show_value(path: &[String], value: &Value) -> String {
    match value {
        Value::String(_, s) => format!("{:?}", mask(path, s)),
        Value::Dict(..) => "{...}".into(),
        Value::Array(..) => "[...]".into(),
        Value::Empty(..) => "none".into(),
        _ if path.iter().any(|p| is_secret_property(p)) => "****".into(),
        other => serde_json::to_string(other).unwrap_or_else(|_| "?".into()),
    }
}

fn line_at(text: &str, offset: usize) -> usize {
    text.get(..offset).unwrap_or(text).matches('\n').count() + 1
}

/// The line of `path`'s key in a TOML text, if it is written there.
fn line_of(text: &str, path: &[String]) -> Option<usize> {
    let doc = toml_edit::ImDocument::parse(text).ok()?;
    let mut table: &dyn toml_edit::TableLike = doc.as_table();
    let mut span = None;
    for (i, segment) in path.iter().enumerate() {
        let (key, item) = table.get_key_value(segment)?;
        span = key.span().or_else(|| item.span());
        if i + 1 < path.len() {
            table = item.as_table_like()?;
        }
    }
    span.map(|s| line_at(text, s.start))
}

fn find<'a>(dict: &'a Dict, path: &[String]) -> Option<&'a Value> {
    let (first, rest) = path.split_first()?;
    let value = dict.get(first)?;
    match (rest.is_empty(), value) {
        (true, v) => Some(v),
        (false, Value::Dict(_, inner)) => find(inner, rest),
        (false, _) => None,
    }
}

/// One layer's values under the name of where they came from. Each file,
/// environment variable and flag is its own provider, so the tag figment
/// puts on every value names exactly one origin.
#[derive(Clone)]
struct Layer {
    origin: String,
    dict: Dict,
}

impl Layer {
    fn one(origin: String, path: &[String], value: Value) -> Self {
        let value = path
            .iter()
            .rev()
            .fold(value, |v, key| Value::from(Dict::from([(key.clone(), v)])));
        let dict = value.into_dict().unwrap_or_default();
        Self { origin, dict }
    }
}

impl Provider for Layer {
    fn metadata(&self) -> Metadata {
        Metadata::named(self.origin.clone())
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Ok(Map::from([(Profile::Default, self.dict.clone())]))
    }
}

#[derive(Clone)]
struct FileLayer {
    layer: Layer,
    text: String,
}

/// Builds a [`Config`] from its layers, lowest precedence first: defaults,
/// a TOML file, environment variables, flags. Every value keeps the name of
/// where it came from, for errors and for `check-config`.
#[derive(Default)]
pub struct Layers {
    file: Option<FileLayer>,
    env: Vec<Layer>,
    flags: Vec<Layer>,
}

impl Layers {
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads a TOML file. Unknown keys are errors, so typos do not pass silently.
    pub fn file(self, path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::new("--config", format!("{}: {e}", path.display())))?;
        self.toml(format!("config file {}", path.display()), &text)
    }

    /// TOML text under the name `origin` (`config file /etc/outbox.toml`).
    pub fn toml(mut self, origin: impl Into<String>, text: &str) -> Result<Self, ConfigError> {
        let origin = origin.into();
        let table: toml::Table = toml::from_str(text).map_err(|e| {
            // toml's message spans several lines with a caret; keep it one line.
            let at = e
                .span()
                .map(|s| format!(" (line {})", line_at(text, s.start)))
                .unwrap_or_default();
            let message = e.message().trim().replace('\n', "; ");
            ConfigError::new(origin.clone(), format!("{message}{at}"))
        })?;
        let dict = Value::serialize(&table)
            .ok()
            .and_then(Value::into_dict)
            .ok_or_else(|| ConfigError::new(origin.clone(), "is not a TOML table"))?;
        self.file = Some(FileLayer {
            layer: Layer { origin, dict },
            text: text.to_string(),
        });
        Ok(self)
    }

    /// Environment variables (`std::env::vars_os()`); those that are not
    /// configuration (see [`env_key`]) are ignored.
    pub fn env<I, K, V>(mut self, vars: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<std::ffi::OsString>,
        V: Into<std::ffi::OsString>,
    {
        let mut aliases = Vec::new();
        let mut nested = Vec::new();
        for (name, value) in vars {
            let Ok(name) = name.into().into_string() else {
                continue;
            };
            let Some(path) = env_key(&name) else {
                continue;
            };
            let origin = format!("environment variable {name}");
            let value = value
                .into()
                .into_string()
                .map_err(|_| ConfigError::new(show_key(&path), format!("{origin} is not UTF-8")))?;
            // As text: the type wanted decides how it is read (`extract_lossy`).
            let layer = Layer::one(origin, &path, Value::from(value));
            if ENV_ALIASES.iter().any(|(alias, _)| *alias == name) {
                aliases.push((name, layer));
            } else {
                nested.push((name, layer));
            }
        }
        aliases.sort_by(|a, b| a.0.cmp(&b.0));
        nested.sort_by(|a, b| a.0.cmp(&b.0));
        self.env = aliases.into_iter().chain(nested).map(|(_, l)| l).collect();
        Ok(self)
    }

    /// Values given as flags.
    pub fn flags(mut self, flags: impl IntoIterator<Item = Flag>) -> Result<Self, ConfigError> {
        for flag in flags {
            let path: Vec<String> = flag.key.split('.').map(String::from).collect();
            let value = flag
                .value
                .map_err(|e| ConfigError::new(flag.key, format!("flag {}: {e}", flag.flag)))?;
            self.flags
                .push(Layer::one(format!("flag {}", flag.flag), &path, value));
        }
        Ok(self)
    }

    /// Merges the layers and reads the result; not yet validated.
    pub fn load(self) -> Result<Layered, ConfigError> {
        let Layers { file, env, flags } = self;
        let named_text = file
            .as_ref()
            .map(|f| (f.layer.origin.clone(), f.text.clone()));
        let mut figment = Figment::new();
        if let Some(file) = file {
            // The file on its own first, with TOML's own types: `batch_size = "10"`
            // is a mistake there, while `OUTBOX_RELAY__BATCH_SIZE=10` is text.
            let alone = Origins::new(Figment::from(file.layer.clone()), named_text.clone());
            alone
                .figment
                .extract::<Config>()
                .map_err(|e| alone.explain(e))?;
            figment = figment.merge(file.layer);
        }
        for layer in env.into_iter().chain(flags) {
            figment = figment.merge(layer);
        }
        let origins = Origins::new(figment, named_text);
        let config = origins
            .figment
            .extract_lossy::<Config>()
            .map_err(|e| origins.explain(e))?;
        Ok(Layered { config, origins })
    }
}

/// The merged values and where each came from.
struct Origins {
    figment: Figment,
    merged: Dict,
    file: Option<(String, String)>,
}

impl Origins {
    /// `file` is the file layer's origin and text, to find a key's line.
    fn new(figment: Figment, file: Option<(String, String)>) -> Self {
        let merged = figment
            .data()
            .ok()
            .and_then(|mut m| m.remove(&Profile::Default))
            .unwrap_or_default();
        Self {
            figment,
            merged,
            file,
        }
    }

    /// Where the value at `path` came from: `flag --batch-size`,
    /// `environment variable DATABASE_URL`, `config file x.toml, line 3`.
    fn origin(&self, path: &[String], value: &Value) -> String {
        let name = self
            .figment
            .get_metadata(value.tag())
            .map(|m| m.name.to_string())
            .unwrap_or_else(|| "?".into());
        match &self.file {
            Some((file, text)) if *file == name => match line_of(text, path) {
                Some(line) => format!("{name}, line {line}"),
                None => name,
            },
            _ => name,
        }
    }

    /// `relay.batch_size = "abc" (from environment variable OUTBOX_RELAY__BATCH_SIZE)`,
    /// or `relay.batch_size (default)` for a value no layer set.
    fn describe(&self, path: &[String]) -> String {
        let key = show_key(path);
        match find(&self.merged, path) {
            Some(v) => format!(
                "{key} = {} (from {})",
                show_value(path, v),
                self.origin(path, v)
            ),
            None => format!("{key} (default)"),
        }
    }

    /// A figment error (the first, if several) as a [`ConfigError`] naming
    /// the key, its value and where it came from.
    fn explain(&self, e: figment::Error) -> ConfigError {
        use figment::error::{Kind, OneOf};
        // figment wraps its list of choices in a second pair of backticks.
        let mut message = match &e.kind {
            Kind::UnknownField(found, expected) => {
                format!("unknown key `{found}`, expected {}", OneOf(expected))
            }
            Kind::UnknownVariant(found, expected) => {
                format!("unknown value `{found}`, expected {}", OneOf(expected))
            }
            kind => kind.to_string(),
        };
        // The kind quotes the value as given; a secret must show masked.
        if let Some(Value::String(_, raw)) = find(&self.merged, &e.path) {
            let shown = mask(&e.path, raw);
            if !raw.is_empty() && shown != *raw {
                message = message.replace(raw.as_str(), &shown);
            }
        }
        if e.path.is_empty() {
            ConfigError::new("configuration", message)
        } else {
            ConfigError::new(self.describe(&e.path), message)
        }
    }
}

/// A configuration read from its layers, with the origin of every value.
pub struct Layered {
    config: Config,
    origins: Origins,
}

impl Layered {
    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn into_config(self) -> Config {
        self.config
    }

    /// [`Config::validate`], the error naming where the bad value came from.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.check(Config::validate)
    }

    /// Runs a check of the configuration; its error names the key's origin.
    pub fn check(
        &self,
        check: impl FnOnce(&Config) -> Result<(), ConfigError>,
    ) -> Result<(), ConfigError> {
        check(&self.config).map_err(|e| self.locate(e))
    }

    /// Adds to an error about a key the value and where it came from.
    pub fn locate(&self, e: ConfigError) -> ConfigError {
        let path = parse_key(&e.field);
        ConfigError::new(self.origins.describe(&path), e.message)
    }

    /// Every value a layer set, `key = value (from origin)`, secrets masked,
    /// in key order; keys not listed have their defaults.
    pub fn set_values(&self) -> Vec<String> {
        fn walk(origins: &Origins, dict: &Dict, path: &mut Vec<String>, out: &mut Vec<String>) {
            for (key, value) in dict {
                path.push(key.clone());
                match value {
                    Value::Dict(_, inner) => walk(origins, inner, path, out),
                    _ => out.push(origins.describe(path)),
                }
                path.pop();
            }
        }
        let mut out = Vec::new();
        walk(
            &self.origins,
            &self.origins.merged,
            &mut Vec::new(),
            &mut out,
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> Config {
        let mut c = Config::default();
        c.database.url = DatabaseUrl::new("postgres://u:pw@localhost/db");
        c.kafka.brokers = "localhost:9092".into();
        c.cluster.node_id = "n1".into();
        c
    }

    #[test]
    fn defaults_with_urls_are_valid() {
        valid().validate().unwrap();
    }

    #[test]
    fn unknown_keys_are_refused_with_their_name() {
        let err = Config::from_toml("[relay]\nbatch_sise = 10\n").unwrap_err();
        assert!(err.to_string().contains("batch_sise"), "{err}");
        let err = Config::from_toml("[relays]\n").unwrap_err();
        assert!(err.to_string().contains("relays"), "{err}");
    }

    #[test]
    fn wrong_types_name_the_line() {
        let err = Config::from_toml("[relay]\n\nbatch_size = \"many\"\n").unwrap_err();
        assert!(err.to_string().contains("line 3"), "{err}");
    }

    #[test]
    fn poison_policy_is_read() {
        let c = Config::from_toml("[relay]\npoison_policy = \"block\"\n").unwrap();
        assert_eq!(c.relay.poison_policy, PoisonPolicy::Block);
        let err = Config::from_toml("[relay]\npoison_policy = \"drop\"\n").unwrap_err();
        assert!(err.to_string().contains("park"), "{err}");
    }

    #[test]
    fn file_values_are_read() {
        let c = Config::from_toml(
            "[kafka]\nbrokers = \"b:1\"\ntopic_prefix = \"x.\"\n[kafka.properties]\n\"linger.ms\" = \"20\"\n",
        )
        .unwrap();
        assert_eq!(c.kafka.brokers, "b:1");
        assert_eq!(c.kafka.properties["linger.ms"], "20");
        assert_eq!(c.relay.batch_size, RelayConfig::default().batch_size);
    }

    #[test]
    fn bad_fields_are_named() {
        type Mutation = Box<dyn Fn(&mut Config)>;
        let cases: Vec<(&str, Mutation)> = vec![
            (
                "database.url",
                Box::new(|c| c.database.url = DatabaseUrl::new("mysql://x")),
            ),
            (
                "database.url",
                Box::new(|c| c.database.url = DatabaseUrl::default()),
            ),
            (
                "database.schema",
                Box::new(|c| c.database.schema = "x; drop table y".into()),
            ),
            (
                "database.schema",
                Box::new(|c| c.database.schema = "Public".into()),
            ),
            (
                "kafka.brokers",
                Box::new(|c| c.kafka.brokers = "localhost".into()),
            ),
            ("kafka.brokers", Box::new(|c| c.kafka.brokers = "".into())),
            (
                "kafka.topic_prefix",
                Box::new(|c| c.kafka.topic_prefix = "a b".into()),
            ),
            ("relay.batch_size", Box::new(|c| c.relay.batch_size = 0)),
            (
                "cluster.node_id",
                Box::new(|c| c.cluster.node_id = "a/b".into()),
            ),
            (
                "cluster.heartbeat_interval_ms",
                Box::new(|c| c.cluster.heartbeat_interval_ms = 10_000),
            ),
            (
                "cdc.database_url",
                Box::new(|c| c.cdc.database_url = Some(DatabaseUrl::new("mysql://x"))),
            ),
            ("cdc.slot", Box::new(|c| c.cdc.slot = "Slot-1".into())),
            (
                "cdc.publication",
                Box::new(|c| c.cdc.publication = "p; drop".into()),
            ),
            ("cdc.heartbeat_ms", Box::new(|c| c.cdc.heartbeat_ms = 99)),
            (
                "cdc.status_interval_ms",
                Box::new(|c| c.cdc.status_interval_ms = 9),
            ),
            ("cdc.buffer_events", Box::new(|c| c.cdc.buffer_events = 999)),
        ];
        for (field, mutate) in cases {
            let mut c = valid();
            mutate(&mut c);
            let err = c.validate().unwrap_err();
            assert_eq!(err.field, field, "{err}");
        }
    }

    #[test]
    fn secrets_are_not_in_debug_output() {
        let mut c = valid();
        c.database.url = DatabaseUrl::new("postgres://app:hunter2@db:5432/x?password=hunter3");
        c.kafka
            .properties
            .insert("sasl.password".into(), "hunter4".into());
        c.kafka
            .properties
            .insert("ssl.key.password".into(), "hunter5".into());
        let shown = format!("{c:?} {}", c.database.url);
        for secret in ["hunter2", "hunter3", "hunter4", "hunter5"] {
            assert!(!shown.contains(secret), "{secret} leaked: {shown}");
        }
        assert!(shown.contains("app:****@db:5432"), "{shown}");
    }

    #[test]
    fn source_and_cdc_are_read_with_defaults() {
        let c = Config::default();
        assert_eq!(c.source.kind, SourceKind::Poll);
        assert_eq!(c.cdc.slot, "outbox_slot");
        assert_eq!(c.cdc.publication, "outbox_pub");
        assert_eq!(c.cdc.heartbeat(), Duration::from_millis(1_000));
        assert_eq!(c.cdc.status_interval(), Duration::from_millis(200));
        assert_eq!(c.cdc.buffer_events, 100_000);
        let c = Config::from_toml(
            "[source]\nkind = \"cdc\"\n[cdc]\nslot = \"s1\"\nheartbeat_ms = 500\n",
        )
        .unwrap();
        assert_eq!(c.source.kind, SourceKind::Cdc);
        assert_eq!(c.cdc.slot, "s1");
        assert_eq!(c.cdc.heartbeat_ms, 500);
        let err = Config::from_toml("[source]\nkind = \"logical\"\n").unwrap_err();
        assert!(err.to_string().contains("poll"), "{err}");
    }

    #[test]
    fn cdc_url_falls_back_to_the_main_url_and_is_masked() {
        let mut c = valid();
        assert_eq!(c.cdc_database_url(), &c.database.url);
        c.cdc.database_url = Some(DatabaseUrl::new("postgres://repl:hunter6@db/x"));
        c.validate().unwrap();
        assert_eq!(
            c.cdc_database_url().expose(),
            "postgres://repl:hunter6@db/x"
        );
        let shown = format!("{c:?}");
        assert!(!shown.contains("hunter6"), "cdc password leaked: {shown}");
        assert!(shown.contains("repl:****@db"), "{shown}");
    }

    #[test]
    fn redact_leaves_urls_without_password_alone() {
        assert_eq!(redact_url("postgres://u@h/d"), "postgres://u@h/d");
        assert_eq!(redact_url("postgres://h:5432/d"), "postgres://h:5432/d");
    }

    #[test]
    fn http_endpoint_defaults_to_localhost() {
        let addr = HttpConfig::default().socket_addr().unwrap().unwrap();
        assert!(addr.ip().is_loopback(), "{addr}");
        assert_eq!(
            HttpConfig { addr: "off".into() }.socket_addr().unwrap(),
            None
        );
    }

    /// Explicit environments, so that tests do not race on the process's.
    fn env(vars: &[(&str, &str)]) -> Vec<(String, String)> {
        vars.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn layered(
        file: &str,
        vars: &[(&str, &str)],
        flags: Vec<Flag>,
    ) -> Result<Layered, ConfigError> {
        Layers::new()
            .toml("config file test.toml", file)?
            .env(env(vars))?
            .flags(flags)?
            .load()
    }

    #[test]
    fn file_overrides_defaults() {
        let c = layered("[relay]\nbatch_size = 10\n", &[], vec![]).unwrap();
        assert_eq!(c.config().relay.batch_size, 10);
        assert_eq!(
            c.config().relay.max_attempts,
            RelayConfig::default().max_attempts
        );
        assert_eq!(
            c.set_values(),
            ["relay.batch_size = 10 (from config file test.toml, line 2)"]
        );
    }

    #[test]
    fn env_overrides_file() {
        let file = "[relay]\nbatch_size = 10\n[kafka]\nbrokers = \"file:1\"\n";
        let vars = [
            ("OUTBOX_RELAY__BATCH_SIZE", "20"),
            ("KAFKA_BROKERS", "alias:1"),
            ("OUTBOX_CLUSTER__NODE_ID", "123"),
            ("OUTBOX_KAFKA__PROPERTIES__LINGER_MS", "5"),
            // Not configuration: no `__`, no alias.
            ("OUTBOX_CONFIG", "x.toml"),
            ("OUTBOX_LOG_FORMAT", "json"),
        ];
        let c = layered(file, &vars, vec![]).unwrap();
        assert_eq!(c.config().relay.batch_size, 20);
        assert_eq!(c.config().kafka.brokers, "alias:1");
        // Text where text is wanted, however it looks.
        assert_eq!(c.config().cluster.node_id, "123");
        assert_eq!(c.config().kafka.properties["linger.ms"], "5");
        let set = c.set_values();
        assert!(
            set.contains(
                &"relay.batch_size = \"20\" (from environment variable OUTBOX_RELAY__BATCH_SIZE)"
                    .to_string()
            ),
            "{set:?}"
        );
        // The OUTBOX_<SECTION>__<KEY> form wins over an alias.
        let c = layered(
            "",
            &[
                ("KAFKA_BROKERS", "alias:1"),
                ("OUTBOX_KAFKA__BROKERS", "nested:1"),
            ],
            vec![],
        )
        .unwrap();
        assert_eq!(c.config().kafka.brokers, "nested:1");
        let c = layered("", &[("OUTBOX_SOURCE", "cdc")], vec![]).unwrap();
        assert_eq!(c.config().source.kind, SourceKind::Cdc);
    }

    #[test]
    fn flag_overrides_env() {
        let vars = [
            ("OUTBOX_RELAY__BATCH_SIZE", "20"),
            ("OUTBOX_SOURCE", "poll"),
        ];
        let flags = vec![
            Flag::new("relay.batch_size", "--batch-size", 30usize),
            Flag::new("source.kind", "--source", SourceKind::Cdc),
            Flag::new(
                "relay.poison_policy",
                "--poison-policy",
                PoisonPolicy::Block,
            ),
        ];
        let c = layered("[relay]\nbatch_size = 10\n", &vars, flags).unwrap();
        assert_eq!(c.config().relay.batch_size, 30);
        assert_eq!(c.config().source.kind, SourceKind::Cdc);
        assert_eq!(c.config().relay.poison_policy, PoisonPolicy::Block);
        assert!(c
            .set_values()
            .contains(&"relay.batch_size = 30 (from flag --batch-size)".to_string()));
    }

    #[test]
    fn bad_env_value_names_the_variable() {
        let err = layered("", &[("OUTBOX_RELAY__BATCH_SIZE", "abc")], vec![])
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("relay.batch_size = \"abc\" (from environment variable OUTBOX_RELAY__BATCH_SIZE): invalid type"),
            "{err}"
        );
        let err = layered("", &[("OUTBOX_RELAY__BATCH_SISE", "1")], vec![])
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("OUTBOX_RELAY__BATCH_SISE") && err.contains("batch_sise"),
            "{err}"
        );
        let err = layered("", &[("OUTBOX_SOURCE", "logical")], vec![])
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("OUTBOX_SOURCE") && err.contains("poll"),
            "{err}"
        );
    }

    #[test]
    fn bad_file_value_names_the_file() {
        let path =
            std::env::temp_dir().join(format!("outbox-config-{}-bad.toml", std::process::id()));
        std::fs::write(
            &path,
            "[kafka]\nbrokers = \"b:1\"\n\n[relay]\nbatch_size = \"many\"\n",
        )
        .unwrap();
        let err = Layers::new()
            .file(&path)
            .and_then(Layers::load)
            .err()
            .unwrap()
            .to_string();
        let _ = std::fs::remove_file(&path);
        let want = format!(
            "relay.batch_size = \"many\" (from config file {}, line 5): invalid type",
            path.display()
        );
        assert!(err.contains(&want), "{err}");
        // Text in the file is not read as a number, unlike the environment's.
        let err = layered("[relay]\nbatch_size = \"10\"\n", &[], vec![])
            .err()
            .unwrap();
        assert!(err.to_string().contains("line 2"), "{err}");
        let err = Layers::new()
            .file(Path::new("/nonexistent/outbox.toml"))
            .err()
            .unwrap();
        assert!(
            err.to_string().contains("/nonexistent/outbox.toml"),
            "{err}"
        );
    }

    #[test]
    fn validation_errors_name_the_origin() {
        let base = [
            ("DATABASE_URL", "postgres://u:hunter2@localhost/db"),
            ("KAFKA_BROKERS", "localhost:9092"),
            ("OUTBOX_NODE_ID", "n1"),
        ];
        let check = |vars: &[(&str, &str)], flags: Vec<Flag>| {
            let all: Vec<_> = base.iter().chain(vars).copied().collect();
            layered("", &all, flags)
                .unwrap()
                .validate()
                .err()
                .unwrap()
                .to_string()
        };
        let err = check(
            &[],
            vec![Flag::new("relay.batch_size", "--batch-size", 0usize)],
        );
        assert!(
            err.contains("relay.batch_size = 0 (from flag --batch-size): must be between"),
            "{err}"
        );
        let err = check(&[("OUTBOX_DELIVERY_TIMEOUT_MS", "5")], vec![]);
        assert!(
            err.contains("kafka.delivery_timeout_ms = \"5\" (from environment variable OUTBOX_DELIVERY_TIMEOUT_MS)"),
            "{err}"
        );
        let err = check(&[("OUTBOX_CDC__HEARTBEAT_MS", "5")], vec![]);
        assert!(err.contains("OUTBOX_CDC__HEARTBEAT_MS"), "{err}");
        let err = check(
            &[("OUTBOX_KAFKA__PROPERTIES__BOOTSTRAP_SERVERS", "x:1")],
            vec![],
        );
        assert!(
            err.contains(
                "kafka.properties.\"bootstrap.servers\" = \"x:1\" (from environment variable"
            ),
            "{err}"
        );
        let err = check(&[("OUTBOX_CLUSTER__NODE_ID", "a/b")], vec![]);
        assert!(err.contains("OUTBOX_CLUSTER__NODE_ID"), "{err}");
        let err = layered("", &[], vec![]).unwrap().validate().err().unwrap();
        assert!(
            err.to_string().contains("database.url (default): not set"),
            "{err}"
        );
    }

    #[test]
    fn secrets_are_masked_in_errors_and_origins() {
        let vars = [
            ("DATABASE_URL", "mysql://app:hunter2@db/x"),
            ("OUTBOX_CDC__DATABASE_URL", "postgres://repl:hunter3@db/x"),
            ("OUTBOX_KAFKA__PROPERTIES__SASL_PASSWORD", "hunter4"),
        ];
        let c = layered(
            "[database]\nurll = \"postgres://u:hunter5@h/d\"\n",
            &[],
            vec![],
        );
        let err = c.err().unwrap().to_string();
        assert!(err.contains("urll") && !err.contains("hunter5"), "{err}");
        let c = layered("", &vars, vec![]).unwrap();
        assert_eq!(c.config().kafka.properties["sasl.password"], "hunter4");
        let shown = format!("{:?} {:?}", c.set_values(), c.validate().err().unwrap());
        for secret in ["hunter2", "hunter3", "hunter4"] {
            assert!(!shown.contains(secret), "{secret} leaked: {shown}");
        }
        assert!(shown.contains("sasl.password"), "{shown}");
        let err = layered(
            "",
            &[("OUTBOX_KAFKA__PROPERTIES__SSL_KEY_PASSWORD", "")],
            vec![],
        )
        .map(|_| ());
        assert!(err.is_ok());
        // A secret of the wrong type does not show in the message either.
        let err = layered("", &[("OUTBOX_DATABASE__URL__X", "hunter6")], vec![])
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("database.url") && !err.contains("hunter6"),
            "{err}"
        );
    }

    #[test]
    fn keys_are_listed() {
        let keys = keys();
        for key in [
            "database.url",
            "relay.batch_size",
            "kafka.properties",
            "cdc.buffer_events",
        ] {
            assert!(keys.iter().any(|k| k == key), "{key} not in {keys:?}");
        }
        assert_eq!(keys.len(), 33, "{keys:?}");
    }

    #[test]
    fn env_names_map_to_keys() {
        let key = |name| env_key(name).map(|p| show_key(&p));
        assert_eq!(
            key("OUTBOX_RELAY__BATCH_SIZE").as_deref(),
            Some("relay.batch_size")
        );
        assert_eq!(key("DATABASE_URL").as_deref(), Some("database.url"));
        assert_eq!(key("OUTBOX_SOURCE").as_deref(), Some("source.kind"));
        assert_eq!(
            key("OUTBOX_KAFKA__PROPERTIES__SASL_PASSWORD").as_deref(),
            Some("kafka.properties.\"sasl.password\"")
        );
        for ignored in [
            "OUTBOX_CONFIG",
            "OUTBOX_LOG_FORMAT",
            "OUTBOX_PARTITIONS",
            "PATH",
            "outbox_relay__x",
        ] {
            assert_eq!(key(ignored), None, "{ignored}");
        }
        for (alias, key) in ENV_ALIASES {
            assert_eq!(
                parse_key(key),
                key.split('.').collect::<Vec<_>>(),
                "{alias}"
            );
        }
        assert_eq!(
            parse_key("kafka.properties.\"message.timeout.ms\""),
            ["kafka", "properties", "message.timeout.ms"]
        );
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// Arbitrary text is parsed or refused with a message, never a panic.
            #[test]
            fn parser_never_panics(text in any::<String>()) {
                if let Ok(c) = Config::from_toml(&text) {
                    let _ = c.validate();
                }
            }

            /// Arbitrary TOML-shaped input: sections and keys the parser knows
            /// and does not know, values of every type.
            #[test]
            fn toml_shaped_input_never_panics(
                section in prop::sample::select(vec!["database", "kafka", "relay", "cluster", "http", "source", "cdc", "kafka.properties", "other"]),
                key in prop::sample::select(vec!["url", "brokers", "batch_size", "node_id", "addr", "poison_policy", "kind", "slot", "database_url", "x"]),
                value in prop::sample::select(vec!["1", "-1", "\"\"", "\"a b\"", "true", "[]", "{}", "1e99", "18446744073709551616"]),
            ) {
                let text = format!("[{section}]\n{key} = {value}\n");
                match Config::from_toml(&text) {
                    Ok(c) => { let _ = c.validate(); }
                    Err(e) => prop_assert!(!e.message.is_empty()),
                }
            }

            /// Whatever the URL, its password does not survive redaction.
            #[test]
            fn redaction_hides_passwords(user in "[a-z]{1,8}", pw in "[A-Za-z0-9]{6,16}", host in "[a-z]{1,8}") {
                let url = format!("postgres://{user}:{pw}@{host}:5432/db?password={pw}");
                let shown = redact_url(&url);
                prop_assert!(!shown.contains(&pw), "{}", shown);
            }

            #[test]
            fn redaction_never_panics(url in any::<String>()) {
                let _ = redact_url(&url);
            }
        }
    }
}
