//! The `outbox` binary at its doors: bad input gets a clear one-line error
//! and a non-zero exit (never a panic), `migrate` is idempotent and refuses
//! another partition count, `status --json` has its documented shape, and
//! SIGTERM drains and exits 0.

mod support;

use std::time::{Duration, Instant};

use outbox_engine::{Enqueuer, NewEvent};
use serde_json::{json, Value};
use support::*;

struct Outcome {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

async fn outbox(db: Option<&TestDb>, args: &[&str], env: &[(&str, &str)]) -> Outcome {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_outbox"));
    cmd.env_remove("DATABASE_URL")
        .env_remove("KAFKA_BROKERS")
        .env("RUST_LOG", "warn")
        .env("OUTBOX_HTTP_ADDR", "127.0.0.1:0")
        .args(args)
        .kill_on_drop(true);
    if let Some(db) = db {
        cmd.env("DATABASE_URL", &db.url)
            .env("KAFKA_BROKERS", brokers());
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("outbox finished in time")
        .expect("outbox ran");
    Outcome {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A failure with a clear message: non-zero, one `error:` line naming
/// `needle`, and no panic.
fn assert_clear_error(o: &Outcome, needle: &str) {
    assert!(
        o.code.is_some_and(|c| c != 0),
        "exit {:?}; stderr: {}",
        o.code,
        o.stderr
    );
    assert!(!o.stderr.contains("panicked"), "panic: {}", o.stderr);
    let errors: Vec<&str> = o
        .stderr
        .lines()
        .filter(|l| l.starts_with("error"))
        .collect();
    assert_eq!(errors.len(), 1, "want one error line: {}", o.stderr);
    assert!(
        errors[0].contains(needle),
        "{:?} does not mention {needle:?}",
        errors[0]
    );
}

#[tokio::test]
async fn unknown_flag_is_a_usage_error() {
    let o = outbox(None, &["run", "--no-such-flag"], &[]).await;
    assert_eq!(o.code, Some(2), "{}", o.stderr);
    assert!(o.stderr.contains("--no-such-flag"), "{}", o.stderr);
}

#[tokio::test]
async fn bad_database_url_is_named() {
    let o = outbox(None, &["status"], &[("DATABASE_URL", "mysql://nope")]).await;
    assert_clear_error(&o, "database.url");
    let o = outbox(None, &["status"], &[]).await;
    assert_clear_error(&o, "DATABASE_URL");
}

#[tokio::test]
async fn unreachable_database_is_a_clear_error() {
    let url = "postgres://app:sekrit@127.0.0.1:1/nowhere";
    let o = outbox(None, &["status"], &[("DATABASE_URL", url)]).await;
    assert_clear_error(
        &o,
        "cannot connect to the database at postgres://app:****@127.0.0.1:1/nowhere",
    );
    assert!(
        !o.stderr.contains("sekrit"),
        "password leaked: {}",
        o.stderr
    );
}

#[tokio::test]
async fn unreachable_broker_is_a_clear_error() {
    let db = TestDb::new(2).await;
    let o = outbox(
        Some(&db),
        &["run", "--node-id", "n1", "--kafka-brokers", "127.0.0.1:1"],
        &[],
    )
    .await;
    assert_clear_error(&o, "cannot reach Kafka brokers at 127.0.0.1:1");
    db.drop_db().await;
}

#[tokio::test]
async fn bad_config_file_names_the_key() {
    let dir = std::env::temp_dir().join(format!("outbox-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bad.toml");
    std::fs::write(&file, "[relay]\nbatch_sise = 10\n").unwrap();
    let o = outbox(
        None,
        &["run", "--config", file.to_str().unwrap()],
        &[
            ("DATABASE_URL", "postgres://x@127.0.0.1/x"),
            ("KAFKA_BROKERS", "127.0.0.1:9092"),
        ],
    )
    .await;
    assert_clear_error(&o, "batch_sise");
    let o = outbox(
        None,
        &["run", "--batch-size", "0"],
        &[
            ("DATABASE_URL", "postgres://x@127.0.0.1/x"),
            ("KAFKA_BROKERS", "127.0.0.1:9092"),
        ],
    )
    .await;
    assert_clear_error(&o, "relay.batch_size");
}

#[tokio::test]
async fn migrate_is_idempotent_and_refuses_another_partition_count() {
    let db = TestDb::new(4).await;
    let o = outbox(Some(&db), &["migrate", "--partitions", "4"], &[]).await;
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    assert!(o.stdout.contains("nothing to do"), "{}", o.stdout);

    let o = outbox(Some(&db), &["migrate", "--partitions", "8"], &[]).await;
    assert_clear_error(&o, "already has 4 partitions");
    let tables: i64 =
        sqlx::query_scalar("select count(*) from pg_inherits where inhparent = 'outbox'::regclass")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(tables, 4, "a refused migrate changed the schema");
    db.drop_db().await;
}

#[tokio::test]
async fn status_json_has_partitions_and_nodes() {
    let db = TestDb::new(3).await;
    sqlx::query(
        "insert into outbox (aggregate_type, aggregate_id, event_type, payload)
         select 'order', g::text, 'E', '{}' from generate_series(1, 30) g",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let o = outbox(Some(&db), &["status", "--json"], &[]).await;
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    let v: Value = serde_json::from_str(&o.stdout).expect("status --json is JSON");
    let parts = v["partitions"].as_array().expect("partitions array");
    assert_eq!(parts.len(), 3);
    assert_eq!(parts[0]["partition"], 0);
    assert!(parts[0].get("owner").is_some() && parts[0].get("epoch").is_some());
    let pending: i64 = parts.iter().map(|p| p["pending"].as_i64().unwrap()).sum();
    assert_eq!(pending, 30);
    assert!(parts.iter().any(|p| p["oldest_age_ms"].is_i64()));
    assert!(
        parts
            .iter()
            .all(|p| p["published"] == 0 && p["rate_per_sec"] == 0.0),
        "{parts:?}"
    );
    assert!(v["nodes"].is_array());

    let o = outbox(Some(&db), &["status"], &[]).await;
    assert!(o.stdout.contains("total pending: 30"), "{}", o.stdout);
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_drains_and_exits_zero() {
    let db = TestDb::new(4).await;
    let prefix = unique_prefix();
    let mut node = outbox_command(&db)
        .args(["run", "--node-id", "graceful", "--topic-prefix", &prefix])
        .args(["--topic-partitions", &TOPIC_PARTITIONS.to_string()])
        .spawn()
        .unwrap();
    // Writers keep committing before, during and after the SIGTERM.
    let pool = db.pool.clone();
    let writer = tokio::spawn(async move {
        let outbox = Enqueuer::new("public").unwrap();
        let mut committed = Vec::new();
        let start = Instant::now();
        let mut seq = 0;
        while start.elapsed() < Duration::from_secs(5) {
            let events: Vec<_> = (0..20)
                .map(|a| {
                    NewEvent::new("order", format!("a{a}"), "Tick", &json!({"seq": seq})).unwrap()
                })
                .collect();
            seq += 1;
            let mut tx = pool.begin().await.unwrap();
            outbox.enqueue(&mut tx, &events).await.unwrap();
            tx.commit().await.unwrap();
            committed.extend(events.iter().map(|e| e.id));
        }
        committed
    });
    tokio::time::sleep(Duration::from_millis(2500)).await;
    // SIGTERM while events are still flowing.
    send_signal(&node, "TERM");
    let status = tokio::time::timeout(Duration::from_secs(30), node.wait())
        .await
        .expect("exits within the shutdown timeout")
        .unwrap();
    assert_eq!(status.code(), Some(0));
    // Its leases were released, not left to expire.
    let held: i64 =
        sqlx::query_scalar("select count(*) from outbox_leases where owner is not null")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(held, 0, "leases still held after a graceful stop");
    let committed = writer.await.unwrap();

    // What it did not publish is still in the outbox; a restart publishes it.
    let mut node = outbox_command(&db)
        .args(["run", "--node-id", "graceful", "--topic-prefix", &prefix])
        .args(["--topic-partitions", &TOPIC_PARTITIONS.to_string()])
        .spawn()
        .unwrap();
    let got = consume(
        &[format!("{prefix}order")],
        committed.len(),
        Duration::from_secs(60),
        Duration::from_secs(1),
    )
    .await;
    node.start_kill().unwrap();
    let _ = node.wait().await;
    let (lost, _) = lost_and_duplicates(&committed, &got);
    assert_eq!(lost, 0);
    db.drop_db().await;
}
