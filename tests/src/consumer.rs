//! The tests' one consumer: reads topics from the beginning with assigned
//! partitions (no group join: tansu's joins are slow) and hands back what
//! it saw as [`Received`].
//!
//! A test fixture: it panics if librdkafka refuses its configuration.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use uuid::Uuid;

use crate::{brokers, TOPIC_PARTITIONS};

/// A message as a consumer saw it.
#[derive(Debug, Clone)]
pub struct Received {
    /// The topic it was read from.
    pub topic: String,
    /// Its Kafka partition.
    pub partition: i32,
    /// The message key (the aggregate id), lossily as text.
    pub key: String,
    /// The value as JSON (`null` if it is not).
    pub payload: serde_json::Value,
    /// Every header, its value lossily as text.
    pub headers: HashMap<String, String>,
    /// The message timestamp (the outbox row's `created_at`).
    pub timestamp_ms: Option<i64>,
}

impl Received {
    /// What a consumer saw in `m`: its headers as strings, its payload as
    /// JSON (`null` if it is not).
    pub fn from_message(m: &impl Message) -> Received {
        let mut headers = HashMap::new();
        if let Some(h) = m.headers() {
            for hd in h.iter() {
                headers.insert(
                    hd.key.to_string(),
                    String::from_utf8_lossy(hd.value.unwrap_or_default()).into_owned(),
                );
            }
        }
        Received {
            topic: m.topic().to_string(),
            partition: m.partition(),
            key: String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned(),
            payload: serde_json::from_slice(m.payload().unwrap_or_default())
                .unwrap_or(serde_json::Value::Null),
            headers,
            timestamp_ms: m.timestamp().to_millis(),
        }
    }

    /// The event id (the `id` header).
    ///
    /// # Panics
    ///
    /// If the message has no `id` header holding a UUID.
    pub fn id(&self) -> Uuid {
        self.headers
            .get("id")
            .and_then(|s| Uuid::parse_str(s).ok())
            .expect("every message has an id header")
    }
}

/// Reads `topics` from the beginning until `want` messages arrived (then
/// `grace` longer, to see duplicates) or `timeout` passed.
pub async fn consume(
    topics: &[String],
    want: usize,
    timeout: Duration,
    grace: Duration,
) -> Vec<Received> {
    let mut count = 0;
    consume_until(&brokers(), topics, timeout, grace, false, move |_| {
        count += 1;
        count >= want
    })
    .await
}

/// The tests' one consumer: reads `topics` at `bootstrap` from the
/// beginning until `enough` (told of each message) holds, or from the
/// start if `enough_already`, then `grace` longer (to see copies), or until
/// `timeout` passed. Partitions are assigned, not joined (tansu's group
/// joins are slow).
pub async fn consume_until(
    bootstrap: &str,
    topics: &[String],
    timeout: Duration,
    grace: Duration,
    enough_already: bool,
    enough: impl FnMut(&Received) -> bool + Send + 'static,
) -> Vec<Received> {
    let bootstrap = bootstrap.to_string();
    let topics = topics.to_vec();
    tokio::task::spawn_blocking(move || {
        consume_blocking(&bootstrap, &topics, timeout, grace, enough_already, enough)
    })
    .await
    .expect("consumer thread")
}

fn consume_blocking(
    bootstrap: &str,
    topics: &[String],
    timeout: Duration,
    grace: Duration,
    enough_already: bool,
    mut enough: impl FnMut(&Received) -> bool,
) -> Vec<Received> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("test-{}", Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("fetch.wait.max.ms", "50")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for t in topics {
        for p in 0..TOPIC_PARTITIONS {
            tpl.add_partition_offset(t, p, Offset::Beginning)
                .expect("partition offset");
        }
    }
    consumer.assign(&tpl).expect("assign");
    let start = Instant::now();
    let mut out = Vec::new();
    let mut done_at: Option<Instant> = enough_already.then(Instant::now);
    let mut errors = 0;
    loop {
        if start.elapsed() > timeout || done_at.is_some_and(|t| t.elapsed() > grace) {
            break;
        }
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                let r = Received::from_message(&m);
                let done = enough(&r);
                out.push(r);
                if done && done_at.is_none() {
                    done_at = Some(Instant::now());
                }
            }
            Some(Err(e)) => {
                // A broker that is away on purpose makes many.
                errors += 1;
                if errors <= 5 {
                    eprintln!("consumer error: {e}");
                }
            }
            None => {}
        }
    }
    if errors > 5 {
        eprintln!("consumer errors: {errors} in all");
    }
    out
}
