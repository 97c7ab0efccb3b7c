//! `loadgen broker-ceiling`: what the broker takes with nothing else in
//! the way. Messages shaped like the engine's (key = aggregate id, JSON
//! payload of the same size, the same four headers) go straight to the
//! broker through a producer built by the engine's own `client_config`
//! (idempotent, linger 5 ms, murmur2_random...), as fast as librdkafka's
//! queue takes them; the rate is acknowledgements per second.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use outbox_engine::config::KafkaConfig;
use outbox_engine::sink::kafka::client_config;

use crate::cli::BrokerConfig;
use crate::clock::Clock;
use crate::kafka;
use crate::plan::Payload;
use crate::progress::{self, Counters, Labels};
use crate::report::broker::BrokerResults;
use crate::report::histogram as h;
use crate::report::{per_sec, Kind, Latency, Machine, Meta, Report, VERSION};
use crate::run::new_run;
use crate::verifier::tally::latency_histogram;
use crate::writer::{EVENT_TYPE, RUN_HEADER};

/// How long the producer may take to deliver what is queued at the end.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(60);
/// How long to wait when librdkafka's queue is full.
const QUEUE_FULL_WAIT: Duration = Duration::from_millis(1);

pub const LABELS: Labels = Labels {
    committed: "sent",
    delivered: Some("acked"),
    p99: true,
};

/// Counts acknowledgements; runs on librdkafka's delivery thread.
struct Acks {
    clock: Clock,
    counters: Arc<Counters>,
    acked: AtomicU64,
    failed: AtomicU64,
    last_ack_us: AtomicU64,
    latency: Mutex<Histogram<u64>>,
    first_error: Mutex<Option<String>>,
}

impl ClientContext for Acks {}

impl ProducerContext for Acks {
    /// When the message was sent, microseconds since the clock's origin.
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, sent_us: usize) {
        let now = self.clock.now_us().saturating_sub(self.clock.origin_us());
        match result {
            Ok(_) => {
                self.acked.fetch_add(1, Ordering::Relaxed);
                self.counters.delivered.fetch_add(1, Ordering::Relaxed);
                self.last_ack_us.fetch_max(now, Ordering::Relaxed);
                if let Ok(mut h) = self.latency.lock() {
                    h.saturating_record(now.saturating_sub(sent_us as u64));
                }
            }
            Err((e, _)) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut first) = self.first_error.lock() {
                    first.get_or_insert_with(|| e.to_string());
                }
            }
        }
    }
}

/// Produces for the configured duration (or message count).
pub async fn run(config: BrokerConfig, meta: Meta) -> Result<Report<BrokerConfig, BrokerResults>> {
    let (run_id, started_at_unix_ms) = new_run();
    let admin = kafka::admin(&config.kafka_brokers)?;
    let topics = config.topics();
    for t in &topics {
        kafka::create_topic(&admin, t, config.topic_partitions).await?;
    }
    let engine_like = KafkaConfig {
        brokers: config.kafka_brokers.clone(),
        ..KafkaConfig::default()
    };
    let cc = client_config(&engine_like);
    let producer_properties = cc
        .config_map()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();

    let clock = Clock::start();
    let counters = Arc::new(Counters::default());
    let acks = Acks {
        clock,
        counters: Arc::clone(&counters),
        acked: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        last_ack_us: AtomicU64::new(0),
        latency: Mutex::new(latency_histogram()?),
        first_error: Mutex::new(None),
    };
    let producer: Arc<ThreadedProducer<Acks>> = Arc::new(
        cc.create_with_context(acks)
            .context("creating the Kafka producer")?,
    );
    let progress_stop = CancellationToken::new();
    let progress = progress::spawn(Arc::clone(&counters), clock, progress_stop.clone(), LABELS);
    let p99 = {
        // The live line's p99, from the delivery thread's histogram.
        let stop = progress_stop.clone();
        let counters = Arc::clone(&counters);
        let producer = Arc::clone(&producer);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
                if let Ok(h) = producer.context().latency.lock() {
                    counters
                        .p99_us
                        .store(h.value_at_quantile(0.99), Ordering::Relaxed);
                }
            }
        })
    };
    let sending = {
        let config = config.clone();
        let producer = Arc::clone(&producer);
        let counters = Arc::clone(&counters);
        let run_id = run_id.clone();
        tokio::task::spawn_blocking(move || {
            send_all(&producer, &config, &topics, &run_id, clock, &counters)
        })
    };
    let sent = sending
        .await
        .map_err(|_| anyhow!("the producing thread panicked"))??;
    counters.writing_done.store(true, Ordering::Relaxed);
    let flushed = {
        let producer = Arc::clone(&producer);
        tokio::task::spawn_blocking(move || producer.flush(FLUSH_TIMEOUT)).await?
    };
    progress_stop.cancel();
    let samples = progress.await.unwrap_or_default();
    let _ = p99.await;
    if let Err(e) = flushed {
        bail!(
            "the producer did not deliver everything within {}s: {e}",
            FLUSH_TIMEOUT.as_secs()
        );
    }

    let ctx = producer.context();
    let acked = ctx.acked.load(Ordering::Relaxed);
    let secs = ctx.last_ack_us.load(Ordering::Relaxed) as f64 / 1e6;
    let latency = ctx
        .latency
        .lock()
        .map_err(|_| anyhow!("ack latency histogram poisoned"))?
        .clone();
    let first_error = ctx.first_error.lock().ok().and_then(|e| e.clone());
    let topics_deleted = if config.keep_topics {
        false
    } else {
        let failed = kafka::delete_topics(&admin, &config.topics()).await;
        for f in &failed {
            eprintln!("loadgen: could not delete topic {f}");
        }
        failed.is_empty()
    };
    let results = BrokerResults {
        sent,
        acked,
        failed: ctx.failed.load(Ordering::Relaxed),
        first_error,
        secs,
        acked_per_sec: per_sec(acked, secs),
        ack_latency_ms: Latency::from_us(&latency),
        producer_properties,
        topics_deleted,
    };
    let mut report = Report {
        kind: Kind::BrokerCeiling,
        name: meta.name.unwrap_or_else(|| "broker-ceiling".into()),
        loadgen_version: VERSION.into(),
        run_id,
        started_at_unix_ms,
        config,
        engine: None,
        machine: Machine::probe("PostgreSQL not used".into(), meta.broker),
        results,
        timeseries: samples,
        failures: Vec::new(),
        histograms: Vec::new(),
    };
    if report.results.failed > 0 {
        report.failures.push(format!(
            "{} messages were refused by the broker: {}",
            report.results.failed,
            report.results.first_error.as_deref().unwrap_or("?")
        ));
    }
    report.record(h::SEND_TO_ACK, &latency)?;
    Ok(report)
}

/// The sending loop, on a blocking thread: waits briefly whenever
/// librdkafka's queue is full. Returns how many messages were sent.
fn send_all(
    producer: &ThreadedProducer<Acks>,
    config: &BrokerConfig,
    topics: &[String],
    run_id: &str,
    clock: Clock,
    counters: &Counters,
) -> Result<u64> {
    let mut rng = StdRng::from_entropy();
    let payload = Payload::new(config.payload_bytes, &mut rng);
    let keys: Vec<String> = (0..config.aggregates).map(|i| i.to_string()).collect();
    let mut seqs = vec![0u64; config.aggregates];
    let duration = Duration::from_secs_f64(config.duration_secs);
    let limit = config.messages.unwrap_or(u64::MAX);
    let mut sent = 0u64;
    while sent < limit && clock.origin().elapsed() < duration {
        let a = rng.gen_range(0..config.aggregates);
        seqs[a] += 1;
        let type_index = a % config.aggregate_types.len();
        let body = payload.render(seqs[a], clock.now_us());
        let id = Uuid::now_v7().to_string();
        let headers = OwnedHeaders::new_with_capacity(4)
            .insert(Header {
                key: "id",
                value: Some(id.as_str()),
            })
            .insert(Header {
                key: "event_type",
                value: Some(EVENT_TYPE),
            })
            .insert(Header {
                key: "aggregate_type",
                value: Some(config.aggregate_types[type_index].as_str()),
            })
            .insert(Header {
                key: RUN_HEADER,
                value: Some(run_id),
            });
        let sent_us = clock.now_us().saturating_sub(clock.origin_us()) as usize;
        let mut record = BaseRecord::with_opaque_to(&topics[type_index], sent_us)
            .key(keys[a].as_str())
            .payload(body.as_str())
            .headers(headers);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    std::thread::sleep(QUEUE_FULL_WAIT);
                }
                Err((e, _)) => bail!("producing to {}: {e}", topics[type_index]),
            }
        }
        sent += 1;
        counters.committed.fetch_add(1, Ordering::Relaxed);
    }
    Ok(sent)
}
