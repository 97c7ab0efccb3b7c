//! Every metric the engine exports: names as constants, described once.
//! Hot paths record per batch, never per message; labels are bounded
//! (partition, error kind, broker), never event ids.

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use metrics_util::MetricKindMask;

pub const EVENTS_PUBLISHED: &str = "outbox_events_published_total";
pub const EVENTS_FAILED: &str = "outbox_events_failed_total";
pub const BATCH_SIZE: &str = "outbox_batch_size";
pub const FETCH_SECONDS: &str = "outbox_fetch_duration_seconds";
pub const SEND_SECONDS: &str = "outbox_send_duration_seconds";
pub const ACK_SECONDS: &str = "outbox_ack_duration_seconds";
pub const BROKER_ERRORS: &str = "outbox_broker_errors_total";
pub const STORE_ERRORS: &str = "outbox_store_errors_total";
pub const PENDING_EVENTS: &str = "outbox_pending_events";
pub const OLDEST_AGE_SECONDS: &str = "outbox_oldest_event_age_seconds";
pub const LEASES_HELD: &str = "outbox_leases_held";
pub const LEASES_ACQUIRED: &str = "outbox_leases_acquired_total";
pub const LEASES_LOST: &str = "outbox_leases_lost_total";
pub const LEASES_RELEASED: &str = "outbox_leases_released_total";
pub const DEAD_LETTERS: &str = "outbox_dead_letters_total";
pub const VACUUMS: &str = "outbox_vacuums_total";
pub const KAFKA_QUEUE_MESSAGES: &str = "outbox_kafka_queue_messages";
pub const KAFKA_QUEUE_BYTES: &str = "outbox_kafka_queue_bytes";
pub const KAFKA_RETRIES: &str = "outbox_kafka_retries_total";
pub const KAFKA_REQUEST_ERRORS: &str = "outbox_kafka_request_errors_total";
pub const KAFKA_BROKER_RTT_SECONDS: &str = "outbox_kafka_broker_rtt_seconds";
pub const READY: &str = "outbox_ready";

/// Buckets for durations of a batch's steps: 0.5 ms to 30 s.
const SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
const BATCH_BUCKETS: &[f64] = &[
    1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
];

/// Installs the Prometheus recorder (once per process) and describes every
/// metric. Returns the handle that renders the text format.
pub fn install() -> Result<PrometheusHandle, String> {
    let handle = PrometheusBuilder::new()
        // A gauge nobody updates any more (a partition that moved to another
        // node) disappears instead of reporting stale lag.
        .idle_timeout(MetricKindMask::GAUGE, Some(Duration::from_secs(30)))
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full(BATCH_SIZE.into()), BATCH_BUCKETS))
        .map_err(|e| e.to_string())?
        .install_recorder()
        .map_err(|e| e.to_string())?;
    describe();
    Ok(handle)
}

fn describe() {
    describe_counter!(
        EVENTS_PUBLISHED,
        "Events acknowledged by the broker and removed from the outbox."
    );
    describe_counter!(
        EVENTS_FAILED,
        "Events the broker did not acknowledge (they stay in the outbox)."
    );
    describe_histogram!(BATCH_SIZE, Unit::Count, "Events per fetched batch.");
    describe_histogram!(
        FETCH_SECONDS,
        Unit::Seconds,
        "Time to fetch a batch from the outbox."
    );
    describe_histogram!(
        SEND_SECONDS,
        Unit::Seconds,
        "Time from sending a batch to the broker's last acknowledgement."
    );
    describe_histogram!(
        ACK_SECONDS,
        Unit::Seconds,
        "Time to acknowledge (delete) a published batch."
    );
    describe_counter!(BROKER_ERRORS, "Broker errors, by kind.");
    describe_counter!(STORE_ERRORS, "Database errors in the relay, by operation.");
    describe_gauge!(
        PENDING_EVENTS,
        "Events waiting in an owned partition (capped at 1,000,000)."
    );
    describe_gauge!(
        OLDEST_AGE_SECONDS,
        Unit::Seconds,
        "Age of the oldest waiting event of an owned partition."
    );
    describe_gauge!(LEASES_HELD, "Partition leases this node holds.");
    describe_counter!(LEASES_ACQUIRED, "Partition leases acquired.");
    describe_counter!(
        LEASES_LOST,
        "Partition leases lost (expired or taken over) while held."
    );
    describe_counter!(LEASES_RELEASED, "Partition leases handed off gracefully.");
    describe_counter!(DEAD_LETTERS, "Events parked in the dead-letter table.");
    describe_counter!(VACUUMS, "Vacuums the relay ran on its partitions.");
    describe_gauge!(
        KAFKA_QUEUE_MESSAGES,
        "Messages in librdkafka's producer queue."
    );
    describe_gauge!(
        KAFKA_QUEUE_BYTES,
        Unit::Bytes,
        "Bytes in librdkafka's producer queue."
    );
    describe_counter!(KAFKA_RETRIES, "Produce requests librdkafka retried.");
    describe_counter!(KAFKA_REQUEST_ERRORS, "Requests to brokers that failed.");
    describe_gauge!(
        KAFKA_BROKER_RTT_SECONDS,
        Unit::Seconds,
        "Average round trip to each broker."
    );
    describe_gauge!(
        READY,
        "1 while the node reaches the database and the broker."
    );
}
