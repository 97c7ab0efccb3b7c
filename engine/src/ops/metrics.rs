//! Every metric the engine exports: names as constants, described once.
//! Hot paths record per batch, never per message; labels are bounded
//! (partition, error kind, broker), never event ids.

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use metrics_util::MetricKindMask;

/// Declares each metric name as a constant and lists them all in [`ALL`]
/// (identifier, name), so checks can import one list instead of parsing
/// this file.
macro_rules! metric_names {
    ($($ident:ident = $name:literal,)*) => {
        $(pub const $ident: &str = $name;)*
        /// Every metric the engine declares: (constant, name).
        pub const ALL: &[(&str, &str)] = &[$((stringify!($ident), $name)),*];
    };
}

metric_names! {
    EVENTS_PUBLISHED = "outbox_events_published_total",
    EVENTS_FAILED = "outbox_events_failed_total",
    BATCH_SIZE = "outbox_batch_size",
    FETCH_SECONDS = "outbox_fetch_duration_seconds",
    SEND_SECONDS = "outbox_send_duration_seconds",
    ACK_SECONDS = "outbox_ack_duration_seconds",
    BROKER_ERRORS = "outbox_broker_errors_total",
    STORE_ERRORS = "outbox_store_errors_total",
    PENDING_EVENTS = "outbox_pending_events",
    OLDEST_AGE_SECONDS = "outbox_oldest_event_age_seconds",
    LEASES_HELD = "outbox_leases_held",
    LEASES_ACQUIRED = "outbox_leases_acquired_total",
    LEASES_LOST = "outbox_leases_lost_total",
    LEASES_RELEASED = "outbox_leases_released_total",
    DEAD_LETTERS = "outbox_dead_letters_total",
    KAFKA_QUEUE_MESSAGES = "outbox_kafka_queue_messages",
    KAFKA_QUEUE_BYTES = "outbox_kafka_queue_bytes",
    KAFKA_RETRIES = "outbox_kafka_retries_total",
    KAFKA_REQUEST_ERRORS = "outbox_kafka_request_errors_total",
    KAFKA_BROKER_RTT_SECONDS = "outbox_kafka_broker_rtt_seconds",
    READY = "outbox_ready",
    LINE_STOPS = "outbox_line_stops_total",
    PRODUCER_RESETS = "outbox_producer_resets_total",
    SEGMENTS_TRUNCATED = "outbox_segments_truncated_total",
    CDC_EVENTS_TOTAL = "outbox_cdc_events_total",
    CDC_QUEUED_EVENTS = "outbox_cdc_queued_events",
    CDC_RECEIVED_LSN = "outbox_cdc_received_lsn",
    CDC_CONFIRMED_LSN = "outbox_cdc_confirmed_lsn",
    CDC_CONFIRMED_LAG_BYTES = "outbox_cdc_confirmed_lag_bytes",
    CDC_RECEIVED_LAG_BYTES = "outbox_cdc_received_lag_bytes",
    CDC_CONFIRMED_LAG_SECONDS = "outbox_cdc_confirmed_lag_seconds",
    CDC_RECEIVED_LAG_SECONDS = "outbox_cdc_received_lag_seconds",
    CDC_RETAINED_WAL_BYTES = "outbox_cdc_retained_wal_bytes",
    CDC_SLOT_ACTIVE = "outbox_cdc_slot_active",
    CDC_SLOT_HELD = "outbox_cdc_slot_held",
    CDC_WAL_STATUS = "outbox_cdc_wal_status",
    CDC_SLOT_RECOVERIES = "outbox_cdc_slot_recoveries_total",
}

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
        "Events waiting in an owned partition (counted up to 100,000; sampled every 5 s, less often while a count takes long)."
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
    describe_counter!(
        LINE_STOPS,
        "Times a partition stopped sending after a failed event (it resumes once the event is delivered or parked)."
    );
    describe_counter!(
        PRODUCER_RESETS,
        "Times the Kafka producer was recreated (deliveries stalled, or a fatal producer error)."
    );
    describe_counter!(
        SEGMENTS_TRUNCATED,
        "Ring segments of the outbox emptied with TRUNCATE once every row in them was published."
    );
    describe_gauge!(
        READY,
        "1 while the node reaches the database and the broker."
    );
    describe_counter!(
        CDC_EVENTS_TOTAL,
        "Outbox events decoded from the replication slot by this node."
    );
    describe_gauge!(
        CDC_QUEUED_EVENTS,
        "Events streamed from the slot and waiting in partition queues for the broker."
    );
    describe_gauge!(
        CDC_RECEIVED_LSN,
        "WAL position the replication stream has received up to."
    );
    describe_gauge!(
        CDC_CONFIRMED_LSN,
        "WAL position this node confirmed to the slot (everything before it is on the broker)."
    );
    describe_gauge!(
        CDC_CONFIRMED_LAG_BYTES,
        Unit::Bytes,
        "WAL written since the slot's confirmed position."
    );
    describe_gauge!(
        CDC_RECEIVED_LAG_BYTES,
        Unit::Bytes,
        "WAL written since the position the stream received."
    );
    describe_gauge!(
        CDC_CONFIRMED_LAG_SECONDS,
        Unit::Seconds,
        "Age of the oldest streamed transaction not yet confirmed (0 when none waits)."
    );
    describe_gauge!(
        CDC_RECEIVED_LAG_SECONDS,
        Unit::Seconds,
        "Time from a transaction's commit to its arrival in the stream, for the last one received."
    );
    describe_gauge!(
        CDC_RETAINED_WAL_BYTES,
        Unit::Bytes,
        "WAL the slot keeps on the server (current position minus restart_lsn)."
    );
    describe_gauge!(CDC_SLOT_ACTIVE, "1 while a walsender reads the slot.");
    describe_gauge!(CDC_SLOT_HELD, "1 while this node holds the slot's lease.");
    describe_gauge!(
        CDC_WAL_STATUS,
        "1 for the slot's current wal_status (reserved, extended, unreserved, lost)."
    );
    describe_counter!(
        CDC_SLOT_RECOVERIES,
        "Times the slot was found missing or lost and made again (CDC partitions caught up from the table)."
    );
}
