//! The Kafka sink: one idempotent librdkafka producer per node, shared by
//! every partition worker.
//!
//! Sends are fire-and-forget into librdkafka's queue with a per-batch
//! tracker as delivery opaque (an `Arc` clone per message, no future or
//! channel per message); librdkafka's poll thread runs the delivery callback,
//! which counts the batch down and completes it when the last event is in.
//!
//! **Sessions.** The producer is recreated when deliveries stall (timeouts,
//! a producer id the broker forgot) or librdkafka reports a fatal error.
//! Each producer is a numbered session. A reset purges the old producer and
//! waits until every batch it held has reported (failed) before the new one
//! takes a message, and a worker whose batches are still in flight on an old
//! session is refused a send on the new one: so no partition ever has
//! batches of two sessions in flight, and each resumes from its oldest
//! unacknowledged event.
//!
//! **Deadlines.** No message is handed to librdkafka at or after the
//! deadline of the lease it is sent under, and librdkafka fails every
//! message it could not deliver within `kafka.delivery_timeout_ms`: so what
//! a node sent under a lease lands, if at all, before the lease's expiry
//! plus that timeout, which is what a new owner waits out.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::time::Instant;

use ahash::AHashSet;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{DeliveryResult, Header, Headers, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientContext, Message};
use tokio::sync::oneshot;
use uuid::Uuid;

use crate::config::KafkaConfig;
use crate::error::SinkError;
use crate::event::OutboxEvent;
use crate::sink::{routing, Delivery, DeliveryReport, SendOptions, Sent, Sink};

/// The error of events held back behind a refused event of their batch.
pub const HELD_BACK: &str = "not sent: an earlier event of the batch was refused";
/// The error of events not sent because their lease's deadline had passed.
pub const PAST_DEADLINE: &str = "not sent: the lease's deadline passed";
/// Resets caused by stalled deliveries are at least this far apart.
const MIN_RESET_INTERVAL_MS: u64 = 10_000;
/// How long a reset waits for the old producer's batches to report.
const RESET_WAIT: Duration = Duration::from_secs(10);

/// How long the sink waits when librdkafka's queue is full before retrying.
const QUEUE_FULL_WAIT: Duration = Duration::from_millis(2);
const ADMIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a topic lookup waits for the broker.
const METADATA_TIMEOUT: Duration = Duration::from_secs(2);
/// After a failed topic creation, the next one waits this long.
const ADMIN_RETRY: Duration = Duration::from_secs(2);
/// How long a reachability check waits for the brokers' metadata.
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// librdkafka properties the engine sets unless the configuration does.
fn default_properties() -> BTreeMap<&'static str, &'static str> {
    BTreeMap::from([
        // Retries cannot reorder or duplicate within a producer session.
        ("enable.idempotence", "true"),
        // Larger batches for little latency; see librdkafka's INTRODUCTION.md.
        ("linger.ms", "5"),
        // Same key-to-partition mapping as the Java client's default.
        ("partitioner", "murmur2_random"),
        ("queue.buffering.max.messages", "500000"),
        ("queue.buffering.max.kbytes", "1048576"),
        ("batch.num.messages", "10000"),
        // Feeds the outbox_kafka_* metrics.
        ("statistics.interval.ms", "5000"),
    ])
}

/// The librdkafka configuration for `config`.
pub fn client_config(config: &KafkaConfig) -> ClientConfig {
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", &config.brokers);
    for (k, v) in default_properties() {
        cc.set(k, v);
    }
    for (k, v) in &config.properties {
        cc.set(k, v);
    }
    // A message not delivered in this time fails and is retried from the
    // outbox; lease takeovers wait this long (see `Sink::delivery_timeout`),
    // so it is a key of its own, not a free property.
    let timeout = config.delivery_timeout_ms.to_string();
    cc.set("message.timeout.ms", &timeout);
    cc.set(
        "request.timeout.ms",
        config.delivery_timeout_ms.min(30_000).to_string(),
    );
    cc
}

/// The configuration of the admin client (topic creation): the brokers and
/// the user's properties (TLS, SASL), none of the producer's. With the
/// producer's timeouts an admin client whose broker is away kept a core
/// half busy (measured: its broker thread at 35-55 %).
fn admin_config(config: &KafkaConfig) -> ClientConfig {
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", &config.brokers);
    for (k, v) in &config.properties {
        cc.set(k, v);
    }
    cc
}

/// Counts a batch down; completes its [`Delivery`] when the last event is in.
///
/// It fails closed: a failure is never dropped (a poisoned lock is taken
/// over: a `Vec` push cannot leave it half done), and a tracker dropped
/// before its last event reported drops its sender, which fails the whole
/// batch at the worker.
struct BatchTracker {
    remaining: AtomicUsize,
    state: Mutex<TrackerState>,
    /// Counts the live trackers of the session, for a reset to wait on.
    _live: LiveGuard,
}

struct TrackerState {
    failed: Vec<(Uuid, SinkError)>,
    done: Option<oneshot::Sender<DeliveryReport>>,
}

impl BatchTracker {
    fn state(&self) -> std::sync::MutexGuard<'_, TrackerState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn fail(&self, id: Uuid, error: SinkError) {
        self.state().failed.push((id, error));
    }

    fn complete_one(&self) {
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            let mut state = self.state();
            let failed = std::mem::take(&mut state.failed);
            if let Some(tx) = state.done.take() {
                let _ = tx.send(DeliveryReport { failed });
            }
        }
    }
}

/// Counts one live tracker of a session while it exists.
struct LiveGuard(Arc<AtomicUsize>);

impl LiveGuard {
    fn new(live: &Arc<AtomicUsize>) -> Self {
        live.fetch_add(1, Ordering::AcqRel);
        Self(Arc::clone(live))
    }
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// librdkafka repeats the same complaint many times a second while a broker
/// is away; the log keeps one line per interval, with a count of the rest.
#[derive(Default)]
struct LogLimiter {
    last_ms: AtomicU64,
    suppressed: AtomicU64,
}

const LOG_INTERVAL_MS: u64 = 5_000;

impl LogLimiter {
    /// Whether to log now; if so, how many were suppressed since last time.
    fn admit(&self) -> Option<u64> {
        let now = now_ms();
        let last = self.last_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= LOG_INTERVAL_MS
            && self
                .last_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// Topics known to exist, shared with the delivery callback, which forgets
/// a topic the broker says it does not know (deleted, or a broker that lost
/// its state) so that the next batch creates it again.
type TopicCache = Arc<RwLock<AHashSet<String>>>;

/// What the delivery callbacks tell the sink about the producer's health.
#[derive(Default)]
struct Health {
    /// Milliseconds since the epoch of the last acknowledged message.
    last_ok_ms: AtomicU64,
    /// ...and of the last delivery that failed in a way a new producer cures.
    last_stall_ms: AtomicU64,
    /// Set by such a failure; the next `send` or `check` recreates the producer.
    reset_needed: AtomicBool,
    /// librdkafka reported a fatal error: the producer is unusable until
    /// recreated (readiness is false meanwhile).
    fatal: AtomicBool,
    /// Milliseconds since the epoch of the last reset.
    last_reset_ms: AtomicU64,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Delivery failures after which the producer is recreated: its messages
/// timed out, or the broker no longer knows its producer id (a broker that
/// restarted without its state) and librdkafka cannot get out of it.
fn needs_new_producer(err: &KafkaError) -> bool {
    matches!(
        err.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::MessageTimedOut
                | RDKafkaErrorCode::UnknownProducerId
                | RDKafkaErrorCode::InvalidProducerEpoch
                | RDKafkaErrorCode::OutOfOrderSequenceNumber
                | RDKafkaErrorCode::InvalidProducerIdMapping
                | RDKafkaErrorCode::Fatal
        )
    )
}

#[derive(Default)]
struct DeliveryContext {
    limiter: LogLimiter,
    known_topics: TopicCache,
    health: Arc<Health>,
}

impl ClientContext for DeliveryContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, facility: &str, message: &str) {
        use rdkafka::config::RDKafkaLogLevel as L;
        match level {
            L::Emerg | L::Alert | L::Critical | L::Error | L::Warning => {
                if let Some(suppressed) = self.limiter.admit() {
                    tracing::warn!(target: "librdkafka", facility, suppressed, "{message}");
                }
            }
            L::Notice | L::Info => tracing::info!(target: "librdkafka", facility, "{message}"),
            L::Debug => tracing::debug!(target: "librdkafka", facility, "{message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::Fatal) {
            // Every later send would fail: recreate the producer.
            self.health.fatal.store(true, Ordering::Relaxed);
            self.health.reset_needed.store(true, Ordering::Relaxed);
            self.health.last_stall_ms.store(now_ms(), Ordering::Relaxed);
            tracing::error!(target: "librdkafka", %error, "fatal producer error: {reason}; the producer will be recreated");
            return;
        }
        if let Some(suppressed) = self.limiter.admit() {
            tracing::warn!(target: "librdkafka", %error, suppressed, "{reason}");
        }
    }

    fn stats(&self, stats: rdkafka::Statistics) {
        use crate::ops::metrics as m;
        metrics::gauge!(m::KAFKA_QUEUE_MESSAGES).set(stats.msg_cnt as f64);
        metrics::gauge!(m::KAFKA_QUEUE_BYTES).set(stats.msg_size as f64);
        let (mut retries, mut errors) = (0, 0);
        for (name, broker) in &stats.brokers {
            retries += broker.txretries;
            errors += broker.txerrs + broker.rxerrs;
            if let Some(rtt) = &broker.rtt {
                metrics::gauge!(m::KAFKA_BROKER_RTT_SECONDS, "broker" => name.clone())
                    .set(rtt.avg as f64 / 1e6);
            }
        }
        metrics::counter!(m::KAFKA_RETRIES).absolute(retries);
        metrics::counter!(m::KAFKA_REQUEST_ERRORS).absolute(errors);
    }
}

impl ProducerContext for DeliveryContext {
    type DeliveryOpaque = Arc<BatchTracker>;

    fn delivery(&self, result: &DeliveryResult<'_>, tracker: Arc<BatchTracker>) {
        // With idempotence, a DUPLICATE_SEQUENCE_NUMBER is reported as
        // success without an offset: the broker has the message.
        match result {
            Ok(_) => self.health.last_ok_ms.store(now_ms(), Ordering::Relaxed),
            Err((err, _)) if needs_new_producer(err) => {
                self.health.last_stall_ms.store(now_ms(), Ordering::Relaxed);
                self.health.reset_needed.store(true, Ordering::Relaxed);
            }
            Err(_) => {}
        }
        if let Err((err, msg)) = result {
            let id = msg
                .headers()
                .and_then(|h| h.iter().find(|h| h.key == routing::HEADER_ID))
                .and_then(|h| h.value)
                .and_then(|v| std::str::from_utf8(v).ok())
                .and_then(|s| Uuid::parse_str(s).ok())
                .unwrap_or_else(Uuid::nil);
            record_broker_error(err);
            if matches!(
                err.rdkafka_error_code(),
                Some(RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic)
            ) {
                if let Ok(mut topics) = self.known_topics.write() {
                    topics.remove(msg.topic());
                }
            }
            tracker.fail(id, classify(err));
        }
        tracker.complete_one();
    }
}

/// The Kafka headers of an event, built without intermediate allocations.
fn message_headers(event: &OutboxEvent) -> Result<OwnedHeaders, SinkError> {
    // `insert` takes the list by value; the Option lets the closure move it.
    let mut headers = Some(OwnedHeaders::new_with_capacity(3));
    routing::for_each_header(event, |key, value| {
        headers = headers.take().map(|h| {
            h.insert(Header {
                key,
                value: Some(value),
            })
        });
    })?;
    headers.ok_or_else(|| SinkError::Transient("header list lost".into()))
}

/// Counts a broker error by its code (a bounded set of names).
fn record_broker_error(err: &KafkaError) {
    let kind = match err.rdkafka_error_code() {
        Some(code) => format!("{code:?}"),
        None => "Other".to_string(),
    };
    metrics::counter!(crate::ops::metrics::BROKER_ERRORS, "kind" => kind).increment(1);
}

/// Whether a broker error can go away by itself.
pub fn classify(err: &KafkaError) -> SinkError {
    use RDKafkaErrorCode as C;
    let code = err.rdkafka_error_code();
    let too_large = matches!(code, Some(C::MessageSizeTooLarge | C::MessageBatchTooLarge));
    let permanent = matches!(
        code,
        Some(
            C::InvalidMessageSize
                | C::InvalidMessage
                | C::InvalidRecord
                | C::InvalidTopic
                | C::InvalidTimestamp
                | C::PolicyViolation
                | C::TopicAuthorizationFailed
                | C::ClusterAuthorizationFailed
                | C::TransactionalIdAuthorizationFailed
                | C::UnsupportedForMessageFormat
                | C::InvalidRequiredAcks
        )
    );
    if too_large {
        SinkError::TooLarge(err.to_string())
    } else if permanent {
        SinkError::Permanent(err.to_string())
    } else {
        SinkError::Transient(err.to_string())
    }
}

/// One producer and the batches it holds.
struct Session {
    producer: Arc<ThreadedProducer<DeliveryContext>>,
    id: u64,
    /// Trackers of this session not yet dropped.
    live: Arc<AtomicUsize>,
}

/// Publishes outbox events to Kafka.
pub struct KafkaSink {
    /// Sends hold it shared while they hand messages over; a reset holds it
    /// exclusively, so no message goes to a producer being replaced.
    session: tokio::sync::RwLock<Session>,
    admin: AdminClient<DefaultClientContext>,
    config: KafkaConfig,
    known_topics: TopicCache,
    health: Arc<Health>,
    /// No topic creation before this (ms since the epoch): see `ensure_topic`.
    admin_quiet_until_ms: AtomicU64,
    creating: tokio::sync::Mutex<()>,
}

impl KafkaSink {
    pub fn new(config: &KafkaConfig) -> Result<Self, SinkError> {
        let cc = admin_config(config);
        let known_topics = TopicCache::default();
        let health = Arc::new(Health::default());
        let producer = Self::producer(config, &known_topics, &health)?;
        let admin = cc
            .create()
            .map_err(|e| SinkError::Permanent(format!("kafka admin client: {e}")))?;
        Ok(Self {
            session: tokio::sync::RwLock::new(Session {
                producer,
                id: 1,
                live: Arc::new(AtomicUsize::new(0)),
            }),
            admin,
            config: config.clone(),
            known_topics,
            health,
            admin_quiet_until_ms: AtomicU64::new(0),
            creating: tokio::sync::Mutex::new(()),
        })
    }

    fn producer(
        config: &KafkaConfig,
        known_topics: &TopicCache,
        health: &Arc<Health>,
    ) -> Result<Arc<ThreadedProducer<DeliveryContext>>, SinkError> {
        let context = DeliveryContext {
            limiter: LogLimiter::default(),
            known_topics: Arc::clone(known_topics),
            health: Arc::clone(health),
        };
        client_config(config)
            .create_with_context(context)
            .map(Arc::new)
            .map_err(|e| SinkError::Permanent(format!("kafka producer: {e}")))
    }

    /// The current session's number.
    pub async fn session(&self) -> u64 {
        self.session.read().await.id
    }

    /// Replaces the producer with a new one (a new producer id), if a reset
    /// is still needed once no send holds the old one. The old producer's
    /// queue and in-flight requests are purged, and the new producer takes
    /// no message until every batch of the old one has reported.
    async fn reset_if_needed(&self) -> Result<(), SinkError> {
        // While a broker stays away every new producer times out as well:
        // one reset per interval is enough (a fatal error resets at once).
        let since = now_ms().saturating_sub(self.health.last_reset_ms.load(Ordering::Acquire));
        let interval = self.config.delivery_timeout_ms.max(MIN_RESET_INTERVAL_MS);
        if since < interval && !self.health.fatal.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut session = self.session.write().await;
        if !self.health.reset_needed.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        self.health.last_reset_ms.store(now_ms(), Ordering::Release);
        let fresh = match Self::producer(&self.config, &self.known_topics, &self.health) {
            Ok(p) => p,
            Err(e) => {
                self.health.reset_needed.store(true, Ordering::Release);
                return Err(e);
            }
        };
        let old = std::mem::replace(&mut session.producer, fresh);
        let live = std::mem::replace(&mut session.live, Arc::new(AtomicUsize::new(0)));
        let stale = session.id;
        session.id += 1;
        // A broker that restarted without its state lost the topics too.
        if let Ok(mut topics) = self.known_topics.write() {
            topics.clear();
        }
        metrics::counter!(crate::ops::metrics::PRODUCER_RESETS).increment(1);
        tracing::warn!(
            session = session.id,
            "deliveries stalled (timed out, producer id unknown to the broker, or a fatal error); \
             recreated the Kafka producer"
        );
        // Purge, let the callbacks run, then drop the old producer: every
        // message's tracker reference is released by then.
        let purged = tokio::task::spawn_blocking(move || {
            old.purge(rdkafka::producer::PurgeConfig::default().queue().inflight());
            let _ = old.flush(Duration::from_secs(5));
            drop(old);
        });
        if let Err(e) = purged.await {
            tracing::error!(error = %e, "purging the old producer failed");
        }
        let started = Instant::now();
        while live.load(Ordering::Acquire) > 0 {
            if started.elapsed() > RESET_WAIT {
                tracing::error!(
                    session = stale,
                    batches = live.load(Ordering::Acquire),
                    "batches of the old producer never reported; holding sends back until they do"
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.health.fatal.store(false, Ordering::Release);
        Ok(())
    }

    /// Creates `topic` if it does not exist yet (when configured to).
    async fn ensure_topic(&self, topic: &str) -> Result<(), SinkError> {
        if self
            .known_topics
            .read()
            .map(|t| t.contains(topic))
            .unwrap_or(false)
        {
            return Ok(());
        }
        routing::check_topic(topic)?;
        // While the broker cannot create topics, do not keep asking: every
        // pending admin request keeps librdkafka's admin thread polling for
        // a controller (measured: 50 % of a core with the broker down).
        let until = self.admin_quiet_until_ms.load(Ordering::Acquire);
        if now_ms() < until {
            return Err(SinkError::Transient(format!(
                "topic {topic} cannot be created yet: the broker did not answer the last attempt"
            )));
        }
        if self.config.create_topics && !self.topic_exists(topic).await? {
            // -1: the broker's default replication factor.
            let replication = TopicReplication::Fixed(self.config.topic_replication);
            let new = NewTopic::new(topic, self.config.topic_partitions, replication);
            let opts = AdminOptions::new()
                .operation_timeout(Some(ADMIN_TIMEOUT))
                .request_timeout(Some(ADMIN_TIMEOUT));
            // One creation at a time; whoever waited may find it done.
            let _creating = self.creating.lock().await;
            if self
                .known_topics
                .read()
                .map(|t| t.contains(topic))
                .unwrap_or(false)
            {
                return Ok(());
            }
            let quiet = || {
                self.admin_quiet_until_ms
                    .store(now_ms() + ADMIN_RETRY.as_millis() as u64, Ordering::Release)
            };
            let results = match self.admin.create_topics([&new], &opts).await {
                Ok(results) => results,
                Err(e) => {
                    quiet();
                    return Err(classify(&e));
                }
            };
            for r in results {
                match r {
                    Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                    Err((name, code)) => {
                        let err = KafkaError::AdminOp(code);
                        tracing::warn!(topic = %name, error = %err, "could not create topic");
                        let err = classify(&err);
                        if err.is_retriable() {
                            quiet();
                        }
                        return Err(err);
                    }
                }
            }
            tracing::info!(
                topic,
                partitions = self.config.topic_partitions,
                "topic ready"
            );
        }
        if let Ok(mut t) = self.known_topics.write() {
            t.insert(topic.to_string());
        }
        Ok(())
    }

    /// Whether the broker knows `topic`, asked through the producer's own
    /// connection: a broker that is away fails this quickly, where an admin
    /// request would wait for a controller (and keep librdkafka's admin
    /// thread polling; measured: a third of a core).
    async fn topic_exists(&self, topic: &str) -> Result<bool, SinkError> {
        let producer = Arc::clone(&self.session.read().await.producer);
        let name = topic.to_string();
        let metadata = tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(Some(&name), METADATA_TIMEOUT)
        })
        .await
        .map_err(|e| SinkError::Transient(format!("metadata task: {e}")))?;
        match metadata {
            Ok(m) => Ok(m
                .topics()
                .iter()
                .any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty())),
            Err(e) => {
                self.admin_quiet_until_ms
                    .store(now_ms() + ADMIN_RETRY.as_millis() as u64, Ordering::Release);
                Err(classify(&e))
            }
        }
    }

    /// Waits until queued messages are delivered, up to `timeout`.
    pub async fn flush(&self, timeout: Duration) -> Result<(), SinkError> {
        let producer = Arc::clone(&self.session.read().await.producer);
        tokio::task::spawn_blocking(move || producer.flush(timeout))
            .await
            .map_err(|e| SinkError::Transient(format!("flush task: {e}")))?
            .map_err(|e| classify(&e))
    }
}

impl Sink for KafkaSink {
    async fn send(&self, events: &[OutboxEvent], options: SendOptions) -> Result<Sent, SinkError> {
        if self.health.reset_needed.load(Ordering::Acquire) {
            self.reset_if_needed().await?;
        }
        // Topics first: a batch that cannot start leaves nothing in flight.
        // A batch has few distinct topics; each event keeps an index into them.
        let prefix = self.config.topic_prefix.as_str();
        let mut topics: Vec<(String, Option<SinkError>)> = Vec::new();
        let mut topic_of: Vec<usize> = Vec::with_capacity(events.len());
        for e in events {
            let i = match topics
                .iter()
                .position(|(t, _)| routing::is_topic_of(e, prefix, t))
            {
                Some(i) => i,
                None => {
                    topics.push((routing::topic(e, prefix).into_owned(), None));
                    topics.len() - 1
                }
            };
            topic_of.push(i);
        }
        for (topic, refusal) in topics.iter_mut() {
            if let Err(e) = self.ensure_topic(topic).await {
                if e.is_retriable() {
                    return Err(e);
                }
                *refusal = Some(e);
            }
        }
        let session = self.session.read().await;
        if let Some(expected) = options.session {
            if expected != session.id {
                return Err(SinkError::Transient(format!(
                    "the Kafka producer was recreated (session {expected} -> {}) while this \
                     partition had batches in flight; it resumes from its oldest unacknowledged event",
                    session.id
                )));
            }
        }
        let (tx, delivery) = Delivery::channel();
        let tracker = Arc::new(BatchTracker {
            remaining: AtomicUsize::new(events.len().max(1)),
            state: Mutex::new(TrackerState {
                failed: Vec::new(),
                done: Some(tx),
            }),
            _live: LiveGuard::new(&session.live),
        });
        if events.is_empty() {
            tracker.complete_one();
        }
        // Once an event is refused, the rest of the batch is not sent: the
        // events after it must not overtake it (they are retried with it).
        let mut accepted = events.len();
        for (i, (event, &t)) in events.iter().zip(&topic_of).enumerate() {
            if i >= accepted {
                tracker.fail(event.id, SinkError::Transient(HELD_BACK.into()));
                tracker.complete_one();
                continue;
            }
            let (topic, refusal) = &topics[t];
            let outcome = if Instant::now() >= options.deadline {
                Err(SinkError::Transient(PAST_DEADLINE.into()))
            } else if let Some(err) = refusal {
                Err(err.clone())
            } else {
                message_headers(event).map(|h| (topic, h))
            };
            let (topic, headers) = match outcome {
                Ok(ok) => ok,
                Err(err) => {
                    accepted = i;
                    tracker.fail(event.id, err);
                    tracker.complete_one();
                    continue;
                }
            };
            let mut record = BaseRecord::with_opaque_to(topic, tracker.clone())
                .key(event.aggregate_id.as_bytes())
                .payload(event.payload.as_slice())
                .headers(headers)
                .timestamp(event.created_at_ms);
            loop {
                match session.producer.send(record) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r))
                        if Instant::now() < options.deadline =>
                    {
                        record = r;
                        tokio::time::sleep(QUEUE_FULL_WAIT).await;
                    }
                    Err((err, _)) => {
                        let error = match err {
                            KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull) => {
                                SinkError::Transient(PAST_DEADLINE.into())
                            }
                            err => {
                                record_broker_error(&err);
                                classify(&err)
                            }
                        };
                        accepted = i;
                        tracker.fail(event.id, error);
                        tracker.complete_one();
                        break;
                    }
                }
            }
        }
        Ok(Sent {
            delivery,
            session: session.id,
            accepted,
        })
    }

    async fn check(&self) -> Result<(), SinkError> {
        if self.health.reset_needed.load(Ordering::Acquire) {
            // An idle node recovers too, not only at its next send.
            self.reset_if_needed().await?;
        }
        if self.health.fatal.load(Ordering::Acquire) {
            return Err(SinkError::Transient(
                "the producer hit a fatal error and is being recreated".into(),
            ));
        }
        let (ok, stall) = (
            self.health.last_ok_ms.load(Ordering::Relaxed),
            self.health.last_stall_ms.load(Ordering::Relaxed),
        );
        if stall > ok && now_ms().saturating_sub(stall) < 60_000 {
            return Err(SinkError::Transient(
                "deliveries are stalling (timed out or producer id unknown to the broker)".into(),
            ));
        }
        let producer = Arc::clone(&self.session.read().await.producer);
        tokio::task::spawn_blocking(move || producer.client().fetch_metadata(None, CHECK_TIMEOUT))
            .await
            .map_err(|e| SinkError::Transient(format!("metadata task: {e}")))?
            .map(|_| ())
            .map_err(|e| classify(&e))
    }

    fn delivery_timeout(&self) -> Duration {
        Duration::from_millis(self.config.delivery_timeout_ms)
    }

    async fn purge(&self) {
        let producer = Arc::clone(&self.session.read().await.producer);
        let purged = tokio::task::spawn_blocking(move || {
            producer.purge(rdkafka::producer::PurgeConfig::default().queue().inflight());
            // Runs the delivery callbacks of what was purged.
            let _ = producer.flush(Duration::from_millis(100));
        });
        if let Err(e) = purged.await {
            tracing::warn!(error = %e, "purging the producer failed");
        }
    }
}
