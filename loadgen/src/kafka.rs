//! Topic administration for runs: create a run's topics (stamped with the
//! broker's append time, so latency to the broker can be measured), wait
//! for them in metadata, delete them afterwards.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::ClientConfig;

/// How long reaching the broker may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a topic may take to appear in metadata after it was created.
const TOPIC_WAIT: Duration = Duration::from_secs(15);
/// Topic config that makes the broker stamp each message with its append
/// time (Kafka's `message.timestamp.type`; brokers that ignore it leave
/// the producer's create time, which the consumer can tell apart).
pub const APPEND_TIME: (&str, &str) = ("message.timestamp.type", "LogAppendTime");

pub type Admin = AdminClient<DefaultClientContext>;

pub fn admin(brokers: &str) -> Result<Admin> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .context("creating the Kafka admin client")
}

/// Creates `topic` with `partitions` partitions, stamped with append
/// times; `Ok(false)` if it existed.
pub async fn create_topic(admin: &Admin, topic: &str, partitions: i32) -> Result<bool> {
    let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1))
        .set(APPEND_TIME.0, APPEND_TIME.1);
    let opts = AdminOptions::new().operation_timeout(Some(CONNECT_TIMEOUT));
    let results = admin
        .create_topics([&new], &opts)
        .await
        .with_context(|| format!("creating topic {topic}"))?;
    match results.into_iter().next() {
        Some(Ok(_)) => Ok(true),
        Some(Err((_, RDKafkaErrorCode::TopicAlreadyExists))) => Ok(false),
        Some(Err((name, code))) => bail!("creating topic {name}: {code}"),
        None => bail!("creating topic {topic}: the broker did not answer for it"),
    }
}

/// Deletes topics, so that an in-memory broker gives their memory back.
/// Returns the topics it could not delete, with why; a topic that does
/// not exist is not a failure.
pub async fn delete_topics(admin: &Admin, topics: &[String]) -> Vec<String> {
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    let opts = AdminOptions::new().operation_timeout(Some(CONNECT_TIMEOUT));
    match admin.delete_topics(&names, &opts).await {
        Ok(results) => results
            .into_iter()
            .filter_map(|r| r.err())
            .filter(|(_, code)| *code != RDKafkaErrorCode::UnknownTopicOrPartition)
            .map(|(name, code)| format!("{name}: {code}"))
            .collect(),
        Err(e) => vec![format!("{}: {e}", names.join(","))],
    }
}

/// The partition count of `topic`, once metadata shows it (blocking).
pub fn wait_for_topic(consumer: &BaseConsumer, topic: &str) -> Result<i32> {
    let start = Instant::now();
    loop {
        let md = consumer
            .fetch_metadata(Some(topic), CONNECT_TIMEOUT)
            .with_context(|| format!("reading metadata of {topic}"))?;
        let partitions = md
            .topics()
            .iter()
            .find(|t| t.name() == topic && t.error().is_none())
            .map(|t| t.partitions().len())
            .unwrap_or(0);
        if partitions > 0 {
            return i32::try_from(partitions).context("partition count");
        }
        if start.elapsed() > TOPIC_WAIT {
            bail!(
                "topic {topic} did not appear in the broker's metadata within {}s",
                TOPIC_WAIT.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A consumer that reads assigned partitions, never joins a group, and
/// asks for data every 10 ms (the default 500 ms would show as latency).
pub fn consumer_config(brokers: &str, group: &str) -> ClientConfig {
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", brokers)
        // Never joined (partitions are assigned); librdkafka wants one anyway.
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        .set("fetch.wait.max.ms", "10")
        .set("socket.connection.setup.timeout.ms", "5000");
    cc
}
