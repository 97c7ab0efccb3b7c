//! Events the broker refuses for good: retried, then parked in the dead
//! letters while the partition goes on (`park`), or holding the partition
//! (`block`); `outbox dlq` lists, replays and drops them.

use std::path::PathBuf;
use std::time::Duration;

use outbox_harness::*;
use serde_json::{json, Value};
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

/// Node `id` with [`config_file`] of `policy`.
fn poison_node(db: &TestDb, id: &str, prefix: &str, policy: &str) -> tokio::process::Command {
    let mut cmd = node_command(db, id, prefix);
    cmd.arg("--config").arg(config_file(policy));
    cmd
}

/// The ids of the first `n` events on `{prefix}order` (waiting up to
/// `timeout`, then `grace` for more), in the order they came.
async fn ids_on(prefix: &str, n: usize, timeout: Duration, grace: Duration) -> Vec<Uuid> {
    let got = consume(&[format!("{prefix}order")], n, timeout, grace).await;
    got.iter().map(|m| m.id()).collect()
}

/// Whether `n` events are parked within 10 s.
async fn parked_within_10s(db: &TestDb, n: i64) -> bool {
    eventually(Duration::from_secs(10), || async {
        dead_letter_count(db).await == n
    })
    .await
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
    let list = ["dlq", "list", "--json"];
    let out = succeed(outbox_command(db).args(list), "dlq list").await;
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

    let mut node = poison_node(&db, "p1", &prefix, "park").spawn().unwrap();
    let ids = ids_on(
        &prefix,
        3,
        Duration::from_secs(30),
        Duration::from_millis(500),
    )
    .await;
    assert_eq!(
        ids,
        vec![e1, e3, e5],
        "the partition did not go on past the poison events"
    );
    assert!(
        parked_within_10s(&db, 2).await,
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
    let replay = ["dlq", "replay", &too_large.to_string()];
    succeed(outbox_command(&db).args(replay), "dlq replay").await;
    assert_eq!(dead_letter_count(&db).await, 1);
    assert!(
        parked_within_10s(&db, 2).await,
        "the replayed event was not tried and parked again"
    );

    // Dropped, it is gone; an unknown id is an error.
    let drop_one = ["dlq", "drop", &bad_topic.to_string()];
    succeed(outbox_command(&db).args(drop_one), "dlq drop").await;
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
    let mut node = poison_node(&db, "b1", &prefix, "block")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // The first event goes out, then the node gives up on the second and
    // says so; a loaded machine may take a while for either.
    let first = ids_on(&prefix, 1, Duration::from_secs(30), Duration::ZERO).await;
    assert_eq!(
        first,
        vec![e1],
        "the event before the poison one is published"
    );
    let said = eventually(Duration::from_secs(30), || async {
        std::fs::read_to_string(&log).is_ok_and(|t| t.contains("partition blocked"))
    })
    .await;
    assert!(
        said,
        "not said loudly:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    // Blocked: for 5 s more, nothing passes the poison event.
    let ids = ids_on(&prefix, 2, Duration::from_secs(5), Duration::ZERO).await;
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

    // The operator switches to park: the poison event is parked, the rest flows.
    let mut node = poison_node(&db, "b1", &prefix, "park").spawn().unwrap();
    let ids = ids_on(
        &prefix,
        2,
        Duration::from_secs(30),
        Duration::from_millis(500),
    )
    .await;
    assert_eq!(ids, vec![e1, e3]);
    assert!(parked_within_10s(&db, 1).await);
    let parked: Uuid = sqlx::query_scalar("select event_id from outbox_dead_letters")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(parked, too_large);
    send_signal(&node, "TERM");
    assert!(node.wait().await.unwrap().success());
    db.drop_db().await;
}
