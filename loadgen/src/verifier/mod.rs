//! The verifier: a Kafka consumer on a thread of its own that reads every
//! partition of the run's topics, keeps the messages of this run (by the
//! `loadgen_run` header), and matches them with the commits the writers
//! report, until everything committed arrived or the drain timeout passed.
//!
//! It assigns partitions instead of joining a group (group joins are slow
//! on tansu). Topics loadgen creates are read from the beginning; topics
//! that already existed from the end, positioned before the load starts.
//!
//! Broker-append latency: the engine sets each message's timestamp to the
//! row's `created_at` (CreateTime), so the verifier creates the run's
//! topics with `message.timestamp.type=LogAppendTime`. A broker that
//! honours it overwrites the timestamp with its append time, and the
//! consumer sees `Timestamp::LogAppendTime`; the tally counts which kind
//! arrived, so the report can say which latency it used.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{BorrowedMessage, Headers};
use rdkafka::{Message, Offset, Timestamp, TopicPartitionList};
use serde::Deserialize;
use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::mpsc::UnboundedReceiver;
use uuid::Uuid;

use crate::cli::RunConfig;
use crate::clock::Clock;
use crate::kafka::{self, CONNECT_TIMEOUT};
use crate::progress::Counters;
use crate::writer::{CommitBatch, RUN_HEADER};

pub mod inbox;
pub mod tally;

pub use inbox::{InboxCheck, InboxCounts};
pub use tally::{DuplicateSample, Location, Tally, TimestampTypes};

/// How long the consumer polls after assigning before the load starts, so
/// that "end" offsets are resolved before the first event is written.
const SETTLE: Duration = Duration::from_secs(1);

/// Where the verifier starts reading a topic.
#[derive(Debug, Clone)]
pub struct TopicStart {
    pub topic: String,
    pub partitions: i32,
    /// Created by loadgen (read from the beginning) or already there
    /// (read from the end).
    pub created: bool,
}

/// A consumer assigned to every partition of the run's topics, not yet
/// reading.
pub struct Verifier {
    consumer: BaseConsumer,
    run_id: String,
    pub topics: Vec<TopicStart>,
    /// With `run --inbox`: every message of the run is also claimed
    /// through the consumer inbox.
    pub inbox: Option<InboxCheck>,
}

/// The payload fields the verifier reads; the rest is skipped.
#[derive(Deserialize)]
struct Seq {
    seq: u64,
}

impl Verifier {
    /// Reaches the broker, creates missing topics, assigns every partition.
    pub async fn connect(config: &RunConfig, run_id: &str) -> Result<Self> {
        let brokers = config.kafka_brokers.clone();
        let consumer: BaseConsumer = kafka::consumer_config(&brokers, &format!("loadgen-{run_id}"))
            .create()
            .context("creating the Kafka consumer")?;
        let consumer = tokio::task::spawn_blocking(move || {
            consumer
                .fetch_metadata(None, CONNECT_TIMEOUT)
                .map(|_| consumer)
        })
        .await?
        .map_err(|e| anyhow!("cannot reach Kafka brokers at {brokers}: {e}"))?;

        let admin = kafka::admin(&config.kafka_brokers)?;
        let mut created = Vec::new();
        for topic in config.topics() {
            created.push(kafka::create_topic(&admin, &topic, config.topic_partitions).await?);
        }
        let names = config.topics();
        let (consumer, topics) = tokio::task::spawn_blocking(move || {
            let topics = assign(&consumer, &names, &created)?;
            settle(&consumer);
            Ok::<_, anyhow::Error>((consumer, topics))
        })
        .await??;
        Ok(Self {
            consumer,
            run_id: run_id.to_string(),
            topics,
            inbox: None,
        })
    }

    /// Reads on a thread of its own until every committed event arrived
    /// after the writers finished (the channel closed), `drain` passed
    /// after that, or `abort` is set.
    pub fn spawn(
        self,
        commits: UnboundedReceiver<CommitBatch>,
        clock: Clock,
        counters: Arc<Counters>,
        drain: Duration,
        abort: Arc<AtomicBool>,
    ) -> Result<JoinHandle<Result<Outcome>>> {
        std::thread::Builder::new()
            .name("verifier".into())
            .spawn(move || self.run(commits, clock, &counters, drain, &abort))
            .context("starting the verifier thread")
    }

    fn run(
        mut self,
        mut commits: UnboundedReceiver<CommitBatch>,
        clock: Clock,
        counters: &Counters,
        drain: Duration,
        abort: &AtomicBool,
    ) -> Result<Outcome> {
        let mut tally = Tally::new()?;
        let mut drain_deadline: Option<Instant> = None;
        let mut last_p99 = Instant::now();
        let mut last_error: Option<(String, Instant)> = None;
        loop {
            loop {
                match commits.try_recv() {
                    Ok(batch) => tally.on_commit(&batch),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        drain_deadline.get_or_insert_with(|| Instant::now() + drain);
                        break;
                    }
                }
            }
            if let Some(deadline) = drain_deadline {
                if tally.missing() == 0 {
                    return self.outcome(tally, true, clock);
                }
                if Instant::now() >= deadline {
                    return self.outcome(tally, false, clock);
                }
            }
            if abort.load(Ordering::Relaxed) {
                return self.outcome(tally, false, clock);
            }
            // Take whatever is buffered, then go back to the channel.
            let mut timeout = Duration::from_millis(20);
            for _ in 0..10_000 {
                match self.consumer.poll(timeout) {
                    None => break,
                    Some(Ok(m)) => {
                        if let Some((id, at_ms)) =
                            self.handle(&m, &mut tally, clock.now_us(), counters)
                        {
                            if let Some(inbox) = self.inbox.as_mut() {
                                inbox.push(id, at_ms);
                            }
                        }
                    }
                    Some(Err(e)) => {
                        // Transport errors repeat while the broker is away;
                        // librdkafka reconnects by itself. Say it once a second.
                        let msg = e.to_string();
                        let repeat = last_error.as_ref().is_some_and(|(m, at)| {
                            *m == msg && at.elapsed() < Duration::from_secs(1)
                        });
                        if !repeat {
                            eprintln!("loadgen: consumer: {msg}");
                            last_error = Some((msg, Instant::now()));
                        }
                        break;
                    }
                }
                timeout = Duration::ZERO;
            }
            if let Some(inbox) = self.inbox.as_mut() {
                inbox.flush()?;
            }
            if last_p99.elapsed() >= Duration::from_millis(250) {
                counters
                    .p99_us
                    .store(tally.latency.value_at_quantile(0.99), Ordering::Relaxed);
                last_p99 = Instant::now();
            }
        }
    }

    /// The last claims, then what was seen.
    fn outcome(&mut self, tally: Tally, complete: bool, clock: Clock) -> Result<Outcome> {
        let inbox = match self.inbox.as_mut() {
            Some(i) => {
                i.flush()?;
                Some(i.counts)
            }
            None => None,
        };
        let mut outcome = Outcome::new(tally, complete, clock.now_us());
        outcome.inbox = inbox;
        Ok(outcome)
    }

    /// Tallies a message; returns the id and timestamp of a message of
    /// this run, for the inbox.
    fn handle(
        &self,
        m: &BorrowedMessage<'_>,
        tally: &mut Tally,
        now_us: u64,
        counters: &Counters,
    ) -> Option<(Uuid, Option<i64>)> {
        let headers = m.headers()?;
        let mut id = None;
        let mut ours = false;
        for h in headers.iter() {
            match h.key {
                "id" => {
                    id = h
                        .value
                        .and_then(|v| std::str::from_utf8(v).ok())
                        .and_then(|s| Uuid::parse_str(s).ok())
                }
                RUN_HEADER => ours = h.value == Some(self.run_id.as_bytes()),
                _ => {}
            }
        }
        if !ours {
            return None;
        }
        let key = m.key().and_then(|k| std::str::from_utf8(k).ok());
        let seq = m
            .payload()
            .and_then(|p| serde_json::from_slice::<Seq>(p).ok());
        let (Some(id), Some(key), Some(seq)) = (id, key, seq) else {
            tally.malformed += 1;
            return None;
        };
        let at = Location {
            partition: m.partition(),
            offset: m.offset(),
        };
        let append_us = match m.timestamp() {
            Timestamp::LogAppendTime(ms) => {
                tally.timestamp_types.log_append_time += 1;
                u64::try_from(ms).ok().map(|ms| ms * 1000)
            }
            Timestamp::CreateTime(_) => {
                tally.timestamp_types.create_time += 1;
                None
            }
            Timestamp::NotAvailable => {
                tally.timestamp_types.none += 1;
                None
            }
        };
        if tally.on_message(id, key, seq.seq, at, now_us, append_us) {
            counters.delivered.fetch_add(1, Ordering::Relaxed);
        }
        Some((id, m.timestamp().to_millis()))
    }
}

/// Waits until every topic shows its partitions in metadata, then assigns
/// them all: new topics from the beginning, existing ones from the end.
fn assign(consumer: &BaseConsumer, names: &[String], created: &[bool]) -> Result<Vec<TopicStart>> {
    let mut topics = Vec::new();
    let mut tpl = TopicPartitionList::new();
    for (name, &created) in names.iter().zip(created) {
        let partitions = kafka::wait_for_topic(consumer, name)?;
        let from = if created {
            Offset::Beginning
        } else {
            Offset::End
        };
        for p in 0..partitions {
            tpl.add_partition_offset(name, p, from)
                .with_context(|| format!("assigning {name}/{p}"))?;
        }
        topics.push(TopicStart {
            topic: name.clone(),
            partitions,
            created,
        });
    }
    consumer.assign(&tpl).context("assigning partitions")?;
    Ok(topics)
}

/// Polls for [`SETTLE`]: librdkafka resolves "end" offsets in the
/// background and there is no call that says when it is done. Messages
/// seen meanwhile predate the run and are dropped.
fn settle(consumer: &BaseConsumer) {
    let start = Instant::now();
    while start.elapsed() < SETTLE {
        let _ = consumer.poll(Duration::from_millis(50));
    }
}

/// What the verifier saw.
pub struct Outcome {
    pub tally: Tally,
    /// With `--inbox`: what the inbox claimed.
    pub inbox: Option<InboxCounts>,
    /// Whether every committed event arrived before the drain timeout.
    pub complete: bool,
    pub finished_us: u64,
}

impl Outcome {
    fn new(tally: Tally, complete: bool, finished_us: u64) -> Self {
        Self {
            tally,
            inbox: None,
            complete,
            finished_us,
        }
    }
}
