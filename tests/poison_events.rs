//! Events the broker refuses for good: retried, then parked in the dead
//! letters while the partition goes on (`park`), or holding the partition
//! (`block`); `outbox dlq` lists, replays and drops them.

mod support;

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Value};
use support::*;
use uuid::Uuid;

/// A config file: a small producer message limit, quick retries.
fn config_file(policy: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("outbox-poison-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("outbox.toml");
    std::fs::write(
        &path,
        format!(
            "[relay]\npoison_policy = \"{policy}\"\nmax_attempts = 3\n\
             retry_backoff_min_ms = 50\nretry_backoff_max_ms = 200\n\
             [kafka.properties]\n\"message.max.bytes\" = \"20000\"\n"
        ),
    )
    .unwrap();
    path
}

/// Inserts an event through the SQL contract; returns its id.
async fn insert(db: &TestDb, aggregate: &str, seq: i64, pad: usize, topic: Option<&str>) -> Uuid {
    sqlx::query_scalar(
        "insert into outbox (aggregate_type, aggregate_id, event_type, payload, topic)
         values ('order', $1, 'E', $2, $3) returning id",
    )
    .bind(aggregate)
    .bind(json!({"seq": seq, "pad": "x".repeat(pad)}))
    .bind(topic)
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

async fn dlq_json(db: &TestDb) -> Vec<Value> {
    let out = outbox_command(db)
        .args(["dlq", "list", "--json"])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<Value>(&out.stdout)
        .expect("dlq list --json is JSON")
        .as_array()
        .cloned()
        .unwrap_or_default()
}

async fn dead_letter_count(db: &TestDb) -> i64 {
    sqlx::query_scalar("select count(*) from outbox_dead_letters")
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_events_are_parked_and_the_partition_goes_on() {
    let db = TestDb::new(1).await;
    let prefix = unique_prefix();
    let e1 = insert(&db, "a", 1, 10, None).await;
    let too_large = insert(&db, "a", 2, 30_000, None).await;
    let e3 = insert(&db, "a", 3, 10, None).await;
    let bad_topic = insert(&db, "b", 1, 10, Some("not a topic!")).await;
    let e5 = insert(&db, "b", 2, 10, None).await;

    let cfg = config_file("park");
    let mut node = node_command(&db, "p1", &prefix)
        .args(["--config", cfg.to_str().unwrap()])
        .spawn()
        .unwrap();
    let got = consume(
        &[format!("{prefix}order")],
        3,
        Duration::from_secs(30),
        Duration::from_millis(500),
    )
    .await;
    let ids: Vec<Uuid> = got.iter().map(|m| m.id()).collect();
    assert_eq!(
        ids,
        vec![e1, e3, e5],
        "the partition did not go on past the poison events"
    );
    assert!(
        eventually(Duration::from_secs(10), || async {
            dead_letter_count(&db).await == 2
        })
        .await,
        "poison events were not parked"
    );
    assert_eq!(db.pending().await, 0);

    let parked = dlq_json(&db).await;
    assert_eq!(parked.len(), 2, "{parked:?}");
    let by_id = |id: Uuid| {
        parked
            .iter()
            .find(|p| p["event_id"] == id.to_string())
            .cloned()
            .unwrap_or_else(|| panic!("{id} not parked: {parked:?}"))
    };
    let large = by_id(too_large);
    assert_eq!(large["partition"], 0);
    assert_eq!(large["attempts"], 3);
    assert!(
        large["error"]
            .as_str()
            .unwrap()
            .contains("MessageSizeTooLarge"),
        "{large}"
    );
    let topic = by_id(bad_topic);
    assert!(
        topic["error"]
            .as_str()
            .unwrap()
            .contains("invalid topic name"),
        "{topic}"
    );
    assert_eq!(topic["parked_by"], "p1");

    // Replayed, it is tried again (and parked again: it is still too large).
    let out = outbox_command(&db)
        .args(["dlq", "replay", &too_large.to_string()])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(dead_letter_count(&db).await, 1);
    assert!(
        eventually(Duration::from_secs(10), || async {
            dead_letter_count(&db).await == 2
        })
        .await,
        "the replayed event was not tried and parked again"
    );

    // Dropped, it is gone; an unknown id is an error.
    let out = outbox_command(&db)
        .args(["dlq", "drop", &bad_topic.to_string()])
        .output()
        .await
        .unwrap();
    assert!(out.status.success());
    assert_eq!(dead_letter_count(&db).await, 1);
    let out = outbox_command(&db)
        .args(["dlq", "drop", &Uuid::new_v4().to_string()])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no parked event"));

    // Counted in the metrics' source: the node logged each parking.
    send_signal(&node, "TERM");
    assert!(node.wait().await.unwrap().success());
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_policy_holds_the_partition_until_the_operator_acts() {
    let db = TestDb::new(1).await;
    let prefix = unique_prefix();
    let e1 = insert(&db, "a", 1, 10, None).await;
    let too_large = insert(&db, "a", 2, 30_000, None).await;
    let e3 = insert(&db, "a", 3, 10, None).await;

    let log = std::env::temp_dir().join(format!("outbox-block-{}.log", Uuid::new_v4().simple()));
    let mut node = node_command(&db, "b1", &prefix)
        .args(["--config", config_file("block").to_str().unwrap()])
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let got = consume(
        &[format!("{prefix}order")],
        2,
        Duration::from_secs(8),
        Duration::ZERO,
    )
    .await;
    let ids: Vec<Uuid> = got.iter().map(|m| m.id()).collect();
    assert_eq!(
        ids,
        vec![e1],
        "an event overtook the poison event under block"
    );
    assert_eq!(
        db.pending().await,
        2,
        "the poison event and the one after it wait"
    );
    assert_eq!(dead_letter_count(&db).await, 0);
    send_signal(&node, "TERM");
    assert!(node.wait().await.unwrap().success());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("partition blocked"),
        "not said loudly:\n{text}"
    );

    // The operator switches to park: the poison event is parked, the rest flows.
    let mut node = node_command(&db, "b1", &prefix)
        .args(["--config", config_file("park").to_str().unwrap()])
        .spawn()
        .unwrap();
    let got = consume(
        &[format!("{prefix}order")],
        2,
        Duration::from_secs(30),
        Duration::from_millis(500),
    )
    .await;
    let ids: Vec<Uuid> = got.iter().map(|m| m.id()).collect();
    assert_eq!(ids, vec![e1, e3]);
    assert!(
        eventually(Duration::from_secs(10), || async {
            dead_letter_count(&db).await == 1
        })
        .await
    );
    let parked: Uuid = sqlx::query_scalar("select event_id from outbox_dead_letters")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(parked, too_large);
    send_signal(&node, "TERM");
    assert!(node.wait().await.unwrap().success());
    db.drop_db().await;
}
