//! Typed configuration with defaults, loaded from an optional TOML file and
//! overlaid by flags and environment (done by the binary), then validated
//! before anything connects. Secrets never appear in `Debug` output.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;
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
}

impl Config {
    /// Reads a TOML file. Unknown keys are errors, so typos do not pass silently.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::new("--config", format!("{}: {e}", path.display())))?;
        Self::from_toml(&text)
            .map_err(|e| ConfigError::new(format!("--config {}", path.display()), e.message))
    }

    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| {
            // toml's message spans several lines with a caret; keep it one line.
            let msg = e.message().to_string();
            let at = e
                .span()
                .map(|s| {
                    let line = text[..s.start.min(text.len())].matches('\n').count() + 1;
                    format!(" (line {line})")
                })
                .unwrap_or_default();
            ConfigError::new("config file", format!("{msg}{at}"))
        })
    }

    /// Checks every field that can be checked without connecting anywhere.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.database.validate()?;
        self.kafka.validate()?;
        self.relay.validate()?;
        self.cluster.validate()?;
        self.http.validate()?;
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
        let url = self.url.expose();
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(ConfigError::new(
                "database.url",
                format!("{} is not a postgres:// URL", self.url),
            ));
        }
        PgConnectOptions::from_str(url)
            .map_err(|e| ConfigError::new("database.url", format!("{}: {e}", self.url)))
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
            properties: BTreeMap::new(),
        }
    }
}

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
    /// Vacuum a partition after this many deleted events...
    pub vacuum_threshold_rows: u64,
    /// ...or this long after its last vacuum, if anything was deleted (0: never).
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
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
            poll_interval_ms: 10,
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
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "node".into())
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
                section in prop::sample::select(vec!["database", "kafka", "relay", "cluster", "http", "kafka.properties", "other"]),
                key in prop::sample::select(vec!["url", "brokers", "batch_size", "node_id", "addr", "poison_policy", "x"]),
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
