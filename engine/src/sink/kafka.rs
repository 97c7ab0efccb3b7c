//! The Kafka sink: one idempotent librdkafka producer per node, shared by
//! every partition worker.
//!
//! Sends are fire-and-forget into librdkafka's queue with a per-batch
//! tracker as delivery opaque (an `Arc` clone per message, no future or
//! channel per message); librdkafka's poll thread runs the delivery callback,
//! which counts the batch down and completes it when the last event is in.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

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
use crate::sink::{routing, Delivery, DeliveryReport, Sink};

/// The error of events held back behind a refused event of their batch.
pub const HELD_BACK: &str = "not sent: an earlier event of the batch was refused";

/// How long the sink waits when librdkafka's queue is full before retrying.
const QUEUE_FULL_WAIT: Duration = Duration::from_millis(2);
const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);
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
        // A message not acknowledged in 30 s fails and is retried from the
        // outbox (librdkafka's default is 5 minutes); see `needs_new_producer`.
        ("message.timeout.ms", "30000"),
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
    cc
}

/// Counts a batch down; completes its [`Delivery`] when the last event is in.
struct BatchTracker {
    remaining: AtomicUsize,
    failed: Mutex<Vec<(Uuid, SinkError)>>,
    done: Mutex<Option<oneshot::Sender<DeliveryReport>>>,
}

impl BatchTracker {
    fn fail(&self, id: Uuid, error: SinkError) {
        if let Ok(mut f) = self.failed.lock() {
            f.push((id, error));
        }
    }

    fn complete_one(&self) {
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            let failed = self
                .failed
                .lock()
                .map(|mut f| std::mem::take(&mut *f))
                .unwrap_or_default();
            if let Some(tx) = self.done.lock().ok().and_then(|mut d| d.take()) {
                let _ = tx.send(DeliveryReport { failed });
            }
        }
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
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
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
    /// Set by such a failure; the next `send` recreates the producer.
    reset_needed: AtomicBool,
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
    let permanent = matches!(
        code,
        Some(
            C::MessageSizeTooLarge
                | C::InvalidMessageSize
                | C::InvalidMessage
                | C::InvalidRecord
                | C::InvalidTopic
                | C::TopicAuthorizationFailed
                | C::ClusterAuthorizationFailed
                | C::TransactionalIdAuthorizationFailed
                | C::UnsupportedForMessageFormat
                | C::InvalidRequiredAcks
        )
    );
    if permanent {
        SinkError::Permanent(err.to_string())
    } else {
        SinkError::Transient(err.to_string())
    }
}

/// Publishes outbox events to Kafka.
pub struct KafkaSink {
    producer: RwLock<Arc<ThreadedProducer<DeliveryContext>>>,
    admin: AdminClient<DefaultClientContext>,
    config: KafkaConfig,
    known_topics: TopicCache,
    health: Arc<Health>,
}

impl KafkaSink {
    pub fn new(config: &KafkaConfig) -> Result<Self, SinkError> {
        let cc = client_config(config);
        let known_topics = TopicCache::default();
        let health = Arc::new(Health::default());
        let producer = Self::producer(config, &known_topics, &health)?;
        let admin = cc
            .create()
            .map_err(|e| SinkError::Permanent(format!("kafka admin client: {e}")))?;
        Ok(Self {
            producer: RwLock::new(producer),
            admin,
            config: config.clone(),
            known_topics,
            health,
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

    fn current(&self) -> Result<Arc<ThreadedProducer<DeliveryContext>>, SinkError> {
        self.producer
            .read()
            .map(|p| Arc::clone(&p))
            .map_err(|_| SinkError::Transient("producer lock poisoned".into()))
    }

    /// Replaces the producer with a new one (a new producer id) and fails
    /// whatever the old one still holds, so those events are retried from
    /// the outbox through the new one.
    async fn renew_producer(&self) -> Result<(), SinkError> {
        let fresh = Self::producer(&self.config, &self.known_topics, &self.health)?;
        let old = {
            let mut slot = self
                .producer
                .write()
                .map_err(|_| SinkError::Transient("producer lock poisoned".into()))?;
            std::mem::replace(&mut *slot, fresh)
        };
        if let Ok(mut topics) = self.known_topics.write() {
            topics.clear();
        }
        tracing::warn!("deliveries stalled (timed out or producer id unknown to the broker); recreated the Kafka producer");
        tokio::task::spawn_blocking(move || {
            old.purge(rdkafka::producer::PurgeConfig::default().queue().inflight());
            let _ = old.flush(Duration::from_secs(5));
        })
        .await
        .map_err(|e| SinkError::Transient(format!("purging the old producer: {e}")))
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
        if self.config.create_topics {
            let replication = match self.config.topic_replication {
                -1 => TopicReplication::Fixed(-1),
                r => TopicReplication::Fixed(r),
            };
            let new = NewTopic::new(topic, self.config.topic_partitions, replication);
            let opts = AdminOptions::new().operation_timeout(Some(ADMIN_TIMEOUT));
            let results = self
                .admin
                .create_topics([&new], &opts)
                .await
                .map_err(|e| classify(&e))?;
            for r in results {
                match r {
                    Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                    Err((name, code)) => {
                        let err = KafkaError::AdminOp(code);
                        tracing::warn!(topic = %name, error = %err, "could not create topic");
                        return Err(classify(&err));
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

    /// Waits until queued messages are delivered, up to `timeout`.
    pub fn flush(&self, timeout: Duration) -> Result<(), SinkError> {
        self.current()?.flush(timeout).map_err(|e| classify(&e))
    }
}

impl Sink for KafkaSink {
    async fn send(&self, events: &[OutboxEvent]) -> Result<Delivery, SinkError> {
        let (tx, delivery) = Delivery::channel();
        if events.is_empty() {
            let _ = tx.send(DeliveryReport::default());
            return Ok(delivery);
        }
        if self.health.reset_needed.swap(false, Ordering::Relaxed) {
            self.renew_producer().await?;
        }
        let producer = self.current()?;
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
        let tracker = Arc::new(BatchTracker {
            remaining: AtomicUsize::new(events.len()),
            failed: Mutex::new(Vec::new()),
            done: Mutex::new(Some(tx)),
        });
        // Once an event is refused, the rest of the batch is not sent: the
        // events after it must not overtake it (they are retried with it).
        let mut refused = false;
        for (event, &t) in events.iter().zip(&topic_of) {
            let (topic, refusal) = &topics[t];
            let outcome = if refused {
                Err(SinkError::Transient(HELD_BACK.into()))
            } else if let Some(err) = refusal {
                Err(err.clone())
            } else {
                message_headers(event).map(|h| (topic, h))
            };
            let (topic, headers) = match outcome {
                Ok(ok) => ok,
                Err(err) => {
                    refused = true;
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
                match producer.send(record) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                        record = r;
                        tokio::time::sleep(QUEUE_FULL_WAIT).await;
                    }
                    Err((err, _)) => {
                        record_broker_error(&err);
                        tracker.fail(event.id, classify(&err));
                        tracker.complete_one();
                        refused = true;
                        break;
                    }
                }
            }
        }
        Ok(delivery)
    }

    async fn check(&self) -> Result<(), SinkError> {
        let (ok, stall) = (
            self.health.last_ok_ms.load(Ordering::Relaxed),
            self.health.last_stall_ms.load(Ordering::Relaxed),
        );
        if stall > ok && now_ms().saturating_sub(stall) < 60_000 {
            return Err(SinkError::Transient(
                "deliveries are stalling (timed out or producer id unknown to the broker)".into(),
            ));
        }
        let producer = self.current()?;
        tokio::task::spawn_blocking(move || producer.client().fetch_metadata(None, CHECK_TIMEOUT))
            .await
            .map_err(|e| SinkError::Transient(format!("metadata task: {e}")))?
            .map(|_| ())
            .map_err(|e| classify(&e))
    }
}
