//! The operations endpoint of a running node: metrics with their labels,
//! liveness, and readiness that follows the broker. (A `traceparent` row
//! header reaching Kafka is checked in `relay_guarantees`.)

mod support;

use std::time::Duration;

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_exist_with_their_labels_after_a_run() {
    let db = TestDb::new(2).await;
    let prefix = unique_prefix();
    let port = free_port();
    let mut node = node_command(&db, "m1", &prefix)
        .args(["--http-addr", &format!("127.0.0.1:{port}")])
        .spawn()
        .unwrap();
    sqlx::query(
        "insert into outbox (aggregate_type, aggregate_id, event_type, payload)
         select 'order', g::text, 'E', '{}' from generate_series(1, 100) g",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let got = consume(
        &[format!("{prefix}order")],
        100,
        Duration::from_secs(30),
        Duration::ZERO,
    )
    .await;
    assert_eq!(got.len(), 100);

    assert_eq!(http_get(port, "/healthz").await.map(|r| r.0), Some(200));
    // Backlog gauges and librdkafka statistics arrive every 5 s.
    let start = std::time::Instant::now();
    let mut body = String::new();
    while start.elapsed() < Duration::from_secs(15) {
        body = http_get(port, "/metrics")
            .await
            .map(|r| r.1)
            .unwrap_or_default();
        if body.contains("outbox_kafka_queue_messages") && body.contains("outbox_pending_events{") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for needle in [
        "outbox_events_published_total{partition=\"0\"}",
        "outbox_events_published_total{partition=\"1\"}",
        "outbox_pending_events{partition=\"0\"}",
        "outbox_oldest_event_age_seconds{partition=\"1\"}",
        "outbox_batch_size_bucket{le=",
        "outbox_fetch_duration_seconds_bucket{le=",
        "outbox_send_duration_seconds_bucket{le=",
        "outbox_ack_duration_seconds_count",
        "outbox_leases_held 2",
        "outbox_leases_acquired_total 2",
        "outbox_kafka_retries_total",
        "outbox_ready 1",
    ] {
        assert!(body.contains(needle), "missing {needle} in:\n{body}");
    }
    let published: f64 = body
        .lines()
        .filter(|l| l.starts_with("outbox_events_published_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(published, 100.0);
    let foreign: Vec<&str> = body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty() && !l.starts_with("outbox_"))
        .collect();
    assert!(
        foreign.is_empty(),
        "metrics without the outbox_ prefix: {foreign:?}"
    );

    send_signal(&node, "TERM");
    assert!(node.wait().await.unwrap().success());
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_broker() {
    let db = TestDb::new(2).await;
    let mut broker = PrivateBroker::start();
    let port = free_port();
    let mut node = node_command(&db, "r1", &unique_prefix())
        .env("KAFKA_BROKERS", broker.addr())
        .args(["--http-addr", &format!("127.0.0.1:{port}")])
        .spawn()
        .unwrap();
    let ready = || async move { http_get(port, "/readyz").await.map(|r| r.0) == Some(200) };
    let unready = || async move { http_get(port, "/readyz").await.map(|r| r.0) == Some(503) };
    assert!(
        eventually(Duration::from_secs(20), ready).await,
        "never ready"
    );

    broker.stop();
    assert!(
        eventually(Duration::from_secs(30), unready).await,
        "still ready without a broker"
    );
    let (_, body) = http_get(port, "/readyz").await.unwrap();
    assert!(
        body.contains("broker: unreachable") && body.contains("database: ok"),
        "{body}"
    );
    assert_eq!(
        http_get(port, "/healthz").await.map(|r| r.0),
        Some(200),
        "alive all along"
    );

    broker.restart();
    assert!(
        eventually(Duration::from_secs(30), ready).await,
        "not ready after the broker came back"
    );
    send_signal(&node, "TERM");
    assert!(node.wait().await.unwrap().success());
    db.drop_db().await;
}
